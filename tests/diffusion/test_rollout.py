"""Rollouts and the training-side recompute on tiny SD 1.x, SDXL and SD3 pipelines (random weights, offline)."""
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from diffrl_fast.diffusion.recompute import chunk_outputs, pack_chunk, parity_report, reference_outputs
from diffrl_fast.diffusion.rollout import _generators, _randn, guided_outputs, sample_trajectories
from diffrl_fast.ops import use_backend
from tests.reference import oracle

PROMPTS = ["a photo of a cat", "a red car", "a dog on the beach", "blue sky"]
SEEDS = [11, 12, 13, 14]


def _rollout(model, steps=6, guidance=4.0, **kw):
    return sample_trajectories(model, PROMPTS, num_steps=steps, guidance_scale=guidance, seeds=SEEDS, **kw)


def test_each_step_equals_diffusers_scheduler_step_and_oracle_logprob(sd_model):
    traj = _rollout(sd_model, eta=0.8)
    sched = sd_model.scheduler
    gens = _generators(traj.seeds, sd_model.device)
    shape = traj.latents.shape[2:]
    assert torch.equal(_randn(gens, shape, "cpu"), traj.latents[:, 0])
    B = len(traj)
    for j, t in enumerate(traj.schedule.timesteps):
        x = traj.latents[:, j]
        eu, ec = guided_outputs(sd_model, x, t.expand(B), traj.cond, traj.uncond)
        eps = eu + traj.guidance_scale * (ec - eu)
        z = _randn(gens, shape, "cpu")
        want = sched.step(eps, t, x, eta=0.8, variance_noise=z).prev_sample
        assert torch.allclose(traj.latents[:, j + 1], want, atol=2e-5), f"step {j}: {(traj.latents[:, j + 1] - want).abs().max():.3g}"
        prev_t = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
        _, mean, std = oracle.ddim_step(sched.alphas_cumprod, sched.final_alpha_cumprod, int(t), prev_t, x, eps, 0.8, z)
        want_logp = oracle.gaussian_logprob(traj.latents[:, j + 1], mean, std)
        assert torch.allclose(traj.log_probs[:, j].double(), want_logp, atol=2e-5), f"step {j}"


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("chunk", [1, 3, 6])
def test_parity_sd(sd_model, backend, chunk):
    with use_backend(backend):
        traj = _rollout(sd_model)
        rep = parity_report(sd_model, traj, batch_size=3, chunk_size=chunk)  # 3 != 4 samples, last batch of 1
    assert rep["worst"] <= 1e-5, rep


@pytest.mark.parametrize("chunk", [1, 3, 6])
def test_parity_sdxl(sdxl_model, chunk):
    traj = _rollout(sdxl_model)
    assert traj.cond.pooled is not None and traj.cond.time_ids is not None
    rep = parity_report(sdxl_model, traj, batch_size=2, chunk_size=chunk)
    assert rep["worst"] <= 1e-5, rep


def test_parity_triton_backend_sd(sd_model):
    with use_backend("triton"):
        traj = _rollout(sd_model, steps=3)
        rep = parity_report(sd_model, traj, batch_size=3, chunk_size=2)
    assert rep["worst"] <= 1e-5, rep


def test_sd3_flow_matching_rollout_and_parity(sd3_model):
    traj = _rollout(sd3_model, steps=4)
    assert traj.schedule.kind == "flow_sde"
    assert traj.images.shape == (4, 3, 128, 128) and torch.isfinite(traj.log_probs).all()
    assert parity_report(sd3_model, traj, batch_size=3, chunk_size=4)["worst"] <= 1e-5


def test_bf16_autocast_keeps_fp32_step_math(sd_model):
    traj = _rollout(sd_model, steps=3, autocast_dtype=torch.bfloat16)
    assert traj.latents.dtype == torch.float32 and traj.log_probs.dtype == torch.float32
    assert torch.isfinite(traj.log_probs).all()
    rep = parity_report(sd_model, traj, batch_size=4, chunk_size=3, autocast_dtype=torch.bfloat16)
    assert rep["worst"] <= 1e-3, rep  # bf16 denoiser outputs depend on batch composition more than fp32


