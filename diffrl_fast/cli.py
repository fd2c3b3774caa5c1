"""``diffrl-fast``: the command line.

    diffrl-fast train [CONFIG.yaml] [key=value ...]   RL fine-tuning (default: DDPO on the digits world)
    diffrl-fast sample --run runs/NAME        images from a trained run (or --model for a base model)
    diffrl-fast eval --run runs/NAME --reward R   mean and std of rewards over N fixed-seed samples
    diffrl-fast pretrain digits               retrain the digits world's shipped weights
    diffrl-fast label --prompt P --pairs N    record human preferences for D3PO
    diffrl-fast check-parity --model PATH   rollout vs training-recompute log-prob parity on your model
    diffrl-fast reward-server --reward R    serve a reward over HTTP (train with reward.name=http://HOST:PORT)
    diffrl-fast convert-reward IN.pth       a reward model's pickled weights -> safetensors (weights_only load)
    diffrl-fast bench ops|memory|e2e        benchmarks (benchmarks/bench_*.py), results in benchmarks/results/
    diffrl-fast experiment algos            every algorithm on the digits world, 3 seeds (benchmarks/bench_algos.py)

Errors a user can cause (bad arguments, bad config, missing files) print one clear message and exit
with code 2, without a traceback.

Distributed: ``torchrun --nproc_per_node N -m diffrl_fast train ...`` or
``deepspeed --num_gpus N --module diffrl_fast train ... dist.engine=deepspeed dist.deepspeed_config=...``;
the ``--local_rank=R`` argument the deepspeed launcher adds is accepted anywhere on the line.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

EXIT_USAGE = 2


class UsageError(Exception):
    """An error the user can fix: printed without a traceback, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so every command reports errors one way."""

    def error(self, message):
        raise UsageError(message)


# command -> module with main(argv) -> int
COMMANDS = {
    "train": "diffrl_fast.commands.train",
    "sample": "diffrl_fast.commands.sample",
    "eval": "diffrl_fast.commands.evaluate",
    "pretrain": "diffrl_fast.commands.pretrain",
    "label": "diffrl_fast.commands.label",
    "check-parity": "diffrl_fast.commands.parity",
    "reward-server": "diffrl_fast.commands.reward_server",
    "convert-reward": "diffrl_fast.commands.convert_reward",
    "bench": "diffrl_fast.commands.bench",
    "experiment": "diffrl_fast.commands.experiment",
}


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Remove ``--local_rank=R`` / ``--local_rank R`` (added by the deepspeed launcher) and export it as LOCAL_RANK."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    # transformers warns on import about optional image backends we never use; keep the CLI's output readable
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        print(f"diffrl-fast: unknown command {command!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
              + f"; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    from ._extras import MissingExtra, as_missing_extra

    try:
        return importlib.import_module(COMMANDS[command]).main(rest)
    except MissingExtra as exc:
        print(f"diffrl-fast {command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        extra = as_missing_extra(exc, f"diffrl-fast {command}")
        if extra is None:
            raise
        print(f"diffrl-fast {command}: error: {extra}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"diffrl-fast {command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError) as exc:  # user-caused: bad model folder, bad option values
        print(f"diffrl-fast {command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    # Run through the imported module so that its UsageError is the one the commands raise.
    from diffrl_fast.cli import main as _main

    raise SystemExit(_main())
