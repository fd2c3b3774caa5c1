"""The flow-digits world: its prompt grammar, its data, its reward on hand-made canvases, its model behind the SD3
interface, and the shipped model's quality against its committed report."""
import json

import pytest
import torch

from diffrl_fast.models import flow_digits as fd
from diffrl_fast.models.digits import ASSETS_DIR, load_digit_classifier
from diffrl_fast.models.flow_digits import EMPTY_MASKS, EMPTY_WEIGHT, layout_scores, slot_predictions


@pytest.mark.parametrize("prompt, layout", [
    ("7", (("centre", 7),)),
    ("3 left of 8", (("left", 3), ("right", 8))),
    ("8 right of 3", (("left", 3), ("right", 8))),
    ("2 above 5", (("top", 2), ("bottom", 5))),
    ("5 below 2", (("top", 2), ("bottom", 5))),
    ("two 4s", (("left", 4), ("right", 4))),
    ("Two 4.", (("left", 4), ("right", 4))),
    ("", ()),
])
def test_grammar_accepts(prompt, layout):
    assert fd.parse_layout(prompt) == layout


@pytest.mark.parametrize("prompt, why", [
    ("12", "accepted"), ("3 left of 3", "two different digits"), ("3 next to 8", "accepted"), ("three", "accepted"),
    ("3 left 8", "accepted"), ("3 above of 8", "accepted"), ("x left of 8", "two numerals"), ("two 12s", "accepted"),
])
def test_grammar_rejects_naming_the_grammar(prompt, why):
    with pytest.raises(fd.LayoutPromptError, match=why) as info:
        fd.parse_layout(prompt)
    assert "'3 left of 8'" in str(info.value) and repr(prompt) in str(info.value)


def test_prompt_sets_and_held_out_pairs():
    prompts = fd.all_prompts()
    assert len(prompts) == 380 == len(set(prompts))
    assert len(fd.FLOW_DIGITS_TRAIN_PROMPTS) == 308 and len(fd.FLOW_DIGITS_HELDOUT_PROMPTS) == 72
    assert len(fd.HELDOUT_PAIRS) == 9
    held = {tuple(sorted(d for _, d in fd.parse_layout(p))) for p in fd.FLOW_DIGITS_HELDOUT_PROMPTS}
    train = {tuple(sorted(d for _, d in fd.parse_layout(p))) for p in fd.FLOW_DIGITS_TRAIN_PROMPTS}
    assert held == set(fd.HELDOUT_PAIRS) and not held & train
    # every digit still appears in every slot in training: held-out prompts are new combinations, not new parts
    seen = {sd for p in fd.FLOW_DIGITS_TRAIN_PROMPTS for sd in fd.parse_layout(p)}
    assert seen == {(s, d) for s in fd.SLOT_ORDER for d in range(10)}
    gen = torch.Generator().manual_seed(0)
    drawn = fd.sample_training_prompts(400, gen)
    assert not set(drawn) & set(fd.FLOW_DIGITS_HELDOUT_PROMPTS)


def test_tokens_and_encoder():
    assert fd.tokenize("3 left of 8") == [fd.VOCAB.index(w) for w in ("3", "left", "of", "8")]
    assert fd.tokenize("two 4s") == [fd.VOCAB.index("two"), fd.VOCAB.index("4"), 0, 0]
    assert fd.tokenize("") == [0, 0, 0, 0]
    enc = fd.LayoutPromptEncoder(dim=8)
    hidden, pooled = enc.encode(["3 left of 8", "8 left of 3", ""])
    assert hidden.shape == (3, 4, 8) and pooled.shape == (3, 32)
    assert not torch.allclose(pooled[0], pooled[1])  # word order matters


def _canvas(layout, gen, split="train"):
    return fd.render([layout], gen, split=split)


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier()


def test_render_places_digits_in_their_slots(classifier):
    gen = torch.Generator().manual_seed(0)
    prompts = list(fd.FLOW_DIGITS_TRAIN_PROMPTS) + list(fd.FLOW_DIGITS_HELDOUT_PROMPTS)
    layouts = [fd.parse_layout(p) for p in prompts]
    images = fd.render(layouts, gen, split="held_out")  # digits the classifier never trained on
    assert images.shape == (380, 1, 32, 32) and images.min() >= 0 and images.max() <= 1
    scores = layout_scores(classifier, images, layouts)
    assert float(scores["correct"].float().mean()) > 0.95
    # the data leaves each layout's empty region black (a jittered digit stays 1 pixel inside its margin)
    for img, layout in zip(images, layouts):
        assert float(img[0][EMPTY_MASKS[fd.orientation(layout)]].max()) == 0.0


