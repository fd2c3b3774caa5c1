"""The trainer on a tiny SD pipeline: K-invariant gradients, end-to-end outputs, exact resume."""
import json
import math

import pytest
import torch

from diffrl_fast.algos import make_algorithm
from diffrl_fast.config_utils import load_config
from diffrl_fast.diffusion.recompute import pack_chunk
from diffrl_fast.diffusion.rollout import sample_trajectories
from diffrl_fast.models import load_model
from diffrl_fast.train.config import Config, validate
from diffrl_fast.train.trainer import Trainer

SMALL = ["reward.name=jpeg_compressibility", "prompts=[a cat, a dog, a red car]", "sample.num_steps=4", "sample.batch_size=4",
         "sample.num_batches_per_epoch=1", "train.batch_size=2", "train.gradient_accumulation_steps=1", "train.chunk_size=2", "log.eval_samples=4",
         "log.grid_samples=4", "log.progress=false", "log.tensorboard=false", "train.learning_rate=1e-3", "reward.overlap=false",
         "model.lora=true"]


def _cfg(path, tmp_path, *extra):
    return validate(load_config(Config, None, [f"model.path={path}", f"output_dir={tmp_path}", *SMALL, *extra]))


@pytest.mark.parametrize("algo", ["ddpo_is", "ddpo_sf"])
def test_gradients_do_not_depend_on_chunk_size(tiny_sd_path, tmp_path, algo):
    """Packing K timesteps per forward changes the batching only: gradients with K=1, 2, 4 agree."""
    cfg = _cfg(tiny_sd_path, tmp_path, f"algo={algo}")
    model = load_model(tiny_sd_path)
    model.add_lora(rank=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    traj = sample_trajectories(model, ["a cat", "a dog", "a cat"], num_steps=4, guidance_scale=3.0, seeds=[1, 2, 3])
    algo_ = make_algorithm(cfg)

    class T:  # the parts of the trainer an algorithm uses
        autocast_dtype = None

    T.model = model
    data = algo_.prepare(type("Tr", (), {"advantages": lambda self, p, r: torch.tensor([1.0, -0.5, 0.3])})(), traj, torch.zeros(3))
    order = torch.tensor([[3, 0, 2, 1], [1, 2, 0, 3], [0, 1, 2, 3]])
    grads = {}
    for K in (1, 2, 4):
        model.denoiser.zero_grad(set_to_none=True)
        for k0 in range(0, 4, K):
            chunk = pack_chunk(traj, torch.arange(3), order[:, k0:k0 + K], "cpu")
            loss, _ = algo_.chunk_loss(T, chunk, data)
            (loss * (chunk.step_idx.numel() / 12)).backward()
        grads[K] = torch.cat([p.grad.flatten() for p in model.trainable_parameters()])
    scale = grads[1].abs().max()
    assert scale > 0
    for K in (2, 4):  # only the denoiser's batch-size-dependent rounding differs (~1e-6 relative)
        assert (grads[K] - grads[1]).abs().max() / scale < 1e-4, K


def test_end_to_end_outputs(tiny_sd_path, tmp_path):
    cfg = _cfg(tiny_sd_path, tmp_path, "num_epochs=2", "name=e2e")
    summary = Trainer(cfg, tmp_path / "e2e").run()
    run = tmp_path / "e2e"
    for f in ("config.yaml", "metrics.jsonl", "reward_curve.png", "grid_before.png", "grid_after.png", "summary.md",
              "lora/pytorch_lora_weights.safetensors"):
        assert (run / f).exists(), f
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("reward_mean", "reward_std", "loss", "clipfrac", "approx_kl", "grad_norm", "samples_per_s", "peak_mem_mb"):
        assert all(torch.isfinite(torch.tensor(float(r[key]))) for r in records), key
    assert summary["before"]["n"] == 4 and summary["after"]["n"] == 4
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.load_lora_weights(run / "lora", weight_name="pytorch_lora_weights.safetensors")  # diffusers reads the saved adapter (0.32 offline: named)


def test_sdxl_trains_with_lora_and_loads_back(tmp_path):
    """SDXL's added conditioning (pooled text embeddings, size and crop ids) through one training epoch; the adapter
    loads in the stock pipeline."""
    from diffrl_fast.models.tiny import cached_tiny_pipeline

    path = cached_tiny_pipeline("sdxl", root=tmp_path / "tiny")
    cfg = _cfg(path, tmp_path, "num_epochs=1", "name=xl", "log.eval_samples=2", "log.grid_samples=2", "sample.num_steps=3")
    summary = Trainer(cfg, tmp_path / "xl", log_fn=lambda s: None).run()
    record = json.loads((tmp_path / "xl" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]) and summary["after"]["n"] == 2
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.load_lora_weights(tmp_path / "xl" / "lora", weight_name="pytorch_lora_weights.safetensors")
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


def test_resume_continues_exactly(tiny_sd_path, tmp_path):
    """Interrupted after epoch 1 of 3 and resumed: the same metrics, learning rates and weights as one run."""
    sched = ["num_epochs=3", "log.eval_samples=0", "train.lr_schedule=cosine", "train.lr_warmup_steps=2"]
    full = Trainer(_cfg(tiny_sd_path, tmp_path, *sched, "name=full"), tmp_path / "full")
    full.run()
    first = Trainer(_cfg(tiny_sd_path, tmp_path, *sched, "name=part"), tmp_path / "part")
    assert first.run(stop_flag=lambda: first.epoch >= 1)["interrupted"]
    resumed = Trainer(_cfg(tiny_sd_path, tmp_path, *sched, "name=part"), tmp_path / "part")
    assert resumed.resume() and resumed.epoch == 1
    resumed.run()
    a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    # 2 optimiser steps per epoch: warmup 0.5, 1.0 x lr, then cosine over the remaining 4 steps
    assert [r["learning_rate"] for r in a] == pytest.approx([1e-3, 0.5e-3 * (1 + math.cos(math.pi / 4)), 0.5e-3 * (1 + math.cos(3 * math.pi / 4))])
    keys = ("reward_mean", "reward_std", "loss", "clipfrac", "approx_kl", "grad_norm", "learning_rate")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    for (n, p), q in zip(full.model.denoiser.named_parameters(), resumed.model.denoiser.parameters()):
        assert torch.equal(p, q), n


def test_learning_rate_schedules():
    from diffrl_fast.train.distributed import learning_rate_at

    assert [learning_rate_at(i, 1.0, "constant", 2, 6) for i in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [learning_rate_at(i, 1.0, "linear", 0, 4) for i in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert learning_rate_at(2, 2.0, "cosine", 0, 4) == pytest.approx(1.0)
    assert learning_rate_at(9, 2.0, "cosine", 0, 4) == pytest.approx(0.0)


def test_timestep_window_and_eval_overrides(tiny_sd_path, tmp_path):
    """A sliding window: rollouts have log-probs only inside it, it moves with the epoch, training runs on it;
    evaluation samples with its own steps and guidance (CFG-free training evaluated with guidance)."""
    cfg = _cfg(tiny_sd_path, tmp_path, "train.timestep_window=sliding", "train.window_size=2", "train.window_shift_every=1",
               "sample.guidance_scale=1.0", "log.eval_num_steps=3", "log.eval_guidance_scale=4.0", "name=win")
    trainer = Trainer(cfg, tmp_path / "win")
    for epoch, window in ((0, [0, 1]), (1, [1, 2]), (5, [2, 3])):
        traj, rewards = trainer.sample_epoch(epoch)
        trained = (traj.log_probs != 0).any(0).nonzero().flatten().tolist()
        assert trained == window and traj.uncond is None  # one denoiser pass per step without guidance
        # only the states training reads are kept: x_j, x_{j+1} of the window's steps, and x_T
        kept = sorted({*window, *(j + 1 for j in window), traj.num_steps})
        assert traj.latent_steps.tolist() == kept and traj.latents.shape[1] == len(kept)
    full = sample_trajectories(trainer.model, traj.prompts, num_steps=traj.num_steps, guidance_scale=1.0,
                               schedule=traj.schedule, seeds=traj.seeds.tolist())
    assert torch.equal(full.latents[:, traj.latent_steps], traj.latents)
    assert torch.equal(full.latents_at(torch.arange(len(traj)), torch.tensor(3)), traj.latents_at(torch.arange(len(traj)), torch.tensor(3)))
    with pytest.raises(ValueError, match="not stored"):
        traj.latents_at(torch.tensor([0]), torch.tensor([0]))
    stats = trainer.train_epoch(5, traj, trainer.algo.prepare(trainer.run_context, traj, rewards))
    assert math.isfinite(stats["loss"])
    ev = trainer._sample(["a cat"], [0])
    assert ev.num_steps == 3 and ev.guidance_scale == 4.0 and bool(ev.schedule.stochastic.all())
