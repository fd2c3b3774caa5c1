"""aesthetic and clip_score on a tiny random CLIP, checked against transformers' CLIPModel.forward."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffrl_fast.models.tiny import build_tiny_clip, tiny_clip_vocab
from diffrl_fast.rewards import check_rewards, get_reward
from diffrl_fast.rewards.clip import CLIP_MEAN, CLIP_STD, AestheticMLP, ClipImageTransform

PROJECTION_DIM = 16
IMAGE_SIZE = 32
PROMPTS = ["a photo of a cat", "a red bird flying", "two dogs on the beach"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"), image_size=IMAGE_SIZE, projection_dim=PROJECTION_DIM)


@pytest.fixture(scope="module")
def mlp_state():
    torch.manual_seed(0)
    mlp = AestheticMLP(PROJECTION_DIM)
    # default init gives outputs ~0; make the head matter so wrong inputs would show
    return {k: v * 10 for k, v in mlp.state_dict().items()}


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory, mlp_state):
    path = tmp_path_factory.mktemp("mlp") / "aesthetic.safetensors"
    save_file(mlp_state, str(path))
    return str(path)


def _images(n=3, channels=3, h=IMAGE_SIZE, w=IMAGE_SIZE, seed=0):
    return torch.rand(n, channels, h, w, generator=torch.Generator().manual_seed(seed))


def _direct_forward(clip_dir, images, prompts):
    """transformers' own CLIPModel.forward on pixels normalised here (images already at the model's size)."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    tokens = CLIPTokenizer.from_pretrained(clip_dir)(prompts, padding=True, return_tensors="pt")
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        pixel_values = (images - mean) / std
        return model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixel_values)


def test_tiny_clip_tokenizer_is_the_tiny_vocab(clip_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(clip_dir)
    assert tok("cat", add_special_tokens=False).input_ids == [tiny_clip_vocab()[0]["cat</w>"]]


def test_clip_score_equals_logit_scale_times_cosine(clip_dir):
    images = _images()
    rewards, info = get_reward("clip_score", model_path=clip_dir)(images, PROMPTS, [{}] * 3)
    expected = _direct_forward(clip_dir, images, PROMPTS).logits_per_image.diagonal()
    torch.testing.assert_close(rewards, expected, rtol=1e-5, atol=1e-5)
    assert check_rewards("clip_score", rewards, 3).shape == (3,) and "clip_cosine_mean" in info
    # the text matters, and padding to a longer batch does not change a prompt's score
    other, _ = get_reward("clip_score", model_path=clip_dir)(images, ["a cat"] + PROMPTS[1:], [{}] * 3)
    assert other[0] != rewards[0] and torch.allclose(other[1:], rewards[1:], atol=1e-5)


def test_aesthetic_equals_mlp_of_normalised_embedding(clip_dir, mlp_path, mlp_state):
    images = _images()
    fn = get_reward("aesthetic", clip_path=clip_dir, mlp_path=mlp_path)
    rewards, _ = fn(images, PROMPTS, [{}] * 3)
    embeds = _direct_forward(clip_dir, images, PROMPTS).image_embeds  # L2-normalised by CLIPModel
    h = embeds
    for i in (0, 2, 4, 6, 7):  # Linear layers of the LAION head; dropout is identity in eval
        h = F.linear(h, mlp_state[f"layers.{i}.weight"], mlp_state[f"layers.{i}.bias"])
    torch.testing.assert_close(rewards, h.squeeze(-1), rtol=1e-5, atol=1e-5)
    assert rewards.shape == (3,) and torch.isfinite(rewards).all() and rewards.std() > 0
    again, _ = get_reward("aesthetic", clip_path=clip_dir, mlp_path=mlp_path)(images, PROMPTS, [{}] * 3)
    assert torch.equal(rewards, again), "not deterministic"
    # the device a reward server sends the images to: only where one is given
    assert fn.device is None and get_reward("aesthetic", clip_path=clip_dir, mlp_path=mlp_path, device="cpu").device == "cpu"


def test_aesthetic_reads_pth_state_dicts(clip_dir, mlp_path, mlp_state, tmp_path):
    torch.save(mlp_state, tmp_path / "aesthetic.pth")
    images = _images()
    pth = str(tmp_path / "aesthetic.pth")
    from_pth, _ = get_reward("aesthetic", clip_path=clip_dir, mlp_path=pth)(images, PROMPTS, [{}] * 3)
    from_st, _ = get_reward("aesthetic", clip_path=clip_dir, mlp_path=mlp_path)(images, PROMPTS, [{}] * 3)
    assert torch.equal(from_pth, from_st)


def test_any_size_and_grey_images(clip_dir, mlp_path):
    score = get_reward("clip_score", model_path=clip_dir)
    aesthetic = get_reward("aesthetic", clip_path=clip_dir, mlp_path=mlp_path)
    for images in (_images(2, 1), _images(2, 3, 40, 72), _images(2, 1, 128, 96)):
        for fn in (score, aesthetic):
            rewards, _ = fn(images, PROMPTS[:2], [{}] * 2)
            assert rewards.shape == (2,) and torch.isfinite(rewards).all()
    grey = _images(2, 1)
    rgb = grey.expand(-1, 3, -1, -1)
    torch.testing.assert_close(score(grey, PROMPTS[:2], [{}] * 2)[0], score(rgb, PROMPTS[:2], [{}] * 2)[0])


def test_preprocessing_matches_clip_image_processor(clip_dir):
    """Resize (shortest side, bicubic) + centre crop + normalise, as transformers' processor does with PIL."""
    from transformers import CLIPImageProcessor

    images = F.interpolate(_images(2, 3, 12, 16), size=(60, 80), mode="bilinear")  # smooth, non-square
    uint8 = (images * 255).round() / 255  # the processor sees uint8 pixels
    ours = ClipImageTransform(clip_dir, IMAGE_SIZE)(uint8, torch.float32)
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    arrays = list((uint8 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    theirs = processor(images=arrays, return_tensors="pt")
    assert ours.shape == theirs.pixel_values.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (ours - theirs.pixel_values).abs().mean() < 0.01  # bicubic kernels of torch and PIL differ slightly


def test_missing_files_raise_file_not_found(clip_dir, mlp_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*CLIPModel"):
        get_reward("clip_score", model_path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors.*aesthetic MLP"):
        get_reward("aesthetic", clip_path=clip_dir, mlp_path=str(tmp_path / "missing.safetensors"))
    no_tokenizer = tmp_path / "no_tok"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((Path(clip_dir) / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        get_reward("clip_score", model_path=str(no_tokenizer))


def test_mlp_input_must_match_projection_dim(clip_dir, tmp_path):
    save_file(AestheticMLP(PROJECTION_DIM + 1).state_dict(), str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="projection_dim"):
        get_reward("aesthetic", clip_path=clip_dir, mlp_path=str(tmp_path / "wrong.safetensors"))
