"""Integration: a short seeded run of every algorithm on the digits world improves its objective.

The budget and settings are those of the committed results table (benchmarks/bench_algos.py: 5 epochs x 128
samples, half of each trajectory's steps trained, the same 128 fixed-seed samples scored before and after,
the digits preset over each algorithm's reference conventions; benchmarks/results/algos.md). The objective
is the reward (digit_confidence) for every algorithm: d3po and dense take their preferences from it, so a
policy that learns the preferences raises it. Changes measured there for seeds 0, 1, 2 are in MEASURED.

Noise: an untrained policy scores exactly the "before" value on the same seeds (a change of 0); the paired
standard error of one run's change over 128 samples is 0.35-0.7 (heavy-tailed log-probabilities). Each test
runs seed 0 (deterministic on a given machine) and requires a change above half of seed 0's measured change.
With their reference settings two algorithms learn little here: DDPO-SF's one optimiser step per round (+0.69,
-2.40, +1.48 over the seeds) and the dense-reward loss on-policy (+0.51, -0.38, -0.39). A seed-0 run of either
says nothing about learning (its sign flips with the seed), so they are not run here: their objectives and
gradients are held to the references' at 1e-6 (test_reference_objectives.py), and benchmarks/results/algos.md
and time_to_reward.md report what they learn over three seeds.
"""
import pytest

from benchmarks.bench_algos import BUDGET
from diffrl_fast.config_utils import load_config
from diffrl_fast.train.config import DEFAULT_PRESET, Config, validate
from diffrl_fast.train.trainer import Trainer

MEASURED = {"ddpo_is": (1.78, 0.91, 1.77), "dpok": (1.88, 2.15, 1.58), "d3po": (1.73, 1.35, 0.19),
            "tdpo": (1.93, 0.04, 1.55), "grpo": (2.25, 2.98, 2.34)}
# tdpo_r is not run here: on this budget it learns exactly as tdpo (+1.93, +0.04, +1.55 in the table): its reset
# acts on the critic only, which explains none of this reward (tests/algos/test_conventions.py tests the reset,
# tests/multiprocess the reset under 2 processes)


@pytest.mark.slow
@pytest.mark.parametrize("algo", sorted(MEASURED))
def test_short_run_improves_the_objective(algo, tmp_path):
    cfg = validate(load_config(Config, DEFAULT_PRESET, [f"algo={algo}", "seed=0", *BUDGET, "log.progress=false",
                                                        "log.tensorboard=false", "log.grid_samples=8", f"output_dir={tmp_path}", "name=it"]))
    summary = Trainer(cfg, tmp_path / "it", log_fn=lambda s: None).run()
    change = summary["after"]["mean"] - summary["before"]["mean"]
    assert change > 0.5 * MEASURED[algo][0], (algo, summary["before"], summary["after"], MEASURED[algo])
    assert (tmp_path / "it" / "metrics.jsonl").read_text().count("\n") == cfg.num_epochs
    assert "before" in (tmp_path / "it" / "summary.md").read_text()
