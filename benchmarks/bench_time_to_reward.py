"""Time to reward on the digits world: how soon each method reaches a reward level, and at what cost to the model.

Every contender fine-tunes the pretrained digits world for digit_confidence from the digits preset
(configs/digits.yaml with its by_algo entries, each algorithm's reference conventions otherwise) plus its own
overrides, for the same wall-clock budget of training (``--budget-s``: epochs continue until the clock passes
it, so a contender with cheap epochs gets more of them), with seeds 0, 1, 2. After every epoch, off the clock:

- eval reward: digit_confidence of ``--eval-samples`` fixed-seed samples (the same seeds for everyone,
  sampled as the contender evaluates: its log.eval_num_steps / log.eval_guidance_scale);
- held-out reward: the same images scored by the held-out classifier (another seed and architecture,
  ``digit_confidence_heldout``), a guard against fooling only the training classifier;
- diversity: the mean pairwise L2 distance (per pixel, images in [0, 1]) between eval samples of the same digit.

The clock is the run's own sampling + training time (the records' sample_time_s + train_time_s), so evaluation,
checkpointing and start-up are excluded. The threshold is 75% of the way from the baseline's reward before
training to the best level its seed-mean curve reaches; time and samples to the threshold are those of the
first evaluation at or above it, per seed. The guards are read at that evaluation and compared with the
baseline's at its own.

Run: ``diffrl-fast bench time-to-reward [--contenders a,b] [--seeds 0,1,2] [--budget-s S] [--reuse FILE]``;
writes benchmarks/results/time_to_reward.{json,md,png} (``--stem`` renames them: the sweep writes
time_to_reward_sweep.*). ``--reuse`` takes runs of the same contender, settings and seed from an earlier
JSON when they cover the budget (each keeps the commit it ran at). ``--smoke`` runs a tiny configuration (CI).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine_info  # noqa: E402

BASELINE = "ddpo_is"
# name -> overrides on top of the digits preset. The baseline is DDPO-IS at ddpo-pytorch's settings as the
# preset adapts them to the digits world (docs/algorithms.md); the levers are named by what they add.
CONTENDERS = {
    "ddpo_is": ["algo=ddpo_is"],
    "ddpo_sf": ["algo=ddpo_sf"],
    "dpok": ["algo=dpok"],
    "d3po": ["algo=d3po"],
    "dense": ["algo=dense"],
    "tdpo": ["algo=tdpo"],
    "tdpo_r": ["algo=tdpo_r"],
    "grpo": ["algo=grpo"],
    "nft": ["algo=nft"],
    # sweep point: the reference takes one optimiser step per epoch of 1152 samples; the digits epochs have 128
    "nft+8steps": ["algo=nft", "train.optimizer_step_every=minibatches"],
    "grpo+window2": ["algo=grpo", "train.timestep_window=fixed", "train.window_size=2"],
    "ddpo_is+window2": ["algo=ddpo_is", "train.timestep_window=fixed", "train.window_size=2"],
    "ddpo_is+sliding4": ["algo=ddpo_is", "train.timestep_window=sliding", "train.window_size=4", "train.window_stride=2"],
    "ddpo_is+10steps": ["algo=ddpo_is", "sample.num_steps=10", "log.eval_num_steps=20"],
    # the forward-process methods train CFG-free (their references' g = 1); evaluated with the preset's g = 2 as
    # the baseline is, the comparison is on the same images' footing
    "nft+eval_g2": ["algo=nft", "log.eval_guidance_scale=2.0"],
    "awm": ["algo=awm"],
    "awm+eval_g2": ["algo=awm", "log.eval_guidance_scale=2.0"],
    # sweep points (one seed, screened before the 3-seed runs; benchmarks/results/time_to_reward_sweep.md)
    "awm+eval_g2+8steps": ["algo=awm", "log.eval_guidance_scale=2.0", "train.optimizer_step_every=minibatches"],
    "awm+eval_g2+2t": ["algo=awm", "log.eval_guidance_scale=2.0", "awm.train_timesteps=2"],
    "awm+eval_g2+lr1e-3": ["algo=awm", "log.eval_guidance_scale=2.0", "train.learning_rate=1e-3"],
    "nft+eval_g2+8steps": ["algo=nft", "log.eval_guidance_scale=2.0", "train.optimizer_step_every=minibatches"],
    "ddpo_is+window4": ["algo=ddpo_is", "train.timestep_window=fixed", "train.window_size=4"],
}
THRESHOLD_FRACTION = 0.75


def diversity(images, class_ids) -> float:
    """Mean pairwise L2 distance per pixel between samples of the same class (images [N, C, H, W] in [0, 1])."""
    import torch

    flat = images.flatten(1).double()
    dists = []
    for c in sorted(set(class_ids)):
        idx = [i for i, k in enumerate(class_ids) if k == c]
        if len(idx) < 2:
            continue
        d = torch.cdist(flat[idx], flat[idx]) / math.sqrt(flat.shape[1])
        n = len(idx)
        dists.append(float(d.sum() / (n * (n - 1))))
    return statistics.mean(dists) if dists else float("nan")


class Evaluator:
    """Scores a trainer's policy on fixed seeds with the training and the held-out classifier."""

    def __init__(self, n: int) -> None:
        from diffrl_fast.rewards import get_reward

        self.n = n
        self.reward = get_reward("digit_confidence")
        self.heldout = get_reward("digit_confidence_heldout")

    def __call__(self, trainer) -> dict:
        import torch

        from diffrl_fast.train.trainer import EVAL_SEED_BASE

        trainer.model.denoiser.eval()
        prompts = [trainer.prompts[i % len(trainer.prompts)] for i in range(self.n)]
        images, meta = [], []
        with torch.no_grad():
            for start in range(0, self.n, 64):
                ids = list(range(start, min(self.n, start + 64)))
                traj = trainer._sample([prompts[i] for i in ids], [EVAL_SEED_BASE + i for i in ids])
                images.append(traj.images.cpu())
                meta += traj.metadata
        images = torch.cat(images)
        r, _ = self.reward(images, prompts, meta)
        h, _ = self.heldout(images, prompts, meta)
        classes = [m["class_id"] for m in meta]
        return {"reward": float(r.mean()), "heldout": float(h.mean()), "diversity": diversity(images, classes)}


