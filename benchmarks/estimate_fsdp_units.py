"""Counted (not measured) FSDP2 unit sizes of the models people train: SDXL's UNet, SD3.5-Large's and FLUX.1-dev's
transformers, built from their configs on PyTorch's ``meta`` device (no download, no memory), cut into units by the
trainer's own plan (``diffrl_fast.train.distributed.fsdp_units``: every transformer block and resnet, then the root).

Per model and mode (full fine-tuning; LoRA as the presets attach it) it counts: the units, the largest (parameters,
share, bf16 bytes), the root's share, and per process at ``--world`` processes the sharded static state (fp32 weights;
full fine-tuning adds fp32 gradients and AdamW's two moments: 16 bytes per parameter; LoRA only for the adapters) and
an upper bound of the all-gathered bf16 parameters during a forward with one unit prefetched: the root (kept
gathered) plus the two largest units. Activations are not counted here (benchmarks/estimate_sdxl_memory.py does
for SDXL).

Run: ``diffrl-fast bench fsdp-units`` (a few seconds); results in benchmarks/results/fsdp_units.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info
from benchmarks.estimate_sdxl_memory import SDXL_UNET_CONFIG

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 2**30

# stabilityai/stable-diffusion-3.5-large, transformer/config.json (the architecture-defining fields)
SD35_LARGE_CONFIG = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                         num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX1_DEV_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                        axes_dims_rope=(16, 56, 56))

# (diffusers class, config, LoRA rank and targets as configs/sdxl.yaml, sd3.yaml and flux.yaml attach them)
MODELS = {
    "SDXL-base UNet": ("UNet2DConditionModel", SDXL_UNET_CONFIG, 16, ["to_q", "to_k", "to_v", "to_out.0"]),
    "SD3.5-Large transformer": ("SD3Transformer2DModel", SD35_LARGE_CONFIG, 32,
                                ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                                 "attn.to_out.0", "attn.to_q", "attn.to_v"]),
    "FLUX.1-dev transformer": ("FluxTransformer2DModel", FLUX1_DEV_CONFIG, 32,
                               ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]),
}


def build(cls_name: str, config: dict, lora: tuple[int, list] | None = None) -> torch.nn.Module:
    """The denoiser on the meta device; with ``lora`` = (rank, targets) peft adapters attached as the trainer does."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config)
    if lora is not None:
        from peft import LoraConfig

        model.requires_grad_(False)
        with torch.device("meta"):
            model.add_adapter(LoraConfig(r=lora[0], lora_alpha=lora[0], target_modules=lora[1], init_lora_weights=True))
    return model


def unit_sizes(model: torch.nn.Module) -> list[dict]:
    """[{name, params, trainable}] of each FSDP unit of the trainer's plan, root last; a parameter counts in the
    innermost unit that holds it, as fully_shard assigns it."""
    from diffrl_fast.train.distributed import fsdp_units

    units = fsdp_units(model)
    names = {id(m): n for n, m in model.named_modules()}
    owner: dict[int, int] = {}
    for i, unit in enumerate(units):  # later (outer) units only take what no earlier unit holds
        for p in unit.parameters():
            owner.setdefault(id(p), i)
    rows = [{"name": names[id(u)] or "(root)", "params": 0, "trainable": 0} for u in units]
    for p in model.parameters():
        row = rows[owner[id(p)]]
        row["params"] += p.numel()
        row["trainable"] += p.numel() if p.requires_grad else 0
    return rows


