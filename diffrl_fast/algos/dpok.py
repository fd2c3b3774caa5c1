"""DPOK: policy optimisation with KL regularisation (Fan et al. 2023, "DPOK: Reinforcement Learning for
Fine-tuning Text-to-Image Diffusion Models").

    L = alpha * E[ -A_t rho_t ]  +  beta * E_t[ KL( p_theta(x_{t-1} | x_t, c) || p_pre(x_{t-1} | x_t, c) ) / D ]

(E_t: the mean over the trained steps; the KL is divided by the latent size D, as the log-probs are
averaged over latent elements, so beta is comparable across image sizes.)

The KL between the two step Gaussians (same s, same x_t) is closed-form, |mean_theta - mean_pre|^2 / (2 s^2),
computed by the fused ``step_kl`` without materialising either mean. p_pre is the pretrained model: the
LoRA adapter switched off, or a frozen copy when fully fine-tuning. A_t is the normalised reward, or
r - V(x_t, c) with the learned value baseline V (``dpok.value_baseline``, the temporal critic of
``critic.py``). ``dpok.clip`` applies DDPO-IS's ratio clipping; without it the loss is the plain
reward-weighted policy gradient -A log p_theta.
"""
from __future__ import annotations

from .base import EpochData
from .ddpo import PolicyGradientWithKL
from .tdpo import CriticMixin


class DPOK(CriticMixin, PolicyGradientWithKL):
    name = "dpok"
    needs_reference = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.alpha, self.beta, self.clipped = cfg.dpok.alpha, cfg.dpok.beta, cfg.dpok.clip

    def prepare(self, trainer, traj, rewards):
        if not self.cfg.dpok.value_baseline:
            return EpochData(trainer.advantages(traj.prompts, rewards))
        adv, log = self.temporal_advantages(trainer, traj, rewards)
        return EpochData(adv, {"log": log})
