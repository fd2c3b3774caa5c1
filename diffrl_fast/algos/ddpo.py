"""DDPO: policy gradient on the denoising MDP (Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning"; reference: kvablack/ddpo-pytorch, scripts/train.py and config/base.py).

With A the (per-prompt normalised) advantage of a trajectory and log p_theta the log-prob of each step's
action recomputed by the current policy (old log-probs from the rollout; "mean" reduction over latent
elements, as ddpo-pytorch):

    DDPO-SF (score function, REINFORCE):  L = E[ -A log p_theta(x_{t-1} | x_t, c) ]
    DDPO-IS (importance sampling, PPO):   rho = exp(log p_theta - log p_old)
                                          L = E[ max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) ]

A is clipped to [-adv_clip_max, adv_clip_max]. Both run on the fused step op through ``ppo_clip_loss``.
Per-step advantages ([B, T], e.g. TDPO's temporal rewards) are used as given.

The score-function gradient is unbiased only at theta = theta_old (paper, section 4.3), so DDPO-SF's
reference setting takes one optimiser step per round of data (``train.optimizer_step_every=round``);
``minibatches`` is available as a named, biased option.
"""
from __future__ import annotations

from ..diffusion.recompute import chunk_log_probs, step_logprob_of
from ..ops import ppo_clip_loss
from .base import Algorithm
from .common import chunk_kl, policy_outputs, rows_of


class DDPO(Algorithm):
    name = "ddpo_is"
    reference = "kvablack/ddpo-pytorch: scripts/train.py, config/base.py, config/dgx.py"
    clipped = True
    clip_mode = "ppo"

    @property
    def adv_clip(self):
        return self.cfg.train.adv_clip_max

    def pg_loss(self, logp, chunk, advantages, outputs=None):
        """The clipped (or score-function) policy-gradient loss of the chunk's rows; ``outputs``: the policy's (eps_u,
        eps_c) on the chunk, for losses that read the step means (GRPO-Guard)."""
        adv = rows_of(advantages.to(logp.device), chunk)
        return ppo_clip_loss(logp, chunk.old_log_probs, adv, clip_range=self.cfg.train.clip_range if self.clipped else None,
                             adv_clip=self.adv_clip, clip_mode=self.clip_mode)

    def chunk_loss(self, run, chunk, data, ctx=None):
        logp = chunk_log_probs(run.model, chunk, autocast_dtype=run.autocast_dtype)
        out = self.pg_loss(logp, chunk, data.advantages)
        return out.loss, {"clipfrac": out.clipfrac, "approx_kl": out.approx_kl, "ratio": out.ratio_mean}


class DDPO_SF(DDPO):
    name = "ddpo_sf"
    reference = "DDPO paper section 4.3 (ddpo-pytorch has no score-function option; its settings otherwise)"
    clipped = False

    @classmethod
    def reference_defaults(cls, n_prompts):
        return {"train.optimizer_step_every": "round"}


class PolicyGradientWithKL(DDPO):
    """DDPO's policy gradient (clipped as ``clip_mode`` says) plus beta times a per-step KL to the reference:

        L = alpha * L_pg + beta * E_t[ KL_form(p_theta(. | x_t, c), p_ref(. | x_t, c)) ]

    Shared by DPOK and GRPO (``common.chunk_kl`` has the forms); the reference is the LoRA adapter switched
    off or a frozen copy.
    """

    alpha = 1.0
    beta = 0.0
    kl_form = "exact"
    detach_uncond = False

    def chunk_loss(self, run, chunk, data, ctx=None):
        eps_u, eps_c = policy_outputs(run, chunk, self.detach_uncond)
        logp = step_logprob_of(chunk, eps_u, eps_c)
        out = self.pg_loss(logp, chunk, data.advantages, outputs=(eps_u, eps_c))
        stats = {"clipfrac": out.clipfrac, "approx_kl": out.approx_kl, "ratio": out.ratio_mean}
        loss = self.alpha * out.loss
        if self.beta > 0:
            kl = chunk_kl(run, chunk, eps_u, eps_c, self.kl_form).mean()
            loss = loss + self.beta * kl
            stats["kl"] = kl.detach()
        return loss, stats
