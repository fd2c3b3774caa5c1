"""Pieces several algorithms share: policy and reference outputs of a chunk, their log-probs and KL,
and the ranking of samples within prompt groups."""
from __future__ import annotations

import torch

from ..diffusion.recompute import Chunk, chunk_outputs, reference_outputs, step_logprob_of
from ..ops import step_kl


def policy_outputs(trainer, chunk: Chunk):
    """(eps_u, eps_c) of the current policy on the chunk, differentiable."""
    return chunk_outputs(trainer.model, chunk, trainer.autocast_dtype)


def reference_logp(trainer, chunk: Chunk) -> torch.Tensor:
    """log p_ref of the chunk's actions, [n, K], no gradient."""
    ref_u, ref_c = reference_outputs(trainer.model, chunk, trainer.autocast_dtype)
    return step_logprob_of(chunk, ref_u, ref_c)


def chunk_kl(trainer, chunk: Chunk, eps_u, eps_c) -> torch.Tensor:
    """Per-step KL(p_theta || p_ref) of the chunk's steps, [n, K] (fused; "mean" reduction like the log-probs)."""
    ref_u, ref_c = reference_outputs(trainer.model, chunk, trainer.autocast_dtype)
    c = chunk.coef
    g = chunk.guidance_scale if eps_c is not None else 1.0
    kl = step_kl(chunk.x, eps_u, eps_c, ref_u, ref_c, c.a, c.b, g, c.s, clip_x0=c.clip_x0)
    return kl.reshape(chunk.shape)


def rows_of(values: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """Per-sample ([B]) or per-step ([B, T]) values gathered for the chunk's rows, [n, K]."""
    n, k = chunk.shape
    idx = chunk.sample_idx.to(values.device)
    v = values[idx]
    return v[:, None].expand(n, k) if v.dim() == 1 else v.gather(1, chunk.step_idx.to(values.device))


def group_ranking(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """[B/G, G] sample indices of each prompt group (adjacent samples), sorted by reward, best first."""
    r = rewards.reshape(-1, group)
    order = torch.argsort(r, dim=1, descending=True, stable=True)
    return order + torch.arange(0, rewards.numel(), group)[:, None]
