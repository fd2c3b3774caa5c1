"""Each algorithm's reference conventions, beyond its loss formula: how samples are drawn, which steps are
trained and how often the optimiser steps, what the critic learns from and when; and one implementation
under every option that reuses a loss."""
from __future__ import annotations

import math

import pytest
import torch

from diffrl_fast.algos.common import chunk_kl, policy_outputs
from diffrl_fast.config_utils import load_config
from diffrl_fast.diffusion.recompute import pack_chunk
from diffrl_fast.train.advantages import PerPromptStatTracker
from diffrl_fast.train.config import Config, validate
from diffrl_fast.train.trainer import Trainer
from tests.algos.toy import ToyModel, toy_reward

COMMON = ["prompts=[a, b, c, d]", "sample.num_steps=4", "sample.batch_size=8", "sample.num_batches_per_epoch=1",
          "train.batch_size=8", "train.chunk_size=2", "sample.guidance_scale=3.0", "num_epochs=1", "log.eval_samples=0",
          "log.progress=false", "log.tensorboard=false", "reward.overlap=false"]


def trainer(tmp_path, algo, *extra, scheduler="ddim", name="r"):
    cfg = validate(load_config(Config, None, [f"algo={algo}", *COMMON, f"output_dir={tmp_path}", f"name={name}", *extra]))
    return Trainer(cfg, tmp_path / name, model=ToyModel(scheduler), reward_fn=toy_reward, log_fn=lambda s: None)


@pytest.mark.parametrize("shared", [True, False])
def test_d3po_pairs_share_their_initial_noise(tmp_path, shared):
    t = trainer(tmp_path, "d3po", f"d3po.shared_initial_noise={str(shared).lower()}", "d3po.samples_per_prompt=4")
    traj, _ = t.sample_epoch(0)
    x0, x1 = traj.latents[:, 0], traj.latents[:, 1]
    for g in range(0, 8, 4):
        same = [torch.equal(x0[g], x0[g + i]) for i in range(1, 4)]
        assert all(same) if shared else not any(same)
        assert not any(torch.equal(x1[g], x1[g + i]) for i in range(1, 4))  # the step noise is each sample's own
    assert not torch.equal(x0[0], x0[4])  # groups differ


