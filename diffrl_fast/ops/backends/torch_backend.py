"""Plain-PyTorch backend: always available, any device, any strides.

Implements the two primitives of ``diffrl_fast.ops._problem`` with ordinary tensor ops in the
accumulation dtype (float32, float64 for float64 inputs). It materialises latent-sized temporaries;
it is the fallback and the readable statement of what the fused kernels compute, not the fast path.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._problem import COEF_A, COEF_B, COEF_CE, COEF_CX, COEF_G, COEF_LIMIT, COEF_M0, StepProblem

NAME = "torch"


def _col(p: StepProblem, j: int) -> torch.Tensor:
    """Coefficient column j shaped to broadcast against the latent tensors."""
    return p.coef[:, j].reshape(*p.lead_shape, *([1] * p.latent_dims))


def _eps(p: StepProblem, eu: Optional[torch.Tensor], ec: Optional[torch.Tensor], acc) -> Optional[torch.Tensor]:
    if eu is None:
        return None
    eu = eu.to(acc)
    if ec is None:
        return eu
    return eu + _col(p, COEF_G) * (ec.to(acc) - eu)


def _mean(p: StepProblem, x: torch.Tensor, e: Optional[torch.Tensor]):
    """mean and the local derivatives (dmean/dx, dmean/de) for the clip case (None when not clipping)."""
    a, b = _col(p, COEF_A), _col(p, COEF_B)
    mean = a * x if e is None else a * x + b * e
    if not p.clip:
        return mean, None, None
    m0, cx, ce, lim = (_col(p, j) for j in (COEF_M0, COEF_CX, COEF_CE, COEF_LIMIT))
    x0 = cx * x + ce * e
    clipped = (x0 > lim) | (x0 < -lim)
    clipped_mean = m0 * torch.maximum(torch.minimum(x0, lim), -lim) + (a - m0 * cx) * x + (b - m0 * ce) * e
    mean = torch.where(clipped, clipped_mean, mean)
    dmdx = torch.where(clipped, a - m0 * cx, a)
    dmde = torch.where(clipped, b - m0 * ce, b)
    return mean, dmdx, dmde


def _reduce(t: torch.Tensor, latent_dims: int) -> torch.Tensor:
    return t.sum(dim=tuple(range(t.dim() - latent_dims, t.dim())))


def step_fwd(p: StepProblem, want_ss: bool, want_kk: bool, want_mean: bool):
    acc = p.coef.dtype
    x = p.x.to(acc)
    mean, _, _ = _mean(p, x, _eps(p, p.eu, p.ec, acc))
    ss = _reduce((p.y.to(acc) - mean).square(), p.latent_dims) if want_ss else p.coef.new_empty(0)
    if want_kk:
        ref_mean, _, _ = _mean(p, x, _eps(p, p.ref_eu, p.ref_ec, acc))
        kk = _reduce((mean - ref_mean).square(), p.latent_dims)
    else:
        kk = p.coef.new_empty(0)
    mean_out = mean.to(p.x.dtype) if want_mean else p.x.new_empty(0)
    return ss, kk, mean_out


def step_bwd(p: StepProblem, w_ss, w_kk, g_mean, need: tuple[bool, bool, bool, bool]):
    """Gradients (dx, dy, deu, dec) in the inputs' dtype; None where ``need`` is False."""
    acc = p.coef.dtype
    x = p.x.to(acc)
    e = _eps(p, p.eu, p.ec, acc)
    mean, dmdx, dmde = _mean(p, x, e)
    shape = (*p.lead_shape, *([1] * p.latent_dims))
    dmean = torch.zeros_like(mean)
    dy = None
    if w_ss is not None:
        r2 = 2.0 * w_ss.to(acc).reshape(shape) * (p.y.to(acc) - mean)
        dmean = dmean - r2
        dy = r2
    dx_ref = None  # x_t also enters the reference mean: dL/dx gets -dL/dref_mean * dref_mean/dx
    if w_kk is not None:
        ref_mean, rdmdx, _ = _mean(p, x, _eps(p, p.ref_eu, p.ref_ec, acc))
        dkk = 2.0 * w_kk.to(acc).reshape(shape) * (mean - ref_mean)
        dmean = dmean + dkk
        dx_ref = dkk * (_col(p, COEF_A) if rdmdx is None else rdmdx)
    if g_mean is not None:
        dmean = dmean + g_mean.to(acc)
    dtype = p.x.dtype
    need_dx, need_dy, need_deu, need_dec = need
    dx = None
    if need_dx:
        dx = dmean * (_col(p, COEF_A) if dmdx is None else dmdx)
        dx = (dx if dx_ref is None else dx - dx_ref).to(dtype)
    dy_out = None
    if need_dy:
        dy_out = (dy if dy is not None else torch.zeros_like(mean)).to(dtype)
    deu = dec = None
    if p.eu is not None and (need_deu or need_dec):
        de = dmean * (_col(p, COEF_B) if dmde is None else dmde)
        if p.ec is None:
            deu = de.to(dtype) if need_deu else None
        else:
            g = _col(p, COEF_G)
            deu = ((1.0 - g) * de).to(dtype) if need_deu else None
            dec = (g * de).to(dtype) if need_dec else None
    return dx, dy_out, deu, dec


def step_fwd_res(p: StepProblem):
    """(ss, res): ``step_fwd``'s ss, and the residual res = y - mean in the inputs' dtype.

    The saved-residual form of the forward pass (no x0 clipping, no reference): when nothing is clipped, every
    gradient of ss is a per-row multiple of the residual (``scale_rows``), so a backward reads one latent-sized
    tensor instead of the four inputs.
    """
    acc = p.coef.dtype
    mean, _, _ = _mean(p, p.x.to(acc), _eps(p, p.eu, p.ec, acc))
    r = p.y.to(acc) - mean
    return _reduce(r.square(), p.latent_dims), r.to(p.x.dtype)


def scale_rows(res: torch.Tensor, k: torch.Tensor, need: tuple[bool, bool, bool, bool], latent_dims: int):
    """(k[:, j] * res for j = 0..3) in res's dtype, None where ``need[j]`` is False.

    With w = dL/dss and the row's a, b, g, the gradients of an unclipped step are multiples of res = y - mean:
    dx = -2 w a res, dy = 2 w res, deu = -2 w b (1 - g) res (-2 w b res without eps_c), dec = -2 w b g res.
    """
    shape = (*res.shape[: res.dim() - latent_dims], *([1] * latent_dims))
    r = res.to(k.dtype)
    return tuple((k[:, j].reshape(shape) * r).to(res.dtype) if n else None for j, n in enumerate(need))
