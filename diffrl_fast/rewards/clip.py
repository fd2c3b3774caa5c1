"""CLIP-based rewards: the LAION aesthetic predictor and CLIP score / PickScore. Local files only.

aesthetic (LAION aesthetic predictor v2, as ddpo-pytorch uses it for DDPO, Black et al. 2023):

    e = CLIP_image(x) / |CLIP_image(x)|        (projected embedding; 768-d for ViT-L/14)
    r(x) = MLP(e),  MLP = Linear(d, 1024)-Dropout-Linear(1024, 128)-Dropout-Linear(128, 64)-Dropout
                        -Linear(64, 16)-Linear(16, 1)

clip_score (CLIP-score / PickScore style):

    r(x, c) = exp(logit_scale) * cos(CLIP_image(x), CLIP_text(c))

This is exactly PickScore (Kirstain et al. 2023, "Pick-a-Pic") when the model is its fine-tuned
CLIP-H (logit_scale.exp() = 100; see ``clip_score`` for the folder to build), and a rescaled CLIP-score
otherwise (Hessel et al. 2021 use 2.5 * max(cos, 0); the scale is irrelevant to RL with normalised
advantages). HPSv2 (rewards/hps.py) and ImageReward (rewards/image_reward.py) have their own loaders.

Models are ``CLIPModel`` folders written by ``save_pretrained`` (config.json + weights), with the
tokenizer files (clip_score) and preprocessor_config.json beside them. Images are preprocessed with
torch ops on their own device, as CLIPImageProcessor does (resize the shortest side, bicubic with
antialiasing; centre crop; normalise), instead of a round trip through PIL. The model follows the
images' device unless ``device`` is given.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .weights import load_state_dict_file

# OpenAI CLIP's normalisation, used when a folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor head; its state-dict keys match the released
    ``sac+logos+ava1-l14-linearMSE.pth`` (``layers.{0,2,4,6,7}.{weight,bias}``)."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """[B, in_dim] L2-normalised image embeddings -> [B] scores."""
        return self.layers(embeds).squeeze(-1)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: expected {what} (rewards never download models)")
    return path


def _dtype(dtype) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_clip_model(path, dtype=torch.float32):
    """A frozen, eval-mode ``CLIPModel`` from a local save_pretrained folder (FileNotFoundError if absent)."""
    from transformers import CLIPModel

    folder = Path(path)
    _require(folder / "config.json", "a CLIPModel folder written by save_pretrained (config.json + weights)")
    model = CLIPModel.from_pretrained(folder, local_files_only=True)
    return model.to(_dtype(dtype)).eval().requires_grad_(False)


class ClipImageTransform:
    """CLIPImageProcessor's steps in torch: [B, C, H, W] in [0, 1] -> normalised [B, 3, crop, crop].

    Reads size/crop_size/image_mean/image_std from the folder's preprocessor_config.json, falling
    back to the vision tower's image size and OpenAI CLIP's statistics (also when ``folder`` is None).
    The crop's offset is floor((H - crop) / 2), as transformers' processors take it, or with
    ``round_crop`` round((H - crop) / 2) as torchvision's ``CenterCrop`` does (ImageReward's transform).
    """

    def __init__(self, folder, image_size: int, round_crop: bool = False):
        self.size, self.crop = image_size, (image_size, image_size)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        self.round_crop = round_crop
        config_file = Path(folder) / "preprocessor_config.json" if folder is not None else None
        if config_file is not None and config_file.is_file():
            config = json.loads(config_file.read_text())
            size = config.get("size", image_size)
            self.size = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
            crop = config.get("crop_size", self.size)
            self.crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
            self.mean = tuple(config.get("image_mean", CLIP_MEAN))
            self.std = tuple(config.get("image_std", CLIP_STD))

    def __call__(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape [B, 1 or 3, H, W], got {tuple(images.shape)}")
        x = images.float().expand(-1, 3, -1, -1)  # grey -> RGB, as do_convert_rgb
        h, w = x.shape[-2:]
        if min(h, w) != self.size:
            # Shortest side to `size`, aspect ratio kept; clamp because bicubic overshoots [0, 1]
            # where the processor's uint8 PIL image would saturate.
            scale = self.size / min(h, w)
            new = (self.size, int(w * scale)) if h <= w else (int(h * scale), self.size)
            x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
            h, w = new
        ch, cw = self.crop
        if self.round_crop:  # torchvision: int(round((h - ch) / 2.0)), Python's round half to even
            top, left = max(0, int(round((h - ch) / 2.0))), max(0, int(round((w - cw) / 2.0)))
        else:
            top, left = max(0, (h - ch) // 2), max(0, (w - cw) // 2)
        x = x[..., top : top + ch, left : left + cw]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(dtype)


def _follow_device(model: nn.Module, device, images: torch.Tensor) -> torch.device:
    target = torch.device(device) if device is not None else images.device
    if next(model.parameters()).device != target:
        model.to(target)
    return target


def image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected CLIP image embeddings (not normalised). Written against the towers rather than
    ``get_image_features``, whose return type changed in transformers 5 (a ModelOutput, not a tensor)."""
    return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)


def text_embeds(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Projected CLIP text embeddings (not normalised), pooled at the EOS token."""
    return model.text_projection(model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)


def load_aesthetic_mlp(path, in_dim: int) -> AestheticMLP:
    """The aesthetic MLP from a .safetensors (``diffrl-fast convert-reward`` writes it from the released .pth) or a
    .pth/.pt state dict (read with ``torch.load(weights_only=True)``: tensors only, never code)."""
    path = _require(Path(path), f"the aesthetic MLP state dict (.safetensors or .pth) with input dim {in_dim}")
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"{path}: expected a .safetensors or .pth state dict of the aesthetic MLP")
    state = load_state_dict_file(path, "the aesthetic MLP's state dict")
    mlp = AestheticMLP(in_dim)
    found = tuple(state["layers.0.weight"].shape) if "layers.0.weight" in state else None
    if found is not None and found[1] != in_dim:
        raise ValueError(f"{path}: MLP takes {found[1]}-d embeddings but the CLIP model's projection_dim is {in_dim}")
    mlp.load_state_dict(state)
    return mlp.eval().requires_grad_(False)


@register("aesthetic")
def aesthetic(clip_path, mlp_path, device=None, dtype="float32"):
    """LAION aesthetic score r(x) = MLP(e / |e|) of the CLIP ViT-L/14 image embedding e, the reward of DDPO
    (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning", arXiv:2305.13301) as ddpo-pytorch's
    aesthetic_scorer.py computes it (LAION's improved-aesthetic-predictor, simple_inference.py).

    ``clip_path``: folder of a CLIPModel and its preprocessor config: openai/clip-vit-large-patch14, e.g.
    ``hf download openai/clip-vit-large-patch14 config.json model.safetensors preprocessor_config.json --local-dir
    /models/clip-l14``. ``mlp_path``: the MLP's state dict, whose input dim must equal the CLIP projection_dim (768).
    The released head is ``sac+logos+ava1-l14-linearMSE.pth`` of github.com/christophschuhmann/improved-aesthetic-
    predictor (ddpo-pytorch ships the same file in ddpo_pytorch/assets/): a pickle of 10 tensors, 927,969 float32
    values (about 3.7 MB). Convert it once with ``diffrl-fast convert-reward sac+logos+ava1-l14-linearMSE.pth``,
    which prints every tensor's shape and the sha256 of both files (compare the input's with the one the download page
    shows), and pass the .safetensors; a .pth is also read, with ``torch.load(weights_only=True)``.
    ``dtype`` is the CLIP model's; the MLP runs in float32.
    """
    model = load_clip_model(clip_path, dtype)
    transform = ClipImageTransform(clip_path, model.config.vision_config.image_size)
    mlp = load_aesthetic_mlp(mlp_path, model.config.projection_dim)

    @torch.no_grad()
    def embed(images):
        """L2-normalised CLIP image embeddings [B, projection_dim] (also TDPO's critic input)."""
        target = _follow_device(model, device, images)
        embeds = image_embeds(model, transform(images.to(target), model.dtype)).float()
        return embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)

    @torch.no_grad()
    def fn(images, prompts, metadata):
        embeds = embed(images)
        mlp.to(embeds.device)
        return mlp(embeds), {}

    fn.embed = embed
    fn.device = device  # where a reward server sends its images (None: they stay on the CPU)
    return fn


@register("clip_score")
def clip_score(model_path, device=None, dtype="float32"):
    """r(x, c) = exp(logit_scale) * cos(image embedding, text embedding of the prompt).

    ``model_path``: folder of a CLIPModel with its tokenizer (and preprocessor config).

    PickScore (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image Generation",
    arXiv:2305.01569) is this reward with its fine-tuned CLIP-H: ``PickScore = exp(logit_scale) * cos`` is the
    ``model.logit_scale.exp() * (text_embs @ image_embs.T)`` of its model card, whose processor is
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K's. Put both in one folder:

        hf download yuvalkirstain/PickScore_v1 --local-dir /models/pickscore
        hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K preprocessor_config.json tokenizer.json \
            tokenizer_config.json vocab.json merges.txt special_tokens_map.json --local-dir /models/pickscore

    and use ``reward.name=clip_score reward.kwargs={model_path: /models/pickscore}``. Check the files: ``sha256sum``
    of the weights against the SHA256 the hub's file page shows; config.json must describe CLIP ViT-H/14
    (vision hidden_size 1280, 32 layers, patch 14; text hidden_size 1024, 24 layers; projection_dim 1024), about
    986M parameters (3.9 GB in float32).
    """
    from transformers import AutoTokenizer

    model = load_clip_model(model_path, dtype)
    transform = ClipImageTransform(model_path, model.config.vision_config.image_size)
    folder = Path(model_path)
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise FileNotFoundError(
            f"{folder}: expected the CLIP tokenizer beside the model (tokenizer.json, or vocab.json + merges.txt)"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def fn(images, prompts, metadata):
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        target = _follow_device(model, device, images)
        tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        img = image_embeds(model, transform(images.to(target), model.dtype)).float()
        txt = text_embeds(model, tokens.input_ids.to(target), tokens.attention_mask.to(target)).float()
        cosine = F.cosine_similarity(img, txt, dim=-1)
        return model.logit_scale.float().exp() * cosine, {"clip_cosine_mean": cosine.mean().item()}

    @torch.no_grad()
    def embed(images):
        """L2-normalised CLIP image embeddings [B, projection_dim] (also TDPO's critic input)."""
        target = _follow_device(model, device, images)
        e = image_embeds(model, transform(images.to(target), model.dtype)).float()
        return e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)

    fn.embed = embed
    fn.device = device  # where a reward server sends its images (None: they stay on the CPU)
    return fn
