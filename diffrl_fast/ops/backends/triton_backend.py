"""Triton backend for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1, for tests).

Grid: one program per (row, chunk of CHUNK elements), flattened to one grid dimension (CUDA caps the
second and third at 65,535; the first holds 2^31 - 1 programs, i.e. rows of up to 8.8e12 elements).
CHUNK and BLOCK are fixed, not derived from the batch, and a row's per-chunk partial sums are added by
``_row_sum_kernel`` in chunk order: a row's sum is the same bits whatever the other rows of the call, so
log-probs recomputed in training match the rollout's exactly. Backward is purely elementwise and writes
each gradient once. All arithmetic runs in float32, upcast right after loading; float64 inputs are handed to the torch backend.

Floating-point contraction is pinned (``FP_FUSION``): a x + b e and the squares contract to fused
multiply-adds, as Triton did by default before 3.10. The kernels therefore differ from the torch and C++
backends in the last bits (within the tests' tolerances); the rollout and the training recompute run the
same kernel on one device, so their agreement is exact.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..._versions import require_version
from .._problem import LATENT_NAMES, N_COEF, StepProblem, row_addressing
from . import torch_backend

require_version("triton", "the Triton kernels (diffrl_fast.ops)")
NAME = "triton"

CHUNK = 4096
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter pays per launch and per op, not per element: one big block per program there (tests also
# run the GPU's 1024 under the interpreter, tests/ops/test_triton_hazards.py).
BLOCK = CHUNK if _INTERPRET else 1024
NUM_WARPS = 4
FP_FUSION = True  # pinned, not left to the Triton version's default (see the module docstring)
PART_BLOCK = 64  # partial sums added per step of _row_sum_kernel
MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on the first grid dimension


@triton.jit
def _row_start(row, n_inner, so, si):
    return (row // n_inner) * so + (row % n_inner) * si


@triton.jit
def _mean(x, eu, ec, a, b, g, m0, cx, ce, lim, HAS_EU: tl.constexpr, HAS_EC: tl.constexpr, CLIP: tl.constexpr):
    # e = eu + g (ec - eu);  mean = a x + b e;  clipped: m0 clamp(x0) + (a - m0 cx) x + (b - m0 ce) e, x0 = cx x + ce e
    if HAS_EU:
        e = eu
        if HAS_EC:
            e = eu + g * (ec - eu)
        mean = a * x + b * e
        dmdx = a + 0.0 * x
        dmde = b + 0.0 * x
        if CLIP:
            x0 = cx * x + ce * e
            clipped = (x0 > lim) | (x0 < -lim)
            x0c = tl.minimum(tl.maximum(x0, -lim), lim)
            am = a - m0 * cx
            bm = b - m0 * ce
            mean = tl.where(clipped, m0 * x0c + am * x + bm * e, mean)
            dmdx = tl.where(clipped, am + 0.0 * x, dmdx)
            dmde = tl.where(clipped, bm + 0.0 * x, dmde)
    else:
        mean = a * x
        dmdx = a + 0.0 * x
        dmde = 0.0 * x
    return mean, dmdx, dmde


@triton.jit
def _load_coefs(coef_ptr, row, ACC: tl.constexpr):
    # the row's (a, b, g, m0, cx, ce, limit), see _problem.py
    cp = coef_ptr + row * 7
    return (tl.load(cp + 0).to(ACC), tl.load(cp + 1).to(ACC), tl.load(cp + 2).to(ACC), tl.load(cp + 3).to(ACC),
            tl.load(cp + 4).to(ACC), tl.load(cp + 5).to(ACC), tl.load(cp + 6).to(ACC))


@triton.jit
def _load(ptr, offs, mask, ACC: tl.constexpr):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _step_fwd_kernel(
    x_ptr, y_ptr, eu_ptr, ec_ptr, ru_ptr, rc_ptr, coef_ptr, ss_ptr, kk_ptr, mean_ptr,
    n_inner, D, n_chunks,
    sxo, sxi, syo, syi, suo, sui, sco, sci, sruo, srui, srco, srci,
    HAS_Y: tl.constexpr, HAS_EU: tl.constexpr, HAS_EC: tl.constexpr, HAS_REF: tl.constexpr,
    CLIP: tl.constexpr, WANT_MEAN: tl.constexpr, SAVE_RES: tl.constexpr, ACC: tl.constexpr,
    CHUNK_: tl.constexpr, BLOCK_: tl.constexpr,
):
    # SAVE_RES (with HAS_Y, not WANT_MEAN): mean_ptr receives the residual y - mean instead of the mean
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_chunks
    chunk = pid % n_chunks
    a, b, g, m0, cx, ce, lim = _load_coefs(coef_ptr, row, ACC)
    xo = _row_start(row, n_inner, sxo, sxi)
    yo = _row_start(row, n_inner, syo, syi)
    uo = _row_start(row, n_inner, suo, sui)
    co = _row_start(row, n_inner, sco, sci)
    ruo = _row_start(row, n_inner, sruo, srui)
    rco = _row_start(row, n_inner, srco, srci)
    acc_ss = tl.zeros([BLOCK_], dtype=ACC)
    acc_kk = tl.zeros([BLOCK_], dtype=ACC)
    for start in range(0, CHUNK_, BLOCK_):
        idx = chunk * CHUNK_ + start + tl.arange(0, BLOCK_)
        m = idx < D
        x = _load(x_ptr + xo, idx, m, ACC)
        eu = _load(eu_ptr + uo, idx, m, ACC) if HAS_EU else x
        ec = _load(ec_ptr + co, idx, m, ACC) if HAS_EC else x
        mean, dmdx, dmde = _mean(x, eu, ec, a, b, g, m0, cx, ce, lim, HAS_EU, HAS_EC, CLIP)
        if WANT_MEAN:
            tl.store(mean_ptr + row * D + idx, mean.to(mean_ptr.dtype.element_ty), mask=m)
        if HAS_Y:
            d = tl.where(m, _load(y_ptr + yo, idx, m, ACC) - mean, 0.0)
            if SAVE_RES:
                tl.store(mean_ptr + row * D + idx, d.to(mean_ptr.dtype.element_ty), mask=m)
            acc_ss += d * d
        if HAS_REF:
            ru = _load(ru_ptr + ruo, idx, m, ACC)
            rc = _load(rc_ptr + rco, idx, m, ACC) if HAS_EC else x
            rmean, _u1, _u2 = _mean(x, ru, rc, a, b, g, m0, cx, ce, lim, HAS_EU, HAS_EC, CLIP)
            d = tl.where(m, mean - rmean, 0.0)
            acc_kk += d * d
    if HAS_Y:
        tl.store(ss_ptr + row * n_chunks + chunk, tl.sum(acc_ss, axis=0))
    if HAS_REF:
        tl.store(kk_ptr + row * n_chunks + chunk, tl.sum(acc_kk, axis=0))


@triton.jit(do_not_specialize=["need_dx", "need_dy", "need_deu", "need_dec"])
def _step_bwd_kernel(
    x_ptr, y_ptr, eu_ptr, ec_ptr, ru_ptr, rc_ptr, coef_ptr, wss_ptr, wkk_ptr, gm_ptr,
    dx_ptr, dy_ptr, deu_ptr, dec_ptr,
    n_inner, D, n_chunks,
    sxo, sxi, syo, syi, suo, sui, sco, sci, sruo, srui, srco, srci,
    need_dx, need_dy, need_deu, need_dec,  # runtime flags: uniform branches, not one compiled variant per pattern
    HAS_Y: tl.constexpr, HAS_EU: tl.constexpr, HAS_EC: tl.constexpr, HAS_REF: tl.constexpr,
    CLIP: tl.constexpr, HAS_GMEAN: tl.constexpr,
    ACC: tl.constexpr, CHUNK_: tl.constexpr, BLOCK_: tl.constexpr,
):
    # dL/dmean = -2 w_ss (y - mean) + 2 w_kk (mean - ref_mean) + g_mean;  dL/dy = 2 w_ss (y - mean)
    # dL/dx = dL/dmean dmean/dx - 2 w_kk (mean - ref_mean) dref_mean/dx;  dL/de = dL/dmean dmean/de;  dL/dec = g dL/de;  dL/deu = (1 - g) dL/de
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_chunks
    chunk = pid % n_chunks
    a, b, g, m0, cx, ce, lim = _load_coefs(coef_ptr, row, ACC)
    two_ws = 2.0 * tl.load(wss_ptr + row).to(ACC) if HAS_Y else 0.0
    two_wk = 2.0 * tl.load(wkk_ptr + row).to(ACC) if HAS_REF else 0.0
    xo = _row_start(row, n_inner, sxo, sxi)
    yo = _row_start(row, n_inner, syo, syi)
    uo = _row_start(row, n_inner, suo, sui)
    co = _row_start(row, n_inner, sco, sci)
    ruo = _row_start(row, n_inner, sruo, srui)
    rco = _row_start(row, n_inner, srco, srci)
    for start in range(0, CHUNK_, BLOCK_):
        idx = chunk * CHUNK_ + start + tl.arange(0, BLOCK_)
        m = idx < D
        out = row * D + idx
        x = _load(x_ptr + xo, idx, m, ACC)
        eu = _load(eu_ptr + uo, idx, m, ACC) if HAS_EU else x
        ec = _load(ec_ptr + co, idx, m, ACC) if HAS_EC else x
        mean, dmdx, dmde = _mean(x, eu, ec, a, b, g, m0, cx, ce, lim, HAS_EU, HAS_EC, CLIP)
        dm = 0.0 * x
        dyv = 0.0 * x
        if HAS_Y:
            dyv = two_ws * (_load(y_ptr + yo, idx, m, ACC) - mean)
            dm -= dyv
        dx_ref = 0.0 * x  # x_t also enters ref_mean: dL/dx gets -2 w_kk (mean - ref_mean) dref_mean/dx
        if HAS_REF:
            ru = _load(ru_ptr + ruo, idx, m, ACC)
            rc = _load(rc_ptr + rco, idx, m, ACC) if HAS_EC else x
            rmean, rdmdx, _u2 = _mean(x, ru, rc, a, b, g, m0, cx, ce, lim, HAS_EU, HAS_EC, CLIP)
            dkk = two_wk * (mean - rmean)
            dm += dkk
            dx_ref = dkk * rdmdx
        if HAS_GMEAN:
            dm += _load(gm_ptr, out, m, ACC)
        if need_dx != 0:
            tl.store(dx_ptr + out, (dm * dmdx - dx_ref).to(dx_ptr.dtype.element_ty), mask=m)
        if need_dy != 0:
            tl.store(dy_ptr + out, dyv.to(dy_ptr.dtype.element_ty), mask=m)
        de = dm * dmde
        if need_deu != 0:
            if HAS_EC:
                tl.store(deu_ptr + out, ((1.0 - g) * de).to(deu_ptr.dtype.element_ty), mask=m)
            else:
                tl.store(deu_ptr + out, de.to(deu_ptr.dtype.element_ty), mask=m)
        if need_dec != 0:
            tl.store(dec_ptr + out, (g * de).to(dec_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["need0", "need1", "need2", "need3"])
def _scale_rows_kernel(
    res_ptr, k_ptr, o0_ptr, o1_ptr, o2_ptr, o3_ptr, D, n_chunks, need0, need1, need2, need3,
    ACC: tl.constexpr, CHUNK_: tl.constexpr, BLOCK_: tl.constexpr,
):
    # o_j[row] = k[row, j] * res[row] for the wanted j: the unclipped step's gradients from its saved residual
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_chunks
    chunk = pid % n_chunks
    k0 = tl.load(k_ptr + row * 4 + 0).to(ACC)
    k1 = tl.load(k_ptr + row * 4 + 1).to(ACC)
    k2 = tl.load(k_ptr + row * 4 + 2).to(ACC)
    k3 = tl.load(k_ptr + row * 4 + 3).to(ACC)
    for start in range(0, CHUNK_, BLOCK_):
        idx = chunk * CHUNK_ + start + tl.arange(0, BLOCK_)
        m = idx < D
        out = row * D + idx
        r = _load(res_ptr, out, m, ACC)
        if need0 != 0:
            tl.store(o0_ptr + out, (k0 * r).to(o0_ptr.dtype.element_ty), mask=m)
        if need1 != 0:
            tl.store(o1_ptr + out, (k1 * r).to(o1_ptr.dtype.element_ty), mask=m)
        if need2 != 0:
            tl.store(o2_ptr + out, (k2 * r).to(o2_ptr.dtype.element_ty), mask=m)
        if need3 != 0:
            tl.store(o3_ptr + out, (k3 * r).to(o3_ptr.dtype.element_ty), mask=m)


@triton.jit
def _row_sum_kernel(part_ptr, out_ptr, n_chunks, PBLOCK: tl.constexpr):
    # out[row] = sum_c part[row, c], always added in the same order: PBLOCK lanes, each summing chunks
    # lane, lane + PBLOCK, ... in turn, then the lanes by tl.sum's fixed tree; nothing depends on the rows
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([PBLOCK], dtype=part_ptr.dtype.element_ty)
    start = 0
    while start < n_chunks:  # not range(0, n_chunks, PBLOCK): triton 3.6's interpreter cannot index a runtime bound
        idx = start + tl.arange(0, PBLOCK)
        acc += tl.load(part_ptr + row * n_chunks + idx, mask=idx < n_chunks, other=0.0)
        start += PBLOCK
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


def _row_sums(part: torch.Tensor) -> torch.Tensor:
    """[n_rows] sums of [n_rows, n_chunks] partials, in a fixed order per row (see _row_sum_kernel)."""
    n_rows, n_chunks = part.shape
    if n_chunks == 1:
        return part[:, 0]
    out = part.new_empty(n_rows)
    if n_rows:
        _row_sum_kernel[(n_rows,)](part, out, n_chunks, PBLOCK=PART_BLOCK, num_warps=1, enable_fp_fusion=FP_FUSION)
    return out


def _launch_args(p: StepProblem):
    n_inner, strides = row_addressing(p)
    ptrs = [getattr(p, n) if getattr(p, n) is not None else p.x for n in LATENT_NAMES]
    flat = [s for pair in strides for s in pair]
    acc = tl.float64 if p.coef.dtype == torch.float64 else tl.float32
    return n_inner, ptrs, flat, acc


def _grid(p: StepProblem) -> tuple[int, int]:
    """(rows, chunks per row); the launch grid is their product, in one dimension."""
    return _row_grid(p.n_rows, p.row_size)


def _row_grid(n_rows: int, row_size: int) -> tuple[int, int]:
    n_chunks = triton.cdiv(row_size, CHUNK)
    if n_rows * n_chunks > MAX_PROGRAMS:
        raise ValueError(f"the triton backend launches one program per {CHUNK} elements of each row: {n_rows} rows of "
                         f"{row_size} elements need {n_rows * n_chunks} programs, over CUDA's {MAX_PROGRAMS}; "
                         "split the batch into several calls")
    return n_rows, n_chunks


def step_fwd(p: StepProblem, want_ss: bool, want_kk: bool, want_mean: bool):
    if p.x.dtype == torch.float64:  # float64 (tests, references) runs on the torch backend: no fp64 kernels to build
        return torch_backend.step_fwd(p, want_ss, want_kk, want_mean)
    return _fwd(p, want_ss, want_kk, want_mean, False)


def step_fwd_res(p: StepProblem):
    """(ss, res = y - mean): the forward kernel with the residual stored where the mean would be (torch_backend's
    contract). One read of each input, one write of the residual; ss has the same bits as ``step_fwd``'s."""
    if p.x.dtype == torch.float64:
        return torch_backend.step_fwd_res(p)
    assert p.y is not None and not p.clip and p.ref_eu is None
    ss, _, res = _fwd(p, True, False, False, True)
    return ss, res


