"""Direct Group Preference Optimization (Luo, Hu & Tang 2025, "Reinforcing Diffusion Models by Direct Group
Preference Optimization"; reference: Luo-Yihong/DGPO, scripts/train_sd3_dgpo.py
(compute_group_dgpo_loss_allreduce, generate_shared_sampled_timesteps, generate_shared_noise_for_groups),
config/dgpo.py (geneval_sd3_4gpu), config/base.py).

DGPO drops the policy gradient: it learns the preference of a prompt's better samples over its worse ones, a
DPO over groups instead of pairs, on deterministic (ODE) rollouts. A group's advantages A_i (GRPO's, here with
the group's own std, ``grpo.std=group``, and clipped to +-train.adv_clip_max) split it into G+ (A > 0) and G-
and weight its members. For a trained row (sample i at rollout step j, see forward.py), with the final latent
x0 re-noised by one noise z shared by the whole group, x_t = (1 - sigma) x0 + sigma z and target u = z - x0:

    l_theta_i = mean over elements of (v_theta(x_t, c) - u)^2          (conditional: no guidance in the policy)
    l_ref_i   = the same for the reference: the frozen base model (its guided velocity at dgpo.kl_cfg > 1), or
                the EMA copy (``dgpo.use_ema_ref``)
    S_g       = (beta / G) sum_{i in g} A_i (sg[l_theta_i] - l_ref_i)    (= -(R(G+) - R(G-)), R_i = -beta (l_theta_i - l_ref_i))
    L         = mean over rows of  sg[sigmoid(S_g)] A_i l~_i  +  dgpo.kl_beta mean over rows of |v_theta - v_kl|^2

whose gradient is that of -log sigmoid(R(G+) - R(G-)) without its outer factor beta / G (the reference's
detached-weight form: beta sets the sigmoid's sharpness, not the step size). l~_i = sg[l_theta_i] where the
PPO-style clip bites against the EMA copy: rho_i = exp(l_ema_i - l_theta_i), clipped when A_i > 0 and
rho_i > 1 + dgpo.clip_range or A_i <= 0 and rho_i < 1 - dgpo.clip_range. v_kl is the base model's velocity
(guided at dgpo.kl_cfg > 1). Timesteps: dgpo.train_timesteps distinct rollout steps drawn uniformly from steps
0 .. dgpo.max_step (the noisiest; the reference's 4 of the first 5 of 10), shared by every sample of an inner
epoch; one step of them per training chunk (train.chunk_size=1), as the reference's micro-steps. The EMA copy
follows the policy after each epoch: ema <- d ema + (1 - d) theta, d = min(dgpo.ema_decay, 0.001 step); after
dgpo.switch_ema_ref optimiser steps the rollouts use it.

Named differences from the reference: the deterministic rollout is the flow ODE's Euler step (DDIM with eta = 0
for epsilon models), not diffusers' DPMSolverMultistepScheduler (shift 3, Sana's config); the reference's
second EMA of the weights, kept for evaluation only, is not kept. Samples with advantage 0 are trained on, as
in the reference (its zero-advantage mask is computed and not applied).
"""
from __future__ import annotations

import torch

from ..diffusion.coefficients import denoising_target
from ..diffusion.rollout import guided_outputs
from .awm import ema_decay
from .common import swapped_weights
from .forward import ForwardProcessAlgorithm


def dgpo_loss(l_theta: torch.Tensor, l_ref: torch.Tensor, l_old: torch.Tensor, advantages: torch.Tensor,
              groups: torch.Tensor, group_size: int, beta: float, clip_range: float) -> tuple[torch.Tensor, dict]:
    """DGPO's group preference loss over N rows (module docstring), [N] each: ``l_theta`` the policy's matching
    loss (differentiable), ``l_ref`` the reference's and ``l_old`` the EMA copy's (no gradient), ``advantages``
    the rows' (clipped) advantages, ``groups`` [N] the id of each row's (group, timestep): the rows S_g sums over.

        S_g = beta / G sum_{i in g} A_i (sg[l_theta_i] - l_ref_i),   L = mean_i sg[sigmoid(S_g(i))] A_i l~_i

    l~_i = sg[l_theta_i] where rho_i = exp(l_old_i - l_theta_i) leaves its band on the advantage's side.
    Returns (loss, stats: clipfrac, mean group weight, the mean of S_g)."""
    A = advantages.to(l_theta.dtype)
    lt = l_theta.detach()
    s = A * beta * (lt - l_ref.to(lt)) / group_size
    _, inverse = torch.unique(groups, return_inverse=True)
    S = torch.zeros(int(inverse.max()) + 1 if inverse.numel() else 0, dtype=s.dtype, device=s.device).index_add_(0, inverse, s)
    w = torch.sigmoid(S)[inverse]
    ratio = torch.exp(l_old.to(lt) - lt)
    clipped = ((A > 0) & (ratio > 1 + clip_range)) | ((A <= 0) & (ratio < 1 - clip_range))
    ell = torch.where(clipped, lt, l_theta)
    loss = (w * A * ell).mean()
    return loss, {"clipfrac": clipped.float().mean(), "group_weight": w.mean(), "group_logit": S.mean()}


