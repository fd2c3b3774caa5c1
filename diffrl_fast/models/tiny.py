"""Tiny diffusers pipelines with random (seeded) weights, built offline for tests and benchmarks.

Nothing here touches a model hub: the tokenizers are generated locally, every network is built from a
config with seeded random weights, and the pipeline is written with ``save_pretrained(path)`` so that
``DiffusionPipeline.from_pretrained(path)`` loads it offline, exactly like a real checkpoint.

    path = cached_tiny_pipeline("sd")                        # 4x16x16 latents, 128x128 images
    path = cached_tiny_pipeline("sd", block_out_channels=(64, 128), layers_per_block=2, latent_size=32)
    pipe = StableDiffusionPipeline.from_pretrained(path)     # any loader works: it is a normal folder

Builders (each returns the folder as a string; same seed and arguments -> bit-identical weights):

- ``build_tiny_sd``:   StableDiffusionPipeline (SD 1.x layout: CLIPTextModel, UNet2DConditionModel, DDIM).
- ``build_tiny_sdxl``: StableDiffusionXLPipeline (two CLIP text encoders, "text_time" added conditioning).
- ``build_tiny_sd3``:  StableDiffusion3Pipeline (SD3Transformer2DModel, flow matching, two CLIP + one T5
  encoder). The T5 tokenizer is a small Unigram model built with the ``tokenizers`` library, so no
  sentencepiece file is needed. ``with_t5=False`` drops the T5 branch (the pipeline then feeds
  zeros in its place); diffusers does not list that branch as optional, so such a folder loads only
  with ``StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)``.
- ``build_tiny_flux``: FluxPipeline (FluxTransformer2DModel on 2x2-packed latents with a guidance embedding,
  CLIP + T5 text encoders, a 16-channel VAE, flow matching with dynamic shifting).
- ``build_tiny_wan``: WanPipeline (Wan2.1 text-to-video: WanTransformer3DModel on [B, 16, F, H, W] latents,
  AutoencoderKLWan, a UMT5 text encoder, the shipped UniPC flow-prediction scheduler).
- ``build_tiny_qwen_image``: QwenImagePipeline (QwenImageTransformer2DModel, a Qwen2.5-VL text encoder on a
  byte-level Qwen2 tokenizer, AutoencoderKLQwenImage, dynamic exponential shifting).
- ``build_tiny_z_image``: ZImagePipeline (ZImageTransformer2DModel, a Qwen3 text encoder behind Qwen3's chat
  template, FLUX's VAE layout, Z-Image-Turbo's static shift).
- ``build_tiny_flux2_klein``: Flux2KleinPipeline (Flux2Transformer2DModel, a 28-layer Qwen3 text encoder read at
  layers 9, 18 and 27, AutoencoderKLFlux2 with its latent batch norm, FLUX.2's empirical shift).
- ``build_tiny_flux2_dev``: Flux2Pipeline (FLUX.2 [dev]: the same transformer with a guidance embedding, a Mistral-3
  text encoder read at layers 10, 20 and 30 behind a PixtralProcessor).
- ``build_tiny_clip``: a CLIPModel folder (weights, tokenizer, preprocessor config) for the CLIP rewards.

Sizes: the UNet sees ``latent_size`` x ``latent_size`` latents and the VAE decodes them to
``latent_size * vae_scale_factor`` pixels (default factor 8, as in Stable Diffusion).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

# Bump when a builder's output changes for the same arguments: cached folders are keyed by it.
BUILDER_VERSION = 1

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Whole-word tokens of the tiny vocabularies. Anything else still tokenizes (CLIP: byte-level
# pieces; T5: single characters), only less compactly.
WORDS = tuple(
    """
    a an the of in on at with and or to by for from is are this that it its
    photo picture image painting drawing sketch render art style portrait close up high quality
    black white red green blue yellow orange purple pink brown gray grey dark light bright
    big small tiny large old young happy sad cute funny beautiful
    cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox
    wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog
    chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo
    eating riding playing sitting standing running flying swimming holding wearing
    burger pizza apple banana cake hat tree flower house car bike boat city forest beach mountain
    sky sun moon star water fire snow street room table chair book
    zero one two three four five six seven eight nine ten digit number handwritten
    """.split()
)


_BUILD_LOCK = threading.RLock()


@contextlib.contextmanager
def _seeded(seed: int):
    """Run with torch's global RNG seeded, restoring the caller's RNG state afterwards.

    Module constructors draw their initial weights from the global RNG, so builds are serialised
    by a lock: two threads building at once would interleave their draws.
    """
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: 256 printable characters, one per byte, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + shift)
            shift += 1
    return [chr(c) for c in codes]


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the adjacent pair of lowest rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, math.inf), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def tiny_clip_vocab() -> tuple[dict[str, int], list[str]]:
    """The tiny CLIP BPE vocabulary and merges, laid out like OpenAI CLIP's.

    Ids: 256 byte characters, the same with the end-of-word suffix ``</w>``, one entry per merge,
    then ``<|startoftext|>`` and ``<|endoftext|>`` last (so the EOS id is the largest, as in CLIP).
    Every word of ``WORDS`` becomes a single ``word</w>`` token: a word gets new merges (appended,
    so with the lowest priority) until the merges learnt so far spell it as one symbol; merges
    added later never fire on earlier words, which already collapse through higher-priority ones.
    """
    base = _byte_alphabet()
    tokens = base + [c + "</w>" for c in base]
    ranks: dict[tuple[str, str], int] = {}
    for word in WORDS:
        while len(symbols := _apply_merges([*word[:-1], word[-1] + "</w>"], ranks)) > 1:
            ranks[symbols[0], symbols[1]] = len(ranks)
            tokens.append(symbols[0] + symbols[1])
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in ranks]


def _write_clip_vocab(folder: Path) -> None:
    vocab, merges = tiny_clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def write_tiny_clip_tokenizer(folder, *, model_max_length: int = 77) -> str:
    """Write a tiny CLIP BPE tokenizer as vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json.

    ``CLIPTokenizer.from_pretrained(folder)`` loads it (transformers 4 and 5). Padding uses
    ``<|endoftext|>`` as CLIP does. Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_clip_vocab(folder)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, **special}
    config["model_input_names"] = ["input_ids", "attention_mask"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return str(folder)


def tiny_clip_tokenizer(*, model_max_length: int = 77):
    """The tiny CLIP tokenizer as a ``CLIPTokenizer`` (written to a temporary folder and loaded back).

    Going through files rather than ``CLIPTokenizer(vocab_file=...)`` matters: transformers 5
    silently ignores ``vocab_file``/``merges_file`` keyword arguments.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp, model_max_length=model_max_length))


def write_tiny_t5_tokenizer(folder, *, model_max_length: int = 256) -> str:
    """Write a tiny T5-style Unigram tokenizer (tokenizer.json + configs) without sentencepiece.

    Pieces: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 (T5's ids), then "▁word" for every word of
    ``WORDS``, then single characters with and without the "▁" word-start marker. Whole words score
    higher than their spelling, so known words stay one piece. Loads with ``T5TokenizerFast`` or
    ``AutoTokenizer``; encoding appends ``</s>`` as T5 does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -2.0) for w in WORDS]
    pieces += [("▁" + c, -4.0) for c in chars] + [(c, -5.0) for c in chars]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": model_max_length, "extra_ids": 0, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return str(folder)


