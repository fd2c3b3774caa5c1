"""Float64 gradcheck of the fused ops' backward (torch and C++ backends; Triton is checked against the oracle)."""
import pytest
import torch

from diffrl_fast.ops import X0Clip, gaussian_logprob, step_kl, step_logprob, use_backend


@pytest.mark.parametrize("backend_name", ["torch", "cpp"])
@pytest.mark.parametrize("clip", [False, True])
def test_step_logprob_gradcheck(backend_name, clip):
    g = torch.Generator().manual_seed(0)
    mk = lambda: torch.randn(2, 3, 2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, y, eu, ec = mk(), mk(), mk(), mk()
    s = (0.5 + torch.rand(2, 3, generator=g, dtype=torch.float64)).requires_grad_()
    a, b = torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.5, -torch.rand(2, 3, generator=g, dtype=torch.float64)
    clip_x0 = X0Clip(0.8, 1.1, -0.6, 0.9) if clip else None

    def f(x, y, eu, ec, s):
        logp, mean = step_logprob(x, y, eu, ec, a, b, 2.5, s, reduction="sum", clip_x0=clip_x0, return_mean=True)
        return logp, mean

    ref_eu, ref_ec = eu.detach() * 0.5, ec.detach() + 0.1  # constants: gradcheck perturbs eu and ec in place
    with use_backend(backend_name):
        assert torch.autograd.gradcheck(f, (x, y, eu, ec, s), eps=1e-6, atol=1e-6)
        assert torch.autograd.gradcheck(
            lambda x, eu, ec, s: step_kl(x, eu, ec, ref_eu, ref_ec, a, b, 2.5, s, clip_x0=clip_x0),
            (x, eu, ec, s), eps=1e-6, atol=1e-6)
        assert torch.autograd.gradcheck(lambda y, m, s: gaussian_logprob(y, m, s), (y, x, s), eps=1e-6, atol=1e-6)
