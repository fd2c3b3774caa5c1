"""Argument checks shared by every public op.

Metadata checks (types, dtypes, shapes, devices, strides) always run and cost nothing. Data checks
(std > 0, finite coefficients, finite inputs) need a look at the values, and on a GPU a device sync:
they run by default, are skipped inside torch.compile, and can be switched off for speed with
``diffrl_fast.ops.checks(False)`` or ``DIFFRL_FAST_CHECKS=0``. Finiteness of the latent inputs is
checked on the per-row reductions (a NaN or inf anywhere in a row makes that row's sum non-finite), so
it costs no extra pass over latent-sized data; only when it fails are the inputs scanned to name the
culprit.
"""
from __future__ import annotations

import contextlib
import math
import threading
from numbers import Real
from typing import Iterator, Mapping, Optional

import torch

from ._env import getenv

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum")

_local = threading.local()


def data_checks_enabled() -> bool:
    if torch.compiler.is_compiling():
        return False
    enabled = getattr(_local, "enabled", None)
    if enabled is not None:
        return enabled
    return getenv("DIFFRL_FAST_CHECKS") != "0"


@contextlib.contextmanager
def checks(enabled: bool) -> Iterator[None]:
    """Turn the ops' data checks (std > 0, finite inputs) on or off inside the block (thread-local).

    Metadata checks (shapes, dtypes, devices, strides) always run.
    """
    previous = getattr(_local, "enabled", None)
    _local.enabled = bool(enabled)
    try:
        yield
    finally:
        _local.enabled = previous


def all_finite(t: torch.Tensor) -> bool:
    """True when every entry is finite: one reduction and one host sync (torch.isfinite is several ops).

    A NaN or inf anywhere makes the sum non-finite; a finite tensor whose sum overflows (entries ~1e38)
    is reported as non-finite too, which is as much a sign of trouble.
    """
    return t.numel() == 0 or math.isfinite(float(t.detach().sum()))


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_latents(latent_dims: int, tensors: Mapping[str, Optional[torch.Tensor]]) -> torch.Tensor:
    """Validate the latent-sized inputs; returns the first one (the shape/dtype/device template).

    Every given tensor must be a floating torch.Tensor (float16/bfloat16/float32/float64) with the same
    shape, dtype and device as the others, at least ``latent_dims`` dims, and its last ``latent_dims``
    dims laid out contiguously (leading dims may be strided, e.g. a [:, :-1] slice of a trajectory).
    """
    if not isinstance(latent_dims, int) or latent_dims < 1:
        raise ValueError(f"latent_dims must be a positive int, got {latent_dims!r}")
    ref_name, ref = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if ref is not None and t.is_contiguous() and t.shape == ref.shape and t.dtype == ref.dtype and t.device == ref.device:
            continue  # the common case: a contiguous tensor like the first, which passed every check below
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64")
        if t.dim() < latent_dims:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but the last {latent_dims} dims are reduced as latent dims; "
                f"give it at least {latent_dims} dims or change latent_dims"
            )
        if ref is None:
            ref_name, ref = name, t
        else:
            if t.shape != ref.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")
            if t.dtype != ref.dtype:
                raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; cast one of them")
            if t.device != ref.device:
                raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
        if t.is_contiguous():
            continue
        expected = 1
        for size, stride in zip(reversed(t.shape[t.dim() - latent_dims :]), reversed(t.stride()[t.dim() - latent_dims :])):
            if size != 1 and stride != expected:
                raise ValueError(
                    f"{name} is not contiguous in its latent dims (shape {tuple(t.shape)}, strides {t.stride()}); "
                    f"the fused ops read rows in place and never copy silently: pass {name}.contiguous()"
                )
            expected *= size
    assert ref is not None
    return ref