# ----------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------


def _clip_text_config(hidden_size: int, *, projection_dim: int | None = None, max_length: int = 77):
    from transformers import CLIPTextConfig

    vocab, _ = tiny_clip_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim or hidden_size,
        num_hidden_layers=2,  # >= 2 so SDXL's penultimate-layer features exist
        num_attention_heads=2,
        max_position_embeddings=max_length,
        hidden_act="quick_gelu",  # OpenAI CLIP's activation
        # Pool at the first EOS (not argmax of ids: that legacy path is taken only when eos id == 2).
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )


def _tiny_vae(*, latent_channels: int, latent_size: int, vae_scale_factor: int, **sd_config):
    """AutoencoderKL with one encoder/decoder block per factor of 2 of downsampling (narrow channels)."""
    from diffusers import AutoencoderKL

    if vae_scale_factor < 1 or vae_scale_factor & (vae_scale_factor - 1):
        raise ValueError(f"vae_scale_factor must be a power of 2, got {vae_scale_factor}")
    n_blocks = int(math.log2(vae_scale_factor)) + 1
    channels = tuple(min(8 * 2**i, 32) for i in range(n_blocks))
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=latent_size * vae_scale_factor,
        **sd_config,
    )


def _tiny_t5(width: int, seed: int, model_max_length: int = 256):
    """(T5TokenizerFast, T5EncoderModel): the locally built Unigram tokenizer and a 2-layer T5 v1.1 encoder
    (gated GELU, as SD3's and FLUX's T5-XXL) of ``width``, weights seeded with ``seed``."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = T5TokenizerFast.from_pretrained(write_tiny_t5_tokenizer(tmp, model_max_length=model_max_length))
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=16,
        d_ff=2 * width,
        num_layers=2,
        num_heads=max(1, width // 16),
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    with _seeded(seed):
        return tokenizer, T5EncoderModel(config)


def _flow_vae(*, latent_channels: int, latent_size: int, vae_scale_factor: int, shift: float, scale: float, seed: int):
    """The 16-channel VAEs of SD3 and FLUX: no quant convs, the model's shift and scaling factors."""
    with _seeded(seed):
        return _tiny_vae(latent_channels=latent_channels, latent_size=latent_size, vae_scale_factor=vae_scale_factor,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift, scaling_factor=scale)


