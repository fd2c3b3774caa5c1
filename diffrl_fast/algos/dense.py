"""The dense-reward view of preference alignment (Yang et al., ICML 2024, "A Dense Reward View on Aligning
Text-to-Image Diffusion with Preference"; reference: Shentao-YANG/Dense_Reward_T2I,
preference_based_policy_learner.py, train_t2i.py, parse_args.py): a temporally discounted
trajectory-level DPO loss.

For K >= 2 samples of a prompt ranked by reward, with h_t^k = log pi_theta(a_t^k | s_t^k) - log pi_I(a_t^k | s_t^k)
(pi_I the initial policy, i.e. the reference; log-probs averaged over latent elements):

    t_1..t_N ~ Cat(gamma^t / sum_t gamma^t), drawn with replacement, shared by a prompt's samples
                                                          (t = 0 is the first, noisiest denoising step)
    e_k = (1/N) sum_n clamp(h_{t_n}^k, -c, c)             (an unbiased estimate of E_{t ~ Cat(gamma^t)}[h_t^k])
    L   = -log sigmoid( C (e_1 - e_2) )                   (K = 2),  Plackett-Luce over C e_k for K > 2
                                                          (both: ``ops.trajectory_dpo_loss``)

The reference's settings depend on the prompts: one prompt C = 10, c = 1e-4, N = 3; several C = 12.5,
c = 5e-4, N = 1 (``reference_defaults``). Options: ``dense.timestep_sampling=weighted`` draws N distinct
steps uniformly and weights them by gamma^t (the same expectation); ``dense.kl_coef`` adds
lambda E_t[KL(p_theta || p_I)] on the trained steps (not in the reference).

The reference trains off-policy from a replay buffer refreshed every 2500-4000 optimiser steps; this
trainer is on-policy: each epoch's samples are used for ``train.num_inner_epochs`` passes, then replaced.

Because e_k sums over timesteps inside the sigmoid, the loss couples a trajectory's steps: each
minibatch is evaluated once without gradients to get dL/dh for every (sample, step) row, then every
chunk backpropagates the surrogate sum(dL/dh * h), whose gradient is exactly dL/dtheta, with the memory
of one chunk.
"""
from __future__ import annotations

import torch

from ..diffusion.recompute import pack_chunk, step_logprob_of
from ..ops import trajectory_dpo_loss
from .base import Algorithm, EpochData
from .common import chunk_kl, group_ranking, policy_outputs, reference_logp


