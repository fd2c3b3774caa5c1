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
