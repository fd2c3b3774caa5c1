"""Gaussian log-prob of a denoising step, reduced over the latent dims."""
from __future__ import annotations

import torch

from ._validate import check_reduction
from .step import Coef, fused_sq, logprob_from_sq, std_rows


def gaussian_logprob(
    x_prev: torch.Tensor,
    mean: torch.Tensor,
    std: Coef,
    reduction: str = "mean",
    latent_dims: int = 3,
) -> torch.Tensor:
    """log N(x_prev; mean, std^2 I), the per-step policy log-prob of DDPO (Black et al. 2023).

        log p = -|x_prev - mean|^2 / (2 std^2) - D log std - (D/2) log(2 pi)     reduction="sum"
        log p = that / D                                                          reduction="mean"

    D is the number of elements in the last ``latent_dims`` dims (C, H, W by default); leading dims
    ([B] or [B, T]) are kept, strided leading dims are read in place. ``std`` is a float or a tensor
    broadcastable to the leading dims. Returns float32 (float64 for float64 inputs); gradients flow to
    x_prev, mean and a tensor std.
    """
    check_reduction(reduction)
    ss, _, _ = fused_sq({"x": "mean", "y": "x_prev"}, x=mean, y=x_prev, a=1.0, b=0.0, latent_dims=latent_dims)
    return logprob_from_sq(ss, std_rows(std, mean, latent_dims), mean.shape[mean.dim() - latent_dims :].numel(), reduction)
