"""Timestep windows (Flow-GRPO-Fast's fixed window, MixGRPO's sliding one): outside the window the rollout
takes the sampler's deterministic step, checked against diffusers' own DDIM (eta = 0) and Euler ODE steps."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffrl_fast.diffusion.coefficients import make_schedule
from diffrl_fast.train.config import Config, timestep_window, validate
from diffrl_fast.config_utils import load_config


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_steps_outside_the_window_are_diffusers_deterministic_steps(kind):
    T = 6
    window = torch.tensor([False, True, True, False, False, False])
    if kind == "ddim":
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
        full = make_schedule(sched, T, eta=1.0)
        win = make_schedule(sched, T, eta=1.0, window=window)
    else:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        full = make_schedule(sched, T, noise_level=0.7)
        win = make_schedule(sched, T, noise_level=0.7, window=window)
    assert torch.equal(win.stochastic, window)
    for name in ("a", "b", "s"):  # inside the window: the stochastic step, unchanged
        assert torch.equal(getattr(win, name)[window], getattr(full, name)[window])
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    for j in torch.nonzero(~window).flatten().tolist():
        t = win.timesteps[j]
        if kind == "ddim":
            want = sched.step(out, t, x, eta=0.0).prev_sample
        else:
            sched._step_index = None
            sched._begin_index = None
            want = sched.step(out, t, x).prev_sample
        got = win.a[j] * x + win.b[j] * out
        assert torch.allclose(got, want.to(torch.float64), rtol=1e-6, atol=1e-7), j


def test_ddpm_has_no_deterministic_form():
    with pytest.raises(ValueError, match="deterministic form"):
        make_schedule(DDPMScheduler(num_train_timesteps=1000), 4, window=torch.tensor([True, False, False, False]))


def test_window_positions_over_epochs():
    def cfg(*o):
        return validate(load_config(Config, None, ["sample.num_steps=10", *o]))

    assert timestep_window(cfg(), 3) is None
    fixed = cfg("train.timestep_window=fixed", "train.window_size=2")
    assert [timestep_window(fixed, e).nonzero().flatten().tolist() for e in (0, 7)] == [[0, 1], [0, 1]]
    slide = cfg("train.timestep_window=sliding", "train.window_size=3", "train.window_stride=2", "train.window_shift_every=2")
    starts = [int(timestep_window(slide, e).nonzero()[0]) for e in range(12)]
    assert starts == [0, 0, 2, 2, 4, 4, 6, 6, 7, 7, 7, 7]  # moves 2 steps every 2 epochs, stops at T - K
    from diffrl_fast.train.config import ConfigError

    with pytest.raises(ConfigError, match="window_size"):
        cfg("train.timestep_window=fixed", "train.window_size=11")
