"""Diffusion models as RL environments: one interface over SD 1.x/2.x, SDXL, SD3, FLUX.1, FLUX.2, Wan2.1,
Qwen-Image, Z-Image and the digits worlds.

A ``DiffusionModel`` holds the trainable denoiser (UNet or transformer), the scheduler, and what turns
prompts into conditioning and latents into images:

    cond, uncond = model.encode(prompts, negative_prompts)      # frozen text encoders, cached per prompt
    out = model.predict(x_t [N, C, H, W], t [N], cond)           # the denoiser, with its model-specific kwargs
    images = model.decode(x_0)                                   # [B, 3 (or 1), H, W] in [0, 1]

Loading a diffusers folder (``load_pipeline``) picks the adapter from the pipeline class in
model_index.json; nothing is downloaded unless the user's machine reaches the hub.
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .._versions import at_least, require_feature
from .conditioning import Conditioning


class DiffusionModel:
    """Base adapter. Subclasses set ``kind``, ``denoiser``, ``scheduler``, ``latent_shape`` and implement
    ``_encode_unique``, ``predict`` and ``decode``."""

    kind: str = "base"
    denoiser: nn.Module
    scheduler: object
    latent_shape: tuple[int, ...]  # native (C, H, W); (C, F, H, W) for video
    is_video: bool = False  # decode gives videos [B, F, 3, H, W]
    shipped_scheduler: object = None  # the folder's scheduler, when the policy runs another (load_pipeline)
    pixels_per_latent: int = 1  # image pixels per latent pixel (the VAE's scale factor)
    latent_multiple: int = 1  # latent height/width must divide by this (UNet levels, DiT patch)
    # prompts a command uses when the user gives none (check-parity): ones the model can read
    default_prompts: tuple[str, ...] = ("a photo of a cat", "a red car on a street", "a painting of a mountain", "a bowl of fruit")

    def __init__(self) -> None:
        self._prompt_cache: dict[str, Conditioning] = {}
        self.cache_size = 4096
        self.ref_denoiser: Optional[nn.Module] = None  # frozen copy for full fine-tuning
        self.lora = False
        # what forward calls go through: the denoiser itself, or its DDP / DeepSpeed wrapper
        self.forward_module: Optional[nn.Module] = None
        self._in_frozen_reference = False
        # denoiser passes run through ``rollout.guided_outputs`` (a forward of one row = 1, its backward = 2):
        # the trainer's cost in units that do not depend on the machine
        self.denoiser_passes = 0

    @property
    def net(self) -> nn.Module:
        """The module to call for a forward: the training wrapper, unless the frozen reference is active."""
        if self.forward_module is not None and not self._in_frozen_reference:
            return self.forward_module
        return self.denoiser

    compute_device: Optional[torch.device] = None  # set when the weights live elsewhere (FSDP's CPU offload)

    @property
    def device(self) -> torch.device:
        return self.compute_device if self.compute_device is not None else next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    # ---- prompts -------------------------------------------------------------------------------
    def validate_prompts(self, prompts: Sequence[str], name: str = "prompts") -> list[str]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError(f"{name} must be a list of strings, got {type(prompts).__name__}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError(f"{name} is empty: give at least one prompt")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"{name} must hold strings only; got {type(bad[0]).__name__} {bad[0]!r}")
        return prompts

    def _encode_unique(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Conditioning of each prompt; unique prompts are encoded once and cached (the encoders are frozen)."""
        prompts = list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if missing:
            if len(self._prompt_cache) + len(missing) > self.cache_size:
                self._prompt_cache.clear()
            enc = self._encode_unique(missing)
            for i, p in enumerate(missing):
                self._prompt_cache[p] = enc.index(slice(i, i + 1))
        return Conditioning.cat([self._prompt_cache[p] for p in prompts])

    def encode(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]] = None) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) for classifier-free guidance; uncond encodes the negative prompts ("" by default)."""
        prompts = self.validate_prompts(prompts)
        if negative_prompts is None:
            negative_prompts = [""] * len(prompts)
        negative_prompts = list(negative_prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        return self.encode_prompts(prompts), self.encode_prompts(negative_prompts)

    def prompt_metadata(self, prompts: Sequence[str]) -> list[dict]:
        """Per-prompt metadata handed to reward functions (the digits world adds the class id)."""
        return [{} for _ in prompts]

    # ---- denoiser and decoder ------------------------------------------------------------------
    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sampling_kwargs(self, shape: Optional[tuple] = None, num_steps: Optional[int] = None) -> dict:
        """Extra arguments for ``make_schedule`` for latents of ``shape`` (the native one when None) sampled in
        ``num_steps`` steps: SD3's, FLUX's and Qwen-Image's dynamic shift, which depends on the image's token count
        (FLUX.2's also on the step count)."""
        return {}

    sigma_grid: Optional[str] = None  # a flow model's sigma grid chosen by the run (sample.sigma_grid), else its own

    def schedule_kwargs(self, shape: Optional[tuple] = None, num_steps: Optional[int] = None) -> dict:
        """``sampling_kwargs(shape, num_steps)`` with the run's sigma grid (``sigma_grid``: "scheduler", "flux",
        "flow_sigmas") in place of the model's own where one is set."""
        out = self.sampling_kwargs(shape, num_steps)
        if self.sigma_grid is not None:
            out["sigma_grid"] = None if self.sigma_grid == "scheduler" else self.sigma_grid
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    # ---- policy parametrisation and the reference policy ---------------------------------------
    def add_lora(self, rank: int = 4, alpha: Optional[float] = None, target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
                 dropout: float = 0.0, init_weights: bool | str = True) -> None:
        """Train LoRA adapters (peft) on ``target_modules`` of the denoiser and freeze everything else.

        The reference (pretrained) policy is then the denoiser with the adapter switched off: no second
        model is held. Saved weights follow diffusers' LoRA format (``save_lora_weights``).
        """
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        target_modules = self.lora_target_modules(target_modules)
        names = {n.rsplit(".", 1)[-1] for n, _ in self.denoiser.named_modules()} | {n for n, _ in self.denoiser.named_modules()}
        missing = [m for m in target_modules if m not in names and not any(n.endswith("." + m) for n in names)]
        if missing:
            raise ValueError(f"LoRA target modules {missing} are not in the {self.kind} denoiser; e.g. {sorted(names)[:8]}")
        self.denoiser.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(target_modules),
                            lora_dropout=dropout, init_lora_weights=init_weights)
        self.denoiser.add_adapter(config)
        self.lora = True

    DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

    def lora_target_modules(self, targets: Sequence[str]) -> list[str]:
        """The modules ``add_lora`` adapts for the requested ``targets`` (model.lora_targets): the request itself; an
        adapter whose blocks name their attention projections otherwise widens the default set to them."""
        return list(targets)

    def keep_reference_copy(self, device: Optional[str | torch.device] = None) -> None:
        """Full fine-tuning: keep a frozen copy of the current denoiser as the reference policy
        (optionally on another device, e.g. "cpu" to spare GPU memory)."""
        ref = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        self.ref_denoiser = ref.to(device) if device is not None else ref

    @property
    def has_reference(self) -> bool:
        return self.lora or self.ref_denoiser is not None

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside the block, ``predict`` runs the reference (pretrained) policy: the LoRA adapter switched
        off, or the frozen copy of ``keep_reference_copy``."""
        if self.lora:
            self.denoiser.disable_adapters()
            try:
                yield
            finally:
                self.denoiser.enable_adapters()
        elif self.ref_denoiser is not None:
            policy = self.denoiser
            device = self.device
            self.denoiser = self.ref_denoiser.to(device)
            self._in_frozen_reference = True
            try:
                yield
            finally:
                self.denoiser = policy
                self._in_frozen_reference = False
        else:
            raise ValueError("no reference policy: call add_lora() (reference = adapter off) or keep_reference_copy() first")

    def latent_shape_for(self, height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, ...]:
        """Latent shape for an image (or video frames) of height x width pixels (the model's native size when omitted):
        (C, H, W), or (C, F, H, W) for a video model."""
        *lead, h, w = self.latent_shape
        if height is None and width is None:
            return self.latent_shape
        scale, multiple = self.pixels_per_latent, self.latent_multiple
        height = height if height is not None else h * scale
        width = width if width is not None else w * scale
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % (scale * multiple):
                raise ValueError(
                    f"image {name} {v} does not fit the {self.kind} model: it must be a positive multiple of "
                    f"{scale * multiple} (latents are 1/{scale} of the image and must divide by {multiple})"
                )
        return (*lead, height // scale, width // scale)


def _vae_decode(vae, latents: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    z = latents.to(vae.dtype) / vae.config.scaling_factor + shift
    image = vae.decode(z, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def _causal_vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Wan's causal video VAE (AutoencoderKLWan, and Qwen-Image's AutoencoderKLQwenImage of the same layout):
    normalised latents [B, z, f, h, w] -> x = z std + mean per channel (the pipelines' de-normalisation) -> decode
    -> [B, 3, F, H, W] in [0, 1]."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, vae.dtype)
    video = vae.decode(latents.to(vae.dtype) * std + mean, return_dict=False)[0]
    return (video.float() / 2 + 0.5).clamp(0, 1)


class StableDiffusionModel(DiffusionModel):
    """SD 1.x / 2.x: CLIP text encoder, UNet2DConditionModel, AutoencoderKL."""

    kind = "sd"

    def __init__(self, pipe) -> None:
        super().__init__()
        self.pipe = pipe
        self.denoiser = pipe.unet
        self.scheduler = pipe.scheduler
        c = pipe.unet.config
        self.latent_shape = (c.in_channels, c.sample_size, c.sample_size)
        self.pixels_per_latent = pipe.vae_scale_factor
        self.latent_multiple = 2 ** (len(c.block_out_channels) - 1)

    def _encode_unique(self, prompts):
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return Conditioning(embeds)

    def predict(self, x, t, cond):
        return self.net(x, t, encoder_hidden_states=cond.hidden, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents):
        return _vae_decode(self.pipe.vae, latents)


class StableDiffusionXLModel(StableDiffusionModel):
    """SDXL: two CLIP text encoders, pooled embeddings and micro-conditioning time ids."""

    kind = "sdxl"

    def __init__(self, pipe) -> None:
        super().__init__(pipe)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        enc2 = pipe.text_encoder_2
        proj = enc2.config.projection_dim if enc2 is not None else None
        self._time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), torch.float32, text_encoder_projection_dim=proj)

    def _encode_unique(self, prompts):
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        time_ids = self._time_ids.to(self.device).expand(len(prompts), -1)
        return Conditioning(embeds, pooled, time_ids)

    def encode(self, prompts, negative_prompts=None):
        cond, uncond = super().encode(prompts, negative_prompts)
        if negative_prompts is None and self.pipe.config.force_zeros_for_empty_prompt:
            # SDXL's convention: the unconditional branch of an empty negative prompt is all zeros.
            uncond = Conditioning(torch.zeros_like(uncond.hidden), torch.zeros_like(uncond.pooled), uncond.time_ids)
        return cond, uncond

    def predict(self, x, t, cond):
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return self.net(x, t, encoder_hidden_states=cond.hidden, added_cond_kwargs=added, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        if vae.dtype == torch.float16 and vae.config.force_upcast:
            vae.to(torch.float32)
        return _vae_decode(vae, latents)


class StableDiffusion3Model(DiffusionModel):
    """SD3: MMDiT transformer, flow matching, CLIP x2 (+ T5) text encoders."""

    kind = "sd3"

    def __init__(self, pipe, max_sequence_length: int = 77) -> None:
        super().__init__()
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.scheduler = pipe.scheduler
        c = pipe.transformer.config
        self.latent_shape = (c.in_channels, c.sample_size, c.sample_size)
        self.pixels_per_latent = pipe.vae_scale_factor
        self.latent_multiple = c.patch_size
        self.max_sequence_length = max_sequence_length

    def _encode_unique(self, prompts):
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, prompts, prompts, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds, pooled)

    def predict(self, x, t, cond):
        return self.net(hidden_states=x, timestep=t, encoder_hidden_states=cond.hidden,
                        pooled_projections=cond.pooled, return_dict=False)[0]

    def sampling_kwargs(self, shape: Optional[tuple] = None, num_steps: Optional[int] = None) -> dict:
        cfg = self.scheduler.config
        if not getattr(cfg, "use_dynamic_shifting", False):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        p = self.denoiser.config.patch_size
        shape = shape or self.latent_shape
        seq = (shape[-2] // p) * (shape[-1] // p)
        return {"mu": calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                      cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))}

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        return _vae_decode(vae, latents, shift=vae.config.shift_factor or 0.0)


class FluxModel(DiffusionModel):
    """FLUX.1: a flow transformer on 2x2-packed latents with rotary image/text position ids, CLIP (pooled) + T5
    (sequence) text encoders, a 16-channel VAE; guidance-distilled models (FLUX.1-dev) take the guidance as an
    embedding, one pass per step, instead of classifier-free guidance (Black Forest Labs 2024).

    The sampler and the trainer see unpacked latents [B, 16, H, W] (H, W even); ``predict`` packs them to
    [B, HW/4, 64] tokens, calls the transformer and unpacks its velocity.
    """

    kind = "flux"

    def __init__(self, pipe, max_sequence_length: int = 512, guidance: float = 3.5) -> None:
        super().__init__()
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.scheduler = pipe.scheduler
        c = pipe.transformer.config
        channels = c.in_channels // 4
        pixels = int(getattr(pipe.vae.config, "sample_size", None) or pipe.default_sample_size * pipe.vae_scale_factor)
        size = 2 * (pixels // (pipe.vae_scale_factor * 2))  # the VAE's native size (FLUX.1: 1024 px -> 128 latents)
        self.latent_shape = (channels, size, size)
        self.pixels_per_latent = pipe.vae_scale_factor
        self.latent_multiple = 2
        self.max_sequence_length = min(max_sequence_length, pipe.tokenizer_2.model_max_length)
        self.guidance = guidance  # the embedded guidance of guidance-distilled models (ignored by others)

    def _encode_unique(self, prompts):
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, prompts, device=self.device, num_images_per_prompt=1,
                                                     max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds, pooled)

    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 patch becomes one token (channel-major within it)."""
        B, C, H, W = x.shape
        return x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), 4 * C)

    @staticmethod
    def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Inverse of ``pack`` for latents of ``height`` x ``width``."""
        B, _, D = tokens.shape
        return tokens.reshape(B, height // 2, width // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, height, width)

    @staticmethod
    def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
        """[(H/2)(W/2), 3] position ids of the packed tokens: (0, row, column)."""
        ids = torch.zeros(height // 2, width // 2, 3)
        ids[..., 1] += torch.arange(height // 2)[:, None]
        ids[..., 2] += torch.arange(width // 2)[None, :]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)

    def predict(self, x, t, cond):
        B, _, H, W = x.shape
        net = self.net
        guidance = None
        if net.config.guidance_embeds:
            guidance = torch.full((B,), float(self.guidance), device=x.device, dtype=torch.float32)
        text_ids = torch.zeros(cond.hidden.shape[1], 3, device=x.device, dtype=cond.hidden.dtype)
        out = net(hidden_states=self.pack(x), timestep=t.to(x.dtype) / 1000, guidance=guidance,
                  pooled_projections=cond.pooled, encoder_hidden_states=cond.hidden, txt_ids=text_ids,
                  img_ids=self.image_ids(H, W, x.device, x.dtype), return_dict=False)[0]
        return self.unpack(out, H, W)

    def sampling_kwargs(self, shape: Optional[tuple] = None, num_steps: Optional[int] = None) -> dict:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.scheduler.config
        shape = shape or self.latent_shape
        seq = (shape[-2] // 2) * (shape[-1] // 2)
        out = {"sigma_grid": "flux"}
        if getattr(cfg, "use_dynamic_shifting", False):
            out["mu"] = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                        cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return out

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        return _vae_decode(vae, latents, shift=vae.config.shift_factor or 0.0)


class WanModel(DiffusionModel):
    """Wan2.1 text-to-video (Wan Team 2025): WanTransformer3DModel on video latents [B, 16, F, H, W] with (1, 2, 2)
    patches, a UMT5 text encoder, AutoencoderKLWan (4x temporal, 8x spatial: F pixel frames with (F - 1) % 4 == 0
    become (F - 1) / 4 + 1 latent frames), flow matching.

    ``decode`` returns videos [B, F, 3, H, W] in [0, 1], what a video reward takes (rewards/video.py). Wan's configs
    fix no size: the native one is WanPipeline's default, 81 frames of 480 x 832 pixels; ``num_frames`` (pixel
    frames, sample.num_frames) and sample.height / sample.width choose another. Wan2.2's two-expert pipelines
    (``transformer_2``) are refused: the trainer trains one denoiser.
    """

    kind = "wan"
    is_video = True
    default_prompts = ("a cat playing in the snow", "a red car on a street", "a boat on the water", "a bird flying in the sky")

    def __init__(self, pipe, max_sequence_length: int = 512) -> None:
        super().__init__()
        if getattr(pipe, "transformer_2", None) is not None or getattr(pipe.config, "expand_timesteps", False):
            raise ValueError("this is a Wan2.2 pipeline with two experts (transformer_2) or per-token timesteps (TI2V): the "
                             "trainer trains one denoiser; use a Wan2.1 text-to-video folder")
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.scheduler = pipe.scheduler
        c = pipe.transformer.config
        self.frames_per_latent = pipe.vae_scale_factor_temporal
        self.pixels_per_latent = pipe.vae_scale_factor_spatial
        self.latent_multiple = c.patch_size[1]
        self.channels = c.in_channels
        self.max_sequence_length = min(max_sequence_length, pipe.tokenizer.model_max_length)
        self.num_frames = 81  # WanPipeline's default
        self.native_size = (480, 832)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        h, w = self.native_size
        return (self.channels, self.latent_frames(self.num_frames), h // self.pixels_per_latent, w // self.pixels_per_latent)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of ``num_frames`` pixel frames: (F - 1) / 4 + 1; a count the VAE cannot take is refused."""
        k = self.frames_per_latent
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % k:
            raise ValueError(f"{num_frames} frames do not fit Wan's VAE: it keeps the first frame and compresses each {k} after "
                             f"it into one latent frame, so the count must be {k}k + 1 (e.g. 1, 5, 9, 17, 33, 81): set "
                             f"sample.num_frames to one")
        return (num_frames - 1) // k + 1

    def sampling_kwargs(self, shape: Optional[tuple] = None, num_steps: Optional[int] = None) -> dict:
        """The shipped solver's flow sigmas when the policy's scheduler was converted from it (``flow_scheduler_from``)."""
        return {"sigma_grid": "flow_sigmas"} if self.shipped_scheduler is not None and is_flow_prediction(self.shipped_scheduler) else {}

    def _encode_unique(self, prompts):
        lengths = [len(ids) for ids in self.pipe.tokenizer(prompts, add_special_tokens=True).input_ids]
        too_long = [(p, n) for p, n in zip(prompts, lengths) if n > self.max_sequence_length]
        if too_long:
            p, n = too_long[0]
            raise ValueError(f"prompt {p[:60]!r} is {n} tokens long; Wan's text encoder takes {self.max_sequence_length} "
                             f"(its tokenizer would cut the rest silently): shorten the prompt")
        embeds, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                            max_sequence_length=self.max_sequence_length, device=self.device)
        return Conditioning(embeds)

    def predict(self, x, t, cond):
        return self.net(hidden_states=x, timestep=t, encoder_hidden_states=cond.hidden, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents):
        """[B, 16, f, h, w] latents -> videos [B, F, 3, H, W] in [0, 1] (WanPipeline's de-normalisation, then the VAE)."""
        return _causal_vae_decode(self.pipe.vae, latents).permute(0, 2, 1, 3, 4).contiguous()


