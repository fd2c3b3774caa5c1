"""Float64 oracles written straight from the formulas of ../shared/DESIGN.md section 3.

They share no code with diffrl_fast (no import of it at all): every backend is checked against these.
Written for clarity, not speed; the per-row losses use explicit Python loops on purpose.
"""
from __future__ import annotations

import itertools
import math

import torch

F64 = torch.float64


def _rowwise(v, lead, nd):
    """A float or tensor broadcast to the leading dims, then given nd trailing singleton dims."""
    t = torch.as_tensor(v, dtype=F64)
    t = torch.broadcast_to(t, lead)
    return t.reshape(*lead, *([1] * nd))


def step_mean(x, eu, ec, a, b, g, clip=None, latent_dims=3):
    """mean = a x + b (eu + g (ec - eu)); with clip = (m0, cx, ce, limit):
    mean = m0 clamp(cx x + ce e) + (a - m0 cx) x + (b - m0 ce) e."""
    x = x.to(F64)
    lead = x.shape[: x.dim() - latent_dims]
    A, B, G = (_rowwise(v, lead, latent_dims) for v in (a, b, g))
    if eu is None:
        return A * x
    e = eu.to(F64) if ec is None else eu.to(F64) + G * (ec.to(F64) - eu.to(F64))
    if clip is None:
        return A * x + B * e
    m0, cx, ce, lim = (_rowwise(v, lead, latent_dims) for v in clip)
    x0 = cx * x + ce * e
    return m0 * torch.clamp(x0, -lim, lim) + (A - m0 * cx) * x + (B - m0 * ce) * e


def gaussian_logprob(y, mean, std, reduction="mean", latent_dims=3):
    """log N(y; mean, std^2 I) summed (or averaged) over the last latent_dims dims, elementwise first."""
    y, mean = y.to(F64), mean.to(F64)
    lead = y.shape[: y.dim() - latent_dims]
    s = _rowwise(std, lead, latent_dims) if not torch.is_tensor(std) else torch.broadcast_to(std.to(F64), lead).reshape(*lead, *([1] * latent_dims))
    elem = -((y - mean) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(y.dim() - latent_dims, y.dim()))
    return elem.mean(dims) if reduction == "mean" else elem.sum(dims)


def step_logprob(x, y, eu, ec, a, b, g, s, reduction="mean", clip=None, latent_dims=3):
    return gaussian_logprob(y, step_mean(x, eu, ec, a, b, g, clip, latent_dims), s, reduction, latent_dims)


def gaussian_kl(mean, ref_mean, std, reduction="mean", latent_dims=3):
    """KL(N(mean, s^2) || N(ref, s^2)) = sum (mean - ref)^2 / (2 s^2) (mean over elements for 'mean')."""
    mean, ref_mean = mean.to(F64), ref_mean.to(F64)
    lead = mean.shape[: mean.dim() - latent_dims]
    s = torch.broadcast_to(torch.as_tensor(std, dtype=F64), lead).reshape(*lead, *([1] * latent_dims))
    elem = (mean - ref_mean) ** 2 / (2 * s**2)
    dims = tuple(range(mean.dim() - latent_dims, mean.dim()))
    return elem.mean(dims) if reduction == "mean" else elem.sum(dims)


def step_kl(x, eu, ec, reu, rec, a, b, g, s, reduction="mean", clip=None, latent_dims=3):
    return gaussian_kl(step_mean(x, eu, ec, a, b, g, clip, latent_dims), step_mean(x, reu, rec, a, b, g, clip, latent_dims), s, reduction, latent_dims)


def ppo_loss(logp, old_logp, adv, clip_range, adv_clip, clamp_only=False):
    """Row by row: A = clip(adv); rho = exp(logp - old); l = max(-A rho, -A clip(rho)) (or only -A clip(rho)
    with clamp_only, DPOK's form) or -A logp; mean."""
    logp, old, adv = logp.to(F64).flatten(), old_logp.to(F64).flatten(), adv.to(F64).flatten()
    terms, clipped, kls, ratios = [], 0, [], []
    for i in range(logp.numel()):
        A = adv[i] if adv_clip is None else torch.clamp(adv[i], -adv_clip, adv_clip)
        rho = torch.exp(logp[i] - old[i])
        if clip_range is None:
            terms.append(-A * logp[i])
        else:
            c = -A * torch.clamp(rho, 1 - clip_range, 1 + clip_range)
            terms.append(c if clamp_only else torch.maximum(-A * rho, c))
            clipped += int(abs(rho.item() - 1) > clip_range)
        kls.append(0.5 * (logp[i] - old[i]) ** 2)
        ratios.append(rho)
    n = logp.numel()
    return sum(terms) / n, clipped / n, sum(kls) / n, sum(ratios) / n


def dpo_loss(lw, rw, ll, rl, beta, weights=None, ratio_clip=None):
    """sum_i w_i * -log sigmoid(beta ((lw - rw) - (ll - rl))) / sum_i w_i, log-ratios clamped if asked."""
    w = torch.ones_like(lw, dtype=F64) if weights is None else torch.broadcast_to(weights.to(F64), lw.shape)
    lw, rw, ll, rl, w = (t.to(F64).flatten() for t in (lw, rw, ll, rl, w))
    num, den = 0.0, 0.0
    for i in range(lw.numel()):
        hw, hl = lw[i] - rw[i], ll[i] - rl[i]
        if ratio_clip is not None:
            lo, hi = math.log(1 - ratio_clip), math.log(1 + ratio_clip)
            hw, hl = torch.clamp(hw, lo, hi), torch.clamp(hl, lo, hi)
        z = beta * (hw - hl)
        num = num + w[i] * -torch.log(1 / (1 + torch.exp(-z)))
        den = den + w[i]
    return num / den


