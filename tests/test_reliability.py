"""Bad input, faults and interrupted runs: clear errors, skipped bad steps, nothing lost.

All on the digits world with a small, fast config.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffrl_fast.config_utils import load_config
from diffrl_fast.rewards import RewardError
from diffrl_fast.train.config import Config, validate
from diffrl_fast.train.trainer import Trainer, TrainingError
from tests.cli_inprocess import run_cli

FAST = ["sample.num_steps=6", "sample.batch_size=16", "sample.num_batches_per_epoch=1", "train.batch_size=8",
        "train.chunk_size=3", "log.eval_samples=0", "log.progress=false", "log.tensorboard=false", "reward.overlap=false"]
METRICS = ("reward_mean", "reward_std", "loss", "clipfrac", "approx_kl", "grad_norm")


def _cfg(tmp_path, *extra):
    return validate(load_config(Config, None, [*FAST, f"output_dir={tmp_path}", *extra]))


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "diffrl_fast", *args], capture_output=True, text=True, timeout=timeout)


def _metrics(run: Path) -> list[list[float]]:
    return [[json.loads(x)[k] for k in METRICS] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_reward_that_returns_nan_or_wrong_shape_is_named(tmp_path):
    def nan_reward(images, prompts, metadata):
        r = torch.zeros(len(prompts))
        r[3] = float("nan")
        return r, {}

    with pytest.raises(RewardError, match="reward 'digit_confidence'.*non-finite.*\\[3\\]"):
        Trainer(_cfg(tmp_path, "name=a", "num_epochs=1"), tmp_path / "a", reward_fn=nan_reward, log_fn=lambda s: None).run()
    with pytest.raises(RewardError, match="shape \\(15,\\)"):
        Trainer(_cfg(tmp_path, "name=b", "num_epochs=1"), tmp_path / "b", log_fn=lambda s: None,
                reward_fn=lambda i, p, m: (torch.zeros(len(p) - 1), {})).run()
    t = Trainer(_cfg(tmp_path, "name=c", "num_epochs=1", "reward.drop_nonfinite=true"), tmp_path / "c",
                reward_fn=nan_reward, log_fn=lambda s: None)
    t.run()
    rec = json.loads((tmp_path / "c" / "metrics.jsonl").read_text())
    assert rec["dropped_samples"] == 1 and rec["samples"] == 15


def test_user_errors_exit_2_before_loading_anything(tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        ([f"prompt_file={tmp_path / 'missing.txt'}"], "does not exist"),
        ([f"prompt_file={empty}"], "holds no prompts"),
        ([f"output_dir={blocker}/runs"], "cannot be written"),
        (["reward.name=nope_reward"], "unknown reward 'nope_reward'"),
        (["reward.name=os:nonexistent_fn"], "has no callable"),
    ]
    for args, msg in cases:
        out = run_cli("train", *FAST, f"output_dir={tmp_path / 'r'}", *args)
        assert out.returncode == 2 and msg in out.stderr and "Traceback" not in out.stderr, (args, out.stderr[-600:])


def test_checkpoint_from_another_algorithm_is_refused(tmp_path):
    run = ["num_epochs=1", f"output_dir={tmp_path}", "name=r"]
    assert run_cli("train", *FAST, *run).returncode == 0
    out = run_cli("train", *FAST, *run, "algo=dpok", "--resume")
    assert out.returncode == 2 and "written for algo='ddpo_is'" in out.stderr, out.stderr[-800:]


def test_nonfinite_gradients_are_skipped_then_stop_the_run(tmp_path):
    t = Trainer(_cfg(tmp_path, "name=s", "num_epochs=2"), tmp_path / "s", log_fn=lambda s: None)
    calls = {"n": 0}

    def poison_first(g):  # only the first backward of the run produces NaN gradients
        calls["n"] += 1
        return g * float("nan") if calls["n"] == 1 else g

    t.params[0].register_hook(poison_first)
    t.run()
    recs = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["skipped_steps"] == 1 and all(torch.isfinite(torch.tensor([r["loss"] for r in recs])))
    t2 = Trainer(_cfg(tmp_path, "name=s2", "num_epochs=3", "train.batch_size=4"), tmp_path / "s2", log_fn=lambda s: None)
    t2.params[0].register_hook(lambda g: g * float("nan"))
    with pytest.raises(TrainingError, match="5 optimiser steps in a row had non-finite gradients"):
        t2.run()
    assert (tmp_path / "s2" / "checkpoints" / "latest").exists()


@pytest.fixture(scope="module")
def reference4(tmp_path_factory):
    """Metrics of an uninterrupted 4-epoch run (in-process: the same numbers as a fresh process's), shared by
    the interruption tests."""
    out = tmp_path_factory.mktemp("ref")
    assert run_cli("train", *FAST, "num_epochs=4", f"output_dir={out}", "name=ref").returncode == 0
    return _metrics(out / "ref")


def _start(tmp_path, epochs):
    return subprocess.Popen([sys.executable, "-m", "diffrl_fast", "train", *FAST, f"num_epochs={epochs}",
                             f"output_dir={tmp_path}", "name=int"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_epoch(tmp_path, proc, epoch, timeout=300):
    metrics = tmp_path / "int" / "metrics.jsonl"
    end = time.time() + timeout
    while time.time() < end:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= epoch:
            return
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    raise TimeoutError


def test_sigterm_checkpoints_and_resume_is_identical(tmp_path, reference4):
    want = reference4
    proc = _start(tmp_path, 4)
    _wait_for_epoch(tmp_path, proc, 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Resume with: diffrl-fast train" in err and "--resume" in err, err[-1500:]
    out = run_cli("train", *FAST, "num_epochs=4", f"output_dir={tmp_path}", "name=int", "--resume")
    assert out.returncode == 0, out.stderr[-1500:]
    assert _metrics(tmp_path / "int") == want


def test_sigkill_at_a_random_moment_loses_nothing(tmp_path, reference4):
    want = reference4
    proc = _start(tmp_path, 4)
    _wait_for_epoch(tmp_path, proc, 1)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))  # anywhere in epochs 2-3, maybe mid-checkpoint
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.returncode  # killed mid-run, not already finished
    out = run_cli("train", *FAST, "num_epochs=4", f"output_dir={tmp_path}", "name=int", "--resume")
    assert out.returncode == 0, out.stderr[-1500:]
    assert _metrics(tmp_path / "int") == want