def _unet_block_types(n: int, *, attention_first: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Down/up block types: SD 1.x puts cross-attention everywhere but the lowest resolution,
    SDXL everywhere but the highest. Up blocks mirror the down blocks."""
    if n == 1:
        kinds = [True]
    elif attention_first:
        kinds = [True] * (n - 1) + [False]
    else:
        kinds = [False] + [True] * (n - 1)
    down = tuple("CrossAttnDownBlock2D" if k else "DownBlock2D" for k in kinds)
    up = tuple("CrossAttnUpBlock2D" if k else "UpBlock2D" for k in reversed(kinds))
    return down, up


def _ddpm_family_scheduler(name: str, prediction_type: str):
    """Stable Diffusion's noise schedule (scaled_linear betas 0.00085..0.012, 1000 steps, "leading"
    spacing with steps_offset=1) for the samplers named "ddim" (default), "ddpm" or "euler"."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    if name == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    if name == "ddpm":
        return DDPMScheduler(clip_sample=False, **common)
    if name == "euler":
        return EulerDiscreteScheduler(**common)
    raise ValueError(f"unknown scheduler {name!r}; expected 'ddim', 'ddpm' or 'euler'")


def _heads(channels, head_dim: int) -> tuple[int, ...]:
    # diffusers' UNet calls the number of heads "attention_head_dim" (a historical misnomer).
    return tuple(max(1, c // head_dim) for c in channels)


def _save(pipe, path) -> str:
    """Save the pipeline, then add vocab.json/merges.txt next to each CLIP tokenizer.json so the
    folder also loads with tokenizer classes that read the classic files."""
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is not None and (path / name).is_dir():
            _write_clip_vocab(path / name)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def build_tiny_sd(
    path,
    *,
    block_out_channels=(32, 64),
    layers_per_block: int = 1,
    latent_size: int = 16,
    cross_attention_dim: int = 32,
    seed: int = 0,
    scheduler: str = "ddim",
    prediction_type: str = "epsilon",
    head_dim: int = 16,
    vae_scale_factor: int = 8,
    max_length: int = 77,
    num_heads: int | None = None,
) -> str:
    """Build a random tiny ``StableDiffusionPipeline`` (SD 1.x layout) into ``path``; returns the path.

    Text encoder: CLIPTextModel, hidden ``cross_attention_dim``, 2 layers, 2 heads, context ``max_length``.
    UNet: ``block_out_channels`` wide, 4 latent channels, cross-attention in all but the last block,
    ``head_dim`` channels per head (or ``num_heads`` heads in every block, as SD 1.5's config has 8).
    VAE: 4 latent channels, ``latent_size * vae_scale_factor`` pixels.
    ``block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, num_heads=8,
    latent_size=64`` is SD 1.5's UNet (860M parameters) with a tiny text encoder and VAE.
    Scheduler: DDIM with SD's config (clip_sample=False, set_alpha_to_one=False, steps_offset=1).
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    block_out_channels = tuple(block_out_channels)
    down, up = _unet_block_types(len(block_out_channels), attention_first=True)
    with _seeded(seed):
        text_encoder = CLIPTextModel(_clip_text_config(cross_attention_dim, max_length=max_length))
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=4,
            out_channels=4,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=num_heads if num_heads is not None else _heads(block_out_channels, head_dim),
            norm_num_groups=math.gcd(32, *block_out_channels),
        )
    with _seeded(seed):
        vae = _tiny_vae(latent_channels=4, latent_size=latent_size, vae_scale_factor=vae_scale_factor)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(model_max_length=max_length),
        unet=unet,
        scheduler=_ddpm_family_scheduler(scheduler, prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save(pipe, path)


def build_tiny_sdxl(
    path,
    *,
    block_out_channels=(32, 64),
    layers_per_block: int = 1,
    latent_size: int = 16,
    text_hidden_size: int = 32,
    addition_time_embed_dim: int = 8,
    seed: int = 0,
    scheduler: str = "ddim",
    prediction_type: str = "epsilon",
    head_dim: int = 16,
    vae_scale_factor: int = 8,
    max_length: int = 77,
) -> str:
    """Build a random tiny ``StableDiffusionXLPipeline`` into ``path``; returns the path.

    Two text encoders of hidden ``text_hidden_size`` (CLIPTextModel and CLIPTextModelWithProjection,
    projection dim = hidden), so the UNet's cross_attention_dim = 2 * hidden and its "text_time"
    added conditioning takes 6 size/crop numbers embedded in ``addition_time_embed_dim`` each plus
    the pooled text: projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + hidden.
    UNet blocks as in SDXL (no attention at the highest resolution, linear projections,
    2 transformer layers deeper down). DDIM with SDXL's config.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    block_out_channels = tuple(block_out_channels)
    n = len(block_out_channels)
    down, up = _unet_block_types(n, attention_first=False)
    with _seeded(seed):
        text_encoder = CLIPTextModel(_clip_text_config(text_hidden_size, max_length=max_length))
    with _seeded(seed + 1):  # a different draw, so the two encoders differ as in SDXL
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(text_hidden_size, max_length=max_length))
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=4,
            out_channels=4,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            transformer_layers_per_block=tuple(min(i + 1, 2) for i in range(n)),
            cross_attention_dim=2 * text_hidden_size,
            attention_head_dim=_heads(block_out_channels, head_dim),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=6 * addition_time_embed_dim + text_hidden_size,
            norm_num_groups=math.gcd(32, *block_out_channels),
        )
    with _seeded(seed):
        vae = _tiny_vae(
            latent_channels=4, latent_size=latent_size, vae_scale_factor=vae_scale_factor, scaling_factor=0.13025
        )
    tokenizer = tiny_clip_tokenizer(model_max_length=max_length)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_ddpm_family_scheduler(scheduler, prediction_type),
        force_zeros_for_empty_prompt=True,
    )
    return _save(pipe, path)


