"""The dense-reward view of preference alignment (Yang et al., ICML 2024, "A Dense Reward View on Aligning
Text-to-Image Diffusion with Preference"): a temporally discounted trajectory-level DPO loss.

For K >= 2 samples of a prompt ranked by preference, with h_t^k = log pi_theta(a_t^k | s_t^k) -
log pi_I(a_t^k | s_t^k) (pi_I the initial policy, i.e. the reference; this log-ratio is the KL term
that keeps the policy near it):

    e_k = E_{t ~ Cat(gamma^t)} [ h_t^k ]          (t = 0 is the first, noisiest denoising step)
    L   = -log sigmoid( C (e_1 - e_2) )           (K = 2),  Plackett-Luce over C e_k for K > 2

``dense.ratio_clip`` clamps each step's log-ratio to [log(1-c), log(1+c)] before the average, D3PO's
per-step trust region (without one, online training drives the log-ratios apart and the reward collapses).
``dense.kl_coef`` adds lambda E_t[KL(p_theta || p_I)] on the trained steps (fused ``step_kl``), a trust
region for the online setting, where the log-ratios are otherwise unbounded.
``dense.timestep_sampling``: "discounted" draws each group's trained steps with probability gamma^t and
averages them; "weighted" draws them uniformly and weights them by gamma^t. Because e_k sums over
timesteps inside the sigmoid, the loss couples a trajectory's steps: each minibatch is evaluated once
without gradients to get dL/dh for every (sample, step) row, then every chunk backpropagates the
surrogate sum(dL/dh * h), whose gradient is exactly dL/dtheta, with the memory of one chunk.
"""
from __future__ import annotations

import math

import torch

from ..diffusion.recompute import pack_chunk, step_logprob_of
from ..ops import plackett_luce_loss
from .base import Algorithm, EpochData
from .common import chunk_kl, group_ranking, policy_outputs, reference_logp


class Dense(Algorithm):
    name = "dense"
    needs_reference = True

    def _step_weights(self, steps: torch.Tensor) -> torch.Tensor:
        return self.cfg.dense.gamma ** steps.double()

    def step_order(self, n, steps, n_train, generator):
        G = self.samples_per_prompt
        if self.cfg.dense.timestep_sampling == "discounted":
            probs = self._step_weights(steps)
            per_group = torch.stack([steps[torch.multinomial(probs, n_train, replacement=False, generator=generator)]
                                     for _ in range(n // G)])
            return per_group.repeat_interleave(G, dim=0)
        return super().step_order(n, steps, n_train, generator)

    def prepare(self, trainer, traj, rewards):
        return EpochData(None, {"ranking": group_ranking(rewards, self.samples_per_prompt)})

    def _row_weights(self, order: torch.Tensor) -> torch.Tensor:
        if self.cfg.dense.timestep_sampling == "discounted":
            w = torch.ones(order.shape, dtype=torch.float64)
        else:
            w = self._step_weights(order)
        return (w / w.sum(1, keepdim=True)).float()

    def begin_minibatch(self, trainer, traj, sample_idx, order, data):
        """First pass: h for every (sample, step) row of the minibatch, the loss, and dL/dh."""
        K = self.cfg.train.chunk_size
        h = torch.empty(order.shape)
        ref = torch.empty(order.shape)
        with torch.no_grad():
            for k0 in range(0, order.shape[1], K):
                chunk = pack_chunk(traj, sample_idx, order[:, k0:k0 + K], trainer.device)
                r = reference_logp(trainer, chunk)
                eps_u, eps_c = policy_outputs(trainer, chunk)
                h[:, k0:k0 + K] = (step_logprob_of(chunk, eps_u, eps_c) - r).float().cpu()
                ref[:, k0:k0 + K] = r.float().cpu()
        G = self.samples_per_prompt
        pos = {int(s): i for i, s in enumerate(sample_idx)}
        ranking = data.extra["ranking"]
        groups = [g for g in ranking.tolist() if g[0] in pos]  # the minibatch holds whole groups
        rows = torch.tensor([[pos[s] for s in g] for g in groups])  # [n_groups, G], best first
        leaf = h.clone().requires_grad_()
        hc = leaf
        if self.cfg.dense.ratio_clip is not None:  # D3PO's per-step trust region: no gradient beyond the clamp
            c = self.cfg.dense.ratio_clip
            hc = leaf.clamp(math.log(1 - c), math.log(1 + c))
        e = (self._row_weights(order) * hc).sum(1)  # e_k of each sample
        loss = plackett_luce_loss(e[rows], temperature=self.cfg.dense.temperature)
        loss.backward()
        margin = (e[rows[:, 0]] - e[rows[:, G - 1]]).detach()
        return {"dh": leaf.grad, "ref": ref, "pos": pos, "order": order, "loss": loss.detach(), "rows": h.numel(),
                "accuracy": (margin > 0).float().mean(), "margin": margin.mean()}

    def chunk_loss(self, trainer, chunk, data, ctx):
        eps_u, eps_c = policy_outputs(trainer, chunk)
        logp = step_logprob_of(chunk, eps_u, eps_c)
        rows = torch.tensor([ctx["pos"][int(s)] for s in chunk.sample_idx])
        # column of each chunk step in the minibatch's step order
        cols = (ctx["order"][rows][:, :, None] == chunk.step_idx[:, None, :]).float().argmax(1)
        ref = ctx["ref"][rows[:, None], cols].to(logp.device)
        dh = ctx["dh"][rows[:, None], cols].to(logp.device)
        surrogate = (dh * (logp - ref)).sum()
        # the trainer weights a chunk by rows / minibatch rows: undo it, the surrogate is already a minibatch sum
        scale = ctx["rows"] / chunk.step_idx.numel()
        stats = {"loss": ctx["loss"], "accuracy": ctx["accuracy"], "margin": ctx["margin"]}
        loss = surrogate * scale
        if self.cfg.dense.kl_coef > 0:  # explicit per-step KL to the initial policy on the trained steps
            kl = chunk_kl(trainer, chunk, eps_u, eps_c)
            loss = loss + self.cfg.dense.kl_coef * kl.mean()
            stats["kl"] = kl.mean().detach()
        return loss, stats
