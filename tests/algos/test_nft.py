"""DiffusionNFT's pieces against independent statements: the old model's decay schedule (the reference's
return_decay) and the forward process against diffusers' own noising."""
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from diffrl_fast.algos.nft import old_decay
from diffrl_fast.diffusion.coefficients import forward_process


def test_old_model_decay_schedule():
    assert [old_decay(s, 0) for s in (0, 100)] == [0.0, 0.0]
    assert [old_decay(s, 1) for s in (0, 100, 499, 600)] == [0.0, 0.1, 0.499, 0.5]
    assert [old_decay(s, 2) for s in (74, 75, 95, 500)] == [0.0, 0.0, 0.15, 0.999]


def test_forward_process_matches_diffusers_noising():
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    shape = (-1, 1, 1, 1)
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    t = torch.tensor([999, 500, 21])
    alpha, sigma, cx, ce = forward_process(ddim, t)
    xt = alpha.reshape(shape) * x0 + sigma.reshape(shape) * z
    assert torch.allclose(xt, ddim.add_noise(x0, z, t), atol=1e-6)
    assert torch.allclose(cx.reshape(shape) * xt + ce.reshape(shape) * z, x0, atol=1e-9)  # x0 from the true eps
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    flow.set_timesteps(10)
    t = flow.timesteps[[0, 4, 9]]
    alpha, sigma, cx, ce = forward_process(flow, t)
    xt = alpha.reshape(shape) * x0 + sigma.reshape(shape) * z
    assert torch.allclose(xt, flow.scale_noise(x0, t, z), atol=1e-5)
    assert torch.allclose(cx.reshape(shape) * xt + ce.reshape(shape) * (z - x0), x0, atol=1e-9)  # v = z - x0