def build_tiny_sd3(
    path,
    *,
    latent_size: int = 16,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    patch_size: int = 2,
    latent_channels: int = 16,
    text_hidden_size: int = 32,
    with_t5: bool = True,
    seed: int = 0,
    shift: float = 3.0,
    vae_scale_factor: int = 8,
    max_length: int = 77,
) -> str:
    """Build a random tiny ``StableDiffusion3Pipeline`` into ``path``; returns the path.

    Transformer: SD3Transformer2DModel (MMDiT) with ``num_layers`` joint blocks of width
    ``num_attention_heads * attention_head_dim``. Text: two CLIPTextModelWithProjection (hidden and
    projection ``text_hidden_size``; pooled_projection_dim = 2 * hidden) and a tiny T5EncoderModel
    whose width is the joint_attention_dim (>= 2 * hidden, since the pipeline zero-pads the
    concatenated CLIP features to the T5 width). VAE: SD3's 16 latent channels, no quant convs,
    shift/scale 0.0609/1.5305. Scheduler: FlowMatchEulerDiscreteScheduler(shift=3.0) as SD3.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    joint_dim = max(64, 2 * text_hidden_size)
    with _seeded(seed):
        text_encoder = CLIPTextModelWithProjection(_clip_text_config(text_hidden_size, max_length=max_length))
    with _seeded(seed + 1):
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(text_hidden_size, max_length=max_length))
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        tokenizer_3, text_encoder_3 = _tiny_t5(joint_dim, seed + 2)
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=latent_size,
            patch_size=patch_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_dim,
            caption_projection_dim=num_attention_heads * attention_head_dim,
            pooled_projection_dim=2 * text_hidden_size,
        )
    vae = _flow_vae(latent_channels=latent_channels, latent_size=latent_size, vae_scale_factor=vae_scale_factor,
                    shift=0.0609, scale=1.5305, seed=seed)
    tokenizer = tiny_clip_tokenizer(model_max_length=max_length)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return _save(pipe, path)


def build_tiny_flux(
    path,
    *,
    latent_size: int = 16,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    latent_channels: int = 16,
    text_hidden_size: int = 32,
    t5_width: int = 64,
    guidance_embeds: bool = True,
    seed: int = 0,
    vae_scale_factor: int = 8,
    max_length: int = 77,
    t5_max_length: int = 32,
) -> str:
    """Build a random tiny ``FluxPipeline`` into ``path``; returns the path.

    Transformer: FluxTransformer2DModel with ``num_layers`` double-stream and ``num_single_layers``
    single-stream blocks, 2x2-packed latents (in_channels = 4 x ``latent_channels``), rotary axes
    (4, 6, 6) summing to the head width 16, and a guidance embedding as FLUX.1-dev (``guidance_embeds``;
    False: FLUX.1-schnell's layout). Text: a CLIPTextModel (pooled features) and a tiny T5 encoder of width
    ``t5_width`` (the sequence features), T5 prompts padded to ``t5_max_length`` tokens. VAE: 16 latent
    channels, no quant convs, FLUX's shift/scale 0.1159/0.3611, native size latent_size x vae_scale_factor
    pixels. Scheduler: FlowMatchEulerDiscreteScheduler with FLUX.1's dynamic shifting.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    if latent_size % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latent_size must be even, got {latent_size}")
    if attention_head_dim != 16:
        raise ValueError("the tiny FLUX's rotary axes (4, 6, 6) need attention_head_dim=16")
    with _seeded(seed):
        text_encoder = CLIPTextModel(_clip_text_config(text_hidden_size, max_length=max_length))
    tokenizer_2, text_encoder_2 = _tiny_t5(t5_width, seed + 2, model_max_length=t5_max_length)
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=t5_width,
            pooled_projection_dim=text_hidden_size,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        )
    vae = _flow_vae(latent_channels=latent_channels, latent_size=latent_size, vae_scale_factor=vae_scale_factor,
                    shift=0.1159, scale=0.3611, seed=seed)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(model_max_length=max_length),
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    return _save(pipe, path)


