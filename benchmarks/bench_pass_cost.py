"""Where a training epoch's time goes on the flow world: rollout and update seconds, and seconds per 1000 denoiser passes.

Each configuration trains ``--epochs`` epochs of configs/flow_digits.yaml (the time-to-reward benchmark's world and
sizes) after one warm-up epoch; the trainer's metrics give each epoch's sampling and training seconds and its
denoiser passes (a forward of one sample at one step = 1, its backward = 2). Reported: the rollout's and the
update's seconds, the whole epoch's seconds per 1000 passes, and the update's minibatch and chunk of timesteps
(the rows per denoiser call are their product). AWM's reference minibatch is 2 samples (train.batch_size=2): the configurations
below separate what its objective costs from what the size of its denoiser calls costs; Flow-GRPO's KL term (a
reference forward per trained transition, grpo.beta) is measured with and without, on its own and on the fastest tree.
Run: ``diffrl-fast bench pass-cost``; writes benchmarks/results/pass_cost_flow.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine_info  # noqa: E402

FLASH_TREE = ["algo=grpo", "sample.tree_branch_steps=[0, 1, 2]", "train.timestep_window=fixed", "train.window_size=4",
              "sample.post_window_solver=dpmsolver++", "sample.post_window_compress=0.6"]  # time-to-reward's grpo+tree+mix+flash
CONFIGS = {
    "grpo": ["algo=grpo"],
    "grpo, no KL (grpo.beta=0)": ["algo=grpo", "grpo.beta=0"],
    "grpo+tree+mix+flash": FLASH_TREE,
    "grpo+tree+mix+flash, no KL": [*FLASH_TREE, "grpo.beta=0"],
    "awm (minibatch 2, its reference)": ["algo=awm"],
    "awm, minibatch 32": ["algo=awm", "train.batch_size=32"],
    "nft": ["algo=nft"],
}


def measure(overrides: list[str], epochs: int, workdir: Path) -> dict:
    from diffrl_fast.config_utils import load_config
    from diffrl_fast.train.config import PRESETS, Config, validate
    from diffrl_fast.train.trainer import Trainer

    cfg = validate(load_config(Config, PRESETS / "flow_digits.yaml", [
        *overrides, f"num_epochs={epochs + 1}", "log.eval_samples=0", "log.progress=false", "log.tensorboard=false",
        "guard.every=0", f"output_dir={workdir}", "name=r", "seed=1"]))
    records = []
    Trainer(cfg, workdir / "r", log_fn=lambda s: None).run(on_epoch=lambda trainer, record: records.append(dict(record)))
    rows = records[1:]  # the first epoch warms up
    passes = [b["denoiser_passes"] - a["denoiser_passes"] for a, b in zip(records, records[1:])]
    sample_s = sum(r["sample_time_s"] for r in rows)
    train_s = sum(r["train_time_s"] for r in rows)
    total = sum(passes)
    return {"epochs": len(rows), "passes_per_epoch": statistics.fmean(passes), "sample_s": sample_s, "train_s": train_s,
            "s_per_1000_passes": 1000 * (sample_s + train_s) / total, "train_batch_size": cfg.train.batch_size,
            "chunk_size": cfg.train.chunk_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="diffrl-fast bench pass-cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CONFIGS.items():
            rows[name] = dict(measure(overrides, args.epochs, Path(tmp) / name.split()[0]), overrides=overrides)
            r = rows[name]
            print(f"{name:>34}: {r['passes_per_epoch']:.0f} passes per epoch, rollout {r['sample_s']:.1f} s, update "
                  f"{r['train_s']:.1f} s over {r['epochs']} epochs; {r['s_per_1000_passes']:.2f} s per 1000 passes", flush=True)
    meta = machine_info("cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pass_cost_flow.json").write_text(json.dumps({"machine": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Seconds per 1000 denoiser passes on the flow world, rollout and update", "",
             f"Machine: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}; "
             f"configs/flow_digits.yaml, {args.epochs} epochs after a warm-up, `diffrl-fast bench pass-cost`.", "",
             "| configuration | minibatch x chunk (rows per update call) | passes per epoch | rollout s | update s | s per 1000 passes |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['train_batch_size']} x {r['chunk_size']} | {r['passes_per_epoch']:.0f} | {r['sample_s']:.1f} | "
                     f"{r['train_s']:.1f} | {r['s_per_1000_passes']:.2f} |")
    (args.out / "pass_cost_flow.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'pass_cost_flow.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
