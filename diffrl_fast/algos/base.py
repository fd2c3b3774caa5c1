"""What every algorithm provides to the one trainer loop.

The trainer owns everything algorithms share: rollouts, rewards, the recompute of log-probs over packed
timestep chunks, optimisation, logging and checkpointing. An algorithm decides

- ``reference_defaults``: the config values its authors' code and published runs use where they differ
  from DDPO's (the config's own defaults); they apply to every key the user leaves unset;
- ``samples_per_prompt``: G > 1 makes every rollout batch G samples of each prompt, adjacent (groups),
  sharing their initial noise when ``shares_initial_noise``;
- ``prepare``: what it needs from an epoch's trajectories and rewards (advantages, pairs, critic values);
- ``sample_order`` / ``step_order``: how samples are cut into minibatches and which timesteps each trains
  on (group algorithms keep a group in one minibatch, on shared timesteps);
- ``begin_minibatch``: an optional first pass over a minibatch (losses that couple timesteps);
- ``chunk_loss``: the loss of one chunk of n samples x K timesteps;
- ``after_optimizer_step`` / ``after_epoch``: updates of its own state (critics).

The trainer scales each chunk's loss by its share of the rows in the optimiser step (``chunk.weight``),
so gradients are the mean over all trained (sample, timestep) rows whatever K is.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ContextManager, Optional

import torch


@dataclass
class EpochData:
    """What ``prepare`` hands to ``chunk_loss``: per-sample tensors indexed by trajectory position."""

    advantages: Optional[torch.Tensor] = None  # [B] (or [B, T] for per-step advantages)
    extra: dict[str, Any] = field(default_factory=dict)


class Algorithm:
    name = "base"
    reference = ""  # the authors' repository and files the defaults come from (docs/algorithms.md)
    needs_reference = False  # the trainer keeps a reference policy (LoRA off / frozen copy) when True
    samples_per_prompt = 1
    shares_initial_noise = False  # a prompt group's samples start from the same x_T

    def __init__(self, cfg) -> None:
        from ..train.config import samples_per_prompt

        self.cfg = cfg
        self.samples_per_prompt = samples_per_prompt(cfg)  # the one definition of G, shared with config validation

    @classmethod
    def reference_defaults(cls, n_prompts: int) -> dict[str, Any]:
        """{dotted config key: value} of the reference where it differs from the config's (DDPO's) defaults;
        ``n_prompts`` is how many prompts the run has (some references switch settings on it)."""
        return {}

    def setup(self, trainer) -> None:
        """Build state that needs the loaded model and reward (critics); called once, before any resume."""

    def check_model(self, model) -> None:
        """Raise ValueError when the algorithm's settings cannot run on ``model`` (called once it is loaded)."""

    # ---- shapes of the data --------------------------------------------------------------------
    def train_steps(self, traj) -> torch.Tensor:
        """Indices of the rollout steps the algorithm trains on: the stochastic ones (those with a log-prob)."""
        from ..diffusion.recompute import trainable_steps

        return trainable_steps(traj)

    def num_train_steps(self, stochastic_steps: int) -> int:
        from ..train.config import num_train_steps

        return num_train_steps(self.cfg, stochastic_steps)

    def sample_order(self, n: int, data: EpochData, generator: torch.Generator) -> torch.Tensor:
        """The order in which samples are cut into minibatches; groups of ``samples_per_prompt`` adjacent
        samples stay together (and in their order)."""
        G = self.samples_per_prompt
        groups = torch.randperm(n // G, generator=generator)
        return (groups[:, None] * G + torch.arange(G)).flatten()

    def minibatches(self, order: torch.Tensor, data: EpochData) -> list[torch.Tensor]:
        """The minibatches of an inner epoch, cut from the samples in ``order`` (``sample_order``'s): consecutive
        runs of ``train.batch_size``. The optimiser steps every ``train.gradient_accumulation_steps`` of them."""
        return list(order.split(self.cfg.train.batch_size))

    def step_order(self, n: int, steps: torch.Tensor, n_train: int, generator: torch.Generator) -> torch.Tensor:
        """[n, n_train] step indices each sample trains on: a random subset of the stochastic ``steps``,
        drawn per sample, or per group when ``samples_per_prompt`` > 1 (group members share timesteps)."""
        G = self.samples_per_prompt
        per_group = torch.stack([steps[torch.randperm(steps.numel(), generator=generator)[:n_train]] for _ in range(n // G)])
        return per_group.repeat_interleave(G, dim=0)

    # ---- rollouts -------------------------------------------------------------------------------
    sample_with_reference = False  # roll out the reference policy (offline preference data), not the current one
    deterministic_rollout = False  # roll out with the sampler's deterministic step (forward-process algorithms)
    trains_on_states = True  # False: the loss reads only the final latents x_T, so rollouts keep no other state

    def rollout_weights(self, trainer) -> ContextManager:
        """The weights that roll out, as a context around each rollout batch: the current policy, or the reference
        policy when ``sample_with_reference``; algorithms that sample with other weights (DiffusionNFT's old
        model) override it."""
        return trainer.model.reference() if self.sample_with_reference else contextlib.nullcontext()

    def rollout_plan(self, trainer, epoch: int, batch: int, generator: torch.Generator) -> Optional[tuple[list[str], list[int]]]:
        """(prompts, seeds) of rollout batch ``batch``, or None for the trainer's default (prompts drawn
        uniformly, ``samples_per_prompt`` adjacent samples each)."""
        return None

    # ---- losses --------------------------------------------------------------------------------
    def prepare(self, trainer, traj, rewards: torch.Tensor) -> EpochData:
        return EpochData(trainer.advantages(traj.prompts, rewards))

    def begin_minibatch(self, trainer, traj, sample_idx: torch.Tensor, order: torch.Tensor, data: EpochData) -> Any:
        """Called before a minibatch's chunks; its return value reaches ``chunk_loss`` as ``ctx``."""
        return None

    def chunk_loss(self, trainer, chunk, data: EpochData, ctx: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def after_optimizer_step(self, trainer, finite: bool) -> None:
        """Called after every optimiser step of the policy (``finite``: the step was taken, not skipped)."""

    def after_epoch(self, trainer, epoch: int) -> dict[str, float]:
        """Called once an epoch's updates are done; returns extra metrics to log."""
        return {}

    # ---- checkpointing of algorithm state (critics) --------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass
