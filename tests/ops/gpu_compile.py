"""Compile every Triton kernel specialisation the public ops launch, for real GPUs (sm_80, sm_90), without a GPU.

    python tests/ops/gpu_compile.py 90 [80 ...]       # one line per architecture, exits 1 on any failure

1. Record what the public ops ask of a backend: every (kernel flags, dtype) combination reaches
   ``step_fwd`` / ``step_bwd``, captured here by running the ops on small CPU tensors with the torch
   backend over a matrix of ops, dtypes, guidance / no guidance, x0 clipping, reductions and every
   requires-grad pattern (which gradients a backward call writes: a runtime argument, ``need_*``, not
   specialised; what it still changes, in the misaligned layout only: tests/ops/test_gpu_compile.py).
2. Replay each recorded call through the Triton backend's host code on meta tensors laid out contiguous,
   strided (a trajectory's ``latents[:, :-1]``), misaligned (offset by one element, rows not a multiple of 16)
   and with 64-bit strides, with the kernels' launches replaced by ``run(..., warmup=True)``: Triton
   specialises, lowers to PTX and runs ptxas (shipped in the triton wheel) for the target, launching nothing.
   Coverage is pairwise, so that it fits CI's budget: with the first requires-grad pattern of each backward
   call, every recorded call in every layout in float32, every recorded call in every dtype laid out
   contiguously, and the calls with the most inputs and flags in every (dtype, layout); then, misaligned, the
   backward calls that make every (dtype, gradient output) compiled there both aligned and misaligned (``jobs``).
   (The full cross product, every requires-grad pattern included, compiles too; it is ~3.4x as many kernels:
   ``--full``.)
   Several architectures compile in parallel processes.
3. The target comes from a driver stand-in (``GPUTarget("cuda", arch, 32)``) installed with
   ``triton.runtime.driver.set_active``; the backend is imported without TRITON_INTERPRET, so the GPU block
   size is what gets compiled.
"""
from __future__ import annotations

import itertools
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile the GPU path
# torch and triton are imported where they are used, so that the process that only starts one process per
# architecture does not spend seconds importing them first (tests/ops/test_gpu_compile.py has a time budget)


