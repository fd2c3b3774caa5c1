"""The one trainer loop: sample -> reward -> advantages -> inner epochs over packed timestep chunks -> step -> log.

Per epoch:
 1. Rollout: ``sample.num_batches_per_epoch`` batches of trajectories per process (prompts drawn
    uniformly, ``samples_per_prompt`` adjacent samples each, seeds derived from (seed, epoch, rank));
    each batch's rewards are computed in a background thread while the next batch samples
    (``reward.overlap``). Rewards and per-prompt statistics are global across processes.
 2. The algorithm turns trajectories and rewards into what its loss needs (advantages, pairs, ...).
 3. For each inner epoch: order the samples, pick each sample's trained timesteps, cut minibatches of
    ``train.batch_size`` samples, and walk each minibatch in chunks of K timesteps: one packed denoiser
    forward, the fused loss, backward scaled by the chunk's share of the rows of the optimiser step.
    Step after ``gradient_accumulation_steps`` minibatches; a step with non-finite gradients is skipped
    and counted, and too many in a row stop the run with a checkpoint.
 4. Log one line and a metrics.jsonl record (main process); checkpoint atomically.

Every random choice comes from a generator seeded by (seed, epoch, purpose[, rank]), so a resumed run
repeats exactly what the uninterrupted run would have done.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

from .._extras import install_command, require
from ..algos import make_algorithm
from ..algos.base import RunContext
from ..diffusion.coefficients import make_schedule, post_window_ode
from ..diffusion.recompute import pack_chunk, trainable_steps
from ..diffusion.rollout import Trajectory, sample_trajectories
from ..diffusion.tree import owned_order
from ..models import load_model
from ..rewards import RewardError, WeightedReward, build_one, build_reward, close_reward, reward_metrics, reward_values
from ..rewards.remote import RewardServiceError
from ..utils.memory import PeakMemory
from .advantages import PerPromptStatTracker, normalize
from .checkpoint import keep_best_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, check_world_prompts, read_prompts, reward_label, timestep_window, tree_spec
from .distributed import DistContext, init_distributed, make_engine
from .guard import Guard, GuardState
from .outputs import RunLogger, filmstrip, save_final_weights, write_summary

AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
EVAL_SEED_BASE = 1_000_000_007


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row); a checkpoint was written."""


