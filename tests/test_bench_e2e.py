"""The end-to-end benchmark's plumbing (a smoke run: one tiny epoch per contender, not a measurement)."""
import json
import subprocess
import sys

from tests.cli_inprocess import run_cli


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


def _run(overall, peak, rewards):
    return {"overall_samples_per_s": overall, "rollout_samples_per_s": 1.0, "train_samples_per_s": 1.0,
            "peak_mem_mb": peak, "reward_per_epoch": rewards}


def test_summary_ratios_and_reward_agreement():
    from benchmarks.bench_e2e import summarize

    runs = {"small": {"trl": [_run(1.0, 100.0, [1.0, 3.0]), _run(2.0, 200.0, [4.0]), _run(4.0, 300.0, [5.0])],
                      "diffrl_fast": [_run(2.0, 50.0, [0.0]), _run(2.0, 100.0, [2.0]), _run(2.0, 150.0, [4.0])]}}
    summary, ratios = summarize(runs)
    assert summary["small"]["trl"]["overall_samples_per_s"]["median"] == 2.0
    r = ratios["small"]
    assert r["overall_speedup"] == 1.0 and r["overall_speedup_per_seed"] == [2.0, 1.0, 0.5]
    assert r["peak_mem_ratio"] == 0.5 and r["peak_mem_ratio_per_seed"] == [0.5, 0.5, 0.5]
    # per-run mean rewards: trl 2, 4, 5 (mean 11/3, variance 7/3); ours 0, 2, 4 (mean 2, variance 4)
    w = r["reward"]
    se = (7 / 3 / 3 + 4 / 3) ** 0.5
    assert abs(w["difference"] - (2 - 11 / 3)) < 1e-12 and abs(w["se_of_difference"] - se) < 1e-12
    assert abs(w["difference_in_se"] - (2 - 11 / 3) / se) < 1e-12
    _, one_seed = summarize({"tiny": {"trl": runs["small"]["trl"][:1], "diffrl_fast": runs["small"]["diffrl_fast"][:1]}})
    assert one_seed["tiny"]["reward"] is None


def test_bad_pack_is_a_usage_error(tmp_path):
    for pack in ("tiny", "huge=2", "tiny=0", "small=x"):
        out = run_cli("bench", "e2e", "--pack", pack, "--out", str(tmp_path))
        assert out.returncode == 2 and "--pack" in out.stderr, (pack, out.returncode, out.stderr[-500:])
