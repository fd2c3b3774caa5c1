"""The command line: exit codes and the benchmark entry point (a smoke run, not a measurement)."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffrl_fast.cli import main
from diffrl_fast.ops import available_backends
from tests.cli_inprocess import run_cli


def test_unknown_command_exits_2(capsys):
    assert main(["bnech"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'bnech'" in err and "did you mean 'bench'" in err


def test_unknown_benchmark_exits_2(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown bench" in capsys.readouterr().err


def test_bench_ops_quick_writes_results(tmp_path):
    out = subprocess.run([sys.executable, "-m", "diffrl_fast.cli", "bench", "ops", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "ops_cpu_quick.json").read_text())
    providers = {r["provider"] for r in data["rows"]}
    assert {"eager", "compile", "cpp"} <= providers
    assert all(r["median_ms"] > 0 and "page_faults_per_call" in r for r in data["rows"])
    assert (tmp_path / "ops_cpu_quick.png").stat().st_size > 0 and (tmp_path / "ops_cpu_quick.csv").exists()
    assert data["machine"]["allocator"].startswith("glibc" if platform.libc_ver()[0] == "glibc" else "default")


@pytest.mark.skipif(platform.system() != "Linux", reason="the resource module's page-fault count")
def test_time_fn_counts_page_faults_per_call():
    """A call that writes a fresh 64 MiB tensor faults its pages in (glibc serves blocks that large from fresh
    mappings by default, and this test process never changes that); a call that allocates nothing faults none."""
    from benchmarks.common import time_fn

    assert time_fn(lambda: torch.empty(2**24).fill_(1.0), "cpu", warmup=1, iters=3)["page_faults_per_call"] > 10_000
    t = torch.zeros(1024)
    assert time_fn(lambda: t.add_(1.0), "cpu", warmup=1, iters=3)["page_faults_per_call"] < 10


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_reuses_freed_pages():
    """After keep_freed_memory a freed 64 MiB block's pages serve the next one: writing it faults (almost) no page,
    where glibc's default maps and faults it afresh every time (in fresh processes, so that the tests' own
    settings and allocation history play no part)."""
    code = (
        "import ctypes, resource, sys\n"
        "from benchmarks.common import keep_freed_memory\n"
        "if sys.argv[1] == 'keep':\n"
        "    assert keep_freed_memory().startswith('glibc')\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "for _ in range(3):\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    p = libc.malloc(64 << 20)\n"
        "    ctypes.memset(p, 1, 64 << 20)\n"
        "    libc.free(p)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    faults = {}
    for how in ("keep", "default"):
        out = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, timeout=120,
                             cwd=Path(__file__).resolve().parent.parent)
        assert out.returncode == 0, out.stderr[-2000:]
        faults[how] = int(out.stdout.split()[-1])
    assert faults["default"] > 10_000 and faults["keep"] < 100, faults  # 64 MiB = 16,384 pages of 4 KiB


def test_check_parity_on_a_tiny_sd_pipeline(tmp_path):
    from diffrl_fast.models.tiny import build_tiny_sd

    path = build_tiny_sd(tmp_path / "sd")
    out = subprocess.run([sys.executable, "-m", "diffrl_fast.cli", "check-parity", "--model", path, "--samples", "3",
                          "--steps", "3", "--chunk", "2", "--train-batch", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "PASS" in out.stdout and out.stdout.count("e-") >= 3


def test_check_parity_usage_errors_exit_2(tmp_path):
    for args in (["--model", str(tmp_path / "missing")], ["--model", "x", "--chunk", "0"], ["--steps", "3"]):
        out = run_cli("check-parity", *args)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr and "error:" in out.stderr


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "diffrl_fast.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_train_sample_eval_roundtrip_and_run_folder_protection(tmp_path):
    common = ["num_epochs=1", "sample.batch_size=16", "sample.num_batches_per_epoch=1", "sample.num_steps=4",
              "log.eval_samples=16", "log.progress=false", f"output_dir={tmp_path}", "name=r"]
    out = _run("train", *common)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reward" in out.stdout and (tmp_path / "r" / "summary.md").exists()
    again = run_cli("train", *common)
    assert again.returncode == 2 and "already exists" in again.stderr and "--resume" in again.stderr
    # the rest in-process (the train run above went through the real entry point): a fresh interpreter each
    # would add seconds of imports and test nothing more
    resumed = run_cli("train", *common, "--resume")  # nothing left to do: finishes at once
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    out = run_cli("sample", "--run", str(tmp_path / "r"), "--n", "4", "--out", str(tmp_path / "s"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "s" / "grid.png").exists() and (tmp_path / "s" / "0003.png").exists()
    out = run_cli("eval", "--run", str(tmp_path / "r"), "--reward", "digit_confidence", "--reward", "jpeg_compressibility",
                  "--n", "8", "--json", str(tmp_path / "e.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "e.json").read_text())
    assert set(data["rewards"]) == {"digit_confidence", "jpeg_compressibility"} and data["rewards"]["digit_confidence"]["n"] == 8


def test_train_usage_errors_exit_2(tmp_path):
    cases = [
        (["train.learnig_rate=1"], "did you mean 'train.learning_rate'"),
        (["train.chunk_size=x"], "expected an integer"),
        (["--frobnicate"], "unknown option"),
        ([str(tmp_path / "missing.yaml")], "does not exist"),
        (["train.chunk_size=0"], "chunk_size"),
    ]
    for i, (args, msg) in enumerate(cases):
        # the first case through the real entry point (the process's exit code), the rest in-process
        out = (_run if i == 0 else run_cli)("train", *args, f"output_dir={tmp_path}")
        assert out.returncode == 2, (args, out.stderr[-500:])
        assert msg in out.stderr and "Traceback" not in out.stderr, (args, out.stderr[-500:])
    out = run_cli("train", "--help")
    assert out.returncode == 0 and "train.learning_rate (float" in out.stdout
    out = run_cli("sample", "--model", "digits", "--prompt", "a handwritten bird", "--n", "2", "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "cannot parse digit prompt" in out.stderr


def test_pretrain_usage():  # the command's work is tested in-process by models/test_digits.py::test_pretrain_main_quick
    out = run_cli("pretrain", "cats")
    assert out.returncode == 2 and "digits" in out.stderr


def test_deepspeed_launcher_local_rank_argument_is_accepted(monkeypatch):
    from diffrl_fast.cli import strip_launcher_args

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_launcher_args(["--local_rank=1", "train", "num_epochs=1"]) == ["train", "num_epochs=1"]
    assert os.environ["LOCAL_RANK"] == "1"
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_launcher_args(["train", "--local_rank", "3", "x=1"]) == ["train", "x=1"]
    assert os.environ["LOCAL_RANK"] == "3"


def test_bench_ops_bandwidth_check_and_targets():
    """The interleaved same-bytes copy check and the target table it feeds (tiny shape, few rounds)."""
    from benchmarks.bench_ops import (TARGET_SHAPE, cpp_kernel_call, evaluate_targets, interleaved_bandwidth, loss_fns,
                                      make_inputs)

    inp = make_inputs((2, 4, 8, 8), "cpu")
    bw = interleaved_bandwidth(loss_fns(inp, "cpu")["eager"], inp, "cpu", rounds=3, iters=2)
    assert bw["traffic_bytes"] == 6 * inp["x"].numel() * 4 and bw["rounds"] == 3 and "kernel_fraction" not in bw
    if "cpp" in available_backends("cpu"):  # the kernel diagnostic computes the fused step's gradients
        logp, _, stats, (_, _, deu, dec), bad = cpp_kernel_call(inp)()
        eu, ec = inp["eu"].clone().requires_grad_(), inp["ec"].clone().requires_grad_()
        out = loss_fns(inp, "cpu")["cpp"](eu, ec)
        out.backward()
        assert bad == 0 and torch.equal(stats[0], out.detach()) and torch.equal(deu, eu.grad) and torch.equal(dec, ec.grad)
        kbw = interleaved_bandwidth(loss_fns(inp, "cpu")["cpp"], inp, "cpu", rounds=3, iters=2, kernel=cpp_kernel_call(inp))
        assert kbw["kernel_fraction"] > 0 and "kernel_page_faults_per_call" in kbw
    assert 0 < bw["fraction_min"] <= bw["fraction"] <= bw["fraction_max"] and "op_page_faults_per_call" in bw
    rows = [{"provider": p, "mode": "full", "shape": list(TARGET_SHAPE), "median_ms": ms}
            for p, ms in (("eager", 12.0), ("compile", 1.5), ("cpp", 1.0))]
    got = {t["metric"]: t for t in evaluate_targets(rows, {"cpp": 0.8})}
    assert got["copy_bandwidth_fraction"]["measured"] == 0.8 and not got["copy_bandwidth_fraction"]["met"]
    assert got["speedup_vs_eager"]["measured"] == 12.0 and got["speedup_vs_eager"]["met"]
    assert got["speedup_vs_compile"]["measured"] == 1.5 and got["speedup_vs_compile"]["met"]