def run_one(name: str, overrides: list[str], seed: int, budget_s: float, evaluator: Evaluator, workdir: Path, extra=(),
            max_epochs: int = 10_000) -> dict:
    from diffrl_fast.config_utils import load_config
    from diffrl_fast.train.config import DEFAULT_PRESET, Config, validate
    from diffrl_fast.train.trainer import Trainer

    cfg = validate(load_config(Config, DEFAULT_PRESET, [*overrides, f"seed={seed}", f"num_epochs={max_epochs}", *extra,
                                                        f"output_dir={workdir}", f"name={name}_s{seed}", "log.eval_samples=0",
                                                        "log.progress=false", "log.tensorboard=false", "log.grid_samples=0"]))
    trainer = Trainer(cfg, workdir / f"{name}_s{seed}", log_fn=lambda s: None)
    trainer.logger.print = lambda s: None
    points = [{"epoch": 0, "clock_s": 0.0, "samples": 0, **evaluator(trainer)}]
    clock = {"s": 0.0, "samples": 0}

    def on_epoch(tr, record):
        clock["s"] += record["sample_time_s"] + record["train_time_s"]
        clock["samples"] += record["samples"]
        points.append({"epoch": record["epoch"], "clock_s": round(clock["s"], 3), "samples": clock["samples"], **evaluator(tr)})

    wall = time.perf_counter()
    trainer.run(on_epoch=on_epoch, stop_flag=lambda: clock["s"] >= budget_s)  # checked between epochs
    return {"points": points, "wall_s": round(time.perf_counter() - wall, 1), "overrides": overrides, "seed": seed,
            "commit": _commit()}


def _commit() -> str:
    from benchmarks.common import machine_info

    return machine_info("cpu")["commit"]


