"""Counted (not guessed) GPU memory of SDXL RL fine-tuning: what fits on one 80 GB GPU, per configuration.

No GPU is needed and nothing is allocated: the real SDXL-base UNet (2,567,463,684 parameters) and VAE are
built on PyTorch's ``meta`` device, where every op computes shapes and dtypes but no data, and the tensors
the real run would hold are counted:

1. Saved for backward. One forward of B rows runs under ``torch.autograd.graph.saved_tensors_hooks``; the
   pack hook records every tensor autograd keeps for the backward. Views and tensors saved twice (a SiLU
   output that the next conv saves again, a transposed weight) share one storage, so each storage is
   counted once: meta tensors have no data pointer, but they do have a real ``StorageImpl``, whose
   address (``untyped_storage()._cdata``) identifies it; the counter keeps every counted storage alive so
   that an address cannot be reused while counting. Saved parameters cost nothing extra (they are the
   weights); saved bf16 copies of parameters (autocast's weight casts) are reported apart from activations
   because they do not grow with B.
2. Peak over forward + backward. The same step runs under ``torch.distributed._tools.mem_tracker.MemTracker``
   (a dispatch mode that follows every storage from allocation to release through weak references), with
   the gradients already allocated (the steady state of gradient accumulation). Its peak minus what was
   live before the forward is the step's working memory: saved activations plus the transients of the
   backward (activation gradients, the recomputation of checkpointed blocks), which is what decides
   an out-of-memory error. The per-configuration table uses this figure.

Approximations (each also written into the results):
- Autocast does not run on meta. ``MetaAutocast`` (a ``TorchFunctionMode``) re-applies CUDA's bf16
  autocast policy to the functions the UNet calls (aten/src/ATen/autocast_mode.cpp): conv, linear,
  matmul/bmm/baddbmm and attention cast their inputs to bf16; group_norm, layer_norm, exp, pow, softmax
  and sum run in fp32; fp32 leaf tensors that require grad (trainable weights) are cast once per forward
  and cached, as autocast does. Merely casting the model and inputs to bf16 (``--precision bf16``, also
  reported) gives the right dtypes for matmul/conv outputs but not for the norms, whose fp32 outputs
  autocast keeps (about 1.5x the activation bytes of the pure-bf16 count).
- Attention: on meta, ``F.scaled_dot_product_attention`` always takes the math path and would save the
  full [L, L] score matrix (in fp32). On a GPU, bf16 SDPA with head dim 64 runs FlashAttention (xformers
  when installed), which saves only q, k, v, the output and a per-row log-sum-exp. ``MetaAutocast``
  therefore calls ``aten._scaled_dot_product_flash_attention`` (head dim <= 256) or
  ``aten._scaled_dot_product_efficient_attention`` (larger, e.g. the VAE's 512) directly; both have
  meta kernels and backward formulas.
- Gradient checkpointing: diffusers' ``enable_gradient_checkpointing`` is given a wrapper of the same
  ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` call that also counts the block's tensor
  inputs (held by the checkpoint, not through saved-tensor hooks). Recomputation does run on meta, so
  the peak includes the recomputed block.
- The allocator is not modelled (fragmentation, caching, rounding to 512 B blocks), nor the CUDA context
  (~0.5-1 GB), cuDNN / cuBLAS workspaces and NCCL buffers: the 10% headroom stands for these.

Run: ``python benchmarks/estimate_sdxl_memory.py`` (70-80 s on 2 busy CPU cores, under 1 GB of RAM); writes
benchmarks/results/sdxl_memory_estimate.{json,md}. ``--capacity-gib``, ``--headroom``, ``--world`` and
``--latent`` change the budget, the ZeRO world size and the resolution.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import weakref
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

GiB = 2**30

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the architecture-defining fields)
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # diffusers' name for the number of heads here; head dim = 64
    use_linear_projection=True,
    upcast_attention=None,
    resnet_time_scale_shift="default",
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 (pooled bigG text) + 6 x 256 (time ids)
)
SDXL_UNET_PARAMS = 2_567_463_684

# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json
SDXL_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)

# the two text encoders (transformers configs of CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers)
CLIP_L_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                        num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
TEXT_TOKENS = 77
POOLED_DIM, TIME_IDS = 1280, 6

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# ---- models on the meta device -------------------------------------------------------------------
def build_unet(config: Optional[dict] = None, lora_rank: Optional[int] = None, base_dtype: torch.dtype = torch.float32,
               device: str = "meta"):
    """The UNet on the meta device (no memory); with ``lora_rank``, peft LoRA on the attention projections
    attached the way the trainer does it (diffusers' ``add_adapter``), base weights frozen. ``device="cpu"``
    builds a real one (the tests check the meta count against real tensors on a small config)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**(config or SDXL_UNET_CONFIG))
    unet.to(dtype=base_dtype)
    if lora_rank is not None:
        from peft import LoraConfig

        unet.requires_grad_(False)
        with torch.device(device):
            unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS, init_lora_weights=True))
        for name, p in unet.named_parameters():  # adapters train in fp32 whatever the base dtype (peft's default)
            if "lora_" in name:
                p.data = p.data.float()
    return unet


def count_parameters(config: Optional[dict] = None) -> int:
    """Parameters of the UNet built from ``config`` (SDXL-base by default: 2,567,463,684)."""
    return sum(p.numel() for p in build_unet(config).parameters())


