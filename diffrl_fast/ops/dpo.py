"""Preference losses on denoising trajectories: D3PO's per-step DPO loss and the trajectory-level
Plackett-Luce (ListMLE) loss of the dense-reward view."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._validate import check_rows


class DPOLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    accuracy: torch.Tensor  # fraction of (weighted) steps whose implicit reward margin is > 0, detached
    margin: torch.Tensor  # mean implicit reward margin beta * (h_w - h_l), detached


def _logratio(logp: torch.Tensor, ref_logp: torch.Tensor, ratio_clip: Optional[float]) -> torch.Tensor:
    h = logp - ref_logp.detach()
    if ratio_clip is not None:
        h = h.clamp(math.log(1.0 - ratio_clip), math.log(1.0 + ratio_clip))
    return h


def dpo_step_loss(
    logp_w: torch.Tensor,
    ref_logp_w: torch.Tensor,
    logp_l: torch.Tensor,
    ref_logp_l: torch.Tensor,
    *,
    beta: float = 0.1,
    weights: Optional[torch.Tensor] = None,
    ratio_clip: Optional[float] = None,
) -> DPOLoss:
    """D3PO's per-step DPO loss (Yang et al. 2024, "Using Human Feedback to Fine-tune Diffusion Models
    without Any Reward Model"), for the winner w and loser l of the same prompt at the same step:

        h    = log pi_theta(a | s) - log pi_ref(a | s)         (clamped to [log(1-c), log(1+c)] if ratio_clip=c)
        l_i  = -log sigmoid( beta (h_w - h_l) )
        L    = sum_i w_i l_i / sum_i w_i                        (w_i = 1 without weights: D3PO's mean; any
                                                                 per-step weighting otherwise, e.g. gamma^t)

    (The dense-reward view's trajectory-level loss, which discounts inside the sigmoid, is
    ``trajectory_dpo_loss``.)

    All four log-prob tensors share one shape (e.g. [B] or [B, T]); ``weights`` broadcasts to it.
    The reference log-probs are constants.
    """
    if not isinstance(logp_w, torch.Tensor):
        raise ValueError(f"logp_w must be a torch.Tensor, got {type(logp_w).__name__}")
    shape, device = logp_w.shape, logp_w.device
    for name, t in (("ref_logp_w", ref_logp_w), ("logp_l", logp_l), ("ref_logp_l", ref_logp_l)):
        check_rows(name, t, shape, device)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if ratio_clip is not None and not 0 < ratio_clip < 1:
        raise ValueError(f"ratio_clip must be in (0, 1) or None, got {ratio_clip}")
    margin = beta * (_logratio(logp_w, ref_logp_w, ratio_clip) - _logratio(logp_l, ref_logp_l, ratio_clip))
    per_step = -F.logsigmoid(margin)
    if weights is None:
        w = torch.ones_like(per_step)
    else:
        try:
            w = torch.broadcast_to(weights.detach().to(device=device, dtype=per_step.dtype), shape)
        except (RuntimeError, AttributeError):
            raise ValueError(f"weights must be a tensor broadcastable to {tuple(shape)}") from None
        if bool((w < 0).any()) or not bool(w.sum() > 0):
            raise ValueError("weights must be >= 0 with a positive sum")
    total = w.sum()
    loss = (w * per_step).sum() / total
    with torch.no_grad():
        accuracy = (w * (margin > 0).to(w.dtype)).sum() / total
        mean_margin = (w * margin).sum() / total
    return DPOLoss(loss, accuracy, mean_margin)


def plackett_luce_loss(scores: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Plackett-Luce negative log-likelihood of a ranking (ListMLE), for K >= 2 trajectories per prompt.

    ``scores`` [..., K] are listed best first. With u_k = temperature * scores_k:

        L = mean over leading dims of  sum_{k=1}^{K-1} [ logsumexp_{j >= k} u_j - u_k ]

    For K = 2 this is -log sigmoid(C (e_1 - e_2)), the pairwise loss of the dense-reward view
    (Yang et al. 2024, "A Dense Reward View on Aligning Text-to-Image Diffusion with Preference").
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() < 1 or scores.shape[-1] < 2:
        raise ValueError(f"scores must be a tensor [..., K] with K >= 2, got {getattr(scores, 'shape', scores)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    u = temperature * scores
    # logsumexp over the suffix j >= k, computed as a reversed cumulative logsumexp.
    suffix = torch.logcumsumexp(u.flip(-1), dim=-1).flip(-1)
    return (suffix[..., :-1] - u[..., :-1]).sum(-1).mean()


def trajectory_dpo_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    *,
    temperature: float = 1.0,
    weights: Optional[torch.Tensor] = None,
    log_ratio_clip: Optional[float] = None,
) -> torch.Tensor:
    """Temporally discounted trajectory preference loss of the dense-reward view (Yang et al., ICML 2024,
    "A Dense Reward View on Aligning Text-to-Image Diffusion with Preference"; Shentao-YANG/Dense_Reward_T2I).

    ``logp``, ``ref_logp``: [B, K, T] step log-probs of K trajectories per prompt, ranked best first, over T
    steps (or over T draws of steps, repeats allowed). With weights w_t (uniform without ``weights``) and the
    reference's hard log-ratio clamp c (``log_ratio_clip``; no gradient from a step whose log-ratio left [-c, c]):

        h_t^k = clamp(log pi_theta(a_t^k | s_t^k) - log pi_ref(a_t^k | s_t^k), -c, c)
        e_k   = sum_t w_t h_t^k / sum_t w_t
        L     = plackett_luce_loss(e, temperature=C)      (= -log sigmoid(C (e_1 - e_2)) for K = 2)

    The reference draws steps t ~ Cat(gamma^t / sum gamma^t) with replacement and averages them uniformly (pass
    the drawn steps, no weights); ``weights = gamma^t`` over all T steps is the same expectation without
    sampling. ``weights`` broadcasts to [B, K, T]. The reference log-probs are constants.
    """
    if not isinstance(logp, torch.Tensor) or logp.dim() != 3:
        raise ValueError(f"logp must be [B, K, T], got {getattr(logp, 'shape', type(logp).__name__)}")
    check_rows("ref_logp", ref_logp, logp.shape, logp.device)
    if log_ratio_clip is not None and not log_ratio_clip > 0:
        raise ValueError(f"log_ratio_clip must be > 0 or None, got {log_ratio_clip}")
    h = logp - ref_logp.detach()
    if log_ratio_clip is not None:
        h = h.clamp(-log_ratio_clip, log_ratio_clip)
    if weights is None:
        e = h.mean(-1)
    else:
        try:
            w = torch.broadcast_to(weights.detach().to(device=logp.device, dtype=h.dtype), h.shape)
        except (RuntimeError, AttributeError):
            raise ValueError(f"weights must be a tensor broadcastable to {tuple(h.shape)}") from None
        if bool((w < 0).any()) or not bool((w.sum(-1) > 0).all()):
            raise ValueError("weights must be >= 0 with a positive sum over T")
        e = (w * h).sum(-1) / w.sum(-1)
    return plackett_luce_loss(e, temperature=temperature)
