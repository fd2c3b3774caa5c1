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


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_cps_schedule_matches_flow_grpo_and_its_log_prob_is_the_squared_residual(shift):
    """sde_type="cps": the rollout's tables and log-prob (``action_logprob``) against flow_grpo's CPS step in float64,
    step by step; its last step (sigma' = 0) is deterministic; at noise level 0 it is the Euler ODE step."""
    from diffrl_fast.diffusion.rollout import action_logprob

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    table = make_schedule(sched, 6, noise_level=0.7, sde_type="cps")
    assert table.kind == "flow_cps" and table.residual_logprob
    assert table.stochastic.tolist() == [True] * 5 + [False]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for j in range(5):
        v, prev = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        c = table.at(torch.tensor([j, j]))
        v_leaf = v.clone().requires_grad_()
        logp = action_logprob(True, x, prev, v_leaf, None, c, 1.0)
        want_lp, want_mean, want_std = oracle.flow_grpo_step(sched.sigmas, [j, j], x, v, 0.7, prev, "cps")
        assert torch.allclose(logp.double(), want_lp, rtol=1e-5, atol=1e-6), f"j={j}"
        assert torch.allclose(step_mean(x, v, None, c.a, c.b, 1.0).double(), want_mean, atol=1e-5)
        assert torch.allclose(c.s, want_std) and torch.allclose(table.sde_std[j], want_std[0])
        v64 = v.double().requires_grad_()
        oracle.flow_grpo_step(sched.sigmas, [j, j], x, v64, 0.7, prev, "cps")[0].sum().backward()
        logp.sum().backward()
        assert torch.allclose(v_leaf.grad.double(), v64.grad, rtol=1e-4, atol=1e-7)
        x = prev
    # the summed reduction is the mean's times the element count
    lp_sum = action_logprob(True, x, prev, v, None, table.at(torch.tensor([1, 1])), 1.0, reduction="sum")
    lp_mean = action_logprob(True, x, prev, v, None, table.at(torch.tensor([1, 1])), 1.0)
    assert torch.allclose(lp_sum, lp_mean * x[0].numel(), rtol=1e-5)
    ode = make_schedule(sched, 6, noise_level=1e-6, sde_type="cps")
    sched.set_timesteps(6)
    want = sched.step(v, sched.timesteps[2], x).prev_sample
    assert torch.allclose(_apply(ode, 2, x, v, torch.zeros_like(x)), want, atol=1e-5)
    with pytest.raises(ValueError, match="flow-matching models only"):
        make_schedule(DDIMScheduler(), 6, sde_type="cps")
    with pytest.raises(ValueError, match="noise_level in"):
        make_schedule(sched, 6, noise_level=2.5, sde_type="cps")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dance_schedule_matches_dancegrpos_flux_step(shift):
    """sde_type="dance": the tables, noise and log-prob against DanceGRPO's score-form step in float64 at every step,
    on DanceGRPO's sigma grid (linspace(1, 0, T + 1) time-shifted: our "flux" grid with a static shift), its last
    step to sigma' = 0 included (stochastic there)."""
    from diffrl_fast.diffusion.rollout import action_logprob

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    table = make_schedule(sched, 5, noise_level=0.3, sde_type="dance", sigma_grid="flux")
    assert table.kind == "flow_sde" and not table.residual_logprob and bool(table.stochastic.all())
    grid = torch.linspace(1, 0, 6, dtype=torch.float64)
    assert torch.allclose(sched.sigmas.double(), shift * grid / (1 + (shift - 1) * grid), atol=1e-6)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 2, 4, 4, generator=g)  # video-shaped latents: the step is elementwise
    for j in range(5):
        v, prev = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
        c = table.at(torch.tensor([j, j]))
        want_lp, want_mean, want_std = oracle.dancegrpo_step(sched.sigmas, j, x, v, 0.3, prev)
        assert torch.allclose(step_mean(x, v, None, c.a, c.b, 1.0, latent_dims=4).double(), want_mean, atol=1e-5), f"j={j}"
        assert torch.allclose(c.s, torch.full((2,), want_std, dtype=torch.float64))
        logp = action_logprob(table.residual_logprob, x, prev, v, None, c, 1.0)
        assert torch.allclose(logp.double(), want_lp, rtol=1e-5, atol=1e-5), f"j={j}"
        x = prev


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