class Interrupted(Exception):
    """Raised inside an epoch when a stop was requested: the epoch is abandoned, the last checkpoint stands."""


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints (seed, epoch, purpose, ...), independent of other streams."""
    h = 1469598103934665603
    for k in key:
        h = ((h ^ (int(k) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return torch.Generator().manual_seed(h)


def configure_attention(model, choice: str, device: torch.device) -> str:
    """Use xformers' memory-efficient attention where asked for (or, with "auto", where it runs: CUDA with
    xformers installed); PyTorch's scaled_dot_product_attention otherwise (diffusers' default)."""
    available = device.type == "cuda"
    if available:
        try:  # imported, not only looked up: a broken install (e.g. built for another CUDA) falls back to sdpa
            import xformers  # noqa: F401
        except ImportError:
            available = False
    if choice == "xformers" and not available:
        raise ValueError(f"model.attention=xformers needs a CUDA device and xformers ({install_command('gpu')}); use sdpa")
    if choice == "xformers" or (choice == "auto" and available):
        model.denoiser.enable_xformers_memory_efficient_attention()
        return "xformers"
    return "sdpa"


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, *, model=None, reward_fn: Optional[Callable] = None,
                 device: Optional[str] = None, log_fn: Callable[[str], None] = print,
                 ctx: Optional[DistContext] = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ctx = ctx if ctx is not None else init_distributed(cfg.dist.engine, cfg.dist.timeout_s)
        if device is None:
            device = f"cuda:{self.ctx.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.log_fn = log_fn if self.ctx.is_main else (lambda s: None)
        self.prompts = read_prompts(cfg)
        if model is None:  # the built-in worlds read a fixed grammar: a bad prompt fails before anything loads
            check_world_prompts(cfg)
        if self.ctx.active and cfg.reward.drop_nonfinite:
            raise ValueError("reward.drop_nonfinite changes the samples per process, which several processes cannot do "
                             "in lockstep; fix the reward or run with one process")
        if cfg.log.wandb and self.ctx.is_main:  # before any model loads: a missing wandb names its extra at once
            require("wandb", "log.wandb=true")
        torch.manual_seed(cfg.seed)
        self.algo = make_algorithm(cfg)
        # a reward server's health check runs here, before any model loads, and every process learns whether any
        # process's failed (each would otherwise wait for the failed one in its first collective)
        error = None
        try:
            self.reward_fn = reward_fn if reward_fn is not None else build_reward(cfg.reward)
            self.tracked = {name: build_one(name, {}, cfg.reward) for name in cfg.reward.track}
        except RewardError as exc:
            error = exc
        self._agree(error)
        self.phase = "setup"  # what the run is doing, for the message of a reward server that stops it
        self.tracked_means: dict[str, float] = {}
        self.component_means: dict[str, float] = {}
        self.metric_means: dict[str, float] = {}
        self.eval_metrics: dict[str, torch.Tensor] = {}
        self.model = model if model is not None else load_model(cfg.model.path, device=self.device, sampler=cfg.model.sampler)
        self.algo.check_model(self.model)
        self.post_window = cfg.sample.post_window_solver != "euler" or cfg.sample.post_window_compress != 1
        from diffusers import FlowMatchEulerDiscreteScheduler

        if self.post_window and not isinstance(self.model.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"sample.post_window_solver / post_window_compress (MixGRPO-Flash) need a flow-matching model, but "
                             f"{self.model.kind} samples with {type(self.model.scheduler).__name__}: leave them at euler / 1")
        if cfg.sample.sigma_grid is not None:
            if not isinstance(self.model.scheduler, FlowMatchEulerDiscreteScheduler):
                raise ValueError(f"sample.sigma_grid={cfg.sample.sigma_grid} chooses a flow model's sigmas, but {self.model.kind} "
                                 f"samples with {type(self.model.scheduler).__name__}: leave it unset")
            self.model.sigma_grid = cfg.sample.sigma_grid
        for key, value in (("sample.sde_type", cfg.sample.sde_type), ("log.eval_sde_type", cfg.log.eval_sde_type)):
            if value not in (None, "sde") and not isinstance(self.model.scheduler, FlowMatchEulerDiscreteScheduler):
                raise ValueError(f"{key}={value} is a flow-matching SDE, but {self.model.kind} samples with "
                                 f"{type(self.model.scheduler).__name__}: set {key}=sde")
        m = cfg.model
        if hasattr(self.model, "guidance") and m.embedded_guidance is not None:  # FLUX: guidance-distilled models' embedding
            self.model.guidance = m.embedded_guidance
        if getattr(self.model, "guidance_distilled", False) and cfg.sample.guidance_scale != 1.0:
            raise ValueError(f"{self.model.kind} at {m.path} samples without classifier-free guidance (its guidance is distilled: "
                             f"embedded, or a step-distilled model), but sample.guidance_scale={cfg.sample.guidance_scale}: set "
                             f"sample.guidance_scale=1 (and model.embedded_guidance for an embedded guidance)")
        self.guard = Guard(cfg.guard, cfg.reward, log_fn=self.log_fn)
        self._check_video(cfg)
        self.has_reference = m.lora or self.algo.needs_reference or (self.guard.enabled and cfg.guard.drift)
        if m.lora:
            self.model.add_lora(m.lora_rank, m.lora_alpha, m.lora_targets)
        else:
            self.model.denoiser.requires_grad_(True)
            if self.has_reference:  # the algorithm's reference, or the guard's drift measure's
                self.model.keep_reference_copy(m.reference_device or None)
        if m.gradient_checkpointing:
            self.model.denoiser.enable_gradient_checkpointing()
        if m.channels_last:
            self.model.denoiser.to(memory_format=torch.channels_last)
        self.attention = configure_attention(self.model, m.attention, self.device)
        self.params = self.model.trainable_parameters()
        if not self.params:
            raise ValueError("the model has no trainable parameters (check model.lora_targets)")
        self.engine = make_engine(self.model, self.params, cfg, self.ctx)
        self.params = self.engine.params  # FSDP replaces the parameters by their shards
        self.autocast_dtype = AUTOCAST[m.mixed_precision]
        a = cfg.advantage
        self.tracker = PerPromptStatTracker(a.buffer_size, a.min_count) if a.per_prompt_stat_tracking else None
        self.epoch = 0  # epochs completed
        self.nonfinite_in_row = 0
        self.max_nonfinite_in_row = 5
        self.dropped_samples = 0
        self.denoiser_passes = 0  # of training (rollouts and updates, all processes), evaluations excluded
        self.skipped_before = 0  # skipped steps of earlier sessions (resumed)
        self.memory = PeakMemory(self.device)
        self.logger = RunLogger(self.run_dir, cfg, print_fn=self.log_fn)
        # The reward thread's torch ops run single-threaded (torch.set_num_threads is per OS thread): a second
        # OpenMP team competing with the sampler's for the same cores halved throughput on a 2-core CPU
        # (benchmarks/results/e2e.md).
        self._pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward", initializer=torch.set_num_threads, initargs=(1,))
                      if cfg.reward.overlap else None)
        self.run_context = RunContext(
            model=self.model, device=self.device, autocast_dtype=self.autocast_dtype, dist=self.ctx, prompts=self.prompts,
            reward_fn=self.reward_fn, advantages=self.advantages, generator=self.generator, step_groups=self.step_groups,
            engine=self.engine.kind, clock=lambda: (self.epoch, self.engine.steps))
        self.algo.setup(self.run_context)

    @property
    def skipped_steps(self) -> int:
        return self.skipped_before + self.engine.skipped

    def generator(self, *key: int) -> torch.Generator:
        """An independent generator for (epoch, purpose, ...) of this run's seed: same draws on resume."""
        return _generator(self.cfg.seed, *key)

    # ---- identity, checkpoints -----------------------------------------------------------------
    def identity(self) -> dict:
        m = self.cfg.model
        return {"model": m.path, "algo": self.cfg.algo, "lora": m.lora, "lora_rank": m.lora_rank if m.lora else None,
                "lora_targets": list(m.lora_targets) if m.lora else None, "engine": self.engine.kind,
                "world_size": self.ctx.world_size}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.denoiser.named_parameters() if p.requires_grad}

    def save(self) -> Optional[Path]:
        """Checkpoint the end of epoch ``self.epoch``; collective when there are several processes."""
        state = {"identity": self.identity(), "tracker": self.tracker.state_dict() if self.tracker else None,
                 "skipped_steps": self.skipped_steps, "dropped_samples": self.dropped_samples, "optimizer_steps": self.engine.steps,
                 "denoiser_passes": self.denoiser_passes, "guard": self.guard.state.to_dict()}
        kind = self.engine.kind
        sharded = kind in ("deepspeed", "fsdp")
        if kind == "fsdp":  # gathered shard by shard onto rank 0's CPU (collective)
            weights = self.engine.full_state(trainable_only=True)
        else:
            with self.engine.gathered():  # collective under ZeRO-3
                weights = self.trainable_state() if self.ctx.is_main else {}
        optimizer = None if sharded else self.engine.optimizer_state()
        path = None
        if sharded:  # every process writes its optimiser/parameter shards; the main process finalises
            staged = self.run_dir / "checkpoints" / f".{kind}_epoch_{self.epoch:04d}"
            if kind == "deepspeed":
                self.engine.engine.save_checkpoint(str(staged), tag="state")
            else:
                self.engine.save_sharded(staged)
            self.ctx.barrier()
        if self.ctx.is_main:
            path = save_checkpoint(self.run_dir, self.epoch, weights, {"policy": optimizer, "algo": self.algo.state_dict()},
                                   state, extra_dirs={kind: staged} if sharded else None)
        self.ctx.barrier()
        return path

    def resume(self) -> bool:
        """Load the run's latest checkpoint; False when there is none yet."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return False
        weights, opt_state, state, rng = load_checkpoint(path, self.identity())
        params = dict(self.model.denoiser.named_parameters())
        names = {n for n, p in params.items() if p.requires_grad}
        if set(weights) != names:
            raise ValueError(f"checkpoint {path} holds other weights than this model trains "
                             f"({len(set(weights) ^ names)} names differ, e.g. {sorted(set(weights) ^ names)[:3]})")
        if self.engine.kind == "deepspeed":
            self.engine.engine.load_checkpoint(str(path / "deepspeed"), tag="state")
        elif self.engine.kind == "fsdp":
            if not (path / "fsdp").is_dir():
                raise ValueError(f"checkpoint {path} has no FSDP shards (fsdp/): it was not written by dist.engine=fsdp")
            self.engine.load_sharded(path / "fsdp")
        else:
            with torch.no_grad():
                for n, w in weights.items():
                    params[n].copy_(w)
            self.engine.load_optimizer_state(opt_state["policy"])
        self.algo.load_state_dict(opt_state["algo"])
        if self.tracker is not None and state.get("tracker"):
            self.tracker.load_state_dict(state["tracker"])
        self.epoch = int(state["epoch"])
        self.skipped_before = int(state.get("skipped_steps", 0))
        self.dropped_samples = int(state.get("dropped_samples", 0))
        self.denoiser_passes = int(state.get("denoiser_passes", 0))
        self.guard.state = GuardState.from_dict(state.get("guard"))
        self.engine.steps = int(state.get("optimizer_steps", 0))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.log_fn(f"resumed from {path} (epoch {self.epoch})")
        return True

    # ---- rollout and rewards -------------------------------------------------------------------
    def _sample(self, prompts: list[str], seeds: list[int], init_seeds: Optional[list[int]] = None, progress=None,
                *, epoch: Optional[int] = None) -> Trajectory:
        """Rollouts of training epoch ``epoch`` (its timestep window), or with ``epoch=None`` the evaluation's
        samples (every step stochastic, log.eval_num_steps, log.eval_guidance_scale and log.eval_sde_type where set)."""
        s, log = self.cfg.sample, self.cfg.log
        num_steps, guidance, schedule, keep, tree, tail = s.num_steps, s.guidance_scale, None, None, None, None
        sde_type = s.sde_type
        if epoch is None:
            num_steps = log.eval_num_steps or s.num_steps
            guidance = s.guidance_scale if log.eval_guidance_scale is None else log.eval_guidance_scale
            sde_type = log.eval_sde_type or s.sde_type
        else:
            window = timestep_window(self.cfg, epoch)
            tree = tree_spec(self.cfg)
            shape = self.model.latent_shape_for(s.height, s.width)
            if self.algo.deterministic_rollout:
                window = torch.zeros(num_steps, dtype=torch.bool)
            if window is not None:
                schedule = make_schedule(self.model.scheduler, num_steps, eta=s.eta, noise_level=s.noise_level,
                                         sde_type=s.sde_type, window=window, **self.model.schedule_kwargs(shape, num_steps))
                # only the states training reads are stored: x_j, x_{j+1} of the stochastic steps (none for a
                # forward-process algorithm), and x_T
                tail = post_window_ode(self.model.scheduler, schedule, solver=s.post_window_solver, compress=s.post_window_compress,
                                       mu=self.model.schedule_kwargs(shape, num_steps).get("mu")) if self.post_window else None
                keep = torch.zeros(num_steps + 1, dtype=torch.bool)
                if self.algo.trains_on_states:
                    stochastic = schedule.stochastic.cpu().bool()
                    keep[:-1] |= stochastic
                    keep[1:] |= stochastic
        return sample_trajectories(
            self.model, prompts, num_steps=num_steps, guidance_scale=guidance, eta=s.eta, schedule=schedule,
            noise_level=s.noise_level, sde_type=sde_type, negative_prompts=[s.negative_prompt] * len(prompts) if s.negative_prompt else None,
            seeds=seeds, init_seeds=init_seeds, height=s.height, width=s.width, autocast_dtype=self.autocast_dtype, progress=progress,
            storage_device=s.trajectory_device or None, keep_latents=keep, tree=tree, split_noise_scale=s.tree_split_noise_scale,
            keep_means=epoch is not None and self.algo.needs_rollout_means, post_window=tail,
            state_dtype=None if s.trajectory_dtype == "float32" else getattr(torch, s.trajectory_dtype),
        )

    def _check_video(self, cfg: Config) -> None:
        """A video model gets its frame count and video rewards only; an image model refuses sample.num_frames."""
        from ..rewards.values import require_video_rewards

        if not getattr(self.model, "is_video", False):
            if cfg.sample.num_frames is not None:
                raise ValueError(f"sample.num_frames={cfg.sample.num_frames} applies to video models (Wan); {self.model.kind} "
                                 f"makes images: leave it unset")
            return
        if cfg.sample.num_frames is not None:
            self.model.latent_frames(cfg.sample.num_frames)  # raises for a count the VAE cannot take
            self.model.num_frames = cfg.sample.num_frames
        if cfg.guard.diversity_encoder not in ("auto", "pixels"):
            raise ValueError(f"guard.diversity_encoder={cfg.guard.diversity_encoder} embeds images; {self.model.kind} makes videos, "
                             f"compared in pixels: set guard.diversity_encoder=pixels")
        if cfg.model.channels_last:
            raise ValueError(f"model.channels_last=true lays out 4-D image tensors; {self.model.kind}'s latents are 5-D videos: set "
                             f"model.channels_last=false")
        require_video_rewards(self.model.kind, [(reward_label(cfg), self.reward_fn), *self.tracked.items(), *self.guard.rewards.items()])

    def _score(self, traj: Trajectory) -> tuple[torch.Tensor, dict, dict]:
        """(rewards [B] on the CPU, components {label: [B]} of a weighted sum else {}, the reward's per-sample
        metrics {name: [B]} (``reward_metrics``)); validated."""
        out = self.reward_fn(traj.images, traj.prompts, traj.metadata)
        rewards = reward_values(reward_label(self.cfg), out, len(traj), self.cfg.reward.drop_nonfinite)
        components = out[1].get("components", {}) if isinstance(self.reward_fn, WeightedReward) else {}
        return rewards, components, reward_metrics(reward_label(self.cfg), out[1], len(traj))

    def _agree(self, error: Optional[BaseException]) -> None:
        """Raise ``error`` here, and on every process when any process has one (a reward server that failed one
        process fails them all at once, instead of leaving the others waiting in a collective)."""
        if self.ctx.active:
            errors = self.ctx.all_gather_object(None if error is None else (type(error).__name__, str(error)))
            if error is None and any(e is not None for e in errors):
                rank, (kind, text) = next((r, e) for r, e in enumerate(errors) if e is not None)
                cls = RewardServiceError if kind == "RewardServiceError" else RewardError
                raise cls(f"process {rank}: {text}")
        if error is not None:
            raise error

    def _collect(self, pending: list) -> list:
        """The results of the reward thread's (or inline) scoring; the first error is every process's."""
        error, results = None, []
        for p in pending:
            try:
                results.append(p.result() if isinstance(p, Future) else p)
            except RewardError as exc:
                error = error or exc
        self._agree(error)
        return results

    def sample_epoch(self, epoch: int, bar=None) -> tuple[Trajectory, torch.Tensor]:
        s = self.cfg.sample
        g = _generator(self.cfg.seed, epoch, 1, self.ctx.rank)
        trajs: list[Trajectory] = []
        pending: list[Future | torch.Tensor] = []
        G = self.algo.samples_per_prompt
        for b in range(s.num_batches_per_epoch):
            plan = self.algo.rollout_plan(self.run_context, epoch, b, g)
            if plan is None:
                idx = torch.randint(len(self.prompts), (s.batch_size // G,), generator=g).repeat_interleave(G)
                seeds = torch.randint(0, 2**31 - 1, (s.batch_size,), generator=g).tolist()
                plan = ([self.prompts[i] for i in idx], seeds)
            prompts, seeds = plan
            # a group sharing x_0 starts from its first member's initial noise
            init = [seeds[i - i % G] for i in range(len(seeds))] if self.algo.shares_initial_noise else None
            with self.algo.rollout_weights(self.run_context):
                traj = self._sample(prompts, seeds, init_seeds=init, progress=bar, epoch=epoch)
            trajs.append(traj)
            pending.append(self._pool.submit(self._score, traj) if self._pool else self._score(traj))
        scored = self._collect(pending)
        rewards = torch.cat([r for r, _, _ in scored])
        self.logged_rewards = rewards  # what the records show: the reward, or the plain weighted sum of components
        traj = Trajectory.cat(trajs)
        if scored[0][1]:  # a weighted sum: log each component; recombine the epoch's components if normalised
            parts = {k: torch.cat([c[k] for _, c, _ in scored]) for k in scored[0][1]}
            rewards = self._combine_components(traj.prompts, parts, rewards)
        self.metric_means = {}
        if scored[0][2]:  # the reward's per-sample metrics (the flow-digits world's layout_correct): global means
            _, metrics, _ = self._gather_global(traj.prompts, {k: torch.cat([m[k] for _, _, m in scored]) for k in scored[0][2]})
            self.metric_means = {k: float(v.mean()) for k, v in metrics.items()}
        self.tracked_means = {}
        for name, fn in self.tracked.items():
            local = reward_values(name, fn(traj.images, traj.prompts, traj.metadata), len(traj))
            self.tracked_means[f"track_{name}"] = float(self._gather_rewards(local).mean())
        if self.cfg.reward.drop_nonfinite:
            keep = torch.isfinite(rewards)
            if not bool(keep.all()):
                self.dropped_samples += int((~keep).sum())
                if not bool(keep.any()):
                    raise RewardError(f"reward {reward_label(self.cfg)!r} returned no finite value in epoch {epoch}")
                traj, rewards = traj.index(torch.nonzero(keep).flatten()), rewards[keep]
                self.logged_rewards = self.logged_rewards[keep]
        return traj, rewards

    def _gather_global(self, prompts: list[str], values: dict[str, torch.Tensor]) -> tuple[list[str], dict, int]:
        """Every process's prompts and named per-sample values, concatenated in rank order, and where this
        process's samples start in them."""
        if not self.ctx.active:
            return list(prompts), values, 0
        gathered = self.ctx.all_gather_object((list(prompts), {k: v.tolist() for k, v in values.items()}))
        all_prompts = [p for ps, _ in gathered for p in ps]
        all_values = {k: torch.tensor([x for _, c in gathered for x in c[k]]) for k in values}
        return all_prompts, all_values, sum(len(ps) for ps, _ in gathered[: self.ctx.rank])

    def _combine_components(self, prompts: list[str], parts: dict, rewards: torch.Tensor) -> torch.Tensor:
        """Log the global mean of each component (reward_<label>); with reward.component_norm the rewards trained on
        become the weighted sum of components standardised over all processes' samples (this process's slice)."""
        all_prompts, all_parts, start = self._gather_global(prompts, parts)
        self.component_means = {f"reward_{k}": float(v[torch.isfinite(v)].mean()) for k, v in all_parts.items()}
        if self.reward_fn.norm == "none":
            return rewards
        return self.reward_fn.combine(all_parts, all_prompts)[start:start + len(prompts)]

    def _gather_rewards(self, rewards: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.as_tensor(r) for r in self.ctx.all_gather_object(rewards.tolist())]) if self.ctx.active else rewards

    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Advantages of this process's samples from statistics over all processes' samples."""
        if not self.ctx.active:
            return self.tracker.update(prompts, rewards) if self.tracker is not None else normalize(rewards)
        all_prompts, values, start = self._gather_global(prompts, {"r": rewards})
        all_rewards = values["r"]
        adv = self.tracker.update(all_prompts, all_rewards) if self.tracker is not None else normalize(all_rewards)
        return adv[start:start + len(prompts)]

    # ---- optimisation --------------------------------------------------------------------------
    def _optimizer_step(self) -> float:
        norm = self.engine.step()
        self.algo.after_optimizer_step(self.run_context, math.isfinite(norm))
        if not math.isfinite(norm):
            self.nonfinite_in_row += 1
            if self.nonfinite_in_row >= self.max_nonfinite_in_row:
                raise TrainingError(f"{self.nonfinite_in_row} optimiser steps in a row had non-finite gradients; "
                                    f"stopping (the last good checkpoint is in {self.run_dir / 'checkpoints'})")
        else:
            self.nonfinite_in_row = 0
        return norm

    def step_groups(self, n_minibatches: int, n_chunks: int) -> list[list[tuple[int, int]]]:
        """The optimiser steps of one inner epoch: each a list of (minibatch, chunk) units, in training order
        (``train.optimizer_step_every`` and ``train.gradient_accumulation_steps``)."""
        t = self.cfg.train
        units = [(m, c) for m in range(n_minibatches) for c in range(n_chunks)]
        if t.optimizer_step_every == "round":
            return [units]
        size = t.gradient_accumulation_steps * (n_chunks if t.optimizer_step_every == "minibatches" else 1)
        return [units[i:i + size] for i in range(0, len(units), size)]

    def _rows_per_epoch(self, traj: Trajectory) -> int:
        """The (sample, step) rows an epoch trains (the training bar's total): B x trained steps x inner epochs, a tree
        rollout's owned transitions only (exact when its trained steps are the same for every tree, as Flow-GRPO's are)."""
        steps = self.algo.train_steps(traj)
        n_train = self.algo.num_train_steps(steps.numel())
        rows = len(traj) * n_train
        if traj.tree is not None:
            owner = traj.tree.batch(len(traj), traj.num_steps)[1][:, steps]
            rows = round(float(owner.sum()) * n_train / max(steps.numel(), 1))
        return rows * self.cfg.train.num_inner_epochs

    def train_epoch(self, epoch: int, traj: Trajectory, data, bar=None, stop_flag: Callable[[], bool] = lambda: False) -> dict[str, float]:
        t = self.cfg.train
        self.model.denoiser.train()
        steps = self.algo.train_steps(traj)
        n_train = self.algo.num_train_steps(steps.numel())
        B, K = len(traj), min(t.chunk_size, n_train)
        n_chunks = math.ceil(n_train / K)
        if self.engine.steps_per_epoch is None:  # the learning-rate schedule's length (same on resume)
            planned = self.cfg.sample.batch_size * self.cfg.sample.num_batches_per_epoch
            self.engine.steps_per_epoch = t.num_inner_epochs * len(self.step_groups(math.ceil(planned / t.batch_size), n_chunks))
        totals: dict[str, torch.Tensor] = {}
        rows_seen = 0
        grad_norms = []
        for inner in range(t.num_inner_epochs):
            g = _generator(self.cfg.seed, epoch, 2, inner, self.ctx.rank)
            perm = self.algo.sample_order(B, data, g)
            order = self.algo.step_order(B, steps, n_train, g)
            if traj.tree is not None:  # each distinct transition of a tree once: the others become padding (-1)
                owner = traj.tree.batch(B, traj.num_steps)[1]
                keep = data.extra.get("tree_keep")  # BranchGRPO's pruning (sample.tree_prune_*): fewer of them
                order = owned_order(order, owner if keep is None else owner & keep)
            minibatches = self.algo.minibatches(perm, data)
            # rows of each (minibatch, chunk) unit, computed once per inner epoch: padding (-1) is no row
            valid = torch.nn.functional.pad((order >= 0).int(), (0, n_chunks * K - order.shape[1])).reshape(B, n_chunks, K).sum(2)
            unit_rows = [valid[mb].sum(0).tolist() for mb in minibatches]
            ctxs: dict[int, object] = {}
            for group in self.step_groups(len(minibatches), n_chunks):
                if stop_flag():
                    raise Interrupted()
                group_rows = sum(unit_rows[m][c] for m, c in group)
                for ui, (m, c) in enumerate(group):
                    mb = minibatches[m]
                    if c == 0:  # the algorithm's optional first pass over a minibatch
                        ctxs = {m: self.algo.begin_minibatch(self.run_context, traj, mb, order[mb], data)}
                    k0 = c * K
                    with self.engine.micro_step(ui == len(group) - 1):
                        chunk = pack_chunk(traj, mb, order[mb, k0:k0 + K], self.device, with_states=self.algo.trains_on_states)
                        rows = chunk.step_idx.numel()
                        chunk.col0, chunk.weight = k0, rows / group_rows
                        loss, stats = self.algo.chunk_loss(self.run_context, chunk, data, ctxs[m])
                        self.engine.backward(loss * chunk.weight)
                    rows_seen += rows
                    for k, v in {"loss": loss, **stats}.items():  # summed on the device: no host sync per chunk
                        v = v.detach() if torch.is_tensor(v) else torch.tensor(float(v))
                        totals[k] = totals[k] + v * rows if k in totals else v * rows
                    if bar is not None:
                        bar.update(rows)
                grad_norms.append(self._optimizer_step())
        out = self.ctx.means({k: v / max(rows_seen, 1) for k, v in totals.items()})
        finite = [n for n in grad_norms if math.isfinite(n)]
        out["grad_norm"] = sum(finite) / len(finite) if finite else float("nan")
        out["optimizer_steps"] = len(grad_norms)
        out["learning_rate"] = float(self.engine.optimizer.param_groups[0]["lr"])
        return out

    # ---- evaluation ----------------------------------------------------------------------------
    def grid_captions(self, traj: Trajectory, rewards: torch.Tensor, k: int) -> list[dict]:
        """Captions of the first ``k`` samples of ``traj`` for a labelled grid (``outputs.labelled_grid``): prompt and
        reward, and where the model has a classifier of what its prompts ask for (the built-in worlds' ``verdicts``)
        "slots": a (prompted digit, the classifier's top class) pair per digit the prompt asks for."""
        k = min(k, len(traj))
        caps = [{"prompt": p, "reward": float(v)} for p, v in zip(traj.prompts[:k], rewards[:k].tolist())]
        verdicts = getattr(self.model, "verdicts", None)
        if verdicts is not None and k:
            for cap, slots in zip(caps, verdicts(traj.images[:k], traj.metadata[:k] or [{}] * k)):
                if slots:  # not the unconditional prompt ""
                    cap["slots"] = [[int(t), int(p)] for t, p in slots]
        return caps

    @torch.no_grad()
    def evaluate(self, n: int, *, captions: bool = False):
        """Rewards and images of n fixed-seed samples (prompts round-robin), the same before and after training:
        (rewards [n], images [<= log.grid_samples, C, H, W]), and with ``captions=True`` also the images' captions
        (``grid_captions``: prompt, reward, the built-in worlds' classifier verdicts) as a third element. The reward's
        per-sample metrics of the n samples (``reward_metrics``) are left in ``self.eval_metrics`` ({name: [n]}).

        With several processes each takes every world_size-th sample (all run the same number of
        forwards, as ZeRO-3 requires); the images (and captions) returned are the main process's.
        """
        self.model.denoiser.eval()
        W, r = self.ctx.world_size, self.ctx.rank
        per_rank = math.ceil(n / W)
        ids = [r + W * i for i in range(per_rank)]  # ids >= n are padding, dropped below
        rewards, images, caps, metrics = [], [], [], []
        bs = self.cfg.sample.batch_size
        for start in range(0, per_rank, bs):
            chunk = ids[start:start + bs]
            traj = self._sample([self.prompts[i % len(self.prompts)] for i in chunk], [EVAL_SEED_BASE + i for i in chunk])
            scored, _, mets = self._collect([self._score(traj)])[0]
            rewards.append(scored)
            metrics.append(mets)
            keep = max(0, self.cfg.log.grid_samples - start)
            images.append(filmstrip(traj.images[:keep].cpu()))
            if captions and self.ctx.is_main:
                caps += self.grid_captions(traj, rewards[-1], keep)
        local = torch.cat(rewards)
        self.eval_metrics = {k: torch.cat([m[k] for m in metrics]) for k in (metrics[0] if metrics else {})}
        if W > 1:
            def in_sample_order(values: torch.Tensor) -> torch.Tensor:
                gathered = self.ctx.all_gather_object(values.tolist())
                by_id = {rank + W * i: v for rank, vals in enumerate(gathered) for i, v in enumerate(vals)}
                return torch.tensor([by_id[i] for i in range(n)])

            local = in_sample_order(local)
            self.eval_metrics = {k: in_sample_order(v) for k, v in self.eval_metrics.items()}
        else:
            self.eval_metrics = {k: v[:n] for k, v in self.eval_metrics.items()}
        return (local, torch.cat(images), caps) if captions else (local, torch.cat(images))

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, *, stop_flag: Callable[[], bool] = lambda: False,
            on_epoch: Optional[Callable[["Trainer", dict], None]] = None) -> dict:
        """Train to ``num_epochs``; ``on_epoch(trainer, record)`` runs after each epoch's record is logged (its time is
        not in the record's sample_time_s / train_time_s: benchmarks evaluate there off the clock).

        A reward server that keeps failing (after reward.retries) stops the run with TrainingError at the last
        checkpoint; no reward is ever replaced by a default."""
        try:
            return self._run(stop_flag, on_epoch)
        except RewardServiceError as exc:
            close_reward(self.reward_fn)  # the reward thread's pending batches stop retrying
            for fn in self.tracked.values():
                close_reward(fn)
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            raise TrainingError(f"{exc}. The run stopped {self.phase}; its last checkpoint (epoch {self.epoch}) is in "
                                f"{self.run_dir / 'checkpoints'}: resume once the server answers again") from exc
        finally:
            if self.ctx.is_main:
                self.logger.close()  # TensorBoard's writer and the W&B run

    def _run(self, stop_flag, on_epoch) -> dict:
        cfg = self.cfg
        main = self.ctx.is_main
        if main:
            self.logger.start()
        if self.epoch == 0:
            self.save()  # a checkpoint of the starting point: an interrupted first epoch resumes from here
        start = time.perf_counter()
        before = self.logger.load_eval("before")
        if before is None and cfg.log.eval_samples:
            self.phase = "in the evaluation before training"
            rewards, images, caps = self.evaluate(cfg.log.eval_samples, captions=True)
            before = self.logger.save_eval("before", rewards, images, caps, step=self.epoch, metrics=self.eval_metrics) if main else None
        if self.guard.enabled and not self.guard.state.history:  # the guard's starting point: best, diversity
            self.phase = "in the guard's evaluation before training"
            _, is_best, _ = self.guard.evaluate(self, 0)
            if main:
                if is_best and cfg.guard.keep_best and latest_checkpoint(self.run_dir) is not None:
                    keep_best_checkpoint(latest_checkpoint(self.run_dir))  # the base model, until an epoch beats it
                self.logger.save_guard(self.guard.state)
        bars = self.logger.bars(enabled=main)
        while self.epoch < cfg.num_epochs and self.guard.state.stopped is None:
            if stop_flag():
                return {"interrupted": True, "epoch": self.epoch}
            epoch = self.epoch
            self.phase = f"during epoch {epoch + 1}"
            self.memory.reset()
            t0 = time.perf_counter()
            passes0 = self.model.denoiser_passes
            self.model.denoiser.eval()
            with bars.sampling(epoch) as bar:
                traj, rewards = self.sample_epoch(epoch, bar)
            t1 = time.perf_counter()
            data = self.algo.prepare(self.run_context, traj, rewards)
            try:
                with bars.training(epoch, self._rows_per_epoch(traj)) as bar:
                    stats = self.train_epoch(epoch, traj, data, bar, stop_flag)
            except Interrupted:
                return {"interrupted": True, "epoch": self.epoch}
            t2 = time.perf_counter()
            passes = self.model.denoiser_passes - passes0
            self.denoiser_passes += sum(self.ctx.all_gather_object(passes)) if self.ctx.active else passes
            stats.update(data.extra.get("log", {}) if data is not None else {})
            stats.update(self.tracked_means)
            stats.update(self.component_means)
            stats.update(self.metric_means)
            stats.update(self.algo.after_epoch(self.run_context, epoch))
            self.epoch += 1
            all_rewards = self._gather_rewards(self.logged_rewards)  # not the normalised components' sum
            is_best = stop = False
            if self.guard.due(self.epoch, self.epoch == cfg.num_epochs):  # off the clock, as the evaluations are
                self.phase = f"in the guard's evaluation after epoch {self.epoch}"
                guard_stats, is_best, stop = self.guard.evaluate(self, self.epoch, train_reward=float(all_rewards.mean()))
                stats.update(guard_stats)
            n_global = len(traj) * self.ctx.world_size
            record = {
                "epoch": self.epoch, "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std(unbiased=False)),
                **stats, "samples": n_global, "sample_time_s": t1 - t0, "train_time_s": t2 - t1,
                "samples_per_s": n_global / (t2 - t0), "rollout_samples_per_s": n_global / (t1 - t0),
                "train_samples_per_s": n_global * cfg.train.num_inner_epochs / max(t2 - t1, 1e-9),
                "peak_mem_mb": self.memory.peak_mb(), "skipped_steps": self.skipped_steps,
                "dropped_samples": self.dropped_samples, "denoiser_passes": self.denoiser_passes,
            }
            if main:
                # a few of the epoch's samples as a labelled grid, only when TensorBoard or W&B takes it
                k = cfg.log.grid_samples if self.logger.wants_images else 0
                samples = (filmstrip(traj.images[:k].cpu()), self.grid_captions(traj, self.logged_rewards, k)) if k else None
                self.logger.log_epoch(record, samples)
            if on_epoch is not None:
                on_epoch(self, record)
            path = self.save()
            if main and self.guard.enabled:
                if is_best and cfg.guard.keep_best and path is not None:
                    keep_best_checkpoint(path)
                self.logger.save_guard(self.guard.state)
            if stop:
                self.log_fn(f"guard: stopping after epoch {self.epoch}: {self.guard.state.stopped}")
        wall = time.perf_counter() - start
        after = None
        if cfg.log.eval_samples:
            self.phase = "in the evaluation after training"
            rewards, images, caps = self.evaluate(cfg.log.eval_samples, captions=True)
            after = self.logger.save_eval("after", rewards, images, caps, step=self.epoch, metrics=self.eval_metrics) if main else None
        if self.engine.kind == "fsdp":  # whole weights gathered onto rank 0 (collective)
            full = self.engine.full_state(trainable_only=self.model.lora)
            weights_path = save_final_weights(self.model, self.run_dir, state_dict=full) if main else None
        else:
            with self.engine.gathered():
                weights_path = save_final_weights(self.model, self.run_dir) if main else None
        summary = write_summary(self.run_dir, cfg, self.logger.records(), before, after, weights_path, wall,
                                guard=self.guard.state if self.guard.enabled else None) if main else {}
        self.ctx.barrier()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.guard.close()
        return summary
