"""Training-side recompute: the policy's log-probs of recorded actions, K timesteps packed per forward.

A chunk takes n samples of a trajectory batch and K step indices per sample (each sample its own
indices, e.g. a per-sample shuffle of the timesteps), gathers the K states and actions of each, and runs
the denoiser once on the n*K rows (2 n*K with guidance). The fused step op then gives log p for all
n*K rows in one pass. Coefficients come from the trajectory's own StepSchedule, as in the rollout.

The invariant (tested, and checkable on any model with ``diffrl-fast check-parity``): before any
update, recomputed log-probs equal the rollout's, |exp(logp - old) - 1| <= 1e-5 in fp32, whatever the
training batch size, chunk size K or backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..models.conditioning import Conditioning
from .coefficients import StepCoefficients
from .rollout import Trajectory, action_logprob, guided_outputs


@dataclass
class Chunk:
    """n samples x K steps of a trajectory batch, flattened to n*K rows (row r = sample r // K, step r % K)."""

    sample_idx: torch.Tensor  # [n]
    step_idx: torch.Tensor  # [n, K]
    x: Optional[torch.Tensor]  # [n*K, C, H, W] states x_j (None: packed without states)
    y: Optional[torch.Tensor]  # [n*K, C, H, W] actions x_{j+1}
    t: torch.Tensor  # [n*K] denoiser timesteps
    cond: Conditioning
    uncond: Optional[Conditioning]
    coef: StepCoefficients  # each [n*K]
    old_log_probs: torch.Tensor  # [n, K] from the rollout
    guidance_scale: float
    sde_std: Optional[torch.Tensor] = None  # [n*K] Flow-GRPO's std_dev_t of each row (flow SDE schedules only)
    col0: int = 0  # position of the chunk's first step in its minibatch's step order (set by the trainer)
    weight: float = 1.0  # the chunk's share of the rows of its optimiser step (set by the trainer)
    residual_logprob: bool = False  # CPS: log-probs are the squared residual only (``rollout.action_logprob``)
    old_mean: Optional[torch.Tensor] = None  # [n*K, C, H, W] the rollout policy's step means (``Trajectory.means``)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.step_idx.shape)  # type: ignore[return-value]


def pack_chunk(traj: Trajectory, sample_idx: torch.Tensor, step_idx: torch.Tensor, device, with_states: bool = True) -> Chunk:
    """Gather the chunk's states, actions, timesteps, conditioning and coefficients onto ``device``
    (without the states x, y when ``with_states`` is False: forward-process algorithms train on x_T only).

    A step index -1 is padding: a chunk with any is packed as its valid (sample, step) rows, shape [R, 1], a sample
    repeated once per valid step (``tree.owned_order``)."""
    sample_idx = torch.as_tensor(sample_idx, dtype=torch.long)
    step_idx = torch.as_tensor(step_idx, dtype=torch.long)
    if step_idx.dim() != 2 or step_idx.shape[0] != sample_idx.numel():
        raise ValueError(f"step_idx must be [n={sample_idx.numel()}, K], got {tuple(step_idx.shape)}")
    pad = step_idx < 0
    if bool(pad.any()):  # -1 marks no row (a tree's transitions another leaf owns): the valid rows, one per line
        sample_idx = sample_idx[:, None].expand_as(step_idx)[~pad]
        step_idx = step_idx[~pad][:, None]
    T = traj.num_steps
    if step_idx.numel() and (int(step_idx.min()) < 0 or int(step_idx.max()) >= T):
        raise ValueError(f"step indices must lie in [0, {T}), got {step_idx.min().item()}..{step_idx.max().item()}")
    n, K = step_idx.shape
    src = traj.latents.device
    rows_s = sample_idx.to(src)[:, None].expand(n, K)
    rows_j = step_idx.to(src)
    if with_states:
        x = traj.latents_at(rows_s, rows_j).reshape(n * K, *traj.latents.shape[2:]).to(device, non_blocking=True)
        y = traj.latents_at(rows_s, rows_j + 1).reshape(n * K, *traj.latents.shape[2:]).to(device, non_blocking=True)
    else:
        x = y = None
    flat_j = step_idx.reshape(-1)
    t = traj.schedule.timesteps[flat_j].to(device)
    cond = traj.cond.index(sample_idx.to(traj.cond.hidden.device)).repeat_interleave(K).to(device)
    uncond = None
    if traj.uncond is not None:
        uncond = traj.uncond.index(sample_idx.to(traj.uncond.hidden.device)).repeat_interleave(K).to(device)
    old = traj.log_probs[sample_idx.to(traj.log_probs.device)[:, None], step_idx.to(traj.log_probs.device)].to(device)
    sde_std = None if traj.schedule.sde_std is None else traj.schedule.sde_std[flat_j].to(device)
    old_mean = None
    if traj.means is not None:
        old_mean = traj.means[rows_s, rows_j].reshape(n * K, *traj.means.shape[2:]).to(device, non_blocking=True)
    return Chunk(sample_idx, step_idx, x, y, t, cond, uncond, traj.schedule.at(flat_j, device=device), old, traj.guidance_scale,
                 sde_std, residual_logprob=traj.schedule.residual_logprob, old_mean=old_mean)


def chunk_outputs(model, chunk: Chunk, autocast_dtype: Optional[torch.dtype] = None):
    """(eps_u, eps_c) of the model on the chunk, one denoiser forward of all its rows."""
    return guided_outputs(model, chunk.x, chunk.t, chunk.cond, chunk.uncond, autocast_dtype, chunk.guidance_scale)


def step_logprob_of(chunk: Chunk, eps_u: torch.Tensor, eps_c: Optional[torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """log p of the chunk's actions given model outputs for its rows; [n, K]."""
    g = chunk.guidance_scale if eps_c is not None else 1.0
    logp = action_logprob(chunk.residual_logprob, chunk.x, chunk.y, eps_u, eps_c, chunk.coef, g, reduction)
    return logp.reshape(chunk.shape)


def chunk_log_probs(model, chunk: Chunk, *, autocast_dtype: Optional[torch.dtype] = None, reduction: str = "mean") -> torch.Tensor:
    """The policy's log-probs of the chunk's actions, [n, K], differentiable w.r.t. the denoiser.

    Memory: the trainer backpropagates each chunk right after its forward, so a training step holds the
    activations of one chunk (n*K rows) at a time, whatever the number of trained timesteps; the
    denoiser's own gradient checkpointing (``model.gradient_checkpointing``) shrinks that further.
    """
    eps_u, eps_c = guided_outputs(model, chunk.x, chunk.t, chunk.cond, chunk.uncond, autocast_dtype, chunk.guidance_scale)
    return step_logprob_of(chunk, eps_u, eps_c, reduction)


def trainable_steps(traj: Trajectory) -> torch.Tensor:
    """Indices of the steps that have a log-prob (deterministic steps, s = 0, are never trained on)."""
    return torch.nonzero(traj.schedule.stochastic).flatten()


@torch.no_grad()
def recompute_log_probs(model, traj: Trajectory, *, batch_size: int, chunk_size: int,
                        autocast_dtype: Optional[torch.dtype] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Recompute all log-probs of ``traj`` the way training does: samples in batches of ``batch_size``,
    each sample's steps shuffled (with ``generator``) and packed ``chunk_size`` at a time. Returns [B, T]
    (0 at deterministic steps)."""
    B, T = len(traj), traj.num_steps
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    steps = trainable_steps(traj)
    out = torch.zeros((B, T), dtype=torch.float32)
    for start in range(0, B, batch_size):
        idx = torch.arange(start, min(start + batch_size, B))
        order = torch.stack([steps[torch.randperm(steps.numel(), generator=generator)] for _ in idx])
        for k0 in range(0, order.shape[1], chunk_size):
            sub = order[:, k0:k0 + chunk_size]
            chunk = pack_chunk(traj, idx, sub, model.device)
            logp = chunk_log_probs(model, chunk, autocast_dtype=autocast_dtype, reduction=traj.reduction)
            out[idx[:, None], sub] = logp.float().cpu()
    return out


def parity_report(model, traj: Trajectory, *, batch_size: int, chunk_size: int,
                  autocast_dtype: Optional[torch.dtype] = None, seed: int = 0) -> dict:
    """Worst |ratio - 1| per timestep between the rollout's log-probs and the training recompute's."""
    g = torch.Generator().manual_seed(seed)
    new = recompute_log_probs(model, traj, batch_size=batch_size, chunk_size=chunk_size, autocast_dtype=autocast_dtype, generator=g)
    old = traj.log_probs.float().cpu()
    steps = trainable_steps(traj)
    dev = (torch.exp(new - old) - 1).abs()[:, steps]
    per_step = dev.max(dim=0).values
    return {
        "timesteps": [int(v) if float(v).is_integer() else float(v) for v in traj.schedule.timesteps[steps].tolist()],
        "max_abs_ratio_minus_1": per_step.tolist(),
        "worst": float(per_step.max()) if per_step.numel() else 0.0,
        "max_abs_logp_diff": float((new - old).abs()[:, steps].max()) if steps.numel() else 0.0,
    }


@torch.no_grad()
def reference_outputs(model, chunk: Chunk, autocast_dtype: Optional[torch.dtype] = None):
    """(eps_u, eps_c) of the reference policy on the chunk: the LoRA adapter switched off, or the frozen copy."""
    with model.reference():
        return chunk_outputs(model, chunk, autocast_dtype)
