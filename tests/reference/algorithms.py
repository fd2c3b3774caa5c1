"""Float64 transcriptions of each algorithm's reference objective, written from the papers and the formulas
of their authors' code (file names in each docstring). They share no code with diffrl_fast (nothing here
imports it): the tests in tests/algos/test_reference_objectives.py hold our losses and gradients to these.

Every function takes the same description of one batch of trajectories (``Batch``) and the denoiser as a
callable ``eps(x, t, h)`` (the model is an input, not part of the objective), and returns the scalar loss
of one optimiser step over all the batch's trained rows, differentiable w.r.t. whatever ``eps`` and the
critic parameters depend on. Written for clarity: per-row Python loops where the reference loops.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

F64 = torch.float64


@dataclass
class Batch:
    latents: torch.Tensor  # [B, T+1, C, H, W]: x at the start of each step, then the final sample
    old_logp: torch.Tensor  # [B, T] log-probs recorded at sampling time
    timesteps: torch.Tensor  # [T] what the denoiser is fed at step j
    cond: torch.Tensor  # [B, D] each sample's prompt vector
    uncond: torch.Tensor  # [D] the empty prompt's vector
    guidance: float
    prompts: list
    rewards: torch.Tensor  # [B]


# ---------------------------------------------------------------------------------------- the step


def guided(eps, x, t, h, h0, g):
    """Classifier-free guidance: eps(x, t, h0) + g (eps(x, t, h) - eps(x, t, h0))."""
    u = eps(x, t, h0.expand_as(h))
    return u + g * (eps(x, t, h) - u)


def ddim_mean_std(alphas_cumprod, t, step_ratio, x, e, eta):
    """ddpo-pytorch's ddim_step_with_logprob: the previous timestep clamped at 0, epsilon prediction."""
    prev = max(int(t) - step_ratio, 0)
    at, ap = float(alphas_cumprod[int(t)]), float(alphas_cumprod[prev])
    var = (1 - ap) / (1 - at) * (1 - at / ap)
    std = eta * math.sqrt(var)
    x0 = (x - math.sqrt(1 - at) * e) / math.sqrt(at)
    mean = math.sqrt(ap) * x0 + math.sqrt(1 - ap - std**2) * e
    return mean, std


def flow_mean_std(sigmas, j, x, v, noise_level):
    """flow_grpo's sde_step_with_logprob ("sde"): returns (mean, std of the step, std_dev_t without sqrt(-dt))."""
    sigma, nxt = float(sigmas[j]), float(sigmas[j + 1])
    dt = nxt - sigma
    std_t = math.sqrt(sigma / (1 - (float(sigmas[1]) if sigma == 1 else sigma))) * noise_level
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_t * math.sqrt(-dt), std_t


