"""Over-optimisation on purpose: does the guard notice a run that hacks its reward, stop near the held-out peak and
keep the right checkpoint, and does GRPO-Guard hold the held-out reward longer?

The run that hacks: Flow-GRPO on the flow-digits world (configs/flow_digits.yaml) optimising

    r(x, c) = digit_layout(x, c) + w * brightness(x),     brightness(x) = mean pixel value in [0, 1]

(w = ``--weight``). The layout term is what the held-out classifier (digit_layout_heldout, the guard's default on
this world) also rewards; the brightness term is a hack the policy can always push further: bolder, blurrier strokes
and a lighter background raise it while the digits become harder to read (images brightening is one of the
over-optimisation failures users report, DiffusionNFT issue #6). Three runs of the same seed and settings:

- ``watch``: guard.stop=false, the whole curve: where the held-out reward peaks (the peak: its best evaluation);
- ``stop``: the guard as shipped (guard.stop=true): the epoch it stops at, checkpoints/best and the last checkpoint;
  its evaluations are those of ``watch`` up to the stop (same seed; the JSON records whether they are identical);
- ``grpo_guard``: ``grpo.guard=true`` (GRPO-Guard's ratio normalisation and step reweighting), guard.stop=false:
  where its held-out reward peaks, and where the stop rule, replayed on its evaluations, would stop it.

Targets (issue: reward hacking): the stop comes within 2 evaluations after the peak; the kept checkpoint's held-out
reward is within the peak evaluation's standard error of the peak.

Run: ``diffrl-fast experiment overoptimisation [--epochs N] [--weight W] [--seed S] [--guard-samples N]`` (about 15
minutes on 2 CPU cores at the defaults); writes benchmarks/results/overoptimisation.{json,md,png} and the grids
overoptimisation_grids.png (the base model, the best checkpoint and the checkpoint at the stop on the guard's fixed
prompts and seeds). ``overoptimisation_reading.md``, where present, is appended to the .md. ``--smoke``: a tiny
configuration that only checks the script runs (CI).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine_info, reading_lines  # noqa: E402

RUNS = {"watch": ["guard.stop=false"], "stop": ["guard.stop=true"], "grpo_guard": ["guard.stop=false", "grpo.guard=true"]}
LABELS = {"watch": "Flow-GRPO", "stop": "Flow-GRPO, guard.stop=true", "grpo_guard": "Flow-GRPO + GRPO-Guard"}
SMOKE = ["sample.num_steps=4", "sample.batch_size=8", "sample.num_batches_per_epoch=1", "train.batch_size=8",
         "grpo.group_size=4", "guard.samples=8", "guard.samples_per_prompt=2"]
RECORD_KEYS = ("epoch", "reward_mean", "reward_digit_layout", "reward_brightness", "guard_heldout", "guard_heldout_se",
               "guard_reward", "guard_diversity", "guard_drift", "denoiser_passes")


def overrides(args) -> list[str]:
    return ["algo=grpo", f"seed={args.seed}", f"num_epochs={args.epochs}",
            f"reward.name=[{{name: digit_layout, weight: 1.0}}, {{name: brightness, weight: {args.weight:g}}}]",
            *([f"train.learning_rate={args.lr:g}"] if args.lr else []), f"guard.samples={args.guard_samples}",
            "log.eval_samples=0", "log.grid_samples=0", "log.progress=false", "log.tensorboard=false",
            *(SMOKE if args.smoke else [])]


def run(name: str, over: list[str], workdir: Path) -> dict:
    """One training run in this process; its per-epoch records (RECORD_KEYS), the guard's state and wall time."""
    from diffrl_fast.config_utils import load_config
    from diffrl_fast.train.config import PRESETS, Config, validate
    from diffrl_fast.train.trainer import Trainer

    cfg = validate(load_config(Config, PRESETS / "flow_digits.yaml", [*over, *RUNS[name], f"output_dir={workdir}", f"name={name}"]))
    t0 = time.perf_counter()
    Trainer(cfg, workdir / name, log_fn=lambda s: None).run()
    recs = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    guard = json.loads((workdir / name / "guard.json").read_text())
    return {"records": [{k: r[k] for k in RECORD_KEYS if k in r} for r in recs], "guard": guard,
            "wall_s": round(time.perf_counter() - t0, 1), "overrides": [*over, *RUNS[name]]}