def _tiny_umt5(width: int, seed: int, model_max_length: int):
    """(T5TokenizerFast, UMT5EncoderModel): Wan's text encoder class (UMT5: per-layer relative position biases) at
    ``width``, on the same locally built Unigram tokenizer as the tiny T5."""
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = T5TokenizerFast.from_pretrained(write_tiny_t5_tokenizer(tmp, model_max_length=model_max_length))
    config = UMT5Config(vocab_size=len(tokenizer), d_model=width, d_kv=16, d_ff=2 * width, num_layers=2,
                        num_heads=max(1, width // 16), relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with _seeded(seed):
        return tokenizer, UMT5EncoderModel(config)


def build_tiny_wan(
    path,
    *,
    num_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 12,
    text_width: int = 32,
    scheduler: str = "unipc",
    flow_shift: float = 3.0,
    seed: int = 0,
    max_sequence_length: int = 16,
) -> str:
    """Build a random tiny ``WanPipeline`` (Wan2.1 text-to-video) into ``path``; returns the path.

    Transformer: WanTransformer3DModel with (1, 2, 2) patches over [B, 16, F, H, W] latents, ``num_layers``
    blocks, QK RMS norm across heads and a cross-attention norm, as Wan2.1. VAE: AutoencoderKLWan (16 latent
    channels, Wan2.1's latent mean/std, 4x temporal and 8x spatial compression: F pixel frames with
    (F - 1) % 4 == 0 become (F - 1) / 4 + 1 latent frames). Text: a UMT5 encoder of width ``text_width`` on the
    tiny T5 tokenizer, prompts padded to ``max_sequence_length`` tokens (Wan2.1: 512). Scheduler as shipped by
    Wan2.1-T2V-1.3B-Diffusers: "unipc" is UniPCMultistepScheduler with flow prediction, flow sigmas and
    ``flow_shift`` (3.0 for 480p, 5.0 for 720p); "euler" a FlowMatchEulerDiscreteScheduler with the same shift
    (the sampler the rollout runs, so a stock pipeline built with it reproduces our deterministic rollout).
    Like Wan's own configs, nothing here fixes a size: the pipeline's default is 81 frames of 480 x 832 pixels, so a
    tiny run names its own (e.g. sample.height=32 sample.width=32 sample.num_frames=5).
    """
    from .._versions import require_feature

    require_feature("Wan pipelines (WanPipeline)")
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tokenizer, text_encoder = _tiny_umt5(text_width, seed + 2, max_sequence_length)
    with _seeded(seed):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=16, out_channels=16, text_dim=text_width, freq_dim=32, ffn_dim=2 * num_attention_heads * attention_head_dim,
            num_layers=num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        )
    with _seeded(seed + 1):
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
                                        num_train_timesteps=1000, solver_order=2, final_sigmas_type="zero")
    elif scheduler == "euler":
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift)
    else:
        raise ValueError(f"scheduler must be 'unipc' (Wan2.1's as shipped) or 'euler', got {scheduler!r}")
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=sched, transformer=transformer)
    return _save(pipe, path)


