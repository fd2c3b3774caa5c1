"""What a reward returns, checked: ``reward_values`` turns a reward function's ``(rewards, info)`` into a float
CPU tensor [B] or raises ``RewardError`` naming the reward. Shared by the registry (rewards/__init__.py) and the
remote client and server (rewards/remote.py), which import it from here and not from each other."""
from __future__ import annotations

import torch


class RewardError(ValueError):
    """A reward function returned something unusable, or could not be found."""


def reward_values(name: str, out, batch: int, allow_nonfinite: bool = False) -> torch.Tensor:
    """The rewards of a reward function's output ``(rewards, info)`` as a float CPU tensor [batch], validated
    (``check_rewards``); with ``allow_nonfinite`` NaN/inf are kept (reward.drop_nonfinite drops those samples).
    Raises RewardError naming ``name``."""
    if not isinstance(out, tuple) or len(out) != 2:
        raise RewardError(f"reward {name!r} must return (rewards, info), got {type(out).__name__}")
    rewards = out[0]
    if allow_nonfinite and isinstance(rewards, (torch.Tensor, list, tuple)):
        r = torch.as_tensor(rewards).detach().float().cpu()
        if r.shape == (batch,):
            return r
    return check_rewards(name, rewards, batch).cpu()


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


def reward_metrics(name: str, info, batch: int) -> dict[str, torch.Tensor]:
    """The per-sample metrics a reward reports beside its rewards, ``info["per_sample"]`` ({metric: [batch]}), as
    float CPU tensors; {} when it reports none. Raises RewardError naming the reward and the metric when one is
    not a finite [batch] sequence of numbers."""
    per_sample = info.get("per_sample") if isinstance(info, dict) else None
    if per_sample is None:
        return {}
    if not isinstance(per_sample, dict):
        raise RewardError(f"reward {name!r}: info['per_sample'] must be a dict of per-sample metrics, got {type(per_sample).__name__}")
    return {str(k): check_rewards(f"{name}'s metric {k}", v.float() if torch.is_tensor(v) else v, batch).cpu()
            for k, v in per_sample.items()}


def video_reward(fn):
    """Mark a user's reward function as taking videos [B, F, 3, H, W] (sets ``fn.video = True``); returns ``fn``."""
    fn.video = True
    return fn


def require_video_rewards(kind: str, named) -> None:
    """Raise ValueError naming the fix when any of ``named`` ((label, reward fn or None) pairs) scores images, for a
    video model ``kind``."""
    for label, fn in named:
        if fn is not None and not takes_video(fn):
            raise ValueError(f"{label} scores images [B, C, H, W], but {kind} makes videos [B, F, 3, H, W]: name a video reward "
                             f"(video_frame_mean with image_reward={label!r} to average it over the frames, "
                             f"video_temporal_consistency, or your own marked with rewards.video.video_reward)")


def takes_video(fn) -> bool:
    """Whether a reward takes videos: its ``video`` attribute, or for a weighted sum every component's."""
    components = getattr(fn, "components", None)
    if components is not None and not hasattr(fn, "video"):
        return bool(components) and all(takes_video(f) for _, _, f in components)
    return bool(getattr(fn, "video", False))