class DriverStandIn:
    """What Triton's JIT asks of the active driver when it compiles without launching."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def is_active(self):
        return True


# ---------------------------------------------------------------------------------------------- 1. record

def record_calls() -> dict:
    """Every compile-relevant call the public ops make of a backend (step 1 of the module docstring)."""
    import torch

    from diffrl_fast import ops
    from diffrl_fast.ops import X0Clip
    from diffrl_fast.ops.backends import torch_backend

    calls: dict = {}  # compile-relevant key -> one recorded call of it
    fwd, bwd = torch_backend.step_fwd, torch_backend.step_bwd

    def spec(p):
        return (p.x.dtype, p.coef.dtype, p.y is not None, p.eu is not None, p.ec is not None, p.ref_eu is not None, p.clip)

    def rec_fwd(p, want_ss, want_kk, want_mean):
        key = ("fwd", spec(p), (want_ss, want_kk, want_mean))
        calls.setdefault(key, key)
        return fwd(p, want_ss, want_kk, want_mean)

    def rec_bwd(p, w_ss, w_kk, g_mean, need):
        # every requires-grad pattern (``need``) is kept; ``jobs`` chooses which to compile
        key = ("bwd", spec(p), (w_ss is not None, w_kk is not None, g_mean is not None, tuple(need)))
        calls.setdefault(key, key)
        return bwd(p, w_ss, w_kk, g_mean, need)

    fwd_res, scale = torch_backend.step_fwd_res, torch_backend.scale_rows

    def rec_fwd_res(p):
        key = ("fwd_res", spec(p), ())
        calls.setdefault(key, key)
        return fwd_res(p)

    def rec_scale(res, k, need, latent_dims):
        key = ("scale", (res.dtype, k.dtype, False, False, False, False, False), tuple(need))
        calls.setdefault(key, key)
        return scale(res, k, need, latent_dims)

    torch_backend.step_fwd, torch_backend.step_bwd = rec_fwd, rec_bwd
    torch_backend.step_fwd_res, torch_backend.scale_rows = rec_fwd_res, rec_scale
    g = torch.Generator().manual_seed(0)
    shape = (2, 1, 2, 3)
    with ops.use_backend("torch"), ops.checks(False):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            def t(grad=False):
                return torch.randn(shape, generator=g).to(dtype).requires_grad_(grad)

            for clip in (None, X0Clip(1.2, 0.9, -0.4, 1.0)):
                for guided in (True, False):
                    for grads in itertools.product((False, True), repeat=4):  # x, y, eps_u, eps_c
                        x, y, eu, ec = (t(r) for r in grads)
                        ec = ec if guided else None
                        for ret_mean in (False, True):
                            out = ops.step_logprob(x, y, eu, ec, 0.9, -0.3, 2.0, 0.5, clip_x0=clip, return_mean=ret_mean)
                            lp, mean = out if ret_mean else (out, None)
                            loss = lp.float().sum() + (mean.float().sum() if mean is not None else 0)
                            if loss.requires_grad:
                                loss.backward()
                        ru, rc = t(), (t() if guided else None)
                        kl = ops.step_kl(x, eu, ec, ru, rc, 0.9, -0.3, 2.0, 0.5, clip_x0=clip)
                        if kl.requires_grad:
                            kl.float().sum().backward()
                        m = ops.step_mean(x, eu, ec, 0.9, -0.3, 2.0, clip_x0=clip)
                        if m.requires_grad:
                            m.float().sum().backward()
                    x, y, eu, ec = t(), t(), t(True), t(True) if guided else None
                    ops.ppo_clip_step_loss(x, y, eu, ec, 0.9, -0.3, 2.0, 0.5, torch.zeros(2), torch.ones(2), clip_x0=clip).loss.backward()
                    if clip is None:  # what mode="auto" runs on Triton (the torch backend's auto is "recompute")
                        ops.ppo_clip_step_loss(x, y, eu, ec, 0.9, -0.3, 2.0, 0.5, torch.zeros(2), torch.ones(2),
                                               mode="fused").loss.backward()
            for grads in itertools.product((False, True), repeat=2):
                y, mean = t(grads[0]), t(grads[1])
                lp = ops.gaussian_logprob(y, mean, 0.5)
                if lp.requires_grad:
                    lp.float().sum().backward()
                kl = ops.gaussian_kl(y, mean, 0.5)
                if kl.requires_grad:
                    kl.float().sum().backward()
    torch_backend.step_fwd, torch_backend.step_bwd = fwd, bwd
    torch_backend.step_fwd_res, torch_backend.scale_rows = fwd_res, scale
    return calls


# ---------------------------------------------------------------------------------------------- 2. replay

LAYOUTS = ("contiguous", "strided", "misaligned", "int64")


def latents(layout: str, dtype: torch.dtype) -> torch.Tensor:
    """A meta tensor of 6 rows in the given layout (rows of 5120 elements: two 4096-element chunks, so the
    per-row sum of partials runs too)."""
    import torch

    meta = dict(device="meta", dtype=dtype)
    if layout == "contiguous":
        return torch.empty((6, 4, 32, 40), **meta)
    if layout == "strided":  # latents[:, :-1] of a [B, T+1, C, H, W] trajectory: leading dims that do not collapse
        return torch.empty((2, 4, 4, 32, 40), **meta)[:, :-1]
    if layout == "misaligned":  # one element off 16-byte alignment, rows of 3 x 7 x 7 = 147 elements
        return torch.empty(6 * 147 + 1, **meta)[1:].view(6, 3, 7, 7)
    return torch.empty_strided((2, 4, 16, 16), (2**33, 256, 16, 1), **meta)  # row stride beyond 32 bits


def output_alignment(call) -> list:
    """(dtype, gradient output, aligned) of a backward call in the misaligned layout: a wanted gradient is a fresh,
    aligned allocation; an unwanted or absent one is passed as ``p.x``'s (misaligned) pointer."""
    kind, (dtype, _, has_y, has_eu, has_ec, _, _), flags = call
    if kind != "bwd":
        return []
    return [(dtype, i, bool(wanted and present)) for i, (wanted, present) in enumerate(zip(flags[3], (True, has_y, has_eu, has_ec)))]


