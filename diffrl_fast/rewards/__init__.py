"""Reward registry: ``fn(images, prompts, metadata) -> (rewards, info)``, looked up by name or dotted path.

- images:   float tensor [B, C, H, W] in [0, 1] (C = 1 or 3), on any device
- prompts:  list of B strings
- metadata: list of B dicts (e.g. {"class_id": 7} in the digits world)
- returns:  rewards, a float tensor [B] (any device), and a dict of extra per-batch statistics to log

Built-in rewards register a *factory* with ``@register("name")``; ``get_reward("name", **kwargs)``
calls it. A user's reward is named by an explicit dotted path "package.module:function" (never
discovered implicitly); that function is either a factory (called with the kwargs) or, when no kwargs
are given and it takes three arguments, the reward function itself. "http://HOST:PORT" names a reward
served by ``diffrl-fast reward-server`` (rewards/remote.py).

``build_reward(reward_config)`` builds what ``reward.name`` names: one reward, or a weighted sum of several
(:class:`WeightedReward`, local and remote mixed).
"""
from __future__ import annotations

from .._extras import require_train

require_train("diffrl_fast.rewards")

import importlib
import inspect
from typing import Callable, Optional

import torch

RewardFn = Callable[[torch.Tensor, list, list], "tuple[torch.Tensor, dict]"]

_FACTORIES: dict[str, Callable[..., RewardFn]] = {}
_BUILTIN_MODULES = ("jpeg", "digits", "clip", "hps", "image_reward")


class RewardError(ValueError):
    """A reward function returned something unusable, or could not be found."""


def register(name: str):
    """Decorator registering a reward factory under ``name``."""

    def wrap(factory):
        if name in _FACTORIES:
            raise ValueError(f"reward {name!r} is registered twice")
        _FACTORIES[name] = factory
        return factory

    return wrap


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module}":
                raise


def available_rewards() -> list[str]:
    _load_builtins()
    return sorted(_FACTORIES)