def test_dense_weights_step_t_by_gamma_to_the_t_at_the_defaults(tmp_path):
    """The reference draws steps with replacement from Cat(gamma^t / sum gamma^t) and averages the draws,
    so step t's expected weight in e_k is gamma^t / sum gamma^t (T = 20, gamma = 0.9: 0.114 at t = 0, 0.015 at 19)."""
    t = trainer(tmp_path, "dense", "sample.num_steps=20", "dense.num_timesteps=5")
    algo, n = t.algo, 8000
    order = algo.step_order(n, torch.arange(20), 5, torch.Generator().manual_seed(0))
    assert torch.equal(order[0::2], order[1::2])  # a group's samples share their draws
    w = algo._row_weights(order)  # weights of the draws in e_k
    expected = torch.zeros(20, dtype=torch.float64).index_add_(0, order.flatten(), w.double().flatten()) / n
    want = 0.9 ** torch.arange(20, dtype=torch.float64)
    want /= want.sum()
    assert abs(float(want[0]) - 0.1138) < 1e-3 and abs(float(want[19]) - 0.0154) < 1e-3
    se = (want * (1 - want) / (n * 5 / 2)).sqrt()  # draws per group are independent: n/2 groups x 5 draws
    assert float(((expected - want).abs() / se).max()) < 5
    assert any(len(set(r)) < 5 for r in order[:200].tolist())  # with replacement: repeats happen
    weighted = trainer(tmp_path, "dense", "sample.num_steps=20", "dense.num_timesteps=5", "dense.timestep_sampling=weighted",
                       name="w").algo
    o = weighted.step_order(4, torch.arange(20), 5, torch.Generator().manual_seed(1))
    ww = weighted._row_weights(o).double()
    assert all(len(set(r)) == 5 for r in o.tolist())
    assert torch.allclose(ww, 0.9 ** o.double() / (0.9 ** o.double()).sum(1, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("mode,groups", [("minibatches", 2), ("chunks", 4), ("round", 1)])
def test_optimizer_step_structure(tmp_path, mode, groups):
    t = trainer(tmp_path, "ddpo_is", f"train.optimizer_step_every={mode}", "train.batch_size=4", "train.gradient_accumulation_steps=1")
    got = t.step_groups(2, 2)  # 2 minibatches x 2 chunks
    assert len(got) == groups and [u for g in got for u in g] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_ddpo_sf_takes_one_step_per_round(tmp_path):
    t = trainer(tmp_path, "ddpo_sf", "train.batch_size=2")
    assert t.cfg.train.optimizer_step_every == "round"
    traj, rewards = t.sample_epoch(0)
    stats = t.train_epoch(0, traj, t.algo.prepare(t.run_context, traj, rewards))
    assert stats["optimizer_steps"] == 1  # 4 minibatches, 1 step
    t2 = trainer(tmp_path, "ddpo_sf", "train.batch_size=2", "train.optimizer_step_every=minibatches",
                 "train.gradient_accumulation_steps=1", name="biased")
    traj, rewards = t2.sample_epoch(0)
    assert t2.train_epoch(0, traj, t2.algo.prepare(t2.run_context, traj, rewards))["optimizer_steps"] == 4


def test_tdpo_critic_target_is_per_prompt_normalised_and_temporal_rewards_out_of_sample(tmp_path):
    t = trainer(tmp_path, "tdpo", "num_epochs=2")
    critic = t.algo.critic
    traj, rewards = t.sample_epoch(0)
    tracker = PerPromptStatTracker(t.cfg.advantage.buffer_size, t.cfg.advantage.min_count)
    before = {n: p.detach().clone() for n, p in critic.net.named_parameters()}
    data = t.algo.prepare(t.run_context, traj, rewards)
    assert torch.allclose(data.extra["returns"], tracker.update(traj.prompts, rewards))
    # T = normalise(r~ - V_old(x_t)) with the critic as it was before it saw this epoch's data
    assert all(torch.equal(p, before[n]) for n, p in critic.net.named_parameters())
    b = torch.arange(8).repeat_interleave(4)
    j = torch.arange(4).repeat(8)
    v = critic.predict(traj, data.extra["features"], b, j)
    raw = data.extra["returns"][b] - v
    assert torch.allclose(data.advantages[b, j], (raw - raw.mean()) / (raw.std(unbiased=False) + 1e-8), atol=1e-5)
    t.train_epoch(0, traj, data)  # the critic trains jointly with the policy, one step per policy step
    assert any(not torch.equal(p, before[n]) for n, p in critic.net.named_parameters())
    # the next epoch's temporal rewards come from the critic before its updates on that epoch: out-of-sample
    t.epoch = 1
    traj2, rewards2 = t.sample_epoch(1)
    after = {n: p.detach().clone() for n, p in critic.net.named_parameters()}
    data2 = t.algo.prepare(t.run_context, traj2, rewards2)
    assert all(torch.equal(p, after[n]) for n, p in critic.net.named_parameters())
    assert torch.allclose(data2.extra["v_old"][b, j], critic.predict(traj2, data2.extra["features"], b, j))


def test_tdpo_critic_is_the_reference_mlp_trained_with_dropout(tmp_path):
    from torch import nn

    net = trainer(tmp_path, "tdpo").algo.critic.net
    linear = [m for m in net.layers if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linear] == [1024, 128, 64, 16, 1] and linear[0].in_features == 16
    assert [m.p for m in net.layers if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.1]
    assert not any(isinstance(m, (nn.ReLU, nn.SiLU, nn.GELU)) for m in net.modules())  # no activations
    assert all(float(m.bias.detach().abs().max()) == 0 for m in linear)
    assert abs(float(linear[0].weight.std()) - 1 / 17) < 0.005  # N(0, (1/(d+1))^2), d = 16


def test_tdpo_r_resets_active_neurons_of_every_hidden_layer(tmp_path):
    from diffrl_fast.algos.critic import hidden_activations, reset_active_neurons

    t = trainer(tmp_path, "tdpo_r")
    net, opt = t.algo.critic.net, t.algo.critic.opt
    x = torch.randn(32, 16)
    net(x).sum().backward()
    opt.optimizer.step()  # moments exist
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    acts = hidden_activations(net, x)
    masks = reset_active_neurons(net, opt.optimizer, acts, 1.0, torch.Generator().manual_seed(0))  # above-average units
    lin = [m for m in net.layers if isinstance(m, torch.nn.Linear)]
    assert len(masks) == 4
    for i, (m, a) in enumerate(zip(masks, acts)):
        score = a.clamp(min=0).mean(0)
        assert torch.equal(m, score / (score.mean() + 1e-9) > 1.0) and 0 < int(m.sum()) < m.numel()
        k = f"layers.{2 * i}"
        after_w, after_b = lin[i].weight.detach(), lin[i].bias.detach()
        assert torch.all(after_b[m] == 0) and torch.equal(after_b[~m], before[f"{k}.bias"][~m])
        # untouched: rows of units kept, except the columns of the previous layer's reset units (its outgoing weights)
        cols = ~masks[i - 1] if i > 0 else torch.ones(after_w.shape[1], dtype=torch.bool)
        assert not torch.equal(after_w[m], before[f"{k}.weight"][m])
        assert torch.equal(after_w[~m][:, cols], before[f"{k}.weight"][~m][:, cols])
        out_name = "layers.7.weight" if i == 3 else f"layers.{2 * i + 2}.weight"
        out = lin[i + 1].weight.detach()
        assert not torch.equal(out[:, m], before[out_name][:, m])
        if out[:, m].numel() >= 1000:  # N(0, (1/(d+1))^2)
            assert abs(float(out[:, m].std()) - 1 / 17) < 0.01
        st = opt.optimizer.state[lin[i].weight]
        assert torch.all(st["exp_avg"][m] == 0) and torch.all(opt.optimizer.state[lin[i + 1].weight]["exp_avg"][:, m] == 0)
    assert t.cfg.tdpo.reset_every == 10 and t.cfg.tdpo.reset_threshold == 0.0
    # the reference's threshold 0 resets every unit that fired on the data
    acts = hidden_activations(net, x)
    for m, a in zip(reset_active_neurons(net, None, acts, 0.0, torch.Generator().manual_seed(1)), acts):
        assert torch.equal(m, a.clamp(min=0).mean(0) > 0)


def test_grpo_global_std_first_steps_and_flow_kl(tmp_path):
    from diffrl_fast.algos.grpo import grpo_advantages

    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 9.0])
    p = ["a", "a", "b", "b", "a", "b"]
    adv = grpo_advantages(p, r, "global")
    assert torch.allclose(adv[[0, 1, 4]], (r[[0, 1, 4]] - r[[0, 1, 4]].mean()) / (r.std(unbiased=False) + 1e-4))
    grp = grpo_advantages(p, r, "group")
    assert torch.allclose(grp[[2, 3, 5]], (r[[2, 3, 5]] - r[[2, 3, 5]].mean()) / (r[[2, 3, 5]].std(unbiased=False) + 1e-4))
    t = trainer(tmp_path, "grpo", "grpo.group_size=2", "sample.num_steps=10", scheduler="flow")
    assert t.algo.num_train_steps(10) == 9 and t.algo.step_order(4, torch.arange(10), 9, None)[0].tolist() == list(range(9))
    # Flow-GRPO's KL is the exact KL x |dt|, through the same fused op
    chunk, eu, ec = _moved_policy_chunk(t, [0, 3, 6])
    dt = (t.model.scheduler.sigmas[1:] - t.model.scheduler.sigmas[:-1]).double()[chunk.step_idx]
    exact, flow = chunk_kl(t.run_context, chunk, eu, ec, "exact"), chunk_kl(t.run_context, chunk, eu, ec, "flow_grpo")
    assert torch.allclose(flow, exact * dt.abs(), rtol=1e-6)
    with pytest.raises(ValueError, match="grpo.kl_form=exact"):
        trainer(tmp_path, "grpo", "grpo.group_size=2", name="ddim")  # DDIM model with Flow-GRPO's KL


