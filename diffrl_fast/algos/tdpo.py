"""TDPO and TDPO-R (Zhang et al. 2024, "Confronting Reward Overoptimization for Diffusion Models: A
Perspective of Inductive and Primacy Biases").

TDPO replaces DDPO's trajectory-level advantage by a per-step *temporal reward* from a critic R_phi
trained to predict the final reward from intermediate states:

    min_phi E[ (R_phi(x_t, c) - r(x_0, c))^2 ],      T_phi(x_t, c) = r(x_0, c) - R_phi(x_t, c),
    L = E[ max(-T rho_t, -T clip(rho_t, 1 - eps, 1 + eps)) ]   (DDPO-IS with per-step advantages)

which exploits the temporal inductive bias of denoising. T is normalised over the epoch's rows.
TDPO-R adds, every ``tdpo.reset_every`` epochs, a reset of the critic's active neurons against primacy
bias (``CriticTrainer.reset_active_neurons``).
"""
from __future__ import annotations

import torch

from ..diffusion.recompute import trainable_steps
from ..train.advantages import normalize
from .base import EpochData
from .critic import CriticTrainer
from .ddpo import DDPO


class CriticMixin:
    """The temporal critic, fitted each epoch, and the per-step advantages r - R_phi(x_t, c) it gives."""

    critic: CriticTrainer | None = None
    recent: tuple | None = None
    max_recent_rows = 4096

    def temporal_advantages(self, trainer, traj, rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
        c = self.cfg.tdpo
        steps = trainable_steps(traj)
        x, t, cond, b = CriticTrainer.rows(traj, steps)
        if self.critic is None:
            self.critic = CriticTrainer(x.shape[1], cond.shape[-1], lr=c.critic_lr, epochs=c.critic_epochs,
                                        batch_size=c.critic_batch_size, device=trainer.device, generator_seed=self.cfg.seed)
        target = rewards.float()[b]
        g = trainer.generator(trainer.epoch, 10)
        mse = self.critic.fit(x, t, cond, target, g)
        temporal = target - self.critic.predict(x, t, cond)
        temporal = normalize(temporal)
        adv = torch.zeros(len(traj), traj.num_steps)
        adv[b, steps.repeat(len(traj))] = temporal
        keep = torch.randperm(x.shape[0], generator=g)[: self.max_recent_rows]
        self.recent = (x[keep], t[keep], cond[keep])
        return adv, {"critic_mse": mse, "critic_explained_var": float(1 - mse / max(float(target.var(unbiased=False)), 1e-12))}

    def state_dict(self):
        return {"critic": self.critic.state_dict()} if self.critic is not None else {}

    def load_state_dict(self, state):
        if state.get("critic") is not None:
            if self.critic is None:
                raise ValueError("the checkpoint holds a critic but this algorithm has none built yet")
            self.critic.load_state_dict(state["critic"])


class TDPO(CriticMixin, DDPO):
    name = "tdpo"

    def prepare(self, trainer, traj, rewards):
        adv, log = self.temporal_advantages(trainer, traj, rewards)
        return EpochData(adv, {"log": log})


class TDPO_R(TDPO):
    name = "tdpo_r"

    def after_epoch(self, trainer, epoch):
        c = self.cfg.tdpo
        if self.critic is None or self.recent is None or (epoch + 1) % c.reset_every:
            return {}
        mask = self.critic.reset_active_neurons(*self.recent, c.reset_threshold, trainer.generator(epoch, 11))
        return {"critic_reset_neurons": int(mask.sum())}
