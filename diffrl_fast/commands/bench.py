"""``diffrl-fast bench NAME``: run a benchmark script of the source checkout (benchmarks/)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from ..cli import EXIT_USAGE, UsageError

BENCHES = {"ops": "benchmarks.bench_ops", "memory": "benchmarks.bench_memory", "e2e": "benchmarks.bench_e2e",
           "gpu": "benchmarks.gpu.suite", "time-to-reward": "benchmarks.bench_time_to_reward",
           "fsdp-units": "benchmarks.estimate_fsdp_units", "main-job": "benchmarks.bench_main_job",
           "reward-server": "benchmarks.bench_reward_server", "video-memory": "benchmarks.bench_video_memory",
           "pass-cost": "benchmarks.bench_pass_cost"}


def _repo_root() -> Path:
    root = Path(__file__).resolve().parent.parent.parent
    if not (root / "benchmarks").is_dir() or not (root / "tests").is_dir():
        raise UsageError(
            "the benchmarks live in the source checkout (benchmarks/, tests/): install with "
            "`pip install -e .` from a clone of the repository and run from there"
        )
    return root


def run_script(kind: str, scripts: dict[str, str], argv: list[str]) -> int:
    """Run ``scripts[argv[0]].main(argv[1:])`` from the source checkout."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: diffrl-fast {kind} {{{','.join(scripts)}}} [options]   (see diffrl-fast {kind} NAME --help)")
        return 0 if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in scripts:
        raise UsageError(f"unknown {kind} {name!r}; choose one of {sorted(scripts)}")
    root = _repo_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(scripts[name]).main(rest)


def main(argv: list[str]) -> int:
    return run_script("bench", BENCHES, argv)
