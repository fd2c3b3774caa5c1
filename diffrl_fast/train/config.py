"""The training config. Every field is documented here; ``diffrl-fast train --help`` prints them all.

Experiments are small YAML files in configs/ plus ``key=value`` overrides on the command line, e.g.

    diffrl-fast train configs/digits.yaml train.learning_rate=1e-4 sample.num_steps=10
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

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
    attention: str = option("auto", "Attention kernels: 'auto' (xformers when installed on CUDA, else PyTorch SDPA), 'sdpa' or 'xformers'.")
    channels_last: bool = option(False, "Keep the denoiser's weights in channels_last memory format (faster convolutions with oneDNN on CPU and with cuDNN on recent GPUs).")
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
    trajectory_device: str = option("", "Where rollout trajectories (latents at every step, log-probs, images) are kept: '' = the model's device; 'cpu' spares GPU memory for long chains (SDXL at 50 steps), each training chunk is copied over when used.")


@dataclass
class TrainConfig:
    batch_size: int = option(16, "Trajectories per training minibatch (per process).")
    timestep_fraction: float = option(1.0, "Fraction of each trajectory's stochastic steps trained on per inner epoch (random per sample).")
    chunk_size: int = option(4, "Timesteps packed into one denoiser forward (K): the forward batch is batch_size x K (x2 with guidance).")
    num_inner_epochs: int = option(1, "Passes over each epoch's samples.")
    gradient_accumulation_steps: int = option(1, "Minibatches per optimiser step.")
    learning_rate: float = option(3e-4, "AdamW learning rate (digits world fully fine-tuned: 3e-4; SD LoRA: 1e-4..1e-3; SD full fine-tuning: 1e-6..1e-5).")
    lr_schedule: str = option("constant", "Learning-rate schedule after warmup: 'constant', 'linear' (to 0 at the last optimiser step) or 'cosine' (to 0).")
    lr_warmup_steps: int = option(0, "Optimiser steps of linear warmup from 0 to train.learning_rate.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_weight_decay: float = option(1e-4, "AdamW weight decay.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Gradient clipping by global norm; 0 disables.")
    clip_range: float = option(1e-3, "PPO ratio clip epsilon of DDPO-IS (DDPO uses 1e-4 for SD's 16384-dim latents; the digits world's 256-dim steps move ratios more).")
    adv_clip_max: float = option(5.0, "Advantages are clipped to [-adv_clip_max, adv_clip_max].")


@dataclass
class RewardConfig:
    name: str = option("digit_confidence", "Reward: a registered name (digit_confidence, jpeg_compressibility, jpeg_incompressibility, aesthetic, clip_score) or 'package.module:function'.")
    kwargs: dict = option({}, "Keyword arguments of the reward factory (e.g. {clip_path: ..., mlp_path: ...} for aesthetic).")
    track: list[str] = option([], "Held-out rewards computed on every epoch's samples and logged as track_<name>, never optimised (over-optimisation studies).")
    drop_nonfinite: bool = option(False, "Drop samples whose reward is NaN/inf (counted in the logs) instead of stopping with an error.")
    overlap: bool = option(True, "Compute rewards in a background thread while the next rollout batch samples.")


@dataclass
class AdvantageConfig:
    per_prompt_stat_tracking: bool = option(True, "Normalise rewards per prompt with running statistics (DDPO); false: whole-batch normalisation.")
    buffer_size: int = option(32, "Per-prompt tracking: rewards kept per prompt.")
    min_count: int = option(16, "Per-prompt tracking: below this many rewards a prompt uses the whole batch's statistics.")


@dataclass
class DPOKConfig:
    alpha: float = option(1.0, "Weight of the policy-gradient term.")
    beta: float = option(0.1, "Weight of the per-step KL to the pretrained policy (log-probs and KL averaged over latent elements).")
    clip: bool = option(True, "Clip the importance ratio as DDPO-IS does (train.clip_range); false gives the plain reward-weighted policy gradient.")
    value_baseline: bool = option(False, "Use r - V(x_t, c) with a learned value function V (the temporal critic, tdpo.critic_*) as per-step advantage.")


@dataclass
class D3POConfig:
    beta: float = option(10.0, "DPO inverse temperature beta on per-step log-ratios (averaged over latent elements, so they are small).")
    samples_per_prompt: int = option(2, "K >= 2 samples per prompt; ranked, they form disjoint (winner, loser) pairs: best with worst, ...")
    ratio_clip: Optional[float] = option(0.1, "Clamp each step's ratio pi_theta/pi_ref to [1 - c, 1 + c] as D3PO does; null disables.")
    preferences: str = option("", "JSON file of human choices written by `diffrl-fast label`; empty: preferences from the reward (AI feedback).")


@dataclass
class DenseConfig:
    samples_per_prompt: int = option(2, "K >= 2 samples per prompt, ranked by reward; K > 2 uses the Plackett-Luce loss.")
    gamma: float = option(0.9, "Temporal discount gamma in (0, 1]: step t (0 = noisiest) counts gamma^t.")
    temperature: float = option(10.0, "Temperature C multiplying the discounted log-ratios inside the sigmoid.")
    ratio_clip: Optional[float] = option(0.1, "Clamp each step's ratio pi_theta/pi_I to [1 - c, 1 + c] before averaging (D3PO's trust region); null disables.")
    kl_coef: float = option(0.0, "Weight of an explicit per-step KL to the initial policy on the trained steps (0 disables).")
    timestep_sampling: str = option("discounted", "'discounted': train on steps drawn with probability gamma^t; 'weighted': uniform steps weighted by gamma^t.")


@dataclass
class TDPOConfig:
    critic_lr: float = option(1e-3, "Adam learning rate of the temporal critic R_phi(x_t, c).")
    critic_epochs: int = option(2, "Passes of critic regression over each epoch's (x_t, c, reward) rows.")
    critic_batch_size: int = option(256, "Rows per critic update.")
    reset_every: int = option(3, "TDPO-R: reset the critic's active neurons every this many epochs.")
    reset_threshold: float = option(0.0, "TDPO-R: a neuron is active (and reset) when its mean activation / the layer's mean exceeds this.")


@dataclass
class GRPOConfig:
    group_size: int = option(4, "G samples per prompt; advantages are rewards normalised within each group.")
    beta: float = option(0.0, "Weight of the per-step KL to the reference policy (0: no KL, no reference model).")


@dataclass
class DistConfig:
    engine: str = option("auto", "'auto' (DDP when launched with several processes), 'none', 'ddp' or 'deepspeed' (ZeRO-2/3).")
    deepspeed_config: str = option("", "DeepSpeed JSON for ZeRO stage and offload (configs/deepspeed_zero2.json, deepspeed_zero3.json); optimiser, learning rate, clipping and batch sizes come from this config.")
    timeout_s: float = option(600.0, "Seconds a collective waits for a missing process before the run fails instead of hanging.")


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
    algo: str = option("ddpo_is", "Algorithm: ddpo_is, ddpo_sf, dpok, d3po, dense, tdpo, tdpo_r or grpo (see diffrl_fast/algos/).")
    num_epochs: int = option(12, "Epochs (rollout + training rounds).")
    prompts: list[str] = option([str(d) for d in range(10)], "Prompts, drawn uniformly per sample (for the digits world: '7', 'a handwritten 7', ...).")
    prompt_file: str = option("", "A text file with one prompt per line; replaces `prompts` when set.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The policy model."})
    sample: SampleConfig = field(default_factory=SampleConfig, metadata={"help": "Rollouts."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimisation."})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "The reward function."})
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig, metadata={"help": "Advantage estimation."})
    dpok: DPOKConfig = field(default_factory=DPOKConfig, metadata={"help": "DPOK (algo=dpok)."})
    d3po: D3POConfig = field(default_factory=D3POConfig, metadata={"help": "D3PO (algo=d3po)."})
    dense: DenseConfig = field(default_factory=DenseConfig, metadata={"help": "The dense-reward view (algo=dense)."})
    tdpo: TDPOConfig = field(default_factory=TDPOConfig, metadata={"help": "TDPO / TDPO-R critic (algo=tdpo, tdpo_r; also dpok.value_baseline)."})
    grpo: GRPOConfig = field(default_factory=GRPOConfig, metadata={"help": "Group-relative advantages (algo=grpo)."})
    dist: DistConfig = field(default_factory=DistConfig, metadata={"help": "Distributed training (torchrun / deepspeed launchers)."})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "Logging, evaluation and outputs."})


def samples_per_prompt(cfg: Config) -> int:
    """Group size G of the chosen algorithm (samples of one prompt trained together)."""
    if cfg.algo == "d3po":
        return 2 if cfg.d3po.preferences else cfg.d3po.samples_per_prompt
    return {"dense": cfg.dense.samples_per_prompt, "grpo": cfg.grpo.group_size}.get(cfg.algo, 1)


def validate(cfg: Config) -> Config:
    """Reject impossible combinations before any model is loaded (ConfigError names the keys)."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    from ..algos import ALGORITHMS

    need(cfg.algo in ALGORITHMS, f"algo: {cfg.algo!r} is not one of {sorted(ALGORITHMS)}")
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
    need(t.lr_schedule in ("constant", "linear", "cosine"), f"train.lr_schedule must be 'constant', 'linear' or 'cosine', got {t.lr_schedule!r}")
    need(t.lr_warmup_steps >= 0, "train.lr_warmup_steps must be >= 0")
    need(t.clip_range > 0 and t.adv_clip_max > 0, "train.clip_range and train.adv_clip_max must be > 0")
    need(cfg.model.mixed_precision in ("no", "bf16", "fp16"), f"model.mixed_precision must be 'no', 'bf16' or 'fp16', got {cfg.model.mixed_precision!r}")
    need(cfg.model.attention in ("auto", "sdpa", "xformers"), f"model.attention must be auto, sdpa or xformers, got {cfg.model.attention!r}")
    need(cfg.model.sampler in ("auto", "ddim", "ddpm"), f"model.sampler must be 'auto', 'ddim' or 'ddpm', got {cfg.model.sampler!r}")
    need(cfg.model.lora_rank >= 1, "model.lora_rank must be >= 1")
    for key, dev in (("sample.trajectory_device", s.trajectory_device), ("model.reference_device", cfg.model.reference_device)):
        if dev:
            try:
                torch.device(dev)
            except RuntimeError:
                raise ConfigError(f"{key}: {dev!r} is not a device name (use '', 'cpu' or 'cuda')") from None
    a = cfg.advantage
    need(a.buffer_size >= 1 and 1 <= a.min_count <= a.buffer_size, "advantage.min_count must be in [1, advantage.buffer_size]")
    need(bool(cfg.prompts) or bool(cfg.prompt_file), "no prompts: set `prompts` or `prompt_file`")
    need(cfg.log.eval_samples >= 0 and cfg.log.grid_samples >= 0, "log.eval_samples and log.grid_samples must be >= 0")
    need(cfg.dist.engine in ("auto", "none", "ddp", "deepspeed"), f"dist.engine must be auto, none, ddp or deepspeed, got {cfg.dist.engine!r}")
    need(cfg.dist.timeout_s > 0, "dist.timeout_s must be > 0")
    G = samples_per_prompt(cfg)
    need(G >= 1 and (cfg.algo not in ("d3po", "dense") or G >= 2), f"{cfg.algo} needs >= 2 samples per prompt, got {G}")
    need(not (cfg.reward.drop_nonfinite and G > 1),
         f"reward.drop_nonfinite cannot be used with {cfg.algo} ({G} samples per prompt): dropping a sample would break its "
         "prompt group; fix the reward or let the run stop on non-finite rewards")
    need(s.batch_size % G == 0 and t.batch_size % G == 0,
         f"{cfg.algo} trains on groups of {G} samples per prompt: sample.batch_size ({s.batch_size}) and train.batch_size ({t.batch_size}) must be multiples of {G}")
    need(0 < cfg.dense.gamma <= 1, f"dense.gamma must be in (0, 1], got {cfg.dense.gamma}")
    need(cfg.dense.timestep_sampling in ("discounted", "weighted"), f"dense.timestep_sampling must be 'discounted' or 'weighted', got {cfg.dense.timestep_sampling!r}")
    need(cfg.d3po.beta > 0 and cfg.dense.temperature > 0, "d3po.beta and dense.temperature must be > 0")
    for key, c in (("d3po.ratio_clip", cfg.d3po.ratio_clip), ("dense.ratio_clip", cfg.dense.ratio_clip)):
        need(c is None or 0 < c < 1, f"{key} must be in (0, 1) or null")
    need(cfg.dense.kl_coef >= 0, "dense.kl_coef must be >= 0")
    need(cfg.dpok.beta >= 0 and cfg.grpo.beta >= 0 and cfg.dpok.alpha >= 0, "dpok.alpha, dpok.beta and grpo.beta must be >= 0")
    need(cfg.tdpo.reset_every >= 1 and cfg.tdpo.critic_epochs >= 1 and cfg.tdpo.critic_batch_size >= 1, "tdpo.reset_every, tdpo.critic_epochs and tdpo.critic_batch_size must be >= 1")
    return cfg
