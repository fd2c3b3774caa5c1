"""The main jobs, measured, each run as a user runs it, in a fresh process, with the rewards of its fixed-seed
evaluation before and after, its wall times and the process's peak resident memory:

- ``digits``: ``diffrl-fast train`` with no arguments (DDPO on the digits world, 12 epochs);
- ``flow-digits``: ``diffrl-fast train configs/flow_digits.yaml`` (Flow-GRPO on the flow-digits world), with its
  layout-correct rate before and after (mean and standard error over the same fixed-seed samples).

Run: ``diffrl-fast bench main-job [--job digits|flow-digits]`` (each a few minutes on 2 cores); results in
benchmarks/results/main_job.{json,md} and main_job_flow_digits.{json,md}, from which README.md's main-job figures
are generated (benchmarks/docs.py).
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
# job -> (command, run folder name, result file stem)
JOBS = {
    "digits": (["diffrl-fast", "train", "output_dir=DIR", "log.progress=false"], "digits_ddpo", "main_job"),
    "flow-digits": (["diffrl-fast", "train", "configs/flow_digits.yaml", "output_dir=DIR", "log.progress=false"],
                    "flow-digits_grpo", "main_job_flow_digits"),
}


def run_main_job(workdir: Path, job: str = "digits") -> dict:
    """One main job in a child process: its summary.json figures, the process's wall time and peak RSS."""
    command, name, _ = JOBS[job]
    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-m", "diffrl_fast", *[str(root / a) if a.endswith(".yaml") else a.replace("DIR", str(workdir))
                                                   for a in command[1:]]]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the main job failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads((workdir / name / "summary.json").read_text())
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux: the largest child so far
    out = {"before": summary["before"]["mean"], "after": summary["after"]["mean"], "eval_samples": summary["after"]["n"],
           "epochs": summary["epochs"], "samples": summary["samples"], "train_wall_s": summary["wall_s"],
           "process_wall_s": wall, "peak_rss_mb": peak_kb / 1024}
    metrics = {k: v for k, v in summary["after"].items() if isinstance(v, dict) and "se" in v}
    if metrics:
        evals = {tag: json.loads((workdir / name / f"eval_{tag}.json").read_text()) for tag in ("before", "after")}
        out["metrics"] = {}
        for k in metrics:
            b, a = evals["before"]["metrics"][k], evals["after"]["metrics"][k]
            d = [y - x for x, y in zip(b["values"], a["values"])]
            mean = sum(d) / len(d)
            se = (sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d)) ** 0.5
            out["metrics"][k] = {"before": b["mean"], "before_se": b["se"], "after": a["mean"], "after_se": a["se"],
                                 "change": mean, "change_se": se}
    return out


TITLES = {"digits": ("# The main job: `diffrl-fast train` with no arguments",
                      "in a fresh process: DDPO-IS on the digits world (configs/digits.yaml), the reward over the same fixed-seed"),
          "flow-digits": ("# The flow main job: `diffrl-fast train configs/flow_digits.yaml`",
                          "in a fresh process: Flow-GRPO on the flow-digits world, the reward over the same fixed-seed")}


def write_markdown(data: dict, path: Path) -> None:
    m, r = data["machine"], data["run"]
    title, what = TITLES[data.get("job", "digits")]
    metric_rows = [f"| {k} | {v['before']:.3f} ± {v['before_se']:.3f} | {v['after']:.3f} ± {v['after_se']:.3f} | "
                   f"{v['change']:+.3f} ± {v['change_se']:.3f} |" for k, v in r.get("metrics", {}).items()]
    if metric_rows:
        metric_rows = ["", "| metric | before | after | change (paired per seed) |", "| --- | --- | --- | --- |", *metric_rows]
    path.write_text("\n".join([
        title,
        "",
        f"`{data['command']}` at commit {m['commit']} on {m['date']} ({m['cpu']}, {m['cores']} cores, torch {m['torch']}),",
        what,
        "samples before and after training.",
        "",
        "| reward before -> after | change | epochs | trajectories | sampling + training (summary.json wall_s) | whole process | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {r['before']:.4f} -> {r['after']:.4f} ({r['eval_samples']} samples) | {r['after'] - r['before']:+.4f} | {r['epochs']} | "
        f"{r['samples']} | {r['train_wall_s']:.1f} s | {r['process_wall_s']:.1f} s | {r['peak_rss_mb']:.0f} MB |",
        *metric_rows,
        "",
    ]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="diffrl-fast bench main-job", description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", choices=sorted(JOBS), default="digits", help="which main job (default: digits)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args(argv)
    info = machine_info("cpu")
    command, _, stem = JOBS[args.job]
    with tempfile.TemporaryDirectory() as tmp:
        run = run_main_job(Path(tmp), args.job)
    data = {"machine": info, "job": args.job, "command": " ".join(command), "run": run}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    write_markdown(data, args.out / f"{stem}.md")
    print(f"reward {run['before']:.4f} -> {run['after']:.4f}; {run['process_wall_s']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB; "
          f"wrote {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