def jobs(calls: dict, full: bool) -> list:
    """(call, layout) pairs to compile: the cross product, or its pairwise cover (module docstring).

    The cover takes one requires-grad pattern per backward call (the first recorded; the pattern is a runtime
    argument), then adds misaligned backward calls until every (dtype, gradient output) has been compiled there
    both aligned and misaligned (tests/ops/test_gpu_compile.py says why that suffices)."""
    import torch

    every = [c for c in calls.values() if c[1][0] != torch.float64]  # float64 runs on the torch backend
    if full:
        return [(c, layout) for c in sorted(every, key=str) for layout in LAYOUTS]
    first: dict = {}
    for c in every:  # one call per compiled variant of the contiguous layouts: the first requires-grad pattern seen
        first.setdefault((c[0], c[1], c[2][:3]), c)
    base = sorted(first.values(), key=str)
    richest = {}
    for c in base:  # per kind, the call with the most inputs and flags
        score = sum(map(bool, c[1][2:])) + sum(map(bool, c[2][:3]))
        if score > richest.get(c[0], (-1, None))[0]:
            richest[c[0]] = (score, c[1][2:], c[2][:3])
    out = []
    for c in base:
        rich = (c[1][2:], c[2][:3]) == richest[c[0]][1:]
        for layout in LAYOUTS:
            if layout == "contiguous" or c[1][0] == torch.float32 or rich:
                out.append((c, layout))
    covered = {a for c, layout in out if layout == "misaligned" for a in output_alignment(c)}
    candidates = sorted((c for c in every if c[0] == "bwd"), key=str)
    while True:  # greedily, the backward call that adds the most missing (dtype, output, aligned) states
        gain, best = max(((len(set(output_alignment(c)) - covered), c) for c in candidates), key=lambda t: t[0])
        if gain == 0:
            return out
        out.append((best, "misaligned"))
        covered |= set(output_alignment(best))


def replay(work: list, compiled: list) -> None:
    """Run the Triton backend's host code for each (call, layout) on meta tensors; its launches must only compile."""
    import torch

    from diffrl_fast.ops._problem import N_COEF, StepProblem
    from diffrl_fast.ops.backends import triton_backend as tb

    for (kind, (dtype, acc, has_y, has_eu, has_ec, has_ref, clip), flags), layout in work:
        def lat():
            return latents(layout, dtype)

        x = lat()
        n_rows = x.shape[: x.dim() - 3].numel()
        coef = torch.empty((n_rows, N_COEF), device="meta", dtype=acc)
        p = StepProblem(x, lat() if has_y else None, lat() if has_eu else None, lat() if has_ec else None,
                        lat() if has_ref else None, lat() if has_ref and has_ec else None, coef, clip, 3)
        lead = x.shape[: x.dim() - 3]
        before = len(compiled)
        if kind == "fwd":
            tb.step_fwd(p, *flags)
        elif kind == "fwd_res":
            tb.step_fwd_res(p)
        elif kind == "scale":  # the residual and the gradients are fresh allocations, whatever the inputs' layout
            tb.scale_rows(torch.empty(x.shape, device="meta", dtype=dtype), torch.empty((n_rows, 4), device="meta", dtype=acc),
                          flags, 3)
        else:
            w_ss, w_kk, g_mean, need = flags
            tb.step_bwd(p, torch.empty(lead, device="meta", dtype=acc) if w_ss else None,
                        torch.empty(lead, device="meta", dtype=acc) if w_kk else None,
                        torch.empty(x.shape, device="meta", dtype=dtype) if g_mean else None, need)
        if len(compiled) == before:
            raise RuntimeError(f"{kind} {dtype} {layout}: the backend launched no kernel")