def _fwd(p: StepProblem, want_ss: bool, want_kk: bool, want_mean: bool, save_res: bool):
    """One launch of ``_step_fwd_kernel``: (ss, kk, the mean, or with ``save_res`` the residual y - mean)."""
    assert p.coef.shape[1] == N_COEF
    lead = p.lead_shape
    n_rows, n_chunks = _grid(p)
    part_ss = p.coef.new_empty((n_rows, n_chunks) if want_ss else (1,))
    part_kk = p.coef.new_empty((n_rows, n_chunks) if want_kk else (1,))
    want_out = want_mean or save_res
    out = torch.empty(p.x.shape if want_out else (0,), dtype=p.x.dtype, device=p.x.device)
    if n_rows:
        n_inner, ptrs, flat, acc = _launch_args(p)
        _step_fwd_kernel[(n_rows * n_chunks,)](
            *ptrs, p.coef.contiguous(), part_ss, part_kk, out if want_out else p.x,
            n_inner, p.row_size, n_chunks, *flat,
            HAS_Y=want_ss, HAS_EU=p.eu is not None, HAS_EC=p.ec is not None, HAS_REF=want_kk,
            CLIP=p.clip, WANT_MEAN=want_mean, SAVE_RES=save_res, ACC=acc, CHUNK_=CHUNK, BLOCK_=BLOCK,
            num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
        )
    ss = _row_sums(part_ss).reshape(lead) if want_ss else p.coef.new_empty(0)
    kk = _row_sums(part_kk).reshape(lead) if want_kk else p.coef.new_empty(0)
    return ss, kk, out


