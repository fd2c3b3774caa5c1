"""gaussian_logprob, gaussian_kl, the PPO and DPO losses against the float64 oracle (values and gradients)."""
import pytest
import torch

from diffrl_fast.ops import (
    dpo_step_loss,
    gaussian_kl,
    gaussian_logprob,
    importance_ratio,
    plackett_luce_loss,
    ppo_clip_loss,
    ppo_clip_step_loss,
    trajectory_dpo_loss,
    use_backend,
)
from tests.baselines import ddim_affine, ddpo_ppo_loss, ddpo_step_logprob, random_ddim_rows
from tests.conftest import device_for
from tests.reference import oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_logprob(backend, dtype, reduction):
    device = device_for(backend)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 5, 4, 17, 13, generator=g).to(dtype).to(device)
    mean = (y.double() + 0.3 * torch.randn(y.shape, generator=g, dtype=torch.float64).to(device)).to(dtype)
    std = 0.2 + torch.rand(3, 1, generator=g).to(device)  # broadcasts to the [3, 5] leading dims
    m64 = mean.detach().double().clone().requires_grad_()
    ref = oracle.gaussian_logprob(y, m64, std, reduction)
    ref.sum().backward()
    m = mean.detach().clone().requires_grad_()
    with use_backend(backend):
        got = gaussian_logprob(y, m, std, reduction=reduction)
        got.sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert ((got.double() - ref).abs() / ref.abs().clamp(min=1)).max() < tol
    gtol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert ((m.grad.double() - m64.grad).abs().max() / m64.grad.abs().max()) < gtol


