"""Measured GPU memory of an SDXL-size UNet training step against the counted estimate of docs/scaling.md.

The real SDXL-base UNet architecture (2.57e9 parameters, random weights) is built on the GPU; one training
step of R rows of 128x128 latents (1024 px) runs forward and backward under bf16 autocast with gradient
checkpointing, for LoRA (r = 16 on the attention projections) and for full fine-tuning, and the CUDA
allocator's peak is compared with ``benchmarks/estimate_sdxl_memory.py``'s count on the meta device for the
same configuration (its ``UNetMemory.peak_bytes``: weights, gradients and optimiser state are the static
part; the step's working memory is the peak above it).

    python benchmarks/gpu/memory_sdxl.py --out memory_gpu.json [--rows 8,16] [--config sdxl|small]

``--config small`` runs a small UNet (for a CPU smoke test of this script; the figures are then meaningless).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMALL = {"block_out_channels": (32, 64), "layers_per_block": 1, "transformer_layers_per_block": 1, "cross_attention_dim": 64,
         "attention_head_dim": 4, "addition_time_embed_dim": 16, "projection_class_embeddings_input_dim": 64 + 6 * 16,
         "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
         "sample_size": 16}


def measure(config, mode: str, rows: int, latent: int, device: str) -> dict:
    """Two steps (forward, backward, AdamW) of ``rows`` rows; the second, with gradients and optimiser state
    allocated, is measured: static = allocated before it, working = its peak above that (GiB on CUDA)."""
    from benchmarks.estimate_sdxl_memory import build_unet, unet_inputs

    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    unet = build_unet(config, lora_rank=16 if mode == "lora" else None, base_dtype=torch.bfloat16 if mode == "lora" else torch.float32,
                      device=device)
    unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    args = unet_inputs(unet, rows, latent)
    args = tuple(a.to(device) if torch.is_tensor(a) else a for a in args)
    t0 = time.perf_counter()
    for _ in range(2):  # the second step holds gradients and optimiser state: the steady state
        with torch.autocast(device, dtype=torch.bfloat16):
            out = unet(*args[:3], added_cond_kwargs=args[3], return_dict=False)[0]
        out.float().square().mean().backward()
        opt.step()
        if device == "cuda":
            static = torch.cuda.memory_allocated() - base
            torch.cuda.reset_peak_memory_stats()
        else:
            static = 0
    sync()
    step_s = (time.perf_counter() - t0) / 2
    peak = (torch.cuda.max_memory_allocated() - base) if device == "cuda" else 0
    n_params = sum(p.numel() for p in unet.parameters())
    n_train = sum(p.numel() for p in params)
    del unet, opt, out, args
    return {"mode": mode, "rows": rows, "latent": latent, "parameters": n_params, "trainable": n_train,
            "measured_static_gib": static / 2**30, "measured_peak_gib": peak / 2**30,
            "measured_working_gib": (peak - static) / 2**30, "step_s": step_s}


# rows of benchmarks/results/sdxl_memory_estimate.json's table (the counts behind docs/scaling.md)
TABLE_CONFIG = {"lora": "LoRA r=16, bf16 base", "full": "full FT, no ZeRO, 1 GPU (fp32 weights, torch AdamW)"}


def estimate(config, mode: str, rows: int, latent: int) -> dict:
    """The counted working memory of the same step: from the committed estimate (SDXL), or counted now (small)."""
    if config is None:
        data = json.loads((ROOT / "benchmarks" / "results" / "sdxl_memory_estimate.json").read_text())
        t = next(t for t in data["table"] if t["config"] == TABLE_CONFIG[mode] and t["checkpointing"])
        fwd = t["forward_peak_gib"]["fixed"] + t["forward_peak_gib"]["per_row"] * rows
        bwd = t["backward_peak_gib"]["fixed"] + t["backward_peak_gib"]["per_row"] * rows
        return {"estimated_static_unet_gib": None, "estimated_peak": max(fwd, bwd), "estimated_from": "sdxl_memory_estimate.json"}
    from benchmarks.estimate_sdxl_memory import UNetMemory

    est = UNetMemory(config, mode=mode, lora_rank=16, checkpointing=True).peak_bytes(rows, latent)
    return {f"estimated_{k}": v / 2**30 for k, v in est.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", default="8,16")
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--config", choices=["sdxl", "small"], default="sdxl")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    config = None if args.config == "sdxl" else SMALL
    latent = 128 if args.config == "sdxl" else 16
    rows_out = []
    for mode in args.modes.split(","):
        for rows in (int(r) for r in args.rows.split(",")):
            row = {**measure(config, mode, rows, latent, args.device), **estimate(config, mode, rows, latent)}
            if row.get("estimated_peak") and row["measured_working_gib"]:
                row["measured_over_estimated_working"] = row["measured_working_gib"] / row["estimated_peak"]
            rows_out.append(row)
            print(json.dumps(row), flush=True)
            args.out.write_text(json.dumps({"rows": rows_out}, indent=1) + "\n")  # written as it goes
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