def scale_rows(res: torch.Tensor, k: torch.Tensor, need, latent_dims: int):
    """torch_backend.scale_rows's contract in one kernel: one read of res, one write per wanted gradient."""
    if res.dtype == torch.float64:
        return torch_backend.scale_rows(res, k, need, latent_dims)
    outs = [torch.empty_like(res) if n else None for n in need]
    row_size = res.shape[res.dim() - latent_dims :].numel()
    n_rows, n_chunks = _row_grid(res.shape[: res.dim() - latent_dims].numel(), row_size)
    if n_rows and any(need):
        acc = tl.float64 if k.dtype == torch.float64 else tl.float32
        _scale_rows_kernel[(n_rows * n_chunks,)](
            res, k.contiguous(), *[res if o is None else o for o in outs], row_size, n_chunks,
            *[int(o is not None) for o in outs], ACC=acc, CHUNK_=CHUNK, BLOCK_=BLOCK, num_warps=NUM_WARPS,
            enable_fp_fusion=FP_FUSION,
        )
    return tuple(outs)


def step_bwd(p: StepProblem, w_ss, w_kk, g_mean, need):
    if p.x.dtype == torch.float64:
        return torch_backend.step_bwd(p, w_ss, w_kk, g_mean, need)
    acc_dtype = p.coef.dtype
    present = (p.x, p.y, p.eu, p.ec)
    outs = [torch.empty(p.x.shape, dtype=p.x.dtype, device=p.x.device) if n and t is not None else None
            for n, t in zip(need, present)]
    n_rows, n_chunks = _grid(p)
    if n_rows:
        n_inner, ptrs, flat, acc = _launch_args(p)
        dummy = p.coef
        _step_bwd_kernel[(n_rows * n_chunks,)](
            *ptrs, p.coef.contiguous(),
            dummy if w_ss is None else w_ss.to(acc_dtype).contiguous(),
            dummy if w_kk is None else w_kk.to(acc_dtype).contiguous(),
            p.x if g_mean is None else g_mean.to(p.x.dtype).contiguous(),
            *[p.x if o is None else o for o in outs],
            n_inner, p.row_size, n_chunks, *flat,
            *[int(o is not None) for o in outs],
            HAS_Y=w_ss is not None, HAS_EU=p.eu is not None, HAS_EC=p.ec is not None, HAS_REF=w_kk is not None,
            CLIP=p.clip, HAS_GMEAN=g_mean is not None,
            ACC=acc, CHUNK_=CHUNK, BLOCK_=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
        )
    return tuple(outs)
