"""hpsv2 on a tiny random open_clip ViT checkpoint saved as HPSv2 saves its weights ({"state_dict": ...} in a .pt),
checked against open_clip's own CLIP forward with HPSv2's evaluation transform done by torchvision (as
hpsv2/img_score.py does it): score = diag(image_features @ text_features.T) of the normalised features.

open_clip is the ``rewards`` extra: these tests skip, with the reason, where it is not installed or does not import
(its torchvision must be built for the installed torch; PyPI's Linux torchvision wheels need a CUDA torch). The
message a user gets without it is tested here either way."""
import json
import sys

import pytest
import torch

from diffrl_fast._extras import MissingExtra
from diffrl_fast.rewards import get_reward
from diffrl_fast.rewards.clip import CLIP_MEAN, CLIP_STD
from diffrl_fast.rewards.hps import hps_transform


def _open_clip_or_reason():
    try:
        import open_clip

        return open_clip, None
    except Exception as exc:  # not installed, or its torchvision does not load with this torch
        return None, f"open_clip (the 'rewards' extra) is unavailable here: {type(exc).__name__}: {str(exc)[:160]}"


open_clip, REASON = _open_clip_or_reason()
needs_open_clip = pytest.mark.skipif(open_clip is None, reason=REASON or "")

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
PROMPTS = ["a photo of a cat", "a red bird flying over the beach", "two dogs"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hps")
    (root / "tiny.json").write_text(json.dumps(TINY))
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY, output_dict=True).eval()
    with torch.no_grad():  # open_clip's init leaves some tensors at 0/1; randomise so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, root / "HPS_tiny.pt")
    return {"checkpoint": str(root / "HPS_tiny.pt"), "model_config": str(root / "tiny.json"), "model": model}


def _reference(model, images, prompts):
    """HPSv2's evaluation transform with torchvision (ResizeMaxSize to 32 + zero pad + Normalize) and its score."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    out = []
    for img in images:
        h, w = img.shape[1:]
        s = 32 / float(max(h, w))
        if s != 1.0:
            nh, nw = round(h * s), round(w * s)
            img = TF.resize(img, [nh, nw], InterpolationMode.BICUBIC, antialias=True)
            ph, pw = 32 - nh, 32 - nw
            img = TF.pad(img, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
        out.append(TF.normalize(img, CLIP_MEAN, CLIP_STD))
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    with torch.no_grad():
        feats = model(torch.stack(out), tokenizer(prompts))
    return torch.diagonal(feats["image_features"] @ feats["text_features"].T)


@needs_open_clip
def test_hpsv2_equals_open_clip_cosine_with_hpsv2_transform(tiny):
    fn = get_reward("hpsv2", checkpoint=tiny["checkpoint"], model_config=tiny["model_config"])
    g = torch.Generator().manual_seed(1)
    for shape in ((3, 3, 32, 32), (3, 3, 48, 80), (3, 1, 70, 40)):  # square, wide (pads top/bottom), tall grey
        images = torch.rand(*shape, generator=g)
        rewards, _ = fn(images, PROMPTS, [{}] * 3)
        expected = _reference(tiny["model"], images.expand(-1, 3, -1, -1), PROMPTS)
        torch.testing.assert_close(rewards, expected, rtol=1e-4, atol=1e-5)
        assert rewards.abs().max() <= 1 + 1e-5 and rewards.std() > 0  # a cosine, no logit_scale
    other, _ = fn(images[:1], ["a completely different prompt"], [{}])
    assert (other - rewards[:1]).abs().item() > 1e-6
    emb = fn.embed(images)  # TDPO's critic input: the normalised image features
    assert emb.shape == (3, TINY["embed_dim"]) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)


@needs_open_clip
def test_hpsv2_checkpoint_must_fit_the_architecture(tiny, tmp_path):
    state = torch.load(tiny["checkpoint"], weights_only=True)["state_dict"]
    torch.save(dict(state, extra_head=torch.zeros(3)), tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"1 unexpected keys \['extra_head'\]"):
        get_reward("hpsv2", checkpoint=str(tmp_path / "extra.pt"), model_config=tiny["model_config"])
    with pytest.raises(FileNotFoundError, match="HPSv2 checkpoint"):
        get_reward("hpsv2", checkpoint=str(tmp_path / "none.pt"), model_config=tiny["model_config"])


def test_hps_transform_pads_the_short_side_with_black():
    x = torch.full((1, 3, 16, 32), 0.5)  # wide: longest side 32 -> 16 x 32 kept, 8 rows of zeros above and below
    out = hps_transform(x, 32) * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    assert out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out[..., 8:24, :], torch.full((1, 3, 16, 32), 0.5))
    assert out[..., :8, :].abs().max() < 1e-6 and out[..., 24:, :].abs().max() < 1e-6


def test_missing_open_clip_names_the_rewards_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(MissingExtra, match=r'hpsv2 reward needs open-clip-torch.*pip install "diffrl_fast\[rewards\]"'):
        get_reward("hpsv2", checkpoint=str(tmp_path / "x.pt"))