def mean_logprob(y, mean, std):
    """log N(y; mean, std^2) averaged over a row's elements (the references' .mean over non-batch dims)."""
    return (-((y - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean()


@dataclass
class Sampler:
    """How a step's mean is formed: DDIM (alphas_cumprod, step ratio, eta) or the flow SDE (sigmas, noise level)."""

    kind: str
    alphas_cumprod: Optional[torch.Tensor] = None
    step_ratio: int = 0
    eta: float = 1.0
    sigmas: Optional[torch.Tensor] = None
    noise_level: float = 0.7

    def step(self, j, t, x, e):
        """(mean, std, std_dev_t) of the step j from x with guided output e."""
        if self.kind == "ddim":
            mean, std = ddim_mean_std(self.alphas_cumprod, t, self.step_ratio, x, e, self.eta)
            return mean, std, None
        return flow_mean_std(self.sigmas, j, x, e, self.noise_level)


def row_logp(batch: Batch, sampler: Sampler, eps, b: int, j: int):
    """(log p of sample b's action at step j, the step mean, std, std_dev_t, guided output) under ``eps``."""
    x = batch.latents[b, j].to(F64)[None]
    t = batch.timesteps[j].to(F64).reshape(1)
    e = guided(eps, x, t, batch.cond[b].to(F64)[None], batch.uncond.to(F64)[None], batch.guidance)
    mean, std, std_t = sampler.step(j, float(batch.timesteps[j]), x, e)
    return mean_logprob(batch.latents[b, j + 1].to(F64)[None], mean, std), mean, std, std_t, e


# ---------------------------------------------------------------------------------------- advantages


def per_prompt_normalised(prompts, rewards, min_count, eps=1e-6):
    """ddpo-pytorch's PerPromptStatTracker on its first call: a prompt with fewer than min_count rewards
    uses the whole batch's mean and (population) std; otherwise its own."""
    r = rewards.to(F64)
    out = torch.empty_like(r)
    for p in set(prompts):
        idx = [i for i, q in enumerate(prompts) if q == p]
        if len(idx) < min_count:
            mean, std = r.mean(), r.std(unbiased=False)
        else:
            mean, std = r[idx].mean(), r[idx].std(unbiased=False)
        for i in idx:
            out[i] = (r[i] - mean) / (std + eps)
    return out


def ppo_term(A, rho, eps):
    return torch.maximum(-A * rho, -A * torch.clamp(rho, 1 - eps, 1 + eps))


# ---------------------------------------------------------------------------------------- objectives


def ddpo_is(batch, sampler, eps, steps, *, clip_range, adv_clip, min_count):
    """kvablack/ddpo-pytorch scripts/train.py: A = clamp(per-prompt normalised r, +-adv_clip);
    L = mean over (sample, step) of max(-A rho, -A clamp(rho, 1 +- eps))."""
    A = per_prompt_normalised(batch.prompts, batch.rewards, min_count).clamp(-adv_clip, adv_clip)
    terms = []
    for b in range(len(batch.prompts)):
        for j in steps:
            lp = row_logp(batch, sampler, eps, b, j)[0]
            terms.append(ppo_term(A[b], torch.exp(lp - batch.old_logp[b, j].to(F64)), clip_range))
    return torch.stack(terms).mean()


def ddpo_sf(batch, sampler, eps, steps, *, adv_clip, min_count):
    """DDPO paper eq. (4), the score-function estimator: L = mean over (sample, step) of -A log p."""
    A = per_prompt_normalised(batch.prompts, batch.rewards, min_count).clamp(-adv_clip, adv_clip)
    return torch.stack([-A[b] * row_logp(batch, sampler, eps, b, j)[0] for b in range(len(batch.prompts)) for j in steps]).mean()


def dpok_value(params, x, h, j):
    """google-research dpok/reward_model.py ValueMulti: three per-step-gated linear layers with ReLU, then linear."""
    z = torch.cat([x.reshape(1, -1), h.reshape(1, -1)], dim=1).to(F64)
    for k in (1, 2, 3):
        z = torch.relu(params[f"lin{k}.embed.weight"][j].to(F64) * (z @ params[f"lin{k}.lin.weight"].to(F64).T
                                                                   + params[f"lin{k}.lin.bias"].to(F64)))
    return (z @ params["lin4.weight"].to(F64).T + params["lin4.bias"].to(F64)).reshape(())


def dpok(batch, sampler, eps, ref_eps, steps, *, alpha, beta, clip_range, value_params=None):
    """google-research dpok/train_online_pg.py: per transition, A = r - V(x_t, c, j) (raw reward; A = r without
    the value function), L = alpha * mean(-A clamp(rho, 1 +- eps)) + beta * mean over the batch and the
    latent elements of (eps_hat_theta - eps_hat_pre)^2."""
    pg, kl = [], []
    for b in range(len(batch.prompts)):
        for j in steps:
            lp, _, _, _, e = row_logp(batch, sampler, eps, b, j)
            with torch.no_grad():
                e_pre = row_logp(batch, sampler, ref_eps, b, j)[4]
                A = batch.rewards[b].to(F64)
                if value_params is not None:
                    A = A - dpok_value(value_params, batch.latents[b, j], batch.cond[b], j)
            rho = torch.exp(lp - batch.old_logp[b, j].to(F64))
            pg.append(-alpha * A * torch.clamp(rho, 1 - clip_range, 1 + clip_range))
            kl.append(((e - e_pre) ** 2).mean())
    return torch.stack(pg).mean() + beta * torch.stack(kl).mean()


def d3po(batch, sampler, eps, ref_eps, steps, *, beta, ratio_clip, group, pair=None):
    """yk7333/d3po scripts/rm/train_d3po.py (pairs from the reward; every non-tied pair of a group as the
    human-feedback script uses them): per pair (w, l) and step t,
        l = -log sigmoid(beta (log clamp(pi/pi_ref, 1 +- c)_w - log clamp(pi/pi_ref, 1 +- c)_l)),
    averaged over steps and pairs; with ``pair`` = {i, k} only that pair's terms (scripts/train.py takes an
    optimiser step per pair)."""
    B = len(batch.prompts)
    terms = []
    for g0 in range(0, B, group):
        for i, k in itertools.combinations(range(g0, g0 + group), 2):
            if batch.rewards[i] == batch.rewards[k] or (pair is not None and {i, k} != set(pair)):
                continue
            w, l = (i, k) if batch.rewards[i] > batch.rewards[k] else (k, i)
            for j in steps:
                h = []
                for s in (w, l):
                    lp = row_logp(batch, sampler, eps, s, j)[0]
                    with torch.no_grad():
                        lr = row_logp(batch, sampler, ref_eps, s, j)[0]
                    h.append(torch.log(torch.clamp(torch.exp(lp - lr), 1 - ratio_clip, 1 + ratio_clip)))
                terms.append(-torch.log(torch.sigmoid(beta * (h[0] - h[1]))))
    return torch.stack(terms).mean()


def dense(batch, sampler, eps, ref_eps, draws, *, temperature, log_ratio_clip, group=2):
    """Shentao-YANG/Dense_Reward_T2I preference_based_policy_learner.py: for each pair, with the step indices
    i_1..i_N drawn (with replacement, p ∝ gamma^i) for that pair, e = mean_n clamp(log pi - log pi_init, +-c),
    L = mean over pairs of -log sigmoid(C (e_w - e_l)); the winner has the higher reward.
    ``draws[g]`` are the drawn step indices of group g (adjacent samples)."""
    terms = []
    for gi, g0 in enumerate(range(0, len(batch.prompts), group)):
        a, b = g0, g0 + 1
        w, l = (a, b) if batch.rewards[a] >= batch.rewards[b] else (b, a)
        e = []
        for s in (w, l):
            vals = []
            for j in draws[gi]:
                lp = row_logp(batch, sampler, eps, s, j)[0]
                with torch.no_grad():
                    lr = row_logp(batch, sampler, ref_eps, s, j)[0]
                vals.append(torch.clamp(lp - lr, -log_ratio_clip, log_ratio_clip))
            e.append(torch.stack(vals).mean())
        terms.append(-torch.log(torch.sigmoid(temperature * (e[0] - e[1]))))
    return torch.stack(terms).mean()


def tdpo_critic(params, feature):
    """ZiyiZhang27/tdpo critic_model.py: the LAION aesthetic head's five linear layers, no activations
    (dropout off)."""
    z = feature.to(F64).reshape(1, -1)
    for k in (0, 2, 4, 6, 7):
        z = z @ params[f"layers.{k}.weight"].to(F64).T + params[f"layers.{k}.bias"].to(F64)
    return z.reshape(())


def tdpo(batch, sampler, eps, steps, features, critic_old, critic, *, clip_range, value_clip, value_coef, min_count):
    """ZiyiZhang27/tdpo scripts/train_tdpo.py: r~ = per-prompt normalised reward; V_old from the critic as it
    was at sampling time; T = normalise(r~ - V_old) over all rows (population std, eps 1e-8);
    L = mean(max(-T rho, -T clamp(rho, 1 +- eps))) + value_coef * mean(max((V - r~)^2, (V_old + clamp(V - V_old, +-c) - r~)^2)).
    ``critic_old`` and ``critic`` are the critic's parameters (the same tensors; gradients flow through ``critic``)."""
    rt = per_prompt_normalised(batch.prompts, batch.rewards, min_count)
    rows = [(b, j) for b in range(len(batch.prompts)) for j in steps]
    with torch.no_grad():
        v_old = {r: tdpo_critic(critic_old, features[r]) for r in rows}
        T = torch.stack([rt[b] - v_old[(b, j)] for b, j in rows])
        T = (T - T.mean()) / (T.std(unbiased=False) + 1e-8)
    pg, vl = [], []
    for (b, j), Tbj in zip(rows, T):
        lp = row_logp(batch, sampler, eps, b, j)[0]
        pg.append(ppo_term(Tbj, torch.exp(lp - batch.old_logp[b, j].to(F64)), clip_range))
        v = tdpo_critic(critic, features[(b, j)])
        vc = v_old[(b, j)] + torch.clamp(v - v_old[(b, j)], -value_clip, value_clip)
        vl.append(torch.maximum((v - rt[b]) ** 2, (vc - rt[b]) ** 2))
    return torch.stack(pg).mean() + value_coef * torch.stack(vl).mean()


def prompt_advantages(batch, std_eps, group_std=False):
    """Flow-GRPO's stat tracker: (r - mean over the prompt's samples) / (std + eps), the population std of the
    whole batch (global_std) or of the prompt's samples."""
    r_all = batch.rewards.to(F64)
    A = torch.empty_like(r_all)
    for p in set(batch.prompts):
        idx = [i for i, q in enumerate(batch.prompts) if q == p]
        std = r_all[idx].std(unbiased=False) if group_std else r_all.std(unbiased=False)
        A[idx] = (r_all[idx] - r_all[idx].mean()) / (std + std_eps)
    return A


def forward_row(batch, sampler, b, j, z):
    """(x_t, target, sigma, h, t) of a forward-process row: x0 = sample b's final latent re-noised at step j's
    timestep; flow: sigma = t / 1000, x_t = (1 - sigma) x0 + sigma z, target z - x0; DDIM epsilon: x_t = sqrt(abar)
    x0 + sqrt(1 - abar) z, target z, sigma = sqrt(1 - abar)."""
    x0 = batch.latents[b, -1].to(F64)[None]
    z = z.to(F64)[None]
    tt = float(batch.timesteps[j])
    if sampler.kind == "flow":
        sigma = tt / 1000.0
        xt, target = (1 - sigma) * x0 + sigma * z, z - x0
    else:
        abar = float(sampler.alphas_cumprod[int(tt)])
        sigma = math.sqrt(1 - abar)
        xt, target = math.sqrt(abar) * x0 + sigma * z, z
    return xt, target, sigma, batch.cond[b].to(F64)[None], torch.tensor([tt], dtype=F64)


def grpo_flow(batch, sampler, eps, ref_eps, n_train, *, clip_range, adv_clip, beta, std_eps=1e-4, old_eps=None):
    """yifan123/flow_grpo scripts/train_sd3.py: A = (r - mean of the prompt's rewards) / (std of all rewards + 1e-4),
    clamped to +-adv_clip; steps 0 .. n_train-1; L = mean(max(-A rho, -A clamp(rho, 1 +- eps))) + beta * mean over
    rows of mean_elements(mean_theta - mean_ref)^2 / (2 std_dev_t^2).

    With ``old_eps`` (the rollout's weights), GRPO-Guard: scripts/train_sd3_GRPO_Guard.py with config.rationorm
    (config/grpo_guard.py); per row (b, j), with the rollout's prev_sample_mean (the old weights' step mean),
    std_dev_t and sqrt_dt of the step:
        bias = mean((mean_theta - prev_sample_mean)^2) / (2 (sqrt_dt std_dev_t)^2)
        log r = (log p_theta - old_logp + bias) * sqrt_dt * std_dev_t
        row loss = max(-A r, -A clamp(r, 1 +- eps)) / sqrt_dt^2."""
    A = prompt_advantages(batch, std_eps).clamp(-adv_clip, adv_clip)
    pg, kl = [], []
    for b in range(len(batch.prompts)):
        for j in range(n_train):
            lp, mean, std, std_t, _ = row_logp(batch, sampler, eps, b, j)
            with torch.no_grad():
                ref_mean = row_logp(batch, sampler, ref_eps, b, j)[1]
            log_r, weight = lp - batch.old_logp[b, j].to(F64), 1.0
            if old_eps is not None:
                with torch.no_grad():
                    old_mean = row_logp(batch, sampler, old_eps, b, j)[1]
                sqrt_dt = std / std_t
                bias = ((mean - old_mean) ** 2).mean() / (2 * (sqrt_dt * std_t) ** 2)
                log_r, weight = (log_r + bias) * sqrt_dt * std_t, 1.0 / sqrt_dt**2
            pg.append(ppo_term(A[b], torch.exp(log_r), clip_range) * weight)
            kl.append(((mean - ref_mean) ** 2).mean() / (2 * std_t**2))
    return torch.stack(pg).mean() + beta * torch.stack(kl).mean()


def nft(batch, sampler, eps, old_eps, ref_eps, rows, *, beta, adv_clip, kl_beta, std_eps=1e-4):
    """NVlabs/DiffusionNFT scripts/train_nft_sd3.py (written for any forward process): for each trained row
    (sample b, step j, noise z), x0 = the final sample, x_t = alpha x0 + sigma z (flow: t = timestep / 1000,
    x_t = (1 - t) x0 + t z, x0(v) = x_t - t v; DDIM epsilon: alpha = sqrt(abar), sigma = sqrt(1 - abar),
    x0(e) = (x_t - sigma e) / alpha); A as Flow-GRPO's group advantage, r = clamp((clamp(A)/c)/2 + 0.5, 0, 1);
    v+ = beta v + (1 - beta) v_old, v- = (1 + beta) v_old - beta v; each term |x0(v+-) - x0|^2 / mean|x0(v+-) - x0|
    (element means, weights without gradient, clipped at 1e-5);
    L = mean over rows of c (r pos / beta + (1 - r) neg / beta) + kl_beta mean over rows of mean (v - v_ref)^2."""
    A = prompt_advantages(batch, std_eps)
    terms, kls = [], []
    for b, j, z in rows:
        x0 = batch.latents[b, -1].to(F64)[None]
        tt = float(batch.timesteps[j])
        if sampler.kind == "flow":
            s = tt / 1000.0
            xt = (1 - s) * x0 + s * z.to(F64)[None]
            to_x0 = lambda v, xt=xt, s=s: xt - s * v  # noqa: E731
        else:
            abar = float(sampler.alphas_cumprod[int(tt)])
            xt = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * z.to(F64)[None]
            to_x0 = lambda e, xt=xt, abar=abar: (xt - math.sqrt(1 - abar) * e) / math.sqrt(abar)  # noqa: E731
        h = batch.cond[b].to(F64)[None]
        t1 = torch.tensor([tt], dtype=F64)
        v = eps(xt, t1, h)
        with torch.no_grad():
            v_old = old_eps(xt, t1, h)
            v_ref = ref_eps(xt, t1, h)
        a = float(A[b].clamp(-adv_clip, adv_clip))
        r = min(max((a / adv_clip) / 2 + 0.5, 0.0), 1.0)
        out = 0.0
        for weight, pred in ((r, beta * v + (1 - beta) * v_old), (1 - r, (1 + beta) * v_old - beta * v)):
            d = to_x0(pred) - x0
            w = max(float(d.detach().abs().mean()), 1e-5)
            out = out + weight * (d**2).mean() / w / beta
        terms.append(adv_clip * out)
        kls.append(((v - v_ref) ** 2).mean())
    return torch.stack(terms).mean() + kl_beta * torch.stack(kls).mean()


def awm_discrete_steps(num_steps, n, fraction, u, *, start=0):
    """scxue/advantage_weighted_matching train_sd3_awm.py, time_type "discrete" (start 0) / "discrete_wo_init"
    (start 1): boundaries = linspace(start, int(num_steps * fraction), n + 1).long(); index k = lower_k +
    long(u_k * (upper_k - lower_k)) for uniform draws u."""
    hi = int(num_steps * fraction)
    bounds = [int(float(x)) for x in torch.linspace(start, hi, n + 1)]
    return [bounds[k] + int(float(u[k]) * (bounds[k + 1] - bounds[k])) for k in range(n)]


def awm_surrogate(logp, old_logp, A, *, clip_range, loss_type):
    """train_sd3_awm.py's policy loss over [T, B] log-probs and [B] (clipped, scaled) advantages: exp_first
    ratio exp(logp - old) per entry with A repeated over T; sum_first ratio exp(mean_T logp - mean_T old) per
    sample; mean of max(-A ratio, -A clamp(ratio, 1 - eps, 1 + eps))."""
    if loss_type == "sum_first":
        ratio = torch.exp(logp.mean(dim=0) - old_logp.mean(dim=0).detach())
        adv = A
    else:
        ratio = torch.exp(logp.reshape(-1) - old_logp.reshape(-1).detach())
        adv = A[None].repeat(logp.shape[0], 1).reshape(-1)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.mean(torch.maximum(unclipped, clipped))


def awm(batch, sampler, eps, ref_eps, ema_eps, rows, *, adv_clip, advantage_max, clip_range, power, beta, ema_beta,
        std_eps=1e-4, old_eps=None):
    """scxue/advantage_weighted_matching scripts/train_sd3_awm.py (compute_log_prob_awm, weighting "ghuber",
    loss_type "exp_first", kl_weight and kl_ema_weight "Uniform", one optimiser step: old log-probs are the
    current ones, detached), written for any forward process: for each row (sample b, step j, noise z), x0 =
    the final sample; flow: t = timestep / 1000, x_t = (1 - t) x0 + t z, target z - x0, sigma = t; DDIM epsilon:
    x_t = sqrt(abar) x0 + sqrt(1 - abar) z, target z, sigma = sqrt(1 - abar). log_prob = -(((out - target)^2
    mean + 1e-10)^p - 1e-10^p) sigma / p; A = Flow-GRPO's group advantage clamped to +-adv_clip, then
    / adv_clip * advantage_max; L = surrogate + beta mean_rows (out - out_ref)^2 + ema_beta mean_rows (out - out_ema)^2.
    With ``old_eps`` (a later optimiser step of the epoch) the old log-probs are that model's, at the same x_t."""
    A = prompt_advantages(batch, std_eps).clamp(-adv_clip, adv_clip) / adv_clip * advantage_max
    terms, kls, ema_kls = [], [], []
    for b, j, z in rows:
        xt, target, sigma, h, t1 = forward_row(batch, sampler, b, j, z)
        out = eps(xt, t1, h)
        with torch.no_grad():
            out_ref, out_ema = ref_eps(xt, t1, h), ema_eps(xt, t1, h)
        def log_prob(o):
            return -(torch.pow(((o - target) ** 2).mean() + 1e-10, power) - 1e-10**power) * sigma / power

        logp = log_prob(out)
        with torch.no_grad():
            old = logp.detach() if old_eps is None else log_prob(old_eps(xt, t1, h))
        terms.append(awm_surrogate(logp.reshape(1, 1), old.reshape(1, 1), A[b].reshape(1),
                                   clip_range=clip_range, loss_type="exp_first"))
        kls.append(((out - out_ref) ** 2).mean())
        ema_kls.append(((out - out_ema) ** 2).mean())
    return torch.stack(terms).mean() + beta * torch.stack(kls).mean() + ema_beta * torch.stack(ema_kls).mean()


def dgpo(batch, sampler, eps, ref_eps, ema_eps, rows, *, group_size, beta, clip_range, kl_beta, adv_clip, std_eps=1e-4):
    """Luo-Yihong/DGPO scripts/train_sd3_dgpo.py (compute_group_dgpo_loss_allreduce, config/dgpo.py: use_old,
    clip_dsm, kl_cfg 1, the frozen base model as reference), written for any forward process: for each row
    (sample b, step j, noise z), x0 = the final sample; flow: t = timestep / 1000, x_t = (1 - t) x0 + t z,
    target z - x0; DDIM epsilon: x_t = sqrt(abar) x0 + sqrt(1 - abar) z, target z. dsm = mean (target - out)^2
    for the policy, ref_dsm for the reference, old_dsm for the EMA copy. A = (r - prompt mean) / (prompt std +
    eps) (population std, global_std False), clamped to +-adv_clip. A row is clipped when A > 0 and
    exp(old_dsm - dsm) > 1 + clip_range, or A <= 0 and it is < 1 - clip_range: its dsm is then detached. Per
    group (samples b // G, at one step j): group_sum = sum A beta (dsm.detach() - ref_dsm) / G, weight =
    sigmoid(group_sum) detached; L = mean over rows of weight A dsm + kl_beta mean over rows of (out - out_ref)^2."""
    A = prompt_advantages(batch, std_eps, group_std=True).clamp(-adv_clip, adv_clip)
    per_row = []
    for b, j, z in rows:
        xt, target, _, h, t1 = forward_row(batch, sampler, b, j, z)
        out = eps(xt, t1, h)
        with torch.no_grad():
            out_ref, out_old = ref_eps(xt, t1, h), ema_eps(xt, t1, h)
        dsm = ((target - out) ** 2).mean()
        ref_dsm = ((target - out_ref) ** 2).mean()
        old_dsm = ((target - out_old) ** 2).mean()
        ratio = float(torch.exp(old_dsm - dsm.detach()))
        a = float(A[b])
        if (a > 0 and ratio > 1 + clip_range) or (a <= 0 and ratio < 1 - clip_range):
            dsm_used = dsm.detach()
        else:
            dsm_used = dsm
        per_row.append(((b // group_size, j), a, dsm, dsm_used, ref_dsm, ((out - out_ref) ** 2).mean()))
    group_sum = {}
    for key, a, dsm, _, ref_dsm, _ in per_row:
        group_sum[key] = group_sum.get(key, 0.0) + a * beta * (float(dsm.detach()) - float(ref_dsm)) / group_size
    terms = [1.0 / (1.0 + math.exp(-group_sum[key])) * a * dsm_used for key, a, _, dsm_used, _, _ in per_row]
    kls = [kl for *_, kl in per_row]
    return torch.stack(terms).mean() + kl_beta * torch.stack(kls).mean()


EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------- tree rollouts


def branchgrpo_edges(rewards, branch_steps, num_steps, factor=2, fusion="mean", edge_logp=None, alpha=1.0):
    """BranchGRPO's trained edges of one tree and their advantages (Fredreic1849/BranchGRPO,
    fastvideo/train_branchgrpo_flux.py: run_tree_sample_step builds the tree, compute_node_rewards_from_leaves and
    compute_hierarchical_advantages_by_depth score it, train_one_step_tree walks every parent -> child edge once).

    The tree is built as the reference walks it: a root at step 0 holding all leaves; at step i every node gets
    ``factor`` children (i a split point, the leaves dealt in consecutive blocks) or one; a child's depth is i + 1.
    Node rewards: the mean of the node's leaves' rewards, or bottom-up sum_c softmax_c(alpha logp_c) R(c) with logp_c
    the edge into c (``edge_logp[first leaf of c][i]``). Per depth: A = (R - mean) / (std + 1e-8), std with N - 1,
    A = 0 for a single node or std < 1e-6. Returns {(first leaf of the child, step i): the child's advantage}.
    """
    nodes = []  # dicts: leaves, depth, children, step of the edge into it

    def build(leaves, i, edge_step):
        node = {"leaves": leaves, "depth": i, "children": [], "edge_step": edge_step}
        nodes.append(node)
        if i < num_steps:
            k = factor if i in branch_steps else 1
            size = len(leaves) // k
            node["children"] = [build(leaves[c * size:(c + 1) * size], i + 1, i) for c in range(k)]
        return node

    root = build(list(range(len(rewards))), 0, None)

    def reward(node):
        if not node["children"]:
            node["R"] = float(rewards[node["leaves"][0]])
        elif fusion == "mean":
            for c in node["children"]:
                reward(c)
            node["R"] = sum(float(rewards[l]) for l in node["leaves"]) / len(node["leaves"])
        else:
            for c in node["children"]:
                reward(c)
            z = [alpha * float(edge_logp[c["leaves"][0]][c["edge_step"]]) for c in node["children"]]
            m = max(z)
            w = [math.exp(v - m) for v in z]
            node["R"] = sum(wi * c["R"] for wi, c in zip(w, node["children"])) / sum(w)
        return node["R"]

    reward(root)
    by_depth = {}
    for n in nodes:
        by_depth.setdefault(n["depth"], []).append(n)
    for group in by_depth.values():
        vals = [n["R"] for n in group]
        if len(vals) < 2:
            for n in group:
                n["A"] = 0.0
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for n in group:
            n["A"] = 0.0 if std < 1e-6 else (n["R"] - mean) / (std + 1e-8)
    return {(n["leaves"][0], n["edge_step"]): n["A"] for n in nodes if n["edge_step"] is not None}


def branchgrpo_pruned(trees, branch_steps, num_steps, sde_steps, depths, width_mode, ratio, factor=2):
    """The edges BranchGRPO trains after pruning, for a batch of trees (``trees``: each tree's leaf rewards), as
    {(tree, first leaf of the child, step)} (Fredreic1849/BranchGRPO, fastvideo/train_branchgrpo_flux.py: the
    training samples of collect_all_transitions, the mixed mode's SDE-step filter, then the depth and the width
    pruning blocks, with should_prune true).

    Samples are collected per root in depth-first pre-order (``branchgrpo_edges`` keeps that order): step = the
    parent's step, child_depth = step + 1, advantage = the child's. Depth pruning drops child depths in ``depths``.
    Width pruning looks at the samples with step > max(split points): mode 1 groups them by their ancestor at step
    last + 1 and keeps, per group, max(1, int(n ratio)) by advantage, descending, a stable sort; mode 2 sorts all of
    them so and keeps the first keep // 2 and the last keep - keep // 2, keep = max(2, int(n ratio)).
    """
    samples = []
    for t, rewards in enumerate(trees):
        for (leaf, step), adv in branchgrpo_edges(rewards, set(branch_steps), num_steps, factor).items():
            samples.append({"tree": t, "leaf": leaf, "step": step, "child_depth": step + 1, "advantage": adv})
    samples = [x for x in samples if x["step"] in set(sde_steps)]
    samples = [x for x in samples if x["child_depth"] not in set(depths)]
    if width_mode:
        last = max(branch_steps)
        tail = [x for x in samples if x["step"] > last]
        other = [x for x in samples if x["step"] <= last]
        if width_mode == 1:
            groups = {}  # after the last split every node holds one leaf: a sample's ancestor at step last + 1
            for x in tail:  # is the node of its own leaf (find_last_split_branch)
                groups.setdefault((x["tree"], x["leaf"]), []).append(x)
            kept = []
            for group in groups.values():
                n = max(1, int(len(group) * ratio))
                kept += sorted(group, key=lambda x: x["advantage"], reverse=True)[:n]
        else:
            ranked = sorted(tail, key=lambda x: x["advantage"], reverse=True)
            n = max(2, int(len(ranked) * ratio))
            best, worst = n // 2, n - n // 2
            kept = ranked[:best] + (ranked[-worst:] if worst > 0 else [])
        samples = other + kept
    return {(x["tree"], x["leaf"], x["step"]) for x in samples}


# ------------------------------------------------------------------------- MixGRPO-Flash's ODE tail

def mixgrpo_post_sigmas(sigma_schedule, last_window, ratio, shift):
    """MixGRPO-Flash's compressed schedule (zqqqqz2000/MixGRPO, fastvideo/utils/sampling_utils.py: the
    dpm_apply_strategy == "post" branch): the schedule's first last_window + 1 sigmas, then
    shift(linspace(t_{L+1}, 0, n)) with t the unshifted linspace(1, 0, N + 1) and n = int(max((N - L) ratio, 1)),
    shift(t) = s t / (1 + (s - 1) t) (its sd3_time_shift)."""
    N = len(sigma_schedule) - 1
    n = int(max((N - last_window) * ratio, 1))
    t0 = torch.linspace(1, 0, N + 1, dtype=F64)[last_window + 1].item()
    post = torch.linspace(t0, 0, n, dtype=F64)
    post = shift * post / (1 + (shift - 1) * post)
    return torch.cat([torch.as_tensor(sigma_schedule, dtype=F64)[:last_window + 1], post])


def mixgrpo_dpm_tail(x, v_fn, sigmas, x0_history, sigma_history):
    """MixGRPO-Flash's DPM-Solver++ (order 2, midpoint) over ``sigmas`` (the tail, from sigma_{L+1} to 0), as its
    sampling_utils.py computes it: alpha = 1 - sigma, lambda = log(alpha) - log(sigma), x0 = x - sigma v; first
    order at the final step (lower_order_final), else h = lambda_t - lambda_s0, h_0 = lambda_s0 - lambda_s1,
    r0 = h_0 / h, D0 = m0, D1 = (m0 - m1) / r0, x_t = sigma_t / sigma_s0 x - alpha_t (e^{-h} - 1) D0
    - 0.5 alpha_t (e^{-h} - 1) D1. ``x0_history`` / ``sigma_history``: the data prediction and sigma of the
    step before the tail (the solver's history, filled during the window)."""
    m1, s1 = x0_history, sigma_history
    for k in range(len(sigmas) - 1):
        s0, st = float(sigmas[k]), float(sigmas[k + 1])
        m0 = x - s0 * v_fn(x, s0)
        if k == len(sigmas) - 2:  # lower_order_final: sigma_t = 0, lambda_t = inf, exp(-h) = 0
            x = m0
        else:
            lam = lambda s: math.log(1 - s) - math.log(s)  # noqa: E731
            h, h0 = lam(st) - lam(s0), lam(s0) - lam(s1)
            r0 = h0 / h
            D0, D1 = m0, (1.0 / r0) * (m0 - m1)
            a_t = 1 - st
            x = (st / s0) * x - (a_t * (math.exp(-h) - 1.0)) * D0 - 0.5 * (a_t * (math.exp(-h) - 1.0)) * D1
        m1, s1 = m0, s0
    return x
