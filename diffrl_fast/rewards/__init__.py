"""Reward registry: ``fn(images, prompts, metadata) -> (rewards, info)``, looked up by name or dotted path.

- images:   float tensor [B, C, H, W] in [0, 1] (C = 1 or 3), on any device; for a video model (Wan) videos
            [B, F, 3, H, W], which only a reward marked ``video = True`` takes (rewards/video.py)
- prompts:  list of B strings
- metadata: list of B dicts (e.g. {"class_id": 7} in the digits world)
- returns:  rewards, a float tensor [B] (any device), and a dict of extra statistics; its optional
            "per_sample" entry, {name: tensor [B]}, holds per-sample metrics the trainer logs beside the
            reward (epoch means, and the before/after evaluation's mean and standard error), e.g. the
            flow-digits world's layout_correct

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

from .values import RewardError, check_rewards, reward_metrics, reward_values  # noqa: F401  (re-exported)

RewardFn = Callable[[torch.Tensor, list, list], "tuple[torch.Tensor, dict]"]

_FACTORIES: dict[str, Callable[..., RewardFn]] = {}
_BUILTIN_MODULES = ("jpeg", "brightness", "digits", "layout", "clip", "hps", "image_reward", "video")


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

        return _call_factory(spec, RemoteReward, spec, **kwargs)
    _load_builtins()
    if spec in _FACTORIES:
        return _call_factory(spec, _FACTORIES[spec], **kwargs)
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
        return _call_factory(spec, fn, **kwargs)
    try:
        n_params = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        n_params = 3
    return fn if n_params >= 3 else fn()


def _call_factory(spec: str, factory, *args, **kwargs):
    """``factory(*args, **kwargs)``; keyword arguments it does not take are the user's error: a RewardError naming
    the reward and what it takes (an error inside the factory itself propagates unchanged)."""
    try:
        inspect.signature(factory).bind(*args, **kwargs)
    except TypeError as exc:
        try:
            takes = [p for p in inspect.signature(factory).parameters][len(args):]
        except (TypeError, ValueError):
            takes = []
        raise RewardError(f"reward {spec!r} given keyword arguments {sorted(kwargs)}: {exc}; it takes {takes}") from None
    except ValueError:  # no signature to check (a builtin): call it and let it complain
        pass
    return factory(*args, **kwargs)


COMPONENT_KEYS = ("name", "weight", "kwargs", "label")
COMPONENT_NORMS = ("none", "batch", "prompt")
RESERVED_LABELS = ("mean", "std")  # reward_mean / reward_std are the summed reward's statistics


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
        if norm not in COMPONENT_NORMS:
            raise RewardError(f"reward.component_norm {norm!r} is not one of {list(COMPONENT_NORMS)}")
        labels = [label for label, _, _ in components]
        if len(set(labels)) != len(labels):
            raise RewardError(f"reward components share a name ({labels}): give each a distinct 'label'")
        reserved = [label for label in labels if label in RESERVED_LABELS]
        if reserved:
            raise RewardError(f"reward component label {reserved[0]!r} would be logged as reward_{reserved[0]}, which is the "
                              f"summed reward's statistic: give it another 'label'")
        self.components, self.norm, self.allow_nonfinite = components, norm, allow_nonfinite
        self.name = " + ".join(f"{w:g} {label}" for label, w, _ in components)

    def __call__(self, images, prompts, metadata):
        parts = {label: reward_values(label, fn(images, prompts, metadata), len(prompts), self.allow_nonfinite)
                 for label, _, fn in self.components}
        return self.combine(parts, prompts, norm="none"), {"components": parts}

    def combine(self, parts: dict, prompts: list, norm: Optional[str] = None) -> torch.Tensor:
        """sum_i w_i n(r_i) over the components ``parts`` {label: [N]} of samples with ``prompts``; n is the
        identity or the standardisation of ``norm`` (default: this reward's), over each component's finite values
        (a sample whose component is NaN/inf stays so, and reward.drop_nonfinite drops it)."""
        from ..train.advantages import group_normalize

        norm = self.norm if norm is None else norm
        total = torch.zeros(len(prompts), dtype=torch.float32)
        for label, w, _ in self.components:
            r = parts[label].float().clone()
            if norm != "none":  # "batch": one group of every sample; "prompt": a group per prompt
                ok = torch.isfinite(r)
                keys = [prompts[i] if norm == "prompt" else 0 for i in range(len(prompts)) if ok[i]]
                if keys:
                    r[ok] = group_normalize(r[ok], keys, eps=1e-8)
            total = total + w * r
        return total

    def close(self) -> None:
        """Stop every component that holds a connection (reward servers): requests in flight end, none start."""
        for _, _, fn in self.components:
            close_reward(fn)


def close_reward(fn) -> None:
    """Close a reward that holds resources (a reward server's client, a weighted sum of them); others: nothing."""
    close = getattr(fn, "close", None)
    if callable(close):
        close()


def read_token(path: str) -> str:
    """The shared token in file ``path`` (a reward server's --token-file, a client's reward.token_file), stripped;
    RewardError naming the file when it is missing or empty."""
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise RewardError(f"token file {path} does not exist: write the reward server's shared token into it (one line)")
    token = p.read_text().strip()
    if not token or any(c.isspace() for c in token):
        raise RewardError(f"token file {path} must hold one token: a single line without spaces")
    return token


def remote_settings(reward_cfg) -> dict:
    """The reward.* client settings a reward server's client (RemoteReward) takes."""
    return {"timeout_s": reward_cfg.timeout_s, "retries": reward_cfg.retries, "backoff_s": reward_cfg.backoff_s,
            "image_format": reward_cfg.remote_format, "batch_size": reward_cfg.remote_batch_size,
            "allow_nonfinite": reward_cfg.drop_nonfinite,
            "token": read_token(reward_cfg.token_file) if reward_cfg.token_file else None}


def build_one(name: str, kwargs: dict, reward_cfg) -> RewardFn:
    """One reward by name; a URL's client gets the reward.* settings, overridden by its own ``kwargs``."""
    if name.startswith(("http://", "https://")):
        return get_reward(name, **{**remote_settings(reward_cfg), **kwargs})
    return get_reward(name, **kwargs)


def build_reward(reward_cfg) -> RewardFn:
    """The reward ``reward.name`` names: one reward (a name, dotted path or URL, with ``reward.kwargs``), or for a
    list of {name, weight, kwargs, label} a :class:`WeightedReward`. Every reward server's health is checked before
    any local reward model loads."""
    spec = reward_cfg.name
    if isinstance(spec, str):
        return build_one(spec, reward_cfg.kwargs, reward_cfg)
    remote_first = sorted(range(len(spec)), key=lambda i: not spec[i]["name"].startswith(("http://", "https://")))
    built: dict[int, RewardFn] = {}
    try:
        for i in remote_first:
            built[i] = build_one(spec[i]["name"], spec[i].get("kwargs") or {}, reward_cfg)
    except BaseException:
        for fn in built.values():
            close_reward(fn)
        raise
    components = [(component_label(c, built[i]), float(c.get("weight", 1.0)), built[i]) for i, c in enumerate(spec)]
    return WeightedReward(components, reward_cfg.component_norm, allow_nonfinite=reward_cfg.drop_nonfinite)
