"""The GPU suite's plan checks out without a GPU: the dry run CI runs, and the wheel checks it relies on."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_prints_the_plan():
    out = subprocess.run([sys.executable, "-m", "diffrl_fast", "bench", "gpu", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for step in ("environment", "tests", "ops", "e2e", "memory"):
        assert f"  {step}" in out.stdout
    assert "MiB of 64" in out.stdout


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    meta = "Metadata-Version: 2.1\nName: {0}\nVersion: {1}\n{2}\n".format(name, version, "\n".join(f"Requires-Dist: {r}" for r in requires))
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)


def test_wheel_checks(tmp_path, monkeypatch):
    from benchmarks.gpu import suite

    monkeypatch.setattr(suite, "WHEELS", tmp_path)
    monkeypatch.setattr(suite, "WHEEL_PINS", {"diffusers": "0.42.1", "trl": "0.23.1"})
    assert any("missing wheel diffusers" in p for p in suite.check_wheels())
    _wheel(tmp_path, "diffusers", "0.42.1", ["numpy", "huggingface-hub>=1.32", "Pillow", 'torch ; extra == "torch"'])
    _wheel(tmp_path, "trl", "0.23.1", ["accelerate>=1.4", "datasets>=3.0.0", "transformers"])
    problems = suite.check_wheels()
    assert problems == ["trl-0.23.1-py3-none-any.whl needs ['datasets'], which neither the GPU image nor the plan provides"]
    _wheel(tmp_path, "diffusers", "0.41.0", [])
    try:
        suite.check_wheels()
    except SystemExit as exc:
        assert "two wheels of diffusers" in str(exc)
    else:
        raise AssertionError("two versions of one wheel must be refused")


def test_plan_outputs_are_committable():
    """The real plan's files fit the limits and are named as they are committed: benchmarks/results/*_gpu.*."""
    import re

    from benchmarks.gpu import suite

    plan = suite.steps(sys.executable)
    assert suite.plan_problems(plan) == []
    names = [suite.LOG_NAME, suite.SUMMARY_NAME, *[o for s in plan for o in s.outputs]]
    assert len(names) <= suite.MAX_FILES and all(re.fullmatch(r"[a-z0-9]+_gpu\.[a-z]+", n) for n in names), names
    tests = next(s for s in plan if s.name == "tests")
    assert "-x" not in tests.argv and "--exitfirst" not in tests.argv  # every test runs; failures are listed


def test_commit_recorded_by_prepare_when_there_is_no_git(tmp_path, monkeypatch):
    """Without .git (the GPU copy of the tree), the commit comes from the file --prepare wrote beside the wheels."""
    from benchmarks.gpu import suite

    monkeypatch.setattr(suite, "WHEELS", tmp_path)
    monkeypatch.setattr(suite, "_git", lambda *args: None)
    assert suite.commit_info() == "unknown"
    (tmp_path / suite.COMMIT_FILE).write_text("0123abc prepared 2025-01-01\n")
    assert suite.commit_info() == "0123abc prepared 2025-01-01 (recorded by --prepare; no git here)"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_run_with_faked_steps(tmp_path, monkeypatch):
    """Steps run in order; a timed-out step keeps its partial output (copied while it ran) and its whole process
    group is killed; a failure is recorded and later steps still run; the output limits are enforced."""
    import json

    from benchmarks.gpu import suite

    py, order, out = sys.executable, tmp_path / "order.txt", tmp_path / "out"
    monkeypatch.setattr(suite, "WHEELS", tmp_path / "no_wheels")
    monkeypatch.setattr(suite, "SYNC_EVERY_S", 0.2)
    monkeypatch.setattr(suite, "KILL_GRACE_S", 1.0)
    mark = f"open({str(order)!r}, 'a').write('{{}}\\n')"
    slow = f"""
import pathlib, signal, subprocess, sys, time
{mark.format('slow')}
signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the SIGKILL after the grace period ends it
ignore = 'import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)'
child = subprocess.Popen([sys.executable, '-c', ignore])
pathlib.Path({str(tmp_path / 'grandchild.pid')!r}).write_text(str(child.pid))
pathlib.Path(sys.argv[1], 'partial.txt').write_text('partial')
print('working', flush=True)
for _ in range(100):  # the suite copies outputs while the step runs
    if pathlib.Path({str(out / 'slow_gpu.txt')!r}).is_file():
        pathlib.Path({str(tmp_path / 'seen_while_running')!r}).write_text('yes')
        break
    time.sleep(0.05)
time.sleep(60)
"""
    big = f"""
import pathlib, sys
{mark.format('big')}
d = pathlib.Path(sys.argv[1])
(d / 'big.bin').write_bytes(b'a' * (8 << 20) + b'b' * ((8 << 20) + (1 << 20)) + b'z' * 10)
for i in range(1, 5):
    (d / f'e{{i}}.txt').write_text(str(i))
"""
    plan = [
        suite.Step("ok", 30, "succeeds",
                   [py, "-c", f"import sys, pathlib; {mark.format('ok')}; pathlib.Path(sys.argv[1], 'ok.txt').write_text('done')",
                    "{out}"], {"ok_gpu.txt": ("ok.txt",)}),
        suite.Step("slow", 2, "times out", [py, "-c", slow, "{out}"],
                   {"slow_gpu.txt": ("final.txt", "partial.txt"), "slowlog_gpu.txt": ("stdout.txt",)}),
        suite.Step("fail", 30, "fails", [py, "-c", f"import sys; {mark.format('fail')}; print('boom'); sys.exit(3)"],
                   {"fail_gpu.txt": ("stdout.txt",)}),
        suite.Step("big", 30, "writes too much", [py, "-c", big, "{out}"],
                   {"big_gpu.bin": ("big.bin",), **{f"e{i}_gpu.txt": (f"e{i}.txt",) for i in range(1, 5)},
                    "a/b/c/deep_gpu.txt": ("e1.txt",)}),
    ]
    monkeypatch.setattr(suite, "steps", lambda py: plan)
    assert suite.run(out) == 1

    assert order.read_text().split() == ["ok", "slow", "fail", "big"]
    log = (out / suite.LOG_NAME).read_text()
    assert log.index("ok: start") < log.index("slow: start") < log.index("fail: start") < log.index("big: start")
    results = {r["step"]: r["status"] for r in json.loads(log.strip().splitlines()[-1].split("] ", 1)[1])["results"]}
    assert results == {"ok": "ok", "slow": "timed out after 2 s", "fail": "failed (exit 3)", "big": "ok"}
    assert (out / "ok_gpu.txt").read_text() == "done"
    # the timed-out step: its partial output kept, copied while it ran, and its whole process group gone
    assert (out / "slow_gpu.txt").read_text() == "partial" and (tmp_path / "seen_while_running").is_file()
    assert "working" in (out / "slowlog_gpu.txt").read_text()
    assert not _alive(int((tmp_path / "grandchild.pid").read_text()))
    assert "boom" in (out / "fail_gpu.txt").read_text() and "fail: output tail" in log
    # the limits: 8 files at most, 16 MiB each (head and tail kept), 2 folders deep at most, each change noted
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([suite.LOG_NAME, suite.SUMMARY_NAME, "ok_gpu.txt", "slow_gpu.txt", "slowlog_gpu.txt",
                            "fail_gpu.txt", "big_gpu.bin", "e1_gpu.txt"]), files
    data = (out / "big_gpu.bin").read_bytes()
    assert len(data) == suite.MAX_FILE_BYTES and data.startswith(b"a" * 1000) and data.endswith(b"b" * 1000 + b"z" * 10)
    summary = (out / suite.SUMMARY_NAME).read_text()
    for note in ("big_gpu.bin: 17825802 bytes cut", "a/b/c/deep_gpu.txt: not copied", "e4_gpu.txt: removed, over the limit"):
        assert note in summary and note in log, note
    assert "| slow | timed out after 2 s |" in summary


def test_e2e_rows_record_a_failing_contender_and_run_the_rest(tmp_path, monkeypatch):
    """A contender that fails is recorded in its row; the other contender and the bf16 row after it still run."""
    import json

    from benchmarks import bench_e2e
    from benchmarks.gpu import e2e_rows
    from diffrl_fast.models import tiny

    calls = []

    def launch(contender, pipeline, seed, settings, tmp, size="small", pack=""):
        calls.append((settings["mixed_precision"], contender))
        if (settings["mixed_precision"], contender) == ("no", "trl"):
            raise RuntimeError("trl failed (exit 1):\nsimulated")
        return {"overall_samples_per_s": 2.0 if contender == "diffrl_fast" else 1.0, "rollout_samples_per_s": 1.0,
                "train_samples_per_s": 1.0, "peak_mem_mb": 100.0, "reward_per_epoch": [0.5]}

    monkeypatch.setattr(bench_e2e, "launch", launch)
    monkeypatch.setattr(tiny, "cached_tiny_pipeline", lambda kind, **kw: "/nowhere")
    assert e2e_rows.main(["--out", str(tmp_path), "--size", "tiny"]) == 1
    assert calls == [("no", "trl"), ("no", "diffrl_fast"), ("bf16", "trl"), ("bf16", "diffrl_fast")]
    rows = json.loads((tmp_path / "e2e_gpu.json").read_text())["rows"]
    assert "simulated" in rows["fp32"]["errors"]["trl"] and list(rows["fp32"]["runs"]) == ["diffrl_fast"]
    assert "tiny" not in rows["fp32"]["ratios"] and rows["bf16"]["errors"] == {}
    assert rows["bf16"]["ratios"]["tiny"]["overall_speedup"] == 2.0
    from benchmarks.gpu.report import targets

    lines = "\n".join(targets(tmp_path))
    assert "| e2e fp32: >= 2x trl samples/s at <= 0.7x peak memory | trl failed | no |" in lines
    assert "| e2e bf16: >= 2x trl samples/s, peak memory <= 0.7x | 2.00x, 1.00x | no |" in lines


def test_suite_interrupted_kills_the_running_step_and_still_summarizes(tmp_path):
    """SIGTERM to the suite (e.g. the device tool's time limit) kills the running step's process group (it runs in a
    session of its own) and still writes the summary."""
    import signal
    import time

    out, pid_file = tmp_path / "out", tmp_path / "child.pid"
    step = (f"import pathlib, subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"pathlib.Path({str(pid_file)!r}).write_text(str(c.pid)); time.sleep(60)")
    driver = (f"import sys; from pathlib import Path; from benchmarks.gpu import suite; suite.WHEELS = Path({str(tmp_path)!r}); "
              f"plan = [suite.Step('sleeper', 60, 'sleeps', [sys.executable, '-c', {step!r}]), suite.Step('next', 60, 'never', "
              f"[sys.executable, '-c', 'pass'])]; sys.exit(suite.run(Path({str(out)!r}), plan))")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not pid_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 1
    assert not _alive(int(pid_file.read_text()))
    summary = (out / "summary_gpu.md").read_text()
    assert "| sleeper | interrupted by SIGTERM |" in summary and "| next | not run (interrupted by SIGTERM) |" in summary
