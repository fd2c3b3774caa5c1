"""Step schedules: every supported scheduler's step is reproduced by a x + b eps + s z from our tables."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffrl_fast.diffusion.coefficients import ddim_coefficients, make_schedule
from diffrl_fast.ops import step_logprob, step_mean
from tests.reference import oracle


def _apply(schedule, j, x, out, noise):
    c = schedule.at(torch.tensor([j] * x.shape[0]))
    mean = step_mean(x, out, None, c.a, c.b, 1.0, clip_x0=c.clip_x0)
    return mean + c.s.to(x.dtype).reshape(-1, 1, 1, 1) * noise


def test_ddim_schedule_matches_per_timestep_coefficients():
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=True,
                          set_alpha_to_one=False, steps_offset=1)
    table = make_schedule(sched, 8, eta=0.7)
    assert table.kind == "ddim" and table.num_steps == 8 and bool(table.stochastic.all())
    for j, t in enumerate(table.timesteps):
        c = ddim_coefficients(sched, t, 1, 0.7)
        got = table.at(torch.tensor([j]))
        assert got.a.dtype == torch.float64  # tables keep float64; the per-call coefficients are float32
        assert torch.allclose(got.a.float(), c.a) and torch.allclose(got.b.float(), c.b) and torch.allclose(got.s.float(), c.s)
        assert torch.allclose(got.clip_x0.m0.float(), c.clip_x0.m0) and got.clip_x0.limit == c.clip_x0.limit


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddpm_schedule_reproduces_diffusers_step(prediction_type, variance_type, clip_sample):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip_sample)
    table = make_schedule(sched, 10)
    assert table.kind == "ddpm"
    assert bool(table.stochastic[:-1].all()) and not bool(table.stochastic[-1])  # t = 0 adds no noise
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=g)
    for j, t in enumerate(table.timesteps):
        out = 1.5 * torch.randn(2, 3, 6, 6, generator=g)
        want = sched.step(out, t, x, generator=torch.Generator().manual_seed(j)).prev_sample
        noise = randn_tensor(out.shape, generator=torch.Generator().manual_seed(j), dtype=out.dtype)
        got = _apply(table, j, x, out, noise)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), f"j={j}: {(got - want).abs().max():.3g}"
        x = want


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sde_schedule_matches_flow_grpo_and_tends_to_euler(shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    table = make_schedule(sched, 6, noise_level=0.7)
    assert table.kind == "flow_sde" and bool(table.stochastic.all())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    sigmas = sched.sigmas.clone()
    for j in range(table.num_steps):
        v, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        got = _apply(table, j, x, v, noise)
        want, mean, std = oracle.flow_sde_step(sigmas, j, x, v, 0.7, noise)
        assert torch.allclose(got.double(), want, atol=1e-4), f"j={j}"
        c = table.at(torch.tensor([j, j]))
        logp = step_logprob(x, got, v, None, c.a, c.b, 1.0, c.s)
        assert torch.allclose(logp.double(), oracle.gaussian_logprob(got, mean, std), atol=1e-4)
        x = got
    tiny = make_schedule(sched, 6, noise_level=1e-6)  # no noise: the Euler ODE step of diffusers
    x = torch.randn(2, 4, 8, 8, generator=g)
    v = torch.randn(2, 4, 8, 8, generator=g)
    sched.set_timesteps(6)
    want = sched.step(v, sched.timesteps[2], x).prev_sample
    assert torch.allclose(_apply(tiny, 2, x, v, torch.zeros_like(x)), want, atol=1e-5)


def test_unsupported_scheduler_and_bad_arguments():
    with pytest.raises(ValueError, match="unsupported scheduler type EulerDiscreteScheduler"):
        make_schedule(EulerDiscreteScheduler(), 10)
    with pytest.raises(ValueError, match="eta"):
        make_schedule(DDIMScheduler(), 10, eta=0.0)
    with pytest.raises(ValueError, match="num_steps"):
        make_schedule(DDIMScheduler(), 0)
    with pytest.raises(ValueError, match="thresholding"):
        make_schedule(DDIMScheduler(thresholding=True), 10)


def test_ddim_last_step_without_offset_is_deterministic():
    """steps_offset=0 ends at t=0, whose DDIM step to final_alpha_cumprod = abar_0 has no variance."""
    table = make_schedule(DDIMScheduler(set_alpha_to_one=False, steps_offset=0), 8)
    assert bool(table.stochastic[:-1].all()) and not bool(table.stochastic[-1])
