"""The training config. Every field is documented here; ``diffrl-fast train --help`` prints them all.

A config is built in layers, each overriding the one before:

1. the defaults below, which are DDPO's as ddpo-pytorch runs it (the default algorithm);
2. the chosen algorithm's reference values (``Algorithm.reference_defaults``: what its authors' code and
   published settings use where they differ from DDPO's, e.g. DPOK's learning rate and KL form);
3. a YAML file (``configs/*.yaml``; ``diffrl-fast train`` with none uses the digits preset,
   configs/digits.yaml, whose settings suit the 16x16 digits world): its top level, then its ``model_facts``,
   then its ``by_algo`` entry of the chosen algorithm;
4. ``key=value`` overrides on the command line, e.g.

    diffrl-fast train configs/digits.yaml train.learning_rate=1e-4 sample.num_steps=10

``diffrl-fast train ... --print-config`` prints each value that differs from the defaults with its layer.

The shipped model presets keep to one rule (tests/test_presets.py holds them to it): their top level sets only
``preset_key``s (what the model is and what fits the machine); every algorithmic key keeps the chosen
algorithm's reference value unless the preset's ``by_algo`` entry of that algorithm sets it, with the measured
reason, or its ``model_facts`` state it as a property of the model, for every algorithm.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..config_utils import ConfigError, option
from ..diffusion.coefficients import SDE_TYPES

PRESETS = Path(__file__).resolve().parent.parent / "configs"  # the YAML presets, shipped with the package (configs/)
DEFAULT_PRESET = PRESETS / "digits.yaml"  # what `diffrl-fast train` runs without a config file


@dataclass
class ModelConfig:
    path: str = option("digits", "The policy: 'digits' or 'flow-digits' (the built-in worlds: configs/digits.yaml, configs/flow_digits.yaml) or a diffusers pipeline folder / hub id (SD 1.x/2.x, SDXL, SD3, FLUX.1).")
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
    embedded_guidance: Optional[float] = option(None, "Guidance-distilled flow models (FLUX.1-dev, FLUX.2 [dev]): the guidance value fed to the transformer's guidance embedding, one pass per step (keep sample.guidance_scale=1: no classifier-free guidance on top); null = the pipeline's own default (FLUX.1: 3.5, FLUX.2: 4). Ignored by other models.")


@dataclass
class SampleConfig:
    num_steps: int = option(50, "Denoising steps per trajectory (T). Default: DDPO's 50; each algorithm's reference sets its own (docs/algorithms.md).")
    guidance_scale: float = option(5.0, "Classifier-free guidance g; 1 disables guidance (one denoiser pass per step). Default: DDPO's 5.0.")
    eta: float = option(1.0, "DDIM eta in (0, 1]: the policy's noise level (every reference uses 1).")
    noise_level: float = option(0.7, "Flow-matching SDE noise level (Flow-GRPO's a), used for SD3-style models.")
    sde_type: str = option("sde", "Flow models' rollout SDE: 'sde' (Flow-GRPO's), 'cps' (coefficients-preserving sampling, Wang & Yu 2025: std = sigma' sin(noise_level pi/2), the log-prob the squared residual only) or 'dance' (DanceGRPO's: Flow-GRPO's drift with a constant std = noise_level, its eta). Rollouts, the training recompute and the KL all use it.")
    batch_size: int = option(8, "Trajectories per rollout batch (per process). Default: ddpo-pytorch's 8 per GPU.")
    num_batches_per_epoch: int = option(4, "Rollout batches per epoch; samples per epoch = batch_size x this x processes.")
    negative_prompt: str = option("", "Negative prompt for the unconditional branch of guidance.")
    height: Optional[int] = option(None, "Image height in pixels (null: the model's native size).")
    width: Optional[int] = option(None, "Image width in pixels (null: the model's native size).")
    sigma_grid: Optional[str] = option(None, "Flow models: the sigma grid of the T steps before the model's shift: null = the model's own (FLUX: 'flux'; Wan shipped with UniPC: 'flow_sigmas'; else the scheduler's); 'scheduler' = FlowMatchEulerDiscreteScheduler.set_timesteps' linspace(1, 1/N_train, T); 'flux' = linspace(1, 1/T, T), FluxPipeline's and DanceGRPO's linspace(1, 0, T + 1) without its end; 'flow_sigmas' = the multistep solvers' linspace(1, 1/N_train, T + 1)[:-1].")
    num_frames: Optional[int] = option(None, "Video models (Wan): pixel frames per sample, 4k + 1 for Wan's VAE (null: the model's default, Wan's 81). The reward then takes videos [B, F, 3, H, W] (rewards/video.py).")
    post_window_solver: str = option("euler", "Flow models with a timestep window: the ODE solver of the deterministic steps after the window's last step: 'euler' (the flow ODE's Euler step, as the SDE at noise 0) or 'dpmsolver++' (DPM-Solver++(2M), MixGRPO-Flash's --dpm_algorithm_type dpmsolver++ with order 2, midpoint). For the forward-process algorithms (nft, awm, dgpo), whose rollouts are deterministic throughout, it solves the whole rollout (DGPO's reference rolls out with DPM-Solver++); their trained timesteps stay on the sample.num_steps grid.")
    post_window_compress: float = option(1.0, "Flow models with a timestep window: MixGRPO-Flash's dpm_post_compress_ratio: the steps after the window's last stochastic step L become max(2, int((T - L) x this)) noise levels, uniform in the scheduler's unshifted time (1: the schedule's own steps; MixGRPO-Flash: 0.4, Flash*: 0.2). Fewer denoiser passes per rollout; the trained steps are unchanged. A forward-process algorithm's rollout (no stochastic step, L = -1) becomes max(2, int((T + 1) x this)) noise levels from sigma_0.")
    tree_branch_steps: list[int] = option([], "Tree rollouts (BranchGRPO, Li et al. 2025; algo=grpo): the steps j (0 = noisiest) at which every node of a prompt's tree splits into sample.tree_branch_factor children; [] = independent samples. A tree has factor^len(steps) leaves = grpo.group_size; shared prefixes are computed once, each distinct transition is trained once, advantages are BranchGRPO's node advantages (sample.tree_reward_fusion). BranchGRPO's FLUX script: [0, 3, 6, 9] of 20 steps.")
    tree_branch_factor: int = option(2, "Tree rollouts: children per node at a branch step (BranchGRPO: 2).")
    tree_reward_fusion: str = option("mean", "Tree rollouts: a node's reward from its leaves: 'mean' (BranchGRPO's default) or 'prob_weighted' (bottom-up, children weighted by softmax of the log-prob of the action into them: BranchGRPO's --tree_prob_weighted).")
    tree_advantage_norm: str = option("level", "Tree rollouts: how node rewards become advantages: 'level' (BranchGRPO's: per tree and level, over the level's nodes; two nodes always get +-1/sqrt(2)) or 'leaves' (per tree by its leaves' mean and std at every level: a transition's advantage is the mean GRPO advantage of the leaves below it, so an early split that changes little gets little). A named difference from BranchGRPO.")
    tree_split_noise_scale: float = option(1.0, "Tree rollouts: branch steps draw their noise at this multiple of the policy's std, their log-prob keeping the policy's std (BranchGRPO's tree_split_noise_scale; its FLUX script uses 4.0, off-policy at branch steps). 1 = on-policy.")
    tree_prune_width: int = option(0, "Tree rollouts: BranchGRPO's width pruning (--width_pruning_mode) of the trained transitions after the last branch step: 0 = off (its shipped scripts), 1 = per leaf keep int(n x sample.tree_prune_width_ratio) (at least 1), the largest advantages first, 2 = over the batch keep the best and the worst halves of int(n x ratio) (at least 2). Advantages stay those of the full tree; rollouts are unchanged (training passes only).")
    tree_prune_width_ratio: float = option(0.5, "Tree rollouts: the fraction width pruning keeps (BranchGRPO's --width_pruning_ratio, 0.5).")
    tree_prune_depths: list[int] = option([], "Tree rollouts: BranchGRPO's depth pruning (--depth_pruning): the child depths d whose transitions j = d - 1 are not trained; [] = off.")
    tree_prune_depth_slide_every: int = option(0, "Tree rollouts: slide the depth-pruning window one depth toward the root every this many epochs, stopping at the last branch step (BranchGRPO's --depth_pruning_slide with --depth_pruning_slide_interval); 0 = fixed.")
    tree_prune_until: float = option(1.0, "Tree rollouts: prune while epoch <= int(num_epochs x this) (BranchGRPO's --pruning_step_ratio); 1 = always.")
    trajectory_device: str = option("", "Where rollout trajectories (latents at every step, log-probs, images) are kept: '' = the model's device; 'cpu' spares GPU memory for long chains (SDXL at 50 steps), each training chunk is copied over when used.")
    trajectory_dtype: str = option("float32", "The dtype of the rollout's states x_j, as stored and as continued from: 'float32', or 'bfloat16' / 'float16' (the rollout dtype of a bf16 run; half the trajectory memory, what video needs): every state is rounded to it before the next step and before its action's log-prob is taken, so the stored trajectory is exactly the one sampled and the recompute reproduces its log-probs. The step math stays float32.")


@dataclass
class TrainConfig:
    batch_size: int = option(4, "Trajectories per training minibatch (per process). Default: ddpo-pytorch's 4.")
    timestep_fraction: float = option(1.0, "Fraction of each trajectory's stochastic steps trained on per inner epoch: int(fraction x T) steps (floored, at least 1), random per sample.")
    chunk_size: int = option(4, "Timesteps packed into one denoiser forward (K; capped at the trained steps): the forward batch is batch_size x K (x2 with guidance). With optimizer_step_every=chunks it also sets the rows per optimiser step.")
    num_inner_epochs: int = option(1, "Passes over each epoch's samples.")
    gradient_accumulation_steps: int = option(2, "Units (see optimizer_step_every) per optimiser step. Default: ddpo-pytorch's 2 minibatches.")
    optimizer_step_every: str = option("minibatches", "What an optimiser step accumulates: 'minibatches' (gradient_accumulation_steps minibatches, every trained step of each: DDPO, D3PO, Flow-GRPO), 'chunks' (gradient_accumulation_steps chunks of batch_size samples x chunk_size steps: TDPO's and DPOK's many small steps) or 'round' (one step per inner epoch: the unbiased score-function estimator of DDPO-SF).")
    learning_rate: float = option(3e-4, "AdamW learning rate. Default: ddpo-pytorch's 3e-4 (SD LoRA); each algorithm's reference sets its own.")
    lr_schedule: str = option("constant", "Learning-rate schedule after warmup: 'constant', 'linear' (to 0 at the last optimiser step) or 'cosine' (to 0).")
    lr_warmup_steps: int = option(0, "Optimiser steps of linear warmup from 0 to train.learning_rate.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_weight_decay: float = option(1e-4, "AdamW weight decay.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Gradient clipping by global norm; 0 disables.")
    clip_range: float = option(1e-4, "PPO ratio clip epsilon (DDPO-IS, TDPO, GRPO, DPOK): ddpo-pytorch's 1e-4 for SD's 16384-dim latents (log-probs are averaged over latent elements).")
    adv_clip_max: float = option(5.0, "Advantages are clipped to [-adv_clip_max, adv_clip_max] (DDPO, Flow-GRPO).")
    timestep_window: str = option("all", "Which rollout steps are stochastic and trained: 'all'; 'fixed': the first train.window_size (noisiest) steps (Flow-GRPO-Fast); 'sliding': a window of train.window_size steps that moves train.window_stride steps towards low noise every train.window_shift_every epochs and stops at the end (MixGRPO). Steps outside the window are the sampler's deterministic step (DDIM eta = 0, the flow ODE), with no log-prob.")
    window_size: int = option(2, "Steps in the timestep window (train.timestep_window fixed or sliding).")
    window_stride: int = option(1, "Steps a sliding window moves per shift.")
    window_shift_every: int = option(1, "Epochs between shifts of a sliding window.")


@dataclass
class RewardConfig:
    name: Union[str, list[Any]] = option("digit_confidence", "Reward: a registered name (digit_confidence, jpeg_compressibility, jpeg_incompressibility, brightness, aesthetic, clip_score (also PickScore), hpsv2, image_reward; docs/rewards.md), 'package.module:function', a reward server 'http://HOST:PORT' (diffrl-fast reward-server), or a weighted sum: [{name: clip_score, weight: 1.0}, {name: aesthetic, weight: 0.5, kwargs: {...}, label: aes}] ([a, b]: weights 1; local and remote mixed; each component logged as reward_<label or name>).")
    kwargs: dict = option({}, "Keyword arguments of the reward factory (e.g. {clip_path: ..., mlp_path: ...} for aesthetic); a weighted sum's components take their own 'kwargs'.")
    component_norm: str = option("none", "Weighted sums: 'none' sums the raw rewards; 'batch' standardises each component over the epoch's samples before weighting, 'prompt' over each prompt's samples (DanceGRPO's per-reward group advantages), so no component dominates by its scale.")
    timeout_s: float = option(60.0, "Reward servers: seconds one request may take before it counts as failed.")
    retries: int = option(3, "Reward servers: retries of a failed request (connection error, timeout, HTTP 5xx), after backoff_s, 2 backoff_s, ...; then the run stops at its last checkpoint.")
    backoff_s: float = option(1.0, "Reward servers: the first retry's wait; each further retry waits twice as long.")
    remote_format: str = option("uint8", "Reward servers: images travel as 'uint8' (raw 8-bit arrays), 'png', or 'float32' (exact: remote rewards equal local ones bit for bit, 4x the bytes).")
    token_file: str = option("", "Reward servers: a file holding the server's shared token (its --token-file), sent as 'Authorization: Bearer <token>'; a server bound beyond loopback requires it.")
    remote_batch_size: int = option(0, "Reward servers: images per request (0 = the server's --max-batch).")
    track: list[str] = option([], "Held-out rewards computed on every epoch's samples and logged as track_<name>, never optimised (over-optimisation studies).")
    drop_nonfinite: bool = option(False, "Drop samples whose reward is NaN/inf (counted in the logs) instead of stopping with an error.")
    overlap: bool = option(True, "Compute rewards in a background thread while the next rollout batch samples.")


@dataclass
class AdvantageConfig:
    per_prompt_stat_tracking: bool = option(True, "Normalise rewards per prompt with running statistics (DDPO); false: whole-batch normalisation.")
    buffer_size: int = option(16, "Per-prompt tracking: rewards kept per prompt (ddpo-pytorch: 16).")
    min_count: int = option(16, "Per-prompt tracking: below this many rewards a prompt uses the whole batch's statistics (ddpo-pytorch: 16).")


@dataclass
class DPOKConfig:
    alpha: float = option(100.0, "Weight of the policy-gradient term (the reference's --reward_weight: 100 by default; its README uses 10 for one prompt and 1000 for several).")
    beta: float = option(0.01, "Weight of the KL term (the reference's --kl_weight; README: 0.01 for one prompt, 0.1 for several). Only meaningful together with dpok.kl_form.")
    kl_form: str = option("eps_mse", "'eps_mse': the reference's mean over latent elements of (eps_hat_theta - eps_hat_pre)^2, unweighted per step; 'exact': the Gaussian KL |mean_theta - mean_pre|^2 / (2 s^2) (per element), which weights step t by b_t^2 / (2 s_t^2).")
    ratio_clip: str = option("clamp", "'clamp': the reference's -alpha A clamp(rho, 1-eps, 1+eps), zero gradient outside the band on both sides; 'ppo': DDPO's max(-A rho, -A clip(rho)). eps = train.clip_range.")
    advantage: str = option("raw", "'raw': A = r - V(x_t, c, t) (or r without the value function), as the reference; 'normalized': the trainer's per-prompt (or batch) normalised reward minus V, clipped to train.adv_clip_max.")
    value_baseline: bool = option(True, "Learn the reference's value function V(x_t, c, t) (an MLP on the flattened latent and the prompt embedding, gated per step) and use r - V as the advantage.")
    value_lr: float = option(1e-4, "AdamW learning rate of the value function.")
    value_batch_size: int = option(256, "Transitions per value micro-batch, drawn uniformly from the epoch's transitions.")
    value_steps: int = option(5, "Value micro-batches accumulated into the value function's one optimiser step per epoch.")
    value_weight_decay: float = option(0.01, "AdamW weight decay of the value function (the reference passes only the learning rate: AdamW's default 0.01).")


@dataclass
class D3POConfig:
    beta: float = option(0.1, "DPO inverse temperature beta on per-step log-ratios (the reference's 0.1; log-probs are averaged over latent elements).")
    samples_per_prompt: int = option(2, "K >= 2 samples per prompt, sharing their initial noise x_T (d3po.shared_initial_noise).")
    pairs: str = option("all", "'all': every non-tied pair of a prompt's K samples (the reference's human-feedback script); 'disjoint': best with worst, second with second-worst, ...")
    ratio_clip: Optional[float] = option(0.1, "Clamp each step's ratio pi_theta/pi_ref to [1 - c, 1 + c] (the reference's eps = 0.1); null disables.")
    shared_initial_noise: bool = option(True, "Sample a prompt's K images from the same x_T (they differ only by the per-step noise), as the reference does.")
    step_per_pair: bool = option(True, "K > 2: one optimiser step per non-tied pair, over all its trained steps (the reference's scripts/train.py: a step per combination of a prompt's samples); false: a minibatch's pairs averaged into one step (train.gradient_accumulation_steps minibatches per step).")
    preferences: str = option("", "JSON file of human choices written by `diffrl-fast label`; empty: preferences from the reward (AI feedback).")


@dataclass
class DenseConfig:
    samples_per_prompt: int = option(2, "K >= 2 samples per prompt, ranked by reward; K > 2 uses the Plackett-Luce loss.")
    gamma: float = option(0.9, "Temporal discount gamma in (0, 1]: step t (0 = noisiest) counts gamma^t.")
    temperature: float = option(10.0, "Temperature C multiplying the discounted log-ratios inside the sigmoid (reference: 10 for one prompt, 12.5 for several, set from the prompts).")
    log_ratio_clip: Optional[float] = option(1e-4, "Clamp each step's log-ratio log pi_theta - log pi_I to [-c, c] before averaging (reference: 1e-4 for one prompt, 5e-4 for several, set from the prompts); null disables.")
    num_timesteps: Optional[int] = option(3, "Steps drawn per trajectory pair (reference: 3 for one prompt, 1 for several, set from the prompts); null: int(train.timestep_fraction x T).")
    timestep_sampling: str = option("discounted", "'discounted': steps drawn with replacement with probability gamma^t / sum gamma^t and averaged (the reference); 'weighted': distinct steps drawn uniformly, weighted by gamma^t.")
    kl_coef: float = option(0.0, "Weight of an explicit per-step KL to the initial policy on the trained steps (not in the reference; 0 disables).")


@dataclass
class TDPOConfig:
    critic: str = option("embedding", "'embedding': the reference's critic, an MLP (the LAION aesthetic head's layers, no activations) on the image encoder's embedding of the decoded x_t; 'latent': DPOK's value network on the flattened latent, the prompt embedding and the step, for rewards without an image encoder.")
    critic_encoder: str = option("", "Reward whose image encoder embeds x_t for the embedding critic ('' = reward.name); digit_confidence, aesthetic and clip_score have one.")
    critic_lr: float = option(1e-4, "AdamW learning rate of the critic (reference 1e-4).")
    critic_weight_decay: float = option(1e-4, "AdamW weight decay of the critic.")
    critic_max_grad_norm: float = option(1.0, "The critic's own gradient clipping (reference 1.0).")
    value_clip: float = option(0.2, "PPO-style value clipping: the critic's prediction moves at most this far from its sampling-time value per update.")
    value_coef: float = option(0.5, "Weight of the critic's squared error, trained jointly with the policy (one critic step per policy step).")
    adv_clip_max: Optional[float] = option(None, "Clip the temporal rewards to [-c, c]; null (the reference) does not clip.")
    reset_every: int = option(10, "TDPO-R: reset the critic's active neurons every this many epochs (reference 10).")
    reset_threshold: float = option(0.0, "TDPO-R: a neuron is active (and reset) when its mean ReLU activation / its layer's mean exceeds this.")


@dataclass
class GRPOConfig:
    group_size: int = option(24, "G samples per prompt (Flow-GRPO's num_image_per_prompt: 24).")
    beta: float = option(0.04, "Weight of the per-step KL to the reference policy (Flow-GRPO OCR/GenEval: 0.04, PickScore 0.01; 0: no KL, no reference model).")
    kl_form: str = option("flow_grpo", "'flow_grpo': mean over elements of |mean_theta - mean_ref|^2 / (2 std_t^2) with std_t the SDE's noise scale without sqrt(|dt|) (= the exact KL x |dt|; flow models only); 'exact': |mean_theta - mean_ref|^2 / (2 s^2) per element.")
    std: str = option("global", "Advantage denominator: 'global' (the std of all the epoch's rewards, Flow-GRPO's global_std=True) or 'group' (the prompt group's std).")
    eps: float = option(1e-4, "Added to the std of the advantage denominator (Flow-GRPO: 1e-4).")
    train_steps: str = option("first", "'first': train the first int(train.timestep_fraction x T) steps of every trajectory (Flow-GRPO, timestep_fraction 0.99); 'random': a random subset per group.")
    detach_uncond: bool = option(False, "Detach the unconditional branch of guidance in training (Flow-GRPO before July 2025); current Flow-GRPO lets gradients flow through both.")
    same_initial_noise: bool = option(False, "A group's samples share their initial noise x_T (Flow-GRPO's sample.same_latent).")
    guard: bool = option(False, "GRPO-Guard (flow_grpo's scripts/train_sd3_GRPO_Guard.py, config.rationorm): the log-ratio re-centred by the rollout's own mean, (log p - log p_old + |mean_theta - mean_old|^2 / (2 s^2)) x s, and each step's loss divided by its dt, so over-optimisation's bias in the clipped ratio goes and every step weighs alike; flow-matching SDE ('sde') only. Its SD3.5 configs clip at 2e-6 (train.clip_range), with 65536-element latents.")
    drop_zero_advantage: bool = option(True, "Train only on samples with a non-zero advantage (flow_grpo's train_sd3.py: a group whose rewards are all equal is dropped; dropped samples are put back at random until the kept count divides into the epoch's minibatches, which shrink); false trains on all (they still count in the means and the KL).")


@dataclass
class DistConfig:
    engine: str = option("auto", "'auto' (DDP when launched with several processes), 'none', 'ddp', 'fsdp' (PyTorch FSDP2, per-block sharding) or 'deepspeed' (ZeRO-2/3).")
    deepspeed_config: str = option("", "DeepSpeed JSON for ZeRO stage and offload (configs/deepspeed_zero2.json, deepspeed_zero3.json); optimiser, learning rate, clipping and batch sizes come from this config.")
    timeout_s: float = option(600.0, "Seconds a collective waits for a missing process before the run fails instead of hanging.")
    fsdp_mixed_precision: bool = option(True, "dist.engine=fsdp with model.mixed_precision=bf16: all-gather and compute in bf16, reduce gradients in fp32 (FSDP2's MixedPrecisionPolicy); fp32 shards either way.")
    fsdp_cpu_offload: bool = option(False, "dist.engine=fsdp: keep parameter shards, gradients and the optimiser step on the CPU (FSDP2's CPUOffloadPolicy).")


@dataclass
class NFTConfig:
    group_size: int = option(24, "G samples per prompt (DiffusionNFT's num_image_per_prompt: 24); advantages as GRPO's (grpo.std, grpo.eps).")
    beta: float = option(1.0, "beta of the implicit policies v+- around the old model (reference: 1.0; 0.1 for OCR).")
    kl_beta: float = option(1e-4, "Weight of the mean squared difference of the policy's and the reference model's outputs (reference train.beta: 1e-4 for SD3.5; 0: no reference model).")
    decay_type: int = option(1, "How fast the old model follows the policy after each epoch: 0 (at once), 1 (decay min(0.001 step, 0.5)), 2 (0 for 75 steps, then min(0.0075 (step - 75), 0.999)), as the reference's return_decay.")
    sample_with: str = option("old", "Which weights roll out: 'old' (the slowly updated old model, as the reference's sampling loop: set_adapter('old')) or 'policy' (the current policy).")


@dataclass
class AWMConfig:
    group_size: int = option(24, "G samples per prompt (the reference's num_image_per_prompt: 24); advantages as GRPO's (grpo.std, grpo.eps).")
    train_timesteps: int = option(6, "Timesteps trained per sample and epoch, one per stratum of the first int(T x train.timestep_fraction) rollout steps (reference: 6).")
    time_type: str = option("discrete", "Strata of the timestep draw: discrete (steps from 0; the reference's pickscore config), discrete_wo_init (from 1; its GenEval/OCR configs) or discrete_with_init (step 0, then strata from 1).")
    weighting: str = option("ghuber", "Weight of the matching loss in AWM's log-prob: Uniform, t, t**2, huber or ghuber (reference: ghuber).")
    ghuber_power: float = option(0.25, "Power p of the ghuber weighting ((m + 1e-10)^p - 1e-10^p) sigma / p (reference: 0.25).")
    loss_type: str = option("exp_first", "exp_first: a ratio per (sample, timestep); sum_first: one ratio per sample from the mean log-prob over its timesteps (needs train.chunk_size >= awm.train_timesteps).")
    clip_range: float = option(1.0, "PPO clip range of the ratio (reference: 1.0).")
    advantage_max: Optional[float] = option(1.0, "Advantages clipped to +-train.adv_clip_max are rescaled to +-advantage_max (reference: 1; null: not rescaled).")
    beta: float = option(1e-4, "Weight of the mean squared difference of the policy's and the reference model's outputs (reference: 1e-4 for PickScore, 1e-3 GenEval, 3e-3 OCR; 0: no reference model and no EMA term).")
    kl_weight: str = option("Uniform", "Uniform, or ELBO: divided by 2 std_dev_t^2 of the flow SDE (flow models only).")
    ema_beta: float = option(1.0, "Weight of the mean squared difference from the EMA copy's outputs (reference: 1; applies only with awm.beta > 0, as in the reference).")
    ema_kl_weight: str = option("Uniform", "Uniform or ELBO, as awm.kl_weight, for the EMA term.")
    ema_decay: float = option(0.3, "Decay of the EMA copy after each epoch (reference kl_ema_decay: 0.3).")
    ema_decay_type: str = option("linear", "linear: d = min(ema_decay, 0.001 x optimiser step) (reference); constant: d = ema_decay.")


@dataclass
class DGPOConfig:
    group_size: int = option(16, "G samples per prompt (the reference's num_image_per_prompt: 16); advantages as GRPO's (grpo.std, grpo.eps; the reference's GenEval config: group std).")
    beta: float = option(101.0, "Sharpness of the group preference: S_g = beta / G sum A_i (l_theta - l_ref) inside the sigmoid (reference beta_dpo: 101 GenEval, 100 OCR).")
    kl_beta: float = option(0.02, "Weight of the mean squared difference of the policy's and the base model's velocities (reference train.beta: 0.02; 0: none).")
    kl_cfg: float = option(1.0, "Guidance scale of the base model's velocity in the KL term and as the preference reference (reference: 1; its CFG-free configs 4.5).")
    clip_range: float = option(1e-2, "Clip band of rho = exp(l_ema - l_theta): outside it, on the advantage's side, a row's loss is detached (reference: 1e-2 GenEval, 1e-3 CFG-free).")
    train_timesteps: int = option(4, "Distinct rollout steps trained per inner epoch, shared by all samples (reference num_train_timesteps: 4).")
    max_step: int = option(4, "Timesteps are drawn from rollout steps 0 .. max_step, the noisiest (reference trunc_steps: 4 of 10 steps).")
    use_ema_ref: bool = option(False, "The preference's reference is the EMA copy instead of the frozen base model (the reference's emaref config).")
    ema_decay: float = option(0.3, "The EMA copy after each epoch: ema <- d ema + (1 - d) theta, d = min(ema_decay, 0.001 x optimiser step) (reference: 0.3).")
    switch_ema_ref: int = option(500, "After this many optimiser steps the rollouts use the EMA copy (reference: 500 GenEval, 200 OCR).")


@dataclass
class GuardConfig:
    heldout_reward: list[Any] = option([], "Held-out rewards watched during the run, never optimised: each a reward name, dotted path, 'http://HOST:PORT' server or a weighted sum [{name: ..., weight: ...}, ...] (reward.name's forms); the first decides the stop and the best checkpoint. [] turns the guard off (the default for SD/SDXL/SD3/FLUX); the digits and flow-digits presets name their held-out classifiers.")
    every: int = option(1, "Epochs between guard evaluations (the last epoch always has one; 0 turns the guard off).")
    samples: int = option(32, "Images of each guard evaluation: the same prompts and seeds every time.")
    samples_per_prompt: int = option(4, "Seeds per prompt in the guard's batch (>= 2: within-prompt diversity compares them).")
    diversity: bool = option(True, "Log guard_diversity: the mean pairwise distance between a prompt's images (guard.diversity_encoder says in which space).")
    diversity_encoder: str = option("auto", "Space of guard_diversity: 'pixels' (L2 per pixel, images downsampled to <= 64 px a side), a reward with an image encoder (aesthetic, clip_score, hpsv2, digit_confidence, digit_layout: cosine distance of its embeddings), or 'auto': pixels for images of <= 64 px a side (the embedded worlds), else the training reward's encoder or a held-out reward's where one has one (SD-size images), pixels otherwise.")
    drift: bool = option(True, "Log guard_drift: the mean exact per-step KL to the reference policy on the guard batch's own states (full fine-tuning keeps a frozen copy of the weights for it).")
    drift_steps: int = option(4, "guard_drift reads this many evenly spaced steps of each guard sample (2 denoiser passes a row).")
    stop: bool = option(True, "Stop the run (cleanly: final checkpoint, summary, exit 0) when the held-out reward has fallen more than guard.tolerance standard errors below its best for guard.patience evaluations in a row, or diversity has fallen below guard.min_diversity x its value before training.")
    stop_from_start: bool = option(False, "Count falls below the pre-training evaluation too. By default falls count only once a trained epoch has beaten it: an early dip before any gain (D3PO on the digits world, every method on the flow world) is not hacking.")
    tolerance: float = option(2.0, "Standard errors (the evaluation's own, std / sqrt(guard.samples)) a held-out evaluation must fall below the best to count as a fall.")
    patience: int = option(2, "Falls in a row that stop the run.")
    min_diversity: float = option(0.5, "Stop when diversity falls below this fraction of its value before training (0: never).")
    keep_best: bool = option(True, "Keep the checkpoint with the best held-out reward in checkpoints/best/ (summary.md names its epoch and rewards).")


@dataclass
class LogConfig:
    eval_samples: int = option(256, "Fixed-seed samples scored before and after training for summary.md (0 disables).")
    grid_samples: int = option(32, "Images in the before/after grids (same seeds), and of each epoch's samples in the grid sent to TensorBoard / W&B.")
    eval_num_steps: Optional[int] = option(None, "Sampling steps of the before/after evaluation (null: sample.num_steps). Lets rollouts use fewer steps than evaluation.")
    eval_sde_type: Optional[str] = option(None, "Flow models: the rollout SDE of the before/after evaluation, 'sde', 'cps' or 'dance' (null: sample.sde_type). Evaluating a CPS-trained policy with sde compares it with Flow-GRPO's on the same sampler: the base model scores differently under each.")
    eval_guidance_scale: Optional[float] = option(None, "Guidance scale of the before/after evaluation (null: sample.guidance_scale). With sample.guidance_scale=1 the policy trains without guidance (one denoiser pass per step) and can still be evaluated with it.")
    tensorboard: bool = option(True, "Also log to TensorBoard when it is installed: every scalar of metrics.jsonl, a labelled grid of log.grid_samples of each epoch's samples, and the before/after grids.")
    wandb: bool = option(False, "Also log to Weights & Biases (pip install \"diffrl_fast[wandb]\"): the config, every scalar of metrics.jsonl per epoch, each epoch's sample grid and the before/after grids. Run files go to output_dir/name/wandb/ unless WANDB_DIR is set; a resumed run continues the same W&B run.")
    wandb_project: str = option("diffrl_fast", "Weights & Biases project (log.wandb=true).")
    wandb_mode: str = option("", "Weights & Biases mode: '' (wandb's own default, or the WANDB_MODE environment variable), 'online', 'offline' (local files only; `wandb sync` uploads them later) or 'disabled'.")
    progress: bool = option(True, "tqdm progress bars for sampling and training.")


@dataclass
class Config:
    name: str = option("digits_ddpo", "Run name; outputs go to output_dir/name. Unset: <model>_<algo> from the last part of model.path ('digits' for the digits world) and the algorithm, ddpo_is written ddpo: digits_ddpo, sd3-medium_grpo, ...")
    output_dir: str = option("runs", "Folder holding the run folders.")
    seed: int = option(0, "Seed of everything: prompts, rollouts, shuffles, initialisation.")
    algo: str = option("ddpo_is", "Algorithm: ddpo_is, ddpo_sf, dpok, d3po, dense, tdpo, tdpo_r, grpo, nft, awm or dgpo (diffrl_fast/algos/, docs/algorithms.md). Unset keys take the algorithm's reference values.")
    num_epochs: int = option(100, "Epochs (rollout + training rounds). Default: ddpo-pytorch's 100.")
    prompts: list[str] = option([str(d) for d in range(10)], "Prompts, drawn uniformly per sample (for the digits world: '7', 'a handwritten 7', ...).")
    prompt_file: str = option("", "A text file with one prompt per line, or a built-in set: 'builtin:flow_digits_train' (the flow-digits world's 308 training prompts), 'builtin:flow_digits_heldout' (its 72 held-out ones); replaces `prompts` when set.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The policy model."})
    sample: SampleConfig = field(default_factory=SampleConfig, metadata={"help": "Rollouts."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimisation."})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "The reward function."})
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig, metadata={"help": "Advantage estimation."})
    dpok: DPOKConfig = field(default_factory=DPOKConfig, metadata={"help": "DPOK (algo=dpok)."})
    d3po: D3POConfig = field(default_factory=D3POConfig, metadata={"help": "D3PO (algo=d3po)."})
    dense: DenseConfig = field(default_factory=DenseConfig, metadata={"help": "The dense-reward view (algo=dense)."})
    tdpo: TDPOConfig = field(default_factory=TDPOConfig, metadata={"help": "TDPO / TDPO-R critic (algo=tdpo, tdpo_r)."})
    grpo: GRPOConfig = field(default_factory=GRPOConfig, metadata={"help": "Group-relative advantages (algo=grpo)."})
    nft: NFTConfig = field(default_factory=NFTConfig, metadata={"help": "DiffusionNFT, forward-process fine-tuning (algo=nft)."})
    awm: AWMConfig = field(default_factory=AWMConfig, metadata={"help": "Advantage Weighted Matching, forward-process fine-tuning (algo=awm)."})
    dgpo: DGPOConfig = field(default_factory=DGPOConfig, metadata={"help": "Direct Group Preference Optimization on deterministic rollouts (algo=dgpo)."})
    dist: DistConfig = field(default_factory=DistConfig, metadata={"help": "Distributed training (torchrun / deepspeed launchers)."})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "Logging, evaluation and outputs."})
    guard: GuardConfig = field(default_factory=GuardConfig, metadata={"help": "Guards against reward hacking: held-out reward, diversity and drift watched during the run, an early stop, the best checkpoint kept."})

    @staticmethod
    def algorithm_names() -> list[str]:
        from ..algos import ALGORITHMS

        return list(ALGORITHMS)

    @staticmethod
    def layered_defaults(data: dict) -> dict:
        """Dotted keys the chosen algorithm's reference sets differently from the defaults above (applied
        under the user's YAML and overrides; see ``Algorithm.reference_defaults``)."""
        from ..algos import ALGORITHMS

        name = data.get("algo", "ddpo_is")
        algo = ALGORITHMS.get(name)
        out = dict(algo.reference_defaults(count_prompts(data))) if algo is not None else {}
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        out["name"] = default_run_name(str(model.get("path", "digits")), str(name))
        return out


