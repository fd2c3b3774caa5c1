"""DDPO: policy gradient on the denoising MDP (Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning").

With A the (per-prompt normalised) advantage of a trajectory and log p_theta the log-prob of each step's
action recomputed by the current policy (old log-probs from the rollout):

    DDPO-SF (score function, REINFORCE):  L = E[ -A log p_theta(x_{t-1} | x_t, c) ]
    DDPO-IS (importance sampling, PPO):   rho = exp(log p_theta - log p_old)
                                          L = E[ max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) ]

A is clipped to [-adv_clip_max, adv_clip_max]. Both run on the fused step op through ``ppo_clip_loss``.
"""
from __future__ import annotations

from ..diffusion.recompute import chunk_log_probs
from ..ops import ppo_clip_loss
from .base import Algorithm


class DDPO(Algorithm):
    name = "ddpo_is"
    clipped = True

    def chunk_loss(self, trainer, chunk, data):
        logp = chunk_log_probs(trainer.model, chunk, autocast_dtype=trainer.autocast_dtype,
                               checkpoint=self.cfg.train.checkpoint_chunks)
        n, k = chunk.shape
        adv = data.advantages.to(logp.device)[chunk.sample_idx.to(logp.device)]
        adv = adv[:, None].expand(n, k) if adv.dim() == 1 else adv.gather(1, chunk.step_idx.to(logp.device))
        out = ppo_clip_loss(logp, chunk.old_log_probs, adv, clip_range=self.cfg.train.clip_range if self.clipped else None,
                            adv_clip=self.cfg.train.adv_clip_max)
        return out.loss, {"clipfrac": out.clipfrac, "approx_kl": out.approx_kl, "ratio": out.ratio_mean}


class DDPO_SF(DDPO):
    name = "ddpo_sf"
    clipped = False