# Qwen3's chat template, reduced to what a text-to-image prompt encoder renders: the user turn, then the assistant's
# opening (with enable_thinking=False, Qwen3 adds an empty think block)
QWEN3_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                       "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                       "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def _write_byte_level_tokenizer(folder, specials: list[str], config: dict) -> str:
    """A byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json ``config``): the 256 byte characters of
    GPT-2's byte-to-unicode table, one token per byte (no merges), then ``specials``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return str(folder)


def write_tiny_qwen2_tokenizer(folder, *, model_max_length: int = 32768) -> str:
    """Write a tiny Qwen2-style byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json), built locally.

    Vocabulary: one token per byte, then Qwen's special tokens ``<|endoftext|>`` (padding), ``<|im_start|>`` and
    ``<|im_end|>``, which the chat templates of Qwen-Image's, Z-Image's and FLUX.2 [klein]'s prompt encoders use.
    Loads with ``AutoTokenizer`` as a Qwen2 tokenizer.
    """
    config = {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": model_max_length, "pad_token": "<|endoftext|>",
              "eos_token": "<|im_end|>", "bos_token": None, "unk_token": None, "add_prefix_space": False, "errors": "replace"}
    return _write_byte_level_tokenizer(folder, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], config)


def build_tiny_qwen_image(
    path,
    *,
    latent_size: int = 8,
    num_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    text_width: int = 32,
    seed: int = 0,
) -> str:
    """Build a random tiny ``QwenImagePipeline`` into ``path``; returns the path.

    Transformer: QwenImageTransformer2DModel with ``num_layers`` blocks on 2x2-packed 16-channel latents, rotary
    axes (4, 6, 6) summing to the head width 16. Text: a Qwen2.5-VL model (2 text layers of width ``text_width``,
    multimodal rotary sections (2, 3, 3), a 1-block vision tower that text prompts never reach) on the tiny byte-level
    Qwen2 tokenizer. VAE: AutoencoderKLQwenImage (16 latent channels, Qwen-Image's latent mean/std, 8x spatial).
    Scheduler: Qwen-Image's FlowMatchEulerDiscreteScheduler (dynamic exponential shifting, base/max shift 0.5/0.9
    over 256..8192 tokens, shift_terminal 0.02). QwenImagePipeline's native size is 1024 pixels whatever the
    weights, so a tiny run names its own: sample.height = sample.width = ``latent_size`` x 8.
    """
    from .._versions import require_feature

    require_feature("Qwen-Image pipelines (QwenImagePipeline)")
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if attention_head_dim != 16:
        raise ValueError("the tiny Qwen-Image's rotary axes (4, 6, 6) need attention_head_dim=16")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(write_tiny_qwen2_tokenizer(tmp))
    heads = 2
    text = dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=2048, rms_norm_eps=1e-6,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=10000.0,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    if (text_width // heads) // 2 != 8:
        raise ValueError("the tiny Qwen2.5-VL's rotary sections (2, 3, 3) need text_width=32")
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text_width, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0])
    with _seeded(seed + 2):
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    with _seeded(seed):
        transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers,
                                                  attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
                                                  joint_attention_dim=text_width, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    with _seeded(seed + 1):
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    return _save(pipe, path)


def build_tiny_z_image(
    path,
    *,
    latent_size: int = 8,
    num_layers: int = 1,
    num_refiner_layers: int = 1,
    dim: int = 32,
    text_width: int = 32,
    seed: int = 0,
) -> str:
    """Build a random tiny ``ZImagePipeline`` into ``path``; returns the path.

    Transformer: ZImageTransformer2DModel (``num_layers`` main and ``num_refiner_layers`` noise/context refiner
    blocks, width ``dim``, 2 heads of 16, rotary axes (4, 6, 6)) on 2x2 patches of 16-channel latents. Text: a
    2-layer Qwen3 model of width ``text_width`` on the tiny byte-level Qwen2 tokenizer with Qwen3's chat template
    (ZImagePipeline reads the second-to-last hidden states of the templated prompt). VAE: FLUX's layout (16
    channels, shift/scale 0.1159/0.3611, 8x). Scheduler: Z-Image-Turbo's FlowMatchEulerDiscreteScheduler (static
    shift 3). ZImagePipeline's native size is 1024 pixels whatever the weights, so a tiny run names its own:
    sample.height = sample.width = ``latent_size`` x 8.
    """
    from .._versions import require_feature

    require_feature("Z-Image pipelines (ZImagePipeline)")
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    if dim != 32:
        raise ValueError("the tiny Z-Image's rotary axes (4, 6, 6) need 2 heads of 16: dim=32")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(write_tiny_qwen2_tokenizer(tmp))
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    with _seeded(seed + 2):
        text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              head_dim=text_width // 2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    with _seeded(seed):
        transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=dim, n_layers=num_layers,
                                               n_refiner_layers=num_refiner_layers, n_heads=2, n_kv_heads=2, cap_feat_dim=text_width,
                                               axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64])
    vae = _flow_vae(latent_channels=16, latent_size=latent_size, vae_scale_factor=8, shift=0.1159, scale=0.3611, seed=seed + 1)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    return _save(pipe, path)


def _flux2_parts(latent_size: int, num_layers: int, num_single_layers: int, joint_attention_dim: int, guidance_embeds: bool,
                 seed: int):
    """(transformer, vae, scheduler) of a tiny FLUX.2: Flux2Transformer2DModel (2 heads of 16, rotary axes (4, 4, 4, 4))
    on 128-channel patchified latents; AutoencoderKLFlux2 (32 channels, 8x, a 2x2 patch) whose batch norm's running
    statistics are drawn at random, so that de-normalising is exercised; FLUX.2's FlowMatchEulerDiscreteScheduler
    (dynamic exponential shifting; the pipelines pass their empirical mu)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    with _seeded(seed):
        transformer = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=num_layers, num_single_layers=num_single_layers,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=joint_attention_dim,
                                              timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds)
    with _seeded(seed + 1):
        vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                 block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=32, norm_num_groups=8,
                                 sample_size=latent_size * 16)
        vae.bn.running_mean.copy_(0.1 * torch.randn(128))
        vae.bn.running_var.copy_(0.5 + torch.rand(128))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
                                                time_shift_type="exponential")
    return transformer, vae, scheduler


