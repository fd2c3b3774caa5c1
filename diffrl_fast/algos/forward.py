"""What the forward-process algorithms (DiffusionNFT, AWM) share: deterministic rollouts that keep only x_T,
a slowly moving copy of the trainable weights, and the re-noising of x_T at a trained timestep.

Their losses need no per-step log-probs of the sampler. For a trained row (sample b, rollout step j) the
clean latent x_T of sample b is re-noised by the model's forward process at the rollout's timestep t_j,

    x_t = alpha_t x_0 + sigma_t z,    z ~ N(0, I) drawn fresh per row,

(flow matching: sigma = t / 1000, alpha = 1 - sigma; epsilon/v models: alpha = sqrt(abar_t), sigma =
sqrt(1 - abar_t)) and the model is evaluated there without guidance. Advantages are GRPO's group advantages.
"""
from __future__ import annotations

import torch

from ..diffusion.coefficients import forward_process
from .base import EpochData
from .grpo import GRPO


class ForwardProcessAlgorithm(GRPO):
    deterministic_rollout = True  # any deterministic solver: only x_T is trained on
    trains_on_states = False
    noise_stream = 30  # the generator stream of the forward-process noise (reproducible from seed, epoch, chunk)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.beta = 0.0  # no policy-gradient KL (GRPO's); each algorithm has its own
        self.shares_initial_noise = False
        self.old: list[torch.Tensor] | None = None

    def check_model(self, model) -> None:
        pass

    def setup(self, run) -> None:
        if run.engine in ("deepspeed", "fsdp"):
            raise ValueError(f"algo={self.name} keeps a copy of the trainable weights, which dist.engine={run.engine} "
                             "shards: use dist.engine=ddp (or none)")
        self.params = [p for p in run.model.denoiser.parameters() if p.requires_grad]
        self.old = [p.detach().clone() for p in self.params]

    def train_steps(self, traj) -> torch.Tensor:
        """Every rollout step: the forward-process losses train on the rollout's timesteps, not its log-probs."""
        return torch.arange(traj.num_steps)

    def noise(self, run, chunk, x0: torch.Tensor) -> torch.Tensor:
        """Fresh forward-process noise for the chunk's rows, reproducible from (seed, epoch, chunk)."""
        key = (run.epoch, self.noise_stream, chunk.col0, int(chunk.sample_idx[0]), int(chunk.step_idx[0, 0]))
        return torch.randn(x0.shape, generator=run.generator(*key), dtype=x0.dtype).to(x0.device)

    def noised(self, run, chunk, traj):
        """(x0, z, x_t, alpha, sigma, cx, ce) of the chunk's rows: x0 = x_T of each row's sample, x_t = alpha x0 +
        sigma z at the row's timestep; alpha .. ce are [N] float64 on the CPU (``forward_process``)."""
        K = chunk.shape[1]
        x0 = traj.final_latents[chunk.sample_idx.to(traj.latents.device)].to(run.device).repeat_interleave(K, dim=0)
        z = self.noise(run, chunk, x0)
        alpha, sigma, cx, ce = forward_process(run.model.scheduler, chunk.t.cpu())
        shape = (-1,) + (1,) * (x0.dim() - 1)
        xt = alpha.reshape(shape).to(x0) * x0 + sigma.reshape(shape).to(x0) * z
        return x0, z, xt, alpha, sigma, cx, ce

    def old_decay(self, step: int) -> float:
        """Decay d of the old copy after an epoch ending at optimiser step ``step``: old <- d old + (1 - d) theta."""
        raise NotImplementedError

    def after_epoch(self, run, epoch):
        d = self.old_decay(run.optimizer_steps)
        with torch.no_grad():
            for o, p in zip(self.old, self.params):
                o.mul_(d).add_(p.detach(), alpha=1.0 - d)
        return {"old_decay": d}

    def prepare(self, run, traj, rewards):
        # GRPO's group advantages; every sample is trained on (flow_grpo's zero-advantage filter is not in their references)
        return EpochData(self.group_advantages(run, traj, rewards), {"traj": traj})

    def state_dict(self):
        return {f"old.{i}": o for i, o in enumerate(self.old or [])}

    def load_state_dict(self, state):
        if self.old is not None and state:
            with torch.no_grad():
                for i, o in enumerate(self.old):
                    o.copy_(state[f"old.{i}"])
