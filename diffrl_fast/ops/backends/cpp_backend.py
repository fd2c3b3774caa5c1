"""C++/OpenMP backend for CPU tensors (csrc/, built by setup.py as ``diffrl_fast._C``).

Tensors cross into C++ as zero-copy numpy views (bfloat16 as an int16 view). The kernels take the
two-level row addressing of ``_problem.row_addressing``, so strided leading dims are read in place.
Thread count follows ``torch.get_num_threads()``.
"""
from __future__ import annotations

import torch

from ... import _C  # noqa: F401  - ImportError here makes the registry fall back to torch
from .._problem import LATENT_NAMES, StepProblem, row_addressing, tensor_rows

NAME = "cpp"

_DTYPE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _np(t):
    if t is None:
        return None
    if t.device.type != "cpu":
        raise RuntimeError(f"the cpp backend runs on CPU tensors, got one on {t.device}")
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def _args(p: StepProblem):
    n_inner, pairs = row_addressing(p)
    tensors = [_np(getattr(p, n)) for n in LATENT_NAMES]
    return (_DTYPE[p.x.dtype], p.n_rows, n_inner, p.row_size, tensors, pairs, _np(p.coef.contiguous()), p.clip)


def step_fwd(p: StepProblem, want_ss: bool, want_kk: bool, want_mean: bool):
    lead = p.lead_shape
    ss = p.coef.new_empty(lead if want_ss else (0,))
    kk = p.coef.new_empty(lead if want_kk else (0,))
    mean = torch.empty(p.x.shape if want_mean else (0,), dtype=p.x.dtype)
    if p.n_rows:
        _C.step_fwd(*_args(p), _np(ss) if want_ss else None, _np(kk) if want_kk else None,
                    _np(mean) if want_mean else None, torch.get_num_threads())
    return ss, kk, mean


def step_bwd(p: StepProblem, w_ss, w_kk, g_mean, need):
    acc = p.coef.dtype
    present = (p.x, p.y, p.eu, p.ec)
    outs = [torch.empty(p.x.shape, dtype=p.x.dtype) if n and t is not None else None for n, t in zip(need, present)]
    if p.n_rows:
        _C.step_bwd(
            *_args(p),
            None if w_ss is None else _np(w_ss.to(acc).contiguous()),
            None if w_kk is None else _np(w_kk.to(acc).contiguous()),
            None if g_mean is None else _np(g_mean.to(p.x.dtype).contiguous()),
            *[_np(o) for o in outs],
            torch.get_num_threads(),
        )
    return tuple(outs)



def ppo_step(x, y, eu, ec, coef, rows, lead, clip_range, adv_clip, clip_mode, reduction, need):
    """The fused PPO step loss (csrc ppo_step): log p, dL/dlogp, the statistics and the gradients in one call.

    The caller (ops/ppo.py) has validated everything; tensors cross as raw pointers. ``lead`` is the leading
    shape of x (one row per element); ``rows`` holds the per-row inputs as 1-D tensors of any stride (or floats
    for a, b, g); ``coef`` is the [N, 7] matrix when x0 is clipped, else None. Returns (logp [N], dlogp [N],
    stats [5] = loss, clipfrac, approx_kl, ratio_mean, bad rows, (dx, dy, deu, dec) with None where not needed,
    the number of bad rows as an int).
    """
    k = len(lead)  # the leading dims of x; the rest are the latent dims
    n = lead.numel()
    acc = rows["s"].dtype
    logp = torch.empty(n, dtype=acc)  # flat; the caller gives it the leading shape
    dlogp = torch.empty(n, dtype=acc)
    # gradients are written row after row (row r at r * D): contiguous whatever the inputs' layout
    dense = x.is_contiguous()
    outs = [(torch.empty_like(x) if dense else torch.empty(x.shape, dtype=x.dtype)) if nd and t is not None else None
            for nd, t in zip(need, (x, y, eu, ec))]
    if not n:
        return logp, dlogp, torch.zeros(5, dtype=acc), tuple(outs), 0
    stats = torch.empty(5, dtype=acc)  # the kernel writes all five
    d = x.shape[k:].numel()
    latents = (x, y, eu, ec)
    n_inner, strides = tensor_rows(lead, latents, ("x_t", "x_prev", "eps_u", "eps_c"))
    ints = [_DTYPE[x.dtype], n, n_inner, d, int(coef is not None), int(clip_mode == "clamp"), int(reduction == "sum"),
            torch.get_num_threads()]
    for t, (so, si) in zip(latents, strides):
        ints += (0 if t is None else t.data_ptr(), so, si)
    ints.append(0 if coef is None else coef.data_ptr())
    reals = [-1.0 if clip_range is None else float(clip_range), -1.0 if adv_clip is None else float(adv_clip), 1.0 / n]
    for v in (rows.get("a", 0.0), rows.get("b", 0.0), rows.get("g", 0.0), rows["s"], rows["log_s"], rows["old_logp"],
              rows["advantages"]):
        if type(v) is float:
            ints += (0, 0)
            reals.append(v)
        else:  # a 1-D tensor; one element is read by every row
            ints += (v.data_ptr(), v.stride(0) if n > 1 else 0)
            reals.append(0.0)
    ints += (logp.data_ptr(), dlogp.data_ptr(), stats.data_ptr(), *[0 if o is None else o.data_ptr() for o in outs])
    bad = _C.ppo_step_raw(ints, reals)
    return logp, dlogp, stats, tuple(outs), bad
