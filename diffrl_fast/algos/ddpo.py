"""DDPO: policy gradient on the denoising MDP (Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning").

With A the (per-prompt normalised) advantage of a trajectory and log p_theta the log-prob of each step's
action recomputed by the current policy (old log-probs from the rollout):

    DDPO-SF (score function, REINFORCE):  L = E[ -A log p_theta(x_{t-1} | x_t, c) ]
    DDPO-IS (importance sampling, PPO):   rho = exp(log p_theta - log p_old)
                                          L = E[ max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) ]

A is clipped to [-adv_clip_max, adv_clip_max]. Both run on the fused step op through ``ppo_clip_loss``.
Per-step advantages ([B, T], e.g. TDPO's temporal rewards) are used as given.
"""
from __future__ import annotations

from ..diffusion.recompute import chunk_log_probs, step_logprob_of
from ..ops import ppo_clip_loss
from .base import Algorithm
from .common import chunk_kl, policy_outputs, rows_of


class DDPO(Algorithm):
    name = "ddpo_is"
    clipped = True

    def pg_loss(self, logp, chunk, advantages):
        adv = rows_of(advantages.to(logp.device), chunk)
        return ppo_clip_loss(logp, chunk.old_log_probs, adv, clip_range=self.cfg.train.clip_range if self.clipped else None,
                             adv_clip=self.cfg.train.adv_clip_max)

    def chunk_loss(self, trainer, chunk, data, ctx=None):
        logp = chunk_log_probs(trainer.model, chunk, autocast_dtype=trainer.autocast_dtype)
        out = self.pg_loss(logp, chunk, data.advantages)
        return out.loss, {"clipfrac": out.clipfrac, "approx_kl": out.approx_kl, "ratio": out.ratio_mean}


class DDPO_SF(DDPO):
    name = "ddpo_sf"
    clipped = False


class PolicyGradientWithKL(DDPO):
    """DDPO's clipped (or plain) policy gradient plus beta times the fused per-step KL to the reference:

        L = alpha * L_pg + beta * E_t[ KL(p_theta(. | x_t, c) || p_ref(. | x_t, c)) ]

    Shared by DPOK and GRPO; the reference is the LoRA adapter switched off or a frozen copy.
    """

    alpha = 1.0
    beta = 0.0

    def chunk_loss(self, trainer, chunk, data, ctx=None):
        eps_u, eps_c = policy_outputs(trainer, chunk)
        logp = step_logprob_of(chunk, eps_u, eps_c)
        out = self.pg_loss(logp, chunk, data.advantages)
        stats = {"clipfrac": out.clipfrac, "approx_kl": out.approx_kl, "ratio": out.ratio_mean}
        loss = self.alpha * out.loss
        if self.beta > 0:
            kl = chunk_kl(trainer, chunk, eps_u, eps_c).mean()
            loss = loss + self.beta * kl
            stats["kl"] = kl.detach()
        return loss, stats
