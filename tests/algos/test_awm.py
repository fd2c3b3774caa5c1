"""AWM's pieces against a transcription of the reference (tests/reference/algorithms.py): its timestep
strata, its clipped surrogate in both loss types with ratios outside the clip band, and its weightings."""
import pytest
import torch

from diffrl_fast.algos.awm import awm_log_prob, awm_policy_loss, ema_decay, stratified_steps
from tests.reference import algorithms as ref


@pytest.mark.parametrize("time_type,start", [("discrete", 0), ("discrete_wo_init", 1)])
def test_timestep_strata_are_the_references(time_type, start):
    for T, n, frac in ((14, 6, 0.9), (20, 6, 0.9), (10, 3, 1.0), (4, 2, 1.0)):
        g = torch.Generator().manual_seed(T + n)
        ours = stratified_steps(T, n, frac, time_type, g)
        u = torch.rand(n, generator=torch.Generator().manual_seed(T + n))
        assert ours.tolist() == ref.awm_discrete_steps(T, n, frac, u, start=start)
    with_init = stratified_steps(14, 6, 0.9, "discrete_with_init", torch.Generator().manual_seed(0))
    assert with_init[0] == 0 and with_init[1:].tolist() == ref.awm_discrete_steps(14, 5, 0.9, torch.rand(5, generator=torch.Generator().manual_seed(0)), start=1)
    with pytest.raises(ValueError, match="awm.train_timesteps"):
        stratified_steps(4, 6, 0.9, "discrete", g)


@pytest.mark.parametrize("loss_type", ["exp_first", "sum_first"])
def test_surrogate_matches_the_reference_outside_the_clip_band(loss_type):
    g = torch.Generator().manual_seed(3)
    n, K = 5, 3
    logp = (0.3 * torch.randn(n, K, generator=g, dtype=torch.float64)).requires_grad_()
    old = 0.3 * torch.randn(n, K, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    ppo = awm_policy_loss(logp, old, adv, 0.2, loss_type)
    ours = ppo.loss
    assert 0 < float(ppo.clipfrac) < 1  # both branches of the max exercised
    (g_ours,) = torch.autograd.grad(ours, logp)
    leaf = logp.detach().clone().requires_grad_()
    theirs = ref.awm_surrogate(leaf.T, old.T, adv, clip_range=0.2, loss_type=loss_type)  # the reference's [T, B]
    theirs.backward()
    assert torch.allclose(ours, theirs, rtol=1e-12) and torch.allclose(g_ours, leaf.grad, rtol=1e-12)


def test_weightings_and_ema_decay():
    out = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    target = torch.zeros(1, 2, dtype=torch.float64)
    s = torch.tensor([0.5], dtype=torch.float64)  # m = 5
    assert float(awm_log_prob(out, target, s, "Uniform")) == -5.0
    assert float(awm_log_prob(out, target, s, "t")) == -2.5
    assert float(awm_log_prob(out, target, s, "t**2")) == -1.25
    assert abs(float(awm_log_prob(out, target, s, "huber")) + (5.0000000001**0.5 - 1e-5) * 0.5) < 1e-12
    assert abs(float(awm_log_prob(out, target, s, "ghuber", 0.25)) + (5.0000000001**0.25 - 1e-10**0.25) * 0.5 / 0.25) < 1e-12
    assert [ema_decay(k, 0.3, "linear") for k in (0, 100, 300, 1000)] == [0.0, 0.1, 0.3, 0.3]
    assert ema_decay(5, 0.3, "constant") == 0.3
