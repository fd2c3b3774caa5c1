"""Every Triton kernel specialisation the public ops launch compiles for sm_80 and sm_90 (ptxas from the triton
wheel), without a GPU, within CI's budget of 120 s: see tests/ops/gpu_compile.py for how.

The requires-grad patterns and misaligned inputs. In the Triton backend's backward (``triton_backend.step_bwd``)
a wanted gradient output is a fresh allocation and an unwanted or absent one is passed as ``p.x``'s pointer; the
``need_*`` flags themselves are runtime ints (``do_not_specialize``). Contiguous, strided and 64-bit-stride inputs
are 16-byte aligned like the fresh outputs, so there the pattern changes nothing that is compiled. With
misaligned inputs it decides which of the four output pointers Triton marks as divisible by 16: up to 2^4
variants per backward call. The cover compiles the first recorded pattern of each call and then, misaligned,
the backward calls that make every (dtype, gradient output) compiled there both aligned and misaligned: 3 more
kernels, 247 per architecture (triton 3.9; 220 before the fused mode's residual kernels). Compiling every recorded pattern misaligned instead would add 114
kernels in float32 alone and 374 over the three dtypes (counted from the specialisation keys without
compiling); at the measured ~0.33 s of CPU per kernel that is 40 s to 2 minutes more per architecture, on top of
the 73-79 s the cover takes of the 120 s budget (measured: BUDGET_S), so it is left to ``gpu_compile.py 90 --full``.
The cover suffices because:
  * divisibility is a per-pointer fact: Triton's axis analysis takes each load's and store's alignment from its
    own pointer argument and offsets, so a store lowers the same whatever the other pointers' alignment;
  * the code between loads and stores is the same for every pattern (they differ only in the runtime flags), so
    no pattern has an operation the cover lacks;
  * every (dtype, gradient output) store is compiled both aligned and misaligned next to misaligned loads, and
    ptxas does not fail on register pressure (it spills), so a combination of per-pointer forms that each compile
    compiles too; at run time a pointer is never marked aligned when it is not: Triton reads the actual
    addresses at each launch.
The fused PPO loss's residual path (``step_fwd_res``, ``scale_rows``: what mode="auto" runs on Triton without
x0 clipping) is recorded from a mode="fused" call; its residual and gradients are fresh allocations, so only
the inputs of its forward kernel follow the layout. The forward kernel has no requires-grad dependence: its pointers are the inputs (an absent one is ``p.x``'s, which
follows the recorded flags) and the mean output (fresh, or ``p.x`` without ``want_mean``, part of the key).
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Issue 15: at most 2 minutes in CI. The two architectures compile in parallel processes, one per core of CI's
# 2-core machines, so the wall time there is the longer process's CPU time (user + system, ptxas included) plus
# a second of start-up. That CPU time is what is held to the budget: the wall time of a shared, loaded machine
# measures the other load. Measured alone on a shared 2-core machine: 79 s (sm_90) and 73 s (sm_80) of CPU, at
# 221 s of wall time under a load of 4; before the CPU was measured, 113 s of wall time at a load of ~1.
BUDGET_S = 120.0


@pytest.mark.slow
def test_triton_kernels_compile_for_sm80_and_sm90(tmp_path):
    """Both architectures compile every specialisation of the cover, in parallel processes, within BUDGET_S."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton_cache"), PYTHONPATH=str(ROOT))  # a fresh cache: compile for real
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "ops" / "gpu_compile.py"), "90", "80"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - t0
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("sm_")]
    assert [line[:5] for line in lines] == ["sm_90", "sm_80"] and all("compiled kernels" in line for line in lines), out.stdout
    print(f"{wall:.0f} s of wall time\n" + "\n".join(lines))  # shown with -rA or -s
    cpu = [float(v) for v in re.findall(r"process CPU ([\d.]+) s", out.stdout)]
    assert len(cpu) == 2, out.stdout
    assert max(cpu) <= BUDGET_S, (f"compiling takes {max(cpu):.0f} s of CPU in the longer of the two parallel processes "
                                  f"(sm_90, sm_80: {cpu} s; {wall:.0f} s of wall time here), over the budget of "
                                  f"{BUDGET_S:.0f} s:\n" + "\n".join(lines))
