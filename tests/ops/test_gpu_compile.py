"""Every Triton kernel specialisation the public ops launch compiles for sm_80 and sm_90 (ptxas from the triton
wheel), without a GPU: see tests/ops/gpu_compile.py for how."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_triton_kernels_compile_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton_cache"), PYTHONPATH=str(ROOT))  # a fresh cache: compile for real
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "ops" / "gpu_compile.py"), "90", "80"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("sm_")]
    assert [line[:5] for line in lines] == ["sm_90", "sm_80"] and all("compiled kernels" in line for line in lines), out.stdout