def replay_stop(history: list[dict], cfg_guard) -> tuple[int | None, str | None]:
    """The epoch at which the guard's stop rule (``guard.decide_stats``, the trainer's own) stops on these logged
    evaluations, and why; (None, None) when it never does."""
    from diffrl_fast.train.guard import GuardState, decide_stats

    state = GuardState()
    for h in history:
        _, stop = decide_stats(state, h["epoch"], h.get("guard_heldout"), h.get("guard_heldout_se"), h.get("guard_diversity", float("nan")),
                               tolerance=cfg_guard.tolerance, patience=cfg_guard.patience, min_diversity=cfg_guard.min_diversity,
                               from_start=cfg_guard.stop_from_start)
        if stop:
            return h["epoch"], state.stopped
    return None, None


def findings(runs: dict, cfg_guard) -> dict:
    """Peak, stop, kept checkpoint and GRPO-Guard's peak and replayed stop."""
    watch, stop, gg = runs["watch"]["guard"]["history"], runs["stop"]["guard"], runs["grpo_guard"]["guard"]["history"]
    peak = max(watch, key=lambda h: h["guard_heldout"])
    every = cfg_guard.every
    out = {"peak_epoch": peak["epoch"], "peak_heldout": peak["guard_heldout"], "peak_se": peak.get("guard_heldout_se"),
           "stop_epoch": stop.get("stopped_epoch"), "stop_reason": stop.get("stopped"),
           "kept_epoch": stop.get("best_epoch"), "kept_heldout": stop.get("best")}
    by_epoch = {h["epoch"]: h for h in watch}
    out["prefix_identical"] = all(by_epoch.get(h["epoch"], {}).get("guard_heldout") == h["guard_heldout"] for h in stop["history"])
    if out["stop_epoch"] is not None:
        out["evaluations_after_peak"] = (out["stop_epoch"] - out["peak_epoch"]) // every
        out["stop_within_2_evaluations"] = 0 < out["evaluations_after_peak"] <= 2
    if out["kept_heldout"] is not None and out["peak_se"] is not None:
        out["kept_gap"] = out["peak_heldout"] - out["kept_heldout"]
        out["kept_within_se"] = abs(out["kept_gap"]) <= out["peak_se"]
    out["watch_replayed_stop_epoch"] = replay_stop(watch, cfg_guard)[0]
    gpeak = max(gg, key=lambda h: h["guard_heldout"])
    out.update(guard_peak_epoch=gpeak["epoch"], guard_peak_heldout=gpeak["guard_heldout"],
               guard_replayed_stop_epoch=replay_stop(gg, cfg_guard)[0])
    for name in RUNS:
        last = runs[name]["records"][-1]
        out[f"{name}_last_epoch"] = last["epoch"]
        out[f"{name}_last_heldout"] = runs[name]["guard"]["history"][-1]["guard_heldout"]
    return out


