"""CI runs every test that exists: the README's plain `python -m pytest -q` collects every tests/**/test_*.py.

(pytest's default norecursedirs skips folders named dist, build, venv, ...; a test folder named like one of
them would silently drop out of CI, as tests/dist/ once did.)
"""
import subprocess
import sys
from pathlib import Path


def test_every_test_file_is_collected_by_the_plain_command():
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-rs", "-p", "no:cacheprovider"],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    collected = {line.split("::")[0] for line in out.stdout.splitlines() if "::" in line}
    # A module that skips itself at import (an optional dependency missing) is collected and reported, not dropped:
    # "SKIPPED [1] tests/x.py:12: reason".
    collected |= {line.split()[2].split(":")[0] for line in out.stdout.splitlines() if line.startswith("SKIPPED [")}
    files = {p.relative_to(root).as_posix() for p in (root / "tests").rglob("test_*.py")}
    assert files, "no test files found"
    missing = sorted(files - collected)
    assert not missing, f"test files the plain pytest command does not collect: {missing}"
