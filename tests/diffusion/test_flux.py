"""FLUX.1-style pipelines: our rollout of the tiny FLUX (2x2-packed latents, position ids, the guidance
embedding, dynamic shifting on FluxPipeline's sigma grid) reproduces diffusers' FluxPipeline, and the
training-side recompute reproduces the rollout's log-probs."""
import torch

from diffrl_fast.diffusion.coefficients import make_schedule
from diffrl_fast.diffusion.recompute import parity_report
from diffrl_fast.diffusion.rollout import sample_trajectories
from diffrl_fast.models.pipelines import FluxModel, load_pipeline

PROMPTS = ["a photo of a cat", "a red car"]


def test_pack_unpack_and_ids():
    x = torch.randn(2, 16, 6, 4)
    tokens = FluxModel.pack(x)
    assert tokens.shape == (2, 6, 64) and torch.equal(FluxModel.unpack(tokens, 6, 4), x)
    assert torch.equal(tokens[0, 1, :4], x[0, 0, 0:2, 2:4].reshape(-1))  # token 1 = rows 0-1, columns 2-3, channel 0 first
    ids = FluxModel.image_ids(6, 4, "cpu", torch.float32)
    assert ids.shape == (6, 3) and ids[5].tolist() == [0.0, 2.0, 1.0]


def test_deterministic_rollout_equals_flux_pipeline(flux_path):
    model = load_pipeline(flux_path)
    assert model.kind == "flux" and model.latent_shape == (16, 8, 8) and model.denoiser.config.guidance_embeds
    steps = 4
    window = torch.zeros(steps, dtype=torch.bool)  # every step the ODE's Euler step: FluxPipeline's sampler
    sched = make_schedule(model.scheduler, steps, window=window, **model.sampling_kwargs())
    traj = sample_trajectories(model, PROMPTS, num_steps=steps, guidance_scale=1.0, schedule=sched, seeds=[0, 1])
    x0 = traj.latents[:, 0]
    pipe = model.pipe
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=model.guidance, height=64, width=64, max_sequence_length=model.max_sequence_length,
               latents=FluxModel.pack(x0), output_type="latent").images
    assert torch.allclose(FluxModel.unpack(out, 8, 8), traj.final_latents, rtol=1e-4, atol=1e-5)
    assert torch.allclose(traj.schedule.timesteps.double(), pipe.scheduler.timesteps.double().cpu(), atol=1e-3)


def test_sde_rollout_log_probs_recompute(flux_path):
    model = load_pipeline(flux_path)
    traj = sample_trajectories(model, PROMPTS * 2, num_steps=3, guidance_scale=1.0, seeds=[0, 1, 2, 3])
    assert traj.schedule.kind == "flow_sde" and traj.images.shape == (4, 3, 64, 64)
    assert torch.isfinite(traj.log_probs).all() and bool((traj.log_probs != 0).all())
    assert parity_report(model, traj, batch_size=3, chunk_size=2)["worst"] <= 1e-5
