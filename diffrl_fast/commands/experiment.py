"""``diffrl-fast experiment NAME``: experiments of the source checkout (benchmarks/), e.g. ``algos``."""
from __future__ import annotations

from .bench import run_script

EXPERIMENTS = {"algos": "benchmarks.bench_algos"}


def main(argv: list[str]) -> int:
    return run_script("experiment", EXPERIMENTS, argv)