def lora_parameters(rank: int, config: Optional[dict] = None) -> int:
    unet = build_unet(config, lora_rank=rank)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def text_encoder_parameters() -> dict:
    """Parameters of SDXL's two text encoders, built on meta from their configs."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_CONFIG))
    return {"clip_l": sum(p.numel() for p in clip_l.parameters()), "clip_bigg": sum(p.numel() for p in clip_g.parameters())}


def build_vae(dtype: torch.dtype = torch.bfloat16):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    return vae.to(dtype=dtype).requires_grad_(False).eval()


# ---- CUDA bf16 autocast, re-applied on meta ------------------------------------------------------
_LOWER = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, F.conv_transpose3d, torch.matmul, torch.mm, torch.bmm, torch.baddbmm,
          torch.addmm, torch.einsum, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm,
          torch.Tensor.mm, torch.Tensor.baddbmm, F.scaled_dot_product_attention}
_FP32 = {F.group_norm, F.layer_norm, torch.exp, torch.Tensor.exp, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__,
         torch.log, torch.Tensor.log, torch.rsqrt, torch.Tensor.rsqrt, F.softplus}
_FP32_OUT = {F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.sum, torch.Tensor.sum}


class MetaAutocast(TorchFunctionMode):
    """CUDA's bf16 autocast policy for the ops a diffusers UNet / VAE calls, plus FlashAttention for SDPA.

    ``policy="autocast"``: lower-precision ops cast fp32 inputs to bf16 (trainable fp32 leaf tensors once
    per forward, cached like autocast's weight cache), fp32 ops cast bf16 inputs to fp32.
    ``policy="none"``: no casting (a model already cast to bf16), only the attention routing.
    With ``record_copies``, casts of parameters are recorded in ``weight_copies`` (storage address -> bytes)
    and kept alive so that the address stays theirs (for counting saved tensors; not for live-memory peaks).
    """

    def __init__(self, policy: str = "autocast", record_copies: bool = False) -> None:
        super().__init__()
        if policy not in ("autocast", "none"):
            raise ValueError(f"policy must be 'autocast' or 'none', got {policy!r}")
        self.policy = policy
        self.record_copies = record_copies
        self.cache: dict[int, torch.Tensor] = {}
        self.weight_copies: dict[int, int] = {}
        self._keep: list = []

    def clear_cache(self) -> None:
        """What leaving ``torch.autocast`` does: drop the cached weight casts (tensors still saved for
        backward stay alive through autograd)."""
        self.cache.clear()

    def _cast(self, x, dtype: torch.dtype):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype in (dtype, torch.float64):
            return x
        is_weight = isinstance(x, torch.nn.Parameter)
        if x.is_leaf and x.requires_grad and dtype == torch.bfloat16:
            if id(x) not in self.cache:
                self.cache[id(x)] = x.to(dtype)
                self._note_copy(self.cache[id(x)])
            return self.cache[id(x)]
        out = x.to(dtype)
        if is_weight:
            self._note_copy(out)
        return out

    def _note_copy(self, t: torch.Tensor) -> None:
        if not self.record_copies:
            return
        s = t.untyped_storage()
        self.weight_copies[s._cdata] = s.nbytes()
        self._keep.append(s)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.policy == "autocast":
            if func in _LOWER:
                args = tuple(self._cast(a, torch.bfloat16) for a in args)
                kwargs = {k: self._cast(v, torch.bfloat16) for k, v in kwargs.items()}
            elif func in _FP32:
                args = tuple(self._cast(a, torch.float32) for a in args)
                kwargs = {k: self._cast(v, torch.float32) for k, v in kwargs.items()}
            elif func in _FP32_OUT and "dtype" not in kwargs and isinstance(args[0], torch.Tensor) \
                    and args[0].dtype in (torch.bfloat16, torch.float16):
                kwargs = dict(kwargs, dtype=torch.float32)
        if func is F.scaled_dot_product_attention:
            return _fused_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What CUDA SDPA runs for bf16 without a mask: FlashAttention, or memory-efficient attention for head
    dims FlashAttention does not take. Both save q, k, v, the output and a [B, H, L] fp32 log-sum-exp."""
    if query.device.type != "meta":  # real tensors: the device's own SDPA kernel choice
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
    if attn_mask is not None:
        raise NotImplementedError("attention masks are not modelled (SDXL's UNet and VAE use none)")
    if query.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, False, dropout_p, is_causal, scale=scale)[0]


# ---- counting ---------------------------------------------------------------------------------------
class SavedTensorCounter:
    """Bytes autograd saves for backward, each storage once, split into activations and weight copies."""

    def __init__(self, params, weight_copies: dict[int, int]) -> None:
        self.param_storages = {p.untyped_storage()._cdata for p in params}
        self.weight_copies = weight_copies
        self.seen: dict[int, str] = {}
        self.bytes = {"activation": 0, "weight_copy": 0, "checkpoint_input": 0}
        self._keep: list = []

    def add(self, t: torch.Tensor, category: str = "activation") -> None:
        s = t.untyped_storage()
        key = s._cdata
        if key in self.seen or key in self.param_storages:
            return
        if key in self.weight_copies:
            category = "weight_copy"
        self.seen[key] = category
        self.bytes[category] += s.nbytes()
        self._keep.append(s)  # keep the storage (and its address) alive until counting is over

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    @contextlib.contextmanager
    def hooks(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self


def _checkpoint_counting(counter_ref: list, recompute_mode):
    """diffusers' default checkpoint function (non-reentrant ``torch.utils.checkpoint``), also counting the
    tensor inputs each checkpointed block holds. Torch-function modes do not reach the recomputation in
    backward, so the emulated autocast is re-entered there through ``context_fn`` (as the real
    checkpoint re-enters ``torch.autocast``)."""
    def checkpoint(module, *args):
        if counter_ref and counter_ref[0] is not None:
            for a in args:
                if isinstance(a, torch.Tensor):
                    counter_ref[0].add(a, "checkpoint_input")
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                 context_fn=lambda: (contextlib.nullcontext(), recompute_mode()))

    return checkpoint


