"""Rollout states kept in bfloat16 / float16 (sample.trajectory_dtype): the chain continues from the rounded states,
so the stored trajectory is the one sampled, half the memory, and the recompute reproduces its log-probs exactly."""
import pytest
import torch

from diffrl_fast.diffusion.coefficients import make_schedule, post_window_ode
from diffrl_fast.diffusion.recompute import parity_report
from diffrl_fast.diffusion.rollout import sample_trajectories
from diffrl_fast.diffusion.tree import TreeSpec


@pytest.fixture(scope="module")
def flow_model():
    from diffrl_fast.models import load_model

    return load_model("flow-digits")


def test_flow_tree_window_and_tail_in_bf16(flow_model):
    T, window = 10, torch.arange(10) < 4
    sched = make_schedule(flow_model.scheduler, T, window=window)
    tail = post_window_ode(flow_model.scheduler, sched, solver="dpmsolver++", compress=0.6)
    kw = dict(num_steps=T, guidance_scale=1.0, seeds=[1, 2, 3, 4], schedule=sched, tree=TreeSpec((0, 2), 2), post_window=tail,
              keep_latents=torch.arange(T + 1) <= 4)
    full = sample_trajectories(flow_model, ["5"] * 4, **kw)
    half = sample_trajectories(flow_model, ["5"] * 4, state_dtype=torch.bfloat16, **kw)
    assert half.latents.dtype == torch.bfloat16 and half.log_probs.dtype == torch.float32
    assert half.latents.nbytes * 2 == full.latents.nbytes
    assert half.latents_at([0, 1], [2, 3]).dtype == torch.float32 and half.final_latents.dtype == torch.float32
    assert parity_report(flow_model, half, batch_size=4, chunk_size=2)["worst"] <= 1e-5  # exact, not within bf16 error
    # the same samples up to bf16 rounding of the states
    assert float((half.images - full.images).abs().mean()) < 0.02
    assert torch.allclose(half.log_probs, full.log_probs, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ddim_with_guidance_recomputes_exactly(sd_model, dtype):
    traj = sample_trajectories(sd_model, ["a cat", "a dog"], num_steps=3, guidance_scale=5.0, seeds=[0, 1], state_dtype=dtype)
    assert traj.latents.dtype == dtype and torch.isfinite(traj.log_probs).all()
    assert parity_report(sd_model, traj, batch_size=2, chunk_size=3)["worst"] <= 1e-5
    with pytest.raises(ValueError, match="state_dtype"):
        sample_trajectories(sd_model, ["a cat"], num_steps=2, state_dtype=torch.float64)
