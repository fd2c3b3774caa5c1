"""``diffrl-fast bench NAME``: run a benchmark script of the source checkout (benchmarks/)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from ..cli import EXIT_USAGE, UsageError

BENCHES = {"ops": "benchmarks.bench_ops"}


def _repo_root() -> Path:
    root = Path(__file__).resolve().parent.parent.parent
    if not (root / "benchmarks").is_dir() or not (root / "tests").is_dir():
        raise UsageError(
            "the benchmarks live in the source checkout (benchmarks/, tests/): install with "
            "`pip install -e .` from a clone of the repository and run from there"
        )
    return root


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: diffrl-fast bench {{{','.join(BENCHES)}}} [options]   (see diffrl-fast bench NAME --help)")
        return 0 if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        raise UsageError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHES)}")
    root = _repo_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(BENCHES[name]).main(rest)
