"""step_logprob / step_mean / step_kl on every backend against the float64 oracle."""
import pytest
import torch

from diffrl_fast.ops import X0Clip, step_kl, step_logprob, step_mean, use_backend
from tests.baselines import eager_affine_logprob
from tests.conftest import device_for
from tests.reference import oracle

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Tolerances for the per-row log-probs (mean reduction, values O(1..100)) and for latent-sized outputs
# (mean, gradients), relative to the largest reference magnitude. Low-precision outputs are rounded to
# their dtype, so their tolerance is one or two units in the last place of that dtype.
LOGP_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
LATENT_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = {"odd": (3, 5, 4, 17, 13), "sdxl_BT": (2, 3, 4, 128, 128)}


def _inputs(shape, dtype, device, seed=0, clip=False):
    g = torch.Generator().manual_seed(seed)
    lead = shape[:-3]
    t = lambda: torch.randn(shape, generator=g).to(dtype).to(device)  # noqa: E731
    x, eu, ec = t(), t(), t()
    a = (0.8 + 0.4 * torch.rand(lead, generator=g)).to(device)
    b = (-0.6 + 0.3 * torch.rand(lead, generator=g)).to(device)
    s = (0.1 + 0.3 * torch.rand(lead, generator=g)).to(device)
    guidance = 5.0
    clip_x0 = None
    if clip:
        clip_x0 = X0Clip((0.7 + 0.2 * torch.rand(lead, generator=g)).to(device), 1.3, -0.8, 1.0)
    mean = oracle.step_mean(x, eu, ec, a, b, guidance, None if clip_x0 is None else tuple(clip_x0))
    y = (mean + s.double().reshape(*lead, 1, 1, 1).to(mean.device) * torch.randn(shape, generator=g, dtype=torch.float64).to(device)).to(dtype)
    return x, y, eu, ec, a, b, guidance, s, clip_x0


def _err(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1)).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("variant", ["cfg", "cfg_clip", "no_cfg"])
def test_step_logprob_matches_oracle(backend, dtype, shape, variant):
    device = device_for(backend)
    x, y, eu, ec, a, b, g, s, clip = _inputs(shape, dtype, device, clip=variant == "cfg_clip")
    if variant == "no_cfg":
        ec = None
    ref_clip = None if clip is None else tuple(clip)
    leaves = [t.detach().double().requires_grad_() for t in (x, eu) + ((ec,) if ec is not None else ())]
    ref = oracle.step_logprob(leaves[0], y, leaves[1], leaves[2] if ec is not None else None, a, b, g, s, clip=ref_clip)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    (ref * w).sum().backward()

    ins = [t.detach().clone().requires_grad_() for t in (x, eu) + ((ec,) if ec is not None else ())]
    with use_backend(backend):
        logp, mean = step_logprob(ins[0], y, ins[1], ins[2] if ec is not None else None, a, b, g, s, clip_x0=clip, return_mean=True)
        (logp * w.to(logp.dtype)).sum().backward()

    assert logp.shape == shape[:-3]
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    err = _err(logp, ref)
    assert err <= LOGP_TOL[dtype], f"log-prob error {err:.3g} > {LOGP_TOL[dtype]:.3g} ({backend}, {dtype}, {shape})"
    if dtype in (torch.float16, torch.bfloat16):
        # the flash-attention rule: at most about twice the error of plain PyTorch in the same precision
        eager = eager_affine_logprob(x, y, eu, ec, a, b, g, s)
        assert err <= 2 * _err(eager, ref) + 1e-6
    ref_mean = oracle.step_mean(x, eu, ec, a, b, g, ref_clip)
    assert mean.dtype == dtype and mean.shape == shape
    assert _err(mean, ref_mean) <= LATENT_TOL[dtype], f"mean error {_err(mean, ref_mean):.3g}"
    for name, got, want in zip(("x_t", "eps_u", "eps_c"), ins, leaves):
        assert got.grad is not None and got.grad.dtype == dtype, name
        e = _err(got.grad, want.grad)
        tol = LATENT_TOL[dtype] * (4 if dtype == torch.bfloat16 and backend == "triton" else 1)  # interpreter truncates bf16 stores
        assert e <= tol, f"d{name} error {e:.3g} > {tol:.3g} ({backend}, {dtype}, {shape}, {variant})"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_step_kl_matches_oracle(backend, reduction):
    device = device_for(backend)
    x, _, eu, ec, a, b, g, s, clip = _inputs((3, 5, 4, 17, 13), torch.float32, device, seed=3, clip=True)
    reu, rec = eu + 0.1 * torch.randn_like(eu), ec - 0.1 * torch.randn_like(ec)
    lx, le, lc = x.double().requires_grad_(), eu.double().requires_grad_(), ec.double().requires_grad_()
    ref = oracle.step_kl(lx, le, lc, reu, rec, a, b, g, s, reduction, clip=tuple(clip))
    ref.sum().backward()
    x1, e1, c1 = x.clone().requires_grad_(), eu.clone().requires_grad_(), ec.clone().requires_grad_()
    with use_backend(backend):
        kl = step_kl(x1, e1, c1, reu, rec, a, b, g, s, reduction=reduction, clip_x0=clip)
        kl.sum().backward()
    assert torch.allclose(kl.double(), ref, rtol=1e-5, atol=1e-6), (kl - ref).abs().max()
    for name, got, want in (("x_t", x1, lx), ("eps_u", e1, le), ("eps_c", c1, lc)):
        assert _err(got.grad, want.grad) < 1e-5, f"d{name}: {_err(got.grad, want.grad):.3g}"