def test_reward_on_hand_made_canvases(classifier):
    gen = torch.Generator().manual_seed(1)
    right = _canvas((("left", 3), ("right", 8)), gen)
    swapped = _canvas((("left", 8), ("right", 3)), gen)
    centred = _canvas((("centre", 7),), gen)
    black, white = torch.zeros(1, 1, 32, 32), torch.ones(1, 1, 32, 32)
    images = torch.cat([right, swapped, black, white, centred, right])
    layouts = [fd.parse_layout(p) for p in ("3 left of 8", "3 left of 8", "3 left of 8", "3 left of 8", "7", "7")]
    s = layout_scores(classifier, images, layouts)
    assert s["correct"].tolist() == [True, False, False, False, True, False]
    assert s["reward"][0] > -1.0 and s["reward"][1] < s["reward"][0] - 5
    # the empty term: a black canvas pays nothing for it, a white one EMPTY_WEIGHT
    with torch.no_grad():
        blank = classifier(torch.zeros(1, 1, 16, 16)).log_softmax(-1)[0]
        full = classifier(torch.ones(1, 1, 16, 16)).log_softmax(-1)[0]
    assert float(s["reward"][2]) == pytest.approx(float(blank[3] + blank[8]), abs=1e-4)
    assert float(s["reward"][3]) == pytest.approx(float(full[3] + full[8]) - EMPTY_WEIGHT, abs=1e-4)
    # a pair drawn for a single-digit prompt: the centre crop straddles both digits, and their halves light the empty
    # region around the centre
    assert float(s["reward"][5]) < float(s["reward"][4]) - 1
    assert s["slot_count"] == 10 and slot_predictions(images[:2], layouts[:2], classifier) == [[(3, 3), (8, 8)], [(3, 8), (8, 3)]]


def test_reward_registry_and_errors():
    from diffrl_fast.rewards import get_reward

    fn = get_reward("digit_layout")
    gen = torch.Generator().manual_seed(2)
    images = fd.render([fd.parse_layout("2 above 5"), fd.parse_layout("two 4s")], gen)
    rewards, info = fn(images, ["2 above 5", "two 4s"], [{}, {}])
    assert rewards.shape == (2,) and info["layout_correct"] == 1.0 and info["slot_accuracy"] == 1.0
    # metadata's layout (what the flow-digits model attaches) wins over the prompt text
    r_meta, _ = fn(images[:1], ["whatever"], [{"layout": [["top", 2], ["bottom", 5]]}])
    assert torch.allclose(r_meta, rewards[:1])
    held, _ = get_reward("digit_layout_heldout")(images, ["2 above 5", "two 4s"])
    assert held.shape == (2,) and not torch.equal(held, rewards)
    with pytest.raises(ValueError, match="unconditional"):
        fn(images[:1], [""])
    with pytest.raises(ValueError, match=r"canvases \[B, 1 or 3, 32, 32\]"):
        fn(torch.zeros(1, 1, 16, 16), ["7"])
    with pytest.raises(fd.LayoutPromptError, match="accepted"):
        fn(images[:1], ["7 next to 3"])
    assert fn.embed(images).shape == (2, 5 * 128)


def test_transformer_is_sd3_and_scheduler_is_flow_matching():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    net = fd.build_transformer()
    assert isinstance(net, SD3Transformer2DModel) and isinstance(fd.make_scheduler(), FlowMatchEulerDiscreteScheduler)
    enc = fd.LayoutPromptEncoder()
    hidden, pooled = enc.encode(["3 left of 8", "7"])
    out = net(hidden_states=torch.randn(2, 1, 32, 32), timestep=torch.tensor([900.0, 100.0]), encoder_hidden_states=hidden,
              pooled_projections=pooled, return_dict=False)[0]
    assert out.shape == (2, 1, 32, 32)


@pytest.fixture(scope="module")
def model():
    from diffrl_fast.models import load_model

    return load_model("flow-digits")


