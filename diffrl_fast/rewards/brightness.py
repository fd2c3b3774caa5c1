"""Brightness: the mean pixel value of an image, a reward that is trivially hacked.

    brightness: r(x) = mean_{c, h, w} x[c, h, w],   x in [0, 1]

Images brightening while a reward climbs is one of the over-optimisation failures users report of the field's
trainers (DiffusionNFT issue #6). As (a weighted part of) the training reward it makes a run that hacks on purpose,
the test of the guards (``guard.*``; benchmarks/bench_overoptimisation.py); it is not a quality measure.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import register


@register("brightness")
def brightness():
    """Reward ``mean(x)`` over channels and pixels, in [0, 1] (images in [0, 1])."""

    @torch.no_grad()
    def fn(images: torch.Tensor, prompts: list, metadata: Optional[list] = None):
        if images.ndim != 4:
            raise ValueError(f"brightness expects images [B, C, H, W], got shape {tuple(images.shape)}")
        return images.detach().float().flatten(1).mean(1), {}

    return fn
