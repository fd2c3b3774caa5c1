"""Drop-in for ``sde_step_with_logprob`` of Flow-GRPO and its descendants (DanceGRPO, Flow-Factory, VeRL-Omni),
computed through the fused ops."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ..ops.step import fused_sq, step_logprob
from .noise import draw_noise

SDE_TYPES = ("sde", "cps")


def _per_sample(scheduler, timestep, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, sigma_next) of each sample's timestep, float32 [B] (Flow-GRPO indexes scheduler.sigmas by
    ``index_for_timestep`` of every sample's timestep)."""
    if isinstance(timestep, torch.Tensor) and timestep.dim() == 0:
        timestep = timestep.reshape(1)
    steps: Sequence = timestep if isinstance(timestep, (torch.Tensor, list, tuple)) else [timestep]
    if len(steps) not in (1, batch):
        raise ValueError(f"timestep must be one value or one per sample ({batch}), got {len(steps)}")
    idx = [scheduler.index_for_timestep(t) for t in steps]
    if len(idx) == 1:
        idx = idx * batch
    sig = scheduler.sigmas
    if max(idx) + 1 >= sig.numel():
        raise ValueError(f"timestep at index {max(idx)} is the scheduler's last: there is no next sigma to step to")
    return sig[idx].float().to(device), sig[[i + 1 for i in idx]].float().to(device)


def sde_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: Union[float, torch.Tensor, Sequence],
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    sde_type: str = "sde",
    return_sqrt_dt: bool = False,
):
    """One step of a flow-matching model (velocity v) sampled as Flow-GRPO's SDE, with its log-prob
    (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL").

    The argument order, sampling and returns of flow_grpo's function of this name:
    ``(prev_sample, log_prob, prev_sample_mean, std_dev_t)`` (and ``sqrt(-dt)`` with ``return_sqrt_dt``),
    per-sample timesteps, everything in float32. With sigma the sample's sigma, sigma' the next one and
    dt = sigma' - sigma < 0:

    ``sde_type="sde"``: std_t = noise_level sqrt(sigma / (1 - sigma)) (sigma = 1 replaced by sigmas[1] in
    the denominator),
        mean = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt,
        prev = mean + std_t sqrt(-dt) z,
        log_prob = mean over the non-batch dims of log N(prev; mean, (std_t sqrt(-dt))^2);
    ``sde_type="cps"`` (coefficients-preserving sampling): std_t = sigma' sin(noise_level pi / 2),
        mean = (x - sigma v)(1 - sigma') + (x + (1 - sigma) v) sqrt(sigma'^2 - std_t^2),
        prev = mean + std_t z,
        log_prob = -mean over the non-batch dims of (prev - mean)^2     (no scale, no constants).

    The step is affine in v, so log_prob and the mean come from one fused pass over (sample, prev_sample,
    model_output). Gradients flow to model_output and sample, not to a given prev_sample (it is detached,
    as in flow_grpo); z is drawn with diffusers' ``randn_tensor(generator=...)`` rules (``noise.draw_noise``) when prev_sample is None.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    if not isinstance(sample, torch.Tensor) or sample.dim() < 2:
        raise ValueError(f"sample must be a batched tensor [B, ...], got {getattr(sample, 'shape', type(sample).__name__)}")
    if not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 for a stochastic step, got {noise_level}")
    v, x = model_output.float(), sample.float()
    B, latent_dims = x.shape[0], x.dim() - 1
    sigma, nxt = _per_sample(scheduler, timestep, B, x.device)
    dt = nxt - sigma
    if sde_type == "sde":
        sigma_max = float(scheduler.sigmas[1])
        std_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma))) * noise_level
        a = 1 + std_t**2 / (2 * sigma) * dt
        b = (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
        s = std_t * torch.sqrt(-dt)
    else:
        std_t = nxt * math.sin(noise_level * math.pi / 2)
        c = torch.sqrt(nxt**2 - std_t**2)
        a = (1 - nxt) + c
        b = -sigma * (1 - nxt) + (1 - sigma) * c
        s = std_t
    names = {"x": "sample", "y": "prev_sample", "eu": "model_output"}
    shape = (-1, *([1] * latent_dims))
    if prev_sample is None:
        _, _, mean = fused_sq(names, x=x, eu=v, a=a, b=b, latent_dims=latent_dims, want_mean=True)
        noise = draw_noise(v.shape, generator, v.device, v.dtype)
        prev_sample = mean + s.reshape(shape) * noise
    else:
        prev_sample = prev_sample.float()
    y = prev_sample.detach()
    if sde_type == "sde":  # the same op as ddim_step_with_logprob: log N(y; mean, s^2), mean over the latent dims
        log_prob, mean = step_logprob(x, y, v, None, a, b, 1.0, s, reduction="mean", return_mean=True,
                                      latent_dims=latent_dims)
    else:  # cps keeps only the squared residual
        ss, _, mean = fused_sq(names, x=x, y=y, eu=v, a=a, b=b, latent_dims=latent_dims, want_mean=True)
        log_prob = -ss / x[0].numel()
    out = (prev_sample, log_prob, mean, std_t.reshape(shape))
    return (*out, torch.sqrt(-dt).reshape(shape)) if return_sqrt_dt else out
