"""JPEG (in)compressibility rewards from DDPO (Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning", section 6.1).

    size_kB(x) = len(JPEG(x, quality=95)) / 1000
    jpeg_compressibility:   r(x) = -size_kB(x)
    jpeg_incompressibility: r(x) = +size_kB(x)

As in ddpo-pytorch, images are quantised to uint8 with round(255 x) and encoded by PIL; kB are
1000 bytes. The images of a batch are encoded in a thread pool: PIL's JPEG encoder releases the GIL.
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from . import register

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="jpeg")
    return _POOL


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] floats in [0, 1] (C = 1 or 3) -> uint8 array [B, H, W, C] on the CPU, round(255 x)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [B, 1 or 3, H, W], got {tuple(images.shape)}")
    pixels = (images.detach().float() * 255).round().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def jpeg_size_bytes(image: np.ndarray, quality: int = 95) -> int:
    """Size in bytes of one uint8 image [H, W, C] (C = 1 or 3) encoded by PIL as JPEG at ``quality``."""
    # A 2-D uint8 array becomes mode "L", an [H, W, 3] one mode "RGB".
    pil_image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    pil_image.save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG size in kB (1000 bytes) of each image of a [B, C, H, W] batch in [0, 1]; float32 [B] on the CPU."""
    batch = to_uint8_hwc(images)
    sizes = list(_pool().map(lambda img: jpeg_size_bytes(img, quality), batch))
    return torch.tensor(sizes, dtype=torch.float32) / 1000.0


@register("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95):
    """Reward -size_kB(JPEG at ``quality``): smaller files (flatter, simpler images) score higher."""

    def fn(images, prompts, metadata):
        return -jpeg_sizes_kb(images, quality), {}

    return fn


@register("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95):
    """Reward +size_kB(JPEG at ``quality``): larger files (busier, high-frequency images) score higher."""

    def fn(images, prompts, metadata):
        return jpeg_sizes_kb(images, quality), {}

    return fn