class Dense(Algorithm):
    name = "dense"
    reference = "Shentao-YANG/Dense_Reward_T2I: preference_based_policy_learner.py, train_t2i.py, parse_args.py"
    needs_reference = True

    @classmethod
    def group_size(cls, cfg):
        return cfg.dense.samples_per_prompt

    def num_train_steps(self, stochastic_steps):
        # the reference's draws per pair (with replacement), or int(fraction x T) distinct steps when unset
        n = self.cfg.dense.num_timesteps
        return n if n is not None else super().num_train_steps(stochastic_steps)

    @classmethod
    def reference_defaults(cls, n_prompts):
        common = {"sample.guidance_scale": 7.5, "train.gradient_accumulation_steps": 1}
        if n_prompts <= 1:  # parse_args.py defaults (single_flag = 1): 4 pairs per optimiser step
            return {**common, "dense.temperature": 10.0, "dense.log_ratio_clip": 1e-4, "dense.num_timesteps": 3,
                    "train.learning_rate": 3e-5, "train.adam_weight_decay": 2e-3, "train.max_grad_norm": 1.0,
                    "train.batch_size": 8, "sample.batch_size": 8, "sample.num_batches_per_epoch": 1}
        # several prompts (single_flag = 0 overrides): 32 pairs per optimiser step
        return {**common, "dense.temperature": 12.5, "dense.log_ratio_clip": 5e-4, "dense.num_timesteps": 1,
                "train.learning_rate": 2e-5, "train.adam_weight_decay": 1.5e-3, "train.max_grad_norm": 0.05,
                "train.batch_size": 64, "sample.batch_size": 64, "sample.num_batches_per_epoch": 1}

    def _step_weights(self, steps: torch.Tensor) -> torch.Tensor:
        return self.cfg.dense.gamma ** steps.double()

    def step_order(self, n, steps, n_train, generator):
        G = self.samples_per_prompt
        if self.cfg.dense.timestep_sampling == "discounted":  # with replacement, p ∝ gamma^t
            probs = self._step_weights(torch.arange(steps.numel()))  # t counts the stochastic steps from the first
            per_group = torch.stack([steps[torch.multinomial(probs, n_train, replacement=True, generator=generator)]
                                     for _ in range(n // G)])
            return per_group.repeat_interleave(G, dim=0)
        return super().step_order(n, steps, n_train, generator)

    def prepare(self, run, traj, rewards):
        return EpochData(None, {"ranking": group_ranking(rewards, self.samples_per_prompt)})

    def _row_weights(self, order: torch.Tensor) -> torch.Tensor:
        """[n, N] float64 weights of the drawn steps in e_k: 1/N for draws from Cat(gamma^t), normalised gamma^t of
        N distinct steps otherwise."""
        if self.cfg.dense.timestep_sampling == "discounted":
            w = torch.ones(order.shape, dtype=torch.float64)
        else:
            w = self._step_weights(order)
        return w / w.sum(1, keepdim=True)

    def begin_minibatch(self, run, traj, sample_idx, order, data):
        """First pass: h for every (sample, drawn step) of the minibatch, the loss (ops.trajectory_dpo_loss), and
        dL/dh = dL/dlog pi_theta."""
        K = self.cfg.train.chunk_size
        logp = torch.empty(order.shape, dtype=torch.float64)  # float64 copies: logp - ref is the float32 difference
        ref = torch.empty(order.shape, dtype=torch.float64)
        with torch.no_grad():
            for k0 in range(0, order.shape[1], K):
                chunk = pack_chunk(traj, sample_idx, order[:, k0:k0 + K], run.device)
                r = reference_logp(run, chunk)
                eps_u, eps_c = policy_outputs(run, chunk)
                logp[:, k0:k0 + K] = step_logprob_of(chunk, eps_u, eps_c).float().double().cpu()
                ref[:, k0:k0 + K] = r.float().double().cpu()
        G = self.samples_per_prompt
        pos = {int(s): i for i, s in enumerate(sample_idx)}
        groups = [g for g in data.extra["ranking"].tolist() if g[0] in pos]  # the minibatch holds whole groups
        rows = torch.tensor([[pos[s] for s in g] for g in groups])  # [n_groups, G], best first
        leaf = logp.clone().requires_grad_()
        w = self._row_weights(order)
        d = self.cfg.dense
        loss = trajectory_dpo_loss(leaf[rows], ref[rows], temperature=d.temperature, weights=w[rows],
                                   log_ratio_clip=d.log_ratio_clip)
        loss.backward()
        with torch.no_grad():
            h = logp - ref
            if d.log_ratio_clip is not None:
                h = h.clamp(-d.log_ratio_clip, d.log_ratio_clip)
            e = (w * h).sum(1)  # e_k, for the logged margin
            margin = (e[rows[:, 0]] - e[rows[:, G - 1]]).float()
        return {"dh": leaf.grad.float(), "ref": ref.float(), "pos": pos, "loss": loss.detach().float(), "rows": logp.numel(),
                "accuracy": (margin > 0).float().mean(), "margin": margin.mean()}

    def chunk_loss(self, run, chunk, data, ctx):
        eps_u, eps_c = policy_outputs(run, chunk)
        logp = step_logprob_of(chunk, eps_u, eps_c)
        rows = torch.tensor([ctx["pos"][int(s)] for s in chunk.sample_idx])
        cols = slice(chunk.col0, chunk.col0 + chunk.shape[1])  # the chunk's columns of the minibatch's step order
        ref = ctx["ref"][rows, cols].to(logp.device)
        dh = ctx["dh"][rows, cols].to(logp.device)
        surrogate = (dh * (logp - ref)).sum()
        # the trainer weights a chunk by rows / step rows: undo it, the surrogate is already a minibatch sum
        scale = ctx["rows"] / chunk.step_idx.numel()
        stats = {"loss": ctx["loss"], "accuracy": ctx["accuracy"], "margin": ctx["margin"]}
        loss = surrogate * scale
        if self.cfg.dense.kl_coef > 0:  # explicit per-step KL to the initial policy on the trained steps
            kl = chunk_kl(run, chunk, eps_u, eps_c)
            loss = loss + self.cfg.dense.kl_coef * kl.mean()
            stats["kl"] = kl.mean().detach()
        return loss, stats