def _moved_policy_chunk(t, steps):
    """A chunk of 4 fresh samples at ``steps`` and the policy's outputs on it after moving the policy off the sampler."""
    traj, _ = t.sample_epoch(0)
    with torch.no_grad():
        for q in t.model.denoiser.parameters():
            q.add_(0.01)
    chunk = pack_chunk(traj, torch.arange(4), torch.tensor([steps] * 4), "cpu")
    return (chunk, *policy_outputs(t.run_context, chunk))


def test_kl_forms_and_ratio_clip_options_reuse_the_same_losses(tmp_path):
    """DPOK's eps-MSE is the exact KL x 2 s^2 / b^2 (same fused op); DPOK with ratio_clip=ppo, alpha 1, beta 0,
    normalised advantages and no value function is DDPO-IS (same loss function)."""
    t = trainer(tmp_path, "dpok", "dpok.beta=0.0")
    chunk, eu, ec = _moved_policy_chunk(t, [0, 1, 3])
    exact, mse = chunk_kl(t.run_context, chunk, eu, ec, "exact"), chunk_kl(t.run_context, chunk, eu, ec, "eps_mse")
    c = chunk.coef
    assert torch.allclose(mse, exact * (2 * c.s**2 / c.b**2).reshape(chunk.shape), rtol=1e-6)

    def grad(algo, *extra, name):
        tr = trainer(tmp_path, algo, *extra, "train.optimizer_step_every=round", "train.timestep_fraction=1.0", name=name)
        traj, rewards = tr.sample_epoch(0)
        with torch.no_grad():
            for q in tr.model.denoiser.parameters():
                q.add_(0.003)
        got = []
        tr.engine.step = lambda: got.append(torch.cat([q.grad.flatten() for q in tr.model.denoiser.parameters()])) or 1.0
        tr.train_epoch(0, traj, tr.algo.prepare(tr.run_context, traj, rewards))
        return got[0]

    dpok = grad("dpok", "dpok.ratio_clip=ppo", "dpok.alpha=1.0", "dpok.beta=0.0", "dpok.advantage=normalized",
                "dpok.value_baseline=false", "train.clip_range=1e-4", name="dpok_as_ddpo")
    ddpo = grad("ddpo_is", "train.clip_range=1e-4", name="ddpo")
    assert float(ddpo.abs().max()) > 0 and torch.equal(dpok, ddpo)


