"""What the Triton interpreter would otherwise hide: the GPU's block size, the order of partial sums, the grid
limit, and floating-point contraction pinned at every launch. (Compiling for sm_80/sm_90: test_gpu_compile.py.)"""
from __future__ import annotations

import pytest
import torch

from diffrl_fast.ops import step_kl, step_logprob, use_backend
from diffrl_fast.ops.backends import triton_backend as tb
from tests.conftest import DEVICE
from tests.reference import oracle


def _inputs(lead, shape=(4, 33, 33), seed=0):  # 4356 elements: two chunks of 4096
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*lead, *shape, generator=g).to(DEVICE) for _ in range(6)]


@pytest.mark.parametrize("block", [1024, 4096])
def test_gpu_block_size_matches_the_oracle(monkeypatch, block):
    """GPUs run BLOCK = 1024 (four blocks per 4096-element chunk); the interpreter's default is one block per chunk."""
    monkeypatch.setattr(tb, "BLOCK", block)
    x, y, eu, ec, ru, rc = _inputs((3,))
    a, b, s = torch.tensor([0.9, 1.1, 0.8]), torch.tensor([-0.3, -0.2, 0.4]), torch.tensor([0.5, 0.7, 0.6])
    eu.requires_grad_()
    with use_backend("triton"):
        lp = step_logprob(x, y, eu, ec, a.to(DEVICE), b.to(DEVICE), 2.0, s.to(DEVICE))
        lp.sum().backward()
        kl = step_kl(x, eu.detach(), ec, ru, rc, a.to(DEVICE), b.to(DEVICE), 2.0, s.to(DEVICE))
    e64 = eu.detach().double().requires_grad_()
    want = oracle.step_logprob(x, y, e64, ec, a, b, 2.0, s)
    want.sum().backward()
    assert torch.allclose(lp.double().cpu(), want.cpu(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(eu.grad.double().cpu(), e64.grad.cpu(), rtol=1e-4, atol=1e-7)
    assert torch.allclose(kl.double().cpu(), oracle.step_kl(x, eu.detach(), ec, ru, rc, a, b, 2.0, s).cpu(), rtol=1e-5, atol=1e-6)


def test_a_rows_sum_does_not_depend_on_the_other_rows():
    """Per-chunk partial sums are added in a fixed order per row: a row gives the same bits alone or among 9."""
    x, y, eu, ec, _, _ = _inputs((9,), shape=(4, 48, 48))  # 9216 elements: three chunks
    with use_backend("triton"):
        batch = step_logprob(x, y, eu, ec, 0.9, -0.3, 2.0, 0.5, reduction="sum")
        alone = torch.stack([step_logprob(x[i:i + 1], y[i:i + 1], eu[i:i + 1], ec[i:i + 1], 0.9, -0.3, 2.0, 0.5,
                                          reduction="sum")[0] for i in (0, 4, 8)])
    assert torch.equal(batch[[0, 4, 8]], alone)


def test_row_sums_of_partials():
    """Rows of 70 partials (two blocks of lanes) sum to the float64 sum within float32 rounding; one chunk is a view."""
    part = torch.randn(5, 70, dtype=torch.float32, device=DEVICE) * 1e3
    got = tb._row_sums(part)
    want = part.double().sum(1)
    assert ((got.double() - want).abs() <= 1e-6 * part.double().abs().sum(1)).all(), (got, want)
    assert torch.equal(tb._row_sums(part[:, :1]), part[:, 0])
    assert torch.equal(tb._row_sums(part[:2]), got[:2])  # a row's sum does not depend on the other rows


def test_grid_limit_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(tb, "MAX_PROGRAMS", 5)  # CUDA: 2^31 - 1 programs in the (single) grid dimension
    x, y, eu, ec, _, _ = _inputs((3,))
    with use_backend("triton"), pytest.raises(ValueError, match="split the batch"):
        step_logprob(x, y, eu, ec, 0.9, -0.3, 2.0, 0.5)


@pytest.mark.skipif(DEVICE != "cuda", reason="a row of 2^28 + 4096 elements (65,537 chunks): GPU only")
def test_rows_longer_than_65535_chunks():
    """Video-sized rows: more chunks than CUDA's second grid dimension allows (the grid is one-dimensional)."""
    D = 65_536 * 4096 + 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y, e = (torch.randn(1, 1, 1, D, generator=g, device="cuda") for _ in range(3))
    with use_backend("triton"):
        got = step_logprob(x, y, e, None, 0.9, -0.3, 1.0, 0.5, reduction="sum")
    want = (-(y - (0.9 * x - 0.3 * e)).double().square().sum() / (2 * 0.25) - D * (torch.log(torch.tensor(0.5)) + 0.9189385332046727))
    assert torch.allclose(got.double().cpu(), want.cpu().reshape(1), rtol=1e-5)


def test_fp_fusion_is_pinned_at_every_launch():
    import inspect

    src = inspect.getsource(tb)
    launches = src.count("_kernel[(")
    assert launches >= 3 and src.count("enable_fp_fusion=FP_FUSION") == launches and tb.FP_FUSION is True
