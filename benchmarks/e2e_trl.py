"""End-to-end contender: trl 0.23.1's ``DDPOTrainer`` (the last trl release with DDPO), unmodified.

``run_trl(pipeline_path, settings, seed, out_dir)`` trains LoRA on a local StableDiffusionPipeline folder
with trl's trainer and returns measured throughput, peak memory and the reward curve. It is meant to
run in a fresh process (one contender per process, so the peak-memory figures do not mix):

    python benchmarks/e2e_trl.py --size tiny --seed 0 --out /tmp/e2e_trl
    python benchmarks/e2e_trl.py --pipeline PATH --seed 0 --out DIR --settings-json '{"num_epochs": 3}'

and prints one line ``RESULT {json}`` at the end (also written to ``DIR/trl_result.json``).

Install (trl's pins are not needed; it imports accelerate, datasets, transformers, and pandas):

    pip install --no-deps trl==0.23.1 && pip install pandas datasets

How the settings map onto ``DDPOConfig`` (see ``ddpo_config``): num_steps -> sample_num_steps,
guidance_scale -> sample_guidance_scale (also used in training: train_cfg=True, trl's default, so the
trained log-prob is that of the guided step, as in ddpo-pytorch), eta -> sample_eta, sample_batch_size,
sample_num_batches_per_epoch, train_batch_size, num_inner_epochs -> train_num_inner_epochs,
timestep_fraction -> train_timestep_fraction, gradient_accumulation_steps ->
train_gradient_accumulation_steps, learning_rate -> train_learning_rate, clip_range -> train_clip_range,
adv_clip_max -> train_adv_clip_max, max_grad_norm -> train_max_grad_norm, per_prompt_stat_tracking /
buffer_size / min_count -> per_prompt_stat_tracking{,_buffer_size,_min_count}, num_epochs, seed,
mixed_precision. Fixed: log_with=None (no tracker), save_freq=10**9 (never checkpoints),
async_reward_computation=False, negative prompt "" (trl's default), AdamW with trl's defaults
(betas 0.9/0.999, weight decay 1e-4, eps 1e-8: the same as ddpo-pytorch and diffrl_fast).

Where trl's semantics are fixed or differ from the settings' wording:
- LoRA: ``DefaultDDPOStableDiffusionPipeline.get_trainable_layers`` hard-codes
  ``LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v",
  "to_out.0"])``, i.e. exactly rank 4 (scale alpha/r = 1) on the attention projections; any other
  ``lora_rank`` is refused rather than silently ignored.
- Log-probs are averaged (not summed) over the latent elements, as in ddpo-pytorch, so clip_range
  means what it means there.
- The loss is the PPO-clip loss averaged over the batch at each timestep; the timesteps of a batch are
  accumulated through accelerate (gradient_accumulation_steps x trained timesteps micro-steps, each
  loss divided by that count), so one optimizer step sees the mean over timesteps. Timesteps are
  shuffled independently per sample; trained timesteps = int(num_steps x timestep_fraction) (floor).
- trl's DDIM step clamps the previous timestep at 0 instead of using ``final_alpha_cumprod`` on the
  last step; with the tiny pipelines' scheduler (set_alpha_to_one=False) both are alphas_cumprod[0].
- Per-prompt statistics: below ``min_count`` rewards a prompt is normalised by the whole epoch's mean
  and std (ddpo-pytorch's rule). Prompts are keyed by the tokenizer's round trip of the prompt ids.
- Rewards are computed synchronously after all sampling batches of an epoch
  (async_reward_computation=False); DefaultDDPOStableDiffusionPipeline swaps in a DDIMScheduler built
  from the folder's scheduler config (the tiny folders already hold one) and drops the safety checker.
  Nothing overlaps: sampling, then scoring, then training, one after the other.
- Randomness: trl draws latents and step noise from the global torch RNG (``set_seed(seed)``); prompts
  come from ``prompt_fn_for``'s own RNG. Runs repeat exactly here, but see other samples than
  diffrl_fast's per-sample seeds: compare reward curves statistically, not sample by sample.

Timing, without touching trl's code (``instrument``): the trainer instance's bound methods are wrapped
(instance attributes shadow the class's, and ``train``/``step`` call them through ``self``):
- rollout = ``_generate_samples`` (text encoding, denoising, VAE decode) + ``compute_rewards``,
- train = ``_train_batched_samples`` (all inner epochs),
- an epoch = ``step``; its remainder (advantages, shuffling) counts only in the overall figure.
Samples per second: rollout and overall count the epoch's samples; train counts samples x inner epochs
(each sample is trained on once per inner epoch), as diffrl_fast's trainer reports them.
Peak memory: ``PeakMemory`` reset after the trainer is built (weights loaded), read after training.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for a hub

import torch

# The settings the e2e benchmark compares on; callers override any subset.
DEFAULT_SETTINGS = {
    "num_steps": 10,
    "guidance_scale": 5.0,
    "eta": 1.0,
    "sample_batch_size": 8,
    "sample_num_batches_per_epoch": 2,
    "train_batch_size": 8,
    "num_inner_epochs": 1,
    "timestep_fraction": 1.0,
    "gradient_accumulation_steps": 1,
    "learning_rate": 3e-4,
    "clip_range": 1e-4,
    "adv_clip_max": 5.0,
    "max_grad_norm": 1.0,
    "lora_rank": 4,
    "per_prompt_stat_tracking": True,
    "buffer_size": 32,
    "min_count": 16,
    "num_epochs": 3,
    "mixed_precision": "no",
    "reward": "jpeg_compressibility",
    "prompts": ["a photo of a cat", "a photo of a dog", "a red car", "a horse in a field"],
}

TRL_LORA_RANK = 4  # hard-coded in trl's DefaultDDPOStableDiffusionPipeline.get_trainable_layers


def resolve_settings(settings: dict | None) -> dict:
    """DEFAULT_SETTINGS overridden by ``settings``; unknown keys are an error, not silently ignored."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {sorted(DEFAULT_SETTINGS)}")
    merged = {**DEFAULT_SETTINGS, **settings}
    if merged["lora_rank"] != TRL_LORA_RANK:
        raise ValueError(f"trl's DDPO pipeline hard-codes LoRA rank {TRL_LORA_RANK}; got lora_rank={merged['lora_rank']}")
    return merged


