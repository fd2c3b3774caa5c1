"""The main job, measured: ``diffrl-fast train`` with no arguments (DDPO on the digits world, 12 epochs) run as a
user runs it, in a fresh process, with the rewards of its fixed-seed evaluation before and after, its wall times
and the process's peak resident memory.

Run: ``diffrl-fast bench main-job`` (about 2-3 minutes on 2 cores); results in benchmarks/results/main_job.{json,md},
from which README.md's main-job figures are generated (benchmarks/docs.py).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = ["diffrl-fast", "train", "output_dir=DIR", "log.progress=false"]


def run_main_job(workdir: Path) -> dict:
    """One main job in a child process: its summary.json figures, the process's wall time and peak RSS."""
    argv = [sys.executable, "-m", "diffrl_fast", *[a.replace("DIR", str(workdir)) for a in COMMAND[1:]]]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the main job failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads((workdir / "digits_ddpo" / "summary.json").read_text())
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux: the largest child so far
    return {"before": summary["before"]["mean"], "after": summary["after"]["mean"], "eval_samples": summary["after"]["n"],
            "epochs": summary["epochs"], "samples": summary["samples"], "train_wall_s": summary["wall_s"],
            "process_wall_s": wall, "peak_rss_mb": peak_kb / 1024}


def write_markdown(data: dict, path: Path) -> None:
    m, r = data["machine"], data["run"]
    path.write_text("\n".join([
        "# The main job: `diffrl-fast train` with no arguments",
        "",
        f"`{data['command']}` at commit {m['commit']} on {m['date']} ({m['cpu']}, {m['cores']} cores, torch {m['torch']}),",
        "in a fresh process: DDPO-IS on the digits world (configs/digits.yaml), the reward over the same fixed-seed",
        "samples before and after training.",
        "",
        "| reward before -> after | change | epochs | trajectories | sampling + training (summary.json wall_s) | whole process | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {r['before']:.4f} -> {r['after']:.4f} ({r['eval_samples']} samples) | {r['after'] - r['before']:+.4f} | {r['epochs']} | "
        f"{r['samples']} | {r['train_wall_s']:.1f} s | {r['process_wall_s']:.1f} s | {r['peak_rss_mb']:.0f} MB |",
        "",
    ]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="diffrl-fast bench main-job", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args(argv)
    info = machine_info("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        run = run_main_job(Path(tmp))
    data = {"machine": info, "command": " ".join(COMMAND), "run": run}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "main_job.json").write_text(json.dumps(data, indent=1) + "\n")
    write_markdown(data, args.out / "main_job.md")
    print(f"reward {run['before']:.4f} -> {run['after']:.4f}; {run['process_wall_s']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB; "
          f"wrote {args.out / 'main_job.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
