"""Advantage Weighted Matching (Xue et al. 2025, "Advantage Weighted Matching: Aligning RL with Pretraining
in Diffusion Models"; reference: scxue/advantage_weighted_matching, scripts/train_sd3_awm.py, config/dgx_awm.py
(pickscore_sd3_no_cfg_1node), config/base_awm.py).

AWM replaces the sampler's per-step log-likelihood with the pretraining (denoising / flow-matching) loss on
the forward process. For a trained row (sample b, timestep t; see forward.py) with target u = z - x_0 (flow
matching; z for epsilon models, alpha z - sigma x_0 for v-prediction):

    m     = mean over latent elements of (out_theta(x_t, t) - u)^2
    ell   = -w(m, sigma)   "log-prob": Uniform m | t: m sigma | t**2: m sigma^2 | huber: (sqrt(m + 1e-10) - 1e-5) sigma
                           | ghuber: ((m + 1e-10)^p - 1e-10^p) sigma / p   (p = awm.ghuber_power; the reference's 0.25)
    rho   = exp(ell - ell_old)        (exp_first: per row; sum_first: exp of the means over a sample's timesteps)
    A'    = clip(A, +-c) / c * awm.advantage_max        (A: GRPO's group advantage, c = train.adv_clip_max)
    L     = mean[ max(-A' rho, -A' clip(rho, 1 - eps, 1 + eps)) ]
            + awm.beta * mean[ |out_theta - out_ref|^2 ]  + awm.ema_beta * mean[ |out_theta - out_ema|^2 ]

sigma is the forward process's noise level (flow matching: t / 1000, the reference's "timestep"; epsilon and
v models: sqrt(1 - abar_t), our extension). ell_old is ell under the weights at the start of the epoch, on the
same x_t: with the reference's one optimiser step per epoch rho = 1 and the policy term's gradient is
-A' grad ell. Timesteps: awm.train_timesteps rollout steps per training minibatch, one per stratum of
[0, int(T x train.timestep_fraction)) (``awm.time_type``), shared by the minibatch's samples. The EMA copy
follows the policy after every epoch: ema <- d ema + (1 - d) theta, d = min(awm.ema_decay, 0.001 step)
(``linear``) or awm.ema_decay (``constant``). As in the reference the EMA term only applies with awm.beta > 0.

Named differences from the reference: the deterministic rollout is DDIM (eta = 0) or the flow ODE's Euler step,
not the SA-Solver; the reference's second EMA of the weights, kept for evaluation only, is not kept.
"""
from __future__ import annotations

import math

import torch

from ..diffusion.coefficients import denoising_target
from ..diffusion.rollout import guided_outputs
from ..ops import PPOLoss, ppo_clip_loss
from .common import swapped_weights
from .forward import ForwardProcessAlgorithm

WEIGHTINGS = ("Uniform", "t", "t**2", "huber", "ghuber")
TIME_TYPES = ("discrete", "discrete_wo_init", "discrete_with_init")
LOSS_TYPES = ("exp_first", "sum_first")


