"""The end-to-end benchmark's plumbing (a smoke run: one tiny epoch per contender, not a measurement)."""
import json
import subprocess
import sys


def test_e2e_benchmark_runs_our_contenders(tmp_path):
    settings = {"num_epochs": 1, "num_steps": 2, "sample_batch_size": 2, "sample_num_batches_per_epoch": 1, "train_batch_size": 2}
    out = subprocess.run([sys.executable, "-m", "diffrl_fast", "bench", "e2e", "--sizes", "tiny", "--seeds", "0",
                          "--contenders", "diffrl_fast,diffrl_fast_unfused", "--settings-json", json.dumps(settings),
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "e2e_cpu.json").read_text())
    runs = data["runs"]["tiny"]
    assert set(runs) == {"diffrl_fast", "diffrl_fast_unfused"}
    for r in (runs["diffrl_fast"][0], runs["diffrl_fast_unfused"][0]):
        assert r["overall_samples_per_s"] > 0 and r["peak_mem_mb"] > 0 and len(r["reward_per_epoch"]) == 1
    assert (tmp_path / "e2e_cpu.png").exists()
