"""digit_confidence: the classifier's log-softmax at the conditioned class, whatever the image layout."""
import pytest
import torch
import torch.nn.functional as F

from diffrl_fast.models import digits
from diffrl_fast.rewards import available_rewards, check_rewards, get_reward


@pytest.fixture(scope="module")
def batch():
    """12 held-out real digits in [0, 1] with their labels."""
    images, labels = digits.load_digits_dataset()
    _, held = digits.digits_split(len(labels))
    idx = held[:12]
    return (images[idx] + 1) / 2, labels[idx]


@pytest.fixture(scope="module")
def classifier():
    return digits.load_digit_classifier()


def _expected(classifier, images, target):
    with torch.no_grad():
        return classifier(images).log_softmax(-1).gather(1, target[:, None]).squeeze(1)


def test_registered():
    assert "digit_confidence" in available_rewards()


def test_reward_from_metadata_equals_log_softmax(batch, classifier):
    images, labels = batch
    target = (labels + 3) % 10  # mostly wrong classes, so the rewards are far from 0
    fn = get_reward("digit_confidence")
    rewards, info = fn(images, [""] * len(images), [{"class_id": int(c)} for c in target])
    assert rewards.shape == (len(images),) and rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, _expected(classifier, images, target), rtol=0, atol=1e-6)
    assert info["accuracy"] == pytest.approx(float((classifier(images).argmax(-1) == target).float().mean()))
    check_rewards("digit_confidence", rewards, len(images))


def test_reward_from_prompts(batch, classifier):
    images, labels = batch
    forms = ["{}", "a handwritten {}", "digit {}"]
    prompts = [forms[i % 3].format(int(c)) for i, c in enumerate(labels)]
    prompts[0] = digits._DIGIT_WORDS[int(labels[0])]
    rewards, info = get_reward("digit_confidence")(images, prompts, [{} for _ in prompts])
    torch.testing.assert_close(rewards, _expected(classifier, images, labels), rtol=0, atol=1e-6)
    assert info["accuracy"] >= 0.9 and (rewards <= 0).all()


def test_metadata_overrides_prompt(batch, classifier):
    images, labels = batch
    target = (labels + 1) % 10
    prompts = [f"a handwritten {int(c)}" for c in labels]
    rewards, _ = get_reward("digit_confidence", classifier=classifier)(images, prompts, [{"class_id": int(c)} for c in target])
    torch.testing.assert_close(rewards, _expected(classifier, images, target), rtol=0, atol=1e-6)


def test_rgb_and_larger_images(batch, classifier):
    images, labels = batch
    fn = get_reward("digit_confidence", classifier=classifier)
    meta = [{"class_id": int(c)} for c in labels]
    grey, _ = fn(images, [""] * len(images), meta)
    rgb, _ = fn(images.expand(-1, 3, -1, -1), [""] * len(images), meta)
    torch.testing.assert_close(rgb, grey, rtol=0, atol=1e-4)
    big = F.interpolate(images, size=(64, 64), mode="nearest").expand(-1, 3, -1, -1)
    big_rewards, info = fn(big, [""] * len(images), meta)
    assert big_rewards.shape == (len(images),) and info["accuracy"] >= 0.9


def test_rejects_unconditional_and_bad_prompts(batch, classifier):
    images, _ = batch
    fn = get_reward("digit_confidence", classifier=classifier)
    with pytest.raises(ValueError, match="no target digit"):
        fn(images[:1], [""], [{}])
    with pytest.raises(ValueError, match="a photo of a cat"):
        fn(images[:1], ["a photo of a cat"], None)
