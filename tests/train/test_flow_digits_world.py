"""The flow-digits world end to end: every algorithm trains on it from its preset, check-parity holds on it, bad
prompts stop a run before any model loads, and its grids mark each slot."""
import json
import math

import pytest
import torch

from diffrl_fast.config_utils import load_config
from diffrl_fast.train.config import PRESETS, Config, validate
from tests.cli_inprocess import run_cli

PRESET = PRESETS / "flow_digits.yaml"
TINY = ["num_epochs=1", "sample.num_steps=3", "sample.batch_size=8", "sample.num_batches_per_epoch=1", "train.batch_size=8",
        "train.gradient_accumulation_steps=1", "log.eval_samples=4", "log.grid_samples=4", "log.progress=false",
        "log.tensorboard=false", "reward.overlap=false"]
# groups must divide the 8-sample batches; the dense view draws 2 of the 3 steps per pair
ALGOS = {"ddpo_is": [], "ddpo_sf": [], "dpok": ["train.chunk_size=3"], "d3po": [], "dense": ["dense.num_timesteps=2"],
         "tdpo": [], "tdpo_r": [], "grpo": ["grpo.group_size=4"], "nft": ["nft.group_size=4"],
         "awm": ["awm.group_size=4", "awm.train_timesteps=2"],
         "dgpo": ["dgpo.group_size=4", "dgpo.train_timesteps=2", "dgpo.max_step=2"]}


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_every_algorithm_trains_on_flow_digits(tmp_path, algo):
    from diffrl_fast.train.trainer import Trainer

    cfg = validate(load_config(Config, PRESET, [f"algo={algo}", *TINY, *ALGOS[algo], f"output_dir={tmp_path}", "name=r"]))
    assert cfg.model.path == "flow-digits" and cfg.reward.name == "digit_layout"
    summary = Trainer(cfg, tmp_path / "r", log_fn=lambda s: None).run()
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and math.isfinite(records[0]["loss"])
    assert 0.0 <= records[0]["layout_correct"] <= 1.0
    assert summary["after"]["n"] == 4
    # the layout-correct rate before and after, beside the reward (mean and standard error)
    assert set(summary["after"]["layout_correct"]) == {"mean", "se"}
    assert "| layout_correct |" in (tmp_path / "r" / "summary.md").read_text()


