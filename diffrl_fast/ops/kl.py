"""Closed-form KL between two step Gaussians of equal std."""
from __future__ import annotations

import torch

from ._validate import check_reduction
from .step import Coef, fused_sq, std_rows


def gaussian_kl(
    mean: torch.Tensor,
    ref_mean: torch.Tensor,
    std: Coef,
    reduction: str = "mean",
    latent_dims: int = 3,
) -> torch.Tensor:
    """KL( N(mean, std^2 I) || N(ref_mean, std^2 I) ), the per-step KL regulariser of DPOK (Fan et al. 2023)
    and Flow-GRPO (Liu et al. 2025):

        KL = |mean - ref_mean|^2 / (2 std^2)        reduction="sum"
        KL = that / D                                reduction="mean"

    For the fused version that never materialises either mean, see ``step_kl``. Gradients flow to
    mean, ref_mean and a tensor std.
    """
    check_reduction(reduction)
    ss, _, _ = fused_sq({"x": "mean", "y": "ref_mean"}, x=mean, y=ref_mean, a=1.0, b=0.0, latent_dims=latent_dims)
    s = std_rows(std, mean, latent_dims)
    kl = ss / (2.0 * s * s)
    return kl / mean.shape[mean.dim() - latent_dims :].numel() if reduction == "mean" else kl
