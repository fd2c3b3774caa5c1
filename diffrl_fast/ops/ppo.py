"""Policy-gradient losses of DDPO: importance ratio, the clipped surrogate (DDPO-IS) and REINFORCE (DDPO-SF)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._validate import check_rows
from .step import Coef, X0Clip, step_logprob


class PPOLoss(NamedTuple):
    """The loss and the statistics practitioners log (all detached except ``loss``)."""

    loss: torch.Tensor  # scalar, differentiable
    clipfrac: torch.Tensor  # mean(|rho - 1| > clip_range)
    approx_kl: torch.Tensor  # 0.5 mean((log p - log p_old)^2)
    ratio_mean: torch.Tensor  # mean(rho)
    logp: torch.Tensor  # the new log-probs (differentiable), shape of the rows


def importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """rho = exp(log p_theta - log p_old), the per-step importance weight of DDPO-IS (Black et al. 2023)."""
    return torch.exp(logp - old_logp)


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: Optional[float] = 1e-4,
    adv_clip: Optional[float] = 5.0,
    clip_mode: str = "ppo",
) -> PPOLoss:
    """DDPO's policy-gradient loss over rows (samples x timesteps), Black et al. 2023.

    With A = clamp(advantages, -adv_clip, adv_clip) and rho = exp(logp - old_logp):

        DDPO-IS (clip_range=eps):  L = mean( max(-A rho, -A clamp(rho, 1 - eps, 1 + eps)) )
        DDPO-SF (clip_range=None): L = mean( -A logp )                    (REINFORCE)
        clip_mode="clamp":         L = mean( -A clamp(rho, 1 - eps, 1 + eps) )
                                   (DPOK, Fan et al. 2023: no gradient outside the band on either side)

    Also returns clipfrac = mean(|rho - 1| > eps), approx_kl = 0.5 mean((logp - old_logp)^2) and
    mean(rho), as ddpo-pytorch and trl log them. ``advantages`` and ``old_logp`` are constants.
    """
    if not isinstance(logp, torch.Tensor):
        raise ValueError(f"logp must be a torch.Tensor, got {type(logp).__name__}")
    old_logp = check_rows("old_logp", old_logp, logp.shape, logp.device)
    advantages = check_rows("advantages", advantages, logp.shape, logp.device)
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"clip_range must be > 0 or None (REINFORCE), got {clip_range}")
    if adv_clip is not None and not adv_clip > 0:
        raise ValueError(f"adv_clip must be > 0 or None, got {adv_clip}")
    if clip_mode not in ("ppo", "clamp"):
        raise ValueError(f"clip_mode must be 'ppo' or 'clamp', got {clip_mode!r}")
    adv = advantages.detach().to(logp.dtype)
    if adv_clip is not None:
        adv = adv.clamp(-adv_clip, adv_clip)
    old = old_logp.detach().to(logp.dtype)
    log_ratio = logp - old
    ratio = torch.exp(log_ratio)
    if clip_range is None:
        loss = (-adv * logp).mean()
    else:
        clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
        loss = (clipped if clip_mode == "clamp" else torch.maximum(-adv * ratio, clipped)).mean()
    with torch.no_grad():
        eps = clip_range if clip_range is not None else 0.0
        clipfrac = ((ratio - 1.0).abs() > eps).float().mean() if clip_range is not None else torch.zeros((), device=logp.device)
        approx_kl = 0.5 * log_ratio.square().mean()
        ratio_mean = ratio.mean()
    return PPOLoss(loss, clipfrac, approx_kl, ratio_mean, logp)


def ppo_clip_step_loss(
    x_t: torch.Tensor,
    x_prev: torch.Tensor,
    eps_u: torch.Tensor,
    eps_c: Optional[torch.Tensor],
    a: Coef,
    b: Coef,
    g: Coef,
    s: Coef,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: Optional[float] = 1e-4,
    adv_clip: Optional[float] = 5.0,
    clip_mode: str = "ppo",
    reduction: str = "mean",
    clip_x0: Optional[X0Clip] = None,
    latent_dims: int = 3,
) -> PPOLoss:
    """``ppo_clip_loss`` straight from the step's inputs: one fused read of the latents forward, one backward.

    log p is ``step_logprob(x_t, x_prev, eps_u, eps_c, a, b, g, s)``; everything after it is per-row.
    """
    logp = step_logprob(x_t, x_prev, eps_u, eps_c, a, b, g, s, reduction=reduction, clip_x0=clip_x0, latent_dims=latent_dims)
    return ppo_clip_loss(logp, old_logp, advantages, clip_range=clip_range, adv_clip=adv_clip, clip_mode=clip_mode)
