"""sde_step_with_logprob against a float64 transcription of Flow-GRPO's step: both step types, per-sample
timesteps, the sigma = 1 edge, the mean reduction, sampling, and gradients through the fused op."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffrl_fast import sde_step_with_logprob
from tests.reference import oracle


def _scheduler(steps=10):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_matches_flow_grpo_transcription(sde_type):
    sched = _scheduler()
    g = torch.Generator().manual_seed(0)
    B = 4
    x, v, prev = (torch.randn(B, 4, 6, 5, generator=g) for _ in range(3))
    idx = [0, 3, 7, 8]  # per-sample timesteps, including the first (sigma = 1: flow_grpo uses sigmas[1] there)
    assert float(sched.sigmas[0]) == 1.0
    t = sched.timesteps[idx]
    v_leaf = v.clone().requires_grad_()
    prev_sample, log_prob, mean, std_t = sde_step_with_logprob(sched, v_leaf, t, x, noise_level=0.7, prev_sample=prev,
                                                               sde_type=sde_type)
    want_lp, want_mean, want_std = oracle.flow_grpo_step(sched.sigmas, idx, x, v, 0.7, prev, sde_type)
    assert log_prob.shape == (B,) and std_t.shape == (B, 1, 1, 1)
    assert torch.allclose(log_prob.double(), want_lp, rtol=1e-5, atol=1e-5)
    assert torch.allclose(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
    assert torch.allclose(std_t.flatten().double(), want_std, rtol=1e-6)
    assert torch.equal(prev_sample, prev)
    # gradient of the mean-reduced log-prob reaches the model output as through flow_grpo's formula
    v64 = v.double().requires_grad_()
    oracle.flow_grpo_step(sched.sigmas, idx, x, v64, 0.7, prev, sde_type)[0].sum().backward()
    log_prob.sum().backward()
    assert torch.allclose(v_leaf.grad.double(), v64.grad, rtol=1e-4, atol=1e-7)


def test_log_prob_is_a_mean_over_non_batch_dims_and_sampling_is_consistent():
    sched = _scheduler()
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 2, 8, 8, generator=g)
    t = sched.timesteps[2]
    prev, lp, mean, std_t, sqrt_dt = sde_step_with_logprob(sched, v, t, x, generator=torch.Generator().manual_seed(5),
                                                           return_sqrt_dt=True)
    s = (std_t * sqrt_dt).double()
    elem = -((prev.double() - mean.double()) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * torch.log(torch.tensor(2 * torch.pi))
    assert torch.allclose(lp.double(), elem.mean(dim=(1, 2, 3)), rtol=1e-6)
    # the drawn noise is randn_tensor's with that generator, as in flow_grpo
    z = torch.randn(v.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(prev, mean + std_t * sqrt_dt * z, atol=1e-6)
    # scoring the sample again reproduces its log-prob exactly
    assert torch.equal(sde_step_with_logprob(sched, v, t, x, prev_sample=prev)[1], lp)


def test_bad_arguments_are_named():
    sched = _scheduler()
    x = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="sde_type"):
        sde_step_with_logprob(sched, x, sched.timesteps[0], x, sde_type="ode")
    with pytest.raises(ValueError, match="one per sample"):
        sde_step_with_logprob(sched, x, sched.timesteps[:3], x, prev_sample=x)


def test_noise_is_drawn_as_diffusers_randn_tensor():
    from diffusers.utils.torch_utils import randn_tensor

    from diffrl_fast.diffusion.noise import draw_noise

    for gen in (torch.Generator().manual_seed(3), [torch.Generator().manual_seed(i) for i in range(3)]):
        want = randn_tensor((3, 2, 4, 4), generator=gen if not isinstance(gen, list) else [torch.Generator().manual_seed(i) for i in range(3)],
                            device=torch.device("cpu"), dtype=torch.float32)
        gen = gen if isinstance(gen, list) else torch.Generator().manual_seed(3)
        assert torch.equal(draw_noise((3, 2, 4, 4), gen, torch.device("cpu"), torch.float32), want)