class LiveBytes(TorchDispatchMode):
    """Bytes of all storages created inside the mode and still alive, and their peak: every op's outputs
    are followed by weak references to their storages (each storage once), released when the last
    tensor on them dies. Reaches the backward pass too (dispatch modes, unlike function modes, are
    carried into autograd's engine)."""

    def __init__(self, existing=()) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, object] = {}
        # storages made before the mode (weights, gradients, inputs): views of them are not allocations
        self._existing = {t.untyped_storage()._cdata for t in existing}

    def _release(self, key: int, nbytes: int, ref) -> None:
        if self._live.get(key) is ref:
            del self._live[key]
            self.current -= nbytes

    def track(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        key = s._cdata
        if key in self._live or key in self._existing:
            return
        nbytes = s.nbytes()
        ref = weakref.ref(s, lambda r, key=key, n=nbytes: self._release(key, n, r))
        self._live[key] = ref
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def unet_inputs(unet, rows: int, latent: int, dtype: torch.dtype = torch.float32) -> tuple:
    """Meta inputs of one packed forward: latents, timesteps, text states and (SDXL) pooled text + time ids."""
    cfg = unet.config
    with torch.device(unet.device):
        x = torch.randn(rows, cfg.in_channels, latent, latent, dtype=dtype)
        t = torch.randint(0, 1000, (rows,))
        text = torch.randn(rows, TEXT_TOKENS, cfg.cross_attention_dim, dtype=dtype)
        added = None
        if cfg.addition_embed_type == "text_time":
            added = {"text_embeds": torch.randn(rows, POOLED_DIM, dtype=dtype), "time_ids": torch.randn(rows, TIME_IDS, dtype=dtype)}
    return x, t, text, added


class UNetMemory:
    """One UNet on meta, set up as one training configuration, whose forward / backward memory is counted.

    mode: "full" (every weight trains), "lora" (peft LoRA rank ``lora_rank``, base frozen) or "frozen"
    (a no-grad forward: the reference policy, sampling). precision: "autocast" (fp32 master weights or
    ``base_dtype`` under emulated bf16 autocast) or "bf16" (model and inputs cast to bf16, no autocast).
    """

    def __init__(self, config: Optional[dict] = None, *, mode: str = "full", lora_rank: int = 16,
                 precision: str = "autocast", base_dtype: Optional[torch.dtype] = None, checkpointing: bool = False,
                 device: str = "meta") -> None:
        if mode not in ("full", "lora", "frozen"):
            raise ValueError(f"mode must be full, lora or frozen, got {mode!r}")
        if precision not in ("autocast", "bf16"):
            raise ValueError(f"precision must be autocast or bf16, got {precision!r}")
        if base_dtype is None:
            base_dtype = torch.bfloat16 if (precision == "bf16" or mode != "full") else torch.float32
        self.mode, self.precision = mode, precision
        self.unet = build_unet(config, lora_rank=lora_rank if mode == "lora" else None, base_dtype=base_dtype, device=device)
        if mode == "full":
            self.unet.requires_grad_(True)
        elif mode == "frozen":
            self.unet.requires_grad_(False)
        if precision == "bf16":
            self.unet.to(dtype=torch.bfloat16)
        self._counter: list = [None]
        if checkpointing:
            self.unet.train()
            self.unet.enable_gradient_checkpointing(_checkpoint_counting(self._counter, self._mode))
        self.trainable = [p for p in self.unet.parameters() if p.requires_grad]
        self.input_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def _forward(self, mode: MetaAutocast, rows: int, latent: int) -> torch.Tensor:
        x, t, text, added = unet_inputs(self.unet, rows, latent, self.input_dtype)
        with mode:
            out = self.unet(x, t, text, added_cond_kwargs=added).sample
        mode.clear_cache()
        return out

    def _mode(self, record_copies: bool = False) -> MetaAutocast:
        return MetaAutocast("autocast" if self.precision == "autocast" else "none", record_copies)

    def saved_bytes(self, rows: int, latent: int) -> dict:
        """Bytes saved for backward by one forward of ``rows`` rows (each storage once)."""
        mode = self._mode(record_copies=True)
        counter = SavedTensorCounter(self.unet.parameters(), mode.weight_copies)
        self._counter[0] = counter
        try:
            with counter.hooks():
                out = self._forward(mode, rows, latent)
        finally:
            self._counter[0] = None
        del out
        return dict(counter.bytes, total=sum(counter.bytes.values()))

    def peak_bytes(self, rows: int, latent: int) -> dict:
        """Live bytes above what was live before the forward: the forward's peak (with autocast's weight
        cache still alive at its end), what is left after it, and the backward's peak."""
        for p in self.trainable:  # the steady state of gradient accumulation: gradients already exist
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        x, t, text, added = unet_inputs(self.unet, rows, latent, self.input_dtype)
        grad = self.mode != "frozen"
        existing = [*self.unet.parameters(), *self.unet.buffers(), *(p.grad for p in self.trainable), x, t, text,
                    *(added or {}).values()]
        live, mode = LiveBytes(existing), self._mode()
        with live:
            with torch.set_grad_enabled(grad), mode:
                out = self.unet(x, t, text, added_cond_kwargs=added).sample
            forward_peak = live.peak
            mode.clear_cache()
            after_forward = live.current
            live.reset_peak()
            if grad:
                out.float().sum().backward()
            del out
        return {"forward_peak": forward_peak, "after_forward": after_forward, "backward_peak": live.peak,
                "peak": max(forward_peak, live.peak)}


def vae_decode_peak(latent: int = 128, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Peak live bytes of ``vae.decode`` of one image under no_grad, above the weights and the latent."""
    vae = build_vae(dtype)
    z = torch.empty(1, SDXL_VAE_CONFIG["latent_channels"], latent, latent, device="meta", dtype=dtype)
    live = LiveBytes([*vae.parameters(), *vae.buffers(), z])
    with live, torch.no_grad(), MetaAutocast("none"):
        image = vae.decode(z).sample
        shape = tuple(image.shape)
        del image
    return {"peak": live.peak, "image_shape": shape, "params": sum(p.numel() for p in vae.parameters()),
            "decoder_params": sum(p.numel() for n, p in vae.named_parameters() if n.startswith(("decoder", "post_quant")))}


# ---- the per-GPU memory model ------------------------------------------------------------------------
def linear_fit(points: dict[int, float]) -> tuple[float, float]:
    """(intercept, slope) through the two largest row counts: peaks are a max over time of
    intercept(t) + rows x slope(t), so the largest counts give the slope that holds for larger chunks."""
    (r1, y1), (r2, y2) = sorted(points.items())[-2:]
    slope = (y2 - y1) / (r2 - r1)
    return y1 - slope * r1, slope


def static_terms(kind: str, n_params: int, n_lora: int, world: int, encoders: dict, vae: dict, *,
                 frozen_bytes: int = 2) -> tuple[dict, dict, int]:
    """(terms, reference terms, optimizer-step transient) in bytes for one training configuration.

    kind: "lora" (torch AdamW on the adapters, base in bf16), "lora_fp32" (the same with the fp32 base the
    trainer loads today), "full" (torch AdamW, fp32 weights = master weights), "full_ddp" (the same under
    DDP), "zero2" / "zero3"
    (DeepSpeed bf16: bf16 module, fp32 master + AdamW state sharded over ``world`` ranks).
    """
    P, N = n_params, world
    enc = encoders["clip_l"] + encoders["clip_bigg"]
    t: dict[str, int] = {}
    if kind in ("lora", "lora_fp32"):
        base = 4 if kind == "lora_fp32" else 2
        t[f"UNet base weights, frozen, {'fp32' if base == 4 else 'bf16'} ({base} B/param)"] = base * P
        t["LoRA weights fp32 + grads fp32 + AdamW m, v fp32 (16 B/LoRA param)"] = 16 * n_lora
        ref = {"reference policy: the adapter switched off (no copy)": 0}
        step = 4 * n_lora
    elif kind in ("full", "full_ddp"):
        t["UNet weights fp32 = master weights (4 B/param)"] = 4 * P
        t["UNet grads fp32 (4 B/param)"] = 4 * P
        t["AdamW m, v fp32 (8 B/param)"] = 8 * P
        if kind == "full_ddp":  # distributed.py builds DDP without gradient_as_bucket_view
            t["DDP gradient buckets, a second fp32 copy of the grads (4 B/param)"] = 4 * P
        ref = {"reference copy, frozen bf16 (2 B/param)": 2 * P}
        step = 4 * P  # torch's foreach AdamW: torch._foreach_sqrt(exp_avg_sqs), one fp32 tensor per parameter
    elif kind in ("zero2", "zero3"):
        # DeepSpeed bf16: a bf16 module, bf16 gradients, fp32 master weights and AdamW state; the fp32 gradient
        # partition built for the step is counted as resident, as DeepSpeed's estimate_zero2/3_model_states_mem_needs do
        if kind == "zero2":
            t["UNet weights bf16, replicated (2 B/param)"] = 2 * P
        else:
            t[f"UNet weights bf16, sharded (2 B/param / {N})"] = 2 * P // N
        t[f"UNet grads bf16, sharded (2 B/param / {N})"] = 2 * P // N
        t[f"fp32 gradient partition for the step, sharded (4 B/param / {N})"] = 4 * P // N
        t[f"fp32 master weights, sharded (4 B/param / {N})"] = 4 * P // N
        t[f"AdamW m, v fp32, sharded (8 B/param / {N})"] = 8 * P // N
        if kind == "zero2":
            t["ZeRO-2 gradient buckets: 2 x reduce_bucket_size 5e7 x 2 B (configs/deepspeed_zero2.json)"] = 2 * 50_000_000 * 2
        else:
            t["ZeRO-3 gathered weights in flight: <= stage3_max_live_parameters 1e9 x 2 B (DeepSpeed default)"] = 10**9 * 2
            t["ZeRO-3 prefetch bucket 5e7 x 2 B + reduce bucket 5e8 x 2 B (DeepSpeed defaults)"] = (50_000_000 + 500_000_000) * 2
        ref = {"reference copy, frozen bf16, not sharded (2 B/param)": 2 * P}
        step = 0
    else:
        raise ValueError(kind)
    t[f"text encoders CLIP-L + OpenCLIP-bigG, {frozen_bytes * 8}-bit ({enc / 1e6:.0f}M params)"] = frozen_bytes * enc
    t[f"VAE, {frozen_bytes * 8}-bit ({vae['params'] / 1e6:.1f}M params)"] = frozen_bytes * vae["params"]
    t[f"VAE decode of one 1024px image, {'bf16' if frozen_bytes == 2 else 'fp32'} (counted peak)"] = vae["decode_peak" if frozen_bytes == 2 else "decode_peak_fp32"]
    return t, ref, step


def working_memory(fits: dict, rows: int, reference: Optional[tuple] = None) -> float:
    """Bytes above the static memory while one chunk of ``rows`` rows trains: the larger of the forward's
    and the backward's peak (each fixed + per-row x rows); with ``reference`` (a KL algorithm), the
    reference policy's no-grad forward on top of what the policy's forward left for backward."""
    at = lambda fit: fit[0] + fit[1] * rows  # noqa: E731
    w = max(at(fits["forward_peak"]), at(fits["backward_peak"]))
    if reference is not None:
        w = max(w, at(fits["after_forward"]) + at(reference))
    return w


def max_rows(peak_at, budget: float, limit: int = 4096) -> int:
    """Largest even row count (2 x n x K) whose peak fits the budget; 0 when not even 2 rows fit."""
    best = 0
    for rows in range(2, limit + 1, 2):
        if peak_at(rows) > budget:
            break
        best = rows
    return best


CONFIGS = [  # (name, static kind, UNetMemory arguments)
    ("LoRA r=16, bf16 base", "lora", dict(mode="lora", lora_rank=16, base_dtype=torch.bfloat16)),
    ("full FT, no ZeRO, 1 GPU (fp32 weights, torch AdamW)", "full", dict(mode="full", base_dtype=torch.float32)),
    ("full FT, DDP x 8 (fp32 weights, torch AdamW)", "full_ddp", dict(mode="full", base_dtype=torch.float32)),
    ("full FT, ZeRO-2 x 8 (DeepSpeed bf16)", "zero2", dict(mode="full", base_dtype=torch.bfloat16)),
    ("full FT, ZeRO-3 x 8 (DeepSpeed bf16)", "zero3", dict(mode="full", base_dtype=torch.bfloat16)),
    ("LoRA r=16, fp32 base + fp32 encoders/VAE (as the trainer loads today)", "lora_fp32",
     dict(mode="lora", lora_rank=16, base_dtype=torch.float32)),
]


def scaling_study(latents, batch_sizes, log) -> list[dict]:
    """Saved-for-backward bytes of the SDXL UNet (full FT, emulated bf16 autocast) per latent size and B."""
    rows = []
    for ckpt in (False, True):
        m = UNetMemory(mode="full", checkpointing=ckpt)
        for latent in latents:
            for b in batch_sizes:
                r = m.saved_bytes(b, latent)
                per_row = (r["activation"] + r["checkpoint_input"]) / b
                rows.append({"latent": latent, "rows": b, "checkpointing": ckpt, **{f"{k}_bytes": v for k, v in r.items()},
                             "activation_gib_per_row": per_row / GiB})
                log(f"  latent {latent:3d}x{latent:<3d} B={b} ckpt={str(ckpt):5s}  activations {per_row / GiB:7.3f} GiB/row   "
                    f"weight copies {r['weight_copy'] / GiB:6.3f} GiB")
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capacity-gib", type=float, default=80.0, help="GPU memory (GiB)")
    ap.add_argument("--headroom", type=float, default=0.10, help="fraction kept free for the allocator")
    ap.add_argument("--world", type=int, default=8, help="GPUs the ZeRO rows shard over")
    ap.add_argument("--latent", type=int, default=128, help="latent side (128 = 1024px)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args(argv)
    import diffusers
    import peft
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to(dtype)
    t_start = time.perf_counter()
    log = print
    latent, budget = args.latent, args.capacity_gib * (1 - args.headroom) * GiB

    n_params = count_parameters()
    log(f"SDXL-base UNet parameters: {n_params:,}")
    assert n_params == SDXL_UNET_PARAMS, f"SDXL UNet has {n_params:,} parameters, expected {SDXL_UNET_PARAMS:,}"
    n_lora = lora_parameters(16)
    encoders = text_encoder_parameters()
    log(f"LoRA r=16 on {LORA_TARGETS}: {n_lora:,} trainable; text encoders {encoders}")

    log("\nsaved for backward, full fine-tuning, emulated bf16 autocast (activations per row):")
    scaling = scaling_study((32, 64, latent), (1, 2, 4), log)
    linearity = []
    for r in scaling:
        one = next(o for o in scaling if o["latent"] == r["latent"] and o["checkpointing"] == r["checkpointing"] and o["rows"] == 1)
        act = lambda x: x["activation_bytes"] + x["checkpoint_input_bytes"]  # noqa: E731
        if r["rows"] > 1:
            linearity.append({"latent": r["latent"], "checkpointing": r["checkpointing"], "rows": r["rows"],
                              "ratio_to_rows_x_one_row": act(r) / (r["rows"] * act(one))})
    log("  linearity, bytes(B) / (B x bytes(1)): " + ", ".join(f"{x['ratio_to_rows_x_one_row']:.4f}" for x in linearity))
    compare = {}
    for name, kw in (("full FT, autocast", dict(mode="full")), ("full FT, model cast to bf16", dict(mode="full", precision="bf16")),
                     ("LoRA r=16, autocast", dict(mode="lora")), ("LoRA r=16, model cast to bf16", dict(mode="lora", precision="bf16"))):
        for ckpt in (False, True):
            r = UNetMemory(checkpointing=ckpt, **kw).saved_bytes(2, latent)
            compare[f"{name}, ckpt={ckpt}"] = {**r, "activation_per_row": (r["activation"] + r["checkpoint_input"]) / 2}
    log(f"\nsaved for backward at {latent}x{latent}, per row (B=2):")
    for k, r in compare.items():
        log(f"  {k:45s} {r['activation_per_row'] / GiB:7.3f} GiB/row  (+ weight copies {r['weight_copy'] / GiB:.3f} GiB)")

    vae = vae_decode_peak(latent)
    vae["decode_peak"] = vae["peak"]
    vae["decode_peak_fp32"] = vae_decode_peak(latent, torch.float32)["peak"]
    log(f"\nVAE ({vae['params']:,} params) decode of one {vae['image_shape'][-1]}px image, no_grad: peak {vae['peak'] / GiB:.3f} GiB "
        f"in bf16, {vae['decode_peak_fp32'] / GiB:.3f} GiB in fp32")

    log(f"\npeak of forward + backward at {latent}x{latent} (above weights, grads, inputs), B = 2 and 4:")
    frozen = UNetMemory(mode="frozen")
    ref_fit = linear_fit({b: frozen.peak_bytes(b, latent)["peak"] for b in (2, 4)})
    log(f"  no-grad forward (reference policy / sampling): {ref_fit[1] / GiB:.3f} GiB/row + {ref_fit[0] / GiB:.3f} GiB")
    measured = {}
    for name, kind, kw in CONFIGS:
        for ckpt in (False, True):
            key = (tuple(sorted(kw.items(), key=str)), ckpt)
            if key not in measured:
                m = UNetMemory(checkpointing=ckpt, **kw)
                pts = {b: m.peak_bytes(b, latent) for b in (2, 4)}
                fits = {k: linear_fit({b: p[k] for b, p in pts.items()}) for k in ("forward_peak", "after_forward", "backward_peak")}
                check = m.peak_bytes(8, latent)["peak"]  # the two-phase linear model against a larger chunk
                fits["check_rows_8"] = (check, working_memory(fits, 8))
                measured[key] = fits
                del m
            f = measured[key]
            log(f"  {name:70s} ckpt={str(ckpt):5s} forward {f['forward_peak'][1] / GiB:6.3f} GiB/row + {f['forward_peak'][0] / GiB:5.2f}, "
                f"backward {f['backward_peak'][1] / GiB:6.3f} GiB/row + {f['backward_peak'][0] / GiB:5.2f}; "
                f"8 rows: counted {f['check_rows_8'][0] / GiB:.2f}, model {f['check_rows_8'][1] / GiB:.2f} GiB")

    table = []
    default_rows = 2 * 2 * 4  # configs/sdxl.yaml: train.batch_size 2 x chunk_size 4, x2 for guidance
    for name, kind, kw in CONFIGS:
        terms, ref_terms, step = static_terms(kind, n_params, n_lora, args.world, encoders, vae,
                                              frozen_bytes=4 if kind == "lora_fp32" else 2)
        static = sum(terms.values())
        ref_static = sum(ref_terms.values())
        for ckpt in (False, True):
            fits = measured[(tuple(sorted(kw.items(), key=str)), ckpt)]

            def peak(rows, kl=False, fits=fits):
                return static + (ref_static if kl else 0) + max(working_memory(fits, rows, ref_fit if kl else None), step)

            row = {
                "config": name, "checkpointing": ckpt, "static_gib": static / GiB, "reference_gib": ref_static / GiB,
                "optimizer_step_transient_gib": step / GiB,
                "forward_peak_gib": {"fixed": fits["forward_peak"][0] / GiB, "per_row": fits["forward_peak"][1] / GiB},
                "backward_peak_gib": {"fixed": fits["backward_peak"][0] / GiB, "per_row": fits["backward_peak"][1] / GiB},
                "after_forward_gib": {"fixed": fits["after_forward"][0] / GiB, "per_row": fits["after_forward"][1] / GiB},
                "check_8_rows_gib": {"counted": fits["check_rows_8"][0] / GiB, "model": fits["check_rows_8"][1] / GiB},
                "working_gib_at_16_rows": working_memory(fits, default_rows) / GiB,
                "peak_gib_at_16_rows": peak(default_rows) / GiB, "peak_gib_at_16_rows_kl": peak(default_rows, True) / GiB,
                "max_rows": max_rows(peak, budget), "max_rows_kl": max_rows(lambda r: peak(r, True), budget),
                "terms_gib": {k: v / GiB for k, v in terms.items()}, "reference_terms_gib": {k: v / GiB for k, v in ref_terms.items()},
            }
            table.append(row)

    from benchmarks.common import git_commit

    result = {
        "what": "SDXL-base fine-tuning memory per GPU, counted on the meta device (no GPU)",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__, "commit": git_commit()},
        "unet_params": n_params, "lora_r16_params": n_lora, "text_encoder_params": encoders,
        "vae_params": vae["params"], "vae_decode_peak_gib": vae["peak"] / GiB, "vae_decode_peak_fp32_gib": vae["decode_peak_fp32"] / GiB,
        "latent": latent, "capacity_gib": args.capacity_gib, "headroom": args.headroom, "budget_gib": budget / GiB,
        "world": args.world, "default_rows": default_rows,
        "no_grad_forward_gib_per_row": ref_fit[1] / GiB,
        "saved_for_backward_scaling": scaling,
        "linearity_in_rows": linearity,
        "saved_for_backward_compare": {k: {f"{kk}_gib": vv / GiB for kk, vv in v.items()} for k, v in compare.items()},
        "table": table,
        "approximations": APPROXIMATIONS,
        "seconds": time.perf_counter() - t_start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sdxl_memory_estimate.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render_markdown(result)
    (args.out / "sdxl_memory_estimate.md").write_text(md)
    log("\n" + md)
    log(f"wrote {args.out / 'sdxl_memory_estimate.json'} and .md in {result['seconds']:.0f} s")
    return result


APPROXIMATIONS = [
    "Counted on the meta device, not measured on a GPU (none was available): shapes and dtypes are exact, "
    "the caching allocator is not modelled (fragmentation, 512 B rounding, cached free blocks), nor the CUDA "
    "context (~0.5-1 GB), cuBLAS/cuDNN/FlashAttention workspaces and NCCL buffers; the 10% headroom stands for them.",
    "bf16 autocast is emulated (MetaAutocast, a TorchFunctionMode with CUDA's autocast_mode.cpp policy for the ops "
    "the UNet calls: conv/linear/matmul/attention in bf16; group_norm, layer_norm, exp, pow, softmax, sum in fp32; "
    "trainable fp32 weights cast once per forward and cached). Casting the model to bf16 instead (also reported) "
    "misses autocast's fp32 norm outputs and undercounts activations by a fifth to a quarter.",
    "Attention is counted as CUDA's fused SDPA (FlashAttention; memory-efficient attention for head dims > 256): "
    "q, k, v, output and an fp32 log-sum-exp are saved, never the [L, L] scores (meta's own SDPA takes the math path).",
    "Each storage is counted once (its StorageImpl address stands in for the data pointer meta tensors lack); on a "
    "small UNet the meta count equals a real CPU run's within 1% (tests/test_sdxl_memory_estimate.py).",
    "Gradient checkpointing as diffusers does it (non-reentrant torch.utils.checkpoint around each resnet and each "
    "transformer block); the checkpointed blocks' inputs are counted, and the recomputation runs on meta, so the "
    "peak includes the recomputed block and the activation gradients of the backward.",
    "Peaks assume gradients already allocated (gradient accumulation's steady state) and a chunk's backward right "
    "after its forward, as the trainer does; the forward's and the backward's peaks are each fitted through 2 and 4 "
    "rows (fixed + per-row x rows) and checked against a direct count at 8 rows.",
    "DeepSpeed terms (bf16 grads, fp32 master + AdamW state sharded, bucket sizes, ZeRO-3's live-parameter bound) are "
    "formulas from the configs and DeepSpeed's defaults, not counted; ZeRO-3's in-flight weights take the bound "
    "stage3_max_live_parameters = 1e9 (2 GB bf16), an upper estimate.",
    "The optimizer step runs after the activations are freed: its transient (torch's foreach AdamW, the default on "
    "CUDA, allocates sqrt(v) for all parameters at once: 4 B/param) enters the peak only where it exceeds the "
    "chunk's working memory.",
    "VAE decode and the text encoders run during sampling, not during the training backward; their weights stay on "
    "the GPU and the decode peak is added anyway (conservative, 1.5 GB). Sampling itself (no-grad forwards of the "
    "rollout batch) needs far less than training: see no_grad_forward_gib_per_row.",
    "DeepSpeed bf16 keeps gradients in the module's dtype (bf16, 2 B/param, sharded under ZeRO-2/3) and builds an fp32 "
    "gradient partition (4 B/param / N) for the step, counted as resident as DeepSpeed's own "
    "estimate_zero2_model_states_mem_needs does (its 2P + 18P/N for ZeRO-2 is our 2P + 18P/N before buckets).",
    "Under DDP (torchrun without DeepSpeed) the trainer's DistributedDataParallel has no gradient_as_bucket_view, so "
    "its gradient buckets are a second fp32 copy of the gradients (4 B/param); the 'DDP x 8' row counts it.",
    "The fp32 row is the trainer as it loads models today (load_model's default float32 for every component).",
    "A KL algorithm's reference forward runs while the policy's forward activations are held (algos/common.py "
    "chunk_kl); its no-grad transient is added to them.",
]


def _g(x: float) -> str:
    return f"{x:.2f}"


def render_markdown(r: dict) -> str:
    L = r["latent"]
    out = [
        "# SDXL fine-tuning memory per GPU (counted on the meta device)",
        "",
        f"Written by `python benchmarks/estimate_sdxl_memory.py` in {r['seconds']:.0f} s on a CPU; torch {r['versions']['torch']}, "
        f"diffusers {r['versions']['diffusers']}, peft {r['versions']['peft']}, commit {r['versions']['commit']}. "
        "**Counted, not measured on a GPU**: the real SDXL-base UNet and VAE are built on PyTorch's meta device and "
        "every tensor saved for backward (or alive, for peaks) is counted; see the approximations at the end. "
        "GiB = 2^30 bytes.",
        "",
        f"SDXL-base UNet: **{r['unet_params']:,}** parameters; LoRA r=16 on to_q/to_k/to_v/to_out.0: {r['lora_r16_params']:,}; "
        f"text encoders CLIP-L {r['text_encoder_params']['clip_l']:,} + OpenCLIP-bigG {r['text_encoder_params']['clip_bigg']:,}; "
        f"VAE {r['vae_params']:,}.",
        "",
        "## Activations saved for backward, per row",
        "",
        "Full fine-tuning, emulated bf16 autocast; a row is one latent (one of the 2 x n x K rows of a chunk). "
        "Linear in B (rows), about proportional to the latent area.",
        "",
        "| latent | B | no checkpointing, GiB/row | with checkpointing, GiB/row |",
        "| --- | --- | --- | --- |",
    ]
    sc = r["saved_for_backward_scaling"]
    for latent in sorted({s["latent"] for s in sc}):
        for b in sorted({s["rows"] for s in sc}):
            cells = [next(s["activation_gib_per_row"] for s in sc if s["latent"] == latent and s["rows"] == b and s["checkpointing"] == c)
                     for c in (False, True)]
            out.append(f"| {latent}x{latent} | {b} | {cells[0]:.3f} | {cells[1]:.3f} |")
    ratios = [x["ratio_to_rows_x_one_row"] for x in r["linearity_in_rows"]]
    out += ["", f"Linearity: bytes(B) / (B x bytes(1)) is between {min(ratios):.4f} and {max(ratios):.4f} for every latent size "
            "and B = 2, 4, with and without checkpointing."]
    out += ["", f"At {L}x{L} (B = 2), per row, and the bf16 weight copies saved alongside (do not grow with B):", "",
            "| setup | activations, GiB/row | saved weight copies, GiB |", "| --- | --- | --- |"]
    for k, v in r["saved_for_backward_compare"].items():
        out.append(f"| {k} | {v['activation_per_row_gib']:.3f} | {v['weight_copy_gib']:.3f} |")
    out += [
        "",
        f"## Peak per GPU at {L}x{L} (1024 px)",
        "",
        f"Peak = static memory + max(working memory of one chunk, optimizer-step transient). Working memory = the larger of "
        f"the counted peaks of one chunk's forward (saved activations, plus autocast's bf16 weight cache until the forward "
        f"ends) and of its backward (activations not yet freed, activation gradients, recomputed blocks), each fitted as "
        f"fixed + per-row x rows through 2 and 4 rows (a direct count at 8 rows differs from this model by at most "
        f"{max(abs(t['check_8_rows_gib']['model'] / t['check_8_rows_gib']['counted'] - 1) for t in r['table']):.2%}). "
        f"Budget: {r['capacity_gib']:.0f} GiB less {r['headroom']:.0%} headroom = **{r['budget_gib']:.0f} GiB**. "
        f"\"16 rows\" is configs/sdxl.yaml (train.batch_size 2 x chunk_size 4 x 2 for guidance). "
        f"\"KL\" adds the reference policy (algorithms with a KL / reference term: dpok, d3po, dense, grpo with beta > 0) "
        f"and its no-grad forward ({r['no_grad_forward_gib_per_row']:.3f} GiB/row) on top of the policy's activations.",
        "",
        "| configuration | grad ckpt | static, GiB | working memory (forward, backward), GiB, r = rows | peak at 16 rows, GiB | max rows 2nK | + KL: static, GiB | + KL: peak at 16 rows | + KL: max rows |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in r["table"]:
        fw, bw = t["forward_peak_gib"], t["backward_peak_gib"]
        out.append(f"| {t['config']} | {'yes' if t['checkpointing'] else 'no'} | {_g(t['static_gib'])} | "
                   f"max({fw['per_row']:.3f} r + {_g(fw['fixed'])}, {bw['per_row']:.3f} r + {_g(bw['fixed'])}) | {_g(t['peak_gib_at_16_rows'])} | "
                   f"**{t['max_rows']}** | {_g(t['static_gib'] + t['reference_gib'])} | {_g(t['peak_gib_at_16_rows_kl'])} | **{t['max_rows_kl']}** |")
    out += ["", "Max rows is the largest even 2 x n x K whose peak fits the budget (0: does not fit even at 2 rows). "
            "Per process, so with N GPUs each one runs its own chunk.", "", "## The terms", ""]
    seen = set()
    for t in r["table"]:
        if t["config"] in seen:
            continue
        seen.add(t["config"])
        out.append(f"**{t['config']}** (static {_g(t['static_gib'])} GiB; optimizer-step transient {_g(t['optimizer_step_transient_gib'])} GiB):")
        out.append("")
        for k, v in {**t["terms_gib"], **t["reference_terms_gib"]}.items():
            out.append(f"- {k}: {_g(v)} GiB")
        out.append("")
    out += [
        "Formulas (P = UNet parameters, N = GPUs): no ZeRO, fp32 weights = master weights 4P + fp32 grads 4P + AdamW m, v 8P "
        "(torch AdamW, grads in the parameters' fp32); DeepSpeed bf16 (configs/deepspeed_zero*.json with "
        "model.mixed_precision=bf16): bf16 weights 2P, bf16 grads 2P, fp32 gradient partition for the step 4P, fp32 master "
        "4P, AdamW 8P, where ZeRO-2 shards all but the weights (2P + 18P/N, DeepSpeed's own estimate) and ZeRO-3 the "
        "weights too (20P/N), plus DeepSpeed's buffers. LoRA: the base frozen, adapters "
        "16 B/param. Autocast's bf16 weight copies (2 B per conv/linear weight under autocast with fp32 weights) are in "
        "the counted working memory (its fixed part), not in the static terms.",
        "",
        "## Approximations",
        "",
    ]
    out += [f"- {a}" for a in r["approximations"]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    main()
