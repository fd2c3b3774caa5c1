"""Policy-gradient losses of DDPO: importance ratio, the clipped surrogate (DDPO-IS) and REINFORCE (DDPO-SF)."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import backends
from ._problem import StepProblem, acc_dtype
from ._validate import all_finite, check_latents, check_reduction, check_rows, checks, data_checks_enabled, per_row
from .step import HALF_LOG_2PI, Coef, X0Clip, _resolve_backend, logprob_from_sq, pack_coef, step_logprob


class PPOLoss(NamedTuple):
    """The loss and the statistics practitioners log (all detached except ``loss``)."""

    loss: torch.Tensor  # scalar, differentiable
    clipfrac: torch.Tensor  # mean(|rho - 1| > clip_range)
    approx_kl: torch.Tensor  # 0.5 mean((log p - log p_old)^2)
    ratio_mean: torch.Tensor  # mean(rho)
    logp: torch.Tensor  # the new log-probs (differentiable), shape of the rows


def importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """rho = exp(log p_theta - log p_old), the per-step importance weight of DDPO-IS (Black et al. 2023)."""
    return torch.exp(logp - old_logp)


def _check_clip_args(clip_range, adv_clip, clip_mode) -> None:
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"clip_range must be > 0 or None (REINFORCE), got {clip_range}")
    if adv_clip is not None and not adv_clip > 0:
        raise ValueError(f"adv_clip must be > 0 or None, got {adv_clip}")
    if clip_mode not in ("ppo", "clamp"):
        raise ValueError(f"clip_mode must be 'ppo' or 'clamp', got {clip_mode!r}")


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: Optional[float] = 1e-4,
    adv_clip: Optional[float] = 5.0,
    clip_mode: str = "ppo",
) -> PPOLoss:
    """DDPO's policy-gradient loss over rows (samples x timesteps), Black et al. 2023.

    With A = clamp(advantages, -adv_clip, adv_clip) and rho = exp(logp - old_logp):

        DDPO-IS (clip_range=eps):  L = mean( max(-A rho, -A clamp(rho, 1 - eps, 1 + eps)) )
        DDPO-SF (clip_range=None): L = mean( -A logp )                    (REINFORCE)
        clip_mode="clamp":         L = mean( -A clamp(rho, 1 - eps, 1 + eps) )
                                   (DPOK, Fan et al. 2023: no gradient outside the band on either side)

    Also returns clipfrac = mean(|rho - 1| > eps), approx_kl = 0.5 mean((logp - old_logp)^2) and
    mean(rho), as ddpo-pytorch and trl log them. ``advantages`` and ``old_logp`` are constants.
    """
    if not isinstance(logp, torch.Tensor):
        raise ValueError(f"logp must be a torch.Tensor, got {type(logp).__name__}")
    old_logp = check_rows("old_logp", old_logp, logp.shape, logp.device)
    advantages = check_rows("advantages", advantages, logp.shape, logp.device)
    _check_clip_args(clip_range, adv_clip, clip_mode)
    adv = advantages.detach().to(logp.dtype)
    if adv_clip is not None:
        adv = adv.clamp(-adv_clip, adv_clip)
    old = old_logp.detach().to(logp.dtype)
    log_ratio = logp - old
    ratio = torch.exp(log_ratio)
    if clip_range is None:
        loss = (-adv * logp).mean()
    else:
        clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
        loss = (clipped if clip_mode == "clamp" else torch.maximum(-adv * ratio, clipped)).mean()
    with torch.no_grad():
        eps = clip_range if clip_range is not None else 0.0
        clipfrac = ((ratio - 1.0).abs() > eps).float().mean() if clip_range is not None else torch.zeros((), device=logp.device)
        approx_kl = 0.5 * log_ratio.square().mean()
        ratio_mean = ratio.mean()
    return PPOLoss(loss, clipfrac, approx_kl, ratio_mean, logp)


MODES = ("auto", "fused", "recompute")


def ppo_clip_step_loss(
    x_t: torch.Tensor,
    x_prev: torch.Tensor,
    eps_u: torch.Tensor,
    eps_c: Optional[torch.Tensor],
    a: Coef,
    b: Coef,
    g: Coef,
    s: Coef,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: Optional[float] = 1e-4,
    adv_clip: Optional[float] = 5.0,
    clip_mode: str = "ppo",
    reduction: str = "mean",
    clip_x0: Optional[X0Clip] = None,
    latent_dims: int = 3,
    mode: str = "auto",
) -> PPOLoss:
    """``ppo_clip_loss`` of ``step_logprob(x_t, x_prev, eps_u, eps_c, a, b, g, s)``, straight from the step's inputs.

    The loss is exactly ``ppo_clip_loss``'s (DDPO-IS, Black et al. 2023; clip_mode="clamp" for DPOK), with
    log p the fused step log-prob (``step_logprob``, bit-identical to it).

    ``mode`` chooses how the gradients are computed:

    * ``"fused"``: in the forward pass (the loss ends the graph, as in Liger-Kernel's fused losses). The
      C++ kernel works row by row while the row is in cache: one read of each latent input plus one write
      of each needed gradient (6 latent passes for eps_u and eps_c). Triton, unclipped: the forward kernel
      also writes the residual y - mean and a second kernel scales it per row into the gradients (8
      passes). The gradients are held from forward to backward (one latent-sized tensor per input that
      requires grad). ``loss.backward()`` with a unit upstream gradient then does no latent work; any other
      scale costs one extra pass over the gradients, and using ``logp`` in a further differentiable term
      costs one recompute pass.
    * ``"recompute"``: nothing latent-sized is kept; backward re-reads the four inputs (the op graph of
      ``step_logprob`` + ``ppo_clip_loss``; 10 passes). For memory-bound callers.
    * ``"auto"`` (default): ``"fused"`` where it moves less data: on the C++ backend (CPU tensors, eager
      mode) and on Triton (CUDA tensors) without x0 clipping, except float16 there (its residual is saved in
      the inputs' dtype: bfloat16 adds one rounding, float16 would lose small values); ``"recompute"``
      elsewhere (clipped or float16 on Triton, where the fused forward would re-read the inputs too; the
      torch backend), and always inside torch.compile (where the per-row arithmetic is compiled into the
      graph). On CUDA the fused mode's backward reads the upstream gradient (one device sync) to skip a
      scaling pass when it is 1, and with data checks on its forward reads the bad-row count (one more).

    Gradients flow to x_t, x_prev, eps_u, eps_c and a tensor ``s``; not to a, b, g, old_logp, advantages.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_clip_args(clip_range, adv_clip, clip_mode)
    check_reduction(reduction)
    if mode != "recompute" and not torch.compiler.is_compiling():
        template = check_latents(latent_dims, {"x_t": x_t, "x_prev": x_prev, "eps_u": eps_u, "eps_c": eps_c})
        backend = _resolve_backend(template.device.type)
        if mode == "fused" or backend == "cpp" or (backend == "triton" and _saves_residual(clip_x0 is not None, template.dtype)):
            return _fused_ppo(x_t, x_prev, eps_u, eps_c, a, b, g, s, old_logp, advantages, clip_range, adv_clip,
                              clip_mode, reduction, clip_x0, latent_dims, backend)
    logp = step_logprob(x_t, x_prev, eps_u, eps_c, a, b, g, s, reduction=reduction, clip_x0=clip_x0, latent_dims=latent_dims)
    return ppo_clip_loss(logp, old_logp, advantages, clip_range=clip_range, adv_clip=adv_clip, clip_mode=clip_mode)


def _fused_ppo(x, y, eu, ec, a, b, g, s, old_logp, advantages, clip_range, adv_clip, clip_mode, reduction, clip_x0,
               latent_dims, backend) -> PPOLoss:
    """Metadata checks only (the kernel checks every row's values and reports bad rows), then ``_FusedPPO``."""
    if eu is None or y is None:
        raise ValueError(f"{'eps_u' if eu is None else 'x_prev'} is required")
    if clip_x0 is not None and not isinstance(clip_x0, X0Clip):
        raise ValueError(f"clip_x0 must be an X0Clip or None, got {type(clip_x0).__name__}")
    lead = x.shape[: x.dim() - latent_dims]
    dtype = acc_dtype(x.dtype)
    device = x.device
    rows = {"old_logp": _flat_rows("old_logp", old_logp, lead, device, dtype),
            "advantages": _flat_rows("advantages", advantages, lead, device, dtype)}
    # s and log s exactly as step_logprob forms them (log of the lead-shaped view), so log p is bit-identical
    if isinstance(s, torch.Tensor):
        s_view = per_row("s", s, lead, device, dtype, positive=True, check_data=False, flat=False)
    else:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
            raise ValueError(f"s must be a float > 0 or a tensor broadcastable to {tuple(lead)}, got {s!r}")
        s_view = torch.full(lead, float(s), dtype=dtype, device=x.device)
    log_s = torch.log(s_view)
    rows["log_s"] = log_s if log_s.dim() == 1 else log_s.reshape(-1)
    rows["s"] = s_view if s_view.dim() == 1 else s_view.reshape(-1)
    coef = None
    if clip_x0 is not None or backend != "cpp":
        coef = pack_coef(lead, x.device, dtype, a, b, g, clip_x0, check_data=clip_x0 is not None)
    else:
        for name, v in (("a", a), ("b", b), ("g", g)):
            if isinstance(v, float):
                if not math.isfinite(v):
                    raise ValueError(f"{name} must be finite, got {v}")
                rows[name] = float(v)
            else:
                rows[name] = per_row(name, v, lead, device, dtype, check_data=False)
    s_tensor = s if isinstance(s, torch.Tensor) else None
    report: list = []  # forward appends the number of bad rows (an int, or a 0-dim tensor on other backends) and
    # the three statistics
    params = (clip_range, adv_clip, clip_mode, reduction, clip_x0, latent_dims, backend, coef, rows, (a, b, g), report,
              lead)
    loss, logp = _FusedPPO.apply(x, y, eu, ec, s_tensor, params)
    bad, clipfrac, approx_kl, ratio_mean = report  # the statistics: plain tensors, outside autograd
    # the bad-row count: an int from the C++ kernel; on other backends a 0-dim tensor, read (one sync on CUDA)
    # only when the data checks are on
    if (type(bad) is not int or bad > 0) and data_checks_enabled() and float(bad) > 0:
        # a row had s <= 0 or a non-finite value: let the per-argument checks name it
        _name_bad_input(x, y, eu, ec, a, b, g, s, old_logp, advantages, clip_x0, latent_dims)
    return PPOLoss(loss, clipfrac, approx_kl, ratio_mean, logp)


def _flat_rows(name: str, t, lead: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A per-row constant (old log-probs, advantages) after ``check_rows``' metadata checks, as a flat [N]
    tensor of the accumulation dtype (no op when it already is one); values are left to the kernel's checks."""
    t = check_rows(name, t, lead, device, check_data=False)
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.dim() == 1 else t.reshape(-1)


def _name_bad_input(x, y, eu, ec, a, b, g, s, old_logp, advantages, clip_x0, latent_dims) -> None:
    """Re-run the op with every data check on, which raises naming the bad argument."""
    with checks(True):
        logp = step_logprob(x.detach(), y.detach(), eu.detach(), None if ec is None else ec.detach(), a, b, g,
                            s.detach() if isinstance(s, torch.Tensor) else s, clip_x0=clip_x0, latent_dims=latent_dims)
        check_rows("old_logp", old_logp, logp.shape, logp.device)
        check_rows("advantages", advantages, logp.shape, logp.device)
        if not all_finite(logp - old_logp.to(logp.dtype)):
            raise ValueError("log p - old_logp is not finite: the new and old log-probs are too far apart")
    raise ValueError("the fused PPO loss saw a non-finite value or a non-positive std in some row")


def _saves_residual(clip: bool, dtype: torch.dtype) -> bool:
    """Whether the fused forward of a kernel backend keeps the residual y - mean (``step_fwd_res``) instead of
    re-reading the inputs: only unclipped (clipped, the gradients are not per-row multiples of the residual), and
    not in float16 (its residual, stored in float16, would lose small values; in float32 it would move as much
    as re-reading does)."""
    return not clip and dtype != torch.float16


def _rows_torch(backend, p: StepProblem, s_rows, old, adv, clip_range, adv_clip, clip_mode, reduction, need):
    """The fused forward on a backend without a PPO kernel: the sums of squares, the per-row loss through
    autograd of ``ppo_clip_loss`` (the one definition of the loss), then the gradients with w_ss = dL/dss.

    Unclipped (Triton, torch: both have ``step_fwd_res``): the forward also writes the residual
    y - mean and the gradients are per-row multiples of it (``scale_rows``): the four inputs read once, the
    residual written and read once, each gradient written once (8 latent passes for eps_u and eps_c, against
    10 for step_fwd + step_bwd, which re-reads the inputs). Clipped: step_fwd + step_bwd."""
    mod = backends.get(backend)
    use_res = any(need) and _saves_residual(p.clip, p.x.dtype)
    if use_res:
        ss, res = mod.step_fwd_res(p)
    else:
        ss, _, _ = mod.step_fwd(p, True, False, False)
    ss = ss.reshape(-1)
    d = float(p.row_size)
    with torch.enable_grad():
        lp = logprob_from_sq(ss, s_rows, p.row_size, reduction).detach().requires_grad_()
        out = ppo_clip_loss(lp, old, adv, clip_range=clip_range, adv_clip=adv_clip, clip_mode=clip_mode)
        (dlogp,) = torch.autograd.grad(out.loss, lp)
    logp = lp.detach()
    grads = (None,) * 4
    if any(need):
        dlogp_dss = -1.0 / (2.0 * (d if reduction == "mean" else 1.0) * s_rows * s_rows)
        w_ss = dlogp * dlogp_dss
        if use_res:  # dx = -2w a r, dy = 2w r, deu = -2w b (1 - g) r (-2w b r unguided), dec = -2w b g r
            two_w = 2.0 * w_ss
            a, b, g = p.coef[:, 0], p.coef[:, 1], p.coef[:, 2]
            be = -two_w * b
            k = torch.stack([-two_w * a, two_w, be * (1.0 - g) if p.ec is not None else be, be * g], dim=1)
            grads = mod.scale_rows(res, k, need, p.latent_dims)
        else:
            grads = mod.step_bwd(p, w_ss, None, None, need)
    if data_checks_enabled():  # the bad-row count feeds the checks only: with them off, no kernels for it
        bad = ((~torch.isfinite(logp)).sum() + (s_rows <= 0).sum() + (~torch.isfinite(logp - old)).sum()).to(logp.dtype)
    else:
        bad = out.loss.new_zeros(())
    stats = torch.stack([out.loss.detach(), out.clipfrac, out.approx_kl, out.ratio_mean, bad])
    return logp, dlogp, stats, grads


class _FusedPPO(torch.autograd.Function):
    """Loss and gradients in one forward call; backward hands the held gradients out (scaled when needed)."""

    @staticmethod
    def forward(ctx, x, y, eu, ec, s_tensor, params):
        (clip_range, adv_clip, clip_mode, reduction, clip_x0, latent_dims, backend, coef, rows, abg, report, lead) = params
        need = ctx.needs_input_grad[:4]
        if backend == "cpp":
            logp, dlogp, stats, grads, bad = backends.get("cpp").ppo_step(
                x, y, eu, ec, coef, rows, lead, clip_range, adv_clip, clip_mode, reduction, need)
        else:
            p = StepProblem(x.detach(), y.detach(), eu.detach(), None if ec is None else ec.detach(), None, None, coef,
                            clip_x0 is not None, latent_dims)
            logp, dlogp, stats, grads = _rows_torch(backend, p, rows["s"], rows["old_logp"], rows["advantages"],
                                                    clip_range, adv_clip, clip_mode, reduction, need)
            bad = stats[4]
        loss, clipfrac, approx_kl, ratio_mean, _ = stats.unbind()
        report += (bad, clipfrac, approx_kl, ratio_mean)
        logp_out = logp if logp.shape == lead else logp.reshape(lead)
        # The gradients are handed out by the first backward and not referenced after it, so autograd can
        # adopt them as .grad without a copy; a second backward (retain_graph) recomputes them.
        ctx.held = list(grads) if any(need) else None
        ctx.need = need
        ctx.save_for_backward(rows["s"], dlogp, logp, x, y, eu, ec)
        ctx.meta = (coef, abg, clip_x0, backend, reduction, latent_dims, s_tensor is not None and ctx.needs_input_grad[4],
                    None if s_tensor is None else s_tensor.shape, lead)
        ctx.set_materialize_grads(False)
        return loss, logp_out

    @staticmethod
    def backward(ctx, g_loss, g_logp):
        held, ctx.held = ctx.held, None
        want_ds = ctx.meta[6]
        if held is not None and g_logp is None and not want_ds and g_loss is not None and _is_one(g_loss):
            return (*held, None, None)  # the common case: loss.backward(), gradients computed in forward
        s_rows, dlogp, logp, x, y, eu, ec = ctx.saved_tensors
        coef, (a, b, g), clip_x0, backend, reduction, latent_dims, want_ds, s_shape, lead = ctx.meta
        grads = [None] * 4
        w_rows = None  # dL/dlogp per row still to be turned into gradients by a recompute pass
        if g_loss is not None:
            if held is not None:
                grads = held if _is_one(g_loss) else [None if t is None else t * g_loss.to(t.dtype) for t in held]
            else:
                w_rows = g_loss.to(dlogp.dtype) * dlogp
        if g_logp is not None:  # log p used in a further differentiable term
            w_rows = g_logp.reshape(-1).to(dlogp.dtype) + (0.0 if w_rows is None else w_rows)
        row_size = x.shape[x.dim() - latent_dims :].numel()
        d = float(row_size) if reduction == "mean" else 1.0
        if w_rows is not None and any(ctx.need):
            if coef is None:
                coef = pack_coef(lead, x.device, s_rows.dtype, a, b, g, clip_x0, check_data=False)
            p = StepProblem(x, y, eu, ec, None, None, coef, clip_x0 is not None, latent_dims)
            extra = backends.get(backend).step_bwd(p, w_rows * (-1.0 / (2.0 * d * s_rows * s_rows)), None, None, ctx.need)
            grads = [e if h is None else (h if e is None else h + e) for h, e in zip(grads, extra)]
        ds = None
        if want_ds:
            # dlogp/ds = ss / (d s^3) - D'/s with ss recovered from logp:  ss = -2 d s^2 (logp + D' (log s + c))
            w = torch.zeros_like(dlogp) if g_loss is None else g_loss.to(dlogp.dtype) * dlogp
            if g_logp is not None:
                w = w + g_logp.reshape(-1).to(dlogp.dtype)
            dd = float(row_size) if reduction == "sum" else 1.0
            ss = -2.0 * d * s_rows * s_rows * (logp + dd * (torch.log(s_rows) + HALF_LOG_2PI))
            ds = (w * (ss / (d * s_rows ** 3) - dd / s_rows)).reshape(lead).sum_to_size(s_shape)
        return (*grads, ds, None)


def _is_one(t: torch.Tensor) -> bool:
    """True when a scalar upstream gradient is exactly 1 (free on CPU; one sync on a GPU)."""
    return t.numel() == 1 and float(t) == 1.0
