"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image Generation",
NeurIPS 2023, arXiv:2304.05977) on transformers' BLIP classes. Local files only.

    v    = ViT(x)                         BLIP's ViT-L/16 at 224 px: the whole token sequence after its final LayerNorm
    h    = BERT(c; cross-attention to v)   BLIP's text encoder (BERT-base, 12 layers, each with cross-attention to v)
    r    = (MLP(h_[CLS]) - 0.16717362830052426) / 1.0333394966054072
    MLP  = Linear(768, 1024)-Dropout-Linear(1024, 128)-Dropout-Linear(128, 64)-Dropout-Linear(64, 16)-Linear(16, 1)

(no activations between the head's layers; the constants are the mean and std of the raw score that ImageReward.py
subtracts and divides by). The text is tokenised by bert-base-uncased, padded/truncated to 35 tokens, with BLIP's added
[DEC] and [ENC] tokens; the [CLS] token is kept (ImageReward does not swap in [ENC]). The image goes through
ImageReward's transform in torch: shortest side to 224 (bicubic, antialiased, clamped to [0, 1] like PIL's uint8
result), centre crop 224 (torchvision's rounding), normalise with OpenAI CLIP's mean/std, which BLIP uses.

The architecture is transformers' ``BlipVisionModel`` (embeddings, 24 pre-norm layers with fused qkv, post LayerNorm;
eps 1e-6) and ``BlipTextModel`` (BERT with cross-attention, no pooler; eps 1e-12), their sizes read from the
checkpoint's shapes. ``load_image_reward_state`` maps every tensor of ImageReward.pt onto them by name (see
``map_image_reward_key``) and fails on any key it cannot place or any parameter left unset.

Needs only the ``train`` extra (transformers, safetensors).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from . import register
from .clip import AestheticMLP, ClipImageTransform, _dtype, _follow_device, _require
from .weights import load_state_dict_file

IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
MAX_TOKENS = 35
# tensors of ImageReward.pt that its score does not use: BLIP's contrastive projections and a position-id buffer
UNUSED_KEYS = re.compile(r"^blip\.(vision_proj|text_proj)\.(weight|bias)$|^blip\.text_encoder\.embeddings\.position_ids$")

_VISION_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                 "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_VISION_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
               "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
               "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}