def count(model_name: str, mode: str, world: int) -> dict:
    cls_name, config, rank, targets = MODELS[model_name]
    model = build(cls_name, config, (rank, targets) if mode == "lora" else None)
    rows = unit_sizes(model)
    total = sum(r["params"] for r in rows)
    trainable = sum(r["trainable"] for r in rows)
    blocks = sorted(rows[:-1], key=lambda r: r["params"], reverse=True)
    largest, root = blocks[0], rows[-1]
    # sharded static state: fp32 weights of everything, plus fp32 gradients and AdamW's m and v of what trains
    shard_bytes = (4 * total + 12 * trainable) / world
    gathered = 2 * (root["params"] + blocks[0]["params"] + blocks[1]["params"])
    return {
        "model": model_name, "mode": mode, "lora_rank": rank if mode == "lora" else None, "params": total,
        "trainable": trainable, "units": len(rows), "largest_unit": largest["name"], "largest_unit_params": largest["params"],
        "largest_unit_share": largest["params"] / total, "largest_unit_bf16_gib": 2 * largest["params"] / GiB,
        "root_params": root["params"], "root_share": root["params"] / total, "world": world,
        "shard_gib_per_process": shard_bytes / GiB, "gathered_bf16_gib_upper_bound": gathered / GiB,
        "static_peak_gib_per_process": (shard_bytes + gathered) / GiB,
    }


def write_markdown(data: dict, path: Path) -> None:
    m = data["machine"]
    lines = [
        "# FSDP2 units of the models people train (counted on the meta device)",
        "",
        f"`diffrl-fast bench fsdp-units` at commit {m['commit']} on {m['date']} ({m['cpu']}, torch {m['torch']}, "
        f"diffusers {data['diffusers']}); counted from the configs, no GPU. Units: every transformer block and "
        "resnet (`train/distributed.py` `fsdp_units`), then the root. Per process at "
        f"{data['world']} processes: the sharded static state (fp32 weights; full fine-tuning adds fp32 gradients and "
        "AdamW's two moments, LoRA only for its adapters) and an upper bound of the bf16 weights all-gathered during "
        "a forward with one unit prefetched (the root plus the two largest units). Activations are not counted here.",
        "",
        "| model | mode | parameters | trainable | units | largest unit | its share | its bf16 GiB | root share | shards GiB / process | all-gathered GiB (bound) | static peak GiB / process |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["rows"]:
        mode = "full" if r["mode"] == "full" else f"LoRA r={r['lora_rank']}"
        lines.append(f"| {r['model']} | {mode} | {r['params'] / 1e6:,.0f}M | {r['trainable'] / 1e6:,.1f}M | {r['units']} | "
                     f"`{r['largest_unit']}` | {100 * r['largest_unit_share']:.2f}% | {r['largest_unit_bf16_gib']:.3f} | "
                     f"{100 * r['root_share']:.2f}% | {r['shard_gib_per_process']:.2f} | "
                     f"{r['gathered_bf16_gib_upper_bound']:.2f} | {r['static_peak_gib_per_process']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="diffrl-fast bench fsdp-units", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=8, help="processes the shards spread over (default 8)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args(argv)
    import diffusers
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    t0 = time.perf_counter()
    rows = []
    for name in MODELS:
        for mode in ("full", "lora"):
            r = count(name, mode, args.world)
            rows.append(r)
            print(f"{name:26s} {mode:4s}: {r['params'] / 1e6:8,.0f}M params, {r['units']:3d} units, largest "
                  f"{r['largest_unit']} {100 * r['largest_unit_share']:.2f}% ({r['largest_unit_bf16_gib']:.3f} GiB bf16), root "
                  f"{100 * r['root_share']:.2f}%; per process at {args.world}: shards {r['shard_gib_per_process']:.2f} GiB, "
                  f"all-gathered <= {r['gathered_bf16_gib_upper_bound']:.2f} GiB")
    data = {"machine": machine_info("cpu"), "diffusers": diffusers.__version__, "world": args.world, "rows": rows,
            "seconds": time.perf_counter() - t0, "command": "diffrl-fast bench fsdp-units"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fsdp_units.json").write_text(json.dumps(data, indent=1) + "\n")
    write_markdown(data, args.out / "fsdp_units.md")
    print(f"wrote {args.out / 'fsdp_units.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
