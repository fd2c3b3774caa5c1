"""Step noise drawn exactly as diffusers' ``randn_tensor`` draws it, without importing diffusers.

The drop-in step functions are part of the light core install (torch, numpy, triton), yet their samples
must equal those of the trainers they replace, which draw z with ``randn_tensor``. Its rules, restated:
a single generator draws on its own device (a CPU generator for a CUDA tensor draws on the CPU, then the
noise moves); a list of generators draws one sample per generator along the batch dim; no generator draws
on the target device.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Generators = Optional[Union[torch.Generator, Sequence[torch.Generator]]]


def draw_noise(shape, generator: Generators, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """z ~ N(0, I) of ``shape`` on ``device``, drawn as ``diffusers.utils.torch_utils.randn_tensor`` draws it."""
    shape = tuple(shape)
    device = torch.device(device)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: give one per sample")
        if len(generator) == 1:
            generator = generator[0]
        else:
            draw_on = generator[0].device if generator[0].device.type == "cpu" else device
            parts = [torch.randn((1, *shape[1:]), generator=g, device=draw_on, dtype=dtype) for g in generator]
            return torch.cat(parts, dim=0).to(device)
    draw_on = device
    if generator is not None and generator.device.type != device.type and generator.device.type == "cpu":
        draw_on = torch.device("cpu")
    elif generator is not None and generator.device.type != device.type:
        raise ValueError(f"cannot draw noise for {device.type} tensors with a {generator.device.type} generator")
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)
