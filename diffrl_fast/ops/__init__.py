"""diffrl_fast.ops: fused loss kernels for RL fine-tuning of diffusion models (stable public API).

Each op works on latents shaped [*lead, C, H, W] (the last ``latent_dims`` dims are reduced, leading
dims such as [B] or [B, T] are kept) and dispatches to a backend: Triton on CUDA tensors, C++/OpenMP on
CPU tensors, plain PyTorch everywhere (see ``diffrl_fast.ops.backends``).
"""
from ._validate import checks
from .backends import available_backends, use_backend
from .dpo import DPOLoss, dpo_step_loss, plackett_luce_loss, trajectory_dpo_loss
from .kl import gaussian_kl
from .logprob import gaussian_logprob
from .ppo import PPOLoss, importance_ratio, ppo_clip_loss, ppo_clip_step_loss
from .step import X0Clip, step_kl, step_logprob, step_mean

__all__ = [
    "gaussian_logprob",
    "step_logprob",
    "step_mean",
    "step_kl",
    "gaussian_kl",
    "importance_ratio",
    "ppo_clip_loss",
    "ppo_clip_step_loss",
    "PPOLoss",
    "dpo_step_loss",
    "DPOLoss",
    "plackett_luce_loss",
    "trajectory_dpo_loss",
    "X0Clip",
    "use_backend",
    "available_backends",
    "checks",
]