def test_step_logprob_sum_reduction_and_tensor_std_grad(backend):
    device = device_for(backend)
    x, y, eu, ec, a, b, g, s, _ = _inputs((3, 5, 4, 17, 13), torch.float64, device, seed=4)
    s1 = s.double().clone().requires_grad_()
    s2 = s.double().clone().requires_grad_()
    ref = oracle.step_logprob(x, y, eu, ec, a, b, g, s2, reduction="sum")
    ref.sum().backward()
    with use_backend(backend):
        logp = step_logprob(x, y, eu, ec, a, b, g, s1, reduction="sum")
        logp.sum().backward()
    assert torch.allclose(logp, ref, rtol=1e-12, atol=1e-8)
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-10)


def test_strided_trajectory_slices_are_read_in_place(backend):
    """x_t = latents[:, :-1] and x_prev = latents[:, 1:] of a [B, T+1, C, H, W] trajectory, no copies."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(5)
    lat = torch.randn(2, 6, 4, 9, 7, generator=g).to(device)
    eu = torch.randn(2, 5, 4, 9, 7, generator=g).to(device)
    x, y = lat[:, :-1], lat[:, 1:]
    assert not x.is_contiguous()
    with use_backend(backend):
        got = step_logprob(x, y, eu, None, 0.9, -0.3, 1.0, 0.5)
    want = oracle.step_logprob(x, y, eu, None, 0.9, -0.3, 1.0, 0.5)
    assert torch.allclose(got.double(), want, rtol=1e-5)


def test_step_mean_then_logprob_reproduces_sampling(backend):
    """x_prev = step_mean + s z scored by step_logprob gives the Gaussian log-density of z."""
    device = device_for(backend)
    x, _, eu, ec, a, b, g, s, clip = _inputs((4, 4, 16, 16), torch.float32, device, seed=6, clip=True)
    z = torch.randn_like(x)
    with use_backend(backend):
        mean = step_mean(x, eu, ec, a, b, g, clip_x0=clip)
        y = mean + s.reshape(-1, 1, 1, 1) * z
        logp = step_logprob(x, y, eu, ec, a, b, g, s, clip_x0=clip)
    want = (-0.5 * z.double() ** 2).mean((1, 2, 3)) - torch.log(s.double()) - 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))
    assert torch.allclose(logp.double(), want, atol=1e-5)


def test_recompute_is_bitwise_batch_invariant(backend):
    """A row's log-prob does not depend on which other rows share the call (the parity invariant's root)."""
    device = device_for(backend)
    x, y, eu, ec, a, b, g, s, _ = _inputs((6, 4, 40, 40), torch.float32, device, seed=7)
    with use_backend(backend):
        full = step_logprob(x, y, eu, ec, a, b, g, s)
        parts = torch.cat([step_logprob(x[i:i + 2], y[i:i + 2], eu[i:i + 2], ec[i:i + 2], a[i:i + 2], b[i:i + 2], g, s[i:i + 2]) for i in range(0, 6, 2)])
    assert torch.equal(full, parts)
