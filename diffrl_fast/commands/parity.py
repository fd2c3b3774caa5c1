"""``diffrl-fast check-parity``: do the training-side log-probs reproduce the rollout's on your model?

Samples trajectories, recomputes every step's log-prob the way training does (a different batch size,
per-sample shuffled timesteps packed K at a time), and prints the worst |ratio - 1| per timestep.
Exit code 0 when the worst is within --threshold, 1 when not, 2 for a usage error.
"""
from __future__ import annotations

import torch

from ..cli import ArgumentParser
from ..diffusion.recompute import parity_report
from ..diffusion.rollout import sample_trajectories
from ..models import load_model
from ..ops import use_backend

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="diffrl-fast check-parity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="diffusers pipeline folder (SD 1.x/2.x, SDXL, SD3, FLUX.1, FLUX.2, Wan2.1, Qwen-Image, Z-Image), hub id, 'digits' or 'flow-digits'")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable); default: the model's own (the digits world's ten digits, four generic prompts for a pipeline)")
    ap.add_argument("--samples", type=int, default=8, help="trajectories to sample")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps")
    ap.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (1 = none)")
    ap.add_argument("--eta", type=float, default=1.0, help="DDIM eta (> 0)")
    ap.add_argument("--sde-type", default="sde", choices=["sde", "cps"], help="flow models: the rollout SDE (Flow-GRPO's, or coefficients-preserving sampling)")
    ap.add_argument("--train-batch", type=int, default=3, help="samples per training batch in the recompute")
    ap.add_argument("--chunk", type=int, default=4, help="timesteps packed per denoiser forward (K)")
    ap.add_argument("--threshold", type=float, default=1e-5, help="fail when the worst |ratio - 1| exceeds this")
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "cpp", "torch"])
    ap.add_argument("--autocast", default="float32", choices=list(DTYPES), help="denoiser precision (step math stays fp32)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in ("samples", "steps", "train_batch", "chunk"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    model = load_model(args.model, device=args.device)
    prompts = args.prompt or list(model.default_prompts)
    prompts = [prompts[i % len(prompts)] for i in range(args.samples)]
    autocast = DTYPES[args.autocast]
    with use_backend(args.backend):
        traj = sample_trajectories(model, prompts, num_steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
                                   sde_type=args.sde_type, seeds=[args.seed + i for i in range(args.samples)], autocast_dtype=autocast)
        rep = parity_report(model, traj, batch_size=args.train_batch, chunk_size=args.chunk, autocast_dtype=autocast, seed=args.seed)
    print(f"model {args.model} ({model.kind}, {traj.schedule.kind}), {args.samples} samples x {args.steps} steps, "
          f"train batch {args.train_batch}, K = {args.chunk}")
    print(f"{'step':>4} {'timestep':>10} {'max |ratio - 1|':>16}")
    for j, (t, d) in enumerate(zip(rep["timesteps"], rep["max_abs_ratio_minus_1"])):
        print(f"{j:>4} {t:>10} {d:>16.3e}")
    ok = rep["worst"] <= args.threshold
    print(f"worst |ratio - 1| = {rep['worst']:.3e} ({'PASS' if ok else 'FAIL'}, threshold {args.threshold:g})")
    return 0 if ok else 1