def per_row(
    name: str,
    value,
    lead_shape: torch.Size,
    device: torch.device,
    dtype: torch.dtype,
    positive: bool = False,
    check_data: bool = True,
    flat: bool = True,
) -> torch.Tensor:
    """A per-row coefficient (python number or tensor broadcastable to the leading dims) as a flat [N] tensor
    (``flat=False``: as a tensor of the leading shape, a broadcast view where possible).

    ``check_data=False`` leaves the value checks (finite, > 0) of a tensor to the caller, which can then
    check several coefficients in one pass and call again with checks on to name the culprit.
    """
    if isinstance(value, torch.Tensor) and value.shape == lead_shape and value.dtype == dtype and value.device == device:
        # already one value per row in the accumulation dtype: every metadata check holds
        v = value.detach() if value.requires_grad else value
    else:
        v = _per_row_tensor(name, value, lead_shape, device, dtype, positive)
        if not isinstance(value, torch.Tensor):
            return v if flat else v.reshape(lead_shape)
    if check_data and data_checks_enabled() and not (all_finite(v) and (not positive or v.numel() == 0 or float(v.min()) > 0)):
        bad = ~torch.isfinite(v) | (v <= 0) if positive else ~torch.isfinite(v)
        if bool(bad.any()):
            first = v[bad].flatten()[0].item()
            raise ValueError(
                f"{name} must be {'> 0 and ' if positive else ''}finite everywhere; "
                f"{int(bad.sum())} of its entries are not (e.g. {first})"
            )
    return v.reshape(-1) if flat and v.dim() != 1 else v


def _per_row_tensor(name: str, value, lead_shape: torch.Size, device: torch.device, dtype: torch.dtype,
                    positive: bool) -> torch.Tensor:
    """``per_row``'s metadata checks and conversion: a number as a filled flat [N] tensor (its value checked),
    a tensor cast and broadcast to the leading dims."""
    if not isinstance(value, torch.Tensor) and (isinstance(value, bool) or not isinstance(value, Real)):
        raise ValueError(f"{name} must be a float or a tensor broadcastable to {tuple(lead_shape)}, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        v = float(value)
        if not math.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"{name} must be {'> 0 and ' if positive else ''}finite, got {v}")
        return torch.full((lead_shape.numel(),), v, dtype=dtype, device=device)
    if not value.is_floating_point() and not (value.dtype in (torch.int32, torch.int64) and not positive):
        raise ValueError(f"{name} must be a floating tensor, got dtype {value.dtype}")
    if value.device != device and not (value.dim() == 0 and value.device.type == "cpu"):
        raise ValueError(f"{name} is on {value.device} but the latents are on {device}")
    try:
        return torch.broadcast_to(value.detach().to(device=device, dtype=dtype), lead_shape)
    except RuntimeError:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)}, which does not broadcast to the leading dims {tuple(lead_shape)}"
        ) from None


def check_rows(name: str, t, lead_shape: torch.Size, device: torch.device, check_data: bool = True) -> torch.Tensor:
    """A per-row input such as old log-probs or advantages: a floating tensor of exactly the leading shape.

    ``check_data=False`` leaves the finiteness check to the caller (a kernel that checks every row anyway).
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {tuple(lead_shape)}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.shape != lead_shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(lead_shape)} (one value per row)")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if check_data and data_checks_enabled() and not all_finite(t):
        raise ValueError(f"{name} contains {int((~torch.isfinite(t)).sum())} non-finite values")
    return t


def raise_if_nonfinite(outputs: Mapping[str, torch.Tensor], inputs: Mapping[str, Optional[torch.Tensor]]) -> None:
    """After a forward: if a per-row reduction is non-finite, name the input that caused it."""
    if not data_checks_enabled():
        return
    if all(all_finite(out) for out in outputs.values()):
        return
    for name, t in inputs.items():
        if t is None:
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name} contains {int(bad.sum())} non-finite values (first at index {idx})")
    raise ValueError(
        "a per-row sum of squares overflowed although every input is finite: the inputs are too large "
        "for the accumulation dtype (check the scale of the latents and coefficients)"
    )