class DGPO(ForwardProcessAlgorithm):
    name = "dgpo"
    reference = "Luo-Yihong/DGPO: scripts/train_sd3_dgpo.py, config/dgpo.py (geneval_sd3_4gpu), config/base.py"
    noise_stream = 32

    @classmethod
    def group_size(cls, cfg):
        return cfg.dgpo.group_size

    @classmethod
    def reference_defaults(cls, n_prompts):
        # config/dgpo.py geneval_sd3_4gpu: 10 ODE steps at g = 4.5, 16 images per prompt, 8 prompts per epoch (128
        # samples on 4 GPUs; here 8 rollout batches of one group on one process), a minibatch of one group, one
        # optimiser step per epoch, lr 3e-4, one timestep per micro-step, group-wise std
        return {"sample.num_steps": 10, "sample.guidance_scale": 4.5, "sample.batch_size": 16, "sample.num_batches_per_epoch": 8,
                "train.batch_size": 16, "train.optimizer_step_every": "round", "train.learning_rate": 3e-4,
                "train.chunk_size": 1, "grpo.std": "group"}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.c = cfg.dgpo
        self.needs_reference = self.c.kl_beta > 0 or not self.c.use_ema_ref

    def num_train_steps(self, stochastic_steps: int) -> int:
        return self.c.train_timesteps

    def sample_order(self, n, data, generator):
        # whole groups stay together (a group's rows are summed); the groups' order is shuffled
        G = self.c.group_size
        if n % G:
            raise ValueError(f"algo=dgpo needs whole groups of {G} samples, got {n} samples (a dropped non-finite reward "
                             "breaks a group: fix the reward or set reward.drop_nonfinite=false)")
        return (torch.randperm(n // G, generator=generator)[:, None] * G + torch.arange(G)).reshape(-1)

    def step_order(self, n, steps, n_train, generator):
        # generate_shared_sampled_timesteps: distinct steps of 0..max_step, one draw shared by every sample
        pick = torch.randperm(self.c.max_step + 1, generator=generator)[:n_train]
        return steps[pick].repeat(n, 1)

    def noise(self, run, chunk, x0):
        """One noise per (group, timestep), shared by the group's rows (generate_shared_noise_for_groups)."""
        n, K = chunk.shape
        G = self.c.group_size
        z = torch.empty_like(x0)
        for r in range(n * K):
            g, j = int(chunk.sample_idx[r // K]) // G, int(chunk.step_idx[r // K, r % K])
            gen = run.generator(run.epoch, self.noise_stream, g, j)
            z[r] = torch.randn(x0.shape[1:], generator=gen, dtype=x0.dtype).to(x0.device)
        return z

    def old_decay(self, step: int) -> float:
        return ema_decay(step, self.c.ema_decay, "linear")

    def rollout_weights(self, run):
        if run.optimizer_steps > self.c.switch_ema_ref and self.old is not None:
            return swapped_weights(self.params, self.old)
        return super().rollout_weights(run)

    def _velocity(self, run, xt, chunk, guidance: float = 1.0):
        if guidance == 1.0:
            return guided_outputs(run.model, xt, chunk.t, chunk.cond, None, run.autocast_dtype)[0]
        uncond = chunk.uncond if chunk.uncond is not None else run.model.encode_prompts([""] * len(xt)).to(xt.device)
        u, c = guided_outputs(run.model, xt, chunk.t, chunk.cond, uncond, run.autocast_dtype, guidance)
        return u if c is None else u + guidance * (c - u)

    def chunk_loss(self, run, chunk, data, ctx=None):
        c, traj = self.c, data.extra["traj"]
        n, K = chunk.shape
        x0, z, xt, alpha, sigma, _, _ = self.noised(run, chunk, traj)
        target = denoising_target(run.model.scheduler, alpha, sigma, x0, z)
        out = self._velocity(run, xt, chunk)
        dims = tuple(range(1, out.dim()))
        l_theta = (out - target).square().mean(dim=dims)
        with torch.no_grad():
            if self.needs_reference:
                with run.model.reference():
                    v_base = self._velocity(run, xt, chunk, c.kl_cfg)
            with swapped_weights(self.params, self.old):
                v_old = self._velocity(run, xt, chunk)
            l_old = (v_old - target).square().mean(dim=dims)
            l_ref = l_old if c.use_ema_ref else (v_base - target).square().mean(dim=dims)
        clip = self.cfg.train.adv_clip_max
        adv = data.advantages.to(out.device)[chunk.sample_idx.to(out.device)].clamp(-clip, clip).repeat_interleave(K)
        groups = (chunk.sample_idx.to(out.device) // c.group_size).repeat_interleave(K) * (traj.num_steps + 1) + chunk.step_idx.reshape(-1).to(out.device)
        loss, stats = dgpo_loss(l_theta, l_ref, l_old, adv, groups, c.group_size, c.beta, c.clip_range)
        stats = {"policy_loss": loss.detach(), **stats, "matching_loss": l_theta.detach().mean()}
        if c.kl_beta > 0:
            kl = (out - v_base).square().mean()
            loss = loss + c.kl_beta * kl
            stats["kl"] = kl.detach()
        return loss, stats
