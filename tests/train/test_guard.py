"""Guards against reward hacking: the stop rule on synthetic held-out series, and in a digits-world run the logged
guard figures, the best checkpoint kept and loadable, the guard's state across a resume, and a broken held-out
reward that only warns."""
import json
import math

import pytest
import torch

from diffrl_fast.config_utils import load_config
from diffrl_fast.train.config import PRESETS, Config, validate
from diffrl_fast.train.guard import GuardState, decide, within_prompt_diversity

TINY = ["num_epochs=3", "sample.num_steps=3", "sample.batch_size=8", "sample.num_batches_per_epoch=1", "train.batch_size=8",
        "log.eval_samples=4", "log.grid_samples=0", "log.progress=false", "log.tensorboard=false", "reward.overlap=false",
        "guard.samples=8", "guard.samples_per_prompt=2"]


def series(means, n=16, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    return [m + base + noise * torch.randn(n, generator=g, dtype=torch.float64) for m in means]


def run_rule(values, *, tolerance=2.0, patience=2, diversities=None, min_diversity=0.5):
    state, stop_at, best_at = GuardState(), None, []
    for k, v in enumerate(values):
        d = diversities[k] if diversities else 1.0
        is_best, stop = decide(state, k, v, d, tolerance=tolerance, patience=patience, min_diversity=min_diversity)
        if is_best:
            best_at.append(k)
        if stop:
            stop_at = k
            break
    return state, stop_at, best_at


def test_stop_comes_within_patience_evaluations_after_the_peak():
    # held-out reward rises to a peak at evaluation 4, then falls by 1 per evaluation; the per-sample spread is ~1,
    # so an evaluation's own standard error is ~1 / sqrt(16) = 0.25 and a fall needs > 0.5
    means = [0.0, 0.3, 0.6, 0.8, 1.0, 0.0, -1.0, -2.0, -3.0]
    state, stop_at, best_at = run_rule(series(means))
    assert state.best_epoch == 4 and best_at[-1] == 4
    assert stop_at == 6  # two falls in a row: evaluations 5 and 6
    assert "2 evaluations in a row" in state.stopped and state.stopped_epoch == 6


def test_noise_below_the_tolerance_never_stops():
    flat = series([1.0] * 12, noise=0.05)
    state, stop_at, _ = run_rule(flat)
    assert stop_at is None and state.falls <= 1
    # a real but small change of the policy (0.3, about one standard error) is not a fall
    state, stop_at, _ = run_rule(series([1.0, 0.7, 0.7, 0.7, 0.7]))
    assert stop_at is None and state.falls == 0
    # one fall, then a recovery: the count starts again
    state, stop_at, _ = run_rule(series([1.0, 0.0, 1.0, 0.0, 1.0]), patience=2)
    assert stop_at is None


def test_a_dip_before_any_gain_is_not_a_fall():
    # the pre-training evaluation stays the best through a dip and a recovery: no stop by default
    dip = series([1.0, -1.0, -2.0, 0.0, 1.5, 2.0])
    state, stop_at, best_at = run_rule(dip)
    assert stop_at is None and best_at == [0, 4, 5]
    state = GuardState()
    for k, v in enumerate(dip[:3]):  # counted from the start on request
        _, stop = decide(state, k, v, 1.0, tolerance=2.0, patience=2, min_diversity=0.5, from_start=True)
    assert stop and state.stopped_epoch == 2


def test_diversity_collapse_stops():
    state, stop_at, _ = run_rule(series([0.0, 0.1, 0.2, 0.3]), diversities=[0.2, 0.15, 0.09, 0.05])
    assert stop_at == 2 and "diversity" in state.stopped


def test_within_prompt_diversity():
    img = torch.zeros(4, 1, 8, 8)
    img[1] = 1.0  # prompt a: two images 1 apart per pixel; prompt b: identical
    assert within_prompt_diversity(img, ["a", "a", "b", "b"]) == pytest.approx(0.5)
    assert math.isnan(within_prompt_diversity(img[:2], ["a", "b"]))


def test_feature_space_diversity_and_its_encoder():
    from types import SimpleNamespace

    from diffrl_fast.rewards import get_reward
    from diffrl_fast.train.guard import Guard

    # cosine distance of the embeddings: prompt a's two images point the same way (0), prompt b's are orthogonal (1)
    feats = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    embed = lambda images: feats  # noqa: E731
    assert within_prompt_diversity(torch.zeros(4, 3, 8, 8), ["a", "a", "b", "b"], embed=embed) == pytest.approx(0.5)
    cfg = validate(load_config(Config, PRESETS / "digits.yaml", ["guard.heldout_reward=[digit_confidence_heldout]"]))
    guard = Guard(cfg.guard, cfg.reward)
    trainer = SimpleNamespace(cfg=cfg, reward_fn=get_reward("digit_confidence"))
    # 'auto': pixels for the embedded worlds' small images; for SD-size ones the training reward's encoder
    assert guard.diversity_encoder(trainer, torch.zeros(2, 1, 16, 16)) == ("pixels", None)
    guard._embed = None
    space, fn = guard.diversity_encoder(trainer, torch.zeros(2, 3, 128, 128))
    assert space == "features of digit_confidence" and fn is trainer.reward_fn.embed
    named = validate(load_config(Config, PRESETS / "digits.yaml", ["guard.diversity_encoder=digit_confidence_heldout"]))
    assert Guard(named.guard, named.reward)._embed[0] == "features of digit_confidence_heldout"
    bad = validate(load_config(Config, PRESETS / "digits.yaml", ["guard.diversity_encoder=brightness"]))
    with pytest.raises(ValueError, match="no image encoder"):
        Guard(bad.guard, bad.reward)


def broken_reward(images, prompts, metadata):
    raise RuntimeError("the held-out model is down")


CALLS = {"n": 0}


def declining_reward(images, prompts, metadata):
    """A held-out reward that peaks at its second call (the first trained epoch), then falls faster and faster: a run
    that hacks, as the guard sees it."""
    CALLS["n"] += 1
    return -float((CALLS["n"] - 2) ** 2) + 1e-3 * images.flatten(1).mean(1).double(), {}


def test_guarded_run_logs_keeps_best_and_resumes(tmp_path):
    from diffrl_fast.train.checkpoint import load_checkpoint
    from diffrl_fast.train.trainer import Trainer

    over = [*TINY, "guard.heldout_reward=[digit_confidence_heldout, 'tests.train.test_guard:broken_reward']",
            "guard.stop=false", f"output_dir={tmp_path}", "name=g"]
    cfg = validate(load_config(Config, PRESETS / "digits.yaml", over))
    logs = []
    trainer = Trainer(cfg, tmp_path / "g", log_fn=logs.append)
    assert trainer.has_reference  # full fine-tuning keeps a frozen copy for the drift
    trainer.run()
    run = tmp_path / "g"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert {"guard_heldout", "guard_heldout_se", "guard_reward", "guard_diversity", "guard_drift"} <= set(r)
        assert r["guard_drift"] >= 0 and r["guard_diversity"] > 0
    guard = json.loads((run / "guard.json").read_text())
    assert [h["epoch"] for h in guard["history"]] == [0, 1, 2, 3]
    assert guard["best"] == max(h["guard_heldout"] for h in guard["history"])
    assert "broken_reward" in guard["unavailable"]  # warned about at every evaluation, never raised
    assert sum("broken_reward" in line and "warning" in line for line in logs) >= 4
    best = run / "checkpoints" / "best"
    weights, _, state, _ = load_checkpoint(best, trainer.identity())
    assert state["epoch"] == guard["best_epoch"] and weights
    summary = (run / "summary.md").read_text()
    assert "## Guard" in summary and f"at epoch {guard['best_epoch']}" in summary and "unavailable" in summary
    assert (run / "reward_curve.png").stat().st_size > 0
    # a resumed run continues the guard where it was: its best, its falls, its history
    resumed = Trainer(validate(load_config(Config, PRESETS / "digits.yaml", [*over, "num_epochs=4"])), run, log_fn=lambda s: None)
    assert resumed.resume() and resumed.guard.state.best == guard["best"]
    assert len(resumed.guard.state.history) == 4 and resumed.guard.state.falls == guard["falls"]


def test_guard_stop_is_a_clean_end(tmp_path):
    from diffrl_fast.train.trainer import Trainer

    CALLS["n"] = 0
    over = [*TINY, "num_epochs=6", "guard.patience=2", "guard.heldout_reward=['tests.train.test_guard:declining_reward']",
            f"output_dir={tmp_path}", "name=s"]
    cfg = validate(load_config(Config, PRESETS / "digits.yaml", over))
    summary = Trainer(cfg, tmp_path / "s", log_fn=lambda s: None).run()
    guard = json.loads((tmp_path / "s" / "guard.json").read_text())
    assert guard["stopped"] and summary["guard"]["stopped_epoch"] == guard["stopped_epoch"] == 3  # best at 1, falls at 2 and 3
    assert guard["best_epoch"] == 1 and (tmp_path / "s" / "checkpoints" / "best").is_dir()
    assert summary["epochs"] == guard["stopped_epoch"] and summary["after"]["n"] == 4  # final evaluation and weights
    assert "Stopped by the guard" in (tmp_path / "s" / "summary.md").read_text()
    # the stop rule replayed on the logged evaluations (what the over-optimisation experiment does) stops there too
    from benchmarks.bench_overoptimisation import replay_stop

    assert replay_stop(guard["history"], cfg.guard) == (3, guard["stopped"])
    # the best checkpoint is what `diffrl-fast sample --run R --checkpoint best` loads; a missing one names the fix
    from safetensors.torch import load_file

    from diffrl_fast.train.runs import load_run

    model, _ = load_run(tmp_path / "s", checkpoint="best")
    kept = load_file(str(tmp_path / "s" / "checkpoints" / "best" / "weights.safetensors"))
    params = dict(model.denoiser.named_parameters())
    assert kept and all(torch.equal(params[n], w) for n, w in kept.items())
    with pytest.raises(FileNotFoundError, match="no checkpoint 'epoch_9999'.*best"):
        load_run(tmp_path / "s", checkpoint="epoch_9999")


def test_guard_is_off_without_a_heldout_reward(tmp_path):
    from diffrl_fast.train.trainer import Trainer

    cfg = validate(load_config(Config, PRESETS / "digits.yaml", [*TINY, "num_epochs=1", "guard.heldout_reward=[]", f"output_dir={tmp_path}", "name=o"]))
    trainer = Trainer(cfg, tmp_path / "o", log_fn=lambda s: None)
    assert not trainer.guard.enabled and not trainer.has_reference
    trainer.run()
    assert "guard_heldout" not in json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])
    assert not (tmp_path / "o" / "guard.json").exists()