def test_d3po_pairing_modes():
    from diffrl_fast.algos.common import group_ranking
    from diffrl_fast.algos.d3po import pairs_from_ranking

    r = torch.tensor([0.1, 0.9, 0.5, 0.5])
    ranking = group_ranking(r, 4)
    assert pairs_from_ranking(ranking, r, "disjoint").tolist() == [[1, 0]]  # 2 with 3 tie: dropped
    assert sorted(map(tuple, pairs_from_ranking(ranking, r, "all").tolist())) == [(1, 0), (1, 2), (1, 3), (2, 0), (3, 0)]
    assert math.comb(4, 2) - 1 == 5


def test_tdpo_critic_learns_a_learnable_target():
    """The reference critic (a linear MLP from a near-zero init) and its clipped value update do fit what the
    inputs determine: a linear function of the embedding, explained variance > 0.9 within 150 steps. (On the
    digits world it explains none of digit_confidence, which depends on the prompt it does not see.)"""
    from diffrl_fast.algos.critic import CriticOptimizer, EmbeddingCritic, clipped_value_loss

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(512, 32, generator=g), dim=-1)
    y = x @ torch.randn(32, generator=g)
    y = (y - y.mean()) / y.std()
    torch.manual_seed(0)
    net = EmbeddingCritic(32)
    opt = CriticOptimizer(net, lr=1e-3, weight_decay=1e-4, max_grad_norm=1.0)
    for _ in range(150):
        idx = torch.randint(0, 512, (64,), generator=g)
        net.eval()
        with torch.no_grad():
            v_old = net(x[idx])
        net.train()
        (0.5 * clipped_value_loss(net(x[idx]), v_old, y[idx], 0.2)).backward()
        opt.step(None)
    net.eval()
    with torch.no_grad():
        assert float(1 - (net(x) - y).var() / y.var()) > 0.9