def test_check_parity_on_flow_digits():
    out = run_cli("check-parity", "--model", "flow-digits", "--samples", "3", "--steps", "10", "--guidance", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "flow_digits, flow_sde" in out.stdout and "PASS" in out.stdout
    steps = [line.split() for line in out.stdout.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert len(steps) == 10 and max(float(s[2]) for s in steps) <= 1e-5


def test_cps_rollouts_train_and_recompute_exactly(tmp_path):
    """sample.sde_type=cps: the trainer's rollouts, recompute and KL use coefficients-preserving sampling; the
    recompute agrees with the rollout (check-parity), and a grpo run with the flow_grpo KL trains."""
    out = run_cli("check-parity", "--model", "flow-digits", "--samples", "2", "--steps", "6", "--guidance", "1", "--sde-type", "cps")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "flow_digits, flow_cps" in out.stdout and "PASS" in out.stdout
    from diffrl_fast.train.trainer import Trainer

    cfg = validate(load_config(Config, PRESET, ["algo=grpo", *TINY, "grpo.group_size=4", "grpo.beta=0.04", "sample.sde_type=cps",
                                                f"output_dir={tmp_path}", "name=r"]))
    seen = []
    trainer = Trainer(cfg, tmp_path / "r", log_fn=lambda s: None)
    sample = trainer._sample  # record the schedule of every rollout

    def spy(*args, **kwargs):
        traj = sample(*args, **kwargs)
        seen.append(traj.schedule.kind)
        return traj

    trainer._sample = spy
    trainer.run()
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["loss"]) and record.get("kl", 0.0) >= 0.0
    assert seen and set(seen) == {"flow_cps"}


def test_eval_sde_type_evaluates_a_cps_policy_on_flow_grpos_sde(tmp_path):
    """log.eval_sde_type=sde: rollouts stay CPS, the before/after evaluation samples Flow-GRPO's SDE (the same sampler
    as a sde-trained contender's), and its samples equal those of a sde run's evaluation."""
    from diffrl_fast.train.trainer import Trainer

    def trainer(*extra):
        cfg = validate(load_config(Config, PRESET, ["algo=grpo", *TINY, "grpo.group_size=4", f"output_dir={tmp_path}", "name=r", *extra]))
        return Trainer(cfg, tmp_path / "r", log_fn=lambda s: None)

    cps = trainer("sample.sde_type=cps", "log.eval_sde_type=sde")
    prompts, seeds = ["3", "1 left of 7"], [5, 6]
    assert cps._sample(prompts, seeds, epoch=1).schedule.kind == "flow_cps"
    evaluated = cps._sample(prompts, seeds)
    assert evaluated.schedule.kind == "flow_sde"
    assert torch.equal(evaluated.images, trainer()._sample(prompts, seeds).images)


def test_cps_on_a_model_without_flow_matching_exits_2(tmp_path):
    out = run_cli("train", "configs/digits.yaml", "sample.sde_type=cps", "num_epochs=1", f"output_dir={tmp_path}")
    assert out.returncode == 2 and "sample.sde_type=sde" in out.stderr


@pytest.mark.parametrize("prompt", ["3 beside 8", "12", "3 left of 3"])
def test_bad_prompt_exits_2_naming_the_grammar_before_loading(prompt, tmp_path):
    out = run_cli("train", str(PRESET), "prompt_file=", f"prompts=[{prompt}]", f"output_dir={tmp_path}")
    assert out.returncode == 2
    assert "'3 left of 8'" in out.stderr and "Traceback" not in out.stderr
    assert not any(tmp_path.iterdir())  # nothing was started


def test_grids_mark_every_slot(tmp_path):
    from diffrl_fast.train.trainer import Trainer

    cfg = validate(load_config(Config, PRESET, [*TINY, "prompt_file=", "prompts=[3 left of 8, 7]", f"output_dir={tmp_path}", "name=g"]))
    trainer = Trainer(cfg, tmp_path / "g", log_fn=lambda s: None)
    rewards, images, caps = trainer.evaluate(4, captions=True)
    assert images.shape == (4, 1, 32, 32)
    assert [len(c["slots"]) for c in caps] == [2, 1, 2, 1]
    assert [[t for t, _ in c["slots"]] for c in caps[:2]] == [[3, 8], [7]]
    assert all(0 <= p <= 9 for c in caps for _, p in c["slots"])
    assert trainer.eval_metrics["layout_correct"].shape == (4,)
    assert set(trainer.eval_metrics["layout_correct"].tolist()) <= {0.0, 1.0}


def test_denoiser_passes_are_counted_by_the_trainer(tmp_path):
    """Cost in denoiser passes (a forward of one row = 1, its backward = 2, both guidance branches count):
    the rollout's B x T x 2 forwards and the update's B x n_train x 2 forwards with backward, evaluations
    excluded, cumulative over epochs and kept in the checkpoint."""
    from diffrl_fast.train.trainer import Trainer

    over = ["algo=grpo", *TINY, "grpo.group_size=4", "grpo.beta=0", "sample.guidance_scale=2", "num_epochs=2",
            f"output_dir={tmp_path}", "name=r"]
    cfg = validate(load_config(Config, PRESET, over))
    trainer = Trainer(cfg, tmp_path / "r", log_fn=lambda s: None)
    trainer.run()
    B, T = 8, 3
    n_train = trainer.algo.num_train_steps(T)
    per_epoch = 2 * B * T + 3 * 2 * B * n_train
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["denoiser_passes"] for r in records] == [per_epoch, 2 * per_epoch]
    resumed = Trainer(validate(load_config(Config, PRESET, over + ["num_epochs=3"])), tmp_path / "r", log_fn=lambda s: None)
    assert resumed.resume() and resumed.epoch == 2 and resumed.denoiser_passes == 2 * per_epoch