# Keys a model preset may set at its top level: the run, the model (path, precision, LoRA, ...), the per-process
# batch sizes, chunking and accumulation that fit memory, the task (reward, prompts), logging and the launcher.
PRESET_KEYS = ("name", "output_dir", "seed", "algo", "num_epochs", "prompts", "prompt_file", "model.", "sample.batch_size",
               "sample.num_batches_per_epoch", "sample.negative_prompt", "sample.height", "sample.width",
               "sample.num_frames", "sample.trajectory_device", "sample.trajectory_dtype", "train.batch_size", "train.chunk_size", "train.gradient_accumulation_steps",
               "reward.", "log.", "dist.", "guard.")


def preset_key(key: str) -> bool:
    """Whether dotted ``key`` is a model preset's to set (``PRESET_KEYS``; a trailing dot names a whole section);
    every other key is algorithmic: the steps, guidance and noise of sampling, the optimiser, clip ranges,
    advantages and each algorithm's own section."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in PRESET_KEYS)


def default_run_name(model_path: str, algo: str) -> str:
    """The run name when the config sets none: ``<model>_<algo>``, the model being the last part of its folder or hub
    id ("digits" for the digits world) and DDPO-IS, the default algorithm, written "ddpo": digits_ddpo,
    stable-diffusion-3-medium-diffusers_grpo."""
    model = Path(model_path.rstrip("/\\")).name if model_path != "digits" else "digits"
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._") or "model"
    return f"{model}_{'ddpo' if algo == 'ddpo_is' else algo}"


BUILTIN_PROMPTS = "builtin:"  # prompt_file's prefix naming a built-in prompt set


def prompt_file_lines(path: str) -> list[str]:
    """The prompts of ``prompt_file``: a text file's non-empty lines, or the built-in set ``builtin:NAME``
    (``models.flow_digits.PROMPT_SETS``: flow_digits_train, flow_digits_heldout)."""
    if path.startswith(BUILTIN_PROMPTS):
        from ..models.flow_digits import PROMPT_SETS

        name = path[len(BUILTIN_PROMPTS):]
        if name not in PROMPT_SETS:
            raise ConfigError(f"prompt_file {path!r}: there is no built-in prompt set {name!r}; the built-in sets are "
                              + ", ".join(BUILTIN_PROMPTS + k for k in PROMPT_SETS))
        return list(PROMPT_SETS[name])
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt_file {p} does not exist")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt_file {p} holds no prompts (one per line expected)")
    return prompts


def read_prompts(cfg: Config) -> list[str]:
    """The run's prompts: ``prompt_file``'s (``prompt_file_lines``) when set, else ``prompts``."""
    return prompt_file_lines(cfg.prompt_file) if cfg.prompt_file else list(cfg.prompts)


def count_prompts(data: dict) -> int:
    """How many prompts a (partial) config dict names: its prompt_file's lines, or its prompts list."""
    path = data.get("prompt_file")
    if path:
        try:
            return len(set(prompt_file_lines(str(path))))
        except (ConfigError, OSError, ValueError):  # a missing or empty file fails later, with its own message
            return 2
    prompts = data.get("prompts", Config.__dataclass_fields__["prompts"].default_factory())
    if isinstance(prompts, str):
        prompts = [x for x in prompts.split(",") if x.strip()]
    return len(set(prompts)) if isinstance(prompts, (list, tuple)) else 2