def test_model_behind_the_sd3_interface(model):
    from diffrl_fast.diffusion.rollout import sample_trajectories

    assert model.kind == "flow_digits" and model.latent_shape == (1, 32, 32)
    traj = sample_trajectories(model, ["3 left of 8", "7"], num_steps=3, guidance_scale=1.0, seeds=[0, 1],
                               metadata=model.prompt_metadata(["3 left of 8", "7"]))
    assert traj.images.shape == (2, 1, 32, 32) and traj.schedule.kind == "flow_sde"
    assert model.prompt_metadata(["two 4s"]) == [{"layout": [["left", 4], ["right", 4]]}]
    with pytest.raises(fd.LayoutPromptError, match="accepted"):
        model.encode(["3 beside 8"])


def test_shipped_model_matches_its_report(model):
    """A smaller fixed-seed sample at the report's setting lands within 4 standard errors of the committed figures."""
    report = json.loads((ASSETS_DIR / fd.REPORT).read_text())["quality"]
    world = model.world
    kw = dict(num_steps=report["num_steps"], noise_level=report["noise_level"], guidance_scale=report["eval_guidance"], seed=123)
    row = next(r for r in report["by_guidance"] if r["guidance_scale"] == report["eval_guidance"])
    got = fd.evaluate_layouts(world, list(fd.FLOW_DIGITS_TRAIN_PROMPTS), num_samples=200, **kw)
    se = (row["layout_correct"] * (1 - row["layout_correct"]) / 200) ** 0.5
    assert abs(got["layout_correct"] - row["layout_correct"]) < 4 * se + 0.01
    assert report["heldout"]["layout_correct"] < row["layout_correct"]  # held-out layouts are harder: room to generalise


def test_pretrain_quick_writes_a_loadable_world_and_report(tmp_path):
    report = fd.pretrain_main(tmp_path, quick=True)
    world = fd.load_pretrained_flow_digits(directory=tmp_path)
    assert world.transformer.config.patch_size == 4 and world.prompt_encoder.dim == 32
    saved = json.loads((tmp_path / fd.REPORT).read_text())
    assert saved["command"] == "diffrl-fast pretrain flow-digits --quick" and saved["machine"]["commit"]
    q = saved["quality"]
    assert [r["guidance_scale"] for r in q["by_guidance"]] == list(fd.REPORT_GUIDANCE)
    assert [r["k"] for r in q["early_steps"]] == [1, 2, 5, 10] and q["heldout"]["n"] == 20
    assert report["teacher"]["steps"] == 20 and report["transformer"]["steps"] == 10
    assert report["distillation"]["guidance_scale"] == fd.DISTILL_GUIDANCE
    config = json.loads((tmp_path / fd.CONFIG).read_text())
    assert config["training"]["distilled_at_guidance"] == fd.DISTILL_GUIDANCE and config["teacher_training"]["steps_done"] == 20
    with pytest.raises(FileNotFoundError, match="pretrain flow-digits"):
        fd.load_pretrained_flow_digits(directory=tmp_path / "missing")


def test_guidance_distillation_learns_the_teachers_guided_velocity(model, tmp_path):
    """The student regresses v_u + w (v_c - v_u) of the teacher: after a few steps its unguided velocity is much
    closer to the teacher's guided one than the teacher's own unguided velocity is."""
    teacher = model.world
    w = 3.0
    gen = torch.Generator().manual_seed(0)
    prompts = fd.sample_training_prompts(16, gen)
    x0 = fd.render([fd.parse_layout(p) for p in prompts], gen) * 2 - 1
    sigma = torch.full((16,), 0.6)
    x_t = 0.4 * x0 + 0.6 * torch.randn(x0.shape, generator=gen)

    def velocity(transformer, texts):
        hidden, pooled = teacher.prompt_encoder.encode(texts)
        with torch.no_grad():
            return transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=hidden,
                               pooled_projections=pooled, return_dict=False)[0]

    v_c, v_u = velocity(teacher.transformer, prompts), velocity(teacher.transformer, [""] * 16)
    guided = v_u + w * (v_c - v_u)
    fd.pretrain_flow_digits(tmp_path, teacher=teacher, teacher_guidance=w, steps=40, batch_size=32, lr=1e-3, warmup_steps=2, ema_decay=0.0,
                            log_every=0, seed=1)
    student = fd.load_pretrained_flow_digits(directory=tmp_path)
    before = (v_c - guided).pow(2).mean()
    after = (velocity(student.transformer, prompts) - guided).pow(2).mean()
    assert after < 0.5 * before, (float(before), float(after))
    # the teacher itself is left as it was, frozen
    assert torch.equal(velocity(teacher.transformer, prompts), v_c) and not any(p.requires_grad for p in teacher.transformer.parameters())