def map_image_reward_key(key: str) -> str | None:
    """The name in :class:`ImageRewardModel` of ImageReward.pt's tensor ``key`` (None for one the score does not use).

    blip.visual_encoder.{cls_token, pos_embed, patch_embed.proj, norm}  -> vision.{embeddings.class_embedding,
        embeddings.position_embedding, embeddings.patch_embedding, post_layernorm}
    blip.visual_encoder.blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}
                                     -> vision.encoder.layers.i.{layer_norm1, self_attn.qkv, self_attn.projection,
                                        layer_norm2, mlp.fc1, mlp.fc2}
    blip.text_encoder.*              -> text.* (BLIP's med.py BERT and transformers' BlipTextModel share names)
    mlp.layers.*                     -> mlp.layers.*
    Raises KeyError for any other key.
    """
    if UNUSED_KEYS.match(key):
        return None
    if key.startswith("blip.visual_encoder."):
        rest = key[len("blip.visual_encoder."):]
        if rest in _VISION_TOP:
            return "vision." + _VISION_TOP[rest]
        m = re.fullmatch(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", rest)
        if m:
            return f"vision.encoder.layers.{m[1]}.{_VISION_BLOCK[m[2]]}.{m[3]}"
    elif key.startswith("blip.text_encoder."):
        rest = key[len("blip.text_encoder."):]
        if re.fullmatch(r"embeddings\.(word_embeddings|position_embeddings)\.weight|embeddings\.LayerNorm\.(weight|bias)"
                        r"|encoder\.layer\.\d+\.((attention|crossattention)\.(self\.(query|key|value)|output\.dense)"
                        r"|intermediate\.dense|output\.dense)\.(weight|bias)"
                        r"|encoder\.layer\.\d+\.((attention|crossattention)\.output|output)\.LayerNorm\.(weight|bias)",
                        rest):
            return "text." + rest
    elif re.fullmatch(r"mlp\.layers\.[0-7]\.(weight|bias)", key):
        return key
    raise KeyError(key)


def _count(state: dict, pattern: str) -> int:
    indices = {int(m[1]) for k in state if (m := re.match(pattern, k))}
    if indices != set(range(len(indices))):
        raise ValueError(f"layer indices {sorted(indices)} are not 0..n-1")
    return len(indices)


class ImageRewardModel(nn.Module):
    """ImageReward's scorer on transformers' BLIP towers: ``vision`` (BlipVisionModel), ``text`` (BlipTextModel with
    cross-attention, no pooler) and ``mlp`` (the 5-layer linear head), sized from ImageReward.pt's shapes."""

    def __init__(self, state: dict, vision_heads: int | None = None, text_heads: int | None = None):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        def shape(key):
            if key not in state:
                raise ValueError(f"not an ImageReward checkpoint: no {key!r}")
            return tuple(state[key].shape)

        width = shape("blip.visual_encoder.cls_token")[-1]
        patch = shape("blip.visual_encoder.patch_embed.proj.weight")[-1]
        grid = int(round((shape("blip.visual_encoder.pos_embed")[1] - 1) ** 0.5))
        vision = BlipVisionConfig(
            hidden_size=width, intermediate_size=shape("blip.visual_encoder.blocks.0.mlp.fc1.weight")[0],
            num_hidden_layers=_count(state, r"blip\.visual_encoder\.blocks\.(\d+)\."),
            num_attention_heads=vision_heads or width // 64, image_size=grid * patch, patch_size=patch,
            hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0)
        vocab, hidden = shape("blip.text_encoder.embeddings.word_embeddings.weight")
        text = BlipTextConfig(
            vocab_size=vocab, hidden_size=hidden,
            encoder_hidden_size=shape("blip.text_encoder.encoder.layer.0.crossattention.self.key.weight")[1],
            intermediate_size=shape("blip.text_encoder.encoder.layer.0.intermediate.dense.weight")[0],
            num_hidden_layers=_count(state, r"blip\.text_encoder\.encoder\.layer\.(\d+)\."),
            num_attention_heads=text_heads or hidden // 64,
            max_position_embeddings=shape("blip.text_encoder.embeddings.position_embeddings.weight")[0],
            hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            is_decoder=True,  # transformers builds the cross-attention layers only for is_decoder configs
            pad_token_id=0, bos_token_id=None, eos_token_id=None, sep_token_id=None)  # ids unused by an encoder
        if text.encoder_hidden_size != width:
            raise ValueError(f"the text encoder attends to {text.encoder_hidden_size}-d image tokens, the ViT makes {width}-d")
        self.vision = BlipVisionModel(vision)
        self.text = BlipTextModel(text, add_pooling_layer=False)
        self.mlp = AestheticMLP(hidden)  # the same Linear/Dropout stack as ImageReward's MLP, names layers.{0,2,4,6,7}

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] ImageReward scores: (MLP(h_[CLS]) - mean) / std, h = BERT(input_ids; cross-attention to ViT(pixels))."""
        image_tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        h = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                      is_decoder=False).last_hidden_state[:, 0, :]  # bidirectional self-attention, as BLIP's encoder
        raw = self.mlp(h.float())  # the head stays float32
        return (raw - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


def load_image_reward_state(model: ImageRewardModel, state: dict, path="checkpoint") -> None:
    """Copy ImageReward.pt's tensors into ``model`` by :func:`map_image_reward_key`; ValueError when a key cannot be
    placed, a shape differs or any parameter of ``model`` is left without a tensor from the file."""
    mapped, unknown = {}, []
    for key, value in state.items():
        try:
            target = map_image_reward_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if target is not None:
            mapped[target] = value
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    stray = sorted(set(mapped) - set(expected))
    wrong = sorted(k for k in set(mapped) & set(expected) if mapped[k].shape != expected[k].shape)
    if unknown or missing or stray or wrong:
        raise ValueError(f"{path} does not fit ImageReward's architecture: {len(unknown)} unexpected keys {unknown[:5]}, "
                         f"{len(missing)} parameters without a tensor {missing[:5]}, {len(stray)} unplaceable "
                         f"{stray[:5]}, {len(wrong)} shape mismatches "
                         + str([(k, tuple(mapped[k].shape), tuple(expected[k].shape)) for k in wrong[:3]]))
    model.load_state_dict(mapped, strict=True)


def load_bert_tokenizer(path, vocab_size: int):
    """bert-base-uncased's tokenizer from a local folder, with BLIP's two added tokens [DEC] and [ENC]."""
    from transformers import AutoTokenizer

    folder = _require(Path(path), "the bert-base-uncased tokenizer folder (vocab.txt, tokenizer_config.json)")
    if not ((folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()):
        raise FileNotFoundError(f"{folder}: expected bert-base-uncased's tokenizer files (vocab.txt or tokenizer.json)")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.add_tokens(["[DEC]", "[ENC]"], special_tokens=True)  # BLIP's init_tokenizer: ids 30522, 30523
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but the checkpoint's text encoder only "
                         f"{vocab_size}: is it bert-base-uncased?")
    return tokenizer


@register("image_reward")
def image_reward(checkpoint, tokenizer_path, device=None, dtype="float32", vision_heads=None, text_heads=None):
    """ImageReward: r(x, c) = (MLP(BERT(c; cross-attn to ViT(x))_[CLS]) - 0.16717362830052426) / 1.0333394966054072
    (Xu et al. 2023, NeurIPS, arXiv:2304.05977), on transformers' BLIP towers.

    Weights: ``ImageReward.pt`` from the Hugging Face repository THUDM/ImageReward
    (``hf download THUDM/ImageReward ImageReward.pt --local-dir /models/image_reward``): a torch pickle of the state
    dict, read with ``torch.load(weights_only=True)`` (a .safetensors of the same dict also works). Its med_config.json
    is not needed: the sizes are read from the tensors (heads = width / 64 unless ``vision_heads``/``text_heads``).
    Tokenizer: the bert-base-uncased folder (``hf download google-bert/bert-base-uncased vocab.txt tokenizer_config.json
    tokenizer.json --local-dir /models/bert-base-uncased``). Check the file: ``sha256sum`` against the SHA256 the hub's
    file page shows; the file holds about 446.7M float32 values (about 1.8 GB). The loader itself places every tensor
    (BLIP ViT-L/16: 24 blocks of width 1024; BERT: 12 layers with cross-attention, vocabulary 30524; the 5-layer head:
    620 tensors, 446,206,689 parameters) and fails naming any key it cannot place, or any parameter left unset.

    Kwargs: ``checkpoint``, ``tokenizer_path``; ``device`` (default: the images'); ``dtype`` of the towers (default
    float32; the head runs in float32).
    """
    path = _require(Path(checkpoint), "ImageReward.pt (the ImageReward state dict)")
    state = load_state_dict_file(path, "ImageReward's state dict")
    model = ImageRewardModel(state, vision_heads, text_heads)
    load_image_reward_state(model, state, path)
    del state
    model = model.eval().requires_grad_(False)
    model.vision.to(_dtype(dtype))
    model.text.to(_dtype(dtype))
    tokenizer = load_bert_tokenizer(tokenizer_path, model.text.config.vocab_size)
    transform = ClipImageTransform(None, model.vision.config.image_size, round_crop=True)

    @torch.no_grad()
    def fn(images, prompts, metadata):
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        target = _follow_device(model, device, images)
        tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                           return_tensors="pt")
        pixels = transform(images.to(target), model.vision.dtype)
        return model(pixels, tokens.input_ids.to(target), tokens.attention_mask.to(target)), {}

    fn.device = device  # where a reward server sends its images (None: they stay on the CPU)
    return fn
