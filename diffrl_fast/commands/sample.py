"""``diffrl-fast sample``: images from a trained run (or a base model), saved as a PNG grid and one PNG each (a video
model's samples as strips of frames)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..cli import ArgumentParser, UsageError
from ..diffusion.rollout import sample_trajectories
from ..models import load_model
from ..train.outputs import filmstrip, image_grid
from ..train.runs import load_run


def load_policy(args):
    """(model, sampling defaults) from --run or --model."""
    if bool(args.run) == bool(args.model):
        raise UsageError("give exactly one of --run RUN_FOLDER (a trained run) or --model MODEL (a base model)")
    if args.run:
        model, cfg = load_run(args.run, device=args.device, checkpoint=args.checkpoint)
        s = cfg.sample
        return model, {"steps": s.num_steps, "guidance": s.guidance_scale, "eta": s.eta, "prompts": cfg.prompts,
                       "height": s.height, "width": s.width, "noise_level": s.noise_level,
                       "sde_type": cfg.log.eval_sde_type or s.sde_type, "negative_prompt": s.negative_prompt}
    return load_model(args.model, device=args.device), {"steps": 20, "guidance": 2.0, "eta": 1.0, "prompts": None}


def add_policy_args(ap) -> None:
    ap.add_argument("--run", help="a run folder written by `diffrl-fast train` (its latest checkpoint, or --checkpoint)")
    ap.add_argument("--checkpoint", default="latest",
                    help="with --run: 'latest' (default), 'best' (the guard's best held-out reward) or a folder under checkpoints/, e.g. epoch_0012")
    ap.add_argument("--model", help="a base model instead: 'digits', 'flow-digits' or a diffusers pipeline folder / hub id")
    ap.add_argument("--prompt", action="append", help="prompt (repeatable); default: the run's prompts")
    ap.add_argument("--n", type=int, default=16, help="number of samples (prompts are used round-robin)")
    ap.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the run's)")
    ap.add_argument("--guidance", type=float, help="guidance scale (default: the run's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def sample_images(model, defaults, args):
    prompts = args.prompt or defaults["prompts"]
    if not prompts:
        raise UsageError("no prompts: pass --prompt TEXT (repeatable)")
    if args.n < 1:
        raise UsageError("--n must be >= 1")
    chosen = [prompts[i % len(prompts)] for i in range(args.n)]
    traj = sample_trajectories(model, chosen, num_steps=args.steps or defaults["steps"],
                               guidance_scale=args.guidance if args.guidance is not None else defaults["guidance"],
                               eta=defaults["eta"], seeds=[args.seed + i for i in range(args.n)],
                               height=defaults.get("height"), width=defaults.get("width"),
                               noise_level=defaults.get("noise_level", 0.7), sde_type=defaults.get("sde_type", "sde"),
                               negative_prompts=[defaults["negative_prompt"]] * args.n if defaults.get("negative_prompt") else None)
    return traj


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="diffrl-fast sample", description=__doc__)
    add_policy_args(ap)
    ap.add_argument("--out", default="samples", help="output folder (grid.png and one PNG per sample)")
    args = ap.parse_args(argv)
    model, defaults = load_policy(args)
    traj = sample_images(model, defaults, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = filmstrip(traj.images)
    scale = 4 if images.shape[-2] <= 32 else 1
    image_grid(images, out / "grid.png", scale=scale)
    for i, img in enumerate(images):
        image_grid(img[None], out / f"{i:04d}.png", cols=1, scale=scale)
    print(f"wrote {len(traj)} samples to {out}/ (grid.png, 0000.png ...)")
    return 0
