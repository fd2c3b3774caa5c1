"""Video rewards: ``fn(videos, prompts, metadata) -> (rewards, info)`` with videos [B, F, 3, H, W] in [0, 1].

A video model (Wan) decodes to frames, so its reward must take them. A function says it does with a ``video = True``
attribute (``video_reward`` sets it on a user's function); the trainer refuses an image reward for a video model
rather than let it read the frame axis as channels. Two built-ins:

- ``video_frame_mean``: an image reward (any registered name or dotted path, with its kwargs) scored on every frame
  and averaged over the frames, r = (1/F) sum_f r_img(video[:, f]): the per-frame aesthetic / text-alignment
  rewards that DanceGRPO and Flow-Factory apply to Wan and HunyuanVideo.
- ``video_temporal_consistency``: the mean similarity of consecutive frames,
  r = 1 - (1/(F-1)) sum_f mean |video[:, f+1] - video[:, f]|, in [0, 1] (1: a still video), the simplest of the
  temporal-consistency scores of video benchmarks (VBench's subject/background consistency compare features of
  consecutive frames; this compares pixels, so it needs no model).
"""
from __future__ import annotations

import torch

from . import get_reward, register
from .values import RewardError, reward_values, takes_video, video_reward  # noqa: F401  (video_reward re-exported)


def check_videos(name: str, videos, min_frames: int = 1) -> torch.Tensor:
    """``videos`` as a float tensor [B, F, 3, H, W] with F >= ``min_frames``, or a RewardError naming the fix."""
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5 or videos.shape[2] not in (1, 3):
        got = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise RewardError(f"reward {name} takes videos [B, F, 3, H, W] in [0, 1], got {got}: it is a video reward, for a video "
                          f"model (Wan); for an image model name the image reward itself")
    if videos.shape[1] < min_frames:
        raise RewardError(f"reward {name} needs at least {min_frames} frames, got {videos.shape[1]}: raise sample.num_frames")
    return videos.float()


@register("video_frame_mean")
def video_frame_mean(image_reward: str = "jpeg_compressibility", image_kwargs: dict | None = None, frame_stride: int = 1):
    """Video reward: the image reward ``image_reward`` (with ``image_kwargs``) on every ``frame_stride``-th frame,
    averaged over the frames scored: r_b = mean_f r_img(video_b[f], prompt_b)."""
    if not isinstance(frame_stride, int) or frame_stride < 1:
        raise RewardError(f"video_frame_mean: frame_stride must be a positive int, got {frame_stride!r}")
    inner = get_reward(image_reward, **(image_kwargs or {}))
    if takes_video(inner):
        raise RewardError(f"video_frame_mean scores frames with an image reward; {image_reward} is a video reward")
    name = f"video_frame_mean({image_reward})"

    def fn(videos, prompts, metadata):
        v = check_videos(name, videos)[:, ::frame_stride]
        B, F = v.shape[:2]
        frames = v.reshape(B * F, *v.shape[2:])
        per_frame = reward_values(image_reward, inner(frames, [p for p in prompts for _ in range(F)],
                                                      [m for m in metadata for _ in range(F)]), B * F)
        return per_frame.reshape(B, F).mean(1), {}

    fn.video = True
    return fn


@register("video_temporal_consistency")
def video_temporal_consistency():
    """Video reward: 1 - mean over consecutive frame pairs of the mean absolute pixel difference, in [0, 1]."""
    name = "video_temporal_consistency"

    def fn(videos, prompts, metadata):
        v = check_videos(name, videos, min_frames=2)
        return 1 - (v[:, 1:] - v[:, :-1]).abs().mean(dim=(1, 2, 3, 4)), {}

    fn.video = True
    return fn
