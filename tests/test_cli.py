"""The command line: exit codes and the benchmark entry point (a smoke run, not a measurement)."""
import json
import subprocess
import sys

from diffrl_fast.cli import main


def test_unknown_command_exits_2(capsys):
    assert main(["bnech"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'bnech'" in err and "did you mean 'bench'" in err


def test_unknown_benchmark_exits_2(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_bench_ops_quick_writes_results(tmp_path):
    out = subprocess.run([sys.executable, "-m", "diffrl_fast.cli", "bench", "ops", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "ops_cpu_quick.json").read_text())
    providers = {r["provider"] for r in data["rows"]}
    assert {"eager", "compile", "cpp"} <= providers
    assert all(r["median_ms"] > 0 for r in data["rows"])
    assert (tmp_path / "ops_cpu_quick.png").stat().st_size > 0 and (tmp_path / "ops_cpu_quick.csv").exists()


def test_check_parity_on_a_tiny_sd_pipeline(tmp_path):
    from diffrl_fast.models.tiny import build_tiny_sd

    path = build_tiny_sd(tmp_path / "sd")
    out = subprocess.run([sys.executable, "-m", "diffrl_fast.cli", "check-parity", "--model", path, "--samples", "3",
                          "--steps", "3", "--chunk", "2", "--train-batch", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "PASS" in out.stdout and out.stdout.count("e-") >= 3


def test_check_parity_usage_errors_exit_2(tmp_path):
    for args in (["--model", str(tmp_path / "missing")], ["--model", "x", "--chunk", "0"], ["--steps", "3"]):
        out = subprocess.run([sys.executable, "-m", "diffrl_fast.cli", "check-parity", *args], capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr and "error:" in out.stderr