def within_budget(run: dict, budget_s: float):
    """The run's points up to the first at or past the budget, or None when the run stops short of it."""
    for i, p in enumerate(run["points"]):
        if p["clock_s"] >= budget_s:
            return {**run, "points": run["points"][:i + 1]}
    return None


def reusable(path: Path, budget_s: float) -> dict:
    """{(name, overrides, seed): run} of an earlier JSON's runs that cover the budget, cut to it."""
    if path is None or not path.is_file():
        return {}
    data = json.loads(path.read_text())
    commit = data.get("machine", {}).get("commit", "?")
    runs = data["runs"] if "runs" in data else data  # a finished JSON, or the .partial.json a cut-short run leaves
    out = {}
    for name, rs in runs.items():
        for r in rs:
            cut = within_budget({"commit": commit, **r}, budget_s)
            if cut is not None:
                out[(name, tuple(r["overrides"]), r["seed"])] = cut
    return out


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Threshold from the baseline, then time and samples to it, speed-ups and guards per contender."""
    base_runs = runs[BASELINE]
    n_points = min(len(r["points"]) for r in base_runs)
    curve = [statistics.mean(r["points"][i]["reward"] for r in base_runs) for i in range(n_points)]
    start, best = curve[0], max(curve)
    threshold = start + THRESHOLD_FRACTION * (best - start)
    table = {}
    for name, rs in runs.items():
        reached = []
        for r in rs:
            hit = next((p for p in r["points"] if p["epoch"] > 0 and p["reward"] >= threshold), None)
            reached.append(hit)
        times = [h["clock_s"] for h in reached if h is not None]
        table[name] = {
            "reached": sum(h is not None for h in reached), "seeds": len(rs),
            "time_s": [None if h is None else h["clock_s"] for h in reached],
            "samples": [None if h is None else h["samples"] for h in reached],
            "median_time_s": statistics.median(times) if times else None,
            "heldout_at_threshold": [None if h is None else h["heldout"] for h in reached],
            "diversity_at_threshold": [None if h is None else h["diversity"] for h in reached],
            "final_reward": [r["points"][-1]["reward"] for r in rs],
            "overrides": rs[0]["overrides"],
        }
    base_t = table[BASELINE]["median_time_s"]
    for row in table.values():
        row["speedup"] = (base_t / row["median_time_s"]) if base_t and row["median_time_s"] and row["reached"] == row["seeds"] else None
    return {"threshold": threshold, "baseline_start": start, "baseline_best": best, "table": table}


def _fmt(values, spec="{:.1f}"):
    vals = [v for v in values if v is not None]
    if not vals:
        return "not reached"
    s = spec.format(statistics.mean(vals)) + (f" ± {spec.format(statistics.stdev(vals))}" if len(vals) > 1 else "")
    return s + ("" if len(vals) == len(values) else f" ({len(vals)}/{len(values)} seeds)")


def write_md(summary: dict, meta: dict, path: Path) -> None:
    lines = ["# Time to reward on the digits world", "",
             f"Machine: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}.",
             f"Budget: {meta['budget_s']:.0f} s of training (sampling + updates) per run, seeds {meta['seeds']}, {meta['eval_samples']} "
             "fixed-seed eval samples per epoch (off the clock). Threshold: 75% of the way from the baseline's reward before training "
             f"({summary['baseline_start']:.3f}) to the best level of its seed-mean curve ({summary['baseline_best']:.3f}): "
             f"**{summary['threshold']:.3f}**.", "",
             "| contender | seeds reaching | time to threshold (s) | samples to threshold | speed-up vs ddpo_is | "
             "held-out reward at threshold | diversity at threshold | final reward | settings |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in summary["table"].items():
        sp = "—" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        lines.append(f"| {name} | {row['reached']}/{row['seeds']} | {_fmt(row['time_s'])} | {_fmt(row['samples'], '{:.0f}')} | {sp} | "
                     f"{_fmt(row['heldout_at_threshold'], '{:.3f}')} | {_fmt(row['diversity_at_threshold'], '{:.4f}')} | "
                     f"{_fmt(row['final_reward'], '{:.3f}')} | `{' '.join(row['overrides'])}` |")
    lines += ["", "(mean ± std over the seeds that reached the threshold; speed-up = the baseline's median time over the "
              "contender's, only when every seed reached it)", "", f"![eval reward against training time]({path.stem}.png)", ""]
    reading = path.with_name(f"{path.stem}_reading.md")  # the hand-written analysis of the committed figures
    if reading.is_file():
        lines += [reading.read_text()]
    path.write_text("\n".join(lines))


def plot(runs: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, rs in runs.items():
        n = min(len(r["points"]) for r in rs)
        t = [statistics.mean(r["points"][i]["clock_s"] for r in rs) for i in range(n)]
        ys = [[r["points"][i]["reward"] for r in rs] for i in range(n)]
        mean = [statistics.mean(y) for y in ys]
        lo = [min(y) for y in ys]
        hi = [max(y) for y in ys]
        line, = ax.plot(t, mean, marker=".", label=name, lw=2 if name == BASELINE else 1)
        ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.15)
    ax.axhline(summary["threshold"], color="k", ls="--", lw=1, label="threshold")
    ax.set_xlabel("training wall time (s, evaluation excluded)")
    ax.set_ylabel("eval reward (digit_confidence)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="diffrl-fast bench time-to-reward", description=__doc__.split("\n\n")[0])
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated names (the baseline is always run)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget-s", type=float, default=120.0, help="seconds of training (sampling + updates) per run")
    ap.add_argument("--reuse", type=Path, default=None, help="an earlier time_to_reward JSON whose covering runs are reused")
    ap.add_argument("--stem", default="time_to_reward", help="name of the output files")
    ap.add_argument("--eval-samples", type=int, default=128)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="a tiny configuration that only checks the benchmark runs (CI)")
    args = ap.parse_args(argv)
    names = [BASELINE] + [n for n in args.contenders.split(",") if n and n != BASELINE]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        print(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = []
    if args.smoke:
        extra = ["sample.num_steps=4", "sample.batch_size=8", "sample.num_batches_per_epoch=1", "train.batch_size=8",
                 "grpo.group_size=4", "nft.group_size=4", "awm.group_size=4", "awm.train_timesteps=2"]
    evaluator = Evaluator(args.eval_samples)
    runs = {}
    stem = args.stem + ("_smoke" if args.smoke else "")
    reuse = reusable(args.reuse, args.budget_s) if not args.smoke else {}
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / f"{stem}.partial.json"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for name in names:
            for seed in seeds:
                r = reuse.get((name, tuple(CONTENDERS[name]), seed))
                if r is None:
                    r = run_one(name, CONTENDERS[name], seed, args.budget_s, evaluator, workdir, extra)
                else:
                    print(f"{name:>18} seed {seed}: reused from commit {r['commit']}", flush=True)
                runs.setdefault(name, []).append(r)
                partial.write_text(json.dumps(runs) + "\n")  # what a cut-short run leaves behind
                last = r["points"][-1]
                print(f"{name:>18} seed {seed}: reward {r['points'][0]['reward']:+.3f} -> {last['reward']:+.3f} "
                      f"in {last['clock_s']:.0f} s of training ({r['wall_s']:.0f} s wall)", flush=True)
    summary = summarize(runs)
    meta = machine_info("cpu")
    meta.update(budget_s=args.budget_s, seeds=seeds, eval_samples=args.eval_samples, smoke=args.smoke)
    partial.unlink(missing_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"machine": meta, "summary": summary, "runs": runs}, indent=1) + "\n")
    write_md(summary, meta, args.out / f"{stem}.md")
    plot(runs, summary, args.out / f"{stem}.png")
    for name, row in summary["table"].items():
        print(f"{name:>18}: threshold reached by {row['reached']}/{row['seeds']} seeds, median {row['median_time_s']} s, "
              f"speed-up {row['speedup']}", flush=True)
    print(f"wrote {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