def ddpo_config(s: dict, seed: int, out_dir: str):
    """trl's DDPOConfig for resolved settings ``s`` (the mapping is listed in the module docstring)."""
    from trl import DDPOConfig

    return DDPOConfig(
        exp_name="e2e_trl",
        seed=seed,
        num_epochs=s["num_epochs"],
        mixed_precision=s["mixed_precision"],
        sample_num_steps=s["num_steps"],
        sample_eta=s["eta"],
        sample_guidance_scale=s["guidance_scale"],
        sample_batch_size=s["sample_batch_size"],
        sample_num_batches_per_epoch=s["sample_num_batches_per_epoch"],
        train_batch_size=s["train_batch_size"],
        train_learning_rate=s["learning_rate"],
        train_gradient_accumulation_steps=s["gradient_accumulation_steps"],
        train_max_grad_norm=s["max_grad_norm"],
        train_num_inner_epochs=s["num_inner_epochs"],
        train_cfg=True,
        train_adv_clip_max=s["adv_clip_max"],
        train_clip_range=s["clip_range"],
        train_timestep_fraction=s["timestep_fraction"],
        per_prompt_stat_tracking=s["per_prompt_stat_tracking"],
        per_prompt_stat_tracking_buffer_size=s["buffer_size"],
        per_prompt_stat_tracking_min_count=s["min_count"],
        async_reward_computation=False,
        log_with=None,
        save_freq=10**9,  # step() saves when epoch % save_freq == 0 (epoch > 0): never, here
        logdir=str(Path(out_dir) / "logs"),
        project_kwargs={"project_dir": str(out_dir)},  # where accelerate would write, were it to
    )


def prompt_fn_for(prompts: list[str], seed: int) -> Callable[[], tuple[str, dict]]:
    """trl's prompt_fn: one prompt drawn uniformly per call, from an RNG of its own (seeded)."""
    rng = random.Random(seed)
    return lambda: (rng.choice(prompts), {})