def plackett_luce(scores, temperature):
    """-log P(ranking) with P = prod_k exp(u_k) / sum_{j >= k} exp(u_j), u = C * scores; mean over rows."""
    scores = scores.to(F64).reshape(-1, scores.shape[-1])
    total = 0.0
    for row in scores:
        u = temperature * row
        logp = 0.0
        for k in range(u.numel()):
            logp = logp + u[k] - torch.log(torch.exp(u[k:]).sum())
        total = total - logp
    return total / scores.shape[0]


def plackett_luce_by_enumeration(scores, temperature):
    """Same quantity through the normalised distribution over all K! rankings (checks the oracle itself)."""
    u = (temperature * scores.to(F64)).tolist()
    K = len(u)

    def unnorm(perm):
        p = 1.0
        for k in range(K):
            rest = perm[k:]
            p *= math.exp(u[perm[k]]) / sum(math.exp(u[j]) for j in rest)
        return p

    total = sum(unnorm(p) for p in itertools.permutations(range(K)))
    return -math.log(unnorm(tuple(range(K))) / total)


def ddim_step(alphas_cumprod, final_alpha_cumprod, t, prev_t, x, model_output, eta, noise, prediction_type="epsilon", clip_range=None):
    """DDIM (Song et al. 2021, eq. 12 and 16), float64: returns (prev_sample, mean, std)."""
    x, out = x.to(F64), model_output.to(F64)
    at = float(alphas_cumprod[t])
    ap = float(alphas_cumprod[prev_t]) if prev_t >= 0 else float(final_alpha_cumprod)
    if prediction_type == "epsilon":
        x0, eps = (x - math.sqrt(1 - at) * out) / math.sqrt(at), out
    elif prediction_type == "v_prediction":
        x0, eps = math.sqrt(at) * x - math.sqrt(1 - at) * out, math.sqrt(at) * out + math.sqrt(1 - at) * x
    else:
        x0, eps = out, (x - math.sqrt(at) * out) / math.sqrt(1 - at)
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    var = (1 - ap) / (1 - at) * (1 - at / ap)
    std = eta * math.sqrt(var)
    mean = math.sqrt(ap) * x0 + math.sqrt(1 - ap - std**2) * eps
    return mean + std * noise.to(F64), mean, std


def flow_sde_step(sigmas, j, x, v, noise_level, noise):
    """Flow-GRPO's SDE step (Liu et al. 2025), float64: returns (prev_sample, mean, std)."""
    sig = [float(s) for s in sigmas]
    sigma, nxt = sig[j], sig[j + 1]
    dt = nxt - sigma
    denom = 1 - (sig[1] if sigma == 1 else sigma)
    std_t = math.sqrt(sigma / denom) * noise_level
    x, v = x.to(F64), v.to(F64)
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    s = std_t * math.sqrt(-dt)
    return mean + s * noise.to(F64), mean, s


def flow_grpo_step(sigmas, idx, x, v, noise_level, prev, sde_type):
    """Flow-GRPO's ``sde_step_with_logprob`` in float64 (Liu et al. 2025), per-sample step indices ``idx``.

    Returns (log_prob [B] = mean over the non-batch dims, mean, std_dev_t [B]). "sde": std_t =
    noise_level sqrt(sigma / (1 - sigma)) with sigma = 1 replaced by sigmas[1] in the denominator, log N of
    prev under (mean, (std_t sqrt(-dt))^2); "cps": std_t = sigma_next sin(noise_level pi / 2),
    log_prob = -(prev - mean)^2.
    """
    sig = [float(s) for s in sigmas]
    x, v, prev = x.to(F64), v.to(F64), prev.to(F64)
    logps, means, stds = [], [], []
    for i, j in enumerate(idx):
        sigma, nxt = sig[j], sig[j + 1]
        dt = nxt - sigma
        if sde_type == "sde":
            std_t = math.sqrt(sigma / (1 - (sig[1] if sigma == 1 else sigma))) * noise_level
            mean = x[i] * (1 + std_t**2 / (2 * sigma) * dt) + v[i] * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
            s = std_t * math.sqrt(-dt)
            elem = -((prev[i] - mean) ** 2) / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)
        else:
            std_t = nxt * math.sin(noise_level * math.pi / 2)
            mean = (x[i] - sigma * v[i]) * (1 - nxt) + (x[i] + (1 - sigma) * v[i]) * math.sqrt(nxt**2 - std_t**2)
            elem = -((prev[i] - mean) ** 2)
        logps.append(elem.mean())
        means.append(mean)
        stds.append(std_t)
    return torch.stack(logps), torch.stack(means), torch.tensor(stds, dtype=F64)


def dancegrpo_step(sigmas, j, x, v, eta, prev):
    """DanceGRPO's ``flux_step`` with ``sde_solver=True`` (Xue et al. 2025; fastvideo/train_grpo_wan_2_1.py) in float64,
    written in its own score form: x0 = x - sigma v, score = -(x - x0 (1 - sigma)) / sigma^2,
    mean = x + dsigma v - 0.5 eta^2 score dsigma, std = eta sqrt(sigma - sigma'), log_prob = mean over the elements of
    log N(prev; mean, std^2). Returns (log_prob [B], mean, std)."""
    sig = [float(s) for s in sigmas]
    sigma, nxt = sig[j], sig[j + 1]
    x, v, prev = x.to(F64), v.to(F64), prev.to(F64)
    dsigma = nxt - sigma
    x0 = x - sigma * v
    score = -(x - x0 * (1 - sigma)) / sigma**2
    mean = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
    std = eta * math.sqrt(sigma - nxt)
    elem = -((prev - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    return elem.mean(dim=tuple(range(1, elem.dim()))), mean, std
