"""Advantages from rewards: per-prompt statistics tracking (DDPO) or whole-batch normalisation."""
from __future__ import annotations

from collections import defaultdict, deque
from typing import Sequence

import torch


def normalize(rewards: torch.Tensor, eps: float = 1e-6, dim: int | None = None) -> torch.Tensor:
    """A = (r - mean(r)) / (std(r) + eps) over the whole batch, or along ``dim`` (population std)."""
    if dim is None:
        return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)
    return (rewards - rewards.mean(dim, keepdim=True)) / (rewards.std(dim, unbiased=False, keepdim=True) + eps)


def group_normalize(values: torch.Tensor, groups: Sequence, std: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """(v - mean of v over its group) / (std + eps), the groups given by equal keys (e.g. prompts); std over the
    group ("group") or over all ``values`` ("global"); population std. Flow-GRPO's advantages (Liu et al. 2025,
    flow_grpo/stat_tracking.py: global std, eps 1e-4) and per-prompt standardisation of reward components
    (DanceGRPO's per-reward group advantages). Computed in float64, returned in ``values``' dtype."""
    if len(groups) != values.numel():
        raise ValueError(f"{len(groups)} group keys for {values.numel()} values")
    if std not in ("group", "global"):
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    v = values.double().reshape(-1)
    out = torch.empty_like(v)
    global_std = v.std(unbiased=False)
    for key in dict.fromkeys(groups):
        idx = torch.tensor([i for i, k in enumerate(groups) if k == key])
        g = v[idx]
        out[idx] = (g - g.mean()) / ((global_std if std == "global" else g.std(unbiased=False)) + eps)
    return out.to(values.dtype).reshape(values.shape)


class PerPromptStatTracker:
    """DDPO's per-prompt advantage normalisation (Black et al. 2023, appendix):

        A_i = (r_i - mean_p) / (std_p + eps)

    where mean_p, std_p are over the last ``buffer_size`` rewards of sample i's prompt p, or over the
    whole current batch while p has fewer than ``min_count`` rewards.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6) -> None:
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.buffers: dict[str, deque] = defaultdict(lambda: deque(maxlen=self.buffer_size))

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        if len(prompts) != rewards.numel():
            raise ValueError(f"{len(prompts)} prompts for {rewards.numel()} rewards")
        rewards = rewards.detach().float().cpu()
        adv = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):
            idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buf = self.buffers[prompt]
            buf.extend(rewards[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                hist = torch.tensor(list(buf))
                mean, std = hist.mean(), hist.std(unbiased=False)
            adv[idx] = (rewards[idx] - mean) / (std + self.eps)
        return adv

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = defaultdict(lambda: deque(maxlen=self.buffer_size))
        for k, v in state["buffers"].items():
            self.buffers[k].extend(v)
