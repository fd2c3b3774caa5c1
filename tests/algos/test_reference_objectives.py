"""Each algorithm's loss and gradient equal an independent float64 transcription of its reference objective.

One optimiser step of the real trainer (``Trainer.train_epoch``) runs on a fixed batch of a float64 toy
model (tests/algos/toy.py); the gradient it would apply is captured before the step and compared with
autograd through ``tests/reference/algorithms.py``, which shares no code with diffrl_fast. The policy is
moved off the sampling policy first, so that importance ratios leave the clip bands and log-ratios to the
reference are non-zero: every branch of each objective is exercised (checked per test).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from diffrl_fast.config_utils import load_config
from diffrl_fast.train.config import Config, validate
from diffrl_fast.train.trainer import Trainer
from tests.algos.toy import ToyModel, toy_embed, toy_eps, toy_reward
from tests.reference import algorithms as ref

COMMON = ["prompts=[a, b, c, d]", "sample.num_steps=4", "sample.batch_size=8", "sample.num_batches_per_epoch=1",
          "train.batch_size=8", "train.chunk_size=2", "sample.guidance_scale=3.0", "num_epochs=1", "log.eval_samples=0",
          "log.progress=false", "log.tensorboard=false", "reward.overlap=false", "train.timestep_fraction=1.0"]
REL = 1e-6


class Step:
    """One captured optimiser step of the trainer on the toy model."""

    def __init__(self, tmp_path, algo, *extra, scheduler="ddim", perturb=0.02, one_step=True, distinct=False, move=0.0):
        """``distinct``: the forward-process algorithms' old (or EMA) copy and the reference model are moved apart
        from each other and from the policy, so a mix-up between them shows; ``move``: each captured optimiser step
        moves the weights by that much (fixed directions), so later steps run at other weights than the first."""
        self.model = ToyModel(scheduler)
        cfg = validate(load_config(Config, None, [f"algo={algo}", *COMMON, f"output_dir={tmp_path}", "name=r", *extra]))
        self.cfg = cfg
        self.trainer = t = Trainer(cfg, tmp_path / "r", model=self.model, reward_fn=toy_reward, log_fn=lambda s: None)
        self.traj, self.rewards = t.sample_epoch(0)
        params = dict(self.model.denoiser.named_parameters())
        self.theta_old = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():  # off the sampling policy: ratios leave the clip band, log-ratios to the reference are non-zero
            g = torch.Generator().manual_seed(7)
            for p in params.values():
                p.add_(perturb * torch.randn(p.shape, generator=g, dtype=p.dtype))
        self.theta = {n: p.detach().clone() for n, p in params.items()}
        self.old_w = self.ref_w = self.theta_old
        if distinct:
            with torch.no_grad():
                for o, (n, p) in zip(t.algo.old, params.items()):
                    o.add_(0.03 * torch.randn(p.shape, generator=g, dtype=p.dtype))
                for p in self.model.ref_denoiser.parameters():
                    p.add_(0.04 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            self.old_w = {n: o.detach().clone() for o, n in zip(t.algo.old, params)}
            self.ref_w = {n: p.detach().clone() for n, p in self.model.ref_denoiser.named_parameters()}
            assert all(not torch.equal(self.old_w[n], self.ref_w[n]) and not torch.equal(self.old_w[n], self.theta[n]) for n in params)
        self.thetas = [self.theta]
        critic = getattr(t.algo, "critic", None)
        if critic is not None:  # the transcription has no dropout: switch it off in ours (tested separately)
            for m in critic.net.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
            self.critic_before = {n: p.detach().clone() for n, p in critic.net.named_parameters()}
        self.orders, self.minibatches = [], []
        step_order, minibatches = t.algo.step_order, t.algo.minibatches
        t.algo.step_order = lambda *a: self.orders.append(step_order(*a)) or self.orders[-1]
        t.algo.minibatches = lambda *a: self.minibatches.extend(minibatches(*a)) or self.minibatches
        self.data = t.algo.prepare(t.run_context, self.traj, self.rewards)
        self.losses, self.grads, self.critic_grads = [], [], []
        backward = t.engine.backward
        t.engine.backward = lambda loss: (self.losses.append(loss.detach()), backward(loss))

        def capture_step():
            self.grads.append({n: p.grad.detach().clone() for n, p in params.items()})
            t.engine.optimizer.zero_grad(set_to_none=True)
            if move:
                with torch.no_grad():
                    for p in params.values():
                        p.add_(move * torch.randn(p.shape, generator=g, dtype=p.dtype))
                self.thetas.append({n: p.detach().clone() for n, p in params.items()})
            t.engine.steps += 1
            return 1.0

        t.engine.step = capture_step
        if critic is not None:
            def capture_critic(ctx):
                self.critic_grads.append({n: p.grad.detach().clone() for n, p in critic.net.named_parameters()})
                critic.opt.optimizer.zero_grad(set_to_none=True)
                return 1.0

            critic.opt.step = capture_critic
        self.stats = t.train_epoch(0, self.traj, self.data)
        assert len(self.grads) == 1 or not one_step, "these tests compare one optimiser step"

    def batch(self) -> ref.Batch:
        tr = self.traj
        return ref.Batch(tr.latents, tr.log_probs, tr.schedule.timesteps, tr.cond.hidden[:, 0], torch.zeros(3, dtype=torch.float64),
                         tr.guidance_scale, list(tr.prompts), self.rewards)

    def sampler(self) -> ref.Sampler:
        s = self.model.scheduler
        if self.traj.schedule.kind == "flow_sde":
            return ref.Sampler("flow", sigmas=s.sigmas.to(torch.float64), noise_level=self.cfg.sample.noise_level)
        return ref.Sampler("ddim", alphas_cumprod=s.alphas_cumprod.to(torch.float64), step_ratio=1000 // self.cfg.sample.num_steps,
                           eta=self.cfg.sample.eta)

    @staticmethod
    def fixed(w):
        """The toy denoiser at fixed weights ``w``, as a callable eps(x, t, h)."""
        return lambda x, t, h: toy_eps(w["w"], w["P"], w["u"], x, t, h)

    def eps_fns(self, step: int = 0):
        """(leaves, eps, ref_eps): the policy at optimiser step ``step``'s weights, differentiable through
        ``leaves``, and the reference model."""
        leaves = {n: v.clone().requires_grad_() for n, v in self.thetas[step].items()}
        eps = lambda x, t, h: toy_eps(leaves["w"], leaves["P"], leaves["u"], x, t, h)  # noqa: E731
        return leaves, eps, self.fixed(self.ref_w)

    def loss(self) -> float:
        return float(sum(self.losses))

    def log_ratios(self, steps) -> torch.Tensor:
        """log pi_theta - log pi_ref of every (sample, step) row: where the clamps bite."""
        _, eps, ref_eps = self.eps_fns()
        b, sm = self.batch(), self.sampler()
        with torch.no_grad():
            return torch.stack([ref.row_logp(b, sm, eps, i, j)[0] - ref.row_logp(b, sm, ref_eps, i, j)[0]
                                for i in range(len(b.prompts)) for j in steps])


@contextlib.contextmanager
def recorded_noise(cls):
    """Record the forward-process noise a forward-process algorithm draws: a list of (sample, step, z) rows."""
    rows, noise = [], cls.noise

    def recording(self, trainer, chunk, x0):
        z = noise(self, trainer, chunk, x0)
        n, K = chunk.shape
        rows.extend((int(chunk.sample_idx[i // K]), int(chunk.step_idx[i // K, i % K]), z[i]) for i in range(n * K))
        return z

    cls.noise = recording
    try:
        yield rows
    finally:
        cls.noise = noise


def assert_close(ours: dict, theirs: dict, what: str, rel: float = REL) -> None:
    scale = max(float(v.abs().max()) for v in theirs.values())
    assert scale > 0, f"{what}: the reference gradient is zero; the test would prove nothing"
    for n, v in theirs.items():
        err = float((ours[n] - v).abs().max()) / scale
        assert err < rel, f"{what} {n}: max |ours - reference| / max |reference| = {err:.2e}"


def check(step: Step, leaves: dict, loss: torch.Tensor, ours_loss: float) -> None:
    loss.backward()
    loss = float(loss.detach())
    assert abs(ours_loss - loss) <= REL * max(1.0, abs(loss)), (ours_loss, loss)
    assert_close(step.grads[0], {n: p.grad for n, p in leaves.items()}, "policy gradient")


def test_ddpo_is(tmp_path):
    # at ddpo-pytorch's clip range of 1e-4 a perturbation of 5e-5 clips about 2/3 of the rows on torch 2.6 and 2.13 alike
    # (0.003 clipped every row on torch 2.6); the same for DPOK and TDPO below
    s = Step(tmp_path, "ddpo_is", perturb=5e-5)
    assert 0 < s.stats["clipfrac"] < 1, s.stats["clipfrac"]  # both branches of the PPO max are exercised
    leaves, eps, _ = s.eps_fns()
    loss = ref.ddpo_is(s.batch(), s.sampler(), eps, range(4), clip_range=1e-4, adv_clip=5.0, min_count=16)
    check(s, leaves, loss, s.loss())


def test_ddpo_sf_one_step_per_round(tmp_path):
    s = Step(tmp_path, "ddpo_sf", "train.batch_size=2", perturb=0.003)
    assert s.stats["optimizer_steps"] == 1  # four minibatches, one step: the estimator's theta = theta_old
    leaves, eps, _ = s.eps_fns()
    loss = ref.ddpo_sf(s.batch(), s.sampler(), eps, range(4), adv_clip=5.0, min_count=16)
    check(s, leaves, loss, s.loss())


@pytest.mark.parametrize("value", [True, False])
def test_dpok(tmp_path, value):
    s = Step(tmp_path, "dpok", f"dpok.value_baseline={str(value).lower()}", "train.optimizer_step_every=round", perturb=5e-5)
    assert 0 < s.stats["clipfrac"] < 1 and s.stats["kl"] > 0
    leaves, eps, ref_eps = s.eps_fns()
    vp = {n: p.detach() for n, p in s.trainer.algo.value.named_parameters()} if value else None
    loss = ref.dpok(s.batch(), s.sampler(), eps, ref_eps, range(4), alpha=100.0, beta=0.01, clip_range=1e-4, value_params=vp)
    check(s, leaves, loss, s.loss())


def test_d3po_steps_once_per_pair_with_more_than_two_samples(tmp_path):
    """scripts/train.py (K = 7 there, 4 here): one optimiser step per non-tied pair, over all its steps."""
    s = Step(tmp_path, "d3po", "d3po.samples_per_prompt=4", "sample.batch_size=8", "train.batch_size=8", "sample.num_steps=4",
             "train.gradient_accumulation_steps=1", perturb=0.05, one_step=False)
    pairs = [tuple(mb.tolist()) for mb in s.minibatches]
    assert len(s.grads) == len(pairs) == 12 and len(set(pairs)) == 12  # 2 groups x 6 pairs, no ties
    assert all(a // 4 == b // 4 and s.rewards[a] > s.rewards[b] for a, b in pairs)  # winner first, same group
    clamped = 0
    for pair, grad in zip(pairs, s.grads):
        leaves, eps, ref_eps = s.eps_fns()
        loss = ref.d3po(s.batch(), s.sampler(), eps, ref_eps, range(4), beta=0.1, ratio_clip=0.1, group=4, pair=pair)
        loss.backward()
        theirs = {n: p.grad for n, p in leaves.items()}
        if all(float(v.abs().max()) == 0 for v in theirs.values()):  # the ratio clamp bites on every step of both
            assert all(float(v.abs().max()) == 0 for v in grad.values()), pair
            clamped += 1
        else:
            assert_close(grad, theirs, f"policy gradient of pair {pair}")
    assert clamped < len(pairs)


@pytest.mark.parametrize("group", [2, 4])
def test_d3po(tmp_path, group):
    s = Step(tmp_path, "d3po", f"d3po.samples_per_prompt={group}", "sample.batch_size=8", "train.batch_size=8",
             "sample.num_steps=4", "d3po.step_per_pair=false", perturb=0.05)
    h = s.log_ratios(range(4))
    inside = (h > torch.log(torch.tensor(0.9, dtype=h.dtype))) & (h < torch.log(torch.tensor(1.1, dtype=h.dtype)))
    assert 0 < int(inside.sum()) < h.numel()  # the ratio clamp bites on some rows only
    leaves, eps, ref_eps = s.eps_fns()
    loss = ref.d3po(s.batch(), s.sampler(), eps, ref_eps, range(4), beta=0.1, ratio_clip=0.1, group=group)
    check(s, leaves, loss, s.loss())


def test_dense(tmp_path):
    s = Step(tmp_path, "dense", "dense.num_timesteps=3", "sample.batch_size=8", "train.batch_size=8", "train.learning_rate=1e-3",
             "sample.num_steps=4", perturb=0.0005)
    order = s.orders[0]
    draws = [order[g].tolist() for g in range(0, 8, 2)]
    h = s.log_ratios(range(4)).abs()
    assert 0 < int((h < 5e-4).sum()) < h.numel()  # the log-ratio clamp bites on some rows only
    leaves, eps, ref_eps = s.eps_fns()
    loss = ref.dense(s.batch(), s.sampler(), eps, ref_eps, draws, temperature=12.5, log_ratio_clip=5e-4)
    loss.backward()
    assert abs(float(s.stats["loss"]) - float(loss.detach())) <= REL * abs(float(loss.detach()))
    ours = s.grads[0]
    theirs = {n: p.grad for n, p in leaves.items()}
    assert_close(ours, theirs, "policy gradient")


def test_tdpo(tmp_path):
    s = Step(tmp_path, "tdpo", "train.optimizer_step_every=round", "sample.num_steps=4", perturb=5e-5)
    assert 0 < s.stats["clipfrac"] < 1
    leaves, eps, _ = s.eps_fns()
    feats = {(b, j): toy_embed(s.model.decode(s.traj.latents[b, j][None]))[0] for b in range(8) for j in range(4)}
    critic = {n: v.clone().requires_grad_() for n, v in s.critic_before.items()}
    loss = ref.tdpo(s.batch(), s.sampler(), eps, range(4), feats, s.critic_before, critic, clip_range=1e-4, value_clip=0.2,
                    value_coef=0.5, min_count=16)
    check(s, leaves, loss, s.loss() + float(s.stats["value_loss"]))
    # the critic computes in float32 (its weights and the embeddings are float32): fp32 tolerance
    assert_close(s.critic_grads[0], {n: p.grad for n, p in critic.items()}, "critic gradient", rel=1e-4)


def test_grpo_flow(tmp_path):
    s = Step(tmp_path, "grpo", "grpo.group_size=2", "train.timestep_fraction=0.99", scheduler="flow", perturb=0.003)
    assert 0 < s.stats["clipfrac"] < 1 and s.stats["kl"] > 0
    assert bool((s.data.advantages != 0).all())  # no tied group: the zero-advantage filter keeps every sample
    leaves, eps, ref_eps = s.eps_fns()
    n_train = int(0.99 * 4)
    loss = ref.grpo_flow(s.batch(), s.sampler(), eps, ref_eps, n_train, clip_range=1e-4, adv_clip=5.0, beta=0.04)
    check(s, leaves, loss, s.loss())


def test_grpo_guard(tmp_path):
    """GRPO-Guard: the ratio re-centred on the rollout's stored step means and scaled by the step's std, each step's
    loss divided by its dt; the rollout means come from the old weights (the transcription recomputes them)."""
    s = Step(tmp_path, "grpo", "grpo.group_size=2", "train.timestep_fraction=0.99", "grpo.guard=true", "train.clip_range=1e-4",
             scheduler="flow", perturb=0.003)
    assert s.traj.means is not None and 0 < s.stats["clipfrac"] < 1 and s.stats["kl"] > 0
    leaves, eps, ref_eps = s.eps_fns()
    loss = ref.grpo_flow(s.batch(), s.sampler(), eps, ref_eps, int(0.99 * 4), clip_range=1e-4, adv_clip=5.0, beta=0.04,
                         old_eps=s.fixed(s.old_w))
    check(s, leaves, loss, s.loss())


@pytest.mark.parametrize("scheduler", ["ddim", "flow"])
def test_nft(tmp_path, scheduler):
    """DiffusionNFT: deterministic rollouts, the forward process at the rollout's timesteps, the implicit
    positive and negative policies around the old model, and the KL to the reference."""
    from diffrl_fast.algos.nft import NFT

    with recorded_noise(NFT) as rows:
        s = Step(tmp_path, "nft", "nft.group_size=2", "sample.guidance_scale=1.0", "nft.kl_beta=0.5",
                 "train.timestep_fraction=0.5", scheduler=scheduler, perturb=0.003, distinct=True)
    assert bool((s.traj.log_probs == 0).all())  # every rollout step deterministic
    assert len(rows) == 8 * 2 and s.stats["kl"] > 0
    leaves, eps, ref_eps = s.eps_fns()  # policy, old model and reference: three different models
    loss = ref.nft(s.batch(), s.sampler(), eps, s.fixed(s.old_w), ref_eps, rows, beta=1.0, adv_clip=5.0, kl_beta=0.5)
    check(s, leaves, loss, s.loss())


@pytest.mark.parametrize("scheduler", ["ddim", "flow"])
def test_awm(tmp_path, scheduler):
    """AWM: deterministic rollouts, stratified timesteps shared by a training minibatch, the ghuber-weighted
    matching log-prob, the clipped surrogate, the KL to the reference and to the EMA copy."""
    from diffrl_fast.algos.awm import AWM

    with recorded_noise(AWM) as rows:
        s = Step(tmp_path, "awm", "awm.group_size=2", "sample.guidance_scale=1.0", "awm.beta=0.5", "awm.ema_beta=0.7",
                 "awm.train_timesteps=2", scheduler=scheduler, perturb=0.003, distinct=True)
    assert bool((s.traj.log_probs == 0).all()) and s.traj.latents.shape[1] == 1  # deterministic; only x_T kept
    assert len(rows) == 8 * 2 and s.stats["kl"] > 0 and s.stats["ema_kl"] > 0
    # one stratum each of [0, 2) and [2, 4), the same for every sample of the (single) minibatch
    order = s.orders[0]
    assert bool((order == order[0]).all()) and 0 <= int(order[0, 0]) < 2 <= int(order[0, 1]) < 4
    leaves, eps, ref_eps = s.eps_fns()  # policy, reference and EMA copy: three different models
    loss = ref.awm(s.batch(), s.sampler(), eps, ref_eps, s.fixed(s.old_w), rows, adv_clip=5.0, advantage_max=1.0, clip_range=1.0,
                   power=0.25, beta=0.5, ema_beta=0.7)
    check(s, leaves, loss, s.loss())


def test_awm_second_optimiser_step_of_an_epoch(tmp_path):
    """Two minibatches, a step each: the second step's ratio is to the log-probs under the epoch's starting weights."""
    from diffrl_fast.algos.awm import AWM

    with recorded_noise(AWM) as rows:
        s = Step(tmp_path, "awm", "awm.group_size=2", "sample.guidance_scale=1.0", "awm.beta=0.5", "awm.ema_beta=0.7",
                 "awm.train_timesteps=2", "train.batch_size=4", "train.optimizer_step_every=minibatches",
                 "train.gradient_accumulation_steps=1", scheduler="flow", perturb=0.003, distinct=True, one_step=False, move=0.01)
    assert len(s.grads) == 2
    second = set(s.minibatches[1].tolist())
    leaves, eps, ref_eps = s.eps_fns(step=1)
    loss = ref.awm(s.batch(), s.sampler(), eps, ref_eps, s.fixed(s.old_w), [r for r in rows if r[0] in second], adv_clip=5.0,
                   advantage_max=1.0, clip_range=1.0, power=0.25, beta=0.5, ema_beta=0.7, old_eps=s.fixed(s.thetas[0]))
    loss.backward()
    assert_close(s.grads[1], {n: p.grad for n, p in leaves.items()}, "policy gradient of the second step")
    leaves, eps, _ = s.eps_fns(step=1)  # the ratio to the current weights instead would be another gradient
    ref.awm(s.batch(), s.sampler(), eps, ref_eps, s.fixed(s.old_w), [r for r in rows if r[0] in second], adv_clip=5.0,
            advantage_max=1.0, clip_range=1.0, power=0.25, beta=0.5, ema_beta=0.7).backward()
    with pytest.raises(AssertionError):
        assert_close(s.grads[1], {n: p.grad for n, p in leaves.items()}, "on-policy ratio")


@pytest.mark.parametrize("scheduler", ["ddim", "flow"])
def test_dgpo(tmp_path, scheduler):
    """DGPO: deterministic rollouts, distinct timesteps shared by every sample, one noise per group and step, the
    group preference weight sigmoid(S_g), the clip against the EMA copy, and the KL to the base model."""
    from diffrl_fast.algos.dgpo import DGPO

    with recorded_noise(DGPO) as rows:
        s = Step(tmp_path, "dgpo", "dgpo.group_size=2", "sample.guidance_scale=1.0", "dgpo.kl_beta=0.5", "dgpo.beta=2000",
                 "dgpo.train_timesteps=2", "dgpo.max_step=2", "dgpo.clip_range=0.02", scheduler=scheduler, perturb=0.003,
                 distinct=True)
    assert bool((s.traj.log_probs == 0).all()) and s.traj.latents.shape[1] == 1  # deterministic; only x_T kept
    assert len(rows) == 8 * 2 and s.stats["kl"] > 0
    order = s.orders[0]  # two distinct steps of 0..2, the same for every sample
    assert bool((order == order[0]).all()) and len(set(order[0].tolist())) == 2 and int(order.max()) <= 2
    noise = {}
    for b, j, z in rows:  # one noise per (group, step), different across groups
        noise.setdefault((b // 2, j), z)
        assert torch.equal(noise[(b // 2, j)], z)
    assert not torch.equal(noise[(0, int(order[0, 0]))], noise[(1, int(order[0, 0]))])
    assert 0 < s.stats["clipfrac"] < 1 and 0.02 < s.stats["group_weight"] < 0.98  # both clip branches; the sigmoid unsaturated
    leaves, eps, ref_eps = s.eps_fns()  # policy, base model and EMA copy: three different models
    loss = ref.dgpo(s.batch(), s.sampler(), eps, ref_eps, s.fixed(s.old_w), rows, group_size=2, beta=2000, clip_range=0.02,
                    kl_beta=0.5, adv_clip=5.0)
    check(s, leaves, loss, s.loss())