class QwenImageModel(DiffusionModel):
    """Qwen-Image (Qwen Team 2025): QwenImageTransformer2DModel (an MMDiT) on 2x2-packed latents [B, 16, H, W] with
    3-axis rotary positions, Qwen2.5-VL's last hidden states of a templated prompt (the template's first 34 tokens
    dropped) with a padding mask, AutoencoderKLQwenImage (Wan's VAE layout, one frame), flow matching with dynamic
    exponential shifting, ``shift_terminal`` and the FLUX sigma grid, as QwenImagePipeline samples.

    Guidance is QwenImagePipeline's true CFG: comb = u + g (c - u), then rescaled per token to the conditional
    velocity's norm, comb ||c|| / ||comb|| (norms over each packed token's 64 values). It is not linear in (u, c), so
    ``guide`` combines the two branches before the step (``nonlinear_guidance``); the trainer's recompute does the
    same, so log-probs and ratios are those of this policy. The unconditional branch encodes the negative prompt
    (sample.negative_prompt; the pipeline's examples use " ").
    """

    kind = "qwen_image"
    nonlinear_guidance = True

    def __init__(self, pipe) -> None:
        super().__init__()
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.scheduler = pipe.scheduler
        c = pipe.transformer.config
        size = 2 * (pipe.default_sample_size // 2)  # QwenImagePipeline's default: 128 latents (1024 pixels)
        self.latent_shape = (c.in_channels // 4, size, size)
        self.pixels_per_latent = pipe.vae_scale_factor
        self.latent_multiple = 2
        self.max_sequence_length = pipe.tokenizer_max_length

    def _encode_unique(self, prompts):
        pipe = self.pipe
        drop = pipe.prompt_template_encode_start_idx
        lengths = [len(ids) - drop for ids in pipe.tokenizer([pipe.prompt_template_encode.format(p) for p in prompts]).input_ids]
        too_long = [(p, n) for p, n in zip(prompts, lengths) if n > self.max_sequence_length]
        if too_long:
            p, n = too_long[0]
            raise ValueError(f"prompt {p[:60]!r} is {n} tokens long with its template; Qwen-Image's text encoder takes "
                             f"{self.max_sequence_length} (the rest would be cut silently): shorten the prompt")
        embeds, mask = pipe.encode_prompt(prompts, device=self.device, max_sequence_length=self.max_sequence_length)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return Conditioning(embeds, mask=mask)

    def predict(self, x, t, cond):
        B, _, H, W = x.shape
        out = self.net(hidden_states=FluxModel.pack(x), timestep=t.to(x.dtype) / 1000, encoder_hidden_states=cond.hidden,
                       encoder_hidden_states_mask=cond.mask, img_shapes=[[(1, H // 2, W // 2)]] * B, return_dict=False)[0]
        return FluxModel.unpack(out, H, W)

    def guide(self, eps_u: torch.Tensor, eps_c: torch.Tensor, g: float) -> torch.Tensor:
        """QwenImagePipeline's true CFG: u + g (c - u), rescaled per packed token to the norm of c."""
        H, W = eps_u.shape[-2:]
        u, c = FluxModel.pack(eps_u), FluxModel.pack(eps_c)
        comb = u + g * (c - u)
        comb = comb * (c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
        return FluxModel.unpack(comb, H, W)

    def sampling_kwargs(self, shape: Optional[tuple] = None, num_steps: Optional[int] = None) -> dict:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        cfg = self.scheduler.config
        shape = shape or self.latent_shape
        seq = (shape[-2] // 2) * (shape[-1] // 2)
        return {"sigma_grid": "flux", "mu": calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                                            cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))}

    @torch.no_grad()
    def decode(self, latents):
        """[B, 16, h, w] latents -> images [B, 3, H, W] in [0, 1] (QwenImagePipeline's de-normalisation, one VAE frame)."""
        return _causal_vae_decode(self.pipe.vae, latents[:, :, None])[:, :, 0]


class ZImageModel(DiffusionModel):
    """Z-Image (Tongyi-MAI 2025): ZImageTransformer2DModel, a single-stream DiT over the concatenated caption and image
    tokens (2x2 patches, 3-axis rotary positions), Qwen3's second-to-last hidden states of a chat-templated prompt
    (only its real tokens: each prompt's embedding has its own length), FLUX's 16-channel VAE, flow matching on the
    FLUX sigma grid, as ZImagePipeline samples.

    Three conventions differ from the other flow models and are applied here, so the sampler and the trainer see the
    same velocity v = noise - x_0 as for SD3/FLUX:
    - the transformer takes lists (one [C, 1, H, W] latent and one [L_i, D] caption per sample) and predicts -v;
    - its time input is 1 - sigma ((1000 - t) / 1000), not sigma;
    - ZImagePipeline's guidance is pos + G (pos - neg), i.e. the usual u + g (c - u) with **g = G + 1**:
      ``sample.guidance_scale`` = ZImagePipeline's ``guidance_scale`` + 1 (Z-Image-Turbo's G = 0 is g = 1, no
      guidance). The pipeline's optional ``cfg_normalization`` (a norm clamp) and ``cfg_truncation`` are off by
      default there and not used here.
    """

    kind = "z_image"

    def __init__(self, pipe, max_sequence_length: int = 512) -> None:
        super().__init__()
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.scheduler = pipe.scheduler
        c = pipe.transformer.config
        if tuple(c.all_patch_size) != (2,) or tuple(c.all_f_patch_size) != (1,):
            raise ValueError(f"Z-Image transformer with patch sizes {c.all_patch_size} / {c.all_f_patch_size}: the "
                             f"trainer supports ZImagePipeline's 2x2 patches of single frames")
        if getattr(c, "siglip_feat_dim", None) is not None:
            raise ValueError("this is a Z-Image Omni transformer (SigLIP image conditioning): the trainer takes "
                             "text-to-image ZImagePipeline folders")
        self.pixels_per_latent = pipe.vae_scale_factor
        self.latent_multiple = 2
        size = 1024 // pipe.vae_scale_factor  # ZImagePipeline's default: 1024 x 1024 pixels
        self.latent_shape = (c.in_channels, size, size)
        self.max_sequence_length = max_sequence_length

    def _encode_unique(self, prompts):
        pipe = self.pipe
        templated = [pipe.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                        add_generation_prompt=True, enable_thinking=True) for p in prompts]
        lengths = [len(ids) for ids in pipe.tokenizer(templated).input_ids]
        too_long = [(p, n) for p, n in zip(prompts, lengths) if n > self.max_sequence_length]
        if too_long:
            p, n = too_long[0]
            raise ValueError(f"prompt {p[:60]!r} is {n} tokens long with its chat template; Z-Image's text encoder takes "
                             f"{self.max_sequence_length} (the rest would be cut silently): shorten the prompt")
        embeds = pipe.encode_prompt(list(prompts), device=self.device, do_classifier_free_guidance=False,
                                    max_sequence_length=self.max_sequence_length)[0]
        width = max(e.shape[0] for e in embeds)
        hidden = embeds[0].new_zeros(len(embeds), width, embeds[0].shape[-1])
        mask = torch.zeros(len(embeds), width, dtype=torch.long, device=hidden.device)
        for i, e in enumerate(embeds):
            hidden[i, :e.shape[0]], mask[i, :e.shape[0]] = e, 1
        return Conditioning(hidden, mask=mask)

    def predict(self, x, t, cond):
        dtype = self.denoiser.dtype
        caps = [h[m.bool()] for h, m in zip(cond.hidden.to(dtype), cond.mask)]
        out = self.net(list(x.to(dtype).unsqueeze(2).unbind(0)), (1000 - t.to(torch.float32)) / 1000, caps,
                       patch_size=2, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    # ZImagePipeline's sigmas are FLUX's: the grid linspace(1, 1/n, n), shifted by the scheduler's shift or, where it
    # shifts dynamically, by the same mu of the 2x2-token count; its VAE is FLUX's too (scaling and shift factors)
    sampling_kwargs = FluxModel.sampling_kwargs
    decode = FluxModel.decode


class Flux2Model(DiffusionModel):
    """FLUX.2 (Black Forest Labs 2025): Flux2Transformer2DModel on the 2x2-patchified, batch-normalised latents of
    AutoencoderKLFlux2 (32 channels at 8x become [B, 128, H/16, W/16]), 4-axis rotary positions (T, H, W, L) for image
    and text tokens, flow matching on the FLUX sigma grid shifted by FLUX.2's empirical mu, which depends on the token
    count *and* the step count. The prompt is three intermediate hidden states of its encoder, concatenated per token,
    padded to 512 tokens (the padding tokens reach the transformer, as in the pipelines):
    - FLUX.2 [klein] (``Flux2KleinPipeline``): Qwen3, layers 9, 18 and 27 of the chat-templated prompt (thinking off);
      guidance is ordinary CFG, u + g (c - u), at the pipeline's ``guidance_scale`` (negative prompt ""); a
      step-distilled klein (``is_distilled``) samples without it: keep sample.guidance_scale=1 there.
    - FLUX.2 [dev] (``Flux2Pipeline``): Mistral-3 behind its processor's chat template with FLUX.2's system message,
      layers 10, 20 and 30; guidance-distilled: the guidance goes in as an embedding (``guidance``: 4, the
      pipeline's default, unless model.embedded_guidance sets it), one pass per step, no CFG (sample.guidance_scale=1;
      the trainer refuses another, as for a step-distilled klein).

    The sampler and the trainer see the patchified latents [B, 128, h, w] (the pipelines' own state before packing
    into tokens); ``decode`` undoes the VAE's batch normalisation and the patchification.
    """

    kind = "flux2"

    def __init__(self, pipe, max_sequence_length: int = 512, guidance: float = 4.0) -> None:
        super().__init__()
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.scheduler = pipe.scheduler
        c = pipe.transformer.config
        self.dev = type(pipe).__name__ == "Flux2Pipeline"
        if c.guidance_embeds != self.dev:
            raise ValueError(f"{type(pipe).__name__} with a transformer {'with' if c.guidance_embeds else 'without'} a guidance "
                             f"embedding: FLUX.2 [dev] embeds its guidance, FLUX.2 [klein] does not")
        self.pixels_per_latent = 2 * pipe.vae_scale_factor
        size = pipe.default_sample_size // 2  # the pipelines' default 1024 pixels -> 64 x 64 patchified latents
        self.latent_shape = (c.in_channels, size, size)
        self.max_sequence_length = max_sequence_length
        import inspect

        self.text_layers = tuple(inspect.signature(pipe.encode_prompt).parameters["text_encoder_out_layers"].default)
        text_config = getattr(pipe.text_encoder.config, "text_config", pipe.text_encoder.config)
        if max(self.text_layers) > text_config.num_hidden_layers:
            raise ValueError(f"FLUX.2 reads the text encoder's hidden states {self.text_layers}, but it has "
                             f"{text_config.num_hidden_layers} layers")
        self.guidance = guidance  # FLUX.2 [dev]'s embedded guidance (ignored by klein)
        # sampled without classifier-free guidance: [dev] embeds it, a step-distilled klein skips it (the trainer refuses g != 1)
        self.guidance_distilled = self.dev or bool(pipe.config.get("is_distilled", False))

    def lora_target_modules(self, targets: Sequence[str]) -> list[str]:
        """The default attention set (to_q, to_k, to_v, to_out.0) reaches only the double-stream blocks: the
        single-stream blocks project q, k, v and the MLP in one ``to_qkv_mlp_proj`` and have a plain ``to_out``
        Linear. With the default set, those are adapted too (by full name for the single blocks' to_out, since
        the double blocks' ``attn.to_out`` is a ModuleList)."""
        if tuple(targets) != self.DEFAULT_LORA_TARGETS:
            return list(targets)
        single_out = [n for n, mod in self.denoiser.named_modules() if n.startswith("single_transformer_blocks.")
                      and n.endswith(".attn.to_out") and isinstance(mod, nn.Linear)]
        return [*targets, "to_qkv_mlp_proj", *single_out]

    def _token_counts(self, prompts: list[str]) -> list[int]:
        """Each prompt's token count as its pipeline renders it (chat template, system message), before padding."""
        tok = self.pipe.tokenizer
        if self.dev:
            from diffusers.pipelines.flux2.pipeline_flux2 import format_input

            ids = tok.apply_chat_template(format_input(prompts=list(prompts), system_message=self.pipe.system_message),
                                          add_generation_prompt=False, tokenize=True, return_dict=True)["input_ids"]
            return [len(i) for i in ids]
        templated = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False) for p in prompts]
        return [len(ids) for ids in tok(templated).input_ids]

    def _encode_unique(self, prompts):
        too_long = [(p, n) for p, n in zip(prompts, self._token_counts(prompts)) if n > self.max_sequence_length]
        if too_long:
            p, n = too_long[0]
            raise ValueError(f"prompt {p[:60]!r} is {n} tokens long with its chat template; FLUX.2's text encoder takes "
                             f"{self.max_sequence_length} (the rest would be cut silently): shorten the prompt")
        embeds, _ = self.pipe.encode_prompt(list(prompts), device=self.device, max_sequence_length=self.max_sequence_length,
                                            text_encoder_out_layers=self.text_layers)
        return Conditioning(embeds)

    @staticmethod
    def positions(t: int, h: int, w: int, l: int, device) -> torch.Tensor:
        """[t h w l, 4] integer coordinates (T, H, W, L), the last axis fastest (FLUX.2's ids)."""
        return torch.cartesian_prod(*(torch.arange(n, device=device) for n in (t, h, w, l)))

    def predict(self, x, t, cond):
        B, C, h, w = x.shape
        dtype = self.denoiser.dtype
        tokens = x.reshape(B, C, h * w).transpose(1, 2).to(dtype)
        img_ids = self.positions(1, h, w, 1, x.device).expand(B, -1, -1)
        txt_ids = self.positions(1, 1, 1, cond.hidden.shape[1], x.device).expand(B, -1, -1)
        guidance = torch.full((B,), float(self.guidance), device=x.device, dtype=torch.float32) if self.dev else None
        out = self.net(hidden_states=tokens, timestep=t.to(dtype) / 1000, guidance=guidance, encoder_hidden_states=cond.hidden.to(dtype),
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return out.transpose(1, 2).reshape(B, C, h, w)

    def sampling_kwargs(self, shape: Optional[tuple] = None, num_steps: Optional[int] = None) -> dict:
        """The FLUX.2 pipelines' grid linspace(1, 1/n, n) and their empirical mu(token count, step count)."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        if num_steps is None:
            raise ValueError("FLUX.2's shift depends on the number of steps: pass num_steps")
        shape = shape or self.latent_shape
        return {"sigma_grid": "flux", "mu": compute_empirical_mu(shape[-2] * shape[-1], num_steps)}

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Patchified normalised latents [B, 128, h, w] -> the VAE's [B, 32, 2h, 2w] (its batch norm undone), what
        Flux2KleinPipeline returns for output_type="latent" (Flux2Pipeline returns the packed normalised tokens)."""
        bn, vae = self.pipe.vae.bn, self.pipe.vae
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
        z = latents * std + mean
        B, C, h, w = z.shape
        return z.reshape(B, C // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C // 4, 2 * h, 2 * w)

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        image = vae.decode(self.vae_latents(latents).to(vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)


PIPELINE_ADAPTERS = {
    "StableDiffusionPipeline": StableDiffusionModel,
    "StableDiffusionXLPipeline": StableDiffusionXLModel,
    "StableDiffusion3Pipeline": StableDiffusion3Model,
    "FluxPipeline": FluxModel,
    "WanPipeline": WanModel,
    "QwenImagePipeline": QwenImageModel,
    "ZImagePipeline": ZImageModel,
    "Flux2KleinPipeline": Flux2Model,
    "Flux2Pipeline": Flux2Model,
}


# pipelines that need a newer diffusers than the package's floor (_versions.FEATURE_VERSIONS)
FEATURES = {"WanPipeline": "Wan pipelines (WanPipeline)", "QwenImagePipeline": "Qwen-Image pipelines (QwenImagePipeline)",
            "ZImagePipeline": "Z-Image pipelines (ZImagePipeline)", "Flux2KleinPipeline": "FLUX.2 pipelines (Flux2Pipeline, Flux2KleinPipeline)",
            "Flux2Pipeline": "FLUX.2 pipelines (Flux2Pipeline, Flux2KleinPipeline)"}


def is_flow_prediction(scheduler) -> bool:
    """A multistep solver configured for a flow model (velocity prediction on flow sigmas), as Wan2.1 ships
    UniPCMultistepScheduler: ``prediction_type == "flow_prediction"`` and ``use_flow_sigmas``."""
    cfg = scheduler.config
    return cfg.get("prediction_type") == "flow_prediction" and bool(cfg.get("use_flow_sigmas", False))


def flow_scheduler_from(scheduler):
    """The FlowMatchEulerDiscreteScheduler on a flow-prediction scheduler's own sigmas: the same shift
    (``flow_shift``, or its dynamic shifting), terminal stretch and train steps. The rollout reads it with
    ``sigma_grid="flow_sigmas"``, the solver's grid linspace(1, 1/N, n + 1)[:-1] before the shift (so the
    sigmas equal the shipped solver's; its first, 1 - 1e-6 there, is 1 here)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    import inspect

    cfg = scheduler.config
    kwargs = dict(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.get("flow_shift", 1.0),
                  use_dynamic_shifting=cfg.get("use_dynamic_shifting", False), shift_terminal=cfg.get("shift_terminal"),
                  time_shift_type=cfg.get("time_shift_type", "exponential"))
    accepted = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
    return FlowMatchEulerDiscreteScheduler(**{k: v for k, v in kwargs.items() if k in accepted})


class ModelLoadError(ValueError):
    """A pipeline that cannot be loaded, with the cause and the fix (the CLI prints it and exits with code 2)."""


def _chain(exc: BaseException) -> list[BaseException]:
    out = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def explain_load_error(path: str, exc: BaseException, hub: bool) -> str:
    """One message naming why ``path`` did not load and what to do, from the exception chain diffusers raised."""
    from huggingface_hub import errors

    names = {type(e).__name__ for e in _chain(exc)}
    download = (f"download it where the hub is reachable (`hf download {path} --local-dir DIR`, with `hf auth login` "
                f"first for a gated model) and set model.path=DIR")
    if not hub:
        return (f"{path}: diffusers could not load this pipeline folder ({str(exc).splitlines()[0][:300]}); check that it "
                f"is a complete save_pretrained folder, every component named in model_index.json present")
    if any(isinstance(e, errors.GatedRepoError) for e in _chain(exc)):
        return (f"{path} is a gated model on the Hugging Face Hub and this machine has no access: accept its licence on "
                f"https://huggingface.co/{path}, then log in (`hf auth login`, or set HF_TOKEN); or {download}")
    if any(isinstance(e, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)) for e in _chain(exc)):
        return (f"{path} is not a model on the Hugging Face Hub, or it is private (then log in: `hf auth login`): check "
                f"the id, or set model.path to a local diffusers pipeline folder")
    offline = any(isinstance(e, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)) for e in _chain(exc)) or \
        bool(names & {"ConnectError", "ConnectTimeout", "ConnectionError", "ReadTimeout", "ProxyError"}) or \
        "not fully cached locally" in str(exc)
    if offline:
        return (f"cannot load {path}: it is not in the local Hugging Face cache and the hub cannot be reached from "
                f"this machine (no network, or HF_HUB_OFFLINE=1); {download}")
    return f"cannot load {path} from the Hugging Face Hub ({str(exc).splitlines()[0][:300]}); or {download}"


def _from_pretrained(cls, path: str, dtype: torch.dtype, hub: bool):
    """``cls.from_pretrained(path)`` with diffusers' own warnings silenced and any failure as one ModelLoadError."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # "Couldn't connect to the Hub ... Will try to load from local cache": the error says it
    try:
        # diffusers names the argument ``dtype`` from 0.40 and ``torch_dtype`` before (where ``dtype`` is ignored)
        key = "dtype" if at_least("diffusers", "0.40") else "torch_dtype"
        return cls.from_pretrained(path, **{key: dtype})
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(explain_load_error(path, exc, hub)) from None
    finally:
        dlogging.set_verbosity(level)


def load_pipeline(
    path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    sampler: str = "auto",
) -> DiffusionModel:
    """Load a diffusers pipeline folder (or hub id, where reachable) as a ``DiffusionModel``.

    ``sampler``: "auto" keeps a supported scheduler (DDIM, DDPM, flow matching), turns a flow-prediction solver
    (Wan2.1's UniPC) into the flow SDE on the solver's own sigmas (``flow_scheduler_from``) and converts any other
    to DDIM, as ddpo-pytorch does; "ddim" or "ddpm" convert explicitly (refused for a flow model). The shipped
    scheduler stays in ``model.shipped_scheduler``.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    local = Path(path)
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{path} has no model_index.json: expected a diffusers pipeline folder (save_pretrained)")
        class_name = json.loads(index.read_text()).get("_class_name")
        if class_name in FEATURES:
            require_feature(FEATURES[class_name])
        if class_name not in PIPELINE_ADAPTERS:
            raise ValueError(f"{path} holds a {class_name}; supported pipelines: {sorted(PIPELINE_ADAPTERS)}")
    elif path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"model folder {path} does not exist (and is not a hub id of the form owner/name)")
    pipe = _from_pretrained(DiffusionPipeline, path, dtype, hub=not local.exists())
    adapter = PIPELINE_ADAPTERS.get(type(pipe).__name__)
    if adapter is None:
        raise ValueError(f"{path} loads as {type(pipe).__name__}; supported pipelines: {sorted(PIPELINE_ADAPTERS)}")
    if sampler not in ("auto", "ddim", "ddpm"):
        raise ValueError(f"sampler must be 'auto', 'ddim' or 'ddpm', got {sampler!r}")
    supported = (DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler)
    shipped = pipe.scheduler
    flow = isinstance(shipped, FlowMatchEulerDiscreteScheduler) or is_flow_prediction(shipped)
    if flow and sampler != "auto":
        raise ValueError(f"{path} is a flow-matching model ({type(shipped).__name__} predicting velocities): model.sampler="
                         f"{sampler} would run it as a noise-prediction DDIM/DDPM, which is wrong; use model.sampler=auto")
    if is_flow_prediction(shipped):
        # a flow model shipped with a multistep solver (Wan2.1: UniPC): the policy is the flow SDE on the solver's sigmas
        pipe.scheduler = flow_scheduler_from(shipped)
    elif sampler == "ddim" or (sampler == "auto" and not isinstance(pipe.scheduler, supported)):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif sampler == "ddpm":
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    model = adapter(pipe)
    model.shipped_scheduler = shipped
    return model
