"""The trl DDPOTrainer contender of the end-to-end benchmark, run as the orchestrator runs it: one subprocess."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffrl_fast.models.tiny import cached_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"rollout_samples_per_s", "train_samples_per_s", "overall_samples_per_s", "peak_mem_mb", "reward_per_epoch",
        "epoch_times_s", "versions"}


@pytest.mark.slow
def test_trl_contender_runs_one_epoch(tmp_path):
    # trl is an optional benchmark dependency (the bench extra); CI installs only train and test. Skipping inside the
    # test keeps the file collected, so tests/test_collection.py still sees it.
    pytest.importorskip("trl")
    path = cached_tiny_pipeline("sd", root=tmp_path / "tiny")
    settings = {"num_epochs": 1, "num_steps": 2, "sample_batch_size": 2, "sample_num_batches_per_epoch": 1,
                "train_batch_size": 2}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "e2e_trl.py"), "--pipeline", path, "--seed", "0",
           "--out", str(tmp_path / "out"), "--settings-json", json.dumps(settings)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-4000:]
    result = json.loads(lines[0][len("RESULT "):])

    assert KEYS <= set(result), sorted(KEYS - set(result))
    assert len(result["reward_per_epoch"]) == 1 and len(result["epoch_times_s"]) == 1
    assert all(math.isfinite(r) for r in result["reward_per_epoch"])
    assert result["reward_per_epoch"][0] < 0  # JPEG compressibility is minus a size
    for key in ("rollout_samples_per_s", "train_samples_per_s", "overall_samples_per_s", "peak_mem_mb"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    # The split is measured inside the epoch, so its parts cannot exceed it.
    assert result["epoch_rollout_times_s"][0] + result["epoch_train_times_s"][0] <= result["epoch_times_s"][0]
    assert result["versions"]["trl"] == "0.23.1"
    assert json.loads((tmp_path / "out" / "trl_result.json").read_text())["reward_per_epoch"] == result["reward_per_epoch"]
