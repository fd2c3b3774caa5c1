"""The fused step primitive as a torch.library custom op, with autograd and a fake (meta) kernel.

``step_sq`` computes the per-row sums of squares of ``_problem.StepProblem`` (and optionally the mean)
on the chosen backend; its backward is a second custom op, so both directions trace into
torch.compile graphs without breaks. Forward reads each latent-sized input once; backward reads them
once more and writes each requested gradient once; nothing latent-sized is saved beyond the inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from ._problem import StepProblem


def _problem(x, y, eu, ec, ref_eu, ref_ec, coef, clip, latent_dims) -> StepProblem:
    return StepProblem(x, y, eu, ec, ref_eu, ref_ec, coef, clip, latent_dims)


@torch.library.custom_op("diffrl_fast::step_sq", mutates_args=())
def step_sq(
    x: Tensor,
    y: Optional[Tensor],
    eu: Optional[Tensor],
    ec: Optional[Tensor],
    ref_eu: Optional[Tensor],
    ref_ec: Optional[Tensor],
    coef: Tensor,
    clip: bool,
    latent_dims: int,
    want_ss: bool,
    want_kk: bool,
    want_mean: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    p = _problem(x, y, eu, ec, ref_eu, ref_ec, coef, clip, latent_dims)
    ss, kk, mean = backends.get(backend).step_fwd(p, want_ss, want_kk, want_mean)
    return ss.contiguous(), kk.contiguous(), mean.contiguous()


@step_sq.register_fake
def _step_sq_fake(x, y, eu, ec, ref_eu, ref_ec, coef, clip, latent_dims, want_ss, want_kk, want_mean, backend):
    lead = x.shape[: x.dim() - latent_dims]
    return (
        coef.new_empty(lead if want_ss else (0,)),
        coef.new_empty(lead if want_kk else (0,)),
        x.new_empty(x.shape if want_mean else (0,)),
    )


@torch.library.custom_op("diffrl_fast::step_sq_bwd", mutates_args=())
def step_sq_bwd(
    x: Tensor,
    y: Optional[Tensor],
    eu: Optional[Tensor],
    ec: Optional[Tensor],
    ref_eu: Optional[Tensor],
    ref_ec: Optional[Tensor],
    coef: Tensor,
    clip: bool,
    latent_dims: int,
    w_ss: Optional[Tensor],
    w_kk: Optional[Tensor],
    g_mean: Optional[Tensor],
    need_dx: bool,
    need_dy: bool,
    need_deu: bool,
    need_dec: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    p = _problem(x, y, eu, ec, ref_eu, ref_ec, coef, clip, latent_dims)
    grads = backends.get(backend).step_bwd(p, w_ss, w_kk, g_mean, (need_dx, need_dy, need_deu, need_dec))
    return tuple(x.new_empty(0) if g is None else g.contiguous() for g in grads)  # type: ignore[return-value]


@step_sq_bwd.register_fake
def _step_sq_bwd_fake(x, y, eu, ec, ref_eu, ref_ec, coef, clip, latent_dims, w_ss, w_kk, g_mean,
                      need_dx, need_dy, need_deu, need_dec, backend):
    return tuple(x.new_empty(x.shape if need else (0,)) for need in (need_dx, need_dy, need_deu, need_dec))


def _setup_context(ctx, inputs, output):
    x, y, eu, ec, ref_eu, ref_ec, coef, clip, latent_dims, want_ss, want_kk, want_mean, backend = inputs
    ctx.save_for_backward(x, y, eu, ec, ref_eu, ref_ec, coef)
    ctx.params = (clip, latent_dims, want_ss, want_kk, want_mean, backend)
    ctx.set_materialize_grads(False)


def _backward(ctx, g_ss, g_kk, g_mean):
    x, y, eu, ec, ref_eu, ref_ec, coef = ctx.saved_tensors
    clip, latent_dims, want_ss, want_kk, want_mean, backend = ctx.params
    need = tuple(bool(n) for n in ctx.needs_input_grad[:4])
    none = (None,) * 13
    if not any(need) or (g_ss is None and g_kk is None and g_mean is None):
        return none
    dx, dy, deu, dec = step_sq_bwd(
        x, y, eu, ec, ref_eu, ref_ec, coef, clip, latent_dims,
        g_ss if want_ss else None, g_kk if want_kk else None, g_mean if want_mean else None,
        *need, backend,
    )
    grads = tuple(g if n else None for g, n in zip((dx, dy, deu, dec), need))
    return grads + none[4:]


torch.library.register_autograd("diffrl_fast::step_sq", _backward, setup_context=_setup_context)