class _Timer:
    """Accumulates the wall time of the calls of wrapped functions, per name."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.totals: dict[str, float] = {}

    def now(self) -> float:
        if self.cuda:  # kernels are asynchronous: time what ran, not what was queued
            torch.cuda.synchronize()
        return time.perf_counter()

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + self.now() - start

        return timed

    def take(self) -> dict[str, float]:
        """Totals since the last take, then reset."""
        totals, self.totals = self.totals, {}
        return totals


def instrument(trainer) -> list[dict]:
    """Wrap the trainer instance's bound methods with timers (trl's code is untouched: instance attributes
    shadow the class's methods, and trl calls them through ``self``). Returns the list that then receives
    one record per epoch: wall, rollout and train seconds, and the epoch's rewards."""
    timer = _Timer(cuda=trainer.accelerator.device.type == "cuda")
    records: list[dict] = []
    rewards_seen: list[torch.Tensor] = []
    trl_compute_rewards, trl_step = trainer.compute_rewards, trainer.step

    def compute_rewards(*args, **kwargs):
        # trl returns zip(per-batch rewards, per-batch infos), which step() unpacks into two tuples.
        rewards, infos = trl_compute_rewards(*args, **kwargs)
        rewards_seen.extend(r.flatten().float().cpu() for r in rewards)
        return rewards, infos

    def step(epoch, global_step):
        start = timer.now()
        global_step = trl_step(epoch, global_step)
        wall = timer.now() - start
        parts = timer.take()
        records.append({"wall": wall, "rollout": parts.get("sample", 0.0) + parts.get("reward", 0.0),
                        "train": parts.get("train", 0.0), "rewards": torch.cat(rewards_seen)})
        rewards_seen.clear()
        return global_step

    trainer.compute_rewards = timer.wrap("reward", compute_rewards)
    trainer._generate_samples = timer.wrap("sample", trainer._generate_samples)
    trainer._train_batched_samples = timer.wrap("train", trainer._train_batched_samples)
    trainer.step = step
    return records


def _versions() -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers
    import trl

    return {"trl": trl.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__}


def run_trl(pipeline_path: str, settings: dict, seed: int, out_dir: str) -> dict:
    """Train with trl's DDPOTrainer on the pipeline folder ``pipeline_path``; measured figures as a dict."""
    import accelerate
    from trl import DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from diffrl_fast.rewards import get_reward
    from diffrl_fast.utils.memory import PeakMemory

    s = resolve_settings(settings)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    # trl logs through accelerate's logger before it builds its Accelerator; that logger needs the state.
    accelerate.PartialState()

    # The registry's reward already has trl's signature: images [B, 3, H, W] in [0, 1] (trl samples with
    # output_type="pt"), prompts, metadata -> (rewards [B], info dict).
    reward = get_reward(s["reward"])
    pipeline = DefaultDDPOStableDiffusionPipeline(pipeline_path, use_lora=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DDPOTrainer is deprecated", category=DeprecationWarning)
        trainer = DDPOTrainer(ddpo_config(s, seed, out_dir), reward, prompt_fn_for(list(s["prompts"]), seed), pipeline)
    pipeline.set_progress_bar_config(disable=True)  # per-step bars cost time and flood the subprocess's log

    records = instrument(trainer)

    memory = PeakMemory(trainer.accelerator.device)
    memory.reset()
    trainer.train()
    peak_mb = memory.peak_mb()

    n = s["sample_batch_size"] * s["sample_num_batches_per_epoch"] * trainer.accelerator.num_processes
    epochs = len(records)
    rollout_s = sum(r["rollout"] for r in records)
    train_s = sum(r["train"] for r in records)
    total_s = sum(r["wall"] for r in records)
    return {
        "rollout_samples_per_s": n * epochs / rollout_s,
        "train_samples_per_s": n * epochs * s["num_inner_epochs"] / train_s,
        "overall_samples_per_s": n * epochs / total_s,
        "peak_mem_mb": peak_mb,
        "reward_per_epoch": [float(r["rewards"].mean()) for r in records],
        "epoch_times_s": [r["wall"] for r in records],
        "epoch_rollout_times_s": [r["rollout"] for r in records],
        "epoch_train_times_s": [r["train"] for r in records],
        "samples_per_epoch": n,
        "threads": torch.get_num_threads(),
        "device": str(trainer.accelerator.device),
        "settings": s,
        "seed": seed,
        "versions": _versions(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", help="StableDiffusionPipeline folder (default: the tiny pipeline of --size)")
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny",
                        help="tiny: 4x16x16 latents, UNet (32, 64); small: 4x32x32 latents, UNet (64, 128) x 2 layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "e2e_trl"),
                        help="folder for trl_result.json (and anything accelerate writes)")
    parser.add_argument("--settings-json", default="{}", help="overrides of DEFAULT_SETTINGS, as JSON")
    args = parser.parse_args(argv)
    path = args.pipeline
    if path is None:
        from diffrl_fast.models.tiny import cached_tiny_pipeline

        kwargs = {} if args.size == "tiny" else {"block_out_channels": (64, 128), "layers_per_block": 2, "latent_size": 32}
        path = cached_tiny_pipeline("sd", **kwargs)
    result = run_trl(path, json.loads(args.settings_json), args.seed, args.out)
    result["pipeline"] = path
    (Path(args.out) / "trl_result.json").write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
