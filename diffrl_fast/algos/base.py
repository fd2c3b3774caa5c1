"""What every algorithm provides to the one trainer loop, and the one object through which it sees the run.

The trainer owns everything algorithms share: rollouts, rewards, the recompute of log-probs over packed
timestep chunks, optimisation, logging and checkpointing. An algorithm sees none of it directly: every method
below receives a ``RunContext`` (``run``), which names all an algorithm may use: the model (its outputs and its
reference policy), where and in which precision it runs, the advantage function, the run's generators, the
process group for reductions, the prompts and the reward, and the clock (epochs, optimiser steps). An
algorithm decides

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
from typing import Any, Callable, ContextManager, Optional

import torch


@dataclass(frozen=True)
class RunContext:
    """Everything an algorithm may use of the training run; the trainer builds one (``Trainer.run_context``).

    - ``model``: the ``DiffusionModel``: its outputs (``algos.common``: ``policy_outputs``, ``reference_logp``,
      ``chunk_kl``), ``reference()`` (the reference policy), ``scheduler``, ``denoiser``, ``encode_prompts``;
    - ``device``, ``autocast_dtype``: where the denoiser runs and its autocast precision (None: fp32);
    - ``dist``: the process group for reductions (``rank``, ``world_size``, ``active``, ``all_gather_object``,
      ``means``);
    - ``prompts``: the run's prompts; ``reward_fn``: the training reward (critics embed with its encoder);
    - ``advantages(prompts, rewards)``: the trainer's normalised advantages of this process's samples, from
      statistics over every process's (per prompt with advantage.per_prompt_stat_tracking, else the batch's);
    - ``generator(*key)``: an independent CPU generator of the run's seed for (epoch, purpose, ...): the same
      draws on resume;
    - ``step_groups(n_minibatches, n_chunks)``: the optimiser steps of an inner epoch, as (minibatch, chunk) units;
    - ``engine``: the distributed engine ('none', 'ddp', 'fsdp' or 'deepspeed');
    - ``epoch`` (epochs completed) and ``optimizer_steps`` (optimiser steps taken), read from ``clock``.
    """

    model: Any
    device: torch.device
    autocast_dtype: Optional[torch.dtype]
    dist: Any
    prompts: list
    reward_fn: Callable
    advantages: Callable[[list, torch.Tensor], torch.Tensor]
    generator: Callable[..., torch.Generator]
    step_groups: Callable[[int, int], list]
    engine: str
    clock: Callable[[], tuple[int, int]]

    @property
    def epoch(self) -> int:
        return self.clock()[0]

    @property
    def optimizer_steps(self) -> int:
        return self.clock()[1]


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
        self.cfg = cfg
        self.samples_per_prompt = self.group_size(cfg)  # the one definition of G, shared with config validation

    @classmethod
    def group_size(cls, cfg) -> int:
        """G, the samples of one prompt trained together, under config ``cfg`` (1: no groups)."""
        return 1

    @classmethod
    def reference_defaults(cls, n_prompts: int) -> dict[str, Any]:
        """{dotted config key: value} of the reference where it differs from the config's (DDPO's) defaults;
        ``n_prompts`` is how many prompts the run has (some references switch settings on it)."""
        return {}

    def setup(self, run) -> None:
        """Build state that needs the loaded model and reward (critics); called once, before any resume."""

    def check_model(self, model) -> None:
        """Raise ValueError when the algorithm's settings cannot run on ``model`` (called once it is loaded)."""

    # ---- shapes of the data --------------------------------------------------------------------
    def train_steps(self, traj) -> torch.Tensor:
        """Indices of the rollout steps the algorithm trains on: the stochastic ones (those with a log-prob)."""
        from ..diffusion.recompute import trainable_steps

        return trainable_steps(traj)

    def num_train_steps(self, stochastic_steps: int) -> int:
        """Steps trained per trajectory and inner epoch: int(train.timestep_fraction x T), floored as the
        references floor it, at least 1."""
        return max(1, int(self.cfg.train.timestep_fraction * stochastic_steps))

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
    needs_rollout_means = False  # True: rollouts also store each step's mean (``Trajectory.means``; GRPO-Guard)

    def rollout_weights(self, run) -> ContextManager:
        """The weights that roll out, as a context around each rollout batch: the current policy, or the reference
        policy when ``sample_with_reference``; algorithms that sample with other weights (DiffusionNFT's old
        model) override it."""
        return run.model.reference() if self.sample_with_reference else contextlib.nullcontext()

    def rollout_plan(self, run, epoch: int, batch: int, generator: torch.Generator) -> Optional[tuple[list[str], list[int]]]:
        """(prompts, seeds) of rollout batch ``batch``, or None for the trainer's default (prompts drawn
        uniformly, ``samples_per_prompt`` adjacent samples each)."""
        return None

    # ---- losses --------------------------------------------------------------------------------
    def prepare(self, run, traj, rewards: torch.Tensor) -> EpochData:
        return EpochData(run.advantages(traj.prompts, rewards))

    def begin_minibatch(self, run, traj, sample_idx: torch.Tensor, order: torch.Tensor, data: EpochData) -> Any:
        """Called before a minibatch's chunks; its return value reaches ``chunk_loss`` as ``ctx``."""
        return None

    def chunk_loss(self, run, chunk, data: EpochData, ctx: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def after_optimizer_step(self, run, finite: bool) -> None:
        """Called after every optimiser step of the policy (``finite``: the step was taken, not skipped)."""

    def after_epoch(self, run, epoch: int) -> dict[str, float]:
        """Called once an epoch's updates are done; returns extra metrics to log."""
        return {}

    # ---- checkpointing of algorithm state (critics) --------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass
