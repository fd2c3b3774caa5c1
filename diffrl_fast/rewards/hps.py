"""HPSv2 / HPSv2.1 (Human Preference Score v2; Wu et al. 2023, "Human Preference Score v2: A Solid Benchmark for
Evaluating Human Preferences of Text-to-Image Synthesis", arXiv:2306.09341), on open_clip's ViT-H/14. Local files only.

    r(x, c) = <f_I(x) / |f_I(x)|, f_T(c) / |f_T(c)|>          (a cosine: no logit_scale, as hpsv2/img_score.py)

f_I, f_T are the image and text towers of an open_clip CLIP (ViT-H-14: embed_dim 1024, vision 32 layers of width 1280,
text 24 layers of width 1024) whose weights are HPSv2's fine-tuned checkpoint. The image goes through HPSv2's
evaluation transform (open_clip's ``image_transform(..., resize_longest_max=True)``, which HPSv2 selects with
``light_augmentation=True``), here in torch on the images' device:

    1. grey -> RGB;
    2. scale the *longest* side to 224: (H, W) -> (round(H s), round(W s)), s = 224 / max(H, W); bicubic with
       antialiasing, no clamping (torchvision resizes the float tensor; skipped when s = 1);
    3. pad with zeros to 224 x 224: left/top get pad // 2, right/bottom the rest (black, before normalising; HPSv2's
       code skips this when the longest side is already 224, leaving a non-square input its ViT rejects: padded here);
    4. normalise with OpenAI CLIP's mean and std.

The prompt is tokenised by open_clip's tokenizer for the architecture (ViT-H-14: its SimpleTokenizer, whose BPE
vocabulary ships inside the open_clip wheel; context 77 tokens, truncated).

Needs the ``rewards`` extra (open-clip-torch, which depends on torchvision: install the torchvision built for your torch
first, e.g. the CPU one from the PyTorch CPU wheel index for a CPU torch).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import _extras
from . import RewardError, register
from .clip import CLIP_MEAN, CLIP_STD, _dtype, _follow_device, _require
from .weights import load_state_dict_file

HPS_ARCHITECTURE = "ViT-H-14"


def import_open_clip(feature: str = "the hpsv2 reward"):
    """open_clip, or one clear error: MissingExtra (not installed: names the ``rewards`` extra) or RewardError (installed
    but its torchvision does not load with this torch, e.g. a CUDA torchvision beside a CPU torch)."""
    try:
        return _extras.require("open_clip", feature)
    except RuntimeError as exc:  # torchvision's compiled ops were built for another torch
        tv = "?"
        try:
            from importlib.metadata import version

            tv = version("torchvision")
        except Exception:  # pragma: no cover - torchvision's metadata missing
            pass
        raise RewardError(f"{feature}: open_clip is installed but failed to import ({exc}); torchvision {tv} does not "
                          f"match torch {torch.__version__}: install the torchvision built for this torch") from None


def hps_transform(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """HPSv2's evaluation transform in torch: [B, 1 or 3, H, W] in [0, 1] -> [B, 3, size, size] normalised.

    Longest side to ``size`` (round(H s), round(W s)) with s = size / max(H, W), bicubic with antialiasing; zero
    padding to a square (left/top pad // 2); then (x - mean) / std per channel (OpenAI CLIP's statistics).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [B, 1 or 3, H, W], got {tuple(images.shape)}")
    x = images.float().expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    nh, nw = h, w
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    # HPSv2's ResizeMaxSize also skips the padding when the longest side is already `size`, handing its ViT a
    # non-square image it cannot take; padded here in every case
    pad_h, pad_w = size - nh, size - nw
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def load_hps_model(checkpoint, model_config=None, architecture: str = HPS_ARCHITECTURE, dtype=torch.float32):
    """(open_clip CLIP model, tokenizer): the architecture built by ``open_clip.create_model`` without weights, then
    every tensor of ``checkpoint`` loaded strictly (ValueError naming missing/unexpected keys or a shape mismatch).

    ``model_config``: optional local JSON of an open_clip model config ({"embed_dim", "vision_cfg", "text_cfg"}) that
    replaces the built-in ``architecture``'s (a custom or tiny model); no network either way.
    """
    open_clip = import_open_clip()
    path = _require(Path(checkpoint), "an HPSv2 checkpoint (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt)")
    overrides = {}
    if model_config is not None:
        config_path = _require(Path(model_config), "an open_clip model config JSON (embed_dim, vision_cfg, text_cfg)")
        overrides = json.loads(config_path.read_text())
        overrides = overrides.get("model_cfg", overrides)
        missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(overrides)
        if missing:
            raise ValueError(f"{config_path}: an open_clip model config needs {sorted(missing)}")
    elif open_clip.get_model_config(architecture) is None:
        raise ValueError(f"open_clip has no built-in architecture {architecture!r} (HPSv2 uses {HPS_ARCHITECTURE!r})")
    quiet = _DropRandomInitWarning()  # open_clip warns "initialized randomly": the checkpoint is loaded next
    logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(architecture, pretrained=None, precision="fp32", device="cpu", output_dict=True,
                                       **overrides)
    finally:
        logging.getLogger().removeFilter(quiet)
    state = load_state_dict_file(path, "an HPSv2 checkpoint")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit open_clip's {architecture}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(wrong)} shape mismatches "
            + str([(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:3]])
            + " (is it an HPSv2 checkpoint for this architecture?)")
    model.load_state_dict(state, strict=True)
    context = model.context_length if model_config is not None else None
    tokenizer = open_clip.get_tokenizer(architecture, context_length=context)
    return model.to(_dtype(dtype)).eval().requires_grad_(False), tokenizer