def awm_log_prob(out: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, weighting: str = "ghuber",
                 power: float = 0.25) -> torch.Tensor:
    """AWM's per-row "log-prob" ell = -w(m, sigma), m = mean over elements of (out - target)^2 ([N]; formula
    in the module docstring), computed in float64 as the reference does."""
    m = (out.double() - target.double()).square().mean(dim=tuple(range(1, out.dim())))
    s = sigma.to(m)
    if weighting == "Uniform":
        return -m
    if weighting == "t":
        return -m * s
    if weighting == "t**2":
        return -m * s**2
    if weighting == "huber":
        return -(torch.sqrt(m + 1e-10) - 1e-5) * s
    if weighting == "ghuber":
        return -((m + 1e-10) ** power - 1e-10**power) * s / power
    raise ValueError(f"awm.weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def awm_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                    loss_type: str = "exp_first") -> PPOLoss:
    """AWM's clipped surrogate over [n, K] rows (n samples x K timesteps), advantages [n] already clipped and
    scaled: PPO's mean of max(-A rho, -A clip(rho)) (``ops.ppo_clip_loss``, no further advantage clip) with
    rho = exp(ell - ell_old) per row (exp_first), or per sample from the means over its timesteps (sum_first)."""
    if loss_type == "exp_first":
        logp, old, adv = log_prob, old_log_prob, advantages[:, None].expand_as(log_prob)
    elif loss_type == "sum_first":
        logp, old, adv = log_prob.mean(dim=1), old_log_prob.mean(dim=1), advantages
    else:
        raise ValueError(f"awm.loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return ppo_clip_loss(logp, old, adv, clip_range=clip_range, adv_clip=None)


def stratified_steps(num_steps: int, n: int, fraction: float, time_type: str, generator: torch.Generator) -> torch.Tensor:
    """The reference's discrete timestep draw: n rollout step indices, one uniformly inside each of n strata
    of [lo, int(num_steps x fraction)) with strata bounds linspace(lo, hi, n + 1) truncated to integers;
    lo = 0 (discrete) or 1 (discrete_wo_init); discrete_with_init is step 0 followed by n - 1 strata from 1."""
    hi = int(num_steps * fraction)
    if time_type == "discrete_with_init":
        head, n, lo = [0], n - 1, 1
    elif time_type in ("discrete", "discrete_wo_init"):
        head, lo = [], 0 if time_type == "discrete" else 1
    else:
        raise ValueError(f"awm.time_type must be one of {TIME_TYPES}, got {time_type!r}")
    if n > 0 and hi - lo < n:
        raise ValueError(f"awm.train_timesteps={n + len(head)} strata do not fit in steps [{lo}, {hi}) of a "
                         f"{num_steps}-step rollout (train.timestep_fraction={fraction}): lower awm.train_timesteps or "
                         "raise sample.num_steps")
    if n == 0:
        return torch.tensor(head, dtype=torch.long)
    bounds = torch.linspace(lo, hi, n + 1).long()
    u = torch.rand(n, generator=generator)
    idx = bounds[:-1] + (u * (bounds[1:] - bounds[:-1])).long()
    return torch.cat([torch.tensor(head, dtype=torch.long), idx])


def ema_decay(step: int, decay: float, decay_type: str) -> float:
    """The reference's decay of the EMA copy after an epoch at optimiser step ``step``."""
    return decay if decay_type == "constant" else min(decay, 0.001 * step)


class AWM(ForwardProcessAlgorithm):
    name = "awm"
    reference = "scxue/advantage_weighted_matching: scripts/train_sd3_awm.py, config/dgx_awm.py (pickscore_sd3_no_cfg_1node), config/base_awm.py"
    noise_stream = 31

    @classmethod
    def group_size(cls, cfg):
        return cfg.awm.group_size

    @classmethod
    def reference_defaults(cls, n_prompts):
        # SD3.5 pickscore config: 14 deterministic steps without guidance, 24 images per prompt, 24 prompts per
        # epoch (576 samples: 8 GPUs x 6 x 12; here 24 x 24 on one process, to be divided by the process count),
        # training batches of 2, one optimiser step per epoch (gradient accumulation over the epoch), lr 3e-4,
        # timesteps from the first int(0.9 T) steps
        return {"sample.num_steps": 14, "sample.guidance_scale": 1.0, "sample.batch_size": 24,
                "sample.num_batches_per_epoch": 24, "train.batch_size": 2, "train.optimizer_step_every": "round",
                "train.learning_rate": 3e-4, "train.timestep_fraction": 0.9}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.c = cfg.awm
        self.needs_reference = self.c.beta > 0
        self._perm: torch.Tensor | None = None
        self._start: list[torch.Tensor] | None = None
        self._steps0 = 0

    def check_model(self, model) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if self.c.beta > 0 and "ELBO" in (self.c.kl_weight, self.c.ema_kl_weight) and not isinstance(model.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError("awm.kl_weight=ELBO uses the flow-matching SDE's std_dev_t and needs a flow model; "
                             f"{model.kind} samples with {type(model.scheduler).__name__}: use Uniform")

    def num_train_steps(self, stochastic_steps: int) -> int:
        return self.c.train_timesteps

    def sample_order(self, n, data, generator):
        # the reference shuffles all of the epoch's samples, across prompt groups, before cutting minibatches
        self._perm = torch.randperm(n, generator=generator)
        return self._perm

    def step_order(self, n, steps, n_train, generator):
        # one stratified draw per training minibatch, shared by its samples (the reference's per-batch draw)
        perm = self._perm if self._perm is not None and self._perm.numel() == n else torch.arange(n)
        out = torch.empty(n, n_train, dtype=torch.long)
        for mb in perm.split(self.cfg.train.batch_size):
            out[mb] = steps[stratified_steps(steps.numel(), n_train, self.cfg.train.timestep_fraction, self.c.time_type, generator)]
        return out

    def old_decay(self, step: int) -> float:
        return ema_decay(step, self.c.ema_decay, self.c.ema_decay_type)

    def prepare(self, run, traj, rewards):
        data = super().prepare(run, traj, rewards)
        self._steps0 = run.optimizer_steps
        t = self.cfg.train
        n_train = self.num_train_steps(traj.num_steps)
        n_chunks = math.ceil(n_train / min(t.chunk_size, n_train))
        steps = t.num_inner_epochs * len(run.step_groups(math.ceil(len(traj) / t.batch_size), n_chunks))
        # ell_old is taken under the epoch's starting weights; a copy is needed only when the epoch takes
        # more than one optimiser step (the reference's configs take one: rho = 1)
        self._start = [p.detach().clone() for p in self.params] if steps > 1 else None
        return data

    def _outputs(self, run, xt, chunk):
        return guided_outputs(run.model, xt, chunk.t, chunk.cond, None, run.autocast_dtype)[0]

    def chunk_loss(self, run, chunk, data, ctx=None):
        c, traj = self.c, data.extra["traj"]
        n, K = chunk.shape
        x0, z, xt, alpha, sigma, _, _ = self.noised(run, chunk, traj)
        target = denoising_target(run.model.scheduler, alpha, sigma, x0, z)
        out = self._outputs(run, xt, chunk)
        sig = sigma.to(out.device)
        ell = awm_log_prob(out, target, sig, c.weighting, c.ghuber_power).reshape(n, K)
        if run.optimizer_steps == self._steps0:
            ell_old = ell.detach()
        else:
            with torch.no_grad(), swapped_weights(self.params, self._start):
                ell_old = awm_log_prob(self._outputs(run, xt, chunk), target, sig, c.weighting, c.ghuber_power).reshape(n, K)
        clip = self.cfg.train.adv_clip_max
        adv = data.advantages.to(out.device)[chunk.sample_idx.to(out.device)].clamp(-clip, clip)
        if c.advantage_max is not None:
            adv = adv / clip * c.advantage_max
        ppo = awm_policy_loss(ell, ell_old, adv, c.clip_range, c.loss_type)
        loss = ppo.loss
        stats = {"policy_loss": loss.detach(), "clipfrac": ppo.clipfrac, "approx_kl": ppo.approx_kl,
                 "matching_loss": (out.detach() - target).square().mean()}
        if c.beta > 0:
            std2 = 2 * (0.7**2) * (sig / (1 - sig.clamp(0, 0.99)))  # 2 std_dev_t^2 of the reference's ELBO weight

            def kl(other, weight):
                d = (out - other).square().mean(dim=tuple(range(1, out.dim())))
                return (d / std2.to(d) if weight == "ELBO" else d).mean()

            with torch.no_grad(), run.model.reference():
                out_ref = self._outputs(run, xt, chunk)
            kl_ref = kl(out_ref, c.kl_weight)
            loss = loss + c.beta * kl_ref
            stats["kl"] = kl_ref.detach()
            if c.ema_beta > 0:
                with torch.no_grad(), swapped_weights(self.params, self.old):
                    out_ema = self._outputs(run, xt, chunk)
                kl_ema = kl(out_ema, c.ema_kl_weight)
                loss = loss + c.ema_beta * kl_ema
                stats["ema_kl"] = kl_ema.detach()
        return loss, stats
