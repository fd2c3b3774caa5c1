"""Group-relative policy optimisation on the denoising MDP, as Flow-GRPO runs it (Liu et al. 2025,
"Flow-GRPO: Training Flow Matching Models via Online RL"; reference: yifan123/flow_grpo, scripts/train_sd3.py,
config/grpo.py, flow_grpo/stat_tracking.py; DanceGRPO, Xue et al. 2025, is the same objective).

G samples per prompt form a group. With all the epoch's rewards of every process:

    A_i = (r_i - mean_{prompt(i)}(r)) / (std(r) + 1e-4)          std over the whole epoch (``grpo.std=global``,
                                                                 Flow-GRPO's global_std) or the prompt's group
    L   = E[ max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) ] + beta E_t[ KL_t ]       (A clipped to +-5)

The per-prompt mean pools every sample of a prompt in the epoch, as Flow-GRPO's stat tracker does. The
KL is Flow-GRPO's mean over latent elements of |mean_theta - mean_ref|^2 / (2 std_t^2), std_t the SDE's
noise scale without sqrt(|dt|) (``grpo.kl_form=flow_grpo``, flow models only), or the exact Gaussian KL
(``exact``, any sampler). The first int(0.99 T) steps of every trajectory are trained (``grpo.train_steps``).
Samples with advantage 0 (a prompt whose samples all scored the same) are dropped before training, as
flow_grpo's train_sd3.py does (``zero_advantage_mask``; ``grpo.drop_zero_advantage=false`` keeps them): with
binary rewards they would otherwise scale the gradient by N_kept / N.

Tree rollouts (``sample.tree_branch_steps``; BranchGRPO, Li et al. 2025): a group is one tree whose leaves share
their trajectory up to each branch step; each distinct transition is trained once, with BranchGRPO's node advantage
of the node it leads to (``diffusion.tree.node_advantages``: leaf rewards fused into node rewards, normalised per
tree and level, or by the tree's leaves with ``sample.tree_advantage_norm=leaves``), in place of A_i above; grpo.std and the zero-advantage drop do not apply.

GRPO-Guard (``grpo.guard``; Wang et al. 2025, reference: yifan123/flow_grpo, scripts/train_sd3_GRPO_Guard.py,
config/grpo_guard.py, ``config.rationorm``) replaces rho and weighs each step: with s_t = std_t sqrt(dt) the step's std,
mean_old the rollout policy's step mean (``Trajectory.means``),

    log rho~ = (log p_theta - log p_old + mean_elements |mean_theta - mean_old|^2 / (2 s_t^2)) x s_t      (RatioNorm)
    L_t      = mean( max(-A rho~, -A clip(rho~, 1 - eps, 1 + eps)) ) / dt                        (reweighting)

(the bias term cancels the quadratic part of the Gaussian log-ratio, which pushes the clipped ratio's mean below 1, and
1/dt evens out the steps' gradient scales); the KL term is unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..diffusion.tree import node_advantages, prune_depths, prune_mask
from ..ops import ppo_clip_loss, step_mean
from .base import EpochData
from .common import rows_of
from ..train.advantages import group_normalize
from .ddpo import PolicyGradientWithKL


def grpo_advantages(prompts: Sequence[str], rewards: torch.Tensor, std: str = "global", eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of r over the samples of the same prompt) / (std + eps), std over all ``rewards``
    ("global") or over the prompt's samples ("group"); population std, as numpy's (train.advantages.group_normalize)."""
    return group_normalize(rewards, list(prompts), std=std, eps=eps)