def get_reward(spec: str, **kwargs) -> RewardFn:
    """The reward function named ``spec``: a registered name, "package.module:function", or "http://HOST:PORT" (a
    reward server; kwargs go to :class:`~diffrl_fast.rewards.remote.RemoteReward`)."""
    if spec.startswith(("http://", "https://")):
        from .remote import RemoteReward

        return RemoteReward(spec, **kwargs)
    _load_builtins()
    if spec in _FACTORIES:
        return _FACTORIES[spec](**kwargs)
    if ":" not in spec:
        import difflib

        close = difflib.get_close_matches(spec, _FACTORIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RewardError(
            f"unknown reward {spec!r}{hint}; built-in rewards: {sorted(_FACTORIES)}, "
            "or give your own as 'package.module:function'"
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"cannot import reward module {module_name!r} from {spec!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise RewardError(f"{module_name!r} has no callable {attr!r} (from reward spec {spec!r})")
    if kwargs:
        return fn(**kwargs)
    try:
        n_params = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        n_params = 3
    return fn if n_params >= 3 else fn()


def check_rewards(name: str, rewards, batch: int) -> torch.Tensor:
    """Validate a reward function's output: a finite float tensor of shape [batch]. Raises RewardError."""
    if isinstance(rewards, (list, tuple)):
        rewards = torch.as_tensor(rewards)
    if not isinstance(rewards, torch.Tensor):
        raise RewardError(f"reward {name!r} returned {type(rewards).__name__}; expected a tensor of shape [{batch}]")
    if rewards.shape != (batch,):
        raise RewardError(f"reward {name!r} returned shape {tuple(rewards.shape)}; expected [{batch}] (one reward per image)")
    rewards = rewards.detach().float()
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        raise RewardError(
            f"reward {name!r} returned {int(bad.sum())} non-finite values (at indices {bad.nonzero().flatten().tolist()[:8]})"
        )
    return rewards


COMPONENT_KEYS = ("name", "weight", "kwargs", "label")


def component_label(spec: dict, fn=None) -> str:
    """The name a component is logged under (reward_<label>): its ``label``, else the reward's name (a remote
    reward's: the server's reward name)."""
    if spec.get("label"):
        return str(spec["label"])
    return str(getattr(fn, "name", None) or spec["name"])


class WeightedReward:
    """A weighted sum of rewards (multi-reward objectives: DanceGRPO's HPS + CLIP, Flow-GRPO's multi-score):

        r = sum_i w_i r_i                                     (component_norm = "none")
        r = sum_i w_i (r_i - mean(r_i)) / (std(r_i) + 1e-8)   ("batch": over the epoch's samples; "prompt": over
                                                               each prompt's samples, as DanceGRPO's per-reward
                                                               group advantages)

    Called on a batch it returns (r, {"components": {label: r_i}}) with the plain weighted sum; the trainer logs each
    component and, for a normalisation, recombines the whole epoch's components with :meth:`combine`.
    """

    def __init__(self, components: list[tuple[str, float, RewardFn]], norm: str = "none", allow_nonfinite: bool = False):
        if norm not in ("none", "batch", "prompt"):
            raise RewardError(f"reward.component_norm {norm!r} is not one of none, batch, prompt")
        labels = [label for label, _, _ in components]
        if len(set(labels)) != len(labels):
            raise RewardError(f"reward components share a name ({labels}): give each a distinct 'label'")
        self.components, self.norm, self.allow_nonfinite = components, norm, allow_nonfinite
        self.name = " + ".join(f"{w:g} {label}" for label, w, _ in components)

    def __call__(self, images, prompts, metadata):
        parts = {}
        for label, _, fn in self.components:
            out = fn(images, prompts, metadata)
            if not isinstance(out, tuple) or len(out) != 2:
                raise RewardError(f"reward {label!r} must return (rewards, info), got {type(out).__name__}")
            r = out[0]
            if self.allow_nonfinite:  # reward.drop_nonfinite: the trainer drops the samples
                r = torch.as_tensor(r).detach().float().reshape(-1).cpu()
                if r.shape != (len(prompts),):
                    check_rewards(label, r, len(prompts))
                parts[label] = r
            else:
                parts[label] = check_rewards(label, r, len(prompts)).cpu()
        return self.combine(parts, prompts, norm="none"), {"components": parts}

    def combine(self, parts: dict, prompts: list, norm: Optional[str] = None) -> torch.Tensor:
        """sum_i w_i n(r_i) over the components ``parts`` {label: [N]} of samples with ``prompts``; n is the
        identity or the standardisation of ``norm`` (default: this reward's)."""
        from ..train.advantages import group_normalize

        norm = self.norm if norm is None else norm
        total = torch.zeros(len(prompts), dtype=torch.float32)
        for label, w, _ in self.components:
            r = parts[label].float()
            if norm != "none":  # "batch": one group of every sample; "prompt": a group per prompt
                r = group_normalize(r, prompts if norm == "prompt" else [0] * len(prompts), eps=1e-8)
            total = total + w * r
        return total


def build_reward(reward_cfg) -> RewardFn:
    """The reward ``reward.name`` names: one reward (a name, dotted path or URL, with ``reward.kwargs``), or for a
    list of {name, weight, kwargs, label} a :class:`WeightedReward`. URLs get the reward.* client settings."""
    remote = {"timeout_s": reward_cfg.timeout_s, "retries": reward_cfg.retries, "backoff_s": reward_cfg.backoff_s,
              "image_format": reward_cfg.remote_format, "batch_size": reward_cfg.remote_batch_size}

    def one(name, kwargs):
        if name.startswith(("http://", "https://")):
            return get_reward(name, **remote, **kwargs)
        return get_reward(name, **kwargs)

    spec = reward_cfg.name
    if isinstance(spec, str):
        return one(spec, reward_cfg.kwargs)
    components = []
    for i, c in enumerate(spec):
        fn = one(c["name"], c.get("kwargs") or {})
        components.append((component_label(c, fn), float(c.get("weight", 1.0)), fn))
    return WeightedReward(components, reward_cfg.component_norm, allow_nonfinite=reward_cfg.drop_nonfinite)
