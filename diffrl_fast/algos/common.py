"""Pieces several algorithms share: policy and reference outputs of a chunk, their log-probs, the per-step
KL to the reference in the forms the references use, and the ranking of samples within prompt groups."""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch

from ..diffusion.recompute import Chunk, chunk_outputs, reference_outputs, step_logprob_of
from ..ops import step_kl

KL_FORMS = ("exact", "eps_mse", "flow_grpo")


def policy_outputs(run, chunk: Chunk, detach_uncond: bool = False):
    """(eps_u, eps_c) of the current policy on the chunk, differentiable (eps_u detached on request)."""
    eps_u, eps_c = chunk_outputs(run.model, chunk, run.autocast_dtype)
    if detach_uncond and eps_c is not None:
        eps_u = eps_u.detach()
    return eps_u, eps_c


def reference_logp(run, chunk: Chunk) -> torch.Tensor:
    """log p_ref of the chunk's actions, [n, K], no gradient."""
    ref_u, ref_c = reference_outputs(run.model, chunk, run.autocast_dtype)
    return step_logprob_of(chunk, ref_u, ref_c)


def chunk_kl(run, chunk: Chunk, eps_u, eps_c, form: str = "exact") -> torch.Tensor:
    """Per-step divergence of the policy from the reference on the chunk's steps, [n, K], each averaged
    over the latent elements, in one of the forms the references use (all through the fused ``step_kl``,
    which computes |a x + b eps_hat - (a x + b eps_hat_ref)|^2 / (2 s^2) without materialising a mean):

        exact:     |mean - mean_ref|^2 / (2 s^2)            the KL of the two step Gaussians (a, b, s of the step)
        eps_mse:   |eps_hat - eps_hat_ref|^2                 DPOK (Fan et al. 2023): a = 0, b = 1, s^2 = 1/2
        flow_grpo: |mean - mean_ref|^2 / (2 std_t^2)         Flow-GRPO (Liu et al. 2025): std_t = s / sqrt(|dt|),
                                                             i.e. the exact KL x |dt|; flow-matching SDE steps only

    eps_hat is the guided model output eps_u + g (eps_c - eps_u).
    """
    if form not in KL_FORMS:
        raise ValueError(f"KL form must be one of {KL_FORMS}, got {form!r}")
    ref_u, ref_c = reference_outputs(run.model, chunk, run.autocast_dtype)
    c = chunk.coef
    g = chunk.guidance_scale if eps_c is not None else 1.0
    dims = chunk.x.dim() - 1  # rows [N, C, H, W], or [N, C, F, H, W] for video
    if form == "eps_mse":
        kl = step_kl(chunk.x, eps_u, eps_c, ref_u, ref_c, 0.0, 1.0, g, math.sqrt(0.5), latent_dims=dims)
    elif form == "flow_grpo":
        if chunk.sde_std is None:
            raise ValueError("the flow_grpo KL form needs a flow-matching SDE schedule (Flow-GRPO's std_dev_t); use the exact form")
        kl = step_kl(chunk.x, eps_u, eps_c, ref_u, ref_c, c.a, c.b, g, chunk.sde_std, latent_dims=dims)
    else:
        kl = step_kl(chunk.x, eps_u, eps_c, ref_u, ref_c, c.a, c.b, g, c.s, clip_x0=c.clip_x0, latent_dims=dims)
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


@contextlib.contextmanager
def swapped_weights(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]):
    """Run the block with each parameter's data pointing at the matching tensor of ``values`` (an old or EMA copy
    of the trainable weights), restored on exit: no copy of the weights either way. Use under no_grad."""
    saved = [p.data for p in params]
    try:
        for p, v in zip(params, values, strict=True):
            p.data = v
        yield
    finally:
        for p, d in zip(params, saved):
            p.data = d