def test_seeded_rollouts_are_reproducible(sd_model):
    a, b = _rollout(sd_model, steps=4), _rollout(sd_model, steps=4)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs) and torch.equal(a.images, b.images)
    one = sample_trajectories(sd_model, [PROMPTS[2]], num_steps=4, guidance_scale=4.0, seeds=[SEEDS[2]])
    # alone in its batch the denoiser rounds differently (batch-size-dependent conv kernels): ~1e-6 relative
    assert torch.allclose(one.latents[0], a.latents[2], rtol=1e-5, atol=1e-4)
    assert torch.allclose(one.log_probs[0], a.log_probs[2], atol=1e-5)
    c = sample_trajectories(sd_model, PROMPTS, num_steps=4, guidance_scale=4.0, seeds=[1, 2, 3, 4])
    assert not torch.allclose(c.latents[:, 0], a.latents[:, 0])


def test_no_guidance_runs_one_pass(sd_model):
    traj = _rollout(sd_model, steps=3, guidance=1.0)
    assert traj.uncond is None
    assert parity_report(sd_model, traj, batch_size=4, chunk_size=2)["worst"] <= 1e-5


def test_lora_reference_is_the_adapter_switched_off(sd_model):
    traj = _rollout(sd_model, steps=3)
    chunk = pack_chunk(traj, torch.arange(2), torch.tensor([[0, 2], [1, 0]]), sd_model.device)
    base_u, base_c = chunk_outputs(sd_model, chunk)
    sd_model.add_lora(rank=2)
    with torch.no_grad():
        for name, p in sd_model.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert {n for n, p in sd_model.denoiser.named_parameters() if p.requires_grad} and all(
        "lora" in n for n, p in sd_model.denoiser.named_parameters() if p.requires_grad)
    pol_u, _ = chunk_outputs(sd_model, chunk)
    ref_u, ref_c = reference_outputs(sd_model, chunk)
    assert not torch.allclose(pol_u, base_u, atol=1e-4)
    assert torch.allclose(ref_u, base_u, atol=1e-6) and torch.allclose(ref_c, base_c, atol=1e-6)
    assert torch.allclose(chunk_outputs(sd_model, chunk)[0], pol_u)  # adapter back on after the block


def test_full_finetune_reference_is_a_frozen_copy(sd_model):
    traj = _rollout(sd_model, steps=2)
    chunk = pack_chunk(traj, torch.arange(2), torch.tensor([[0], [1]]), sd_model.device)
    with pytest.raises(ValueError, match="no reference policy"):
        reference_outputs(sd_model, chunk)
    base = chunk_outputs(sd_model, chunk)[0]
    sd_model.keep_reference_copy()
    with torch.no_grad():
        next(sd_model.denoiser.parameters()).add_(0.1)
    assert torch.allclose(reference_outputs(sd_model, chunk)[0], base, atol=1e-6)
    assert not torch.allclose(chunk_outputs(sd_model, chunk)[0], base, atol=1e-4)


def test_bad_inputs_get_clear_errors(sd_model):
    with pytest.raises(ValueError, match="empty"):
        sample_trajectories(sd_model, [], num_steps=2)
    with pytest.raises(ValueError, match="list of strings"):
        sample_trajectories(sd_model, "a cat", num_steps=2)
    with pytest.raises(ValueError, match="height 100"):
        sample_trajectories(sd_model, PROMPTS, num_steps=2, height=100)
    with pytest.raises(ValueError, match="seeds"):
        sample_trajectories(sd_model, PROMPTS, num_steps=2, seeds=[1, 2])
    with pytest.raises(ValueError, match="negative prompts"):
        sample_trajectories(sd_model, PROMPTS, num_steps=2, negative_prompts=["x"])
    sd_model.scheduler = EulerDiscreteScheduler.from_config(sd_model.scheduler.config)
    with pytest.raises(ValueError, match="unsupported scheduler type EulerDiscreteScheduler"):
        sample_trajectories(sd_model, PROMPTS, num_steps=2)


def test_non_native_image_size(sd_model):
    traj = sample_trajectories(sd_model, PROMPTS[:2], num_steps=2, seeds=[1, 2], height=64, width=192)
    assert traj.latents.shape[-2:] == (8, 24) and traj.images.shape[-2:] == (64, 192)
