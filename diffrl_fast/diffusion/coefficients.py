"""Per-step affine coefficients (a, b, s, x0 clipping) for every supported scheduler.

Every supported step has the form  x_{j+1} = a_j x_j + b_j eps_hat_j + s_j z  (../shared/DESIGN.md
section 2; j counts sampling steps from noise to data), possibly with x0 clipping
(``diffrl_fast.ops.X0Clip``). ``make_schedule`` turns a diffusers scheduler and a step count into a
``StepSchedule`` of per-step tables; the rollout and the training-side recompute both read those
tables, so they cannot drift apart.

Supported: DDIMScheduler (epsilon, v_prediction, sample; eta > 0), DDPMScheduler (fixed_small /
fixed_small_log / fixed_large variances) and FlowMatchEulerDiscreteScheduler run as the SDE of
Flow-GRPO (Liu et al. 2025). Tables are computed and stored in float64; the fused ops read them in their
accumulation dtype (float32, or float64 for float64 latents).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Union

import torch

from .._extras import require
from ..ops import X0Clip

Timestep = Union[int, float, torch.Tensor]


class StepCoefficients(NamedTuple):
    """x_{t-1} = a x_t + b eps_hat + s z, with optional x0 clipping; each field a float tensor."""

    a: torch.Tensor
    b: torch.Tensor
    s: torch.Tensor
    clip_x0: Optional[X0Clip] = None


@dataclass(frozen=True)
class StepSchedule:
    """Coefficient tables of one sampling run of ``num_steps`` steps (index j = 0 is the noisiest step).

    timesteps: [T] what the denoiser is fed at step j; a, b, s: [T] float64; clip: [T, 3] float64 columns
    (m0, cx, ce) of X0Clip with limit ``clip_limit``, or None. Steps with s == 0 are deterministic (DDPM's
    last step): they have no log-prob and are never trained on.
    """

    kind: str
    timesteps: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    s: torch.Tensor
    clip: Optional[torch.Tensor] = None
    clip_limit: float = 1.0
    sde_std: Optional[torch.Tensor] = None  # [T] flow SDE only: Flow-GRPO's std_dev_t (s / sqrt(|dt|); CPS: s itself)
    residual_logprob: bool = False  # CPS: a step's log-prob is -mean (y - mean)^2, the squared residual only

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def stochastic(self) -> torch.Tensor:
        """[T] bool: the steps that have a log-prob (s > 0)."""
        return self.s > 0

    def at(self, index: torch.Tensor, device=None) -> StepCoefficients:
        """Coefficients gathered at step indices ``index`` (any shape), as tensors of that shape."""
        idx = index.to(self.a.device, torch.long)
        get = lambda t: t[idx].to(device) if device is not None else t[idx]  # noqa: E731
        clip = None
        if self.clip is not None:
            c = self.clip[idx]
            clip = X0Clip(*(v.to(device) if device is not None else v for v in c.unbind(-1)), self.clip_limit)
        return StepCoefficients(get(self.a), get(self.b), get(self.s), clip)


def _timesteps(timestep: Timestep, batch: int) -> torch.Tensor:
    t = torch.as_tensor(timestep).detach().to("cpu")
    if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, batch)):
        raise ValueError(f"timestep must be a scalar or a [B={batch}] tensor, got shape {tuple(t.shape)}")
    return t.reshape(-1).expand(batch).to(torch.int64) if t.numel() == 1 else t.to(torch.int64)


def _x0_eps(prediction_type: str, sa, sb):
    """x0 = cx x + ce e and eps = px x + pe e for each prediction type (sa = sqrt(abar_t), sb = sqrt(1 - abar_t))."""
    if prediction_type == "epsilon":
        return 1 / sa, -sb / sa, torch.zeros_like(sa), torch.ones_like(sa)
    if prediction_type == "v_prediction":
        return sa, -sb, sb, sa
    if prediction_type == "sample":
        return torch.zeros_like(sa), torch.ones_like(sa), 1 / sb, -sa / sb
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def _ddim_tables(scheduler, t: torch.Tensor, eta: float, use_clipped_model_output: bool, clamp_prev_timestep: bool):
    cfg = scheduler.config
    if cfg.thresholding:
        raise ValueError("dynamic thresholding makes the step non-affine and is not supported; set thresholding=False")
    prev = t - cfg.num_train_timesteps // scheduler.num_inference_steps
    table = scheduler.alphas_cumprod.to(torch.float64)
    if (t < 0).any() or (t >= table.numel()).any():
        raise ValueError(f"timestep out of range [0, {table.numel()}): {t.tolist()}")
    abar_t = table[t]
    if clamp_prev_timestep:
        abar_p = table[prev.clamp(0, cfg.num_train_timesteps - 1)]
    else:
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
        abar_p = torch.where(prev >= 0, table[prev.clamp(min=0)], final)
    var = (1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p)
    s = eta * var.clamp(min=0).sqrt()
    c_dir = (1 - abar_p - s * s).clamp(min=0).sqrt()
    sa, sb = abar_t.sqrt(), (1 - abar_t).sqrt()
    cx, ce, px, pe = _x0_eps(cfg.prediction_type, sa, sb)
    m0 = abar_p.sqrt()
    if cfg.clip_sample and use_clipped_model_output:
        # eps is re-derived from the clipped x0: eps = (x - sqrt(abar_t) x0c) / sqrt(1 - abar_t)
        m0 = m0 - c_dir * sa / sb
        a, b = m0 * cx + c_dir / sb, m0 * ce
    else:
        a, b = m0 * cx + c_dir * px, m0 * ce + c_dir * pe
    clip = torch.stack([m0, cx, ce], -1) if cfg.clip_sample else None
    return a, b, s, clip, float(cfg.clip_sample_range)


def ddim_coefficients(
    scheduler,
    timestep: Timestep,
    batch: int,
    eta: float,
    *,
    device: Union[str, torch.device] = "cpu",
    use_clipped_model_output: bool = False,
    clamp_prev_timestep: bool = False,
) -> StepCoefficients:
    """Coefficients of diffusers' ``DDIMScheduler.step`` (Song et al. 2021, eq. 12 and 16) at ``timestep``.

    With abar_t, abar_p the cumulative alphas at t and at the previous timestep
    p = t - num_train_timesteps // num_inference_steps (``final_alpha_cumprod`` when p < 0):

        var = (1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p),   s = eta sqrt(var),   c = sqrt(1 - abar_p - s^2)
        x0  = cx x_t + ce e      eps = px x_t + pe e      (by prediction type; e is the model output)
        mean = sqrt(abar_p) x0 + c eps = a x_t + b e

    epsilon: x0 = (x - sqrt(1-abar_t) e)/sqrt(abar_t), eps = e;  v_prediction: x0 = sqrt(abar_t) x - sqrt(1-abar_t) e,
    eps = sqrt(abar_t) e + sqrt(1-abar_t) x;  sample: x0 = e, eps = (x - sqrt(abar_t) e)/sqrt(1-abar_t).
    With ``clip_sample`` the x0 clip is returned as an X0Clip (diffusers clips x0 after deriving eps,
    unless ``use_clipped_model_output`` re-derives eps from the clipped x0).

    ``clamp_prev_timestep=True`` reproduces ddpo-pytorch and trl, which clamp p to 0 instead of using
    ``final_alpha_cumprod`` at the last step; the two agree unless ``set_alpha_to_one=True``.
    """
    DDIMScheduler = require("diffusers", "ddim_coefficients (it reads a diffusers DDIMScheduler)").DDIMScheduler
    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(f"ddim_coefficients needs a diffusers DDIMScheduler, got {type(scheduler).__name__}")
    if scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no inference steps: call scheduler.set_timesteps(num_steps) first")
    if not eta > 0:
        raise ValueError(f"eta must be > 0 for a stochastic step with a log-prob, got {eta}")
    t = _timesteps(timestep, batch)
    a, b, s, clip, limit = _ddim_tables(scheduler, t, eta, use_clipped_model_output, clamp_prev_timestep)
    if not bool((s > 0).all()):
        raise ValueError(
            f"the DDIM step at timestep {t.tolist()} is deterministic (variance 0, e.g. the last step with "
            "set_alpha_to_one=True), so it has no log-prob; use clamp_prev_timestep=True or set_alpha_to_one=False"
        )
    f32 = dict(dtype=torch.float32, device=device)
    x0clip = None if clip is None else X0Clip(*(c.to(**f32) for c in clip.unbind(-1)), limit)
    return StepCoefficients(a.to(**f32), b.to(**f32), s.to(**f32), x0clip)


def ddim_schedule(scheduler, num_steps: int, eta: float = 1.0, *, clamp_prev_timestep: bool = False) -> StepSchedule:
    """Tables of a DDIM run (see ``ddim_coefficients``); calls ``scheduler.set_timesteps(num_steps)``."""
    if not eta > 0:
        raise ValueError(f"eta must be > 0: RL needs a stochastic sampler (got eta={eta})")
    scheduler.set_timesteps(num_steps)
    t = scheduler.timesteps.to(torch.int64).cpu()
    a, b, s, clip, limit = _ddim_tables(scheduler, t, eta, False, clamp_prev_timestep)
    return _schedule("ddim", scheduler.timesteps, a, b, s, clip, limit)


def ddpm_schedule(scheduler, num_steps: int) -> StepSchedule:
    """Tables of diffusers' ``DDPMScheduler.step`` (Ho et al. 2020, eq. 6-7), possibly with fewer inference steps.

        alpha_t = abar_t / abar_p,  beta_t = 1 - alpha_t,  x0 = cx x + ce e (by prediction type, optionally clipped)
        mean = sqrt(abar_p) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_p) / (1 - abar_t) x
        s    = sqrt((1 - abar_p) / (1 - abar_t) beta_t)  (fixed_small / fixed_small_log),  sqrt(beta_t) (fixed_large)
    The last step (t = 0) adds no noise: s = 0 there.
    """
    cfg = scheduler.config
    if cfg.thresholding:
        raise ValueError("dynamic thresholding makes the step non-affine and is not supported; set thresholding=False")
    if cfg.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise ValueError(f"DDPM variance_type {cfg.variance_type!r} is not supported (fixed_small, fixed_small_log, fixed_large)")
    scheduler.set_timesteps(num_steps)
    t = scheduler.timesteps.to(torch.int64).cpu()
    prev = torch.tensor([int(scheduler.previous_timestep(int(ti))) for ti in t], dtype=torch.int64)
    table = scheduler.alphas_cumprod.to(torch.float64)
    abar_t = table[t]
    abar_p = torch.where(prev >= 0, table[prev.clamp(min=0)], torch.ones_like(abar_t))
    alpha_t = abar_t / abar_p
    beta_t = 1 - alpha_t
    c0 = abar_p.sqrt() * beta_t / (1 - abar_t)
    ct = alpha_t.sqrt() * (1 - abar_p) / (1 - abar_t)
    var = ((1 - abar_p) / (1 - abar_t) * beta_t).clamp(min=1e-20)
    s = beta_t.sqrt() if cfg.variance_type == "fixed_large" else var.sqrt()
    s = torch.where(t > 0, s, torch.zeros_like(s))
    sa, sb = abar_t.sqrt(), (1 - abar_t).sqrt()
    cx, ce, _, _ = _x0_eps(cfg.prediction_type, sa, sb)
    a, b = c0 * cx + ct, c0 * ce
    clip = torch.stack([c0, cx, ce], -1) if cfg.clip_sample else None
    return _schedule("ddpm", scheduler.timesteps, a, b, s, clip, float(cfg.clip_sample_range))


SDE_TYPES = ("sde", "cps", "dance")


def flow_sde_schedule(scheduler, num_steps: int, noise_level: float = 0.7, *, mu: Optional[float] = None,
                      sigma_grid: Optional[str] = None, sde_type: str = "sde") -> StepSchedule:
    """A flow-matching model (velocity v, sigma from 1 to 0) sampled as the SDE of Flow-GRPO (Liu et al. 2025).

    With sigma the current and sigma' the next sigma, dt = sigma' - sigma < 0, and
    std = noise_level sqrt(sigma / (1 - sigma))  (sigma = 1 replaced by sigmas[1] in the denominator):

        mean = x (1 + std^2 dt / (2 sigma)) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt,    s = std sqrt(-dt)

    ``sde_type="cps"``: coefficients-preserving sampling (Wang & Yu 2025, "Coefficients-Preserving Sampling for
    Reinforcement Learning with Flow Matching"; flow_grpo's ``sde_type == "cps"``), which keeps x' at the
    noise level sigma' of the forward process: std = sigma' sin(noise_level pi / 2), s = std, and

        mean = (x - sigma v)(1 - sigma') + (x + (1 - sigma) v) sqrt(sigma'^2 - std^2)

    (the predicted x_0 and noise recombined at sigma'), whose log-prob is the squared residual only,
    -mean (x' - mean)^2 (``residual_logprob``: no 1/(2 s^2) scale, no constants, as the authors compute it).
    Its last step (sigma' = 0) has std 0: deterministic, with no log-prob, so it is never trained on (flow_grpo
    trains it with a zero gradient, which only scales its averaged update by (T - 1) / T).

    ``sde_type="dance"``: DanceGRPO's SDE (Xue et al. 2025, fastvideo/train_grpo_*.py ``flux_step`` with
    ``sde_solver=True``): the drift above with a constant std = noise_level (its ``eta``), so the step noise is
    s = eta sqrt(-dt) at every sigma; its log-prob is the full Gaussian one, averaged over the elements, like the SDE's.
    Its last step (to sigma' = 0) is stochastic and trained unless the timestep fraction drops it (``--ignore_last``).

    ``mu`` is passed to ``set_timesteps`` for schedulers with dynamic shifting (SD3 and FLUX compute it from
    the image size). ``sigma_grid="flux"`` starts from FluxPipeline's unshifted sigmas linspace(1, 1/N, N)
    instead of the scheduler's own grid; ``"flow_sigmas"`` from the flow-prediction multistep solvers' (UniPC's, as
    Wan2.1 ships it) linspace(1, 1/N_train, N + 1)[:-1].
    """
    if not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 for a stochastic step with a log-prob, got {noise_level}")
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    if sde_type == "cps" and not noise_level < 2:
        raise ValueError(f"CPS needs noise_level in (0, 2) (std = sigma' sin(noise_level pi / 2) > 0), got {noise_level}")
    kwargs = {"mu": mu} if mu is not None else {}
    if sigma_grid == "flux":
        import numpy as np

        kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            kwargs.pop("sigmas")
    elif sigma_grid == "flow_sigmas":
        import numpy as np

        kwargs["sigmas"] = np.linspace(1.0, 1 / scheduler.config.num_train_timesteps, num_steps + 1)[:-1]
    elif sigma_grid is not None:
        raise ValueError(f"sigma_grid must be None, 'flux' or 'flow_sigmas', got {sigma_grid!r}")
    scheduler.set_timesteps(num_steps, **kwargs)
    sig = scheduler.sigmas.to(torch.float64).cpu()
    sigma, sigma_next = sig[:-1], sig[1:]
    dt = sigma_next - sigma
    if sde_type == "cps":
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        c = (sigma_next * sigma_next - std * std).clamp_min(0).sqrt()
        a = (1 - sigma_next) + c
        b = -sigma * (1 - sigma_next) + (1 - sigma) * c
        return _schedule("flow_cps", scheduler.timesteps, a, b, std, None, 1.0, sde_std=std, residual_logprob=True)
    if sde_type == "dance":  # DanceGRPO's flux_step: the same drift with a constant std_t = eta
        std = torch.full_like(sigma, float(noise_level))
    else:
        sigma_max = sig[1] if sig.numel() > 1 else sig[0]
        denom = 1 - torch.where(sigma == 1, sigma_max, sigma)
        std = noise_level * (sigma / denom).sqrt()
    a = 1 + std * std * dt / (2 * sigma)
    b = (1 + std * std * (1 - sigma) / (2 * sigma)) * dt
    s = std * (-dt).sqrt()
    return _schedule("flow_sde", scheduler.timesteps, a, b, s, None, 1.0, sde_std=std)


def _schedule(kind, timesteps, a, b, s, clip, limit, sde_std=None, residual_logprob=False) -> StepSchedule:
    f64 = dict(dtype=torch.float64, device="cpu")
    for name, v in (("a", a), ("b", b), ("s", s)):
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"the {kind} schedule has non-finite {name} coefficients: {v.tolist()}")
    return StepSchedule(
        kind, timesteps.detach().cpu(), a.to(**f64), b.to(**f64), s.to(**f64),
        None if clip is None else clip.to(**f64), limit, None if sde_std is None else sde_std.to(**f64), residual_logprob,
    )


def make_schedule(scheduler, num_steps: int, *, eta: float = 1.0, noise_level: float = 0.7, mu: Optional[float] = None,
                  window: Optional[torch.Tensor] = None, sigma_grid: Optional[str] = None, sde_type: str = "sde") -> StepSchedule:
    """The ``StepSchedule`` of ``scheduler`` for ``num_steps`` steps, chosen by the scheduler's class
    (``sde_type``: the flow-matching SDE, ``flow_sde_schedule``; only "sde" for DDIM and DDPM).

    ``window`` ([num_steps] bool, optional) keeps only those steps stochastic: the others become the
    sampler's deterministic step (``deterministic_steps``), with no noise and no log-prob, so they are
    never trained on (timestep windows: Flow-GRPO-Fast, MixGRPO).
    """
    diffusers = require("diffusers", "make_schedule (it reads a diffusers scheduler)")
    DDIMScheduler, DDPMScheduler = diffusers.DDIMScheduler, diffusers.DDPMScheduler
    FlowMatchEulerDiscreteScheduler = diffusers.FlowMatchEulerDiscreteScheduler
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if sde_type != "sde" and not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(f"sde_type={sde_type!r} applies to flow-matching models only (FlowMatchEulerDiscreteScheduler); "
                         f"this model samples with {type(scheduler).__name__}: use sde_type='sde'")
    if isinstance(scheduler, DDIMScheduler):
        sched = ddim_schedule(scheduler, num_steps, eta)
    elif isinstance(scheduler, DDPMScheduler):
        sched = ddpm_schedule(scheduler, num_steps)
    elif isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sched = flow_sde_schedule(scheduler, num_steps, noise_level, mu=mu, sigma_grid=sigma_grid, sde_type=sde_type)
    else:
        raise ValueError(
            f"unsupported scheduler type {type(scheduler).__name__}: the rollout supports DDIMScheduler, DDPMScheduler "
            "and FlowMatchEulerDiscreteScheduler (convert with e.g. DDIMScheduler.from_config(scheduler.config))"
        )
    if window is None:
        return sched
    window = torch.as_tensor(window, dtype=torch.bool).cpu()
    if window.shape != (num_steps,):
        raise ValueError(f"window must be a [num_steps={num_steps}] bool mask, got shape {tuple(window.shape)}")
    a, b, clip = deterministic_steps(scheduler, sched)
    keep = window & sched.stochastic
    return replace(
        sched, a=torch.where(keep, sched.a, a), b=torch.where(keep, sched.b, b),
        s=torch.where(keep, sched.s, torch.zeros_like(sched.s)),
        clip=None if sched.clip is None else torch.where(keep[:, None], sched.clip, clip),
        sde_std=None if sched.sde_std is None else torch.where(keep, sched.sde_std, torch.zeros_like(sched.sde_std)),
    )


def forward_process(scheduler, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward process at denoiser timesteps ``t`` ([N]): x_t = alpha x_0 + sigma z, and the model output's
    x_0 prediction x0 = cx x_t + ce out, all [N] float64.

    DDIM/DDPM schedulers: alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t), (cx, ce) by prediction type;
    flow matching: sigma = t / num_train_timesteps, alpha = 1 - sigma, x0 = x_t - sigma v (as Flow-GRPO and
    DiffusionNFT form it).
    """
    FlowMatchEulerDiscreteScheduler = require("diffusers", "forward_process").FlowMatchEulerDiscreteScheduler
    t = torch.as_tensor(t).detach().cpu()
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sigma = t.to(torch.float64) / scheduler.config.num_train_timesteps
        return 1 - sigma, sigma, torch.ones_like(sigma), -sigma
    abar = scheduler.alphas_cumprod.to(torch.float64)[t.to(torch.int64)]
    sa, sb = abar.sqrt(), (1 - abar).sqrt()
    cx, ce, _, _ = _x0_eps(scheduler.config.prediction_type, sa, sb)
    return sa, sb, cx, ce


def denoising_target(scheduler, alpha: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The model output that is exactly right at x_t = alpha x0 + sigma z (``forward_process``): the
    pretraining loss's regression target. Flow matching: v = z - x0 (Lipman et al. 2023, rectified flow);
    epsilon prediction: z; v prediction: alpha z - sigma x0 (Salimans & Ho 2022); sample prediction: x0.
    alpha, sigma: [N]; x0, z: [N, ...]."""
    FlowMatchEulerDiscreteScheduler = require("diffusers", "denoising_target").FlowMatchEulerDiscreteScheduler
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return z - x0
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return z
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return alpha.reshape(shape).to(x0) * z - sigma.reshape(shape).to(x0) * x0
    raise ValueError(f"unsupported prediction_type {kind!r}; expected epsilon, v_prediction or sample")


def deterministic_steps(scheduler, sched: StepSchedule) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(a, b, clip) of the deterministic sampler at ``sched``'s timesteps: DDIM with eta = 0 (Song et al. 2021,
    eq. 12 with sigma = 0) for a DDIM run, the probability-flow ODE's Euler step x + v dt for a flow-matching
    run (Flow-GRPO's SDE, and CPS, at noise level 0). DDPM has no deterministic form of its own: use DDIM."""
    if sched.kind == "ddim":
        t = sched.timesteps.to(torch.int64).cpu()
        a, b, _, clip, _ = _ddim_tables(scheduler, t, 0.0, False, False)
        return a, b, clip
    if sched.kind in ("flow_sde", "flow_cps"):
        sig = scheduler.sigmas.to(torch.float64).cpu()
        return torch.ones_like(sched.a), sig[1:] - sig[:-1], None
    raise ValueError(f"timestep windows need a sampler with a deterministic form (DDIM or flow matching); "
                     f"this model samples with {type(scheduler).__name__}: convert it with "
                     "DDIMScheduler.from_config(scheduler.config)")


POST_WINDOW_SOLVERS = ("euler", "dpmsolver++")


@dataclass(frozen=True)
class PostWindowODE:
    """How a flow-matching rollout integrates the deterministic steps after its last stochastic step (MixGRPO-Flash,
    Li et al. 2025, "MixGRPO: Unlocking Flow-based GRPO Efficiency with Mixed ODE-SDE").

    start: the first step after the window (L + 1, L the last stochastic step); sigmas: [n] float64, the noise levels
    the tail visits, sigmas[0] = the schedule's sigma_{L+1} and sigmas[-1] = 0 (n - 1 denoiser passes per sample);
    solver: "euler" (x' = x + (sigma' - sigma) v) or "dpmsolver++" (``dpm_solver_pp_2m``).
    Steps 0..L are the schedule's own; only the final state x_T of the tail is stored (the tail is never trained on).
    """

    start: int
    sigmas: torch.Tensor
    solver: str


def _shift(scheduler, u: torch.Tensor, mu: Optional[float]) -> torch.Tensor:
    """A FlowMatchEulerDiscreteScheduler's sigma at unshifted time u (its static shift, or its exponential time shift
    with ``mu`` under dynamic shifting)."""
    cfg = scheduler.config
    if cfg.use_dynamic_shifting:
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    return cfg.shift * u / (1 + (cfg.shift - 1) * u)


def _unshift(scheduler, sigma: float, mu: Optional[float]) -> float:
    """The inverse of ``_shift``: the unshifted time u of a sigma in (0, 1]."""
    cfg = scheduler.config
    if cfg.use_dynamic_shifting:
        return 1 / (1 + math.exp(mu) * (1 / sigma - 1))
    return sigma / (cfg.shift - (cfg.shift - 1) * sigma)


def post_window_ode(scheduler, schedule: StepSchedule, *, solver: str = "euler", compress: float = 1.0,
                    mu: Optional[float] = None) -> Optional[PostWindowODE]:
    """The ``PostWindowODE`` of a flow-matching ``schedule`` whose steps after the last stochastic one, L, are
    deterministic (a timestep window; L = -1 when no step is stochastic, a forward-process algorithm's rollout,
    which the ODE then solves from x_0); None when the last step is stochastic, or with ``solver="euler"`` and
    ``compress=1`` (the schedule's own Euler steps: nothing changes).

    ``compress`` < 1 re-grids the tail as MixGRPO-Flash does (its dpm_post_compress_ratio): with u the unshifted
    time of sigma_{L+1} (the scheduler's shift inverted), n = max(2, int((T - L) x compress)) noise levels
    shift(linspace(u, 0, n)), i.e. n - 1 steps instead of the schedule's T - L - 1. ``compress=1`` keeps the
    schedule's own noise levels sigma_{L+1} .. sigma_T = 0. (MixGRPO takes max(1, ...): one level would never
    reach sigma = 0, so we keep at least two.)
    """
    diffusers = require("diffusers", "post_window_ode (it reads a diffusers scheduler)")
    if solver not in POST_WINDOW_SOLVERS:
        raise ValueError(f"post-window solver must be one of {POST_WINDOW_SOLVERS}, got {solver!r}")
    if not 0 < compress <= 1:
        raise ValueError(f"post-window compress must be in (0, 1], got {compress}")
    if not isinstance(scheduler, diffusers.FlowMatchEulerDiscreteScheduler) or schedule.kind not in ("flow_sde", "flow_cps"):
        raise ValueError(f"a post-window ODE solver (MixGRPO-Flash) needs a flow-matching model; this one samples with "
                         f"{type(scheduler).__name__}: set sample.post_window_solver=euler and sample.post_window_compress=1")
    stochastic = schedule.stochastic.nonzero().flatten()
    T = schedule.num_steps
    if (stochastic.numel() and int(stochastic[-1]) == T - 1) or (solver == "euler" and compress == 1):
        return None
    L = int(stochastic[-1]) if stochastic.numel() else -1  # -1: a deterministic rollout, solved from sigma_0
    n_train = scheduler.config.num_train_timesteps
    own = torch.cat([schedule.timesteps.to(torch.float64).cpu() / n_train, torch.zeros(1, dtype=torch.float64)])[L + 1:]
    if compress == 1:
        return PostWindowODE(L + 1, own, solver)
    cfg = scheduler.config
    if cfg.shift_terminal or cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas or \
            (cfg.use_dynamic_shifting and (mu is None or getattr(cfg, "time_shift_type", "exponential") != "exponential")):
        raise ValueError("sample.post_window_compress < 1 re-grids the tail through the scheduler's shift, supported for a "
                         "static shift or the exponential dynamic shift (SD3, FLUX); this scheduler's sigmas are made "
                         "otherwise: set sample.post_window_compress=1")
    n = max(2, int((T - L) * compress))
    u = _unshift(scheduler, float(own[0]), mu)
    grid = torch.linspace(u, 0.0, n, dtype=torch.float64)
    sig = torch.tensor([_shift(scheduler, float(v), mu) if v > 0 else 0.0 for v in grid], dtype=torch.float64)
    sig[0] = own[0]  # exactly the schedule's sigma_{L+1}, where the window's last step lands
    return PostWindowODE(L + 1, sig, solver)


def dpm_solver_pp_2m(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float,
                     prev_x0: Optional[torch.Tensor], sigma_prev: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) step of a flow-matching model (Lu et al. 2022, "DPM-Solver++", multistep, midpoint form;
    as MixGRPO-Flash runs it on the ODE steps after its window). With alpha = 1 - sigma, lambda = log(alpha / sigma),
    the data prediction x0 = x - sigma v, h = lambda' - lambda:

        first order (no previous x0, or sigma' = 0):  x' = (sigma' / sigma) x - alpha' (e^{-h} - 1) x0
                                                      (at sigma = 1: x' = sigma' x + alpha' x0, the Euler step)
        second order: r = (lambda - lambda_prev) / h, D1 = (x0 - x0_prev) / r,
                      x' = (sigma' / sigma) x - alpha' (e^{-h} - 1) (x0 + D1 / 2)

    (sigma' = 0 gives x' = x0.) Returns (x', x0): x0 is the next step's ``prev_x0``.
    """
    x0 = x - sigma * v
    if sigma_next == 0:
        return x0, x0
    if sigma >= 1:  # pure noise, alpha = 0: lambda = -inf, e^{-h} = 0, the first-order step is sigma' x + alpha' x0
        return sigma_next * x + (1 - sigma_next) * x0, x0
    lam = lambda s: math.log((1 - s) / s)  # noqa: E731
    h = lam(sigma_next) - lam(sigma)
    c = (1 - sigma_next) * math.expm1(-h)  # alpha' (e^{-h} - 1)
    if prev_x0 is None or sigma_prev is None or sigma_prev >= 1:  # at sigma = 1, lambda = -inf: r = inf, D1 = 0
        return (sigma_next / sigma) * x - c * x0, x0
    r = (lam(sigma) - lam(sigma_prev)) / h
    return (sigma_next / sigma) * x - c * (x0 + (x0 - prev_x0) / (2 * r)), x0
