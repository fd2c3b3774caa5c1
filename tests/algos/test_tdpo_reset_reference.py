"""TDPO-R's neuron reset equals a float64 transcription of the reference's procedure.

Reference: ZiyiZhang27/tdpo, tdpo_pytorch/neuron_recycler.py (NeuronRecycler: hooks, _get_neuron_masks,
_reset_masked_neurons, _reset_optimizer_moments), tdpo_pytorch/critic_model.py (the MLP, its init) and
scripts/train_tdpo.py (input_size, dormant_threshold, the critic's AdamW). The oracle below imports nothing from
diffrl_fast; it measures relu(Linear output) of every Linear but the last (eval mode, no activations between
layers), scores units by mean |.| over the batch normalised by the layer mean (+1e-9), resets the units with
normalised score > tau (the inverted dormant mask), redraws their incoming rows and outgoing columns from
N(0, (1/(d+1))^2), zeroes their incoming biases, and zeroes exp_avg / exp_avg_sq at exactly those entries.

``diffrl_fast.algos.critic.reset_active_neurons`` (measured with ``hidden_activations``, as TDPO_R.after_epoch
does) is held to it on a trained float64 critic with forced-dormant units: the reset units, the set of changed
entries (everything else bit-identical), the redrawn values' mean and std (our draws come from our own
generator, so only their distribution is compared), the biases and the AdamW moments exactly, ``step`` kept.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

F64 = torch.float64
D = 8  # critic input size (the reference's input_size: 768 for CLIP, 1024 for HPSv2)
N_DORMANT = 5  # units per hidden layer forced never to fire


# ---------------------------------------------------------------------------- oracle (no diffrl_fast)


def ref_activations(weights, biases, x):
    """What the reference's forward hooks store: relu(output) of every Linear except the last (eval: no dropout)."""
    acts, h = [], x
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = h @ w.T + b
        if i < len(weights) - 1:
            acts.append(torch.relu(h))
    return acts


def ref_masks(acts, tau):
    """_get_neuron_masks then the inversion in update(reset=True): True where a unit is ACTIVE (reset)."""
    masks = []
    for a in acts:
        score = a.abs().mean(dim=0)
        normalized = score / (score.mean() + 1e-9)
        masks.append(~(normalized <= tau))
    return masks


def ref_reset(weights, biases, moments, masks, input_size, gen):
    """_reset_masked_neurons + _reset_optimizer_moments on copies. moments[(kind, i)] = {exp_avg, exp_avg_sq} for
    kind 'w'/'b' of Linear i. Returns new weights, biases, moments and, per weight, where it was redrawn."""
    std = 1.0 / (input_size + 1)
    W, B = [w.clone() for w in weights], [b.clone() for b in biases]
    M = {k: {n: t.clone() for n, t in v.items()} for k, v in moments.items()}
    redrawn = [torch.zeros_like(w, dtype=torch.bool) for w in W]
    for i, mask in enumerate(masks):  # incoming = Linear i, outgoing = Linear i + 1
        if mask.any():
            W[i][mask] = torch.randn(W[i][mask].shape, generator=gen, dtype=F64) * std
            B[i][mask] = 0.0
            W[i + 1][:, mask] = torch.randn(W[i + 1][:, mask].shape, generator=gen, dtype=F64) * std
            redrawn[i][mask] = True
            redrawn[i + 1][:, mask] = True
        for key, sel in ((("w", i), (mask,)), (("b", i), (mask,)), (("w", i + 1), (slice(None), mask))):
            for n in ("exp_avg", "exp_avg_sq"):
                M[key][n][sel] = 0.0
    return W, B, M, redrawn, std


# ---------------------------------------------------------------------------- the test


def trained_critic():
    """Our float64 critic after 3 AdamW steps (moments and biases non-zero), with N_DORMANT dead units a layer."""
    from diffrl_fast.algos.critic import EmbeddingCritic

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = EmbeddingCritic(D).double()
        x = torch.randn(64, D, dtype=F64)
    x = x / x.norm(dim=1, keepdim=True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (net(x) - 1.0).square().mean().backward()
        opt.step()
    lin = [m for m in net.layers if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for m in lin[:-1]:  # output -1 on every input: relu 0, score 0, dormant
            m.weight[:N_DORMANT] = 0.0
            m.bias[:N_DORMANT] = -1.0
    return net, opt, lin, x


@pytest.mark.parametrize("tau", [0.0, 1.0])  # 0.0: the reference's dormant_threshold; 1.0: above-average units
def test_reset_active_neurons_matches_reference(tau):
    from diffrl_fast.algos.critic import hidden_activations, reset_active_neurons

    net, opt, lin, x = trained_critic()
    W0 = [m.weight.detach().clone() for m in lin]
    B0 = [m.bias.detach().clone() for m in lin]
    params = {("w", i): m.weight for i, m in enumerate(lin)} | {("b", i): m.bias for i, m in enumerate(lin)}
    mom0 = {k: {n: opt.state[p][n].clone() for n in ("exp_avg", "exp_avg_sq")} for k, p in params.items()}
    step0 = {k: opt.state[p]["step"].clone() for k, p in params.items()}

    want = ref_masks(ref_activations(W0, B0, x), tau)
    W_ref, B_ref, M_ref, redrawn, sigma = ref_reset(W0, B0, mom0, want, D, torch.Generator().manual_seed(1))
    got = reset_active_neurons(net, opt, hidden_activations(net, x), tau, torch.Generator().manual_seed(0))

    # which neurons: the reference's active units, never the forced-dormant ones; both classes present
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
        assert not w[:N_DORMANT].any() and int(w.sum()) > 0
    if tau == 1.0:
        assert all(0 < int(w[N_DORMANT:].sum()) < w.numel() - N_DORMANT for w in want)

    for i, m in enumerate(lin):
        w = m.weight.detach()
        assert w.dtype == F64
        # weights change exactly where the reference redraws (incoming rows, outgoing columns); the rest bit-identical
        assert torch.equal(w != W0[i], redrawn[i]), f"Linear {i}: changed entries differ from the reference's"
        assert torch.equal(w[~redrawn[i]], W0[i][~redrawn[i]])
        # biases: 0 for reset units, outgoing biases and the rest untouched (deterministic: exact)
        assert torch.equal(m.bias.detach(), B_ref[i]), f"Linear {i}: biases differ from the reference's"

    # redrawn values ~ N(0, sigma^2), sigma = 1/(d+1), not zeros: per weight where the sample is large, and pooled
    pools = []
    for i, m in enumerate(lin):
        v = m.weight.detach()[redrawn[i]]
        pools.append(v)
        if v.numel() >= 2000:
            assert abs(float(v.std()) / sigma - 1) < 0.05, f"Linear {i}: std {float(v.std()):.5f} vs {sigma:.5f}"
            assert abs(float(v.mean())) < 5 * sigma / math.sqrt(v.numel())
    pooled, pooled_ref = torch.cat(pools), torch.cat([W_ref[i][redrawn[i]] for i in range(len(lin))])
    assert pooled.numel() > 50_000
    assert abs(float(pooled.std()) / sigma - 1) < 0.02 and abs(float(pooled_ref.std()) / sigma - 1) < 0.02

    # AdamW moments: zero exactly at the reset entries, bit-identical elsewhere; step not reset
    for k, p in params.items():
        for n in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][n], M_ref[k][n]), f"{n} of {k} differs from the reference's"
        assert torch.equal(opt.state[p]["step"], step0[k]) and float(step0[k]) == 3
