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
         "awm": ["awm.group_size=4", "awm.train_timesteps=2"]}


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
