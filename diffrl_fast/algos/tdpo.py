"""TDPO and TDPO-R (Zhang et al. 2024, "Confronting Reward Overoptimization for Diffusion Models: A
Perspective of Inductive and Primacy Biases"; reference: ZiyiZhang27/tdpo, scripts/train_tdpo.py,
critic_model.py, neuron_recycler.py, config/base_tdpo.py).

TDPO replaces DDPO's trajectory-level advantage by a per-step *temporal reward* from a critic R_phi that
predicts the (per-prompt normalised) final reward from intermediate states:

    r~ = per-prompt normalised r(x_0, c)                          (the trainer's stat tracker, all processes)
    T_t = r~ - R_phi_old(x_t),   normalised over all rows of all processes (population std, eps 1e-8)
    L_pg = E[ max(-T_t rho_t, -T_t clip(rho_t, 1 - eps, 1 + eps)) ]          (no advantage clipping)
    L_V  = value_coef * E[ max((R_phi(x_t) - r~)^2, (R_phi_old + clip(R_phi - R_phi_old, +-0.2) - r~)^2) ]

R_phi_old is the critic's prediction before this epoch's updates (the reference computes it at sampling
time), so T is out-of-sample. The critic trains jointly with the policy, one critic step (AdamW, its own
gradient clipping, gradients averaged over processes) per policy step; the reference steps after every
16 (sample, timestep) rows (``train.optimizer_step_every=chunks`` with chunks of 16 samples x 1 step).
The critic (``critic.py``) is the reference's MLP on an image encoder's embedding of the decoded x_t
(``tdpo.critic=embedding``), or DPOK's value network on the latent (``latent``).

TDPO-R adds, every ``tdpo.reset_every`` epochs, the reset of the critic's active neurons
(``critic.reset_active_neurons``) measured on ``sample.batch_size`` of the epoch's (sample, step) rows
from every process.
"""
from __future__ import annotations

import torch

from ..diffusion.recompute import chunk_log_probs, trainable_steps
from ..rewards import get_reward
from .base import EpochData
from .critic import (CriticOptimizer, EmbeddingCritic, StepValueNet, clipped_value_loss, hidden_activations,
                     prompt_embedding, reset_active_neurons)
from .ddpo import DDPO


def gather_normalize(values: torch.Tensor, ctx, eps: float = 1e-8) -> torch.Tensor:
    """(v - mean) / (std + eps) with mean and population std over ``values`` of every process."""
    v = values.double()
    stats = torch.stack([v.sum(), (v * v).sum(), torch.tensor(float(v.numel()), dtype=torch.float64)])
    if ctx is not None and ctx.active:
        stats = torch.stack([torch.as_tensor(s) for s in ctx.all_gather_object(stats.tolist())]).sum(0)
    mean = stats[0] / stats[2]
    std = (stats[1] / stats[2] - mean * mean).clamp(min=0).sqrt()
    return ((v - mean) / (std + eps)).to(values.dtype)


