"""The ops are torch.library custom ops with fake kernels: they trace into torch.compile without graph breaks."""
import torch

from diffrl_fast.ops import ppo_clip_step_loss, use_backend
from tests.conftest import requires_cpp


@requires_cpp
def test_fused_ppo_loss_compiles_fullgraph():
    g = torch.Generator().manual_seed(0)
    x, y, eu, ec = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(4))
    a, b, s = torch.full((4,), 0.99), torch.full((4,), -0.1), torch.full((4,), 0.3)
    old, adv = torch.randn(4, generator=g), torch.randn(4, generator=g)

    def step(eu, ec):
        out = ppo_clip_step_loss(x, y, eu, ec, a, b, 7.5, s, old, adv, clip_range=0.2)
        return out.loss

    with use_backend("cpp"):
        e1, c1 = eu.clone().requires_grad_(), ec.clone().requires_grad_()
        step(e1, c1).backward()
        compiled = torch.compile(step, fullgraph=True, backend="inductor")
        e2, c2 = eu.clone().requires_grad_(), ec.clone().requires_grad_()
        loss = compiled(e2, c2)
        loss.backward()
    assert torch.allclose(loss, step(eu, ec))
    assert torch.allclose(e1.grad, e2.grad) and torch.allclose(c1.grad, c2.grad)
