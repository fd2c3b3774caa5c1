"""JPEG (in)compressibility against a direct PIL encoding written here, independently of the module."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffrl_fast.rewards import check_rewards, get_reward


def _pil_kb(image: torch.Tensor, quality: int = 95) -> float:
    """ddpo-pytorch's recipe for one [C, H, W] image: uint8 via round(255 x), PIL JPEG, bytes / 1000."""
    array = np.clip(np.round(image.double().numpy() * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


def _batch(channels, h=48, w=40):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, channels, h, w, generator=g)
    images[0] = 0.5  # flat
    images[1] = torch.linspace(0, 1, w).expand(channels, h, w)  # smooth gradient
    return images


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(48, 40), (17, 33)], ids=["48x40", "17x33"])
def test_matches_direct_pil_encoding(channels, size):
    images = _batch(channels, *size)
    expected = torch.tensor([_pil_kb(img) for img in images])
    compress, info = get_reward("jpeg_compressibility")(images, [""] * 4, [{}] * 4)
    incompress, _ = get_reward("jpeg_incompressibility")(images, [""] * 4, [{}] * 4)
    assert isinstance(info, dict)
    assert compress.shape == (4,) and compress.dtype == torch.float32
    torch.testing.assert_close(incompress, expected.float(), rtol=0, atol=0)
    torch.testing.assert_close(compress, -incompress, rtol=0, atol=0)
    check_rewards("jpeg_compressibility", compress, 4)


def test_flat_compresses_better_than_noise():
    rewards, _ = get_reward("jpeg_compressibility")(_batch(3, 64, 64), [""] * 4, [{}] * 4)
    flat, gradient, noise = rewards[0], rewards[1], rewards[2:]
    assert flat > noise.max() and gradient > noise.max(), rewards


def test_quality_is_a_factory_argument():
    images = _batch(3)
    low, _ = get_reward("jpeg_incompressibility", quality=10)(images, [""] * 4, [{}] * 4)
    high, _ = get_reward("jpeg_incompressibility")(images, [""] * 4, [{}] * 4)
    assert (low[2:] < high[2:]).all()
    torch.testing.assert_close(low, torch.tensor([_pil_kb(img, 10) for img in images]).float(), rtol=0, atol=0)


def test_out_of_range_values_saturate_and_bad_shapes_raise():
    images = _batch(3)
    inside, _ = get_reward("jpeg_incompressibility")(images, [""] * 4, [{}] * 4)
    outside, _ = get_reward("jpeg_incompressibility")(images * 3 - 1, [""] * 4, [{}] * 4)
    torch.testing.assert_close(outside, torch.tensor([_pil_kb((img * 3 - 1).clamp(0, 1)) for img in images]).float())
    assert inside.shape == outside.shape
    with pytest.raises(ValueError, match="1 or 3"):
        get_reward("jpeg_compressibility")(torch.rand(2, 4, 8, 8), [""] * 2, [{}] * 2)


def test_reward_metrics_are_checked_like_rewards():
    """A reward's per-sample metrics (info["per_sample"]) come back as float CPU tensors, or a RewardError naming the
    reward and the metric."""
    from diffrl_fast.rewards import RewardError, reward_metrics

    assert reward_metrics("r", {}, 2) == {}
    got = reward_metrics("r", {"per_sample": {"ok": torch.tensor([True, False]), "score": [0.5, 1.5]}}, 2)
    assert got["ok"].dtype == torch.float32 and got["ok"].tolist() == [1.0, 0.0] and got["score"].tolist() == [0.5, 1.5]
    with pytest.raises(RewardError, match="r's metric ok.*shape"):
        reward_metrics("r", {"per_sample": {"ok": torch.ones(3)}}, 2)
    with pytest.raises(RewardError, match="r's metric ok.*non-finite"):
        reward_metrics("r", {"per_sample": {"ok": torch.tensor([1.0, float("nan")])}}, 2)
    with pytest.raises(RewardError, match="must be a dict"):
        reward_metrics("r", {"per_sample": [1, 2]}, 2)