class TemporalCritic:
    """The critic of TDPO (or DPOK's value network with ``tdpo.critic=latent``), its inputs and its optimiser."""

    def __init__(self, cfg, run) -> None:
        c = cfg.tdpo
        self.kind, self.device, self.model = c.critic, run.device, run.model
        self.embed = None
        if self.kind == "embedding":
            name = c.critic_encoder or cfg.reward.name
            if not isinstance(name, str):
                raise ValueError("tdpo.critic=embedding with a weighted sum of rewards: set tdpo.critic_encoder to the "
                                 "reward whose image encoder the critic reads (digit_confidence, aesthetic, clip_score)")
            fn = run.reward_fn if name == cfg.reward.name else get_reward(name)
            self.embed = getattr(fn, "embed", None)
            if self.embed is None:
                raise ValueError(f"tdpo.critic=embedding needs an image encoder, and reward {name!r} provides none: set "
                                 "tdpo.critic_encoder to a reward that has one (digit_confidence, aesthetic, clip_score) "
                                 "or use tdpo.critic=latent")
        with torch.random.fork_rng(devices=[]):  # the same initial critic on every process
            torch.manual_seed(cfg.seed)
            if self.kind == "embedding":
                probe = self.model.decode(torch.zeros(1, *self.model.latent_shape_for(cfg.sample.height, cfg.sample.width),
                                                      device=self.model.device))
                self.net = EmbeddingCritic(int(self.embed(probe).shape[-1]))
            else:
                shape = self.model.latent_shape_for(cfg.sample.height, cfg.sample.width)
                cond = prompt_embedding(self.model.encode_prompts([run.prompts[0]]))
                self.net = StepValueNet(int(torch.Size(shape).numel()), int(cond.shape[-1]), cfg.sample.num_steps)
        self.net.to(self.device)
        self.opt = CriticOptimizer(self.net, lr=c.critic_lr, weight_decay=c.critic_weight_decay, max_grad_norm=c.critic_max_grad_norm)

    @torch.no_grad()
    def features(self, traj, steps: torch.Tensor, batch: int = 64) -> torch.Tensor | None:
        """[B, T, d] embeddings of the decoded states x_j at the trained ``steps`` (0 elsewhere); None for the latent critic."""
        if self.embed is None:
            return None
        B, T = len(traj), traj.num_steps
        b = torch.arange(B).repeat_interleave(steps.numel())
        j = steps.repeat(B)
        out = None
        for i in range(0, b.numel(), batch):
            x = traj.latents_at(b[i:i + batch], j[i:i + batch]).to(self.model.device)
            e = self.embed(self.model.decode(x.to(self.model.dtype))).float().cpu()
            if out is None:
                out = torch.zeros(B, T, e.shape[-1])
            out[b[i:i + batch], j[i:i + batch]] = e
        return out

    def inputs(self, traj, feats, b: torch.Tensor, j: torch.Tensor) -> tuple:
        """The critic's inputs for rows (sample b, step j)."""
        if self.kind == "embedding":
            return (feats[b, j].to(self.device),)
        x = traj.latents_at(b, j).to(self.device)
        return (x, prompt_embedding(traj.cond.index(b.to(traj.cond.hidden.device))).to(self.device), j.to(self.device))

    @torch.no_grad()
    def predict(self, traj, feats, b: torch.Tensor, j: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        self.net.eval()
        return torch.cat([self.net(*self.inputs(traj, feats, b[i:i + batch], j[i:i + batch])).float().cpu()
                          for i in range(0, b.numel(), batch)])


class TDPO(DDPO):
    name = "tdpo"
    reference = "ZiyiZhang27/tdpo: scripts/train_tdpo.py, critic_model.py, neuron_recycler.py, config/base_tdpo.py"

    @classmethod
    def reference_defaults(cls, n_prompts):
        return {"train.learning_rate": 1e-4, "sample.batch_size": 8, "sample.num_batches_per_epoch": 4,
                "train.batch_size": 16, "train.chunk_size": 1, "train.gradient_accumulation_steps": 1,
                "train.optimizer_step_every": "chunks", "advantage.buffer_size": 32, "advantage.min_count": 16}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.critic: TemporalCritic | None = None
        self.recent: tuple | None = None

    @property
    def adv_clip(self):
        return self.cfg.tdpo.adv_clip_max

    def setup(self, run) -> None:
        self.critic = TemporalCritic(self.cfg, run)

    def prepare(self, run, traj, rewards):
        returns = run.advantages(traj.prompts, rewards).float()  # per-prompt normalised: the critic's target
        steps = trainable_steps(traj)
        B, T = len(traj), traj.num_steps
        b = torch.arange(B).repeat_interleave(steps.numel())
        j = steps.repeat(B)
        feats = self.critic.features(traj, steps)
        v_old = torch.zeros(B, T)
        v_old[b, j] = self.critic.predict(traj, feats, b, j)  # before any update on this epoch's data: out-of-sample
        temporal = gather_normalize(returns[b] - v_old[b, j], run.dist)
        adv = torch.zeros(B, T)
        adv[b, j] = temporal
        residual = returns[b] - v_old[b, j]
        log = {"critic_mse": float(residual.square().mean()),
               "critic_explained_var": float(1 - residual.var(unbiased=False) / returns[b].var(unbiased=False).clamp(min=1e-12))}
        keep = torch.randperm(b.numel(), generator=run.generator(run.epoch, 10))[: self.cfg.sample.batch_size]
        self.recent = (traj, feats, b[keep], j[keep])
        return EpochData(adv, {"returns": returns, "v_old": v_old, "features": feats, "traj": traj, "log": log})

    def chunk_loss(self, run, chunk, data, ctx=None):
        logp = chunk_log_probs(run.model, chunk, autocast_dtype=run.autocast_dtype)
        out = self.pg_loss(logp, chunk, data.advantages)
        # the critic's update on the same rows, backpropagated here (its graph is separate from the policy's)
        n, K = chunk.shape
        b, j = chunk.sample_idx.repeat_interleave(K), chunk.step_idx.reshape(-1)
        self.critic.net.train()
        v = self.critic.net(*self.critic.inputs(data.extra["traj"], data.extra["features"], b, j))
        c = self.cfg.tdpo
        target = data.extra["returns"][b].to(v.device)
        value_loss = c.value_coef * clipped_value_loss(v, data.extra["v_old"][b, j].to(v.device), target, c.value_clip)
        (value_loss * chunk.weight).backward()
        return out.loss, {"clipfrac": out.clipfrac, "approx_kl": out.approx_kl, "ratio": out.ratio_mean,
                          "value_loss": value_loss.detach()}

    def after_optimizer_step(self, run, finite):
        self.critic.opt.step(run.dist)

    def state_dict(self):
        return {"critic": self.critic.opt.state_dict()} if self.critic is not None else {}

    def load_state_dict(self, state):
        if state.get("critic") is not None:
            self.critic.opt.load_state_dict(state["critic"])


class TDPO_R(TDPO):
    name = "tdpo_r"

    def after_epoch(self, run, epoch):
        if self.recent is None or (epoch + 1) % self.cfg.tdpo.reset_every:
            return {}
        traj, feats, b, j = self.recent
        acts = hidden_activations(self.critic.net, *self.critic.inputs(traj, feats, b, j))
        if run.dist.active:  # every process decides on the activations of all processes' rows
            parts = run.dist.all_gather_object([a.cpu() for a in acts])
            acts = [torch.cat([p[i] for p in parts]) for i in range(len(acts))]
        masks = reset_active_neurons(self.critic.net, self.critic.opt.optimizer, acts, self.cfg.tdpo.reset_threshold,
                                     run.generator(epoch, 11))
        self.recent = None
        return {"critic_reset_neurons": int(sum(int(m.sum()) for m in masks))}
