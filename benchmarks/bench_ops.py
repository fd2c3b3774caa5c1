"""Ops benchmark: the fused DDPO-IS step loss against the eager formula of ddpo-pytorch/trl and torch.compile of it.

For one DDIM step with classifier-free guidance (x_t, x_prev, eps_u, eps_c of shape [N, 4, H, W], per-row
coefficients), each provider computes the clipped PPO loss and, in backward, the gradients to eps_u and
eps_c (the model outputs):

    eager    the formula as ddpo-pytorch/trl write it (tests/baselines.py), plain PyTorch
    compile  torch.compile of that same function
    cpp            diffrl_fast.ops.ppo_clip_step_loss on the C++ backend (CPU tensors), default mode
                   ("fused" there: the gradients are computed in the forward pass, row by row in cache)
    cpp-recompute  the same with mode="recompute" (nothing latent-sized held; backward re-reads the inputs)
    triton         diffrl_fast.ops.ppo_clip_step_loss on the Triton backend (CUDA tensors), default mode ("fused"
                   there: the forward kernel also writes the residual, a second kernel scales it into the gradients)
    triton-recompute  the same with mode="recompute"

Modes: forward (loss with autograd enabled), backward (loss.backward() of a recorded graph), full (both).
Effective GB/s counts the minimal traffic of the mode, the same for every provider: forward reads the 4
latent inputs once, backward writes the 2 gradients once (full: 6 latent-sized passes). A provider that
re-reads inputs or saves residuals moves more than it is credited with. It is compared with the copy
bandwidth measured in the same run (256 MiB buffers). The bandwidth target is checked separately: at
[32, 4, 128, 128] the fused step and a copy of the same bytes are timed in alternation (15 rounds), so that
both see the same cache and machine state, and the median ratio of their speeds is reported.
The automatic backend of the device is called exactly as a user calls the op (no use_backend block). On CPU
the run first makes glibc keep freed memory (``benchmarks.common.keep_freed_memory``; ``--default-allocator``
leaves it alone), so that no provider's fresh outputs page-fault: recorded as ``allocator`` in the JSON.
Run: ``python benchmarks/bench_ops.py`` or ``diffrl-fast bench ops``; results go to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (RESULTS, allocation_profile, copy_bandwidth_gbs, keep_freed_memory, machine_info,  # noqa: E402
                               time_fn, write_rows)
from diffrl_fast.ops import ppo_clip_step_loss, use_backend  # noqa: E402
from diffrl_fast.ops import backends  # noqa: E402
from tests.baselines import ddim_affine, ddpo_ppo_step_loss, ddpo_step_logprob, random_ddim_rows  # noqa: E402

GUIDANCE = 7.5
CLIP_RANGE = 1e-4
ADV_CLIP = 5.0
# Latent-sized passes of the minimal traffic per mode (fp32: 4 bytes per element per pass).
TENSOR_PASSES = {"forward": 4, "backward": 2, "full": 6}
TARGET_SHAPE = (32, 4, 128, 128)
# fused provider -> (min speed-up vs eager, vs compile at every shape, vs compile at the small shapes,
# min fraction of copy bandwidth); full mode, fp32. Issue 16 (CPU) and issue 15 (GPU).
TARGETS = {
    "cpp": (6.0, 1.0, 1.2, 0.85),
    "triton": (5.0, 1.0, 1.0, 0.75),
}
SMALL_NUMEL = 2**19  # "small" shapes: at most this many elements per tensor (per-call overhead dominates)


def make_inputs(shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[0]
    x, prev, eu, ec = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    abar_t, abar_p, std = (v.to(device) for v in random_ddim_rows(n, g))
    a, b = ddim_affine(abar_t, abar_p, std)
    # old log-probs as in training: the rollout's, a little off after some updates (ratios near 1, some
    # beyond the clip range). Random old log-probs would make every ratio ~0 and every gradient denormal.
    with torch.no_grad():
        logp = ddpo_step_logprob(x.float(), prev.float(), eu.float(), ec.float(), GUIDANCE, abar_t, abar_p, std)
    old = (logp + 2e-4 * torch.randn(n, generator=g).to(device)).to(device)
    adv = torch.randn(n, generator=g).to(device)
    return dict(x=x, prev=prev, eu=eu, ec=ec, abar_t=abar_t, abar_p=abar_p, std=std, a=a, b=b, old=old, adv=adv)


def loss_fns(inp, device):
    """provider -> function(eu, ec) returning the scalar loss."""

    def eager(eu, ec):
        return ddpo_ppo_step_loss(inp["x"], inp["prev"], eu, ec, GUIDANCE, inp["abar_t"], inp["abar_p"], inp["std"],
                                  inp["old"], inp["adv"], CLIP_RANGE, ADV_CLIP)

    def fused(backend, mode="auto"):
        def fn(eu, ec):
            return ppo_clip_step_loss(inp["x"], inp["prev"], eu, ec, inp["a"], inp["b"], GUIDANCE, inp["std"],
                                      inp["old"], inp["adv"], clip_range=CLIP_RANGE, adv_clip=ADV_CLIP, mode=mode).loss

        if backends.resolve(device) == backend:
            return fn  # the automatic choice on this device: timed exactly as a user calls the op

        def forced(eu, ec):
            with use_backend(backend):
                return fn(eu, ec)

        return forced

    fns = {"eager": eager, "compile": torch.compile(eager, dynamic=False)}
    if device == "cpu":
        fns["cpp"] = fused("cpp")
        fns["cpp-recompute"] = fused("cpp", "recompute")
    else:
        fns["triton"] = fused("triton")
        fns["triton-recompute"] = fused("triton", "recompute")
    return fns


def run_case(fn, inp, mode, device, iters, min_time_s):
    eu = inp["eu"].clone().requires_grad_()
    ec = inp["ec"].clone().requires_grad_()

    def forward():
        return fn(eu, ec)

    def full():
        eu.grad = ec.grad = None
        fn(eu, ec).backward()

    if mode == "forward":
        call = forward
    elif mode == "full":
        call = full
    else:
        loss = fn(eu, ec)

        def call():
            eu.grad = ec.grad = None
            loss.backward(retain_graph=True)

    stats = time_fn(call, device, warmup=3, iters=iters, min_time_s=min_time_s)
    if mode == "full":
        stats.update(memory_case(fn, inp, device))
    return stats


def memory_case(fn, inp, device) -> dict:
    """PyTorch-allocated memory of one loss, in MB above what the inputs hold: ``held_fwd_mb``, what forward leaves
    allocated until backward (saved residuals; the fused mode's precomputed gradients), and ``peak_full_mb``, the
    peak over forward + backward with the two gradients kept (benchmarks.common.allocation_profile)."""
    eu = inp["eu"].clone().requires_grad_()
    ec = inp["ec"].clone().requires_grad_()
    fn(eu, ec).backward()  # warm-up: compiled graphs, caches
    eu.grad = ec.grad = None
    kept = {}

    def forward():
        kept["loss"] = fn(eu, ec)

    _, held = allocation_profile(forward, device)
    kept.clear()

    def full():
        fn(eu, ec).backward()

    peak, _ = allocation_profile(full, device)
    return {"held_fwd_mb": held, "peak_full_mb": peak}


def cpp_kernel_call(inp):
    """The C++ fused PPO kernel with only its thin wrapper (``cpp_backend.ppo_step``: output allocation, pointer
    packing), without the argument checks, the autograd Function or backward, on the same inputs as the full
    step (gradients to eps_u and eps_c). A diagnostic for ``interleaved_bandwidth``: the gap between the two is
    the host and autograd work around the kernel."""
    from diffrl_fast.ops.backends import cpp_backend

    x = inp["x"]
    lead = x.shape[:1]
    rows = {"old_logp": inp["old"], "advantages": inp["adv"], "s": inp["std"], "log_s": torch.log(inp["std"]),
            "a": inp["a"], "b": inp["b"], "g": GUIDANCE}
    need = (False, False, True, True)
    return lambda: cpp_backend.ppo_step(x, inp["prev"], inp["eu"], inp["ec"], None, rows, lead, CLIP_RANGE, ADV_CLIP,
                                        "ppo", "mean", need)


def interleaved_bandwidth(fn, inp, device, rounds: int = 15, iters: int = 10, kernel=None) -> dict:
    """The fused provider's full step against a copy of the same bytes, timed in alternation.

    Both see the same machine state (cache contents, memory clock, neighbours on a shared host), so their
    ratio is steadier than two figures measured minutes apart. The copy moves the step's minimal traffic
    (half read, half written); the result is the median over rounds of (op GB/s) / (copy GB/s). ``kernel``
    (optional, e.g. ``cpp_kernel_call``) is timed in the same rounds, after a copy of its own, and reported as
    ``kernel_fraction``."""
    numel = inp["x"].numel()
    traffic = TENSOR_PASSES["full"] * numel * 4
    src = torch.randn(traffic // 8, device=device)
    dst = torch.empty_like(src)
    eu = inp["eu"].clone().requires_grad_()
    ec = inp["ec"].clone().requires_grad_()

    def full():
        eu.grad = ec.grad = None
        fn(eu, ec).backward()

    ratios, op_ms, copy_ms, faults, kernel_ratios, kernel_faults = [], [], [], [], [], []
    for _ in range(rounds):
        if kernel is not None:
            kc = time_fn(lambda: dst.copy_(src), device, warmup=1, iters=iters)["median_ms"]
            timed = time_fn(kernel, device, warmup=1, iters=iters)
            kernel_ratios.append(kc / timed["median_ms"])
            kernel_faults.append(timed.get("page_faults_per_call", 0.0))
        c = time_fn(lambda: dst.copy_(src), device, warmup=1, iters=iters)["median_ms"]
        timed = time_fn(full, device, warmup=1, iters=iters)
        o = timed["median_ms"]
        faults.append(timed.get("page_faults_per_call", 0.0))
        copy_ms.append(c)
        op_ms.append(o)
        ratios.append(c / o)  # equal bytes: the ratio of times is the ratio of bandwidths
    mid = sorted(ratios)[len(ratios) // 2]
    extra = {"kernel_fraction": round(sorted(kernel_ratios)[rounds // 2], 4),
             "kernel_page_faults_per_call": round(sum(kernel_faults) / rounds, 1)} if kernel is not None else {}
    return {**extra, "fraction": round(mid, 4), "fraction_min": round(min(ratios), 4), "fraction_max": round(max(ratios), 4),
            "op_ms_median": round(sorted(op_ms)[rounds // 2], 4), "copy_ms_median": round(sorted(copy_ms)[rounds // 2], 4),
            "copy_gbs_median": round(traffic / (sorted(copy_ms)[rounds // 2] * 1e-3) / 1e9, 3), "traffic_bytes": traffic,
            "rounds": rounds, "op_page_faults_per_call": round(sum(faults) / rounds, 1)}


def evaluate_targets(rows, bw_fraction):
    """The issues' targets for the fused PPO step loss, fp32, full mode: met or missed and by how much.

    copy bandwidth at [32, 4, 128, 128]: ``bw_fraction`` maps a provider to its fraction of the copy bandwidth
    measured by ``interleaved_bandwidth`` (a copy of the same bytes timed in alternation with the op); vs
    eager and vs torch.compile at every shape (and the higher compile bar at the small shapes), per shape.
    """
    by = {(r["provider"], r["mode"], tuple(r["shape"])): r for r in rows}
    shapes = sorted({tuple(r["shape"]) for r in rows}, key=lambda s: (math.prod(s), s))
    out = []

    def add(provider, metric, shape, got, need):
        out.append({"provider": provider, "metric": metric, "shape": list(shape), "measured": round(got, 3),
                    "target": need, "met": got >= need, "ratio_to_target": round(got / need, 3)})

    for provider, (vs_eager, vs_compile, vs_compile_small, bw_frac) in TARGETS.items():
        if (provider, "full", TARGET_SHAPE) not in by:
            continue
        if provider in bw_fraction:
            add(provider, "copy_bandwidth_fraction", TARGET_SHAPE, bw_fraction[provider], bw_frac)
        for shape in shapes:  # ">= 6x eager" holds at every shape, not only the headline one
            add(provider, "speedup_vs_eager", shape, by[("eager", "full", shape)]["median_ms"] / by[(provider, "full", shape)]["median_ms"],
                vs_eager)
            small = math.prod(shape) <= SMALL_NUMEL
            got = by[("compile", "full", shape)]["median_ms"] / by[(provider, "full", shape)]["median_ms"]
            add(provider, "speedup_vs_compile" + ("_small" if small else ""), shape, got,
                vs_compile_small if small else vs_compile)
    return out


def plot(rows, copy_gbs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({tuple(r["shape"]) for r in rows})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    modes = ["forward", "backward", "full"]
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 7), squeeze=False)
    for j, shape in enumerate(shapes):
        for k, (metric, label) in enumerate((("median_ms", "median time (ms, lower is better)"), ("gbs", "effective GB/s"))):
            ax = axes[k][j]
            width = 0.8 / len(providers)
            for i, p in enumerate(providers):
                vals = [next((r[metric] for r in rows if r["provider"] == p and r["mode"] == m and tuple(r["shape"]) == shape), 0) for m in modes]
                ax.bar([m + i * width for m in range(len(modes))], vals, width, label=p)
            if metric == "gbs":
                ax.axhline(copy_gbs, color="k", ls="--", lw=1, label="copy bandwidth")
            ax.set_xticks([m + width * (len(providers) - 1) / 2 for m in range(len(modes))], modes)
            ax.set_title(f"{list(shape)}", fontsize=9)
            ax.set_ylabel(label, fontsize=8)
            if j == 0 and k == 0:
                ax.legend(fontsize=7)
    fig.suptitle("fused DDPO-IS step loss, fp32", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_partial(path: Path, rows: list, meta: dict) -> None:
    """The rows so far as ``path`` (``{"machine": meta + partial: true, "rows": rows}``), replaced atomically."""
    tmp = path.with_name(path.name.replace(".partial.json", ".writing.partial.json"))  # git-ignored like the partial
    tmp.write_text(json.dumps({"machine": {**meta, "partial": True}, "rows": rows}, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    """Time every provider and mode at each shape; the JSON is rewritten after every row as ``STEM.partial.json``."""
    ap = argparse.ArgumentParser(prog="diffrl-fast bench ops", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="one small shape, few iterations (a smoke run, not a measurement)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--min-time", type=float, default=1.0, help="minimum seconds of timing per case")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    ap.add_argument("--default-allocator", action="store_true",
                    help="CPU: leave glibc's malloc as it is (fresh latent-sized outputs then page-fault in some "
                         "processes, for every provider: see benchmarks.common.keep_freed_memory)")
    args = ap.parse_args(argv)
    device = args.device
    allocator = None if device != "cpu" or args.default_allocator else keep_freed_memory()
    shapes = [(2, 4, 16, 16)] if args.quick else [(n, 4, h, h) for h in (64, 128) for n in (8, 32)]
    iters, min_time = (2, 0.0) if args.quick else (args.iters, args.min_time)
    copy_gbs = copy_bandwidth_gbs(device, nbytes=8 * 2**20 if args.quick else 256 * 2**20)
    print(f"device {device}, {torch.get_num_threads()} threads, copy bandwidth {copy_gbs:.1f} GB/s")
    stem = f"ops_{device}" + ("_quick" if args.quick else "")
    meta = machine_info(device)
    meta["copy_bandwidth_gbs"] = round(copy_gbs, 3)
    if device == "cpu":
        meta["allocator"] = allocator or "default"
    # written after every row, so that a run cut short (the GPU suite's time budget) leaves its rows; removed at the end
    partial = args.out / f"{stem}.partial.json"
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    bandwidth = {}  # fused provider -> its fraction of a same-bytes copy at the target shape (interleaved)
    for shape in shapes:
        inp = make_inputs(shape, device)
        numel = inp["x"].numel()
        fns = loss_fns(inp, device)
        for provider, fn in fns.items():
            for mode in ("forward", "backward", "full"):
                if provider == "compile" and mode == "backward":
                    # timing a recorded backward needs retain_graph=True, which compiled graphs with donated
                    # buffers refuse: a separately compiled copy without them, for this mode only
                    import torch._functorch.config as functorch_config

                    with functorch_config.patch(donated_buffer=False):
                        stats = run_case(torch.compile(fns["eager"], dynamic=False), inp, mode, device, iters, min_time)
                else:
                    stats = run_case(fn, inp, mode, device, iters, min_time)
                gbs = TENSOR_PASSES[mode] * numel * 4 / (stats["median_ms"] * 1e-3) / 1e9
                row = {"op": "ppo_clip_step_loss", "provider": provider, "mode": mode, "shape": list(shape), "dtype": "float32",
                       **{k: round(v, 4) for k, v in stats.items()}, "gbs": round(gbs, 3),
                       "copy_fraction": round(gbs / copy_gbs, 4)}
                rows.append(row)
                write_partial(partial, rows, meta)
                print(f"{str(list(shape)):>20} {provider:>8} {mode:>8}  median {stats['median_ms']:9.3f} ms  "
                      f"p20 {stats['p20_ms']:9.3f}  p80 {stats['p80_ms']:9.3f}  {gbs:7.2f} GB/s ({gbs / copy_gbs:5.1%} of copy)  "
                      + (f"  held after forward {stats['held_fwd_mb']:.1f} MB, peak {stats['peak_full_mb']:.1f} MB" if mode == "full" else "")
                      + (f"  {stats['page_faults_per_call']:.0f} page faults/call" if "page_faults_per_call" in stats else ""))
        if tuple(shape) == TARGET_SHAPE and not args.quick:
            for provider in TARGETS:
                if provider in fns:
                    bw = interleaved_bandwidth(fns[provider], inp, device,
                                               kernel=cpp_kernel_call(inp) if provider == "cpp" else None)
                    meta[f"bandwidth_check_{provider}"] = bw
                    bandwidth[provider] = bw["fraction"]
                    print(f"{str(list(shape)):>20} {provider:>8} vs a copy of the same {bw['traffic_bytes'] / 2**20:.0f} MiB, "
                          f"interleaved: {bw['fraction']:.1%} of its bandwidth (rounds {bw['fraction_min']:.1%}-"
                          f"{bw['fraction_max']:.1%}; copy {bw['copy_gbs_median']:.1f} GB/s; "
                          f"{bw['op_page_faults_per_call']:.0f} page faults per step)"
                          + (f"; the kernel call alone: {bw['kernel_fraction']:.1%}, "
                             f"{bw['kernel_page_faults_per_call']:.0f} page faults per call" if "kernel_fraction" in bw else ""))
    if not args.quick:
        # context: the 256 MB copy may run from a large last-level cache; 2 GB of buffers cannot
        meta["copy_bandwidth_gbs_1gib_buffers"] = round(copy_bandwidth_gbs(device, nbytes=2**30), 3)
    targets = [] if args.quick else evaluate_targets(rows, bandwidth)
    for t in targets:
        print(f"target {t['provider']} {t['metric']} at {t['shape']}: measured {t['measured']} vs {t['target']} -> "
              f"{'met' if t['met'] else 'MISSED'}")
    meta["targets"] = targets
    jpath, cpath = write_rows(stem, rows, meta, args.out)
    partial.unlink(missing_ok=True)
    plot(rows, copy_gbs, args.out / f"{stem}.png")
    print(f"wrote {jpath}, {cpath}, {args.out / f'{stem}.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
