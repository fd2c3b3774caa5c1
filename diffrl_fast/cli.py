"""``diffrl-fast``: the command line.

    diffrl-fast bench ops [--quick]           fused-op benchmark (benchmarks/bench_ops.py)

Errors a user can cause (bad arguments, bad config, missing files) print one clear message and exit
with code 2, without a traceback.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    """An error the user can fix: printed without a traceback, exit code 2."""


def _repo_root() -> Path:
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks").is_dir() or not (root / "tests").is_dir():
        raise UsageError(
            "the benchmarks live in the source checkout (benchmarks/, tests/): install with "
            "`pip install -e .` from a clone of the repository and run from there"
        )
    return root


def _bench(argv: list[str]) -> int:
    benches = {"ops": "benchmarks.bench_ops"}
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: diffrl-fast bench {{{','.join(benches)}}} [options]   (see diffrl-fast bench NAME --help)")
        return 0 if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in benches:
        raise UsageError(f"unknown benchmark {name!r}; choose one of {sorted(benches)}")
    root = _repo_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(benches[name]).main(rest)


COMMANDS = {"bench": _bench}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        print(f"diffrl-fast: unknown command {command!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
              + f"; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[command](rest)
    except UsageError as exc:
        print(f"diffrl-fast {command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
