"""Z-Image: our rollout of the tiny Z-Image (list inputs, a negated velocity, time 1 - sigma, prompt embeddings of
their own lengths, guidance pos + G (pos - neg)) reproduces diffusers' ZImagePipeline with and without guidance,
and the training recompute reproduces the rollout's log-probs."""
import pytest
import torch

from diffrl_fast._versions import FEATURE_VERSIONS, at_least
from diffrl_fast.diffusion.coefficients import make_schedule
from diffrl_fast.diffusion.recompute import parity_report
from diffrl_fast.diffusion.rollout import sample_trajectories
from diffrl_fast.models.pipelines import load_pipeline

pytestmark = pytest.mark.skipif(not at_least(*FEATURE_VERSIONS["Z-Image pipelines (ZImagePipeline)"]),
                                reason="Z-Image pipelines need diffusers>=0.42 (the lowest leg pins 0.32)")
PROMPTS = ["a photo of a cat", "a red car on a street in the city"]  # different lengths: each keeps its own
SIZE = dict(height=64, width=64)


@pytest.mark.parametrize("pipeline_guidance", [0.0, 3.0])
def test_deterministic_rollout_equals_z_image_pipeline(z_image_path, pipeline_guidance):
    model = load_pipeline(z_image_path)
    assert model.kind == "z_image" and model.latent_shape_for(64, 64) == (16, 8, 8)
    steps = 4
    window = torch.zeros(steps, dtype=torch.bool)  # every step the flow ODE's Euler step: the pipeline's sampler
    sched = make_schedule(model.scheduler, steps, window=window, **model.schedule_kwargs((16, 8, 8)))
    # ZImagePipeline's pos + G (pos - neg) is u + g (c - u) at g = G + 1
    traj = sample_trajectories(model, PROMPTS, num_steps=steps, guidance_scale=pipeline_guidance + 1, schedule=sched, seeds=[0, 1], **SIZE)
    assert traj.images.shape == (2, 3, 64, 64) and (traj.uncond is None) == (pipeline_guidance == 0)
    pipe = model.pipe
    # ZImagePipeline templates the prompt list it is given in place: each call gets its own copy
    out = pipe(list(PROMPTS), guidance_scale=pipeline_guidance, num_inference_steps=steps, latents=traj.latents[:, 0].clone(),
               output_type="latent", **SIZE).images
    assert torch.allclose(out, traj.final_latents, rtol=1e-4, atol=1e-5)
    assert torch.allclose(traj.schedule.timesteps.double(), pipe.scheduler.timesteps.double().cpu(), atol=1e-3)
    if pipeline_guidance == 0:  # the decoded images too: [B, 3, H, W] in [0, 1]
        images = pipe(list(PROMPTS), guidance_scale=0.0, num_inference_steps=steps, latents=traj.latents[:, 0].clone(), output_type="pt",
                      **SIZE).images
        assert torch.allclose(images, traj.images, atol=1e-4)


def test_sde_rollout_log_probs_recompute_parity_with_guidance(z_image_path, request):
    from tests.diffusion.conftest import pipeline_device

    model = load_pipeline(z_image_path, device=pipeline_device(request))
    traj = sample_trajectories(model, PROMPTS * 2, num_steps=3, guidance_scale=4.0, seeds=[0, 1, 2, 3], **SIZE)
    assert traj.schedule.kind == "flow_sde" and torch.isfinite(traj.log_probs).all()
    assert parity_report(model, traj, batch_size=3, chunk_size=2)["worst"] <= 1e-5


def test_prompt_lengths_batching_and_a_prompt_too_long(z_image_path):
    model = load_pipeline(z_image_path)
    cond = model.encode_prompts(PROMPTS)
    assert cond.mask.sum(1).tolist()[0] < cond.mask.sum(1).tolist()[1]
    # a sample's velocity does not depend on what it is batched with (padding never reaches the transformer)
    x, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([700.0, 300.0])
    both = model.predict(x, t, cond)
    alone = model.predict(x[:1], t[:1], model.encode_prompts(PROMPTS[:1]))
    assert torch.allclose(both[:1], alone, atol=1e-5)
    with pytest.raises(ValueError, match="tokens long with its chat template"):  # 512 at most, not cut silently
        model.encode(["a cat " * 100])
