"""``diffrl-fast experiment NAME``: experiments of the source checkout (benchmarks/), e.g. ``algos``, ``overoptimisation``."""
from __future__ import annotations

from .bench import run_script

EXPERIMENTS = {"algos": "benchmarks.bench_algos", "overoptimisation": "benchmarks.bench_overoptimisation"}


def main(argv: list[str]) -> int:
    return run_script("experiment", EXPERIMENTS, argv)
