"""Peak memory and step time of one training step against the number of trained timesteps T.

A small SD-style UNet (block_out_channels (64, 128), 2 layers per block, latents 4x32x32, fully
fine-tuned, DDPO-IS with classifier-free guidance) trains on 2 trajectories of T in {10, 25, 50} steps,
every step trained, through the trainer's own ``train_epoch``. Four ways to run the same step:

    pack all T   one denoiser forward over all T timesteps (K = T), no activation checkpointing
    pack all T + ckpt   the same with the denoiser's gradient checkpointing
    K = 5        chunks of 5 timesteps, each backpropagated right after its forward (the trainer's way)
    K = 5 + ckpt the same with the denoiser's gradient checkpointing

"With checkpointing" (K = 5 + ckpt) must keep the peak at T = 50 within 1.2x of T = 10. Peak memory is
the process's peak resident set above what it held before the step (CPU) or the CUDA allocator's peak.
On CPU each measurement runs in a fresh process with MALLOC_MMAP_THRESHOLD_=65536, so that freed blocks
go back to the OS and the resident set follows the memory actually in use (otherwise a warmed-up step
reuses pages already resident and shows no peak).
Run: ``diffrl-fast bench memory``; writes benchmarks/results/memory_<device>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine_info, write_rows  # noqa: E402

VARIANTS = {"pack all T": (None, False), "pack all T + ckpt": (None, True), "K = 5": (5, False), "K = 5 + ckpt": (5, True)}


def measure(path: str, T: int, K, ckpt: bool, device: str, repeats: int, workdir: Path) -> dict:
    from diffrl_fast.config_utils import load_config
    from diffrl_fast.diffusion.rollout import sample_trajectories
    from diffrl_fast.train.config import Config, validate
    from diffrl_fast.train.trainer import Trainer
    from diffrl_fast.utils.memory import PeakMemory

    cfg = validate(load_config(Config, None, [
        f"model.path={path}", "model.lora=false", f"model.gradient_checkpointing={str(ckpt).lower()}",
        "reward.name=jpeg_compressibility", "prompts=[a cat, a dog]", f"sample.num_steps={T}", "sample.batch_size=2",
        "sample.num_batches_per_epoch=1", "train.batch_size=2", f"train.chunk_size={K or T}", "train.learning_rate=1e-6",
        "log.eval_samples=0", "log.progress=false", f"output_dir={workdir}", "name=m", "reward.overlap=false"]))
    trainer = Trainer(cfg, workdir / "m", device=device, log_fn=lambda s: None)
    traj = sample_trajectories(trainer.model, ["a cat", "a dog"], num_steps=T, guidance_scale=5.0, seeds=[1, 2])
    data = trainer.algo.prepare(trainer.run_context, traj, torch.tensor([0.5, -0.5]))
    trainer.train_epoch(0, traj, data)  # warm-up
    mem = PeakMemory(device)
    times, peaks = [], []
    for r in range(repeats):
        mem.reset()
        t0 = time.perf_counter()
        trainer.train_epoch(r + 1, traj, data)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peaks.append(mem.extra_mb())
    return {"T": T, "step_s": statistics.median(times), "peak_mb": max(peaks), "rows_per_forward": 2 * 2 * (K or T)}


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name in VARIANTS:
        rs = [r for r in rows if r["variant"] == name]
        axes[0].plot([r["T"] for r in rs], [r["peak_mb"] for r in rs], marker="o", label=name)
        axes[1].plot([r["T"] for r in rs], [r["step_s"] for r in rs], marker="o", label=name)
    axes[0].set_ylabel("peak memory of the step (MB)")
    axes[1].set_ylabel("step time (s)")
    for ax in axes:
        ax.set_xlabel("trained timesteps T")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="diffrl-fast bench memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", default="10,25,50", help="values of T")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny UNet, T in {2, 4}: a smoke run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement in this (fresh) process
    args = ap.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(measure(job["path"], job["T"], job["K"], job["ckpt"], job["device"], job["repeats"], Path(job["workdir"]))))
        return 0
    from diffrl_fast.models.tiny import cached_tiny_pipeline

    if args.quick:
        path, steps = cached_tiny_pipeline("sd"), [2, 4]
        variants = {"pack all T": (None, False), "K = 5 + ckpt": (2, True)}
    else:
        path = cached_tiny_pipeline("sd", block_out_channels=(64, 128), layers_per_block=2, latent_size=32)
        steps, variants = [int(s) for s in args.steps.split(",")], VARIANTS
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (K, ckpt) in variants.items():
            for T in steps:
                job = {"path": path, "T": T, "K": K, "ckpt": ckpt, "device": args.device,
                       "repeats": 1 if args.quick else args.repeats, "workdir": str(Path(tmp) / f"{name}_{T}".replace(" ", "_"))}
                out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"measurement {name} T={T} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r["variant"] = name
                rows.append(r)
                print(f"{name:>18}  T={T:>3}  peak +{r['peak_mb']:8.1f} MB  step {r['step_s']:7.2f} s", flush=True)
    meta = machine_info(args.device)
    base = {r["variant"]: r for r in rows if r["T"] == steps[0]}
    ratios = {name: round(next(r for r in rows if r["variant"] == name and r["T"] == steps[-1])["peak_mb"] / max(base[name]["peak_mb"], 1e-9), 3)
              for name in variants}
    meta["peak_ratio_last_over_first_T"] = ratios
    stem = f"memory_{args.device}" + ("_quick" if args.quick else "")
    write_rows(stem, rows, meta, args.out)
    plot(rows, args.out / f"{stem}.png")
    lines = [f"# Peak memory and step time vs trained timesteps ({args.device})", "",
             f"Machine: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}.", "",
             "| variant | " + " | ".join(f"T={T} peak MB / step s" for T in steps) + f" | peak T={steps[-1]} / T={steps[0]} |",
             "| --- | " + " | ".join("---" for _ in steps) + " | --- |"]
    for name in variants:
        cells = [next(r for r in rows if r["variant"] == name and r["T"] == T) for T in steps]
        lines.append(f"| {name} | " + " | ".join(f"{c['peak_mb']:.0f} / {c['step_s']:.2f}" for c in cells) + f" | {ratios[name]:.2f}x |")
    lines += ["", f"![memory and time]({stem}.png)", ""]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / (stem + '.md')}; peak ratio T={steps[-1]}/T={steps[0]}: {ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
