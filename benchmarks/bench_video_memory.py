"""Memory of video RL against the frame count: one training step of a small Wan2.1-layout model for F = 1, 5, 9, 17.

A WanTransformer3DModel of 2 blocks, width 128 (4 heads of 32), LoRA rank 8 on the attention projections, trains
GRPO on 2 videos of F frames at 256 x 256 pixels (latents [16, (F - 1)/4 + 1, 32, 32], 256 tokens per latent
frame) with 4 denoising steps of which the trainer's chunks hold 2, through the trainer's own ``train_epoch``,
with and without gradient checkpointing per transformer block (``model.gradient_checkpointing``). Reported per F:

- the step's peak memory above what the process held before it (each measurement in a fresh process with
  MALLOC_MMAP_THRESHOLD_=65536, so the resident set follows the memory in use; the method of bench_memory.py);
- the trajectory's stored bytes per sample (counted: the states the trainer keeps, in their dtype);
- a least-squares line through the peaks against F: the slope (MB per frame) and R^2 (1 = linear).

Activations grow with the tokens, (F - 1)/4 + 1 latent frames of 256 tokens each, so linear in F when attention
does not store its [L, L] scores (PyTorch's fused CPU and GPU kernels do not). The extrapolation to Wan2.1-1.3B and
14B at 81 frames of 480 x 832 is counted, not measured: docs/scaling.md ("Video").
Run: ``diffrl-fast bench video-memory``; writes benchmarks/results/video_memory_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine_info, write_rows  # noqa: E402

FRAMES = (1, 5, 9, 17)
MODEL = dict(num_layers=2, num_attention_heads=4, attention_head_dim=32, text_width=32)


def measure(path: str, frames: int, ckpt: bool, size: int, device: str, repeats: int, workdir: Path) -> dict:
    from diffrl_fast.config_utils import load_config
    from diffrl_fast.train.config import Config, validate
    from diffrl_fast.train.trainer import Trainer
    from diffrl_fast.utils.memory import PeakMemory

    prompts = ["a cat playing in the snow"] * 2  # one group of 2: both samples get a non-zero advantage and train
    cfg = validate(load_config(Config, None, [
        f"model.path={path}", "model.lora=true", "model.lora_rank=8", f"model.gradient_checkpointing={str(ckpt).lower()}",
        "algo=grpo", "grpo.group_size=2", "grpo.beta=0", "reward.name=video_temporal_consistency", f"prompts=[{prompts[0]}]",
        "sample.num_steps=4", "sample.batch_size=2", "sample.num_batches_per_epoch=1", "sample.guidance_scale=1.0",
        f"sample.height={size}", f"sample.width={size}", f"sample.num_frames={frames}", "train.batch_size=2", "train.chunk_size=2",
        "train.learning_rate=1e-6", "log.eval_samples=0", "log.progress=false", f"output_dir={workdir}", "name=m",
        "reward.overlap=false"]))
    trainer = Trainer(cfg, workdir / "m", device=device, log_fn=lambda s: None)
    traj = trainer._sample(prompts, [1, 2], epoch=1)
    data = trainer.algo.prepare(trainer.run_context, traj, torch.tensor([0.5, -0.5]))
    trainer.train_epoch(0, traj, data)  # warm-up
    mem = PeakMemory(device)
    peaks = []
    for r in range(repeats):
        mem.reset()
        trainer.train_epoch(r + 1, traj, data)
        peaks.append(mem.extra_mb())
    return {"frames": frames, "latent_frames": trainer.model.latent_frames(frames), "ckpt": ckpt, "peak_mb": statistics.median(peaks),
            "peaks_mb": peaks, "trajectory_mb_per_sample": traj.latents[0].nbytes / 2**20,
            "stored_states": int(traj.latents.shape[1]), "tokens": int(traj.latents[0, 0, 0].numel() // 4)}


def fit(xs: list[float], ys: list[float]) -> dict:
    """Least squares y = a + b x: slope b, intercept a, R^2."""
    n, mx, my = len(xs), statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"slope_mb_per_frame": b, "intercept_mb": a, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="diffrl-fast bench video-memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--frames", default=",".join(map(str, FRAMES)))
    ap.add_argument("--size", type=int, default=256, help="frame height and width in pixels")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the test suite's tiny Wan, 32 x 32 frames, F in {1, 5}: a smoke run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement in this (fresh) process
    args = ap.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(measure(job["path"], job["frames"], job["ckpt"], job["size"], job["device"], job["repeats"], Path(job["workdir"]))))
        return 0
    from diffrl_fast.models.tiny import cached_tiny_pipeline

    if args.quick:
        path, frames, size, repeats = cached_tiny_pipeline("wan"), [1, 5], 32, 1
    else:
        path, frames, size, repeats = cached_tiny_pipeline("wan", **MODEL), [int(f) for f in args.frames.split(",")], args.size, args.repeats
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in (False, True):
            for F in frames:
                job = {"path": path, "frames": F, "ckpt": ckpt, "size": size, "device": args.device, "repeats": repeats,
                       "workdir": str(Path(tmp) / f"f{F}_{int(ckpt)}")}
                out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"measurement F={F} ckpt={ckpt} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(f"ckpt={str(ckpt):>5}  F={F:>3}  peak +{r['peak_mb']:8.1f} MB  trajectory {r['trajectory_mb_per_sample']:.2f} MB/sample",
                      flush=True)
    meta = machine_info(args.device)
    meta.update(size=size, model=MODEL if not args.quick else "tests' tiny Wan", frames=frames)
    fits = {("ckpt" if c else "no ckpt"): fit([r["frames"] for r in rows if r["ckpt"] == c], [r["peak_mb"] for r in rows if r["ckpt"] == c])
            for c in (False, True)}
    meta["fits"] = fits
    stem = f"video_memory_{args.device}" + ("_quick" if args.quick else "")
    write_rows(stem, rows, meta, args.out)
    lines = [f"# Memory of a video training step against frames ({args.device})", "",
             f"Machine: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}.",
             f"Model: WanTransformer3DModel {meta['model']}, LoRA rank 8, GRPO, 2 videos of {size} x {size}, chunks of 2 of 4 steps.", "",
             "| frames F | latent frames | tokens per sample | trajectory MB per sample | peak MB, no ckpt | peak MB, ckpt |",
             "| --- | --- | --- | --- | --- | --- |"]
    for F in frames:
        a, b = (next(r for r in rows if r["frames"] == F and r["ckpt"] == c) for c in (False, True))
        lines.append(f"| {F} | {a['latent_frames']} | {a['tokens']} | {a['trajectory_mb_per_sample']:.2f} | {a['peak_mb']:.1f} | {b['peak_mb']:.1f} |")
    lines += ["", "| variant | slope (MB per frame) | intercept (MB) | R^2 |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['slope_mb_per_frame']:.2f} | {v['intercept_mb']:.1f} | {v['r2']:.4f} |" for k, v in fits.items()]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / (stem + '.md')}; fits: {json.dumps(fits)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
