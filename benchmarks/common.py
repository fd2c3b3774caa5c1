"""Shared benchmark plumbing: timing, memory, machine facts, result files."""
from __future__ import annotations

import csv
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from diffrl_fast.utils.provenance import git_commit, machine_info as _machine_info  # noqa: F401  (git_commit: re-exported)

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, warmup: int = 3, iters: int = 20, min_time_s: float = 0.0) -> dict:
    """Run ``fn`` ``warmup`` times, then time ``iters`` calls (at least ``min_time_s`` in total); ms quantiles, and
    on CPU the minor page faults per call (``page_faults_per_call``: a fresh 8 MiB tensor costs 2048)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    faults = _minor_faults()
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    faults = _minor_faults() - faults
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    out = {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "iters": len(times)}
    if device == "cpu":
        out["page_faults_per_call"] = faults / len(times)  # fresh pages the process touched (4 KiB each)
    return out


def _minor_faults() -> int:
    """The process's minor page faults so far (0 where the resource module is missing)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def allocation_profile(fn: Callable[[], object], device: str) -> tuple[float, float]:
    """(peak, net) of the bytes PyTorch allocated during one call of ``fn``, above what was allocated at the start,
    in MB: ``net`` is what the call left allocated (tensors it keeps), ``peak`` the most at any moment.

    CUDA: the caching allocator's statistics. CPU, where the process's resident set hides allocations that reuse
    freed pages: the profiler's memory events (each op's own allocations, each free) summed in time order. Memory
    outside PyTorch's allocator (a C++ kernel's per-thread scratch rows) is not counted."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return ((torch.cuda.max_memory_allocated() - start) / 2**20, (torch.cuda.memory_allocated() - start) / 2**20)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20, current / 2**20


def copy_bandwidth_gbs(device: str, nbytes: int = 256 * 2**20) -> float:
    """Measured copy bandwidth (bytes read + bytes written per second) of ``dst.copy_(src)``, GB/s."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, iters=20)
    return 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9


def keep_freed_memory() -> str | None:
    """Make glibc's malloc keep the memory a process frees instead of handing it back to the system.

    By default glibc serves a large block from fresh pages (mmap) or trims the top of its heap when a large block
    is freed there, depending on the process's allocation history; a fresh latent-sized tensor then page-faults
    on first write, about 4 ms for 16 MiB here, against 0.4 ms for the whole fused step without faults. Whether
    it happens changes from one process to the next, for every provider alike. Setting ``M_TRIM_THRESHOLD`` and
    ``M_MMAP_THRESHOLD`` to 1 GiB (``mallopt``, as ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` do at
    start-up) keeps freed pages for reuse. It makes faults rarer, not impossible: PyTorch allocates with
    ``posix_memalign``, whose small leftover chunks can keep a freed block from being reused, so that the heap
    grows onto fresh pages now and then (jemalloc or tcmalloc, preloaded, avoid that too). ``time_fn`` counts the
    faults of every timed case. Returns what was set, for the result file, or None where the C library is not
    glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    m_trim_threshold, m_mmap_threshold, one_gib = -1, -3, 2**30
    if mallopt(m_trim_threshold, one_gib) != 1 or mallopt(m_mmap_threshold, one_gib) != 1:
        return None
    return "glibc malloc keeping freed memory (M_TRIM_THRESHOLD = M_MMAP_THRESHOLD = 1 GiB)"


def machine_info(device: str) -> dict:
    """``diffrl_fast.utils.provenance.machine_info`` with the commit the benchmark started at."""
    return _machine_info(device, commit=START_COMMIT)


# The commit as it was when the benchmark started (this module is imported first): the code a run measures is
# the code it imported then, so editing documentation during a long run does not mislabel its result.
START_COMMIT = git_commit()


def reading_lines(md_path: Path) -> list[str]:
    """The hand-written reading of a result file, ``<stem>_reading.md`` beside ``md_path``, as lines to append to its
    generated .md (regenerating the .md keeps it); [] when there is none."""
    reading = Path(md_path).with_name(Path(md_path).stem + "_reading.md")
    return [reading.read_text().rstrip(), ""] if reading.is_file() else []


def write_rows(stem: str, rows: Iterable[dict], meta: dict, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``rows`` as ``stem``.json (with ``meta``) and ``stem``.csv under ``out_dir``."""
    rows = list(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, cpath = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    jpath.write_text(json.dumps({"machine": meta, "rows": rows}, indent=2) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return jpath, cpath
