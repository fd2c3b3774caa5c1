"""The training config. Every field is documented here; ``diffrl-fast train --help`` prints them all.

Experiments are small YAML files in configs/ plus ``key=value`` overrides on the command line, e.g.

    diffrl-fast train configs/digits.yaml train.learning_rate=1e-4 sample.num_steps=10
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config_utils import ConfigError, option


@dataclass
class ModelConfig:
    path: str = option("digits", "The policy: 'digits' (the built-in digits world) or a diffusers pipeline folder / hub id (SD 1.x/2.x, SDXL, SD3).")
    sampler: str = option("auto", "Scheduler run as the policy: 'auto' keeps DDIM/DDPM/flow matching and converts others to DDIM; or 'ddim', 'ddpm'.")
    lora: bool = option(False, "Train LoRA adapters (true; reference policy = adapter off) or all denoiser weights (false; reference = frozen copy). The 0.25M-parameter digits UNet learns faster fully fine-tuned; SD-size models use LoRA (configs/sd15.yaml).")
    lora_rank: int = option(8, "LoRA rank r; 4-64 is usual.")
    lora_alpha: Optional[float] = option(None, "LoRA alpha (scale alpha/r); null means alpha = rank.")
    lora_targets: list[str] = option(["to_q", "to_k", "to_v", "to_out.0"], "Denoiser modules that get LoRA adapters (attention projections by default).")
    mixed_precision: str = option("no", "Denoiser autocast: 'no' (fp32), 'bf16' or 'fp16'; weights stay fp32 and the log-prob math fp32.")
    gradient_checkpointing: bool = option(False, "The denoiser's own activation checkpointing (diffusers' enable_gradient_checkpointing).")
    reference_device: str = option("", "Full fine-tuning only: device of the frozen reference copy ('' = same as the policy; 'cpu' spares GPU memory).")


@dataclass
class SampleConfig:
    num_steps: int = option(20, "Denoising steps per trajectory (T).")
    guidance_scale: float = option(2.0, "Classifier-free guidance g; 1 disables guidance (one denoiser pass per step).")
    eta: float = option(1.0, "DDIM eta in (0, 1]: the policy's noise level (DDPO uses 1).")
    noise_level: float = option(0.7, "Flow-matching SDE noise level (Flow-GRPO's a), used for SD3-style models.")
    batch_size: int = option(64, "Trajectories per rollout batch (per process).")
    num_batches_per_epoch: int = option(2, "Rollout batches per epoch; samples per epoch = batch_size x this x processes.")
    negative_prompt: str = option("", "Negative prompt for the unconditional branch of guidance.")
    height: Optional[int] = option(None, "Image height in pixels (null: the model's native size).")
    width: Optional[int] = option(None, "Image width in pixels (null: the model's native size).")


@dataclass
class TrainConfig:
    batch_size: int = option(16, "Trajectories per training minibatch (per process).")
    timestep_fraction: float = option(1.0, "Fraction of each trajectory's stochastic steps trained on per inner epoch (random per sample).")
    chunk_size: int = option(4, "Timesteps packed into one denoiser forward (K): the forward batch is batch_size x K (x2 with guidance).")
    num_inner_epochs: int = option(1, "Passes over each epoch's samples.")
    gradient_accumulation_steps: int = option(1, "Minibatches per optimiser step.")
    learning_rate: float = option(3e-4, "AdamW learning rate (digits world fully fine-tuned: 3e-4; SD LoRA: 1e-4..1e-3; SD full fine-tuning: 1e-6..1e-5).")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_weight_decay: float = option(1e-4, "AdamW weight decay.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Gradient clipping by global norm; 0 disables.")
    clip_range: float = option(1e-3, "PPO ratio clip epsilon of DDPO-IS (DDPO uses 1e-4 for SD's 16384-dim latents; the digits world's 256-dim steps move ratios more).")
    adv_clip_max: float = option(5.0, "Advantages are clipped to [-adv_clip_max, adv_clip_max].")
    checkpoint_chunks: bool = option(False, "Activation checkpointing per packed timestep chunk (recompute the chunk's forward in backward).")


@dataclass
class RewardConfig:
    name: str = option("digit_confidence", "Reward: a registered name (digit_confidence, jpeg_compressibility, jpeg_incompressibility, aesthetic, clip_score) or 'package.module:function'.")
    kwargs: dict = option({}, "Keyword arguments of the reward factory (e.g. {clip_path: ..., mlp_path: ...} for aesthetic).")
    drop_nonfinite: bool = option(False, "Drop samples whose reward is NaN/inf (counted in the logs) instead of stopping with an error.")
    overlap: bool = option(True, "Compute rewards in a background thread while the next rollout batch samples.")


@dataclass
class AdvantageConfig:
    per_prompt_stat_tracking: bool = option(True, "Normalise rewards per prompt with running statistics (DDPO); false: whole-batch normalisation.")
    buffer_size: int = option(32, "Per-prompt tracking: rewards kept per prompt.")
    min_count: int = option(16, "Per-prompt tracking: below this many rewards a prompt uses the whole batch's statistics.")


@dataclass
class LogConfig:
    eval_samples: int = option(256, "Fixed-seed samples scored before and after training for summary.md (0 disables).")
    grid_samples: int = option(32, "Images in the before/after grids (same seeds).")
    tensorboard: bool = option(True, "Also log to TensorBoard when it is installed.")
    progress: bool = option(True, "tqdm progress bars for sampling and training.")


@dataclass
class Config:
    name: str = option("digits_ddpo", "Run name; outputs go to output_dir/name.")
    output_dir: str = option("runs", "Folder holding the run folders.")
    seed: int = option(0, "Seed of everything: prompts, rollouts, shuffles, initialisation.")
    algo: str = option("ddpo_is", "Algorithm: ddpo_is (PPO-clipped, DDPO-IS) or ddpo_sf (REINFORCE, DDPO-SF).")
    num_epochs: int = option(12, "Epochs (rollout + training rounds).")
    prompts: list[str] = option([str(d) for d in range(10)], "Prompts, drawn uniformly per sample (for the digits world: '7', 'a handwritten 7', ...).")
    prompt_file: str = option("", "A text file with one prompt per line; replaces `prompts` when set.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The policy model."})
    sample: SampleConfig = field(default_factory=SampleConfig, metadata={"help": "Rollouts."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimisation."})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "The reward function."})
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig, metadata={"help": "Advantage estimation."})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "Logging, evaluation and outputs."})


ALGOS = ("ddpo_is", "ddpo_sf")


def validate(cfg: Config) -> Config:
    """Reject impossible combinations before any model is loaded (ConfigError names the keys)."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.algo in ALGOS, f"algo: {cfg.algo!r} is not one of {list(ALGOS)}")
    need(cfg.num_epochs >= 1, "num_epochs must be >= 1")
    s, t = cfg.sample, cfg.train
    need(s.num_steps >= 1, "sample.num_steps must be >= 1")
    need(0 < s.eta <= 1, f"sample.eta must be in (0, 1], got {s.eta}")
    need(s.noise_level > 0, f"sample.noise_level must be > 0, got {s.noise_level}")
    need(s.guidance_scale >= 1, f"sample.guidance_scale must be >= 1 (1 = no guidance), got {s.guidance_scale}")
    need(s.batch_size >= 1 and s.num_batches_per_epoch >= 1, "sample.batch_size and sample.num_batches_per_epoch must be >= 1")
    need(t.batch_size >= 1, "train.batch_size must be >= 1")
    samples = s.batch_size * s.num_batches_per_epoch
    need(samples % t.batch_size == 0, f"the samples per epoch (sample.batch_size x sample.num_batches_per_epoch = {samples}) must be a multiple of train.batch_size ({t.batch_size})")
    need(0 < t.timestep_fraction <= 1, f"train.timestep_fraction must be in (0, 1], got {t.timestep_fraction}")
    trained = max(1, round(t.timestep_fraction * s.num_steps))
    need(1 <= t.chunk_size <= trained, f"train.chunk_size (K = {t.chunk_size}) must be between 1 and the trained timesteps per sample ({trained} = timestep_fraction x sample.num_steps)")
    need(t.num_inner_epochs >= 1 and t.gradient_accumulation_steps >= 1, "train.num_inner_epochs and train.gradient_accumulation_steps must be >= 1")
    need(t.learning_rate > 0, "train.learning_rate must be > 0")
    need(t.clip_range > 0 and t.adv_clip_max > 0, "train.clip_range and train.adv_clip_max must be > 0")
    need(cfg.model.mixed_precision in ("no", "bf16", "fp16"), f"model.mixed_precision must be 'no', 'bf16' or 'fp16', got {cfg.model.mixed_precision!r}")
    need(cfg.model.sampler in ("auto", "ddim", "ddpm"), f"model.sampler must be 'auto', 'ddim' or 'ddpm', got {cfg.model.sampler!r}")
    need(cfg.model.lora_rank >= 1, "model.lora_rank must be >= 1")
    a = cfg.advantage
    need(a.buffer_size >= 1 and 1 <= a.min_count <= a.buffer_size, "advantage.min_count must be in [1, advantage.buffer_size]")
    need(bool(cfg.prompts) or bool(cfg.prompt_file), "no prompts: set `prompts` or `prompt_file`")
    need(cfg.log.eval_samples >= 0 and cfg.log.grid_samples >= 0, "log.eval_samples and log.grid_samples must be >= 0")
    return cfg
