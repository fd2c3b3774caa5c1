"""Fused affine diffusion step: log-prob of x_{t-1} and KL to a reference policy, straight from model outputs.

Every sampler step diffrl_fast supports is affine in the model output (DDIM, DDPM, flow-matching SDE;
see docs in ``diffrl_fast.diffusion.coefficients``):

    eps_hat = eps_u + g (eps_c - eps_u)           classifier-free guidance (eps_c=None: eps_hat = eps_u)
    mean    = a x_t + b eps_hat
    x_{t-1} ~ N(mean, s^2 I)

so one fused pass over (x_t, x_prev, eps_u, eps_c) with per-sample scalars (a, b, g, s) gives the policy
log-prob of DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning") for any
of them, without materialising eps_hat, mean or the residual.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

from . import backends
from ._fused import step_sq
from ._problem import COEF_LIMIT, N_COEF, acc_dtype
from ._validate import all_finite, check_latents, check_reduction, data_checks_enabled, per_row, raise_if_nonfinite

Coef = Union[float, torch.Tensor]
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class X0Clip(NamedTuple):
    """x0 clipping (diffusers' ``clip_sample``) for a step whose mean is otherwise affine.

    With x0 = cx x_t + ce eps_hat the clipped step mean is

        mean = m0 clamp(x0, -limit, limit) + (a - m0 cx) x_t + (b - m0 ce) eps_hat,

    which equals a x_t + b eps_hat wherever |x0| <= limit. For DDIM with epsilon prediction,
    cx = 1/sqrt(abar_t), ce = -sqrt(1-abar_t)/sqrt(abar_t), m0 = sqrt(abar_prev);
    ``diffrl_fast.diffusion.coefficients`` builds these for every supported scheduler.
    Each field is a float or a tensor broadcastable to the leading dims.
    """

    m0: Coef
    cx: Coef
    ce: Coef
    limit: Coef = 1.0


def pack_coef(lead, device, dtype, a, b, g, clip_x0: Optional[X0Clip], check_data: bool = True) -> torch.Tensor:
    """The [N, 7] coefficient matrix (a, b, g, m0, cx, ce, limit), validated with one data check.

    ``check_data=False`` leaves the value checks to a kernel that checks each row's coefficients itself.
    """
    if clip_x0 is None and all(isinstance(v, float) and not isinstance(v, bool) for v in (a, b, g)):
        # all scalars (gaussian_logprob, gaussian_kl, unbatched steps): one small tensor, no per-column ops
        for name, v in (("a", a), ("b", b), ("g", g)):
            per_row(name, v, torch.Size([0]), device, dtype)  # validation only (finite)
        return torch.tensor([a, b, g, 0.0, 0.0, 0.0, 0.0], dtype=dtype, device=device).repeat(lead.numel(), 1)
    if clip_x0 is not None and not isinstance(clip_x0, X0Clip):
        raise ValueError(f"clip_x0 must be an X0Clip or None, got {type(clip_x0).__name__}")
    named = [("a", a, False), ("b", b, False), ("g", g, False)]
    if clip_x0 is not None:
        named += [(f"clip_x0.{f}", getattr(clip_x0, f), f == "limit") for f in X0Clip._fields]
    cols = [per_row(n, v, lead, device, dtype, positive=pos, check_data=False) for n, v, pos in named]
    cols += [torch.zeros_like(cols[0])] * (N_COEF - len(cols))
    coef = torch.stack(cols, dim=1)
    if check_data and data_checks_enabled() and coef.numel():
        ok = all_finite(coef) and (clip_x0 is None or float(coef[:, COEF_LIMIT].min()) > 0)
        if not ok:  # rare: name the culprit with the per-column checks
            for n, v, pos in named:
                per_row(n, v, lead, device, dtype, positive=pos)
    return coef


@torch.compiler.assume_constant_result
def _resolve_backend(device_type: str) -> str:
    # Resolved once per compiled graph (a constant to torch.compile), at every call in eager mode.
    return backends.resolve(device_type)


def fused_sq(
    names: dict[str, str],
    *,
    x: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    eu: Optional[torch.Tensor] = None,
    ec: Optional[torch.Tensor] = None,
    ref_eu: Optional[torch.Tensor] = None,
    ref_ec: Optional[torch.Tensor] = None,
    a: Coef = 1.0,
    b: Coef = 0.0,
    g: Coef = 1.0,
    clip_x0: Optional[X0Clip] = None,
    latent_dims: int = 3,
    want_kk: bool = False,
    want_mean: bool = False,
):
    """Validate, pack and run the fused primitive. ``names`` maps internal to public argument names.

    Returns (ss, kk, mean) as in ``_problem``; ss and kk have the leading shape.
    """
    internal = {"x": x, "y": y, "eu": eu, "ec": ec, "ref_eu": ref_eu, "ref_ec": ref_ec}
    public = {names[k]: v for k, v in internal.items() if k in names}
    template = check_latents(latent_dims, public)
    if ec is not None and eu is None:
        raise ValueError(f"{names['ec']} was given without {names.get('eu', 'eps_u')}")
    if want_kk and ref_eu is None:
        raise ValueError(f"{names['ref_eu']} is required for the KL")
    if want_kk and (ref_ec is None) != (ec is None):
        raise ValueError(f"give {names['ref_ec']} exactly when {names['ec']} is given (the reference step must use the same guidance)")
    if clip_x0 is not None and eu is None:
        raise ValueError("clip_x0 needs a model output (eps_u) to clip against")
    lead = template.shape[: template.dim() - latent_dims]
    dtype = acc_dtype(template.dtype)
    coef = pack_coef(lead, template.device, dtype, a, b, g, clip_x0)
    backend = _resolve_backend(template.device.type)
    ref_eu = ref_eu.detach() if ref_eu is not None else None
    ref_ec = ref_ec.detach() if ref_ec is not None else None
    ss, kk, mean = step_sq(
        x, y, eu, ec, ref_eu, ref_ec, coef, clip_x0 is not None, latent_dims,
        y is not None, want_kk, want_mean, backend,
    )
    raise_if_nonfinite({"ss": ss, "kk": kk}, public)
    return ss, kk, mean


def logprob_from_sq(ss: torch.Tensor, s: torch.Tensor, row_size: int, reduction: str) -> torch.Tensor:
    """log N(y; mean, s^2 I) from ss = |y - mean|^2:  -ss/(2 s^2) - D log s - (D/2) log(2 pi)  ("sum"), or / D ("mean")."""
    if reduction == "sum":
        return -ss / (2.0 * s * s) - row_size * (torch.log(s) + HALF_LOG_2PI)
    return -ss / (2.0 * row_size * s * s) - torch.log(s) - HALF_LOG_2PI


def std_rows(s: Coef, template: torch.Tensor, latent_dims: int) -> torch.Tensor:
    """std as a tensor of the leading shape that keeps autograd to a tensor std."""
    lead = template.shape[: template.dim() - latent_dims]
    dtype = acc_dtype(template.dtype)
    per_row("s", s, lead, template.device, dtype, positive=True)  # validation (one fused check for a tensor)
    if isinstance(s, torch.Tensor):
        return torch.broadcast_to(s.to(device=template.device, dtype=dtype), lead)
    return torch.full(lead, float(s), dtype=dtype, device=template.device)


def step_logprob(
    x_t: torch.Tensor,
    x_prev: torch.Tensor,
    eps_u: torch.Tensor,
    eps_c: Optional[torch.Tensor],
    a: Coef,
    b: Coef,
    g: Coef,
    s: Coef,
    *,
    reduction: str = "mean",
    clip_x0: Optional[X0Clip] = None,
    return_mean: bool = False,
    latent_dims: int = 3,
):
    """Log-prob of x_prev under one affine denoising step, fused (DDPO, Black et al. 2023).

        eps_hat = eps_u + g (eps_c - eps_u)        (eps_c=None: eps_hat = eps_u)
        mean    = a x_t + b eps_hat                 (see X0Clip for clip_sample)
        log p   = -|x_prev - mean|^2 / (2 s^2) - D log s - (D/2) log(2 pi)     reduction="sum"
        log p   = that / D                                                      reduction="mean" (ddpo-pytorch, trl)

    Args:
        x_t, x_prev, eps_u, eps_c: latent tensors [*lead, C, H, W] (the last ``latent_dims`` dims are
            reduced); float16/bfloat16/float32/float64; leading dims may be strided slices.
        a, b, g, s: per-row coefficients, floats or tensors broadcastable to ``lead``; s > 0.
        return_mean: also return the step mean (in the inputs' dtype).
    Returns:
        log p of shape ``lead`` (float32; float64 for float64 inputs), and the mean if asked.
    Gradients flow to x_t, x_prev, eps_u, eps_c and a tensor ``s``; not to a, b, g.
    """
    check_reduction(reduction)
    names = {"x": "x_t", "y": "x_prev", "eu": "eps_u", "ec": "eps_c"}
    ss, _, mean = fused_sq(names, x=x_t, y=x_prev, eu=eps_u, ec=eps_c, a=a, b=b, g=g, clip_x0=clip_x0,
                           latent_dims=latent_dims, want_mean=return_mean)
    std = std_rows(s, x_t, latent_dims)
    logp = logprob_from_sq(ss, std, x_t.shape[x_t.dim() - latent_dims :].numel(), reduction)
    return (logp, mean) if return_mean else logp


def step_mean(
    x_t: torch.Tensor,
    eps_u: torch.Tensor,
    eps_c: Optional[torch.Tensor],
    a: Coef,
    b: Coef,
    g: Coef,
    *,
    clip_x0: Optional[X0Clip] = None,
    latent_dims: int = 3,
) -> torch.Tensor:
    """The step mean  a x_t + b (eps_u + g (eps_c - eps_u))  (clipped as in X0Clip), in one fused pass.

    The same arithmetic as ``step_logprob`` uses, so a sample x_prev = mean + s z drawn from it and then
    scored by ``step_logprob`` reproduces the rollout's log-prob exactly.
    """
    names = {"x": "x_t", "eu": "eps_u", "ec": "eps_c"}
    _, _, mean = fused_sq(names, x=x_t, eu=eps_u, ec=eps_c, a=a, b=b, g=g, clip_x0=clip_x0,
                          latent_dims=latent_dims, want_mean=True)
    return mean


def step_kl(
    x_t: torch.Tensor,
    eps_u: torch.Tensor,
    eps_c: Optional[torch.Tensor],
    ref_eps_u: torch.Tensor,
    ref_eps_c: Optional[torch.Tensor],
    a: Coef,
    b: Coef,
    g: Coef,
    s: Coef,
    *,
    reduction: str = "mean",
    clip_x0: Optional[X0Clip] = None,
    latent_dims: int = 3,
) -> torch.Tensor:
    """KL(p_theta || p_ref) of one step, fused: the reference mean is never materialised (DPOK, Fan et al. 2023).

    Both step Gaussians share x_t, the coefficients and s; only the model outputs differ:

        KL = |mean_theta - mean_ref|^2 / (2 s^2)         reduction="sum"  (= b^2 |eps_hat - eps_hat_ref|^2 / (2 s^2) unclipped)
        KL = that / D                                     reduction="mean"

    Gradients flow to x_t, eps_u, eps_c and a tensor s; the reference outputs are constants.
    """
    check_reduction(reduction)
    names = {"x": "x_t", "eu": "eps_u", "ec": "eps_c", "ref_eu": "ref_eps_u", "ref_ec": "ref_eps_c"}
    _, kk, _ = fused_sq(names, x=x_t, eu=eps_u, ec=eps_c, ref_eu=ref_eps_u, ref_ec=ref_eps_c, a=a, b=b, g=g,
                        clip_x0=clip_x0, latent_dims=latent_dims, want_kk=True)
    std = std_rows(s, x_t, latent_dims)
    kl = kk / (2.0 * std * std)
    return kl / x_t.shape[x_t.dim() - latent_dims :].numel() if reduction == "mean" else kl