@register("hpsv2")
def hpsv2(checkpoint, model_config=None, architecture: str = HPS_ARCHITECTURE, device=None, dtype="float32"):
    """HPSv2 / HPSv2.1: r(x, c) = cos(f_I(x), f_T(c)) of open_clip ViT-H/14 with HPSv2's weights (Wu et al. 2023,
    arXiv:2306.09341); the diagonal of ``image_features @ text_features.T`` of hpsv2/img_score.py. Needs the
    ``rewards`` extra (open-clip-torch).

    Weights: ``HPS_v2_compressed.pt`` (v2.0) or ``HPS_v2.1_compressed.pt`` (v2.1) from the Hugging Face repository
    xswu/HPSv2, e.g. ``hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir /models/hps``. The file is a torch
    pickle {"state_dict": ...}, read with ``torch.load(weights_only=True)``. Check it: ``sha256sum`` against the SHA256
    the hub's file page shows; the loader itself checks the architecture: exactly ViT-H-14's 686 tensors
    (986,109,441 parameters: 2 bytes each in float16, 4 in float32) with their shapes, or it fails naming the keys.
    No open_clip pretrained weights are needed: the checkpoint holds the whole model. Convert the pickle once with
    ``diffrl-fast convert-reward HPS_v2.1_compressed.pt`` to pass a .safetensors instead.

    Kwargs: ``checkpoint`` (the .pt, or a .safetensors of the same state dict); ``model_config`` (optional open_clip
    model-config JSON for another architecture); ``architecture`` (open_clip's built-in name, default ViT-H-14);
    ``device`` (default: the images'); ``dtype`` of the model (default float32).
    """
    model, tokenizer = load_hps_model(checkpoint, model_config, architecture, dtype)
    image_size = model.visual.image_size
    size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)

    @torch.no_grad()
    def fn(images, prompts, metadata):
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        target = _follow_device(model, device, images)
        pixels = hps_transform(images.to(target), size).to(next(model.parameters()).dtype)
        img = model.encode_image(pixels, normalize=True).float()
        txt = model.encode_text(tokenizer(list(prompts)).to(target), normalize=True).float()
        return (img * txt).sum(-1), {}

    @torch.no_grad()
    def embed(images):
        """L2-normalised image features [B, embed_dim] (also TDPO's critic input)."""
        target = _follow_device(model, device, images)
        pixels = hps_transform(images.to(target), size).to(next(model.parameters()).dtype)
        return model.encode_image(pixels, normalize=True).float()

    fn.embed = embed
    fn.device = device  # where a reward server sends its images (None: they stay on the CPU)
    return fn
