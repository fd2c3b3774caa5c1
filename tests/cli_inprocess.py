"""The CLI run in this process: usage errors exit before any model loads, so each case costs milliseconds
instead of a fresh interpreter's torch import (seconds). Tests that need the real entry point (signals, exit
codes of the process, output files of a full run) still spawn ``python -m diffrl_fast``."""
from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace


def run_cli(*args: str) -> SimpleNamespace:
    """``diffrl-fast ARGS`` in-process: (returncode, stdout, stderr) like ``subprocess.run``'s result. An
    exception the CLI does not turn into an exit code propagates (a traceback is a test failure)."""
    from diffrl_fast.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as exc:  # argparse's usage errors and --help
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())
