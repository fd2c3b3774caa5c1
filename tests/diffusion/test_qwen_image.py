"""Qwen-Image: our rollout of the tiny Qwen-Image (2x2-packed latents, a masked Qwen2.5-VL prompt encoding, dynamic
exponential shifting with shift_terminal on the FLUX sigma grid, norm-rescaled true CFG) reproduces diffusers'
QwenImagePipeline with and without guidance, and the training recompute reproduces the rollout's log-probs."""
import pytest
import torch

from diffrl_fast._versions import FEATURE_VERSIONS, at_least
from diffrl_fast.diffusion.coefficients import make_schedule
from diffrl_fast.diffusion.recompute import parity_report
from diffrl_fast.diffusion.rollout import sample_trajectories
from diffrl_fast.models.conditioning import Conditioning
from diffrl_fast.models.pipelines import FluxModel, load_pipeline

pytestmark = pytest.mark.skipif(not at_least(*FEATURE_VERSIONS["Qwen-Image pipelines (QwenImagePipeline)"]),
                                reason="Qwen-Image pipelines need diffusers>=0.42 (the lowest leg pins 0.32)")
PROMPTS = ["a photo of a cat", "a red car on a street in the city"]  # different lengths: the mask pads the shorter
SIZE = dict(height=64, width=64)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_deterministic_rollout_equals_qwen_image_pipeline(qwen_image_path, guidance):
    model = load_pipeline(qwen_image_path)
    assert model.kind == "qwen_image" and model.latent_shape_for(64, 64) == (16, 8, 8)
    steps = 4
    window = torch.zeros(steps, dtype=torch.bool)  # every step the flow ODE's Euler step: the pipeline's sampler
    sched = make_schedule(model.scheduler, steps, window=window, **model.schedule_kwargs((16, 8, 8)))
    negative = [" "] * 2 if guidance > 1 else None
    traj = sample_trajectories(model, PROMPTS, num_steps=steps, guidance_scale=guidance, schedule=sched, seeds=[0, 1],
                               negative_prompts=negative, **SIZE)
    assert traj.images.shape == (2, 3, 64, 64)
    pipe = model.pipe
    out = pipe(PROMPTS, negative_prompt=negative, true_cfg_scale=guidance, num_inference_steps=steps, latents=FluxModel.pack(traj.latents[:, 0]),
               output_type="latent", **SIZE).images
    assert torch.allclose(FluxModel.unpack(out, 8, 8), traj.final_latents, rtol=1e-4, atol=1e-5)
    assert torch.allclose(traj.schedule.timesteps.double(), pipe.scheduler.timesteps.double().cpu(), atol=1e-3)
    if guidance == 1.0:  # the decoded images too: [B, 3, H, W] in [0, 1]
        images = pipe(PROMPTS, num_inference_steps=steps, latents=FluxModel.pack(traj.latents[:, 0]), output_type="pt", **SIZE).images
        assert torch.allclose(images, traj.images, atol=1e-4)


def test_sde_rollout_log_probs_recompute_parity_with_true_cfg(qwen_image_path, request):
    from tests.diffusion.conftest import pipeline_device

    model = load_pipeline(qwen_image_path, device=pipeline_device(request))
    traj = sample_trajectories(model, PROMPTS * 2, num_steps=3, guidance_scale=4.0, seeds=[0, 1, 2, 3],
                               negative_prompts=[" "] * 4, **SIZE)
    assert traj.schedule.kind == "flow_sde" and torch.isfinite(traj.log_probs).all()
    assert parity_report(model, traj, batch_size=3, chunk_size=2)["worst"] <= 1e-5


def test_prompt_embedding_ignores_padding_and_detach_uncond_is_refused(qwen_image_path, tmp_path):
    from diffrl_fast.algos.critic import prompt_embedding

    model = load_pipeline(qwen_image_path)
    alone, with_longer = model.encode_prompts(["a cat"]), Conditioning.cat([model.encode_prompts(["a cat"]),
                                                                            model.encode_prompts([PROMPTS[1]])]).index(slice(0, 1))
    assert with_longer.hidden.shape[1] > alone.hidden.shape[1]
    assert torch.allclose(prompt_embedding(alone), prompt_embedding(with_longer), atol=1e-6)
    from diffrl_fast.config_utils import load_config
    from diffrl_fast.train.config import Config, validate
    from diffrl_fast.train.trainer import Trainer

    cfg = validate(load_config(Config, None, [f"model.path={qwen_image_path}", f"output_dir={tmp_path}", "algo=grpo", "grpo.group_size=2",
                                              "grpo.detach_uncond=true", "sample.guidance_scale=4.0", "sample.batch_size=2",
                                              "train.batch_size=2", "reward.name=jpeg_compressibility", "prompts=[a cat]"]))
    with pytest.raises(ValueError, match="grpo.detach_uncond=false"):
        Trainer(cfg, tmp_path / "r", log_fn=lambda s: None)
    with pytest.raises(ValueError, match="tokens long with its template"):  # 1024 tokens at most, not cut silently
        model.encode(["a cat " * 200])


def test_conditioning_of_different_lengths_pads_with_a_mask():
    a = Conditioning(torch.ones(1, 3, 4), mask=torch.ones(1, 3, dtype=torch.long))
    b = Conditioning(torch.ones(2, 5, 4), mask=torch.ones(2, 5, dtype=torch.long))
    c = Conditioning.cat([a, b])
    assert c.hidden.shape == (3, 5, 4) and c.mask.tolist()[0] == [1, 1, 1, 0, 0]
    assert float(c.hidden[0, 3:].abs().sum()) == 0 and c.index(slice(1, 3)).mask.shape == (2, 5)