@pytest.mark.parametrize("prune", [[], ["sample.tree_prune_depths=[1]"], ["sample.tree_prune_width=2"], ["sample.tree_advantage_norm=leaves"]])
def test_tree_rollouts_train_each_transition_once(tmp_path, monkeypatch, prune):
    """sample.tree_branch_steps (BranchGRPO): rollouts compute each tree's distinct states once, training packs each
    distinct transition of the trained steps exactly once, with the node advantages, and passes count both. Depth
    pruning of child depth 1 leaves step 0's transitions out of training, and out of the passes. Width pruning acts
    after the last split only: here Flow-GRPO trains steps 0 and 1 of 3, none after the split at 1, so nothing is
    pruned (and nothing is counted as pruned)."""
    import diffrl_fast.train.trainer as trainer_mod
    from diffrl_fast.diffusion.tree import TreeSpec
    from diffrl_fast.train.trainer import Trainer

    over = ["algo=grpo", *TINY, "grpo.group_size=4", "grpo.beta=0.04", "sample.tree_branch_steps=[0, 1]", f"output_dir={tmp_path}", "name=r", *prune]
    cfg = validate(load_config(Config, PRESET, over))
    rows, pack = [], trainer_mod.pack_chunk

    def spy(traj, sample_idx, step_idx, *args, **kwargs):
        chunk = pack(traj, sample_idx, step_idx, *args, **kwargs)
        rows.extend(zip(chunk.sample_idx[:, None].expand(chunk.shape).reshape(-1).tolist(), chunk.step_idx.reshape(-1).tolist()))
        return chunk

    import diffrl_fast.algos.grpo as grpo_mod

    norms, node_advantages = [], grpo_mod.node_advantages

    def spy_adv(*args, **kwargs):
        norms.append(kwargs["advantage_norm"])
        return node_advantages(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "pack_chunk", spy)
    monkeypatch.setattr(grpo_mod, "node_advantages", spy_adv)
    trainer = Trainer(cfg, tmp_path / "r", log_fn=lambda s: None)
    trainer.run()
    assert norms == ["leaves" if "sample.tree_advantage_norm=leaves" in prune else "level"]  # the option reaches the advantages
    owner = TreeSpec((0, 1), 2).batch(8, 3)[1]
    trained = trainer.algo.num_train_steps(3)  # Flow-GRPO trains the first int(0.99 T) = 2 steps
    depth = any("depths" in o for o in prune)
    want = sorted((b, j) for b in range(8) for j in range(trained) if owner[b, j] and not (depth and j == 0))
    assert sorted(rows) == want and len(want) == (8 if depth else 12)  # 2 trees x (2 + 4) transitions, none twice
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["loss"]) and record["kl"] >= 0
    assert record.get("tree_pruned", 0) == (4 if depth else 0)
    # rollout states + forward and backward of each row + the KL's reference forward of each row
    assert record["denoiser_passes"] == 2 * (1 + 2 + 4) + 3 * len(want) + len(want)


@pytest.mark.parametrize("over, match", [
    (["algo=nft", "nft.group_size=4"], "algo=grpo"),
    (["algo=grpo", "grpo.group_size=8"], "grpo.group_size=4"),
    (["algo=grpo", "grpo.group_size=4", "sample.tree_branch_steps=[1, 0]"], "sorted"),
    (["algo=grpo", "grpo.group_size=4", "sample.tree_branch_steps=[0, 1]", "sample.tree_prune_width=3"], "sample.tree_prune_width"),
    (["algo=grpo", "grpo.group_size=4", "sample.tree_branch_steps=[0, 1]", "sample.tree_prune_depths=[0]"], "sample.tree_prune_depths"),
    (["algo=grpo", "grpo.group_size=4", "sample.tree_prune_width=2"], "set sample.tree_branch_steps"),
    (["algo=grpo", "grpo.group_size=4", "sample.tree_branch_steps=[0, 1]", "sample.tree_advantage_norm=depth"], "sample.tree_advantage_norm"),
])
def test_tree_config_errors_name_the_fix(over, match):
    from diffrl_fast.train.config import ConfigError

    base = ["sample.tree_branch_steps=[0, 1]"] if not any("tree" in o for o in over) else []
    with pytest.raises(ConfigError, match=match):
        validate(load_config(Config, PRESET, [*TINY, *base, *over]))