class WarmupOnly:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` compiles for the target and launches nothing."""

    def __init__(self, kernel, compiled: list) -> None:
        self.kernel, self.compiled = kernel, compiled

    def __getitem__(self, grid):
        def compile_only(*args, **kwargs):
            t0 = time.perf_counter()
            k = self.kernel.run(*args, grid=grid, warmup=True, **kwargs)
            self.compiled.append((self.kernel.fn.__name__, time.perf_counter() - t0, k, getattr(k, "hash", id(k))))
            return k

        return compile_only


def resource_usage(kernels: list) -> str:
    """Registers and spill stores of a sample of compiled kernels, read from their cubins with cuobjdump."""
    import re
    import subprocess
    import tempfile

    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.isfile(cuobjdump):
        return "resource usage unavailable (no cuobjdump in the triton wheel)"
    regs, spills = [], []
    for k in kernels:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        regs += [int(v) for v in re.findall(r"REG:(\d+)", out)]
        spills += [int(v) for v in re.findall(r"STACK:(\d+)", out)]
    if not regs:
        return "resource usage unavailable"
    return f"{len(regs)} sampled kernels: {min(regs)}-{max(regs)} registers, stack {max(spills, default=0)} bytes"


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its finished children (ptxas) so far."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(archs: list[int], full: bool = False) -> int:
    """Compile the cover (or ``full``: the cross product) for each architecture; 1 on any failure."""
    if len(archs) > 1:  # one process per architecture, in parallel
        import subprocess

        procs = [subprocess.Popen([sys.executable, __file__, str(a), *(["--full"] if full else [])], stdout=subprocess.PIPE, text=True)
                 for a in archs]
        codes = []
        for p in procs:
            out, _ = p.communicate()
            print(out, end="", flush=True)
            codes.append(p.returncode)
        return 1 if any(codes) else 0
    import triton

    work = jobs(record_calls(), full)
    from diffrl_fast.ops.backends import triton_backend as tb

    assert tb.BLOCK == 1024, f"the GPU block size must be compiled, got BLOCK={tb.BLOCK}"
    from triton.runtime.jit import JITFunction

    # every kernel the backend launches (``*_kernel``; the other @triton.jit functions are inlined into them)
    kernels = {n: k for n, k in vars(tb).items() if isinstance(k, JITFunction) and n.endswith("_kernel")}
    failures = 0
    for arch in archs:
        triton.runtime.driver.set_active(DriverStandIn(arch))
        for k in kernels.values():  # their per-device caches hold the previous target's compiler
            k.device_caches.clear()
        compiled: list = []
        for n, k in kernels.items():
            setattr(tb, n, WarmupOnly(k, compiled))
        t0 = time.perf_counter()
        try:
            replay(work, compiled)
        except Exception as exc:  # a compile error: report and fail
            failures += 1
            print(f"sm_{arch}: FAILED after {len(compiled)} kernels: {type(exc).__name__}: {exc}", flush=True)
            continue
        finally:
            for n, k in kernels.items():
                setattr(tb, n, k)
        names = sorted({c[0] for c in compiled})
        if set(names) != set(kernels):
            failures += 1
            print(f"sm_{arch}: kernels never launched by the public ops: {sorted(set(kernels) - set(names))}", flush=True)
        unique = len({c[3] for c in compiled})
        usage = resource_usage([c[2] for c in compiled][::25])
        print(f"sm_{arch}: {len(work)} (backend call, layout) pairs -> {unique} compiled kernels in "
              f"{time.perf_counter() - t0:.1f} s; {usage}; process CPU {cpu_seconds():.1f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:] if a != "--full"] or [90, 80], full="--full" in sys.argv))
