"""Reward registry: ``fn(images, prompts, metadata) -> (rewards, info)``, looked up by name or dotted path.

- images:   float tensor [B, C, H, W] in [0, 1] (C = 1 or 3), on any device
- prompts:  list of B strings
- metadata: list of B dicts (e.g. {"class_id": 7} in the digits world)
- returns:  rewards, a float tensor [B] (any device), and a dict of extra per-batch statistics to log

Built-in rewards register a *factory* with ``@register("name")``; ``get_reward("name", **kwargs)``
calls it. A user's reward is named by an explicit dotted path "package.module:function" (never
discovered implicitly); that function is either a factory (called with the kwargs) or, when no kwargs
are given and it takes three arguments, the reward function itself.
"""
from __future__ import annotations

from .._extras import require_train

require_train("diffrl_fast.rewards")

import importlib
import inspect
from typing import Callable

import torch

RewardFn = Callable[[torch.Tensor, list, list], "tuple[torch.Tensor, dict]"]

_FACTORIES: dict[str, Callable[..., RewardFn]] = {}
_BUILTIN_MODULES = ("jpeg", "digits", "clip")


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
    """The reward function named ``spec``: a registered name, or "package.module:function"."""
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
