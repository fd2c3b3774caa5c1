"""Models: diffusers pipelines (SD 1.x/2.x, SDXL, SD3, FLUX.1) and the built-in worlds behind one interface."""
from __future__ import annotations

from .._extras import require_train

require_train("diffrl_fast.models")

import torch

from .conditioning import Conditioning
from .pipelines import DiffusionModel, load_pipeline

__all__ = ["Conditioning", "DiffusionModel", "load_model", "load_pipeline"]


def load_model(spec: str, *, device="cpu", dtype: torch.dtype = torch.float32, sampler: str = "auto") -> DiffusionModel:
    """A ``DiffusionModel`` from a spec: "digits" or "flow-digits" (the built-in worlds) or a diffusers pipeline folder /
    hub id."""
    if spec == "digits":
        from .digits_model import load_digits_model

        return load_digits_model(device=device, dtype=dtype)
    if spec == "flow-digits":
        from .flow_digits_model import load_flow_digits_model

        return load_flow_digits_model(device=device, dtype=dtype)
    return load_pipeline(spec, device=device, dtype=dtype, sampler=sampler)
