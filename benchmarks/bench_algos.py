"""The algorithms on the digits world: one results table, same sample budget and seeds for all.

Part 1 (``algos``): every algorithm fine-tunes the pretrained digits world for digit_confidence (the
classifier's log-probability of the prompted digit) with the same budget (epochs x samples per epoch) and
seeds 0, 1, 2. Reported: the reward over the same 128 fixed-seed samples before and after (mean +- std
over seeds), wall time and samples used; training-reward curves in algos_curves.png.

Part 2 (``overopt``): the over-optimisation study of the TDPO-R paper in miniature. ddpo_is, tdpo and
tdpo_r optimise jpeg_compressibility while digit_confidence is tracked as a held-out reward on the same
samples; TDPO's critic is the reference's, on the digit classifier's embedding of x_t. For each run we find the first epoch at which the optimised reward reaches a common level (the
lowest final level any run reached) and report how much of the held-out reward is left there.

Every run starts from the digits preset (configs/digits.yaml, including its per-algorithm ``by_algo``
entries) and otherwise keeps each algorithm's reference conventions and values (docs/algorithms.md).

Run: ``diffrl-fast experiment algos`` (both parts, ~35 min on 2 CPU cores) or ``--part algos|overopt``.
Writes benchmarks/results/algos.{json,md}, algos_curves.png and algos_overopt.png.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine_info, reading_lines  # noqa: E402

# Every run starts from the digits preset (configs/digits.yaml, its by_algo entries included) and keeps each
# algorithm's reference conventions and values otherwise (docs/algorithms.md).
ALGOS = ("ddpo_is", "ddpo_sf", "dpok", "d3po", "dense", "tdpo", "tdpo_r", "grpo")
BUDGET = ["num_epochs=5", "sample.batch_size=64", "sample.num_batches_per_epoch=2", "train.timestep_fraction=0.5",
          "log.eval_samples=128"]
SEEDS = (0, 1, 2)
OVEROPT_ALGOS = ("ddpo_is", "tdpo", "tdpo_r")
# TDPO's reference critic reads an image encoder's embedding of x_t; JPEG size has none, so the critic uses the
# digits world's only image encoder, the digit classifier's (the held-out reward's backbone: a confound, stated
# in algos.md, as in the paper, whose critic uses the CLIP of its aesthetic reward)
OVEROPT = ["reward.name=jpeg_compressibility", "reward.track=[digit_confidence]", "num_epochs=8",
           "sample.batch_size=64", "sample.num_batches_per_epoch=2", "train.timestep_fraction=0.5",
           "tdpo.critic_encoder=digit_confidence"]


def _same_settings(run_dir: Path, cfg) -> bool:
    """Whether ``run_dir`` holds a finished run of ``cfg`` (name and output folder aside)."""
    import dataclasses

    from diffrl_fast.config_utils import load_config
    from diffrl_fast.train.config import Config

    if not (run_dir / "summary.json").exists() or not (run_dir / "config.yaml").exists():
        return False
    old = dataclasses.asdict(load_config(Config, run_dir / "config.yaml", []))
    new = dataclasses.asdict(cfg)
    same = all(old[k] == new[k] for k in new if k not in ("name", "output_dir", "log"))
    return same and old["log"]["eval_samples"] == new["log"]["eval_samples"]


def run(overrides: list[str], workdir: Path, name: str) -> dict:
    """One training run (or, when ``workdir/name`` already holds a finished run of the same settings, its results)."""
    from diffrl_fast.config_utils import load_config
    from diffrl_fast.train.config import Config, validate
    from diffrl_fast.train.trainer import Trainer

    from diffrl_fast.train.config import DEFAULT_PRESET

    cfg = validate(load_config(Config, DEFAULT_PRESET, [*overrides, f"output_dir={workdir}", f"name={name}", "log.progress=false",
                                                        "log.tensorboard=false", "log.grid_samples=0"]))
    run_dir = workdir / name
    if _same_settings(run_dir, cfg):
        summary = json.loads((run_dir / "summary.json").read_text())
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run or other settings: start over
        trainer = Trainer(cfg, run_dir, log_fn=lambda s: None)
        trainer.logger.print = lambda s: None
        summary = trainer.run()
    from diffrl_fast.train.outputs import paired_change

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    import yaml

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    settings = {"learning_rate": resolved["train"]["learning_rate"], "step_every": resolved["train"]["optimizer_step_every"],
                "steps_per_epoch": records[0].get("optimizer_steps")}
    evals = [run_dir / "eval_before.json", run_dir / "eval_after.json"]
    change_se = paired_change(*(json.loads(e.read_text()) for e in evals))[1] if all(e.exists() for e in evals) else None
    return {"before": summary["before"], "after": summary["after"], "change_se": change_se, "wall_s": summary["wall_s"],
            "train_wall_s": summary["training_wall_s"], "samples": summary["samples"], "records": records, "settings": settings}


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.3f}"
    return f"{statistics.mean(values):+.3f} ± {statistics.stdev(values):.3f}"


def part_algos(algos, seeds, budget, workdir) -> dict:
    out = {}
    for algo in algos:
        for seed in seeds:
            r = run([f"algo={algo}", f"seed={seed}", *budget], workdir, f"{algo}_s{seed}")
            out.setdefault(algo, []).append(r)
            print(f"{algo:>8} seed {seed}: {r['before']['mean']:+.3f} -> {r['after']['mean']:+.3f} "
                  f"({r['wall_s']:.0f} s, {r['samples']} samples)", flush=True)
    return out


def part_overopt(algos, seeds, workdir) -> dict:
    runs = {}
    for algo in algos:
        for seed in seeds:
            r = run([f"algo={algo}", f"seed={seed}", *OVEROPT, "log.eval_samples=0"], workdir, f"overopt_{algo}_s{seed}")
            runs.setdefault(algo, []).append(r)
            curve = [(round(x["reward_mean"], 3), round(x["track_digit_confidence"], 3)) for x in r["records"]]
            print(f"overopt {algo:>7} seed {seed}: (jpeg, digit_confidence) per epoch {curve}", flush=True)
    # the common level: every run's optimised reward reaches it (the lowest best level of any run)
    level = min(max(x["reward_mean"] for x in r["records"]) for rs in runs.values() for r in rs)
    table = {}
    for algo, rs in runs.items():
        kept, epochs = [], []
        for r in rs:
            recs = r["records"]
            first = next(x for x in recs if x["reward_mean"] >= level)
            start = recs[0]["track_digit_confidence"]
            kept.append(first["track_digit_confidence"])
            epochs.append(first["epoch"])
        table[algo] = {"heldout_at_level": kept, "epoch_reached": epochs,
                       "heldout_start": [r["records"][0]["track_digit_confidence"] for r in rs]}
    return {"level": level, "table": table, "runs": {a: [r["records"] for r in rs] for a, rs in runs.items()}}


def plot_curves(results: dict, overopt: dict | None, out_dir: Path, stem: str = "algos") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if results:
        fig, axes = plt.subplots(2, 4, figsize=(13, 6), sharey=True)
        for ax, (algo, runs) in zip(axes.flat, results.items()):
            for i, r in enumerate(runs):
                ax.plot([x["epoch"] for x in r["records"]], [x["reward_mean"] for x in r["records"]], marker=".", label=f"seed {i}")
            ax.set_title(algo, fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
        axes[0][0].set_ylabel("training reward (digit_confidence)")
        axes[1][0].set_ylabel("training reward (digit_confidence)")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}_curves.png", dpi=100)
        plt.close(fig)
    if overopt:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for algo, runs in overopt["runs"].items():
            for i, recs in enumerate(runs):
                ax.plot([x["reward_mean"] for x in recs], [x["track_digit_confidence"] for x in recs], marker=".",
                        color={"ddpo_is": "C0", "tdpo": "C1", "tdpo_r": "C2"}[algo], label=algo if i == 0 else None, alpha=0.8)
        ax.axvline(overopt["level"], color="k", ls="--", lw=1, label="common level")
        ax.set_xlabel("optimised reward: jpeg_compressibility (-kB)")
        ax.set_ylabel("held-out reward: digit_confidence")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}_overopt.png", dpi=100)
        plt.close(fig)


def write_markdown(results: dict, overopt: dict | None, meta: dict, out: Path, budget: list[str], seeds) -> None:
    lines = ["# Algorithms on the digits world", "",
             f"Machine: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}.",
             f"Budget per run: {' '.join(budget)} (seeds {', '.join(map(str, seeds))}); reward digit_confidence; "
             "the same fixed-seed samples (log.eval_samples) scored before and after. Settings: the digits preset "
             "(configs/digits.yaml, with its per-algorithm by_algo entries and their measured reasons) over each algorithm's "
             "reference conventions and values (docs/algorithms.md).", ""]
    if results:
        lines += ["| algorithm | reward before | reward after | change | paired SE of one run's change | learning rate | optimiser steps per epoch | wall time per run (s) | samples per run |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for algo, runs in results.items():
            b = [r["before"]["mean"] for r in runs]
            a = [r["after"]["mean"] for r in runs]
            d = [y - x for x, y in zip(b, a)]
            se = [r["change_se"] for r in runs if r.get("change_se") is not None]
            se_text = f"{min(se):.2f}-{max(se):.2f}" if se else "n/a"
            st = runs[0].get("settings", {})
            lines.append(f"| {algo} | {_ms(b)} | {_ms(a)} | {_ms(d)} | {se_text} | {st.get('learning_rate', 'n/a')} | "
                         f"{st.get('steps_per_epoch', 'n/a')} ({st.get('step_every', '')}) | "
                         f"{statistics.mean(r['wall_s'] for r in runs):.0f} | {runs[0]['samples']} |")
        ev = {a: [x["critic_explained_var"] for r in runs for x in r["records"] if "critic_explained_var" in x]
              for a, runs in results.items()}
        ev_text = "; ".join(f"{a} {min(v):+.3f} to {max(v):+.3f}" for a, v in ev.items() if v)
        lines += ["", "(mean ± standard deviation over seeds; the paired SE is std(after_i - before_i) / sqrt(n) over the "
                  "n eval samples of one run, its range over the seeds; wall time includes the before/after evaluations)",
                  *([f"", f"Out-of-sample explained variance of the TDPO critic's temporal rewards, per epoch over all runs: {ev_text}."]
                    if ev_text else []),
                  "", "![training reward curves](algos_curves.png)", ""]
    if overopt:
        lines += ["## Over-optimisation (TDPO-R paper, in miniature)", "",
                  f"Optimised reward: jpeg_compressibility; held-out: digit_confidence on the same samples. Common level of the "
                  f"optimised reward: {overopt['level']:+.3f} kB (the lowest best level any run reached).", "",
                  "| algorithm | held-out at epoch 1 | held-out when the optimised reward first reaches the level | epoch reached |",
                  "| --- | --- | --- | --- |"]
        for algo, row in overopt["table"].items():
            lines.append(f"| {algo} | {_ms(row['heldout_start'])} | {_ms(row['heldout_at_level'])} | {', '.join(map(str, row['epoch_reached']))} |")
        lines += ["", overopt_verdict(overopt["table"]), "",
                  "Confound (as in the TDPO-R paper, whose critic reads the CLIP embedding its aesthetic reward is built on): "
                  "the TDPO critic reads the digit classifier's embedding of x_t (tdpo.critic_encoder=digit_confidence), the "
                  "digits world's only image encoder, which is also the held-out reward's backbone.", "",
                  "![held-out vs optimised reward](algos_overopt.png)", ""]
    lines += reading_lines(out)
    out.write_text("\n".join(lines) + "\n")


def overopt_verdict(table: dict) -> str:
    """Whether TDPO-R mitigates over-optimisation against DDPO-IS: its held-out reward at the common optimised level
    is higher by more than two standard errors of the difference of the seed means (SE^2 = s_a^2/n_a + s_b^2/n_b)."""
    if "tdpo_r" not in table or "ddpo_is" not in table:
        return "Verdict: not measured (the study needs both ddpo_is and tdpo_r)."
    a, b = table["tdpo_r"]["heldout_at_level"], table["ddpo_is"]["heldout_at_level"]
    diff = statistics.mean(a) - statistics.mean(b)
    var = lambda v: statistics.variance(v) / len(v) if len(v) > 1 else float("nan")  # noqa: E731
    se = (var(a) + var(b)) ** 0.5
    if not se == se:  # one seed: no spread to judge by
        return f"Verdict: undecided from one seed (tdpo_r - ddpo_is held-out difference {diff:+.3f})."
    mitigates = diff > 2 * se
    return (f"Verdict: **TDPO-R {'mitigates' if mitigates else 'does not mitigate'} over-optimisation here**: at the common "
            f"level its held-out reward is {diff:+.3f} from DDPO-IS's (standard error of the difference {se:.3f}; "
            f"mitigation means more than +2 SE).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="diffrl-fast experiment algos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["all", "algos", "overopt"], default="all")
    ap.add_argument("--only", help="comma-separated algorithms (default: all)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 short epochs: a smoke run, not a measurement")
    ap.add_argument("--rewrite", action="store_true", help="rewrite the markdown and plots from the saved JSON; run nothing")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, help="keep the run folders here; finished runs with the same settings are reused "
                                                 "(resume an interrupted experiment); default: a temporary folder")
    args = ap.parse_args(argv)
    algos = args.only.split(",") if args.only else list(ALGOS)
    unknown = [a for a in algos if a not in ALGOS]
    if unknown:
        ap.error(f"unknown algorithms {unknown}; choose from {list(ALGOS)}")
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    budget = ["num_epochs=2", "sample.batch_size=8", "sample.num_batches_per_epoch=1", "sample.num_steps=4",
              "train.batch_size=4", "log.eval_samples=8"] if args.quick else BUDGET
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "algos_quick" if args.quick else "algos"
    path = args.out / f"{stem}.json"
    # each part updates its own key, so the two parts can be run (and re-run) separately
    data = json.loads(path.read_text()) if path.exists() else {}
    if args.rewrite:
        if not data:
            print(f"error: --rewrite needs {path}; run the experiment first", file=sys.stderr)
            return 2
        write_markdown(data.get("results", {}), data.get("overopt"), data["machine"], args.out / f"{stem}.md",
                       data.get("budget", budget), data.get("seeds", seeds))
        plot_curves(data.get("results", {}), data.get("overopt"), args.out, stem)
        print(f"wrote {args.out / (stem + '.md')}")
        return 0
    data["machine"] = machine_info("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        if args.part in ("all", "algos"):
            data.update(budget=budget, seeds=seeds, results=part_algos(algos, seeds, budget, work))
            data.pop("settings", None)
            path.write_text(json.dumps(data, indent=1) + "\n")
        if args.part in ("all", "overopt") and not args.quick:
            data["overopt"] = part_overopt([a for a in OVEROPT_ALGOS if a in algos], seeds, work)
            path.write_text(json.dumps(data, indent=1) + "\n")
    write_markdown(data.get("results", {}), data.get("overopt"), data["machine"], args.out / f"{stem}.md",
                   data.get("budget", budget), data.get("seeds", seeds))
    plot_curves(data.get("results", {}), data.get("overopt"), args.out, stem)
    print(f"wrote {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