def test_dense_loss_is_the_public_trajectory_dpo_loss(tmp_path, monkeypatch):
    """One implementation: the dense algorithm's loss is ops.trajectory_dpo_loss on the step log-probs it drew
    (log-ratio clamp and draw weights included), recomputed here from the arguments it passed."""
    import diffrl_fast.algos.dense as dense_mod
    from diffrl_fast.ops import trajectory_dpo_loss

    calls = []

    def spy(logp, ref, **kw):
        out = trajectory_dpo_loss(logp, ref, **kw)
        calls.append((logp.detach().clone(), ref.clone(), kw, out.detach()))
        return out

    monkeypatch.setattr(dense_mod, "trajectory_dpo_loss", spy)
    t = trainer(tmp_path, "dense", "dense.num_timesteps=3", "dense.log_ratio_clip=1e-3")
    traj, rewards = t.sample_epoch(0)
    with torch.no_grad():
        for q in t.model.denoiser.parameters():
            q.add_(0.003)
    stats = t.train_epoch(0, traj, t.algo.prepare(t.run_context, traj, rewards))
    assert calls and calls[0][2]["log_ratio_clip"] == 1e-3 and calls[0][2]["temperature"] == t.cfg.dense.temperature
    logp, ref, kw, out = calls[0]
    h = (logp - ref).clamp(-1e-3, 1e-3)
    e = (kw["weights"] * h).sum(-1) / kw["weights"].sum(-1)
    assert torch.allclose(out, torch.nn.functional.softplus(-kw["temperature"] * (e[..., 0] - e[..., 1])).mean(), rtol=1e-9)
    assert stats["loss"] == pytest.approx(float(out), rel=1e-5)


def test_grpo_detach_uncond_stops_the_gradient_through_the_unconditional_branch(tmp_path):
    """grpo.detach_uncond (Flow-GRPO before July 2025): the guided output's gradient flows through the conditional
    branch only, so d(eps_hat)/d(theta) = g d(eps_c)/d(theta); without it, both branches contribute."""
    t = trainer(tmp_path, "grpo", "grpo.detach_uncond=true", "grpo.group_size=2", "grpo.beta=0")
    assert t.algo.detach_uncond
    traj, _ = t.sample_epoch(0)
    chunk = pack_chunk(traj, torch.arange(2), torch.tensor([[0, 1]] * 2), "cpu")
    params = [q for q in t.model.denoiser.parameters() if q.requires_grad]

    def grad(detach):
        eu, ec = policy_outputs(t.run_context, chunk, detach)
        g = t.cfg.sample.guidance_scale
        (eu + g * (ec - eu)).sum().backward()
        out = torch.cat([q.grad.flatten().clone() for q in params])
        for q in params:
            q.grad = None
        return out, eu.requires_grad, ec.requires_grad

    both, u_grad, _ = grad(False)
    cond_only, u_detached, c_grad = grad(True)
    assert u_grad and not u_detached and c_grad
    eu, ec = policy_outputs(t.run_context, chunk)
    (t.cfg.sample.guidance_scale * ec).sum().backward()
    want = torch.cat([q.grad.flatten() for q in params])
    assert torch.allclose(cond_only, want, rtol=1e-5, atol=1e-7) and not torch.allclose(both, want, rtol=1e-3)
