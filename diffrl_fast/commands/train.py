"""``diffrl-fast train [CONFIG.yaml] [key=value ...] [--resume | --overwrite | --print-config]``: run RL fine-tuning.

With no config file it runs the digits preset (configs/digits.yaml): the built-in digits world fine-tuned
with DDPO for the digit_confidence reward; ``key=value`` overrides apply on top (e.g. algo=dpok).
Outputs go to runs/<name>/ (config.yaml, metrics.jsonl, reward_curve.png, grid_before/after.png,
weights, summary.md, checkpoints/). An existing run folder is never overwritten: pass --resume to
continue it from its last checkpoint or --overwrite to start over. --print-config prints every value that differs
from the defaults with the layer it came from (default, reference of ALGO, preset FILE, its model_facts or by_algo,
command line) and exits without loading anything.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

from ..cli import UsageError
from ..config_utils import ConfigError, describe, load_config, provenance_lines
from ..train.config import DEFAULT_PRESET, Config, check_world_prompts, validate


def _usage() -> str:
    return "\n".join([__doc__.strip(), "", "Config fields (set in YAML or as key=value):", *describe(Config)])


def _check_writable(run_dir: Path) -> None:
    parent = run_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".diffrl_fast_write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"the output folder {parent} cannot be written ({exc.strerror}); set output_dir=... to a writable folder") from None


def check_flags(argv: list[str]) -> set[str]:
    """The command's flags, or UsageError naming an unknown one."""
    flags = {a for a in argv if a.startswith("--")}
    unknown = flags - {"--resume", "--overwrite", "--print-config"}
    if unknown:
        raise UsageError(f"unknown option {sorted(unknown)[0]}; options: --resume, --overwrite, --print-config, --help")
    return flags


def parse_config(argv: list[str]) -> Config:
    """The validated config of ``[CONFIG.yaml] [key=value ...]`` (flags ignored; no file: the digits preset)."""
    rest = [a for a in argv if not a.startswith("--")]
    path = rest[0] if rest and "=" not in rest[0] else None
    try:
        return validate(load_config(Config, path or str(DEFAULT_PRESET), rest[1:] if path is not None else rest))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def prepare_run(argv: list[str]) -> tuple[Config, Path, bool]:
    """Parse arguments into (config, run folder, resume) and settle the run folder; raises UsageError."""
    flags = check_flags(argv)
    resume, overwrite = "--resume" in flags, "--overwrite" in flags
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: pick one")
    cfg = parse_config(argv)
    check_world_prompts(cfg)
    run_dir = Path(cfg.output_dir) / cfg.name
    _check_writable(run_dir)
    exists = run_dir.exists() and any(run_dir.iterdir())
    if exists and not (resume or overwrite):
        raise UsageError(f"run folder {run_dir} already exists: pass --resume to continue it, --overwrite to replace it, "
                         f"or choose another name=...")
    if overwrite and run_dir.exists() and int(os.environ.get("RANK", "0")) == 0:  # one process deletes, not all at once
        shutil.rmtree(run_dir)
    return cfg, run_dir, resume and exists


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(_usage())
        return 0
    if "--print-config" in argv:
        check_flags(argv)
        print("\n".join(provenance_lines(parse_config(argv))))
        return 0
    cfg, run_dir, resume = prepare_run(argv)
    from ..train.trainer import Trainer, TrainingError

    trainer = Trainer(cfg, run_dir)
    if resume and not trainer.resume():
        print(f"no checkpoint in {run_dir} yet: starting from scratch")
    stop = {"signal": None}

    def handler(signum, frame):
        stop["signal"] = signal.Signals(signum).name
        print(f"\n{stop['signal']} received: stopping after the current step", file=sys.stderr)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    resume_cmd = " ".join(shlex.quote(a) for a in ["diffrl-fast", "train", *[a for a in argv if a not in ("--overwrite", "--resume")],
                                                   "--resume"])
    try:
        summary = trainer.run(stop_flag=lambda: stop["signal"] is not None)
    except TrainingError as exc:
        print(f"diffrl-fast train: stopped: {exc}\nResume after fixing the cause with: {resume_cmd}", file=sys.stderr)
        return 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if summary.get("interrupted"):
        print(f"interrupted by {stop['signal']}: the last checkpoint (epoch {summary['epoch']}) is in {run_dir / 'checkpoints'}.\n"
              f"Resume with: {resume_cmd}", file=sys.stderr)
        return 130 if stop["signal"] == "SIGINT" else 143
    before, after = summary.get("before"), summary.get("after")
    if before and after:
        print(f"done: reward {before['mean']:+.4f} -> {after['mean']:+.4f} over {after['n']} fixed-seed samples; "
              f"see {run_dir / 'summary.md'}")
    else:
        print(f"done: see {run_dir / 'summary.md'}")
    return 0