class GRPO(PolicyGradientWithKL):
    name = "grpo"
    reference = "yifan123/flow_grpo: scripts/train_sd3.py, config/grpo.py (general_ocr_sd3, geneval_sd3), flow_grpo/stat_tracking.py"

    @classmethod
    def group_size(cls, cfg):
        return cfg.grpo.group_size

    @classmethod
    def reference_defaults(cls, n_prompts):
        # SD3.5 configs (config/grpo.py, 32 GPUs): 10 SDE steps (noise level 0.7), g = 4.5, 48 prompts x 24 images =
        # 1152 per epoch, 576 per optimiser step (2 per epoch). Here on one process: 48 rollout batches of one group,
        # minibatches of a group, 24 per step; with N processes divide sample.num_batches_per_epoch and
        # train.gradient_accumulation_steps by N (configs/sd3.yaml does for 8)
        return {"sample.num_steps": 10, "sample.guidance_scale": 4.5, "sample.batch_size": 24, "sample.num_batches_per_epoch": 48,
                "train.batch_size": 24, "train.gradient_accumulation_steps": 24, "train.timestep_fraction": 0.99}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        c = cfg.grpo
        self.beta, self.kl_form, self.detach_uncond = c.beta, c.kl_form, c.detach_uncond
        self.needs_reference = self.beta > 0
        self.shares_initial_noise = c.same_initial_noise
        self.guard = self.needs_rollout_means = c.guard

    def check_model(self, model) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if self.guard and not isinstance(model.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"grpo.guard (GRPO-Guard) reweights Flow-GRPO's SDE steps by their dt, but {model.kind} samples "
                             f"with {type(model.scheduler).__name__}: set grpo.guard=false")

        if self.detach_uncond and getattr(model, "nonlinear_guidance", False):
            raise ValueError(f"grpo.detach_uncond detaches the unconditional branch of linear guidance, but {model.kind} combines "
                             f"the two branches nonlinearly before the step (model.guide): set grpo.detach_uncond=false")
        if self.beta > 0 and self.kl_form == "flow_grpo" and not isinstance(model.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"grpo.kl_form=flow_grpo is Flow-GRPO's KL of flow-matching SDE steps, but {model.kind} samples "
                             f"with {type(model.scheduler).__name__}: set grpo.kl_form=exact (or grpo.beta=0)")

    def pg_loss(self, logp, chunk, advantages, outputs=None):
        if not self.guard:
            return super().pg_loss(logp, chunk, advantages, outputs)
        log_ratio, dt = guard_log_ratio(logp, chunk, *outputs)
        adv = rows_of(advantages.to(logp.device), chunk).clamp(-self.adv_clip, self.adv_clip) / dt.reshape(logp.shape)
        old = chunk.old_log_probs.to(logp.dtype)
        return ppo_clip_loss(old + log_ratio, old, adv, clip_range=self.cfg.train.clip_range, adv_clip=None)

    def step_order(self, n, steps, n_train, generator):
        if self.cfg.grpo.train_steps == "first":  # Flow-GRPO trains steps 0 .. int(0.99 T) - 1 of every trajectory
            return steps[:n_train].repeat(n, 1)
        return super().step_order(n, steps, n_train, generator)

    def candidate_steps(self, traj) -> torch.Tensor:
        """The steps training may use this epoch: the first n_train with train_steps=first (``step_order``), else
        every stochastic step (a random per-sample subset is drawn later)."""
        steps = self.train_steps(traj)
        if self.cfg.grpo.train_steps == "first":
            return self.step_order(1, steps, self.num_train_steps(steps.numel()), None)[0]
        return steps

    def group_advantages(self, run, traj, rewards) -> torch.Tensor:
        """This process's samples' advantages, from the statistics of every process's rewards."""
        c = self.cfg.grpo
        if not run.dist.active:
            return grpo_advantages(traj.prompts, rewards, c.std, c.eps)
        parts = run.dist.all_gather_object((list(traj.prompts), rewards.tolist()))
        adv = grpo_advantages([p for ps, _ in parts for p in ps], torch.tensor([r for _, rs in parts for r in rs]), c.std, c.eps)
        start = sum(len(ps) for ps, _ in parts[: run.dist.rank])
        return adv[start:start + len(traj)]

    def prepare(self, run, traj, rewards):
        if traj.tree is not None:  # tree rollouts: BranchGRPO's node advantages, [B, T]; every leaf trains (its
            s = self.cfg.sample     # owned transitions are other leaves' shared prefix)
            adv = node_advantages(traj.tree, rewards, traj.num_steps, fusion=s.tree_reward_fusion, edge_logp=traj.log_probs,
                                  advantage_norm=s.tree_advantage_norm)
            pruning = s.tree_prune_width or s.tree_prune_depths
            if not pruning or run.epoch + 1 > int(self.cfg.num_epochs * s.tree_prune_until):
                return EpochData(adv)
            depths = prune_depths(s.tree_prune_depths, run.epoch, s.tree_prune_depth_slide_every, traj.tree.branch_steps)
            trained = self.candidate_steps(traj)
            keep = prune_mask(traj.tree, adv, trained, width_mode=s.tree_prune_width, width_ratio=s.tree_prune_width_ratio,
                              depths=depths)
            owned = traj.tree.batch(len(traj), traj.num_steps)[1][:, trained]
            return EpochData(adv, {"tree_keep": keep, "log": {"tree_pruned": int(owned.sum() - keep[:, trained].sum())}})
        adv = self.group_advantages(run, traj, rewards)
        if not self.cfg.grpo.drop_zero_advantage:
            return EpochData(adv)
        n_minibatches = -(-len(traj) // self.cfg.train.batch_size)
        keep = zero_advantage_mask(adv, n_minibatches, run.generator(run.epoch, 40, run.dist.rank))
        return EpochData(adv, {"keep": keep, "log": {"zero_adv_dropped": int((~keep).sum())}})

    def minibatches(self, order, data):
        keep = data.extra.get("keep")
        if keep is None:
            return super().minibatches(order, data)
        # as many minibatches as planned, each smaller (flow_grpo's rule; the kept count divides by their number)
        return list(order[keep[order]].tensor_split(-(-len(order) // self.cfg.train.batch_size)))


def zero_advantage_mask(adv: torch.Tensor, n_minibatches: int, generator: torch.Generator) -> torch.Tensor:
    """[B] bool: the samples flow_grpo's train_sd3.py trains on. Those with advantage exactly 0 (a prompt whose
    samples all scored the same) are dropped; then dropped ones, drawn at random, are put back until the kept count
    is a multiple of the epoch's minibatches (at least one each), which it keeps: smaller minibatches, not fewer."""
    keep = adv.reshape(len(adv), -1).abs().sum(1) != 0
    short = -int(keep.sum()) % n_minibatches or (n_minibatches if not bool(keep.any()) else 0)
    dropped = torch.nonzero(~keep).flatten()
    keep[dropped[torch.randperm(len(dropped), generator=generator)[:short]]] = True
    return keep


def guard_log_ratio(logp: torch.Tensor, chunk, eps_u: torch.Tensor, eps_c) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO-Guard's RatioNorm log-ratio of the chunk's rows and each row's dt (flow_grpo, train_sd3_GRPO_Guard.py):

        log rho~ = (log p_theta - log p_old + mean_elements (mean_theta - mean_old)^2 / (2 s^2)) x s,   dt = (s / std_t)^2

    s the step's std (``chunk.coef.s``), std_t Flow-GRPO's std_dev_t (``chunk.sde_std``), mean_old the rollout's step
    mean (``chunk.old_mean``). Returns ([n, K], [n*K])."""
    if chunk.old_mean is None or chunk.sde_std is None:
        raise ValueError("GRPO-Guard needs the rollout's step means and Flow-GRPO's SDE (Trajectory.means, sde_std)")
    c = chunk.coef
    g = chunk.guidance_scale if eps_c is not None else 1.0
    mean = step_mean(chunk.x, eps_u, eps_c, c.a, c.b, g, clip_x0=c.clip_x0, latent_dims=chunk.x.dim() - 1)
    s = c.s.to(mean.dtype)
    bias = (mean - chunk.old_mean.to(mean.dtype)).square().flatten(1).mean(1) / (2 * s.square())
    old = chunk.old_log_probs.to(logp.dtype)
    log_ratio = (logp - old + bias.reshape(logp.shape).to(logp.dtype)) * s.reshape(logp.shape).to(logp.dtype)
    dt = (c.s / chunk.sde_std).square().to(logp.dtype)
    return log_ratio, dt
