"""Wan2.1 text-to-video: our rollout of the tiny Wan (video latents [B, 16, F, H, W]) reproduces diffusers'
WanPipeline, the shipped UniPC flow-prediction scheduler becomes the flow SDE on its own sigmas, the training-side
recompute reproduces the rollout's log-probs, and what the model cannot take is refused by name."""
import pytest
import torch

from diffrl_fast._versions import FEATURE_VERSIONS, at_least

pytestmark = pytest.mark.skipif(not at_least(*FEATURE_VERSIONS["Wan pipelines (WanPipeline)"]),
                                reason="Wan pipelines need diffusers>=0.42 (the lowest leg pins 0.32)")

from diffrl_fast.diffusion.coefficients import make_schedule
from diffrl_fast.diffusion.recompute import parity_report
from diffrl_fast.diffusion.rollout import sample_trajectories
from diffrl_fast.models.pipelines import load_pipeline

PROMPTS = ["a cat playing in the snow", "a red car"]
SIZE = dict(height=32, width=32)


def _model(path, frames=5):
    model = load_pipeline(path)
    model.num_frames = frames
    return model


def test_deterministic_rollout_equals_wan_pipeline(wan_euler_path):
    model = _model(wan_euler_path)
    assert model.kind == "wan" and model.is_video and model.latent_shape_for(32, 32) == (16, 2, 4, 4)
    steps = 4
    window = torch.zeros(steps, dtype=torch.bool)  # every step the flow ODE's Euler step: the pipeline's sampler here
    sched = make_schedule(model.scheduler, steps, window=window, **model.sampling_kwargs())
    traj = sample_trajectories(model, PROMPTS, num_steps=steps, guidance_scale=1.0, schedule=sched, seeds=[0, 1], **SIZE)
    assert traj.images.shape == (2, 5, 3, 32, 32) and 0 <= float(traj.images.min()) and float(traj.images.max()) <= 1
    pipe = model.pipe
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=1.0, num_frames=5, max_sequence_length=model.max_sequence_length,
               latents=traj.latents[:, 0], output_type="latent", **SIZE).frames
    assert torch.allclose(out, traj.final_latents, rtol=1e-4, atol=1e-5)
    assert torch.allclose(traj.schedule.timesteps.double(), pipe.scheduler.timesteps.double().cpu(), atol=1e-3)
    video = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=1.0, num_frames=5, max_sequence_length=model.max_sequence_length,
                 latents=traj.latents[:, 0], output_type="pt", **SIZE).frames  # [B, F, 3, H, W] in [0, 1]
    assert torch.allclose(video, traj.images, atol=1e-4)


def test_shipped_unipc_becomes_the_flow_sde_on_its_own_sigmas(wan_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    model = _model(wan_path)
    assert isinstance(model.shipped_scheduler, UniPCMultistepScheduler)
    assert isinstance(model.scheduler, FlowMatchEulerDiscreteScheduler)
    sched = make_schedule(model.scheduler, 6, **model.sampling_kwargs())
    assert sched.kind == "flow_sde" and bool(sched.stochastic[:-1].all())
    unipc = UniPCMultistepScheduler.from_config(model.shipped_scheduler.config)
    unipc.set_timesteps(6)
    ours = model.scheduler.sigmas.double()
    assert torch.allclose(ours, unipc.sigmas.double(), atol=2e-6)  # UniPC's first is 1 - 1e-6, ours 1
    assert float((sched.timesteps.double() - unipc.timesteps.double()).abs().max()) <= 1  # UniPC truncates to int
    with pytest.raises(ValueError, match="model.sampler=auto"):
        load_pipeline(wan_path, sampler="ddim")


def test_sde_rollout_log_probs_recompute_parity(wan_path, request):
    from tests.diffusion.conftest import pipeline_device

    model = load_pipeline(wan_path, device=pipeline_device(request))
    model.num_frames = 5
    traj = sample_trajectories(model, PROMPTS * 2, num_steps=3, guidance_scale=2.0, seeds=[0, 1, 2, 3], **SIZE)
    assert traj.schedule.kind == "flow_sde" and traj.latents.shape[2:] == (16, 2, 4, 4)
    assert torch.isfinite(traj.log_probs).all() and bool((traj.log_probs != 0).all())
    assert parity_report(model, traj, batch_size=3, chunk_size=2)["worst"] <= 1e-5


def test_refuses_frame_counts_the_vae_cannot_take_and_prompts_too_long(wan_path):
    model = _model(wan_path)
    assert [model.latent_frames(f) for f in (1, 5, 9, 17, 81)] == [1, 2, 3, 5, 21]
    for bad in (0, 4, 6, 80):
        with pytest.raises(ValueError, match="4k \\+ 1"):
            model.latent_frames(bad)
    with pytest.raises(ValueError, match="tokens long"):
        model.encode(["a cat " * 20])


def test_fsdp_and_checkpointing_units_are_the_transformer_blocks(wan_path):
    """FSDP2 shards each WanTransformerBlock as its own unit (then the root), the blocks diffusers' gradient
    checkpointing recomputes one at a time."""
    from diffrl_fast.train.distributed import fsdp_units

    model = _model(wan_path)
    units = fsdp_units(model.denoiser)
    blocks = list(model.denoiser.blocks)
    assert units[:-1] == blocks and units[-1] is model.denoiser
    assert model.denoiser._supports_gradient_checkpointing and model.denoiser._no_split_modules == ["WanTransformerBlock"]
