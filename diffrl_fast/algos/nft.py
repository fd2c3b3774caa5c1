"""DiffusionNFT: negative-aware fine-tuning on the forward process (Zheng et al. 2025, "DiffusionNFT: Online
Diffusion Reinforcement with Forward Process"; reference: NVlabs/DiffusionNFT, scripts/train_nft_sd3.py,
config/nft.py, config/base.py).

No log-probs: rollouts may use any deterministic solver and only their clean results x_0 are trained on.
For a trained (sample, timestep t) row the clean latent is re-noised by the forward process,
x_t = alpha_t x_0 + sigma_t z with fresh z, and the model's output there defines two implicit policies
around the "old" model (a slowly moving copy of the policy):

    v+ = beta v_theta + (1 - beta) v_old           (implicit positive policy)
    v- = (1 + beta) v_old - beta v_theta           (implicit negative policy)

Each is turned into an x_0 prediction, x0(v) = cx x_t + ce v (flow matching: x_t - t v; epsilon
prediction: (x_t - sigma_t eps) / alpha_t), and with r = clip((clip(A, +-c) / c) / 2 + 1/2, 0, 1) in [0, 1]
(A the group-normalised advantage, c = train.adv_clip_max):

    L = c * mean_rows[ r |x0(v+) - x_0|^2 / (w+ beta) + (1 - r) |x0(v-) - x_0|^2 / (w- beta) ]
        + nft.kl_beta * mean_rows[ |v_theta - v_ref|^2 ]

|.|^2 is the mean over latent elements and w+- = max(mean |x0(v+-) - x_0|, 1e-5) (no gradient) is the
reference's adaptive weighting. After every epoch the old model moves towards the policy:
old <- d old + (1 - d) theta, d = min(max(0, step - flat) * rate, hold) at the optimiser step count
(``nft.decay_type`` 0, 1, 2 = the reference's (0, 0, 0), (0, 0.001, 0.5), (75, 0.0075, 0.999)).

Rollouts come from the old model, as the reference's (``nft.sample_with=policy``: from the current policy).
Named differences from the reference: the deterministic rollout is DDIM (eta = 0) or the flow ODE's Euler
step, not DPM-Solver-2; the reference's EMA of the weights for evaluation is not kept.
"""
from __future__ import annotations

import torch

from ..diffusion.rollout import guided_outputs
from .common import rows_of, swapped_weights
from .forward import ForwardProcessAlgorithm

DECAY_TYPES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def old_decay(step: int, decay_type: int) -> float:
    """The reference's decay of the old model at optimiser step ``step``: min(max(0, step - flat) rate, hold)."""
    flat, rate, hold = DECAY_TYPES[decay_type]
    return 0.0 if step < flat else min((step - flat) * rate, hold)


def nft_loss(x0: torch.Tensor, xt: torch.Tensor, v: torch.Tensor, v_old: torch.Tensor, cx: torch.Tensor, ce: torch.Tensor,
             advantages: torch.Tensor, beta: float, adv_clip: float) -> torch.Tensor:
    """DiffusionNFT's policy loss per row ([N]; see the module docstring), x0(v) = cx x_t + ce v per row.

    x0, xt, v, v_old: [N, ...]; cx, ce, advantages: [N]. Only ``v`` carries a gradient.
    """
    shape = (-1,) + (1,) * (x0.dim() - 1)
    cx, ce = cx.reshape(shape).to(v.dtype), ce.reshape(shape).to(v.dtype)
    v_old = v_old.detach()
    dims = tuple(range(1, x0.dim()))
    a = advantages.clamp(-adv_clip, adv_clip)
    r = ((a / adv_clip) / 2.0 + 0.5).clamp(0.0, 1.0).to(v.dtype)

    def term(pred):
        x0_pred = cx * xt + ce * pred
        with torch.no_grad():
            w = (x0_pred.double() - x0.double()).abs().mean(dim=dims).clamp(min=1e-5).to(v.dtype)
        return ((x0_pred - x0) ** 2).mean(dim=dims) / w

    positive = term(beta * v + (1.0 - beta) * v_old)
    negative = term((1.0 + beta) * v_old - beta * v)
    return adv_clip * (r * positive / beta + (1.0 - r) * negative / beta)


class NFT(ForwardProcessAlgorithm):
    name = "nft"
    reference = "NVlabs/DiffusionNFT: scripts/train_nft_sd3.py, config/nft.py (_get_config, sd3_*), config/base.py"

    @classmethod
    def group_size(cls, cfg):
        return cfg.nft.group_size

    @classmethod
    def reference_defaults(cls, n_prompts):
        # SD3.5 configs (config/nft.py, 8 GPUs): 10 deterministic steps without guidance, 48 prompts x 24 images = 1152
        # per epoch, one optimiser step per epoch (gradient_step_per_epoch=1: 1152 images per step), timestep_fraction
        # 0.99, lr 3e-4. Here on one process: 48 rollout batches of one group; with N processes divide
        # sample.num_batches_per_epoch by N (configs/sd3.yaml does for 8)
        return {"sample.num_steps": 10, "sample.guidance_scale": 1.0, "sample.batch_size": 24,
                "sample.num_batches_per_epoch": 48, "train.batch_size": 24, "train.optimizer_step_every": "round",
                "train.timestep_fraction": 0.99}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        c = cfg.nft
        self.beta_nft, self.kl_beta, self.decay_type = c.beta, c.kl_beta, c.decay_type
        self.needs_reference = self.kl_beta > 0

    def rollout_weights(self, run):
        # the reference rolls out with the old model (set_adapter("old") around pipeline_with_logprob)
        if self.cfg.nft.sample_with == "old" and self.old is not None:
            return swapped_weights(self.params, self.old)
        return super().rollout_weights(run)

    def step_order(self, n, steps, n_train, generator):
        # a random subset of the timesteps per sample (the reference permutes them per sample)
        return torch.stack([steps[torch.randperm(steps.numel(), generator=generator)[:n_train]] for _ in range(n)])

    def old_decay(self, step: int) -> float:
        return old_decay(step, self.decay_type)

    def chunk_loss(self, run, chunk, data, ctx=None):
        traj = data.extra["traj"]
        model = run.model
        x0, _, xt, _, _, cx, ce = self.noised(run, chunk, traj)
        with torch.no_grad(), swapped_weights(self.params, self.old):
            v_old, _ = guided_outputs(model, xt, chunk.t, chunk.cond, None, run.autocast_dtype)
        v, _ = guided_outputs(model, xt, chunk.t, chunk.cond, None, run.autocast_dtype)
        adv = rows_of(data.advantages.to(v.device), chunk).reshape(-1)
        per_row = nft_loss(x0, xt, v, v_old, cx.to(v.device), ce.to(v.device), adv, self.beta_nft, self.cfg.train.adv_clip_max)
        loss = per_row.mean()
        stats = {"policy_loss": loss.detach(), "old_deviate": (v.detach() - v_old).square().mean()}
        if self.kl_beta > 0:
            with torch.no_grad(), model.reference():
                v_ref, _ = guided_outputs(model, xt, chunk.t, chunk.cond, None, run.autocast_dtype)
            kl = (v - v_ref).square().mean()
            loss = loss + self.kl_beta * kl
            stats["kl"] = kl.detach()
        return loss, stats