def test_gaussian_logprob_float_std_and_custom_latent_dims(backend):
    device = device_for(backend)
    y, mean = torch.randn(4, 10, device=device), torch.randn(4, 10, device=device)
    with use_backend(backend):
        got = gaussian_logprob(y, mean, 0.5, reduction="sum", latent_dims=1)
    want = oracle.gaussian_logprob(y, mean, 0.5, "sum", latent_dims=1)
    assert got.shape == (4,) and torch.allclose(got.double(), want, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_kl(backend, reduction):
    device = device_for(backend)
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(6, 4, 9, 9, generator=g).to(device).requires_grad_()
    ref_mean = torch.randn(6, 4, 9, 9, generator=g).to(device)
    m64 = mean.detach().double().requires_grad_()
    want = oracle.gaussian_kl(m64, ref_mean, 0.7, reduction)
    want.sum().backward()
    with use_backend(backend):
        got = gaussian_kl(mean, ref_mean, 0.7, reduction=reduction)
        got.sum().backward()
    assert torch.allclose(got.double(), want, rtol=1e-5)
    assert torch.allclose(mean.grad.double(), m64.grad, rtol=1e-5, atol=1e-9)
    with use_backend(backend):
        assert torch.allclose(gaussian_kl(ref_mean, ref_mean, 0.7), torch.zeros(6, device=device))


@pytest.mark.parametrize("clip_mode", ["ppo", "clamp"])
@pytest.mark.parametrize("clip_range", [1e-4, 0.2, None])
@pytest.mark.parametrize("adv_clip", [5.0, None])
def test_ppo_clip_loss_matches_oracle(clip_range, adv_clip, clip_mode):
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.3 - 1.0
    old = logp + 0.25 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv = 4.0 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    lp1, lp2 = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    out = ppo_clip_loss(lp1, old, adv, clip_range=clip_range, adv_clip=adv_clip, clip_mode=clip_mode)
    out.loss.backward()
    loss, clipfrac, approx_kl, ratio_mean = oracle.ppo_loss(lp2, old, adv, clip_range, adv_clip, clamp_only=clip_mode == "clamp")
    loss.backward()
    assert torch.allclose(out.loss, loss, rtol=1e-12)
    assert torch.allclose(lp1.grad, lp2.grad, rtol=1e-12, atol=1e-15)
    if clip_range is not None:
        assert out.clipfrac.item() == pytest.approx(clipfrac)
    assert out.approx_kl.item() == pytest.approx(approx_kl.item())
    assert out.ratio_mean.item() == pytest.approx(ratio_mean.item())
    assert torch.allclose(importance_ratio(logp, old), torch.exp(logp - old))


def test_ppo_matches_trl_formula():
    g = torch.Generator().manual_seed(3)
    logp, old, adv = torch.randn(16, generator=g), torch.randn(16, generator=g), 3 * torch.randn(16, generator=g)
    out = ppo_clip_loss(logp, old, adv, clip_range=0.1, adv_clip=2.0)
    loss, approx_kl, clipfrac = ddpo_ppo_loss(logp, old, adv, 0.1, 2.0)
    assert torch.allclose(out.loss, loss) and torch.allclose(out.approx_kl, approx_kl) and torch.allclose(out.clipfrac, clipfrac)


def test_fused_ppo_step_loss_equals_ddpo_eager(backend):
    """The fused path and ddpo-pytorch/trl's eager formula give the same loss and gradients."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(4)
    B = 8
    x, prev, eu, ec = (torch.randn(B, 4, 16, 16, generator=g).to(device) for _ in range(4))
    abar_t, abar_p, std = (v.to(device) for v in random_ddim_rows(B, g))
    a, b = ddim_affine(abar_t, abar_p, std)
    old = torch.randn(B, generator=g).to(device) * 0.01 - 2.0
    adv = torch.randn(B, generator=g).to(device)
    e1, c1 = eu.clone().requires_grad_(), ec.clone().requires_grad_()
    e2, c2 = eu.clone().requires_grad_(), ec.clone().requires_grad_()
    with use_backend(backend):
        out = ppo_clip_step_loss(x, prev, e1, c1, a, b, 7.5, std, old, adv, clip_range=0.2, adv_clip=5.0)
        out.loss.backward()
    eager_logp = ddpo_step_logprob(x, prev, e2, c2, 7.5, abar_t, abar_p, std)
    eager_loss = ddpo_ppo_loss(eager_logp, old, adv, 0.2, 5.0)[0]
    eager_loss.backward()
    assert torch.allclose(out.logp, eager_logp, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.loss, eager_loss, rtol=1e-4, atol=1e-6)
    scale = e2.grad.abs().max()
    assert (e1.grad - e2.grad).abs().max() / scale < 1e-4 and (c1.grad - c2.grad).abs().max() / scale < 1e-4


@pytest.mark.parametrize("ratio_clip", [None, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_dpo_step_loss(ratio_clip, weighted):
    g = torch.Generator().manual_seed(5)
    shape = (4, 10)
    lw, rw, ll, rl = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.1 for _ in range(4))
    weights = 0.9 ** torch.arange(10, dtype=torch.float64) if weighted else None
    a1, b1 = lw.clone().requires_grad_(), ll.clone().requires_grad_()
    a2, b2 = lw.clone().requires_grad_(), ll.clone().requires_grad_()
    out = dpo_step_loss(a1, rw, b1, rl, beta=2.0, weights=weights, ratio_clip=ratio_clip)
    out.loss.backward()
    want = oracle.dpo_loss(a2, rw, b2, rl, 2.0, weights, ratio_clip)
    want.backward()
    assert torch.allclose(out.loss, want, rtol=1e-12)
    assert torch.allclose(a1.grad, a2.grad, rtol=1e-10, atol=1e-14) and torch.allclose(b1.grad, b2.grad, rtol=1e-10, atol=1e-14)
    assert 0 <= out.accuracy <= 1


def test_plackett_luce_matches_enumeration_and_oracle():
    g = torch.Generator().manual_seed(6)
    scores = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    s2 = scores.detach().clone().requires_grad_()
    got = plackett_luce_loss(scores, temperature=1.7)
    got.backward()
    want = oracle.plackett_luce(s2, 1.7)
    want.backward()
    assert torch.allclose(got, want, rtol=1e-12) and torch.allclose(scores.grad, s2.grad, rtol=1e-10)
    for row in scores.detach():
        assert oracle.plackett_luce(row[None], 1.7).item() == pytest.approx(oracle.plackett_luce_by_enumeration(row, 1.7), rel=1e-10)


def test_plackett_luce_pair_is_dpo_sigmoid():
    e = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    assert plackett_luce_loss(e, temperature=2.0).item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(2.0 * 0.5)).item())


def test_trajectory_dpo_loss_discounted():
    g = torch.Generator().manual_seed(7)
    logp, ref = torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    w = 0.8 ** torch.arange(5, dtype=torch.float64)
    got = trajectory_dpo_loss(logp, ref, temperature=0.5, weights=w)
    e = ((logp - ref) * w).sum(-1) / w.sum()
    assert got.item() == pytest.approx(oracle.plackett_luce(e, 0.5).item(), rel=1e-12)


def test_trajectory_dpo_loss_clamps_log_ratios_like_the_dense_reference():
    """The dense-reward reference clamps h to [-c, c] before averaging: no gradient from a step outside the band."""
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(2, 2, 4, generator=g, dtype=torch.float64)
    h = 1e-3 * torch.randn(2, 2, 4, generator=g, dtype=torch.float64)
    logp = (ref + h).requires_grad_()
    got = trajectory_dpo_loss(logp, ref, temperature=10.0, log_ratio_clip=5e-4)
    e = (h.clamp(-5e-4, 5e-4)).mean(-1)
    assert got.item() == pytest.approx(oracle.plackett_luce(e, 10.0).item(), rel=1e-9)
    got.backward()
    outside = (logp - ref).detach().abs() > 5e-4
    assert outside.any() and (~outside).any()
    assert bool((logp.grad[outside] == 0).all()) and bool((logp.grad[~outside] != 0).all())
