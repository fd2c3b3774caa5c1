"""What every algorithm provides to the one trainer loop.

The trainer owns everything algorithms share: rollouts, rewards, the recompute of log-probs over packed
timestep chunks, optimisation, logging and checkpointing. An algorithm decides (1) what it needs from
an epoch's trajectories and rewards (``prepare``), and (2) the loss of one chunk of n samples x K
timesteps (``chunk_loss``). The trainer scales each chunk's loss by its share of the rows in the
optimiser step, so gradients are the mean over all trained (sample, timestep) rows whatever K is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class EpochData:
    """What ``prepare`` hands to ``chunk_loss``: per-sample tensors indexed by trajectory position."""

    advantages: torch.Tensor  # [B] (or [B, T] for per-step advantages)
    extra: dict[str, Any] = field(default_factory=dict)


class Algorithm:
    name = "base"
    needs_reference = False  # the trainer keeps a reference policy (LoRA off / frozen copy) when True

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def sample_order(self, n: int, data: EpochData, generator: torch.Generator) -> torch.Tensor:
        """The order in which samples are cut into training minibatches (algorithms that train on groups
        of samples, e.g. preference pairs, keep each group together)."""
        return torch.randperm(n, generator=generator)

    def prepare(self, trainer, traj, rewards: torch.Tensor) -> EpochData:
        return EpochData(trainer.advantages(traj.prompts, rewards))

    def chunk_loss(self, trainer, chunk, data: EpochData) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError
