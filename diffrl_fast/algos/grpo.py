"""Group-relative advantages (GRPO as Flow-GRPO, Liu et al. 2025, and DanceGRPO, Xue et al. 2025, apply it
to diffusion and flow models).

G samples per prompt form a group; each sample's advantage is its reward normalised within its group,

    A_i = (r_i - mean_group(r)) / (std_group(r) + eps),

so no value function or cross-prompt statistics are needed. The loss is DDPO-IS's clipped surrogate
plus, with ``grpo.beta`` > 0, beta times the per-step KL to the reference policy (fused ``step_kl``).
Works with any sampler the rollout supports (DDIM, DDPM, the flow-matching SDE).
"""
from __future__ import annotations

import torch

from ..train.advantages import normalize
from .base import EpochData
from .ddpo import PolicyGradientWithKL


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for adjacent groups of ``group`` samples."""
    return normalize(rewards.reshape(-1, group), eps, dim=1).reshape(-1)


class GRPO(PolicyGradientWithKL):
    name = "grpo"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.beta = cfg.grpo.beta
        self.needs_reference = self.beta > 0

    def prepare(self, trainer, traj, rewards):
        return EpochData(group_advantages(rewards, self.samples_per_prompt))
