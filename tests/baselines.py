"""The eager PyTorch formulas as ddpo-pytorch and trl write them: the baselines of tests and benchmarks.

Benchmarks import these, so a benchmark and a test never disagree on what "the baseline" is.
"""
from __future__ import annotations

import math

import torch


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))


def ddpo_step_logprob(x, prev, eps_u, eps_c, guidance, abar_t, abar_p, std):
    """DDIM step log-prob as ddpo-pytorch's ddim_step_with_logprob computes it (eps prediction, CFG, no clip)."""
    eps = eps_u + guidance * (eps_c - eps_u)
    abar_t, abar_p, std = (_bcast(v, x) for v in (abar_t, abar_p, std))
    pred_original_sample = (x - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5
    pred_sample_direction = (1 - abar_p - std**2) ** 0.5 * eps
    prev_sample_mean = abar_p**0.5 * pred_original_sample + pred_sample_direction
    log_prob = (
        -((prev.detach() - prev_sample_mean) ** 2) / (2 * std**2)
        - torch.log(std)
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def ddpo_ppo_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max):
    """trl's DDPOTrainer.loss / ddpo-pytorch's inline PPO step."""
    advantages = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    approx_kl = 0.5 * torch.mean((log_prob - old_log_prob) ** 2)
    clipfrac = torch.mean((torch.abs(ratio - 1.0) > clip_range).float())
    return loss, approx_kl, clipfrac


def ddpo_ppo_step_loss(x, prev, eps_u, eps_c, guidance, abar_t, abar_p, std, old_log_prob, advantages,
                       clip_range=1e-4, adv_clip_max=5.0):
    """The whole training-step loss of ddpo-pytorch/trl for one timestep of a batch, in eager PyTorch."""
    log_prob = ddpo_step_logprob(x, prev, eps_u, eps_c, guidance, abar_t, abar_p, std)
    return ddpo_ppo_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max)[0]


def ddim_affine(abar_t, abar_p, std):
    """(a, b) of the same DDIM step written as mean = a x + b eps (../shared/DESIGN.md section 2)."""
    a = (abar_p / abar_t).sqrt()
    b = (1 - abar_p - std**2).sqrt() - (abar_p * (1 - abar_t) / abar_t).sqrt()
    return a, b


def random_ddim_rows(n: int, generator: torch.Generator, eta: float = 1.0):
    """Per-row (abar_t, abar_p, std) of plausible DDIM steps (abar_p > abar_t)."""
    abar_t = 0.05 + 0.9 * torch.rand(n, generator=generator, dtype=torch.float64)
    abar_p = abar_t + (1 - abar_t) * (0.05 + 0.5 * torch.rand(n, generator=generator, dtype=torch.float64))
    var = (1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p)
    return abar_t.float(), abar_p.float(), (eta * var.sqrt()).float()


def eager_affine_logprob(x, prev, eps_u, eps_c, a, b, g, s, latent_dims=3):
    """The affine step log-prob in plain PyTorch, entirely in the inputs' dtype (for the low-precision rule)."""
    nd = latent_dims
    lead = x.shape[: x.dim() - nd]

    def rows(v):
        return torch.broadcast_to(torch.as_tensor(v, dtype=x.dtype, device=x.device), lead).reshape(*lead, *([1] * nd))

    a, b, g, s = rows(a), rows(b), rows(g), rows(s)
    eps = eps_u if eps_c is None else eps_u + g * (eps_c - eps_u)
    mean = a * x + b * eps
    log_prob = -((prev - mean) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(x.dim() - nd, x.dim())))
