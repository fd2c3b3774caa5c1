"""Time to reward: how soon each method reaches a reward level, at what cost to the model, on either world.

Worlds (``--world``): ``digits`` (the digits world, digit_confidence; baseline DDPO-IS) and ``flow-digits`` (the
flow-digits world, digit_layout; baseline Flow-GRPO with flow_grpo's conventions). Every contender fine-tunes the
world's pretrained model from the world's preset (its by_algo entries, each algorithm's reference conventions
otherwise) plus its own overrides, for the same wall-clock budget of training (``--budget-s``: epochs continue
until the clock passes it, so a contender with cheap epochs gets more of them). After every epoch, off the clock:

- eval reward: the world's reward on ``--eval-samples`` fixed-seed samples (the same seeds for everyone, sampled
  as the contender evaluates: its log.eval_num_steps / log.eval_guidance_scale); on the flow world also the
  layout-correct rate;
- held-out reward: the same images scored by the held-out classifier (another seed and architecture), a guard
  against fooling only the training classifier; on the flow world also the reward on the held-out prompts
  (layouts never trained on);
- diversity: the mean pairwise L2 distance (per pixel, images in [0, 1]) between eval samples of the same class
  (digits) or prompt (flow world: 32 prompts spread evenly over the ordered training pool, each sampled 4 times).

Cost comes in two units: the run's own sampling + training time (the records' sample_time_s + train_time_s, so
evaluation, checkpointing and start-up are excluded), and denoiser passes (counted by the trainer: a forward of
one sample at one step = 1, its backward = 2, both guidance branches count), which do not depend on the machine.
The threshold is 75% of the way from the baseline's reward before training to the best level its seed-mean curve
reaches; time, passes and samples to the threshold are those of the first evaluation at or above it, per seed.
The guards are read at that evaluation.

``--budget-passes N`` gives every run a budget in denoiser passes instead of seconds (epochs continue until the
trainer's count passes it): the sweep's pick, the threshold and the curves against passes then no longer depend on
the machine's speed or on what else it runs; time to the threshold is still measured, and compares runs only where
they ran at one machine speed (runs reused from other sessions carry their own).

``--sweep``: the same tuning budget for every contender, the baseline included, fixed before running: 3 learning
rates (the contender's own x 1/3, 1, 3) on seed 0 each, the one with the best training reward over its last
three epochs kept (never the eval reward that is reported), then ``--seeds`` fresh at it; the table reports
only the fresh seeds. Sweep runs are evaluated only before their first and after their last epoch.

Run: ``diffrl-fast bench time-to-reward [--world W] [--contenders a,b] [--seeds 1,2,3] [--budget-s S | --budget-passes N]
[--sweep] [--reuse FILE]``; writes benchmarks/results/time_to_reward[_flow].{json,md,png} (``--stem`` renames them).
``--reuse`` takes runs of the same contender, settings and seed from earlier JSONs when they cover the budget
(each keeps the commit it ran at). ``--smoke`` runs a tiny configuration (CI).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine_info, reading_lines  # noqa: E402
from diffrl_fast.train.guard import within_prompt_diversity  # noqa: E402  (the guards' diversity, the same formula)

# name -> overrides on top of the digits preset. The baseline is DDPO-IS at ddpo-pytorch's settings as the
# preset adapts them to the digits world (docs/algorithms.md); the levers are named by what they add.
DIGITS_CONTENDERS = {
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
    "dgpo": ["algo=dgpo"],
}
# name -> overrides on top of the flow-digits preset (Flow-GRPO's conventions: 10 SDE steps at noise level 0.7,
# global-std group advantages, its KL form; g = 1, the world's model fact)
FLOW_CONTENDERS = {
    "grpo": ["algo=grpo"],
    # evaluated on Flow-GRPO's SDE like every other contender (the base model scores -2.30 under CPS, -2.86 under it)
    "grpo+cps": ["algo=grpo", "sample.sde_type=cps", "log.eval_sde_type=sde"],
    "grpo+window2": ["algo=grpo", "train.timestep_window=fixed", "train.window_size=2"],
    "grpo+sliding4": ["algo=grpo", "train.timestep_window=sliding", "train.window_size=4", "train.window_stride=2"],
    "nft": ["algo=nft"],
    "awm": ["algo=awm"],
    "dgpo": ["algo=dgpo"],
    "ddpo_is": ["algo=ddpo_is"],
    # BranchGRPO's tree rollouts: the 8 samples of a prompt are one binary tree, split at steps 0, 2 and 4 (its FLUX
    # script splits 20 steps at 0, 3, 6, 9); "mix": ODE after a 4-step SDE window holding three splits in a row
    "grpo+tree": ["algo=grpo", "sample.tree_branch_steps=[0, 2, 4]"],
    # BranchGRPO's width pruning (mode 2 at its 0.5) where it acts: this tree's last split is step 4, and Flow-GRPO's
    # floor int(0.99 x 10) = 9 trains steps 0-8, so steps 5-8 are pruned to half of their transitions
    "grpo+tree+prune": ["algo=grpo", "sample.tree_branch_steps=[0, 2, 4]", "sample.tree_prune_width=2"],
    "grpo+tree+mix": ["algo=grpo", "sample.tree_branch_steps=[0, 1, 2]", "train.timestep_window=fixed", "train.window_size=4"],
    # MixGRPO-Flash's tail on top: DPM-Solver++(2M) over int(7 x 0.6) = 4 noise levels after the window (3 passes,
    # not 6; the reference's 0.4 of 25 steps leaves 7 passes, 0.4 of our 10 would leave a single one)
    "grpo+tree+mix+flash": ["algo=grpo", "sample.tree_branch_steps=[0, 1, 2]", "train.timestep_window=fixed", "train.window_size=4",
                            "sample.post_window_solver=dpmsolver++", "sample.post_window_compress=0.6"],
    # BranchGRPO's width pruning, mode 2 at its 0.5, on the tree above. It prunes nothing here: with Flow-GRPO's floor
    # int(0.99 x 4) = 3 the window trains steps 0-2, none after the last split (2); its run in the JSON therefore
    # trained what grpo+tree+mix+flash trains (a second sweep of it; time_to_reward_flow_reading.md)
    "grpo+tree+mix+flash+prune": ["algo=grpo", "sample.tree_branch_steps=[0, 1, 2]", "train.timestep_window=fixed",
                                  "train.window_size=4", "sample.post_window_solver=dpmsolver++", "sample.post_window_compress=0.6",
                                  "sample.tree_prune_width=2"],
    # the same tree in BranchGRPO's own objective: its training loss is the clipped ratio alone, no KL term
    # (fastvideo/train_branchgrpo_flux.py), so no reference pass per trained transition (Flow-GRPO's beta 0.04 adds one)
    "grpo+tree+mix+flash+nokl": ["algo=grpo", "sample.tree_branch_steps=[0, 1, 2]", "train.timestep_window=fixed", "train.window_size=4",
                                 "sample.post_window_solver=dpmsolver++", "sample.post_window_compress=0.6", "grpo.beta=0"],
    # DGPO at a third of its passes per sample: 2 trained timesteps of its 0..4 instead of the reference's 4 (5
    # passes each: the policy's forward and backward, the base model's and the EMA copy's forwards), and the rollout,
    # of which DGPO trains on x_T alone, solved by DPM-Solver++(2M) (the reference's rollout solver) over int(11 x 0.4)
    # = 4 noise levels: 3 passes instead of 10. 13 passes per sample against DGPO's 30 and Flow-GRPO's 46
    "dgpo+2t+dpm3": ["algo=dgpo", "dgpo.train_timesteps=2", "sample.post_window_solver=dpmsolver++", "sample.post_window_compress=0.4"],
    # the same with 10x the reference's KL to the base model (0.2): screened to keep within-prompt diversity
    # (time_to_reward_flow_screen.md)
    "dgpo+2t+dpm3+kl0.2": ["algo=dgpo", "dgpo.train_timesteps=2", "sample.post_window_solver=dpmsolver++", "sample.post_window_compress=0.4",
                           "dgpo.kl_beta=0.2"],
    # dgpo+2t+dpm3 with 5 optimiser steps of linear warm-up and 5x the reference's KL (0.1, free here: DGPO's preference
    # already runs the base model on every trained row). Full fine-tuning at 3e-4 with one step per epoch: Adam's first
    # steps move every weight by about the learning rate, and the screen saw diversity fall in the first two epochs
    # before any gain; warm-up and the KL kept it (time_to_reward_flow_screen.md, seeds 0 and 4-6)
    "dgpo+2t+dpm3+wu5+kl0.1": ["algo=dgpo", "dgpo.train_timesteps=2", "sample.post_window_solver=dpmsolver++",
                               "sample.post_window_compress=0.4", "train.lr_warmup_steps=5", "dgpo.kl_beta=0.1"],
}
WORLDS = {
    "digits": dict(preset="digits.yaml", baseline="ddpo_is", reward="digit_confidence", heldout="digit_confidence_heldout",
                   contenders=DIGITS_CONTENDERS, stem="time_to_reward", repeats=1, heldout_prompts=None,
                   smoke=["sample.num_steps=4", "sample.batch_size=8", "sample.num_batches_per_epoch=1", "train.batch_size=8",
                          "grpo.group_size=4", "nft.group_size=4", "awm.group_size=4", "awm.train_timesteps=2"]),
    "flow-digits": dict(preset="flow_digits.yaml", baseline="grpo", reward="digit_layout", heldout="digit_layout_heldout",
                        contenders=FLOW_CONTENDERS, stem="time_to_reward_flow", repeats=4, heldout_prompts="builtin:flow_digits_heldout",
                        smoke=["sample.num_steps=4", "sample.batch_size=8", "sample.num_batches_per_epoch=1", "train.batch_size=8",
                               "grpo.group_size=4", "nft.group_size=4", "awm.group_size=4", "awm.train_timesteps=2",
                               "dgpo.group_size=4", "dgpo.train_timesteps=2", "dgpo.max_step=2"]),
}
BASELINE = WORLDS["digits"]["baseline"]
CONTENDERS = DIGITS_CONTENDERS
THRESHOLD_FRACTION = 0.75


class Evaluator:
    """Scores a trainer's policy on fixed seeds with the world's reward and its held-out classifier, on the
    training prompts (each ``repeats`` times, for the within-prompt diversity) and, where the world has them,
    the held-out prompts."""

    def __init__(self, n: int, world: dict) -> None:
        from diffrl_fast.rewards import get_reward

        self.n, self.world = n, world
        self.reward = get_reward(world["reward"])
        self.heldout = get_reward(world["heldout"])
        self.heldout_prompts = None
        if world["heldout_prompts"]:
            from diffrl_fast.train.config import prompt_file_lines

            self.heldout_prompts = prompt_file_lines(world["heldout_prompts"])

    def _images(self, trainer, prompts, seed0):
        import torch

        from diffrl_fast.train.trainer import EVAL_SEED_BASE

        images, meta = [], []
        with torch.no_grad():
            for start in range(0, len(prompts), 64):
                ids = list(range(start, min(len(prompts), start + 64)))
                traj = trainer._sample([prompts[i] for i in ids], [EVAL_SEED_BASE + seed0 + i for i in ids])
                images.append(traj.images.cpu())
                meta += traj.metadata
        return torch.cat(images), meta

    def __call__(self, trainer) -> dict:
        trainer.model.denoiser.eval()
        r = self.world["repeats"]
        pool = trainer.prompts
        prompts = eval_prompts(pool, self.n, r)
        images, meta = self._images(trainer, prompts, 0)
        rew, info = self.reward(images, prompts, meta)
        held, _ = self.heldout(images, prompts, meta)
        keys = [m["class_id"] for m in meta] if r == 1 else prompts
        out = {"reward": float(rew.mean()), "heldout": float(held.mean()), "diversity": within_prompt_diversity(images, keys)}
        metric = (info or {}).get("per_sample", {}).get("layout_correct")
        if metric is not None:
            out["layout_correct"] = float(metric.float().mean())
        if self.heldout_prompts:
            hp = [self.heldout_prompts[i % len(self.heldout_prompts)] for i in range(self.n)]
            h_images, h_meta = self._images(trainer, hp, 100_000)
            h_rew, h_info = self.reward(h_images, hp, h_meta)
            out["heldout_prompts"] = float(h_rew.mean())
            h_metric = (h_info or {}).get("per_sample", {}).get("layout_correct")
            if h_metric is not None:
                out["heldout_prompts_layout_correct"] = float(h_metric.float().mean())
        return out


def eval_prompts(pool: list[str], n: int, repeats: int) -> list[str]:
    """The n eval prompts: with ``repeats`` > 1, n // repeats prompts spread evenly over the whole pool (the
    pool is ordered by kind: single digits, then pairs, ...; its first prompts alone would judge one kind), each
    ``repeats`` times in a row; otherwise the pool round-robin."""
    if repeats == 1:
        return [pool[i % len(pool)] for i in range(n)]
    m = max(1, n // repeats)
    chosen = [pool[(k * len(pool)) // m] if m <= len(pool) else pool[k % len(pool)] for k in range(m)]
    return [chosen[(i // repeats) % m] for i in range(n)]


def run_one(name: str, overrides: list[str], seed: int, budget: float, evaluator: Evaluator, workdir: Path, extra=(),
            max_epochs: int = 10_000, world: dict = None, eval_every_epoch: bool = True, unit: str = "clock_s") -> dict:
    """One contender's run for ``budget`` of training in ``unit`` (``clock_s``: seconds of sampling + updates;
    ``passes``: denoiser passes, counted by the trainer), evaluated (off the clock) before training and after every
    epoch; ``eval_every_epoch=False`` (a sweep run, picked on its training reward) evaluates only before the first
    and after the last epoch."""
    from diffrl_fast.config_utils import load_config
    from diffrl_fast.train.config import PRESETS, Config, validate
    from diffrl_fast.train.trainer import Trainer

    world = world or WORLDS["digits"]
    cfg = validate(load_config(Config, PRESETS / world["preset"], [*overrides, f"seed={seed}", f"num_epochs={max_epochs}", *extra,
                                                                  f"output_dir={workdir}", f"name={name}_s{seed}", "log.eval_samples=0",
                                                                  "log.progress=false", "log.tensorboard=false", "log.grid_samples=0",
                                                                  "guard.heldout_reward=[]"]))  # its own evaluator watches the guards
    trainer = Trainer(cfg, workdir / f"{name}_s{seed}", log_fn=lambda s: None)
    trainer.logger.print = lambda s: None
    points = [{"epoch": 0, "clock_s": 0.0, "samples": 0, "passes": 0, **evaluator(trainer)}]
    clock = {"s": 0.0, "samples": 0}

    spent = lambda: clock["s"] if unit == "clock_s" else trainer.denoiser_passes  # noqa: E731

    def on_epoch(tr, record):
        clock["s"] += record["sample_time_s"] + record["train_time_s"]
        clock["samples"] += record["samples"]
        last = spent() >= budget or record["epoch"] >= max_epochs
        points.append({"epoch": record["epoch"], "clock_s": round(clock["s"], 3), "samples": clock["samples"],
                       "passes": record["denoiser_passes"], "train_reward": record["reward_mean"],
                       **(evaluator(tr) if eval_every_epoch or last else {})})

    wall = time.perf_counter()
    trainer.run(on_epoch=on_epoch, stop_flag=lambda: spent() >= budget)  # checked between epochs
    return {"points": points, "wall_s": round(time.perf_counter() - wall, 1), "overrides": overrides, "seed": seed,
            "learning_rate": cfg.train.learning_rate, "commit": _commit()}


def sweep_pick(runs: list[dict]) -> dict:
    """The sweep's choice among one contender's learning-rate runs: the best mean training reward over each run's
    last three epochs (the reward it optimises, as logged during training; never the reported eval reward)."""
    def score(r):
        tail = [p["train_reward"] for p in r["points"][1:]][-3:]
        return statistics.mean(tail) if tail else float("-inf")
    return max(runs, key=score)


def _commit() -> str:
    from benchmarks.common import machine_info

    return machine_info("cpu")["commit"]


def within_budget(run: dict, budget_s: float, unit: str = "clock_s"):
    """The run's points up to the first at or past the budget (in ``unit``: ``clock_s`` or ``passes``), or None when
    the run stops short of it. Training is deterministic for a seed and stops between epochs, so the cut is what a
    run under that budget records."""
    for i, p in enumerate(run["points"]):
        if p.get(unit, -1) >= budget_s:
            return {**run, "points": run["points"][:i + 1]}
    return None


def reusable(path, budget_s: float, unit: str = "clock_s") -> dict:
    """{(overrides, seed): run} of an earlier JSON's runs, its sweep runs included, that cover the budget, cut to it.
    A run is named by what it ran (its overrides and seed), not by the contender's label. ``path``: one JSON or a
    list of them (a run found in several is taken from the first)."""
    if isinstance(path, (list, tuple)):
        out = {}
        for p in path:  # the first file's run, unless only a later one was evaluated at its end (what a seed run needs)
            for key, run in reusable(p, budget_s, unit).items():
                if key not in out or ("reward" in run["points"][-1] and "reward" not in out[key]["points"][-1]):
                    out[key] = run
        return out
    if path is None or not path.is_file():
        return {}
    data = json.loads(path.read_text())
    commit = data.get("machine", {}).get("commit", "?")
    groups = [data["runs"], data.get("sweep") or {}] if "runs" in data else [data]  # a finished JSON or a .partial.json
    out = {}
    for runs in groups:
        for rs in runs.values():
            for r in rs:
                cut = within_budget({"commit": commit, **r}, budget_s, unit)
                key = (tuple(r["overrides"]), r["seed"])
                if cut is not None and (key not in out or "reward" in cut["points"][-1]):
                    out[key] = cut  # a run evaluated every epoch serves a sweep's need too
    return out


GUARDS = ("heldout", "diversity", "heldout_prompts", "layout_correct", "heldout_prompts_layout_correct")


def summarize(runs: dict[str, list[dict]], baseline: str = BASELINE) -> dict:
    """Threshold from the baseline, then time, denoiser passes and samples to it, speed-ups in both units and the
    guards at it, per contender."""
    base_runs = runs[baseline]
    n_points = min(len(r["points"]) for r in base_runs)
    curve = [statistics.mean(r["points"][i]["reward"] for r in base_runs) for i in range(n_points)]
    start, best = curve[0], max(curve)
    threshold = start + THRESHOLD_FRACTION * (best - start)
    table = {}
    for name, rs in runs.items():
        reached = [next((p for p in r["points"] if p["epoch"] > 0 and p["reward"] >= threshold), None) for r in rs]
        times = [h["clock_s"] for h in reached if h is not None]
        passes = [h["passes"] for h in reached if h is not None and "passes" in h]
        row = {
            "reached": sum(h is not None for h in reached), "seeds": len(rs),
            "time_s": [None if h is None else h["clock_s"] for h in reached],
            "passes": [None if h is None else h.get("passes") for h in reached],
            "samples": [None if h is None else h["samples"] for h in reached],
            "median_time_s": statistics.median(times) if times else None,
            "median_passes": statistics.median(passes) if passes and len(passes) == len(times) else None,
            "final_reward": [r["points"][-1]["reward"] for r in rs],
            "overrides": rs[0]["overrides"], "learning_rate": rs[0].get("learning_rate"),
        }
        for g in GUARDS:
            if any(g in p for r in rs for p in r["points"]):
                row[f"{g}_at_threshold"] = [None if h is None else h.get(g) for h in reached]
                row[f"{g}_start"] = statistics.mean(r["points"][0][g] for r in rs)
        table[name] = row
    base = table[baseline]
    for row in table.values():  # a speed-up needs every seed of the contender and of the baseline at the threshold
        ok = row["reached"] == row["seeds"] and base["reached"] == base["seeds"]
        row["speedup"] = base["median_time_s"] / row["median_time_s"] if ok and base["median_time_s"] and row["median_time_s"] else None
        row["speedup_passes"] = (base["median_passes"] / row["median_passes"]
                                 if ok and base["median_passes"] and row["median_passes"] else None)
    return {"threshold": threshold, "baseline": baseline, "baseline_start": start, "baseline_best": best, "table": table}


def _fmt(values, spec="{:.1f}"):
    vals = [v for v in values if v is not None]
    if not vals:
        return "not reached"
    s = spec.format(statistics.mean(vals)) + (f" ± {spec.format(statistics.stdev(vals))}" if len(vals) > 1 else "")
    return s + ("" if len(vals) == len(values) else f" ({len(vals)}/{len(values)} seeds)")


def _x(v):
    return "—" if v is None else f"{v:.2f}x"


def write_md(summary: dict, meta: dict, path: Path) -> None:
    world, base = meta.get("world", "digits"), summary["baseline"]
    guards = [g for g in GUARDS if any(f"{g}_at_threshold" in row for row in summary["table"].values())]
    sweep = meta.get("sweep")
    budget = (f"{meta['budget_passes']:.0f} denoiser passes of training per run (the same for every contender, whatever the "
              "machine's speed)" if meta.get("budget_passes") else f"{meta['budget_s']:.0f} s of training (sampling + updates) per run")
    lines = [f"# Time to reward on the {world} world", "",
             f"Machine: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}.",
             f"Budget: {budget}, seeds {meta['seeds']}, {meta['eval_samples']} "
             "fixed-seed eval samples per epoch (off the clock). Threshold: 75% of the way from the baseline's reward before training "
             f"({summary['baseline_start']:.3f}) to the best level of its seed-mean curve ({summary['baseline_best']:.3f}): "
             f"**{summary['threshold']:.3f}**."
             + (f" Tuning: every contender, {base} included, had the same sweep: learning rates x {sweep} on seed 0, the best "
                "training reward kept (the `learning_rate` column), then the seeds above." if sweep else ""), "",
             "| contender | seeds reaching | time to threshold (s) | denoiser passes to threshold | samples to threshold | "
             f"speed-up vs {base}, time / passes | " + " | ".join(f"{g.replace('_', ' ')} at threshold" for g in guards)
             + " | final reward | learning rate | settings |",
             "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in guards) + " | --- | --- | --- |"]
    for name, row in summary["table"].items():
        lr = row.get("learning_rate")
        lines.append(f"| {name} | {row['reached']}/{row['seeds']} | {_fmt(row['time_s'])} | {_fmt(row['passes'], '{:.0f}')} | "
                     f"{_fmt(row['samples'], '{:.0f}')} | {_x(row['speedup'])} / {_x(row.get('speedup_passes'))} | "
                     + " | ".join(_fmt(row[f'{g}_at_threshold'], '{:.3f}') if f"{g}_at_threshold" in row else "—" for g in guards)
                     + f" | {_fmt(row['final_reward'], '{:.3f}')} | {'—' if lr is None else f'{lr:.2g}'} | `{' '.join(row['overrides'])}` |")
    lines += ["", "(mean ± std over the seeds that reached the threshold; a speed-up is the baseline's median over the "
              "contender's, only when every seed reached it; denoiser passes: a forward of one sample at one step = 1, its "
              "backward = 2, both guidance branches count)", "", f"![eval reward against denoiser passes and training time]({path.stem}.png)", ""]
    lines += reading_lines(path)
    path.write_text("\n".join(lines))


def fastest_contender(summary: dict, by: str = "speedup"):
    """The contender (not the baseline) with the largest speed-up ``by`` ("speedup": in time, "speedup_passes": in
    denoiser passes); None when no contender has one (a speed-up needs every seed at the threshold)."""
    base = summary["baseline"]
    return max((n for n, r in summary["table"].items() if r.get(by) and n != base),
               key=lambda n: summary["table"][n][by], default=None)


def plot(runs: dict, summary: dict, path: Path, by: str = "speedup") -> None:
    """Eval reward against denoiser passes (left) and training time (right), seed means with min-max bands; the
    baseline in black, the fastest contender thick (the largest ``by``: "speedup" in time, or "speedup_passes",
    the measure a budget in passes is judged by); one row of panels per family (the name before "+") when
    there are more than 8 contenders, each contender its own colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = summary["baseline"]
    fastest = fastest_contender(summary, by)
    names = list(runs)
    families = {}
    for n in names:
        families.setdefault(n.split("+")[0] if len(names) > 8 else "all", []).append(n)
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    colour = {n: colours[i % len(colours)] for i, n in enumerate(x for x in names if x != base)}
    colour[base] = "black"
    rows = list(families.items())
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.2 * len(rows)), squeeze=False)
    for (family, members), (ax_p, ax_t) in zip(rows, axes):
        shown = members if base in members else [base, *members]
        for name in shown:
            rs = runs[name]
            n = min(len(r["points"]) for r in rs)
            ys = [[r["points"][i]["reward"] for r in rs] for i in range(n)]
            mean, lo, hi = [statistics.mean(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]
            lw = 2.6 if name in (base, fastest) else 1.2
            for ax, key in ((ax_p, "passes"), (ax_t, "clock_s")):
                x = [statistics.mean(r["points"][i].get(key, 0) for r in rs) for i in range(n)]
                ax.plot(x, mean, marker=".", color=colour[name], lw=lw, label=name + (" (fastest)" if name == fastest else ""))
                ax.fill_between(x, lo, hi, color=colour[name], alpha=0.12)
        for ax in (ax_p, ax_t):
            ax.axhline(summary["threshold"], color="grey", ls="--", lw=1)
            ax.set_ylabel("eval reward")
        ax_p.set_xlabel("denoiser passes (training)")
        ax_t.set_xlabel("training wall time (s, evaluation excluded)")
        ax_p.legend(fontsize=7, ncol=2, title=None if family == "all" else family, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SWEEP_FACTORS = (1 / 3, 1.0, 3.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="diffrl-fast bench time-to-reward", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", default="digits", choices=list(WORLDS), help="the testbed (default: digits)")
    ap.add_argument("--contenders", default=None, help="comma-separated names (default: all of the world's; the baseline is always run)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the reported runs (with --sweep: fresh ones, e.g. 1,2,3)")
    ap.add_argument("--budget-s", type=float, default=120.0, help="seconds of training (sampling + updates) per run")
    ap.add_argument("--budget-passes", type=float, default=None,
                    help="denoiser passes of training per run instead of seconds (--budget-s is then unused): the same work for "
                         "every contender on any machine")
    ap.add_argument("--sweep", action="store_true", help="tune every contender's learning rate (x 1/3, 1, 3 on seed 0) before the seeds")
    ap.add_argument("--reuse", type=Path, action="append", default=None,
                    help="an earlier time_to_reward JSON whose covering runs are reused (repeatable)")
    ap.add_argument("--stem", default=None, help="name of the output files (default: the world's)")
    ap.add_argument("--eval-samples", type=int, default=128)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="a tiny configuration that only checks the benchmark runs (CI)")
    args = ap.parse_args(argv)
    world = WORLDS[args.world]
    table, baseline = world["contenders"], world["baseline"]
    chosen = args.contenders.split(",") if args.contenders else list(table)
    names = [baseline] + [n for n in chosen if n and n != baseline]
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"unknown contenders {unknown} for the {args.world} world; choose from {list(table)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.sweep and 0 in seeds:
        print("--sweep tunes on seed 0: report fresh seeds (--seeds 1,2,3)", file=sys.stderr)
        return 2
    extra = list(world["smoke"]) if args.smoke else []
    evaluator = Evaluator(args.eval_samples, world)
    runs, sweeps = {}, {}
    stem = (args.stem or world["stem"]) + ("_smoke" if args.smoke else "")
    unit, budget = ("passes", args.budget_passes) if args.budget_passes is not None else ("clock_s", args.budget_s)
    if budget <= 0:
        print(f"the budget must be positive, got {budget:g}", file=sys.stderr)
        return 2
    reuse = reusable(args.reuse, budget, unit) if not args.smoke else {}
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / f"{stem}.partial.json"

    def one(name, overrides, seed, workdir, eval_every_epoch=True):
        r = reuse.get((tuple(overrides), seed))
        if r is None or (eval_every_epoch and "reward" not in r["points"][-1]):
            r = run_one(name, overrides, seed, budget, evaluator, workdir, extra, world=world, eval_every_epoch=eval_every_epoch, unit=unit)
        else:
            print(f"{name:>18} seed {seed}: reused from commit {r['commit']}", flush=True)
        last = r["points"][-1]
        print(f"{name:>18} seed {seed} lr {r.get('learning_rate', 0):.2g}: reward {r['points'][0]['reward']:+.3f} -> "
              f"{last.get('reward', float('nan')):+.3f} in {last['clock_s']:.0f} s, {last.get('passes', 0)} passes ({r['wall_s']:.0f} s wall)", flush=True)
        return r

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for name in names:
            overrides = list(table[name])
            if args.sweep:
                from diffrl_fast.config_utils import load_config
                from diffrl_fast.train.config import PRESETS, Config

                lr0 = load_config(Config, PRESETS / world["preset"], [*overrides, *extra]).train.learning_rate
                tried = [one(f"{name}@lr{f:.2g}", [*overrides, f"train.learning_rate={lr0 * f:.4g}"], 0, workdir, eval_every_epoch=False)
                         for f in SWEEP_FACTORS]
                sweeps[name] = tried
                overrides = list(sweep_pick(tried)["overrides"])
            for seed in seeds:
                runs.setdefault(name, []).append(one(name, overrides, seed, workdir))
                partial.write_text(json.dumps({"runs": runs, "sweep": sweeps}) + "\n")  # what a cut-short run leaves behind
    summary = summarize(runs, baseline)
    meta = machine_info("cpu")
    meta.update(world=args.world, budget_s=None if unit == "passes" else args.budget_s, budget_passes=args.budget_passes,
                seeds=seeds, eval_samples=args.eval_samples, smoke=args.smoke,
                sweep=" / ".join(f"{f:.2g}" for f in SWEEP_FACTORS) if args.sweep else None)
    partial.unlink(missing_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"machine": meta, "summary": summary, "runs": runs, "sweep": sweeps}, indent=1) + "\n")
    write_md(summary, meta, args.out / f"{stem}.md")
    plot(runs, summary, args.out / f"{stem}.png", by="speedup_passes" if unit == "passes" else "speedup")
    for name, row in summary["table"].items():
        print(f"{name:>18}: threshold reached by {row['reached']}/{row['seeds']} seeds, median {row['median_time_s']} s, "
              f"{row['median_passes']} passes, speed-up {row['speedup']} (time) {row['speedup_passes']} (passes)", flush=True)
    print(f"wrote {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
