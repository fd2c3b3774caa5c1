"""Rollouts: sample a batch of denoising trajectories and record what RL training needs.

One trajectory is an episode of the MDP of ../shared/DESIGN.md section 1: states (c, t_j, x_j), actions
x_{j+1} ~ N(a_j x_j + b_j eps_hat_j, s_j^2 I), a reward on the decoded x_T at the end. Each step runs
the denoiser once on the concatenated [uncond; cond] batch (classifier-free guidance), then the fused
step op: ``step_mean`` for the mean, x_{j+1} = mean + s_j z with z from the sample's own generator, and
``step_logprob`` of the stored x_{j+1} -- the same op and arithmetic the training recompute uses, so the
two agree exactly before any update.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from ..models.conditioning import Conditioning
from ..ops import step_logprob, step_mean
from .coefficients import PostWindowODE, StepSchedule, dpm_solver_pp_2m, make_schedule
from .tree import TreeSpec


@dataclass
class Trajectory:
    """A batch of B sampled trajectories of T steps (j = 0 is the noisiest step).

    latents:   [B, S, C, H, W] the stored states among x_0 (noise) ... x_T (the final latent), float32 (float64
               for a float64 model; bfloat16 / float16 with ``state_dtype``): all T+1 (S = T+1) unless
               ``latent_steps`` names the stored positions. ``latents_at`` and ``final_latents`` return them in
               the step math's dtype
    log_probs: [B, T] log-prob of each step's action under the sampling policy ("mean" reduction), 0 at
               deterministic steps
    schedule:  the StepSchedule (timesteps and per-step coefficients) the steps used
    cond, uncond: the conditioning of each sample (uncond is None without guidance)
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    schedule: StepSchedule
    guidance_scale: float
    cond: Conditioning
    uncond: Optional[Conditioning]
    images: torch.Tensor
    prompts: list[str]
    negative_prompts: list[str]
    seeds: torch.Tensor
    metadata: list[dict] = field(default_factory=list)
    init_seeds: Optional[torch.Tensor] = None  # seeds of x_0 (the initial noise) where they differ from ``seeds``
    eta: float = 1.0
    reduction: str = "mean"
    latent_steps: Optional[torch.Tensor] = None  # sorted positions in 0..T stored in ``latents``; None: all of them
    tree: Optional[TreeSpec] = None  # tree rollouts: adjacent runs of tree.leaves samples are one prompt's tree (``tree.py``)
    means: Optional[torch.Tensor] = None  # [B, T, C, H, W] each step's mean a x + b eps_hat under the rollout policy (keep_means)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    def _math(self, x: torch.Tensor) -> torch.Tensor:
        """States stored in bfloat16 / float16 (``state_dtype``) upcast to the step math's dtype, that of the
        log-probs (float32, float64 for a float64 model); exact: the rollout continued from the rounded states."""
        return x.to(self.log_probs.dtype) if x.dtype in (torch.bfloat16, torch.float16) else x

    def latents_at(self, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """States x_j of samples ``b`` (broadcast with ``j``), on the trajectory's storage device, in the step math's
        dtype. Raises ValueError for a state the rollout did not store (a deterministic step outside the trained
        window)."""
        dev = self.latents.device
        b, j = torch.as_tensor(b, dtype=torch.long).to(dev), torch.as_tensor(j, dtype=torch.long).to(dev)
        if self.latent_steps is None:
            return self._math(self.latents[b, j])
        slot = torch.full((self.num_steps + 1,), -1, dtype=torch.long, device=dev)
        slot[self.latent_steps.to(dev)] = torch.arange(self.latent_steps.numel(), device=dev)
        s = slot[j]
        if bool((s < 0).any()):
            missing = sorted(set(j[s < 0].reshape(-1).tolist()))
            raise ValueError(f"states x_j for j in {missing} were not stored by the rollout (it keeps "
                             f"{self.latent_steps.tolist()}): only trained steps keep their states")
        return self._math(self.latents[b, s])

    @property
    def final_latents(self) -> torch.Tensor:
        """x_T, the clean latents the images were decoded from, [B, C, H, W], in the step math's dtype."""
        return self._math(self.latents[:, -1])

    def index(self, idx) -> "Trajectory":
        """The sub-batch ``idx`` (a LongTensor of sample indices); a tree rollout's only as whole trees, in order."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        if self.tree is not None:  # whole trees: runs of L consecutive indices, each starting at a multiple of L
            L = self.tree.leaves
            whole = idx.numel() % L == 0 and bool((idx.reshape(-1, L) == idx.reshape(-1, L)[:, :1] // L * L + torch.arange(L)).all())
            if not whole:
                raise ValueError(f"a tree rollout's samples can only be taken as whole trees of {L} adjacent leaves")
        pick = idx.tolist()
        return replace(
            self,
            latents=self.latents[idx.to(self.latents.device)],
            log_probs=self.log_probs[idx.to(self.log_probs.device)],
            cond=self.cond.index(idx.to(self.cond.hidden.device)),
            uncond=None if self.uncond is None else self.uncond.index(idx.to(self.uncond.hidden.device)),
            images=self.images[idx.to(self.images.device)],
            prompts=[self.prompts[i] for i in pick],
            negative_prompts=[self.negative_prompts[i] for i in pick],
            seeds=self.seeds[idx.to(self.seeds.device)],
            metadata=[self.metadata[i] for i in pick] if self.metadata else [],
            init_seeds=None if self.init_seeds is None else self.init_seeds[idx],
            means=None if self.means is None else self.means[idx.to(self.means.device)],
        )

    @staticmethod
    def cat(parts: Sequence["Trajectory"]) -> "Trajectory":
        first = parts[0]
        return replace(
            first,
            latents=torch.cat([p.latents for p in parts]),
            log_probs=torch.cat([p.log_probs for p in parts]),
            cond=Conditioning.cat([p.cond for p in parts]),
            uncond=None if first.uncond is None else Conditioning.cat([p.uncond for p in parts]),
            images=torch.cat([p.images for p in parts]),
            prompts=[x for p in parts for x in p.prompts],
            negative_prompts=[x for p in parts for x in p.negative_prompts],
            seeds=torch.cat([p.seeds for p in parts]),
            metadata=[x for p in parts for x in p.metadata],
            init_seeds=(None if all(p.init_seeds is None for p in parts)
                        else torch.cat([p.seeds if p.init_seeds is None else p.init_seeds for p in parts])),
            means=None if first.means is None else torch.cat([p.means for p in parts]),
        )


def _generators(seeds: torch.Tensor, device: torch.device) -> list[torch.Generator]:
    gens = []
    for s in seeds.tolist():
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens


def _randn(gens: list[torch.Generator], shape, device, dtype=torch.float32) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in gens])


def guided_outputs(model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Optional[Conditioning],
                   autocast_dtype: Optional[torch.dtype] = None, guidance_scale: Optional[float] = None):
    """(eps_u, eps_c) of the denoiser on x at per-row timesteps t; one forward of the [uncond; cond] batch.

    Without guidance (uncond None) returns (out, None). A model whose guidance is not the linear
    eps_u + g (eps_c - eps_u) (``model.guide``: Qwen-Image's norm-rescaled true CFG) returns (its guided output, None),
    so the step ops see one output; it needs ``guidance_scale``. Outputs are float32 (float64 for a float64 model) and contiguous whatever the
    denoiser runs in (a channels_last denoiser returns NHWC-strided outputs; the fused step reads rows in
    place and needs NCHW).

    Adds the call's cost to ``model.denoiser_passes``: one per row forwarded (both guidance branches count),
    and two more per row when the forward records a graph for a backward (the output requires grad).
    Recomputed forwards of activation checkpointing are not counted: they are a memory setting, not the
    algorithm's work.
    """
    dtype = model.dtype
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with ctx:
        if uncond is None:
            out = model.predict(x.to(dtype), t, cond)
        else:
            out = model.predict(torch.cat([x, x]).to(dtype), torch.cat([t, t]), Conditioning.cat([uncond, cond]))
    if hasattr(model, "denoiser_passes"):  # a recorded graph (out.requires_grad) will be backpropagated
        model.denoiser_passes += out.shape[0] * (3 if out.requires_grad else 1)
    if uncond is None:
        return out.to(out_dtype).contiguous(), None
    eps_u, eps_c = out.to(out_dtype).contiguous().chunk(2)
    if getattr(model, "nonlinear_guidance", False):
        if guidance_scale is None:
            raise ValueError(f"{model.kind} guides nonlinearly (model.guide): guided_outputs needs guidance_scale")
        return model.guide(eps_u, eps_c, float(guidance_scale)).contiguous(), None
    return eps_u, eps_c


RESIDUAL_STD = math.sqrt(0.5)
RESIDUAL_SHIFT = math.log(RESIDUAL_STD) + 0.5 * math.log(2 * math.pi)


def action_logprob(residual: bool, x, y, eps_u, eps_c, coef, guidance_scale: float, reduction: str = "mean") -> torch.Tensor:
    """log p(y | x) of a step with coefficients ``coef`` (``StepSchedule.at``), through the fused ``step_logprob``:

        log N(y; a x + b eps_hat, s^2 I), averaged (reduction "mean") or summed over the latent elements,

    or, with ``residual`` (a schedule's ``residual_logprob``: CPS), -(y - mean)^2 over the elements, the squared residual only.
    That is the Gaussian log-density at std 1/sqrt(2), -(y - mean)^2 - log(1/sqrt 2) - log(2 pi)/2 per element,
    with its constant added back, so both forms share one op and its backward.
    """
    if not residual:
        return step_logprob(x, y, eps_u, eps_c, coef.a, coef.b, guidance_scale, coef.s, clip_x0=coef.clip_x0, reduction=reduction,
                            latent_dims=x.dim() - 1)
    std = torch.full_like(coef.s, RESIDUAL_STD)
    logp = step_logprob(x, y, eps_u, eps_c, coef.a, coef.b, guidance_scale, std, clip_x0=coef.clip_x0, reduction=reduction,
                        latent_dims=x.dim() - 1)
    return logp + (RESIDUAL_SHIFT if reduction == "mean" else RESIDUAL_SHIFT * x[0].numel())


@torch.no_grad()
def sample_trajectories(
    model,
    prompts: Sequence[str],
    *,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    noise_level: float = 0.7,
    sde_type: str = "sde",
    negative_prompts: Optional[Sequence[str]] = None,
    seeds: Optional[Sequence[int]] = None,
    init_seeds: Optional[Sequence[int]] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    schedule: Optional[StepSchedule] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    storage_device: Optional[str | torch.device] = None,
    decode_batch_size: int = 64,
    metadata: Optional[list[dict]] = None,
    progress=None,
    keep_latents: Optional[torch.Tensor] = None,
    tree: Optional[TreeSpec] = None,
    split_noise_scale: float = 1.0,
    keep_means: bool = False,
    post_window: Optional[PostWindowODE] = None,
    state_dtype: Optional[torch.dtype] = None,
) -> Trajectory:
    """Sample one trajectory per prompt with the model's scheduler run as a stochastic policy.

    Args:
        guidance_scale: classifier-free guidance g (eps_hat = eps_u + g (eps_c - eps_u)); g = 1 disables it
            (one denoiser pass per step instead of two).
        eta: DDIM's noise scale (> 0); noise_level: the flow-matching SDE's (Flow-GRPO); sde_type: that SDE,
            "sde" (Flow-GRPO's), "cps" (coefficients-preserving sampling) or "dance" (DanceGRPO's), ``flow_sde_schedule``.
        seeds: one int per prompt; sample i's initial noise and every step noise come from a generator
            seeded with seeds[i], so any single trajectory can be regenerated from its seed.
        init_seeds: one int per prompt, optional: sample i's initial noise x_0 is then drawn from a generator
            seeded with init_seeds[i] (and only its step noise from seeds[i]), so samples with equal
            init_seeds start from the same x_0 (D3PO's pairs).
        autocast_dtype: run the denoiser under autocast (torch.bfloat16 / torch.float16); the step math,
            log-probs and stored latents stay float32.
        height, width: image size in pixels (the model's native size by default); must fit the VAE and
            denoiser strides, else ValueError.
        storage_device: where the trajectory tensors live (e.g. "cpu" for long SDXL chains on a GPU).
        progress: optional callable(j, num_steps) for progress bars.
        keep_latents: optional bool mask [T+1] of the states x_0 .. x_T to store (x_T is always stored); the
            others are computed and dropped, so a trajectory whose training touches few steps (a timestep
            window, a forward-process algorithm) holds [B, S] latents, not [B, T+1] (``Trajectory.latents_at``).
        tree: tree rollouts (``tree.TreeSpec``; BranchGRPO, Li et al. 2025): every run of ``tree.leaves`` adjacent samples
            (same prompt) is one tree. It starts from its first leaf's x_0, and at each step only its distinct states
            x_j go through the denoiser (``model.denoiser_passes`` counts those); at a branch step each node splits into
            ``tree.factor`` children. The noise of a transition comes from the generator of the leaf that owns it
            (``TreeSpec.owner``). Every leaf stores its full trajectory (shared prefixes repeated).
        split_noise_scale: tree rollouts: the noise of a branch step is drawn at ``split_noise_scale`` x s_j, while its
            log-prob keeps the policy's s_j (BranchGRPO's tree_split_noise_scale; 1 = on-policy).
        keep_means: also store each step's mean under the rollout policy, ``Trajectory.means`` [B, T, ...] (GRPO-Guard
            re-centres its ratio on it; 0 at deterministic steps).
        post_window: MixGRPO-Flash (``coefficients.post_window_ode``): steps ``post_window.start`` .. T-1, all
            deterministic, are replaced by an ODE over ``post_window.sigmas`` with its solver; x_T is its result (the
            states in between are never stored: nothing trains on them). DPM-Solver++'s first tail step takes the
            data prediction of the last window step as its previous one, as MixGRPO's solver history does.
            ``post_window.start`` = 0 (a schedule with no stochastic step: a forward-process algorithm's rollout)
            solves the whole rollout from x_0, its first step first-order.
        state_dtype: torch.bfloat16 or torch.float16 keeps the states in that dtype, as a rollout run in the
            denoiser's dtype does: x_0 and every x_{j+1} of the schedule's steps are rounded to it before the chain
            continues from them and before the action's log-prob is taken, and so is the post-window tail's result
            x_T (the tail's intermediate states, never stored, are not), so the stored trajectory (half the memory
            of float32) is exactly the one sampled and the recompute reproduces its log-probs. None: the step math's
            dtype (float32).
    """
    prompts = model.validate_prompts(prompts)
    B = len(prompts)
    device = model.device
    if seeds is None:
        seeds = torch.randint(0, 2**31 - 1, (B,)).tolist()
    seeds_t = torch.as_tensor(list(seeds), dtype=torch.int64)
    if seeds_t.shape != (B,):
        raise ValueError(f"got {seeds_t.numel()} seeds for {B} prompts")
    shape = model.latent_shape_for(height, width)
    if schedule is None:
        schedule = make_schedule(model.scheduler, num_steps, eta=eta, noise_level=noise_level, sde_type=sde_type,
                                 **model.schedule_kwargs(shape, num_steps))
    T = schedule.num_steps
    ones = (1,) * len(shape)  # per-sample scalars broadcast over [C, H, W] (or [C, F, H, W] for video)
    storage = torch.device(storage_device) if storage_device is not None else device
    use_cfg = guidance_scale != 1.0
    cond, uncond = model.encode(prompts, negative_prompts)
    if not use_cfg:
        uncond = None
    neg = list(negative_prompts) if negative_prompts is not None else [""] * B

    gens = _generators(seeds_t, device)
    init_t = None
    if init_seeds is not None:
        init_t = torch.as_tensor(list(init_seeds), dtype=torch.int64)
        if init_t.shape != (B,):
            raise ValueError(f"got {init_t.numel()} init_seeds for {B} prompts")
    fdt = torch.float64 if model.dtype == torch.float64 else torch.float32  # the step math's dtype
    x = _randn(gens, shape, device, fdt)  # drawn (and advancing each sample's generator) even when replaced below,
    if init_t is not None:                # so a sample's step noise does not depend on whether its x_0 is shared
        x = _randn(_generators(init_t, device), shape, device, fdt)
    x = x * float(getattr(model.scheduler, "init_noise_sigma", 1.0))
    if state_dtype is not None and state_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"state_dtype must be torch.bfloat16, torch.float16 or None, got {state_dtype}")
    rnd = (lambda v: v) if state_dtype is None else (lambda v: v.to(state_dtype).to(fdt))  # noqa: E731
    x = rnd(x)
    reps = owner = None
    if tree is not None:
        reps, owner = tree.batch(B, T)  # raises unless the batch is whole trees
        if not bool(schedule.stochastic[list(tree.branch_steps)].all()):
            raise ValueError(f"tree branch steps {list(tree.branch_steps)} must be stochastic steps of the schedule (a "
                             f"deterministic step cannot split a node): keep them inside the timestep window")
        x = x[reps[:, 0].to(device)]  # one x_0 per tree: its first leaf's
    latent_steps = None
    slot = list(range(T + 1))
    if post_window is not None and keep_latents is None:
        keep_latents = torch.ones(T + 1, dtype=torch.bool)
    if keep_latents is not None:
        keep = torch.as_tensor(keep_latents, dtype=torch.bool).cpu().clone()
        if post_window is not None:  # the tail's states are not the schedule's x_j: never stored
            keep[post_window.start + 1:T] = False
        if keep.shape != (T + 1,):
            raise ValueError(f"keep_latents must be a bool mask of the T+1 = {T + 1} states, got shape {tuple(keep.shape)}")
        keep[T] = True
        latent_steps = keep.nonzero().reshape(-1)
        slot = [-1] * (T + 1)
        for i, pos in enumerate(latent_steps.tolist()):
            slot[pos] = i
    latents = torch.empty((B, T + 1 if latent_steps is None else latent_steps.numel(), *shape), dtype=state_dtype or fdt, device=storage)
    log_probs = torch.zeros((B, T), dtype=fdt, device=storage)
    means = torch.zeros((B, T, *shape), dtype=fdt, device=storage) if keep_means else None
    if slot[0] >= 0:
        latents[:, slot[0]] = x.to(storage)
    timesteps = schedule.timesteps.to(device)
    g = guidance_scale if use_cfg else 1.0
    branch = set(tree.branch_steps) if tree is not None else set()
    tail = post_window
    if tail is not None and (tail.start < 0 or tail.start >= T or bool(schedule.stochastic[tail.start:].any())):
        raise ValueError(f"post_window starts at step {tail.start}, which must follow the schedule's last stochastic step")
    prev_x0 = None  # the data prediction x - sigma v of the step before the tail (DPM-Solver++'s history)
    for j in range(T if tail is None else tail.start):
        # the distinct states x_j (all samples without a tree): rows ``act`` of the batch; ``node[b]`` is sample b's row
        act = node = None
        if tree is not None:
            act = torch.nonzero(reps[:, j] == torch.arange(B)).flatten()
            row_of = torch.full((B,), -1, dtype=torch.long)
            row_of[act] = torch.arange(act.numel())
            node = row_of[reps[:, j]].to(device)
        xa = x if act is None else x[act.to(device)]
        n = xa.shape[0]
        ca = cond if act is None else cond.index(act.to(cond.hidden.device))
        ua = uncond if act is None or uncond is None else uncond.index(act.to(uncond.hidden.device))
        eps_u, eps_c = guided_outputs(model, xa, timesteps[j].expand(n), ca, ua, autocast_dtype, g)
        c = schedule.at(torch.full((n,), j), device=device)
        mean = step_mean(xa, eps_u, eps_c, c.a, c.b, g, clip_x0=c.clip_x0, latent_dims=xa.dim() - 1)
        stochastic = bool(schedule.stochastic[j])
        if tail is not None and j == tail.start - 1 and tail.solver == "dpmsolver++":
            v = eps_u if eps_c is None else eps_u + g * (eps_c - eps_u)
            x0 = xa - float(timesteps[j]) / model.scheduler.config.num_train_timesteps * v
            prev_x0 = x0 if node is None else x0[node]
        if means is not None and stochastic:
            means[:, j] = (mean if node is None else mean[node]).to(storage)
        if not stochastic:  # a tree does not branch here: every sample keeps its node's state
            x_next = rnd(mean if node is None else mean[node])
        elif act is None:
            noise = _randn(gens, shape, device, fdt)
            x_next = rnd(mean + c.s.to(fdt).reshape(n, *ones) * noise)
            log_probs[:, j] = action_logprob(schedule.residual_logprob, x, x_next, eps_u, eps_c, c, g).to(storage)
        else:  # one action per owner of transition j, from the node (active row) its leaf was in at x_j
            own = torch.nonzero(owner[:, j]).flatten()
            src = node[own.to(device)]
            co = schedule.at(torch.full((own.numel(),), j), device=device)
            scale = split_noise_scale if j in branch else 1.0
            noise = _randn([gens[i] for i in own.tolist()], shape, device, fdt)
            y = rnd(mean[src] + (co.s.to(fdt) * scale).reshape(-1, *ones) * noise)
            lp = action_logprob(schedule.residual_logprob, xa[src], y, eps_u[src], None if eps_c is None else eps_c[src], co, g)
            own_of = torch.full((B,), -1, dtype=torch.long)
            own_of[own] = torch.arange(own.numel())
            pick = own_of[reps[:, j + 1]]  # every leaf takes its node's action
            x_next = y[pick.to(device)]
            log_probs[:, j] = lp[pick.to(lp.device)].to(storage)
        if slot[j + 1] >= 0:
            latents[:, slot[j + 1]] = x_next.to(storage)
        x = x_next
        if progress is not None:
            progress(j + 1, T)
    if tail is not None:  # every sample is its own state here (a tree's splits are inside the window)
        n_train = model.scheduler.config.num_train_timesteps
        sig = tail.sigmas.tolist()
        for k in range(len(sig) - 1):
            eps_u, eps_c = guided_outputs(model, x, torch.full((B,), sig[k] * n_train, device=device, dtype=timesteps.dtype),
                                          cond, uncond, autocast_dtype, g)
            v = eps_u if eps_c is None else eps_u + g * (eps_c - eps_u)
            if tail.solver == "euler":
                x = x + (sig[k + 1] - sig[k]) * v
            else:
                s_prev = (float(timesteps[tail.start - 1]) / n_train if tail.start else None) if k == 0 else sig[k - 1]
                x, prev_x0 = dpm_solver_pp_2m(x, v, sig[k], sig[k + 1], prev_x0, s_prev)
        x = rnd(x)
        latents[:, slot[T]] = x.to(storage)
        if progress is not None:
            progress(T, T)

    images = torch.cat([model.decode(x[i:i + decode_batch_size]) for i in range(0, B, decode_batch_size)]).to(storage)
    return Trajectory(
        latents=latents, log_probs=log_probs, schedule=schedule, guidance_scale=float(guidance_scale),
        cond=cond.to(storage), uncond=None if uncond is None else uncond.to(storage), images=images,
        prompts=prompts, negative_prompts=neg, seeds=seeds_t,
        metadata=metadata if metadata is not None else model.prompt_metadata(prompts), eta=eta, init_seeds=init_t,
        latent_steps=latent_steps, tree=tree, means=means,
    )
