"""Prompt conditioning of a batch, as the denoiser consumes it."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


@dataclass
class Conditioning:
    """Per-sample conditioning tensors; every field has the batch as its first dim.

    hidden:   [B, L, D] text (or class) embeddings fed as encoder_hidden_states
    pooled:   [B, P] pooled text embeddings (SDXL "text_embeds", SD3 "pooled_projections") or None
    time_ids: [B, 6] SDXL micro-conditioning (original size, crop, target size) or None
    mask:     [B, L] 1 for the text tokens, 0 for padding, where prompts encode to different lengths (Qwen-Image's
              encoder_hidden_states_mask), or None; ``cat`` pads shorter ones with zeros (masked)
    """

    hidden: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None

    def _map(self, fn) -> "Conditioning":
        return replace(self, **{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name)) for f in fields(self)})

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def index(self, idx) -> "Conditioning":
        return self._map(lambda t: t[idx])

    def repeat_interleave(self, k: int) -> "Conditioning":
        return self._map(lambda t: t.repeat_interleave(k, dim=0))

    def to(self, device=None, dtype=None) -> "Conditioning":
        return self._map(lambda t: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        """The parts stacked along the batch; with masks, text sequences of different lengths are zero-padded to the
        longest (their mask 0 there)."""
        first = parts[0]
        if first.mask is not None:
            L = max(p.hidden.shape[1] for p in parts)
            parts = [p if p.hidden.shape[1] == L else replace(
                p, hidden=torch.nn.functional.pad(p.hidden, (0, 0, 0, L - p.hidden.shape[1])),
                mask=torch.nn.functional.pad(p.mask, (0, L - p.mask.shape[1]))) for p in parts]
        out = {}
        for f in fields(first):
            values = [getattr(p, f.name) for p in parts]
            out[f.name] = None if values[0] is None else torch.cat(values, dim=0)
        return Conditioning(**out)
