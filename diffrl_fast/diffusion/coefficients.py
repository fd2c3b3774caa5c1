"""Per-sample affine step coefficients (a, b, s, x0 clipping) for each supported scheduler.

Every supported step has the form  x_{t-1} = a x_t + b eps_hat + s z  (../shared/DESIGN.md section 2),
possibly with x0 clipping (see ``diffrl_fast.ops.X0Clip``). The rollout and the training-side recompute
both take their coefficients from here, so they cannot drift apart.

Coefficients are computed in float64 from the scheduler's tables and returned as float32 tensors of
shape [B] on the requested device.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from ..ops import X0Clip

Timestep = Union[int, float, torch.Tensor]


class StepCoefficients(NamedTuple):
    """x_{t-1} = a x_t + b eps_hat + s z, with optional x0 clipping; each field [B] float32."""

    a: torch.Tensor
    b: torch.Tensor
    s: torch.Tensor
    clip_x0: Optional[X0Clip] = None


def _timesteps(timestep: Timestep, batch: int) -> torch.Tensor:
    t = torch.as_tensor(timestep).detach().to("cpu")
    if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, batch)):
        raise ValueError(f"timestep must be a scalar or a [B={batch}] tensor, got shape {tuple(t.shape)}")
    return t.reshape(-1).expand(batch).to(torch.int64) if t.numel() == 1 else t.to(torch.int64)


def ddim_coefficients(
    scheduler,
    timestep: Timestep,
    batch: int,
    eta: float,
    *,
    device: Union[str, torch.device] = "cpu",
    use_clipped_model_output: bool = False,
    clamp_prev_timestep: bool = False,
) -> StepCoefficients:
    """Coefficients of diffusers' ``DDIMScheduler.step`` (Song et al. 2021, eq. 12 and 16) at ``timestep``.

    With abar_t, abar_p the cumulative alphas at t and at the previous timestep
    p = t - num_train_timesteps // num_inference_steps (``final_alpha_cumprod`` when p < 0):

        var = (1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p),   s = eta sqrt(var),   c = sqrt(1 - abar_p - s^2)
        x0  = cx x_t + ce e      eps = px x_t + pe e      (by prediction type; e is the model output)
        mean = sqrt(abar_p) x0 + c eps = a x_t + b e

    epsilon: x0 = (x - sqrt(1-abar_t) e)/sqrt(abar_t), eps = e;  v_prediction: x0 = sqrt(abar_t) x - sqrt(1-abar_t) e,
    eps = sqrt(abar_t) e + sqrt(1-abar_t) x;  sample: x0 = e, eps = (x - sqrt(abar_t) e)/sqrt(1-abar_t).
    With ``clip_sample`` the x0 clip is returned as an X0Clip (diffusers clips x0 after deriving eps,
    unless ``use_clipped_model_output`` re-derives eps from the clipped x0).

    ``clamp_prev_timestep=True`` reproduces ddpo-pytorch and trl, which clamp p to 0 instead of using
    ``final_alpha_cumprod`` at the last step; the two agree unless ``set_alpha_to_one=True``.
    """
    from diffusers import DDIMScheduler

    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(f"ddim_coefficients needs a diffusers DDIMScheduler, got {type(scheduler).__name__}")
    if scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no inference steps: call scheduler.set_timesteps(num_steps) first")
    if not eta > 0:
        raise ValueError(f"eta must be > 0 for a stochastic step with a log-prob, got {eta}")
    cfg = scheduler.config
    if cfg.thresholding:
        raise ValueError("dynamic thresholding makes the DDIM step non-affine and is not supported; set thresholding=False")
    t = _timesteps(timestep, batch)
    prev = t - cfg.num_train_timesteps // scheduler.num_inference_steps
    table = scheduler.alphas_cumprod.to(torch.float64)
    if (t < 0).any() or (t >= table.numel()).any():
        raise ValueError(f"timestep out of range [0, {table.numel()}): {t.tolist()}")
    abar_t = table[t]
    if clamp_prev_timestep:
        abar_p = table[prev.clamp(0, cfg.num_train_timesteps - 1)]
    else:
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
        abar_p = torch.where(prev >= 0, table[prev.clamp(min=0)], final)
    var = (1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p)
    s = eta * var.sqrt()
    if not bool((s > 0).all()):
        raise ValueError(
            f"the DDIM step at timestep {t.tolist()} is deterministic (variance 0, e.g. the last step with "
            "set_alpha_to_one=True), so it has no log-prob; use clamp_prev_timestep=True or set_alpha_to_one=False"
        )
    c_dir = (1 - abar_p - s * s).clamp(min=0).sqrt()
    sa, sb = abar_t.sqrt(), (1 - abar_t).sqrt()
    if cfg.prediction_type == "epsilon":
        cx, ce, px, pe = 1 / sa, -sb / sa, torch.zeros_like(sa), torch.ones_like(sa)
    elif cfg.prediction_type == "v_prediction":
        cx, ce, px, pe = sa, -sb, sb, sa
    elif cfg.prediction_type == "sample":
        cx, ce, px, pe = torch.zeros_like(sa), torch.ones_like(sa), 1 / sb, -sa / sb
    else:
        raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}; expected epsilon, v_prediction or sample")
    m0 = abar_p.sqrt()
    clip = None
    if cfg.clip_sample and use_clipped_model_output:
        # eps is re-derived from the clipped x0: eps = (x - sqrt(abar_t) x0c) / sqrt(1 - abar_t)
        m0 = m0 - c_dir * sa / sb
        a, b = m0 * cx + c_dir / sb, m0 * ce
    else:
        a, b = m0 * cx + c_dir * px, m0 * ce + c_dir * pe
    f32 = dict(dtype=torch.float32, device=device)
    if cfg.clip_sample:
        clip = X0Clip(m0.to(**f32), cx.to(**f32), ce.to(**f32), float(cfg.clip_sample_range))
    return StepCoefficients(a.to(**f32), b.to(**f32), s.to(**f32), clip)
