"""Counted (not measured) GPU memory of Wan2.1 text-to-video RL at 81 frames of 480 x 832: 1.3B and 14B.

Nothing is allocated: the real WanTransformer3DModel configurations are built on PyTorch's ``meta`` device and
one training row (one sample at one denoising step: latents [16, 21, 60, 104], 32,760 tokens, 512 text tokens of
width 4096) runs forward and backward under the counting of benchmarks/estimate_sdxl_memory.py: CUDA's bf16
autocast policy emulated (``MetaAutocast``), FlashAttention for SDPA, every live storage followed from allocation
to release (``LiveBytes``), each checkpointed block's inputs counted. LoRA rank 32 on the attention projections,
base weights in bf16, gradient checkpointing per transformer block on or off. Per row the peak of forward and
backward; rows of a chunk add linearly (checked at 1 and 2 rows).

Static terms are counted from the parameter counts: the bf16 base weights, the LoRA weights with their gradients
and AdamW state (16 B per LoRA parameter). The UMT5-XXL text encoder (counted from its config) is listed apart: prompt encodings are cached, so it can stay off the GPU after encoding. Trajectory storage per sample is
counted from the states the trainer keeps: x_j and x_{j+1} of each trained step plus the last state, in float32.

Not counted: the allocator's fragmentation, the CUDA context and workspaces, the VAE decode of 81 frames (Wan's
causal VAE decodes frame by frame with a feature cache) and the reward model.
Run: ``python benchmarks/estimate_wan_memory.py``; writes benchmarks/results/wan_memory_estimate.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.estimate_sdxl_memory import GiB, LiveBytes, MetaAutocast, _checkpoint_counting  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers and Wan2.1-T2V-14B-Diffusers, transformer/config.json (architecture fields)
WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_CONFIGS = {"Wan2.1-T2V-1.3B": dict(WAN_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
               "Wan2.1-T2V-14B": dict(WAN_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40)}
# google/umt5-xxl (Wan2.1's text_encoder/config.json): the encoder's architecture fields
UMT5_XXL_CONFIG = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                       relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
FRAMES, HEIGHT, WIDTH, TEXT_TOKENS = 81, 480, 832, 512
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def latent_shape(frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> tuple[int, int, int, int]:
    """Wan's VAE: 4x temporal (the first frame kept), 8x spatial compression, 16 channels."""
    return (16, (frames - 1) // 4 + 1, height // 8, width // 8)


def build(config: dict, lora_rank: int, checkpointing: bool, counter: list, recompute_mode, device: str = "meta"):
    """The transformer on ``device`` with peft LoRA on the attention projections (base frozen, bf16 but for the modules
    diffusers keeps in fp32, as ``from_pretrained(torch_dtype=torch.bfloat16)`` loads it; adapters fp32)."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    with torch.device(device):
        model = WanTransformer3DModel(**config)
    model.to(torch.bfloat16).requires_grad_(False)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())  # as from_pretrained(torch_dtype=bf16) keeps them
    for name, module in model.named_modules():
        if keep & set(name.split(".")):
            module.float()
    with torch.device(device):
        model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS, init_lora_weights=True))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    if checkpointing:
        model.train()
        model.enable_gradient_checkpointing(_checkpoint_counting(counter, recompute_mode))
    return model


def row_peak(model, rows: int, shape: tuple, device: str = "meta") -> dict:
    """Live bytes above the weights, gradients and inputs during one forward + backward of ``rows`` rows."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    with torch.device(device):
        x = torch.randn(rows, *shape)
        t = torch.full((rows,), 500.0)
        text = torch.randn(rows, TEXT_TOKENS, model.config.text_dim)
    live, mode = LiveBytes([*model.parameters(), *model.buffers(), *(p.grad for p in trainable), x, t, text]), MetaAutocast("autocast")
    with live:
        with mode:
            out = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        forward_peak = live.peak
        mode.clear_cache()
        live.reset_peak()
        out.float().sum().backward()
        del out
    return {"forward_peak": forward_peak, "backward_peak": live.peak, "peak": max(forward_peak, live.peak)}


def estimate(name: str, lora_rank: int = 32, trained_steps: int = 10) -> dict:
    config = WAN_CONFIGS[name]
    shape = latent_shape()
    out = {"model": name, "latent_shape": list(shape), "tokens": shape[1] * (shape[2] // 2) * (shape[3] // 2), "lora_rank": lora_rank}
    for ckpt in (True, False):
        counter: list = [None]
        model = build(config, lora_rank, ckpt, counter, lambda: MetaAutocast("autocast"))
        if ckpt:
            out["params"] = sum(p.numel() for p in model.parameters() if not p.requires_grad)
            out["lora_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        peaks = {rows: row_peak(model, rows, shape)["peak"] for rows in (1, 2)}
        out["ckpt" if ckpt else "no_ckpt"] = {"peak_1_row": peaks[1], "peak_2_rows": peaks[2], "per_row": peaks[2] - peaks[1]}
        del model
    elems = 1
    for s in shape:
        elems *= s
    # the states the trainer keeps: x_j and x_{j+1} of every trained step, and the last state x_T
    # in fp32 (sample.trajectory_dtype=float32) and in the bf16 rollout dtype (bfloat16: 2 bytes a state element)
    out["trajectory_bytes_per_sample"] = {"all 10 steps trained (11 states), fp32": (trained_steps + 1) * elems * 4,
                                          "a window of 2 trained steps (4 states: 3 of the window, x_T), fp32": 4 * elems * 4,
                                          "all 10 steps trained, bf16 states": (trained_steps + 1) * elems * 2,
                                          "a window of 2 trained steps, bf16 states": 4 * elems * 2}
    out["static"] = {"base weights bf16 (2 B/param)": 2 * out["params"],
                     "LoRA weights + grads + AdamW m, v, fp32 (16 B/LoRA param)": 16 * out["lora_params"]}
    out["text_encoder_bf16"] = 2 * text_encoder_params()
    return out


def text_encoder_params() -> int:
    """Parameters of the UMT5-XXL encoder built from ``UMT5_XXL_CONFIG`` on the meta device."""
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**UMT5_XXL_CONFIG))
    return sum(p.numel() for p in model.parameters())


def render(results: list[dict], meta: dict) -> str:
    g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
    lines = ["# Wan2.1 RL memory at 81 frames of 480 x 832 (counted, not measured)", "",
             f"Counted on the meta device ({meta['date']}, commit {meta['commit']}, torch {meta['torch']}, diffusers "
             f"{meta['diffusers']}) by benchmarks/estimate_wan_memory.py: one training row = one sample at one step, latents "
             f"{results[0]['latent_shape']} ({results[0]['tokens']:,} tokens), LoRA rank {results[0]['lora_rank']}, bf16 autocast, "
             "FlashAttention. GiB.", "",
             "| model | base weights bf16 | LoRA + grads + AdamW | working memory per row, ckpt per block | per row, no ckpt | "
             "trajectory per sample, 10 trained steps / window of 2, fp32 (bf16 states) | UMT5-XXL bf16 (offloadable) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        s = list(r["static"].values())
        tr = list(r["trajectory_bytes_per_sample"].values())
        lines.append(f"| {r['model']} ({r['params'] / 1e9:.2f}B) | {g(s[0])} | {g(s[1])} | {g(r['ckpt']['peak_1_row'])} "
                     f"(+{g(r['ckpt']['per_row'])} per extra row) | {g(r['no_ckpt']['peak_1_row'])} | {tr[0] / 2**20:.0f} / "
                     f"{tr[1] / 2**20:.0f} MB ({tr[2] / 2**20:.0f} / {tr[3] / 2**20:.0f} MB) | {g(r['text_encoder_bf16'])} |")
    lines += ["", "A chunk of K rows needs about the static terms + the 1-row figure + (K - 1) x the per-row increment. Not "
              "counted: fragmentation, the CUDA context, the VAE decode of 81 frames, the reward model.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(WAN_CONFIGS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import diffusers

    from benchmarks.common import machine_info

    meta = machine_info("cpu")
    meta["diffusers"] = diffusers.__version__
    t0 = time.perf_counter()
    results = []
    for name in args.models.split(","):
        results.append(estimate(name))
        r = results[-1]
        print(f"{name}: {r['params'] / 1e9:.2f}B params, per row {r['ckpt']['peak_1_row'] / GiB:.1f} GiB with checkpointing, "
              f"{r['no_ckpt']['peak_1_row'] / GiB:.1f} GiB without", flush=True)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wan_memory_estimate.json").write_text(json.dumps({"machine": meta, "results": results}, indent=2) + "\n")
    (args.out / "wan_memory_estimate.md").write_text(render(results, meta))
    print(f"wrote {args.out / 'wan_memory_estimate.md'} in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
