"""FLUX.2: our rollout of the tiny klein (patchified batch-normalised latents, 4-axis positions, Qwen3 hidden states of
three layers, the empirical mu of token and step counts) reproduces diffusers' Flux2KleinPipeline with and without
CFG, and of the tiny dev (Mistral-3 behind its processor, embedded guidance) Flux2Pipeline; the training recompute
reproduces the rollout's log-probs."""
import pytest
import torch

from diffrl_fast._versions import FEATURE_VERSIONS, at_least
from diffrl_fast.diffusion.coefficients import make_schedule
from diffrl_fast.diffusion.recompute import parity_report
from diffrl_fast.diffusion.rollout import sample_trajectories
from diffrl_fast.models.pipelines import load_pipeline

pytestmark = pytest.mark.skipif(not at_least(*FEATURE_VERSIONS["FLUX.2 pipelines (Flux2Pipeline, Flux2KleinPipeline)"]),
                                reason="FLUX.2 pipelines need diffusers>=0.42 (the lowest leg pins 0.32)")
PROMPTS = ["a photo of a cat", "a red car on a street in the city"]
SIZE = dict(height=64, width=64)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_deterministic_rollout_equals_flux2_klein_pipeline(flux2_klein_path, guidance):
    model = load_pipeline(flux2_klein_path)
    assert model.kind == "flux2" and model.latent_shape_for(64, 64) == (128, 4, 4)
    steps = 4
    window = torch.zeros(steps, dtype=torch.bool)  # every step the flow ODE's Euler step: the pipeline's sampler
    sched = make_schedule(model.scheduler, steps, window=window, **model.schedule_kwargs((128, 4, 4), steps))
    traj = sample_trajectories(model, PROMPTS, num_steps=steps, guidance_scale=guidance, schedule=sched, seeds=[0, 1], **SIZE)
    assert traj.images.shape == (2, 3, 64, 64)
    pipe = model.pipe
    out = pipe(prompt=list(PROMPTS), guidance_scale=guidance, num_inference_steps=steps, latents=traj.latents[:, 0].clone(),
               output_type="latent", **SIZE).images  # the VAE's latents: batch norm undone, unpatchified
    assert out.shape == (2, 32, 8, 8) and torch.allclose(out, model.vae_latents(traj.final_latents), rtol=1e-4, atol=1e-5)
    assert torch.allclose(traj.schedule.timesteps.double(), pipe.scheduler.timesteps.double().cpu(), atol=1e-3)
    # the shift depends on the step count: a 6-step schedule is not the 4-step one's prefix
    assert model.schedule_kwargs((128, 4, 4), 6)["mu"] != model.schedule_kwargs((128, 4, 4), 4)["mu"]
    if guidance == 1.0:  # the decoded images too: [B, 3, H, W] in [0, 1]
        images = pipe(prompt=list(PROMPTS), guidance_scale=1.0, num_inference_steps=steps, latents=traj.latents[:, 0].clone(),
                      output_type="pt", **SIZE).images
        assert torch.allclose(images, traj.images, atol=1e-4)


def test_sde_rollout_log_probs_recompute_parity_with_cfg(flux2_klein_path, request):
    from tests.diffusion.conftest import pipeline_device

    model = load_pipeline(flux2_klein_path, device=pipeline_device(request))
    traj = sample_trajectories(model, PROMPTS * 2, num_steps=3, guidance_scale=4.0, seeds=[0, 1, 2, 3], **SIZE)
    assert traj.schedule.kind == "flow_sde" and torch.isfinite(traj.log_probs).all()
    assert parity_report(model, traj, batch_size=3, chunk_size=2)["worst"] <= 1e-5


def test_prompt_too_long(flux2_klein_path):
    model = load_pipeline(flux2_klein_path)
    with pytest.raises(ValueError, match="tokens long with its chat template"):  # 512 at most, not cut silently
        model.encode(["a cat " * 100])


def test_flux2_dev_rollout_equals_its_pipeline_and_recomputes(flux2_dev_path):
    model = load_pipeline(flux2_dev_path)
    assert model.kind == "flux2" and model.dev and model.text_layers == (10, 20, 30)
    steps = 3
    window = torch.zeros(steps, dtype=torch.bool)
    sched = make_schedule(model.scheduler, steps, window=window, **model.schedule_kwargs((128, 4, 4), steps))
    # guidance-distilled: the guidance goes in as an embedding, one pass per step
    passes = model.denoiser_passes
    traj = sample_trajectories(model, PROMPTS, num_steps=steps, guidance_scale=1.0, schedule=sched, seeds=[0, 1], **SIZE)
    assert model.denoiser_passes - passes == 2 * steps
    kw = dict(prompt=list(PROMPTS), guidance_scale=model.guidance, num_inference_steps=steps, **SIZE)
    out = model.pipe(latents=traj.latents[:, 0].clone(), output_type="latent", **kw).images  # Flux2Pipeline's: packed tokens
    assert torch.allclose(out, traj.final_latents.reshape(2, 128, 16).transpose(1, 2), rtol=1e-4, atol=1e-5)
    images = model.pipe(latents=traj.latents[:, 0].clone(), output_type="pt", **kw).images
    assert torch.allclose(images, traj.images, atol=1e-4)
    model.guidance = 2.0  # the embedded guidance is an input of the policy: another value, another sample
    other = sample_trajectories(model, PROMPTS, num_steps=steps, guidance_scale=1.0, schedule=sched, seeds=[0, 1], **SIZE)
    assert not torch.allclose(other.final_latents, traj.final_latents)
    sde = sample_trajectories(model, PROMPTS * 2, num_steps=3, guidance_scale=1.0, seeds=[0, 1, 2, 3], **SIZE)
    assert parity_report(model, sde, batch_size=3, chunk_size=2)["worst"] <= 1e-5
    with pytest.raises(ValueError, match="tokens long with its chat template"):  # its system message counts too
        model.encode(["a cat " * 80])