def grids(runs_dir: Path, cfg, path: Path) -> None:
    """One figure: the base model, the stop run's best checkpoint and its last checkpoint (at the stop), each on the
    guard's fixed prompts and seeds (every guard evaluation's batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from diffrl_fast.diffusion.rollout import sample_trajectories
    from diffrl_fast.models import load_model
    from diffrl_fast.train.config import prompt_file_lines
    from diffrl_fast.train.guard import Guard
    from diffrl_fast.train.runs import load_run

    prompts, seeds = Guard(cfg.guard, cfg.reward).batch(prompt_file_lines(cfg.prompt_file))
    s = cfg.sample
    stop = json.loads((runs_dir / "stop" / "guard.json").read_text())
    panels = [("base model (epoch 0)", load_model(cfg.model.path)),
              (f"best held-out (epoch {stop['best_epoch']})", load_run(runs_dir / "stop", checkpoint="best")[0]),
              (f"at the stop (epoch {stop.get('stopped_epoch') or 'last'})", load_run(runs_dir / "stop")[0])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 5.2))
    for ax, (title, model) in zip(axes, panels):
        with torch.no_grad():
            traj = sample_trajectories(model, prompts, num_steps=s.num_steps, guidance_scale=s.guidance_scale, eta=s.eta,
                                       noise_level=s.noise_level, sde_type=s.sde_type, seeds=seeds)
        imgs = traj.images.float().clamp(0, 1)
        k = cfg.guard.samples_per_prompt
        rows = [torch.cat(list(imgs[i:i + k]), dim=-1) for i in range(0, len(imgs), k)]
        grid = torch.cat(rows, dim=-2)[0]
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{title}\nmean brightness {float(imgs.mean()):.3f}", fontsize=9)
        ax.set_yticks([(i + 0.5) * imgs.shape[-2] for i in range(len(rows))], [prompts[i] for i in range(0, len(imgs), k)], fontsize=7)
        ax.set_xticks([])
    fig.suptitle("the guard's fixed prompts (rows) and seeds (columns)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(runs: dict, found: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    colors = {"watch": "tab:blue", "grpo_guard": "tab:orange"}
    for name in ("watch", "grpo_guard"):
        recs, hist = runs[name]["records"], runs[name]["guard"]["history"]
        ep = [r["epoch"] for r in recs]
        axes[0].plot(ep, [r["reward_mean"] for r in recs], color=colors[name], alpha=0.35, lw=1)
        axes[0].plot([h["epoch"] for h in hist], [h["guard_reward"] for h in hist], color=colors[name], label=LABELS[name])
        he = [h["epoch"] for h in hist]
        m = [h["guard_heldout"] for h in hist]
        se = [h.get("guard_heldout_se", 0.0) for h in hist]
        axes[1].plot(he, m, color=colors[name], label=LABELS[name])
        axes[1].fill_between(he, [a - b for a, b in zip(m, se)], [a + b for a, b in zip(m, se)], color=colors[name], alpha=0.15)
        for ax, key in ((axes[2], "guard_diversity"), (axes[3], "guard_drift")):
            pts = [(h["epoch"], h[key]) for h in hist if key in h]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[name], label=LABELS[name])
    titles = ["training reward (line: guard's fixed batch;\nfaint: epoch mean)", "held-out reward ± its standard error",
              "within-prompt diversity", "drift: mean step KL to the base model"]
    for ax, t in zip(axes, titles):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("epoch")
        ax.axvline(found["peak_epoch"], color="black", ls=":", lw=1)
        if found.get("stop_epoch") is not None:
            ax.axvline(found["stop_epoch"], color="tab:red", ls="--", lw=1)
        ax.grid(alpha=0.3)
    axes[1].plot([], [], color="black", ls=":", label=f"held-out peak (epoch {found['peak_epoch']})")
    axes[1].plot([], [], color="tab:red", ls="--", label=f"guard stop (epoch {found.get('stop_epoch')})")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _f(v, spec="{:+.3f}"):
    return "—" if v is None else spec.format(v)


def write_md(data: dict, path: Path) -> None:
    m, f, s, runs = data["machine"], data["findings"], data["settings"], data["runs"]
    yes = lambda b: "**met**" if b else "**missed**"  # noqa: E731
    lines = ["# Over-optimisation on purpose: the guard and GRPO-Guard", "",
             f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, commit {m['commit']}, {m['date']}. "
             f"Regenerate: `diffrl-fast experiment overoptimisation --epochs {s['epochs']} --weight {s['weight']:g} --seed {s['seed']} "
             f"--guard-samples {s['guard_samples']}"
             + (f" --lr {s['lr']:g}" if s.get("lr") else "") + "`.", "",
             f"Training reward: digit_layout + {s['weight']:g} x brightness (mean pixel value), Flow-GRPO on the flow-digits "
             f"world (configs/flow_digits.yaml), seed {s['seed']}, up to {s['epochs']} epochs. Held-out reward: the guard's "
             f"digit_layout_heldout on its fixed batch of {s['guard_samples']} samples ({s['guard_samples_per_prompt']} seeds of "
             f"{s['guard_samples'] // s['guard_samples_per_prompt']} prompts), evaluated every {s['guard_every']} epoch(s); stop "
             f"rule: {s['guard_patience']} evaluations in a row more than {s['guard_tolerance']:g} standard errors below the best.", "",
             "| | target | measured |", "| --- | --- | --- |",
             f"| held-out peak (run without a stop) | — | epoch {f['peak_epoch']}: {_f(f['peak_heldout'])} ± {_f(f['peak_se'], '{:.3f}')} |",
             f"| guard stop | within 2 evaluations after the peak | epoch {f.get('stop_epoch')}: "
             + (f"{f['evaluations_after_peak']} evaluation(s) after the peak, {yes(f['stop_within_2_evaluations'])}" if f.get("stop_epoch") is not None
                else "no stop, **missed**") + " |",
             f"| kept checkpoint (checkpoints/best) | within the peak's standard error | epoch {f.get('kept_epoch')}: {_f(f.get('kept_heldout'))}, "
             + (f"{_f(f['kept_gap'], '{:.3f}')} below the peak, {yes(f['kept_within_se'])}" if "kept_gap" in f else "—") + " |",
             f"| the stopped run's evaluations equal the watched run's | — | {'yes' if f['prefix_identical'] else 'no (see the reading)'} |",
             f"| GRPO-Guard: held-out peak | later than Flow-GRPO's? | epoch {f['guard_peak_epoch']}: {_f(f['guard_peak_heldout'])} |",
             f"| GRPO-Guard: where the stop rule would stop it | later than Flow-GRPO's? | "
             + (f"epoch {f['guard_replayed_stop_epoch']}" if f["guard_replayed_stop_epoch"] is not None else f"never, in {f['grpo_guard_last_epoch']} epochs")
             + f" (Flow-GRPO's, replayed: epoch {f['watch_replayed_stop_epoch']}) |", "",
             "| run | epochs | held-out: start -> peak -> last | brightness: first -> last epoch | digit_layout: first -> last epoch | wall (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in runs.items():
        hist, recs = r["guard"]["history"], r["records"]
        peak = max(h["guard_heldout"] for h in hist)
        lines.append(f"| {LABELS[name]} | {recs[-1]['epoch']} | {hist[0]['guard_heldout']:+.3f} -> {peak:+.3f} -> {hist[-1]['guard_heldout']:+.3f} | "
                     f"{_f(recs[0].get('reward_brightness'))} -> {_f(recs[-1].get('reward_brightness'))} | "
                     f"{_f(recs[0].get('reward_digit_layout'))} -> {_f(recs[-1].get('reward_digit_layout'))} | {r['wall_s']:.0f} |")
    lines += ["", "(brightness and digit_layout: the training reward's components, unweighted, as epoch means of the rollouts; "
              "held-out: the guard's evaluations, epoch 0 before training)", "", "![curves](overoptimisation.png)", "", "![grids](overoptimisation_grids.png)", ""]
    lines += reading_lines(path)
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="diffrl-fast experiment overoptimisation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--weight", type=float, default=100.0, help="w, the brightness term's weight in the training reward")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guard-samples", type=int, default=128,
                    help="the guard's fixed batch (guard.samples; default 128: at the default 32 the held-out reward's standard "
                         "error on this world, about 0.45, is a third of the whole fall, and 2 of them hide it)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="a tiny configuration that only checks the script runs (CI)")
    args = ap.parse_args(argv)
    if args.epochs < 2 or args.weight < 0:
        print("--epochs must be >= 2 and --weight >= 0", file=sys.stderr)
        return 2
    from diffrl_fast.config_utils import load_config
    from diffrl_fast.train.config import PRESETS, Config, validate

    over = overrides(args)
    cfg = validate(load_config(Config, PRESETS / "flow_digits.yaml", over))
    stem = "overoptimisation" + ("_smoke" if args.smoke else "")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        runs = {}
        for name in RUNS:
            runs[name] = run(name, over, workdir)
            h = runs[name]["guard"]
            print(f"{name:>10}: {len(runs[name]['records'])} epochs, best held-out {h['best']:+.3f} at epoch {h['best_epoch']}, "
                  f"stopped at {h.get('stopped_epoch')} ({runs[name]['wall_s']:.0f} s)", flush=True)
        found = findings(runs, cfg.guard)
        grids(workdir, cfg, args.out / f"{stem}_grids.png")
    g = cfg.guard
    settings = dict(epochs=args.epochs, weight=args.weight, lr=args.lr, seed=args.seed, smoke=args.smoke, guard_samples=g.samples,
                    guard_samples_per_prompt=g.samples_per_prompt, guard_every=g.every, guard_patience=g.patience,
                    guard_tolerance=g.tolerance, learning_rate=cfg.train.learning_rate)
    data = {"machine": machine_info("cpu"), "settings": settings, "findings": found, "runs": runs}
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    plot(runs, found, args.out / f"{stem}.png")
    write_md(data, args.out / f"{stem}.md")
    print(json.dumps(found, indent=1))
    print(f"wrote {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