def build_tiny_flux2_klein(
    path,
    *,
    latent_size: int = 4,
    num_layers: int = 1,
    num_single_layers: int = 1,
    text_width: int = 16,
    seed: int = 0,
) -> str:
    """Build a random tiny ``Flux2KleinPipeline`` into ``path``; returns the path.

    ``_flux2_parts`` without a guidance embedding (the klein layout), not step-distilled (classifier-free guidance
    applies). Text: a 28-layer Qwen3ForCausalLM of width ``text_width`` (Flux2KleinPipeline reads layers 9, 18 and 27,
    so joint_attention_dim = 3 x ``text_width``) on the tiny byte-level Qwen2 tokenizer with Qwen3's chat template.
    The pipeline's native size is 1024 pixels whatever the weights, so a tiny run names its own: sample.height =
    sample.width = ``latent_size`` x 16.
    """
    from .._versions import require_feature

    require_feature("FLUX.2 pipelines (Flux2Pipeline, Flux2KleinPipeline)")
    from diffusers import Flux2KleinPipeline
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(write_tiny_qwen2_tokenizer(tmp))
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    with _seeded(seed + 2):
        text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                                                    num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
                                                    head_dim=text_width // 2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                                                    tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                                                    eos_token_id=tokenizer.eos_token_id))
    transformer, vae, scheduler = _flux2_parts(latent_size, num_layers, num_single_layers, 3 * text_width, False, seed)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              is_distilled=False)
    return _save(pipe, path)


# Mistral's chat template, reduced to what FLUX.2 [dev]'s prompt encoder renders: a system turn and user turns whose
# content is a list of text (or image) parts
MISTRAL3_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]"
                          "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}[/SYSTEM_PROMPT]{% elif message['role'] "
                          "== 'user' %}[INST]{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
                          "{% else %}[IMG]{% endif %}{% endfor %}[/INST]{% endif %}{% endfor %}")


def write_tiny_mistral_tokenizer(folder, *, model_max_length: int = 131072) -> str:
    """Write a tiny byte-level BPE tokenizer with Mistral-3's special tokens (``<s>``, ``</s>``, ``<pad>``, ``[INST]``,
    ``[/INST]``, ``[SYSTEM_PROMPT]``, ``[/SYSTEM_PROMPT]`` and Pixtral's ``[IMG]``, ``[IMG_BREAK]``, ``[IMG_END]``),
    one token per byte otherwise; loads with ``AutoTokenizer``."""
    specials = ["<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length, "bos_token": "<s>",
              "eos_token": "</s>", "pad_token": "<pad>", "unk_token": None, "padding_side": "left"}
    return _write_byte_level_tokenizer(folder, specials, config)


