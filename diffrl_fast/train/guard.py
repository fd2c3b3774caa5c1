"""Guards against reward hacking, watched during every run: a held-out reward, within-prompt diversity and drift
from the base model, on a fixed-seed evaluation batch every ``guard.every`` epochs; an early stop when the held-out
reward turns down (or diversity collapses), and the checkpoint with the best held-out reward kept.

Each guard evaluation samples ``guard.samples`` images (``guard.samples_per_prompt`` fixed seeds for each of
``guard.samples // guard.samples_per_prompt`` fixed prompts spread over the run's prompts), with the evaluation's
sampler settings (log.eval_num_steps, log.eval_guidance_scale), and computes:

- ``guard_heldout`` (and ``guard_heldout_<label>`` per held-out reward): the mean of each guard.heldout_reward over the
  batch, never optimised; its standard error std / sqrt(n) beside it;
- ``guard_reward``: the training reward on the same batch (the fixed-seed view of what training optimises);
- ``guard_diversity``: the mean pairwise distance between the images of the same prompt, averaged over prompts. In
  pixel space (images of at most 64 pixels a side: the embedded worlds): L2 per pixel, images in [0, 1]. In an image
  encoder's feature space (``guard.diversity_encoder``; by default for larger images, SD-size ones, whenever the
  training or a held-out reward loads an encoder: CLIP for aesthetic / clip_score / PickScore, HPS's): the cosine
  distance 1 - cos(e_i, e_k) of the encoder's embeddings, which compares content, not pixel noise. Without an encoder,
  larger images are area-downsampled to 64 pixels a side and compared in pixels. guard.json names the space used;
- ``guard_drift``: the mean over the batch's rows (sample, stochastic step; up to ``guard.drift_steps`` evenly spaced
  steps) of the exact KL between the policy's and the reference policy's step Gaussians, |mean_theta - mean_ref|^2 /
  (2 s^2) averaged over latent elements, on the batch's own states (no second rollout).

The stop rule (``guard.stop``), with m_k the held-out mean of evaluation k and k* the best so far:

    a fall:  m_k < m_{k*} - guard.tolerance x se_k,  se_k = std_k / sqrt(n) the evaluation's own standard error over
             its n fixed-seed samples (not the paired one of the differences, which would call every real change of
             the policy a fall);
    stop when the last guard.patience evaluations were all falls, or when diversity < guard.min_diversity x its
    value before training. Falls count only once a trained epoch has beaten the pre-training evaluation (a best at
    epoch 1 or later): a dip below the start before any gain is not reward hacking, and D3PO on the digits world and
    every method on the flow world dip first (guard.stop_from_start=true counts them too).

A held-out reward that fails (raises, returns NaN or the wrong shape, its server is down) never stops training:
each evaluation prints a warning naming it, and summary.md marks it unavailable.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch

GUARD_SEED_BASE = 1_000_500_007  # guard seeds: this + i, 500000 past the before/after evaluation's (trainer.EVAL_SEED_BASE)


def spec_label(spec: Any) -> str:
    """A held-out reward spec as a short label: its name, or "a+b" for a weighted sum."""
    if isinstance(spec, str):
        return spec.rstrip("/").split("/")[-1].split(":")[-1] or spec
    return "+".join(str(c.get("label") or c["name"]) if isinstance(c, dict) else str(c) for c in spec)


def within_prompt_diversity(images: torch.Tensor, prompts: list, max_side: int = 64, embed=None) -> float:
    """Mean pairwise distance between the images of the same prompt (or any other group key in ``prompts``), averaged
    over groups with two or more images, each group's mean over its n (n - 1) ordered pairs; images [N, C, H, W] in [0, 1].

    Pixels (``embed=None``), area-downsampled so that no side exceeds ``max_side``: d(i, k) = |x_i - x_k|_2 / sqrt(pixels).
    Features (``embed``: images -> [N, d], an image encoder such as a reward's ``embed``): the cosine distance
    d(i, k) = 1 - e_i . e_k / (|e_i| |e_k|), in [0, 2]."""
    if embed is not None:
        with torch.no_grad():
            feats = embed(images).detach().double().cpu()
        if feats.ndim != 2 or feats.shape[0] != images.shape[0]:
            raise ValueError(f"an image encoder returned shape {tuple(feats.shape)} for {images.shape[0]} images; expected [N, d]")
        flat = feats / torch.linalg.vector_norm(feats, dim=1, keepdim=True).clamp(min=1e-12)
    else:
        x = images.detach().float().cpu()
        if max(x.shape[-2:]) > max_side:
            f = max_side / max(x.shape[-2:])
            x = torch.nn.functional.interpolate(x, size=(max(1, round(x.shape[-2] * f)), max(1, round(x.shape[-1] * f))), mode="area")
        flat = x.flatten(1).double()
    per_prompt = []
    for p in dict.fromkeys(prompts):
        idx = [i for i, q in enumerate(prompts) if q == p]
        if len(idx) < 2:
            continue
        if embed is not None:
            d = 1.0 - flat[idx] @ flat[idx].T
            d.fill_diagonal_(0.0)
        else:
            d = torch.cdist(flat[idx], flat[idx]) / math.sqrt(flat.shape[1])
        per_prompt.append(float(d.sum()) / (len(idx) * (len(idx) - 1)))
    return sum(per_prompt) / len(per_prompt) if per_prompt else float("nan")


@dataclasses.dataclass
class GuardState:
    """What the guard remembers across evaluations (and checkpoints): the best held-out evaluation, the falls in a row, the diversity before training, and every evaluation's summary."""

    best: Optional[float] = None
    best_epoch: Optional[int] = None
    best_reward: Optional[float] = None  # the training reward (the epoch's mean) at the best evaluation
    falls: int = 0
    diversity0: Optional[float] = None
    stopped: Optional[str] = None  # why the guard stopped the run
    stopped_epoch: Optional[int] = None
    unavailable: dict = dataclasses.field(default_factory=dict)  # label -> the last error
    history: list = dataclasses.field(default_factory=list)
    diversity_space: Optional[str] = None  # "pixels" or "features of <reward>": guard_diversity's space

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "GuardState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in known})


def decide(state: GuardState, epoch: int, values: Optional[torch.Tensor], diversity: float, *, tolerance: float, patience: int,
           min_diversity: float, train_reward: Optional[float] = None, from_start: bool = False) -> tuple[bool, bool]:
    """Update ``state`` with evaluation ``epoch`` (``values``: the primary held-out reward per seed, None when it is
    unavailable) and return (is_best, stop). See the module docstring for the rule."""
    m = se = None
    if values is not None and values.numel():
        v = values.double()
        m, se = float(v.mean()), float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
    return decide_stats(state, epoch, m, se, diversity, tolerance=tolerance, patience=patience, min_diversity=min_diversity,
                        train_reward=train_reward, from_start=from_start)


def decide_stats(state: GuardState, epoch: int, m: Optional[float], se: Optional[float], diversity: float, *, tolerance: float,
                 patience: int, min_diversity: float, train_reward: Optional[float] = None, from_start: bool = False) -> tuple[bool, bool]:
    """``decide`` on an evaluation's held-out mean ``m`` and standard error ``se`` (None: unavailable), as guard.json
    records them: the stop rule replayed on a logged history gives the trainer's decisions."""
    is_best = stop = False
    se = se if se is not None and math.isfinite(se) else 0.0
    if m is not None:
        if state.best is None or m > state.best:
            state.best, state.best_epoch, state.best_reward = m, epoch, train_reward
            state.falls, is_best = 0, True
        else:
            counts = from_start or (state.best_epoch or 0) >= 1
            state.falls = state.falls + 1 if counts and m < state.best - tolerance * se else 0
            if patience and state.falls >= patience:
                stop = True
                state.stopped = (f"the held-out reward fell below its best ({state.best:+.4f}, epoch {state.best_epoch}) by more "
                                 f"than {tolerance:g} standard errors in {state.falls} evaluations in a row (now {m:+.4f})")
    if math.isfinite(diversity):
        if state.diversity0 is None:
            state.diversity0 = diversity
        elif min_diversity > 0 and diversity < min_diversity * state.diversity0 and not stop:
            stop = True
            state.stopped = (f"within-prompt diversity fell to {diversity:.4f}, below {min_diversity:g} x its value before "
                             f"training ({state.diversity0:.4f})")
    if stop:
        state.stopped_epoch = epoch
    return is_best, stop


class Guard:
    """The guard of one training run (``Trainer.guard``); ``evaluate`` runs one guard evaluation."""

    def __init__(self, cfg, reward_cfg, log_fn=print) -> None:
        from ..rewards import RewardError, build_reward

        self.cfg, self.log = cfg, log_fn
        self.state = GuardState()
        self.rewards: dict[str, Any] = {}
        for spec in cfg.heldout_reward:
            label = spec_label(spec)
            if isinstance(spec, list):  # a weighted sum: [a, b] means weights 1, as reward.name
                spec = [{"name": c} if isinstance(c, str) else c for c in spec]
            try:  # a broken held-out reward is a warning, never a stopped run
                self.rewards[label] = build_reward(dataclasses.replace(reward_cfg, name=spec, kwargs={}))
            except (RewardError, ValueError, ImportError, OSError) as exc:
                self.rewards[label] = None
                self.state.unavailable[label] = f"{type(exc).__name__}: {exc}"
                log_fn(f"warning: guard held-out reward {label!r} is unavailable ({exc}); training goes on without it")
        self.primary = spec_label(cfg.heldout_reward[0]) if cfg.heldout_reward else None
        self._embed: Any = None  # resolved at the first evaluation (it depends on the image size)
        name = cfg.diversity_encoder
        if self.enabled and cfg.diversity and name not in ("auto", "pixels"):  # a named encoder: its mistakes are config errors
            fn = self.rewards.get(name) or build_reward(dataclasses.replace(reward_cfg, name=name, kwargs=reward_cfg.kwargs
                                                                            if name == reward_cfg.name else {}))
            if getattr(fn, "embed", None) is None:
                raise ValueError(f"guard.diversity_encoder={name!r}: that reward has no image encoder; name one that has "
                                 "(aesthetic, clip_score, hpsv2, digit_confidence, digit_layout), or use 'auto' or 'pixels'")
            self._embed = (f"features of {name}", fn.embed)

    @property
    def enabled(self) -> bool:
        """On when a held-out reward is named and guard.every > 0 (diversity and drift come with it)."""
        return self.cfg.every > 0 and bool(self.cfg.heldout_reward)

    def close(self) -> None:
        from ..rewards import close_reward

        for fn in self.rewards.values():
            if fn is not None:
                close_reward(fn)

    def due(self, epoch: int, last: bool) -> bool:
        """Whether epoch ``epoch`` (1-based, completed) ends with a guard evaluation: every guard.every epochs and the last."""
        return self.enabled and (epoch % self.cfg.every == 0 or last)

    def batch(self, prompts: list[str]) -> tuple[list[str], list[int]]:
        """The fixed (prompts, seeds) of every guard evaluation: samples_per_prompt seeds of evenly spread prompts."""
        k = self.cfg.samples_per_prompt
        n_prompts = max(1, self.cfg.samples // k)
        picks = [prompts[(i * len(prompts)) // n_prompts] for i in range(n_prompts)] if len(prompts) >= n_prompts else \
            [prompts[i % len(prompts)] for i in range(n_prompts)]
        return [p for p in picks for _ in range(k)], [GUARD_SEED_BASE + i for i in range(n_prompts * k)]

    def _score(self, label: str, fn, traj) -> Optional[torch.Tensor]:
        from ..rewards import reward_values

        try:
            values = reward_values(label, fn(traj.images, traj.prompts, traj.metadata), len(traj))  # finite, [B]
            self.state.unavailable.pop(label, None)
            return values.double().cpu()
        except Exception as exc:  # noqa: BLE001 -- any failure of a guard reward is a warning, by design
            self.state.unavailable[label] = f"{type(exc).__name__}: {exc}"
            self.log(f"warning: guard held-out reward {label!r} failed this evaluation ({type(exc).__name__}: {exc}); "
                     "training goes on, and summary.md marks it unavailable")
            return None

    @torch.no_grad()
    def evaluate(self, trainer, epoch: int, train_reward: Optional[float] = None) -> tuple[dict[str, float], bool, bool]:
        """One guard evaluation after ``epoch`` epochs (0: before training): (metrics for the epoch's record, is_best,
        stop). Every process samples the same batch (a sharded model needs all of them in each forward); the main
        process's figures decide, and every process receives its decision."""
        prompts, seeds = self.batch(trainer.prompts)
        trainer.model.denoiser.eval()
        trajs, bs = [], trainer.cfg.sample.batch_size
        for i in range(0, len(prompts), bs):
            trajs.append(trainer._sample(prompts[i:i + bs], seeds[i:i + bs]))
        out: dict[str, float] = {}
        primary_values = None
        images = torch.cat([t.images.cpu() for t in trajs])
        if images.dim() == 5:  # videos [N, F, 3, H, W]: a sample's frames compared together, as channels
            images = images.flatten(1, 2)
        for label, fn in self.rewards.items():
            if fn is None:
                continue
            parts = [self._score(label, fn, t) for t in trajs]
            if any(p is None for p in parts):
                continue
            v = torch.cat(parts)
            out[f"guard_heldout_{label}"] = float(v.mean())
            out[f"guard_heldout_{label}_se"] = float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")
            if label == self.primary:
                primary_values = v
                out["guard_heldout"], out["guard_heldout_se"] = out[f"guard_heldout_{label}"], out[f"guard_heldout_{label}_se"]
        train = [trainer._score(t)[0] for t in trajs]  # the training reward on the fixed batch
        out["guard_reward"] = float(torch.cat(train).double().mean())
        diversity = float("nan")
        if self.cfg.diversity:
            space, embed = self.diversity_encoder(trainer, images)
            self.state.diversity_space = space
            diversity = within_prompt_diversity(images, prompts, embed=embed)
            out["guard_diversity"] = diversity
        if self.cfg.drift and trainer.has_reference:
            out["guard_drift"] = self._drift(trainer, trajs)
        if trainer.ctx.active:  # the main process's figures and decision are every process's
            out, primary_values = trainer.ctx.all_gather_object((out, primary_values))[0]
            diversity = out.get("guard_diversity", float("nan"))
        is_best, stop = decide(self.state, epoch, primary_values, diversity, tolerance=self.cfg.tolerance,
                               patience=self.cfg.patience if self.cfg.stop else 0,
                               min_diversity=self.cfg.min_diversity if self.cfg.stop else 0.0, train_reward=train_reward,
                               from_start=self.cfg.stop_from_start)
        self.state.history.append({"epoch": epoch, **out})
        return out, is_best, stop

    def diversity_encoder(self, trainer, images: torch.Tensor):
        """(space, embed) of guard_diversity: guard.diversity_encoder's reward's encoder; with 'auto', for images larger
        than 64 pixels a side, the first encoder among the training reward's and the held-out rewards' (None: pixels)."""
        if self._embed is None:
            self._embed = ("pixels", None)
            if self.cfg.diversity_encoder == "auto" and max(images.shape[-2:]) > 64:
                candidates = [(trainer.cfg.reward.name, trainer.reward_fn), *self.rewards.items()]
                for name, fn in candidates:
                    if getattr(fn, "embed", None) is not None:
                        self._embed = (f"features of {spec_label(name)}", fn.embed)
                        break
        return self._embed

    def _drift(self, trainer, trajs) -> float:
        """Mean exact per-step KL(policy || reference) over the guard batch's rows at up to guard.drift_steps evenly
        spaced stochastic steps (two denoiser passes per row: the policy's and the reference's)."""
        from ..algos.common import chunk_kl, policy_outputs
        from ..diffusion.recompute import pack_chunk, trainable_steps

        run, total, rows = trainer.run_context, 0.0, 0
        K = max(1, trainer.cfg.train.chunk_size)
        for traj in trajs:
            steps = trainable_steps(traj)
            if steps.numel() > self.cfg.drift_steps:
                steps = steps[torch.linspace(0, steps.numel() - 1, self.cfg.drift_steps).round().long()]
            idx = torch.arange(len(traj))
            for k0 in range(0, steps.numel(), K):
                chunk = pack_chunk(traj, idx, steps[k0:k0 + K].repeat(len(traj), 1), trainer.device)
                eps_u, eps_c = policy_outputs(run, chunk)
                kl = chunk_kl(run, chunk, eps_u, eps_c, "exact")
                total += float(kl.double().sum())
                rows += kl.numel()
        return total / max(rows, 1)
