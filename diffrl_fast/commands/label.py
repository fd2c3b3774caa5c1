"""``diffrl-fast label``: collect human preferences for D3PO.

Samples pairs of images of the same prompt from a model (the policy D3PO will start from), both from the
same initial noise as D3PO's reference samples them (``--independent-noise`` draws one each), shows each
pair as a PNG with numbered cells (and prints its path), and records which one you prefer. Choices are
saved after every answer, so quitting keeps what was labelled. Train on them with

    diffrl-fast train algo=d3po d3po.preferences=labels.json   (same model and sampling settings)

The file stores prompts, seeds and settings only: the trainer regenerates exactly these images from their
seeds with the reference (pretrained) policy.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..cli import ArgumentParser, UsageError
from ..diffusion.rollout import sample_trajectories
from ..models import load_model


def pair_image(images: torch.Tensor, path: Path, scale: int) -> Path:
    """Two images side by side with the numbers 1 and 2 written above them."""
    from PIL import Image, ImageDraw

    from ..train.outputs import image_grid

    tmp = image_grid(images, path, cols=2, scale=scale)
    img = Image.open(tmp).convert("RGB")
    band = 14
    canvas = Image.new("RGB", (img.width, img.height + band), "white")
    canvas.paste(img, (0, band))
    draw = ImageDraw.Draw(canvas)
    for i in range(2):
        draw.text((i * img.width // 2 + img.width // 4 - 3, 1), str(i + 1), fill="black")
    canvas.save(path)
    return path


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="diffrl-fast label", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits", help="'digits', 'flow-digits' or a diffusers pipeline folder / hub id")
    ap.add_argument("--prompt", action="append", required=True, help="prompt (repeatable; used round-robin)")
    ap.add_argument("--pairs", type=int, default=8, help="number of pairs to label")
    ap.add_argument("--out", default="labels.json", help="the preferences file (appended to if it exists)")
    ap.add_argument("--images", default="label_images", help="folder for the pair PNGs")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="pair i uses seeds seed + 2i and seed + 2i + 1 (x_T from the first)")
    ap.add_argument("--independent-noise", action="store_true", help="each image of a pair gets its own x_T (train with "
                    "d3po.shared_initial_noise=false)")
    ap.add_argument("--choices", help="answers without prompting, e.g. '1,2,s' (1 or 2 = preferred, s = skip)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.pairs < 1:
        raise UsageError("--pairs must be >= 1")
    out = Path(args.out)
    settings = {"model": args.model, "num_steps": args.steps, "guidance_scale": args.guidance, "eta": args.eta,
                "shared_initial_noise": not args.independent_noise}
    data = {**settings, "items": []}
    if out.exists():
        data = json.loads(out.read_text())
        differ = {k: (data.get(k, False if k == "shared_initial_noise" else None), v) for k, v in settings.items()
                  if data.get(k, False if k == "shared_initial_noise" else None) != v}
        if differ:
            raise UsageError(f"{out} was labelled with other settings {differ}: use another --out file")
    answers = [a.strip() for a in args.choices.split(",")] if args.choices else None
    model = load_model(args.model, device=args.device)
    folder = Path(args.images)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(args.pairs):
        prompt = args.prompt[i % len(args.prompt)]
        seeds = [args.seed + 2 * i, args.seed + 2 * i + 1]
        traj = sample_trajectories(model, [prompt, prompt], num_steps=args.steps, guidance_scale=args.guidance,
                                   eta=args.eta, seeds=seeds, init_seeds=None if args.independent_noise else [seeds[0]] * 2)
        png = pair_image(traj.images, folder / f"pair_{i:04d}.png", scale=8 if traj.images.shape[-1] <= 32 else 1)
        if answers is not None:
            if i >= len(answers):
                break
            answer = answers[i]
        else:
            print(f"pair {i + 1}/{args.pairs}, prompt {prompt!r}: {png}")
            answer = input("which is better? [1/2, s = skip, q = quit] ").strip().lower()
        if answer == "q":
            break
        if answer not in ("1", "2", "s"):
            print(f"  {answer!r} is not 1, 2, s or q: skipped", file=sys.stderr)
            continue
        if answer == "s":
            continue
        data["items"].append({"prompt": prompt, "seeds": seeds, "choice": int(answer) - 1})
        out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{len(data['items'])} labelled pairs in {out}")
    return 0
