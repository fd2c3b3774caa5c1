"""ddim_step_with_logprob: a drop-in for ddpo-pytorch/trl's function, exact against diffusers' DDIMScheduler.step."""
import math

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffrl_fast import ddim_step_with_logprob
from diffrl_fast.ops import use_backend
from tests.baselines import ddpo_step_logprob
from tests.conftest import device_for
from tests.reference import oracle


def _scheduler(prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps=10):
    s = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, clip_sample=clip_sample, set_alpha_to_one=set_alpha_to_one, steps_offset=1,
    )
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_prev_sample_equals_diffusers_step(backend, prediction_type, clip_sample, eta):
    device = device_for(backend)
    sched = _scheduler(prediction_type, clip_sample)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g).to(device)
    for t in sched.timesteps:
        out = (2.0 * torch.randn(3, 4, 8, 8, generator=g)).to(device)  # wide enough that clipping bites
        noise = randn_tensor(out.shape, generator=torch.Generator().manual_seed(int(t)), device=out.device, dtype=out.dtype)
        want = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        with use_backend(backend):
            got, logp = ddim_step_with_logprob(sched, out, t, x, eta=eta, generator=torch.Generator().manual_seed(int(t)),
                                               clamp_prev_timestep=False)
        prev_t = int(t) - 1000 // 10
        exact, mean, std = oracle.ddim_step(sched.alphas_cumprod, sched.final_alpha_cumprod, int(t), prev_t, x, out, eta,
                                            noise, prediction_type, 1.0 if clip_sample else None)
        # diffusers computes in float32 too; where the step amplifies rounding (sample prediction at t=1
        # divides by sqrt(1 - abar_t) ~ 0.03) both deviate from float64: ours may not deviate more.
        diffusers_err = (want.double() - exact).abs().max().item()
        assert (got.double() - exact).abs().max().item() <= max(2e-5, 2 * diffusers_err), f"t={int(t)}"
        assert torch.allclose(got, want, atol=2e-5 + 2 * diffusers_err, rtol=1e-5), f"t={int(t)}: {(got - want).abs().max():.3g}"
        want_logp = oracle.gaussian_logprob(got, mean, std)
        assert torch.allclose(logp.double(), want_logp, atol=1e-4), f"t={int(t)}: {(logp - want_logp).abs().max():.3g}"
        x = got


def test_logprob_and_grads_equal_ddpo_formula(backend):
    """With guidance, against ddpo-pytorch's eager formula, values and gradients to the model outputs."""
    device = device_for(backend)
    sched = _scheduler()
    g = torch.Generator().manual_seed(1)
    x, prev = torch.randn(4, 4, 8, 8, generator=g).to(device), torch.randn(4, 4, 8, 8, generator=g).to(device)
    eu, ec = torch.randn(4, 4, 8, 8, generator=g).to(device), torch.randn(4, 4, 8, 8, generator=g).to(device)
    t = sched.timesteps[3]
    e1, c1 = eu.clone().requires_grad_(), ec.clone().requires_grad_()
    with use_backend(backend):
        _, logp = ddim_step_with_logprob(sched, e1 + 7.5 * (c1 - e1), t, x, eta=1.0, prev_sample=prev)
    logp.sum().backward()
    e2, c2 = eu.clone().requires_grad_(), ec.clone().requires_grad_()
    ac = sched.alphas_cumprod
    abar_t, abar_p = ac[int(t)].repeat(4), ac[int(t) - 100].repeat(4)
    std = ((1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p)).sqrt()
    want = ddpo_step_logprob(x, prev, e2, c2, 7.5, abar_t.to(device), abar_p.to(device), std.to(device))
    want.sum().backward()
    assert torch.allclose(logp, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(e1.grad, e2.grad, atol=1e-5, rtol=1e-4) and torch.allclose(c1.grad, c2.grad, atol=1e-5, rtol=1e-4)


def test_last_step_clamp_matches_ddpo_and_exact_mode_raises_when_deterministic():
    sched = _scheduler(set_alpha_to_one=True)
    g = torch.Generator().manual_seed(2)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = sched.timesteps[-1]  # prev timestep < 0: final_alpha_cumprod = 1 makes diffusers' step deterministic
    with pytest.raises(ValueError, match="deterministic"):
        ddim_step_with_logprob(sched, out, t, x, clamp_prev_timestep=False)
    prev, logp = ddim_step_with_logprob(sched, out, t, x, generator=torch.Generator().manual_seed(3))
    ac = sched.alphas_cumprod
    abar_t, abar_p = ac[int(t)].repeat(2), ac[0].repeat(2)  # ddpo-pytorch/trl clamp the index to 0
    std = ((1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p)).sqrt()
    want = ddpo_step_logprob(x, prev, out, out, 1.0, abar_t, abar_p, std)
    assert torch.allclose(logp, want, atol=1e-5)


def test_batched_timesteps_and_drop_in_contract():
    sched = _scheduler()
    g = torch.Generator().manual_seed(4)
    x, out = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ts = sched.timesteps[[0, 4, 9]]
    prev, logp = ddim_step_with_logprob(sched, out, ts, x, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert prev.shape == x.shape and logp.shape == (3,)
    for i, t in enumerate(ts):  # each row equals the scalar-timestep call on that row alone
        _, li = ddim_step_with_logprob(sched, out[i:i + 1], t, x[i:i + 1], eta=1.0, prev_sample=prev[i:i + 1])
        assert torch.allclose(li, logp[i:i + 1], atol=1e-6)
    result = ddim_step_with_logprob(sched, out, ts, x, 1.0, False, None, prev)  # positional order of ddpo-pytorch
    assert torch.equal(result.log_probs, result[1])
    with pytest.raises(ValueError, match="generator or prev_sample"):
        ddim_step_with_logprob(sched, out, ts, x, prev_sample=prev, generator=torch.Generator())
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(sched, out, ts, x, eta=0.0)
    fresh = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(fresh, out, 1, x)
    assert math.isfinite(float(logp.sum()))
