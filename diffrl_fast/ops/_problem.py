"""The one problem every fused backend solves: an affine diffusion step, row by row.

Rows are the leading dims of the latent tensors (one row = one sample at one timestep); the last
``latent_dims`` dims (C, H, W by default) hold the D latent elements of a row. Per row i:

    e_i     = eu + g_i (ec - eu)                     (classifier-free guidance; e = eu without ec)
    mean_i  = a_i x + b_i e                          (no eps at all: mean = a_i x)
    with x0 clipping (DDIM/DDPM clip_sample):
        x0   = cx_i x + ce_i e
        mean = m0_i clamp(x0, -L_i, L_i) + (a_i - m0_i cx_i) x + (b_i - m0_i ce_i) e
        which equals a_i x + b_i e wherever |x0| <= L_i.
    ref_mean uses the same coefficients with (ref_eu, ref_ec).

The backends return per-row sums of squares, the only latent-sized reductions the losses need:

    ss_i = sum_d (y - mean)^2          kk_i = sum_d (mean - ref_mean)^2

and, in backward, given w_ss = dL/dss, w_kk = dL/dkk and g_mean = dL/dmean (all optional):

    dL/dmean = -2 w_ss (y - mean) + 2 w_kk (mean - ref_mean) + g_mean
    dL/dy    =  2 w_ss (y - mean)
    dL/dx    = dL/dmean * dmean/dx - 2 w_kk (mean - ref_mean) dref_mean/dx
               dmean/dx = a   (a - m0 cx where clipped; likewise for ref_mean with its own clip mask)
    dL/de    = dL/dmean * dmean/de,    dmean/de = b   (b - m0 ce where clipped)
    dL/dec   = g dL/de,                dL/deu   = (1 - g) dL/de   (dL/de without ec)

Log-probs, KL and losses are cheap per-row functions of ss and kk computed in plain torch on top, so
autograd reaches std and the coefficients' consumers without any latent-sized work.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

# Column order of the per-row coefficient matrix.
COEF_A, COEF_B, COEF_G, COEF_M0, COEF_CX, COEF_CE, COEF_LIMIT = range(7)
N_COEF = 7


class StepProblem(NamedTuple):
    x: torch.Tensor
    y: Optional[torch.Tensor]
    eu: Optional[torch.Tensor]
    ec: Optional[torch.Tensor]
    ref_eu: Optional[torch.Tensor]
    ref_ec: Optional[torch.Tensor]
    coef: torch.Tensor  # [N, N_COEF], contiguous, accumulation dtype (float32, or float64 for float64 inputs)
    clip: bool
    latent_dims: int

    @property
    def lead_shape(self) -> torch.Size:
        return self.x.shape[: self.x.dim() - self.latent_dims]

    @property
    def n_rows(self) -> int:
        return self.lead_shape.numel()

    @property
    def row_size(self) -> int:
        return self.x.shape[self.x.dim() - self.latent_dims :].numel()

    def tensors(self) -> dict[str, Optional[torch.Tensor]]:
        return {"x": self.x, "y": self.y, "eu": self.eu, "ec": self.ec, "ref_eu": self.ref_eu, "ref_ec": self.ref_ec}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _collapse(shape: tuple[int, ...], strides: tuple[int, ...]) -> Optional[int]:
    """Element stride that walks the flattened dims ``shape`` in order, or None if they do not collapse."""
    stride = None
    expected = None
    for size, st in zip(reversed(shape), reversed(strides)):
        if size == 1:
            continue
        if stride is None:
            stride, expected = st, st * size
        elif st != expected:
            return None
        else:
            expected = st * size
    return 0 if stride is None else stride


LATENT_NAMES = ("x", "y", "eu", "ec", "ref_eu", "ref_ec")  # StepProblem's latent-sized fields, in order


def row_addressing(p: StepProblem) -> tuple[int, list[tuple[int, int]]]:
    """Two-level row addressing shared by the kernel backends: ``tensor_rows`` of p's six latent-sized fields,
    in ``LATENT_NAMES`` order."""
    return tensor_rows(p.lead_shape, (p.x, p.y, p.eu, p.ec, p.ref_eu, p.ref_ec), LATENT_NAMES)


def tensor_rows(lead_shape: torch.Size, tensors: Sequence[Optional[torch.Tensor]],
                names: Sequence[str]) -> tuple[int, list[tuple[int, int]]]:
    """(n_inner, [(s_outer, s_inner) per tensor, (0, 0) for None]) for latent tensors of leading shape ``lead_shape``.

    Rows r = 0..N-1 of every tensor start at element ``(r // n_inner) * s_outer + (r % n_inner) * s_inner``
    of its storage (relative to its data pointer). Leading dims are split once, at the same place for all
    tensors, into an outer and an inner group that each collapse to one stride; this covers contiguous
    tensors and slices such as ``latents[:, :-1]`` of a [B, T+1, C, H, W] trajectory without copying.
    Raises ValueError naming the tensor (``names``, in the same order) when no such split exists.
    """
    for t in tensors:  # the common case, every tensor contiguous: row r starts at r * D
        if t is not None and not t.is_contiguous():
            break
    else:
        row = next(t for t in tensors if t is not None).shape[len(lead_shape) :].numel()
        return 1, [(0, 0) if t is None else (row, 0) for t in tensors]
    lead = tuple(lead_shape)
    k = len(lead)
    for split in range(k, -1, -1):
        out: list[tuple[int, int]] = []
        for t in tensors:
            if t is None:
                out.append((0, 0))
                continue
            st = t.stride()[:k]
            so = _collapse(lead[:split], st[:split])
            si = _collapse(lead[split:], st[split:])
            if so is None or si is None:
                break
            out.append((so, si))
        else:
            n_inner = 1
            for size in lead[split:]:
                n_inner *= size
            return max(n_inner, 1), out
    bad = next(i for i, t in enumerate(tensors) if t is not None and not t.is_contiguous())
    raise ValueError(
        f"{names[bad]}: its leading dims have strides {tensors[bad].stride()[:k]} that cannot be walked as rows "
        f"without a copy; pass {names[bad]}.contiguous()"
    )