def build_tiny_flux2_dev(
    path,
    *,
    latent_size: int = 4,
    num_layers: int = 1,
    num_single_layers: int = 1,
    text_width: int = 16,
    seed: int = 0,
) -> str:
    """Build a random tiny ``Flux2Pipeline`` (FLUX.2 [dev]) into ``path``; returns the path.

    ``_flux2_parts`` with a guidance embedding (guidance-distilled, the dev layout). Text: Mistral3ForConditionalGeneration
    with a 30-layer Mistral language model of width ``text_width`` (Flux2Pipeline reads layers 10, 20 and 30, so
    joint_attention_dim = 3 x ``text_width``) and a 1-layer Pixtral vision tower that text prompts never reach. The
    pipeline's ``tokenizer`` component is the tiny Mistral tokenizer (``write_tiny_mistral_tokenizer``) with a Mistral
    chat template (system prompt, then the user's text): the text half of the PixtralProcessor that FLUX.2 [dev]
    ships, which renders a text-only conversation the same way, but which transformers only loads with torchvision
    (not in CPU environments). Native size as ``build_tiny_flux2_klein``.
    """
    from .._versions import require_feature

    require_feature("FLUX.2 pipelines (Flux2Pipeline, Flux2KleinPipeline)")
    from diffusers import Flux2Pipeline
    from transformers import AutoTokenizer, Mistral3Config, Mistral3ForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(write_tiny_mistral_tokenizer(tmp))
    tokenizer.chat_template = MISTRAL3_CHAT_TEMPLATE
    text = dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=text_width // 2,
                max_position_embeddings=1024, rms_norm_eps=1e-5, sliding_window=None, pad_token_id=tokenizer.pad_token_id)
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  head_dim=8, patch_size=4, image_size=32)
    with _seeded(seed + 2):
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                                       image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
                                                                       spatial_merge_size=1))
    transformer, vae, scheduler = _flux2_parts(latent_size, num_layers, num_single_layers, 3 * text_width, True, seed)
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    return _save(pipe, path)


def build_tiny_clip(
    path,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    projection_dim: int = 16,
    seed: int = 0,
    max_length: int = 77,
) -> str:
    """Build a random tiny ``CLIPModel`` folder for the CLIP rewards; returns the path.

    Holds config.json + model.safetensors, the tiny CLIP tokenizer and a preprocessor_config.json
    (shortest side and centre crop ``image_size``, OpenAI CLIP's mean/std), i.e. what
    ``CLIPModel``/``CLIPProcessor.from_pretrained`` expect of a real checkpoint such as ViT-L/14.
    """
    from transformers import CLIPConfig, CLIPModel

    text = _clip_text_config(hidden_size, projection_dim=projection_dim, max_length=max_length)
    vision = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=projection_dim)
    with _seeded(seed):
        model = CLIPModel(config)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    write_tiny_clip_tokenizer(path, model_max_length=max_length)
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return str(path)


# "clip" is no pipeline, but shares the cache: the CLIP rewards' tests and benchmarks need one.
BUILDERS = {"sd": build_tiny_sd, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux, "wan": build_tiny_wan,
            "qwen_image": build_tiny_qwen_image, "z_image": build_tiny_z_image, "flux2_klein": build_tiny_flux2_klein,
            "flux2_dev": build_tiny_flux2_dev,
            "clip": build_tiny_clip}


# ----------------------------------------------------------------------------------------------
# Shared cache
# ----------------------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """``$DIFFRL_FAST_CACHE`` if set, else ``~/.cache/diffrl_fast/tiny``."""
    return Path(os.environ.get("DIFFRL_FAST_CACHE") or Path.home() / ".cache" / "diffrl_fast" / "tiny")


def _cache_key(kind: str, kwargs: dict) -> str:
    import diffusers
    import transformers

    # Library versions are part of the key: a folder written by other versions may not load.
    spec = {
        "kind": kind,
        "kwargs": kwargs,
        "builder_version": BUILDER_VERSION,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    blob = json.dumps(spec, sort_keys=True, default=list)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def cached_tiny_pipeline(kind: str, root=None, **kwargs) -> str:
    """Path of the tiny model ``kind`` ("sd", "sdxl", "sd3", "flux", "wan", "qwen_image", "z_image", "flux2_klein", "flux2_dev", "clip") built with ``kwargs``, building it once.

    The folder lives under ``root`` (default ``default_cache_root()``), named by a hash of the kind,
    the arguments, ``BUILDER_VERSION`` and the diffusers/transformers versions. Safe when several
    processes ask at once: each builds into its own temporary folder and renames it into place
    (atomic on one file system); a process that loses the race discards its copy. The folder holds
    tiny_build.json (kind and arguments), written last, so its presence means the build completed.
    """
    if kind not in BUILDERS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; expected one of {sorted(BUILDERS)}")
    # Key on every argument, defaults included, so ("sd") and ("sd", latent_size=16) share a folder;
    # binding also rejects unknown arguments before any work.
    bound = inspect.signature(BUILDERS[kind]).bind("", **kwargs)
    bound.apply_defaults()
    kwargs = bound.kwargs  # the builders take everything but the path by keyword
    root = Path(root) if root is not None else default_cache_root()
    final = root / _cache_key(kind, kwargs)
    if (final / "tiny_build.json").is_file():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        BUILDERS[kind](tmp, **kwargs)
        (tmp / "tiny_build.json").write_text(json.dumps({"kind": kind, "kwargs": kwargs}, default=list, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its build into place first (rename onto a non-empty folder fails).
            if not (final / "tiny_build.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