def timestep_window(cfg: Config, epoch: int) -> Optional[torch.Tensor]:
    """[sample.num_steps] bool mask of the stochastic (trained) rollout steps at ``epoch``, or None for all.

    fixed: steps [0, K); sliding: steps [o, o + K) with o = min(stride * (epoch // shift_every), T - K)
    (MixGRPO's window moving from high to low noise; Li et al. 2025). K = train.window_size. Tree rollouts'
    branch steps (sample.tree_branch_steps) are always in it: a node splits by its step's noise (BranchGRPO's mixed
    variant keeps its split steps stochastic the same way).
    """
    t, T = cfg.train, cfg.sample.num_steps
    if t.timestep_window == "all":
        return None
    start = 0 if t.timestep_window == "fixed" else min(t.window_stride * (epoch // t.window_shift_every), T - t.window_size)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[start:start + t.window_size] = True
    mask[list(cfg.sample.tree_branch_steps)] = True
    return mask


def tree_spec(cfg: Config):
    """The ``TreeSpec`` of tree rollouts (sample.tree_branch_steps, sample.tree_branch_factor), or None."""
    s = cfg.sample
    if not s.tree_branch_steps:
        return None
    from ..diffusion.tree import TreeSpec

    return TreeSpec(tuple(s.tree_branch_steps), s.tree_branch_factor)


def check_world_prompts(cfg: Config) -> None:
    """The built-in worlds read a fixed grammar: a prompt of ``model.path``'s world it cannot read is a ConfigError
    naming the grammar. The train command and the Trainer (when it loads the model itself) call it before any
    model loads."""
    if cfg.model.path == "digits":
        from ..models.digits import DigitPromptEncoder

        parse = DigitPromptEncoder.parse_prompt
    elif cfg.model.path == "flow-digits":
        from ..models.flow_digits import parse_layout as parse
    else:
        return
    for p in read_prompts(cfg):
        try:
            parse(p)
        except ValueError as exc:
            raise ConfigError(f"prompts: {exc}") from None


def validate(cfg: Config) -> Config:
    """Reject impossible combinations before any model is loaded (ConfigError names the keys)."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    def choice(key: str, value, options) -> None:
        need(value in options, f"{key} must be one of {list(options)}, got {value!r}")

    from ..algos import ALGORITHMS

    need(cfg.algo in ALGORITHMS, f"algo: {cfg.algo!r} is not one of {sorted(ALGORITHMS)}")
    need(cfg.num_epochs >= 1, "num_epochs must be >= 1")
    s, t = cfg.sample, cfg.train
    need(s.num_steps >= 1, "sample.num_steps must be >= 1")
    need(0 < s.eta <= 1, f"sample.eta must be in (0, 1], got {s.eta}")
    need(s.noise_level > 0, f"sample.noise_level must be > 0, got {s.noise_level}")
    choice("sample.sde_type", s.sde_type, SDE_TYPES)
    if s.sigma_grid is not None:
        choice("sample.sigma_grid", s.sigma_grid, ("scheduler", "flux", "flow_sigmas"))
    need(s.sde_type != "cps" or s.noise_level < 2, f"sample.sde_type=cps needs sample.noise_level in (0, 2), got {s.noise_level}")
    need(s.post_window_solver in ("euler", "dpmsolver++"), f"sample.post_window_solver must be 'euler' or 'dpmsolver++', got {s.post_window_solver!r}")
    need(0 < s.post_window_compress <= 1, f"sample.post_window_compress must be in (0, 1], got {s.post_window_compress}")
    need((s.post_window_solver == "euler" and s.post_window_compress == 1) or cfg.train.timestep_window != "all"
         or ALGORITHMS[cfg.algo].deterministic_rollout,
         "sample.post_window_solver / sample.post_window_compress act on the deterministic steps after a timestep window "
         "(MixGRPO-Flash) or on the whole deterministic rollout of a forward-process algorithm (algo=nft, awm, dgpo): set "
         "train.timestep_window=fixed or sliding, or leave them at euler / 1")
    need(s.guidance_scale >= 1, f"sample.guidance_scale must be >= 1 (1 = no guidance), got {s.guidance_scale}")
    need(s.batch_size >= 1 and s.num_batches_per_epoch >= 1, "sample.batch_size and sample.num_batches_per_epoch must be >= 1")
    need(t.batch_size >= 1, "train.batch_size must be >= 1")
    samples = s.batch_size * s.num_batches_per_epoch
    need(samples % t.batch_size == 0, f"the samples per epoch (sample.batch_size x sample.num_batches_per_epoch = {samples}) must be a multiple of train.batch_size ({t.batch_size})")
    need(0 < t.timestep_fraction <= 1, f"train.timestep_fraction must be in (0, 1], got {t.timestep_fraction}")
    need(t.chunk_size >= 1, f"train.chunk_size must be >= 1, got {t.chunk_size}")
    need(t.num_inner_epochs >= 1 and t.gradient_accumulation_steps >= 1, "train.num_inner_epochs and train.gradient_accumulation_steps must be >= 1")
    choice("train.optimizer_step_every", t.optimizer_step_every, ("minibatches", "chunks", "round"))
    need(t.learning_rate > 0, "train.learning_rate must be > 0")
    choice("train.lr_schedule", t.lr_schedule, ("constant", "linear", "cosine"))
    choice("train.timestep_window", t.timestep_window, ("all", "fixed", "sliding"))
    if t.timestep_window != "all":
        need(1 <= t.window_size <= s.num_steps, f"train.window_size must be in [1, sample.num_steps={s.num_steps}], got {t.window_size}")
        need(t.window_stride >= 1 and t.window_shift_every >= 1, "train.window_stride and train.window_shift_every must be >= 1")
    need(bool(s.tree_branch_steps) or not (s.tree_prune_width or s.tree_prune_depths),
         "sample.tree_prune_width / sample.tree_prune_depths prune tree rollouts: set sample.tree_branch_steps too, or leave "
         "them at 0 / []")
    if s.tree_branch_steps:
        steps = s.tree_branch_steps
        need(isinstance(steps, list) and all(isinstance(j, int) and not isinstance(j, bool) for j in steps),
             f"sample.tree_branch_steps must be a list of step indices, got {steps!r}")
        try:  # the tree's own checks (sorted, distinct, in range, factor >= 2), named by their keys
            tree_spec(cfg).check(s.num_steps)
        except ValueError as exc:
            raise ConfigError(f"sample.tree_branch_steps / sample.tree_branch_factor: {exc}") from None
        need(s.tree_split_noise_scale > 0, f"sample.tree_split_noise_scale must be > 0, got {s.tree_split_noise_scale}")
        from ..diffusion.tree import PRUNE_WIDTH_MODES, TREE_ADVANTAGE_NORMS, TREE_FUSIONS

        choice("sample.tree_reward_fusion", s.tree_reward_fusion, TREE_FUSIONS)
        choice("sample.tree_advantage_norm", s.tree_advantage_norm, TREE_ADVANTAGE_NORMS)
        choice("sample.tree_prune_width", s.tree_prune_width, PRUNE_WIDTH_MODES)
        need(0 < s.tree_prune_width_ratio <= 1, f"sample.tree_prune_width_ratio must be in (0, 1], got {s.tree_prune_width_ratio}")
        need(isinstance(s.tree_prune_depths, list) and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= s.num_steps
                                                           for d in s.tree_prune_depths),
             f"sample.tree_prune_depths must be child depths in [1, sample.num_steps={s.num_steps}], got {s.tree_prune_depths!r}")
        need(s.tree_prune_depth_slide_every >= 0, f"sample.tree_prune_depth_slide_every must be >= 0, got {s.tree_prune_depth_slide_every}")
        need(0 <= s.tree_prune_until <= 1, f"sample.tree_prune_until must be in [0, 1], got {s.tree_prune_until}")
        leaves = tree_spec(cfg).leaves
        need(cfg.algo == "grpo", f"tree rollouts (sample.tree_branch_steps) train with algo=grpo, not {cfg.algo}: their node "
             "advantages are per transition, and the forward-process algorithms (nft, awm, dgpo) roll out deterministically, "
             "where a tree cannot branch")
        need(cfg.grpo.group_size == leaves, f"a tree of sample.tree_branch_factor={s.tree_branch_factor} over "
             f"{len(steps)} branch steps has {leaves} leaves: set grpo.group_size={leaves} (one tree per prompt)")
    need(cfg.log.eval_num_steps is None or cfg.log.eval_num_steps >= 1, "log.eval_num_steps must be >= 1 or null")
    need(cfg.log.eval_guidance_scale is None or cfg.log.eval_guidance_scale >= 1, "log.eval_guidance_scale must be >= 1 or null")
    if cfg.log.eval_sde_type is not None:
        choice("log.eval_sde_type", cfg.log.eval_sde_type, SDE_TYPES)
        need(cfg.log.eval_sde_type != "cps" or cfg.sample.noise_level < 2,
             f"log.eval_sde_type=cps needs sample.noise_level in (0, 2), got {cfg.sample.noise_level}")
    need(t.lr_warmup_steps >= 0, "train.lr_warmup_steps must be >= 0")
    need(t.clip_range > 0 and t.adv_clip_max > 0, "train.clip_range and train.adv_clip_max must be > 0")
    choice("model.mixed_precision", cfg.model.mixed_precision, ("no", "bf16", "fp16"))
    choice("model.attention", cfg.model.attention, ("auto", "sdpa", "xformers"))
    choice("model.sampler", cfg.model.sampler, ("auto", "ddim", "ddpm"))
    need(cfg.model.lora_rank >= 1, "model.lora_rank must be >= 1")
    choice("sample.trajectory_dtype", s.trajectory_dtype, ("float32", "bfloat16", "float16"))
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
    choice("log.wandb_mode", cfg.log.wandb_mode, ("", "online", "offline", "disabled"))
    choice("dist.engine", cfg.dist.engine, ("auto", "none", "ddp", "fsdp", "deepspeed"))
    need(cfg.dist.timeout_s > 0, "dist.timeout_s must be > 0")
    gd = cfg.guard
    need(isinstance(gd.heldout_reward, list), f"guard.heldout_reward must be a list of reward specs, got {gd.heldout_reward!r}")
    for i, spec in enumerate(gd.heldout_reward):
        need((isinstance(spec, str) and bool(spec)) or (isinstance(spec, list) and bool(spec) and all(
            isinstance(c, str) or (isinstance(c, dict) and isinstance(c.get("name"), str)) for c in spec)),
            f"guard.heldout_reward[{i}] must be a reward name, dotted path, URL or a weighted sum [{{name: ..., weight: ...}}, ...], got {spec!r}")
    need(gd.every >= 0 and gd.patience >= 1 and gd.tolerance >= 0 and gd.drift_steps >= 1,
         "guard.every must be >= 0, guard.patience and guard.drift_steps >= 1, guard.tolerance >= 0")
    need(gd.samples_per_prompt >= 2 and gd.samples >= gd.samples_per_prompt,
         f"guard.samples_per_prompt must be >= 2 (diversity compares a prompt's images) and guard.samples >= it, got "
         f"{gd.samples_per_prompt} and {gd.samples}")
    need(0 <= gd.min_diversity < 1, f"guard.min_diversity must be in [0, 1), got {gd.min_diversity}")
    need(isinstance(gd.diversity_encoder, str) and bool(gd.diversity_encoder),
         f"guard.diversity_encoder must be 'auto', 'pixels' or a reward name with an image encoder, got {gd.diversity_encoder!r}")
    G = ALGORITHMS[cfg.algo].group_size(cfg)
    need(G >= 1 and (cfg.algo not in ("d3po", "dense") or G >= 2), f"{cfg.algo} needs >= 2 samples per prompt, got {G}")
    from ..rewards import COMPONENT_KEYS, COMPONENT_NORMS
    from ..rewards.remote import IMAGE_FORMATS

    r = cfg.reward
    if isinstance(r.name, list):
        need(len(r.name) >= 1, "reward.name is an empty list: give a reward name or [{name: ..., weight: ...}, ...]")
        r.name = [{"name": c} if isinstance(c, str) else c for c in r.name]  # [a, b]: each with weight 1
        for i, c in enumerate(r.name):
            need(isinstance(c, dict), f"reward.name[{i}] must be a reward name or {{name: ..., weight: ..., kwargs: ..., "
                                      f"label: ...}}, got {c!r}")
            extra = sorted(set(c) - set(COMPONENT_KEYS))
            need(not extra, f"reward.name[{i}] has unknown keys {extra}; a component takes {', '.join(COMPONENT_KEYS)}")
            need(isinstance(c.get("name"), str) and c["name"], f"reward.name[{i}] needs a 'name' (a reward name, dotted path or URL)")
            w = c.get("weight", 1.0)
            need(isinstance(w, (int, float)) and not isinstance(w, bool), f"reward.name[{i}].weight must be a number, got {w!r}")
            need(isinstance(c.get("kwargs", {}) or {}, dict), f"reward.name[{i}].kwargs must be a mapping")
        need(not r.kwargs, "reward.kwargs applies to a single reward; give each component of reward.name its own kwargs")
    choice("reward.component_norm", r.component_norm, COMPONENT_NORMS)
    choice("reward.remote_format", r.remote_format, IMAGE_FORMATS)
    need(r.timeout_s > 0 and r.retries >= 0 and r.backoff_s >= 0 and r.remote_batch_size >= 0,
         "reward.timeout_s must be > 0; reward.retries, reward.backoff_s and reward.remote_batch_size >= 0")
    need(not (cfg.reward.drop_nonfinite and G > 1),
         f"reward.drop_nonfinite cannot be used with {cfg.algo} ({G} samples per prompt): dropping a sample would break its "
         "prompt group; fix the reward or let the run stop on non-finite rewards")
    # AWM's loss needs no whole group in a minibatch (its reference shuffles samples across prompts)
    need(s.batch_size % G == 0 and (cfg.algo == "awm" or t.batch_size % G == 0),
         f"{cfg.algo} trains on groups of {G} samples per prompt: sample.batch_size ({s.batch_size})"
         + ("" if cfg.algo == "awm" else f" and train.batch_size ({t.batch_size})") + f" must be multiples of {G}")
    if cfg.algo == "ddpo_sf":
        need(t.optimizer_step_every != "round" or t.num_inner_epochs == 1,
             "ddpo_sf with train.optimizer_step_every=round takes its one step per round at theta = theta_old; a second inner "
             "epoch would reuse the data off-policy, where the score-function estimator is biased: set train.num_inner_epochs=1")
    # the dense-reward loss couples a trajectory's steps: its two-pass gradient needs the policy fixed over a minibatch
    need(cfg.algo != "dense" or t.optimizer_step_every != "chunks",
         "algo=dense needs train.optimizer_step_every=minibatches or round: its loss couples all trained steps of a trajectory")
    d = cfg.dense
    need(0 < d.gamma <= 1, f"dense.gamma must be in (0, 1], got {d.gamma}")
    choice("dense.timestep_sampling", d.timestep_sampling, ("discounted", "weighted"))
    need(d.num_timesteps is None or d.num_timesteps >= 1, f"dense.num_timesteps must be >= 1 or null, got {d.num_timesteps}")
    need(d.log_ratio_clip is None or d.log_ratio_clip > 0, "dense.log_ratio_clip must be > 0 or null")
    if cfg.algo == "dense" and d.timestep_sampling == "weighted" and d.num_timesteps is not None:
        need(d.num_timesteps <= s.num_steps, f"dense.num_timesteps ({d.num_timesteps}) distinct steps cannot exceed sample.num_steps ({s.num_steps}) with timestep_sampling=weighted")
    need(cfg.d3po.beta > 0 and d.temperature > 0, "d3po.beta and dense.temperature must be > 0")
    need(cfg.d3po.ratio_clip is None or 0 < cfg.d3po.ratio_clip < 1, "d3po.ratio_clip must be in (0, 1) or null")
    choice("d3po.pairs", cfg.d3po.pairs, ("all", "disjoint"))
    if cfg.algo == "d3po" and cfg.d3po.step_per_pair and not cfg.d3po.preferences and cfg.d3po.samples_per_prompt > 2:
        # one optimiser step per non-tied pair: the steps per epoch vary with the ties
        need(t.lr_schedule == "constant", "d3po.step_per_pair takes one optimiser step per non-tied pair, so the steps per "
             "epoch vary with the ties: use train.lr_schedule=constant, or d3po.step_per_pair=false")
        need(int(os.environ.get("WORLD_SIZE", "1")) == 1, "d3po.step_per_pair takes one optimiser step per non-tied pair, "
             "and the pairs per process differ with the ties: with several processes set d3po.step_per_pair=false")
    need(d.kl_coef >= 0, "dense.kl_coef must be >= 0")
    p = cfg.dpok
    need(p.beta >= 0 and p.alpha >= 0, "dpok.alpha and dpok.beta must be >= 0")
    choice("dpok.kl_form", p.kl_form, ("eps_mse", "exact"))
    choice("dpok.ratio_clip", p.ratio_clip, ("clamp", "ppo"))
    choice("dpok.advantage", p.advantage, ("raw", "normalized"))
    need(p.value_lr > 0 and p.value_batch_size >= 1 and p.value_steps >= 1 and p.value_weight_decay >= 0,
         "dpok.value_lr must be > 0, dpok.value_batch_size and dpok.value_steps >= 1, dpok.value_weight_decay >= 0")
    c = cfg.tdpo
    choice("tdpo.critic", c.critic, ("embedding", "latent"))
    need(c.critic_lr > 0 and c.critic_weight_decay >= 0 and c.critic_max_grad_norm >= 0,
         "tdpo.critic_lr must be > 0, tdpo.critic_weight_decay and tdpo.critic_max_grad_norm >= 0")
    need(c.value_clip > 0 and c.value_coef >= 0, "tdpo.value_clip must be > 0 and tdpo.value_coef >= 0")
    need(c.adv_clip_max is None or c.adv_clip_max > 0, "tdpo.adv_clip_max must be > 0 or null")
    need(c.reset_every >= 1, "tdpo.reset_every must be >= 1")
    g = cfg.grpo
    need(g.beta >= 0 and g.eps > 0, "grpo.beta must be >= 0 and grpo.eps > 0")
    choice("grpo.kl_form", g.kl_form, ("flow_grpo", "exact"))
    choice("grpo.std", g.std, ("global", "group"))
    choice("grpo.train_steps", g.train_steps, ("first", "random"))
    need(not (cfg.algo == "grpo" and g.guard and s.sde_type != "sde"),
         f"grpo.guard (GRPO-Guard) is written for Flow-GRPO's SDE, whose step std is std_t sqrt(dt); sample.sde_type="
         f"{s.sde_type} has no dt to reweight by: set sample.sde_type=sde or grpo.guard=false")
    n = cfg.nft
    need(n.group_size >= 1 and n.beta > 0 and n.kl_beta >= 0, "nft.group_size must be >= 1, nft.beta > 0 and nft.kl_beta >= 0")
    choice("nft.decay_type", n.decay_type, (0, 1, 2))
    choice("nft.sample_with", n.sample_with, ("old", "policy"))
    a = cfg.awm
    need(a.group_size >= 1 and a.train_timesteps >= 1, "awm.group_size and awm.train_timesteps must be >= 1")
    choice("awm.time_type", a.time_type, ("discrete", "discrete_wo_init", "discrete_with_init"))
    choice("awm.weighting", a.weighting, ("Uniform", "t", "t**2", "huber", "ghuber"))
    choice("awm.loss_type", a.loss_type, ("exp_first", "sum_first"))
    choice("awm.kl_weight", a.kl_weight, ("Uniform", "ELBO"))
    choice("awm.ema_kl_weight", a.ema_kl_weight, ("Uniform", "ELBO"))
    choice("awm.ema_decay_type", a.ema_decay_type, ("linear", "constant"))
    need(a.ghuber_power > 0 and a.clip_range > 0 and a.beta >= 0 and a.ema_beta >= 0 and 0 <= a.ema_decay < 1,
         "awm.ghuber_power and awm.clip_range must be > 0, awm.beta and awm.ema_beta >= 0, awm.ema_decay in [0, 1)")
    need(a.advantage_max is None or a.advantage_max > 0, "awm.advantage_max must be > 0 or null")
    d = cfg.dgpo
    need(d.group_size >= 1 and d.beta > 0 and d.kl_beta >= 0 and d.kl_cfg >= 1 and d.clip_range > 0,
         "dgpo.group_size must be >= 1, dgpo.beta and dgpo.clip_range > 0, dgpo.kl_beta >= 0 and dgpo.kl_cfg >= 1")
    need(0 <= d.ema_decay < 1 and d.switch_ema_ref >= 0, "dgpo.ema_decay must be in [0, 1) and dgpo.switch_ema_ref >= 0")
    if cfg.algo == "dgpo":
        need(1 <= d.train_timesteps <= d.max_step + 1 <= s.num_steps,
             f"algo=dgpo draws dgpo.train_timesteps={d.train_timesteps} distinct steps from steps 0..dgpo.max_step={d.max_step} of "
             f"a sample.num_steps={s.num_steps} rollout: need 1 <= train_timesteps <= max_step + 1 <= num_steps")
    if cfg.algo == "awm" and a.loss_type == "sum_first":
        need(cfg.train.chunk_size >= a.train_timesteps, f"awm.loss_type=sum_first takes one ratio over all of a sample's "
             f"timesteps, so they must share a chunk: set train.chunk_size >= awm.train_timesteps ({a.train_timesteps})")
    return cfg


def reward_label(cfg: Config) -> str:
    """What reward.name names, as text: the name, or a weighted sum "1 clip_score + 0.5 aesthetic"."""
    name = cfg.reward.name
    if isinstance(name, str):
        return name
    return " + ".join(f"{c.get('weight', 1.0):g} {c.get('label') or c['name']}" for c in name)
