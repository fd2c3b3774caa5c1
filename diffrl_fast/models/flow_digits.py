"""The flow-digits world: a tiny rectified-flow transformer that draws handwritten digits where a prompt puts them.

The digits world (``models/digits.py``) is an epsilon-prediction UNet drawing one 16x16 digit. The methods the
field uses now (Flow-GRPO, DiffusionNFT, AWM, MixGRPO, ...) are defined on flow-matching transformers and
judged on layout tasks (GenEval: counting and positions). This world is that, small enough for two CPU cores:

- **Canvas**: 32x32 pixels, one channel, pixel space (no VAE): [-1, 1] in diffusion space, [0, 1] as an image.
  Background is black (-1). Digits are sklearn's bundled 8x8 handwritten digits upsampled to 16x16 (as in the
  digits world), placed in 16x16 slots with up to 1 pixel of jitter.
- **Slots** (row, column of the top-left corner): centre (8, 8), left (8, 0), right (8, 16), top (0, 8),
  bottom (16, 8).
- **Prompts** (``parse_layout``; numerals 0-9, case-insensitive, a trailing "." ignored):

    ``"7"``              one digit in the centre slot
    ``"3 left of 8"``    3 in the left slot, 8 in the right one ("8 right of 3" is the same layout)
    ``"2 above 5"``      2 in the top slot, 5 in the bottom one ("5 below 2" is the same layout)
    ``"two 4s"``         4 in both the left and the right slot ("two 4" is accepted too)
    ``""``               unconditional (classifier-free guidance's empty prompt)

  Relations take two different digits. That makes 10 + 4 x 90 + 10 = 380 prompts. The unordered digit pairs
  of ``HELDOUT_PAIRS`` (9 of the 45) are held out: their 72 relation prompts are never seen in pretraining
  (``FLOW_DIGITS_TRAIN_PROMPTS``: 308 prompts; ``FLOW_DIGITS_HELDOUT_PROMPTS``: 72), so a run can measure
  whether what RL teaches generalises to layouts it never trained on.
- **Model**: diffusers' ``SD3Transformer2DModel`` (the MMDiT of Stable Diffusion 3) on 4x4-pixel patches (64
  image tokens), velocity prediction, with ``FlowMatchEulerDiscreteScheduler``: loaded through the same
  ``DiffusionModel`` interface as SD3, so training on this world runs SD3's code paths (the flow SDE step,
  packed recompute, the flow KL forms, CFG and CFG-free sampling).
- **Text encoder**: ``LayoutPromptEncoder``, a learned embedding of the prompt's words (vocabulary
  ``VOCAB``) plus learned positions, 4 tokens; pooled = the 4 token vectors concatenated. Trained jointly with
  the transformer, frozen afterwards (it plays SD3's CLIP/T5).

The reward ``digit_layout`` (``rewards/layout.py``, from ``layout_scores`` here) scores each slot the prompt
constrains with the digits world's classifier. Rebuild the shipped weights with ``diffrl-fast pretrain flow-digits`` (its report, with the
quality figures, is assets/flow_digits_pretrain_report.json).
"""
from __future__ import annotations

import copy
import json
import math
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .digits import (ASSETS_DIR, _asset, _loss_summary, _public_config, _save, digits_split, load_digit_classifier,
                     load_digits_dataset)

CANVAS = 32
DIGIT_SIZE = 16
SLOTS = {"centre": (8, 8), "left": (8, 0), "right": (8, 16), "top": (0, 8), "bottom": (16, 8)}
SLOT_ORDER = ("centre", "left", "right", "top", "bottom")
# Where a layout's digits are not: its empty region must stay background. A horizontal pair leaves the strips above
# and below it empty, a vertical pair those beside it, a single digit everything around the centre slot.
ORIENTATION = {"single": ("centre",), "horizontal": ("left", "right"), "vertical": ("top", "bottom")}

TRANSFORMER_WEIGHTS = "flow_digits_transformer.safetensors"
ENCODER_WEIGHTS = "flow_digits_prompt_encoder.safetensors"
CONFIG = "flow_digits.json"
REPORT = "flow_digits_pretrain_report.json"

# ----------------------------------------------------------------------------------------- prompts

Layout = tuple[tuple[str, int], ...]  # ((slot, digit), ...) in SLOT_ORDER

GRAMMAR = ("'7' (one digit, centred); '3 left of 8' / '8 right of 3' (two different digits side by side); "
           "'2 above 5' / '5 below 2' (one over the other); 'two 4s' (the same digit twice, side by side); "
           "'' (unconditional). Digits are the numerals 0-9")

_RELATIONS = {"left": ("left", "right"), "right": ("right", "left"), "above": ("top", "bottom"), "below": ("bottom", "top")}


class LayoutPromptError(ValueError):
    """A prompt the flow-digits world's grammar does not accept (the message names the grammar)."""


def _digit(word: str) -> Optional[int]:
    return int(word) if len(word) == 1 and word.isdigit() else None


def parse_layout(prompt: str) -> Layout:
    """The layout a prompt asks for: ((slot, digit), ...) in ``SLOT_ORDER``; ``()`` for the unconditional "".

    "7" -> (("centre", 7),); "3 left of 8" and "8 right of 3" -> (("left", 3), ("right", 8)); "2 above 5" and
    "5 below 2" -> (("top", 2), ("bottom", 5)); "two 4s" -> (("left", 4), ("right", 4)). Raises
    ``LayoutPromptError`` naming the prompt and the grammar for anything else (a digit out of 0-9, a relation
    between equal digits, unknown words).
    """
    if not isinstance(prompt, str):
        raise LayoutPromptError(f"a flow-digits prompt must be a string, got {type(prompt).__name__} {prompt!r}; accepted: {GRAMMAR}")
    words = re.sub(r"\.$", "", prompt.strip().lower()).split()
    slots: dict[str, int] = {}
    if not words:
        return ()
    if len(words) == 1 and _digit(words[0]) is not None:
        slots = {"centre": _digit(words[0])}
    elif len(words) == 2 and words[0] == "two" and _digit(words[1].removesuffix("s")) is not None:
        d = _digit(words[1].removesuffix("s"))
        slots = {"left": d, "right": d}
    elif len(words) > 2 and words[1] in _RELATIONS and words[2:-1] == (["of"] if words[1] in ("left", "right") else []):
        a, b = _digit(words[0]), _digit(words[-1])
        if a is None or b is None:
            raise LayoutPromptError(f"cannot parse flow-digits prompt {prompt!r}: a relation takes two numerals 0-9; accepted: {GRAMMAR}")
        if a == b:
            raise LayoutPromptError(f"cannot parse flow-digits prompt {prompt!r}: a relation takes two different digits "
                                    f"(write 'two {a}s' for the same digit twice); accepted: {GRAMMAR}")
        first, second = _RELATIONS[words[1]]
        slots = {first: a, second: b}
    else:
        raise LayoutPromptError(f"cannot parse flow-digits prompt {prompt!r}; accepted: {GRAMMAR}")
    return tuple((s, slots[s]) for s in SLOT_ORDER if s in slots)


def orientation(layout: Layout) -> str:
    """'single', 'horizontal' or 'vertical' (the slots a layout uses), '' for the unconditional one."""
    used = tuple(s for s, _ in layout)
    for name, slots in ORIENTATION.items():
        if used == slots:
            return name
    return ""


def _rng_pairs() -> tuple[tuple[int, int], ...]:
    pairs = [(a, b) for a in range(10) for b in range(a + 1, 10)]
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(2024)).tolist()
    return tuple(sorted(pairs[i] for i in perm[:9]))


HELDOUT_PAIRS = _rng_pairs()  # 9 of the 45 unordered pairs, drawn once with a fixed seed


def all_prompts() -> list[str]:
    """Every prompt of the grammar in its canonical wording: 10 singles, 4 x 90 relations, 10 pairs ("two 4s")."""
    out = [str(d) for d in range(10)]
    for rel in ("left of", "right of", "above", "below"):
        out += [f"{a} {rel} {b}" for a in range(10) for b in range(10) if a != b]
    out += [f"two {d}s" for d in range(10)]
    return out


def is_heldout(prompt: str) -> bool:
    """Whether a prompt's digits form one of the ``HELDOUT_PAIRS`` (then it is never trained on in pretraining)."""
    digits = sorted(d for _, d in parse_layout(prompt))
    return len(digits) == 2 and digits[0] != digits[1] and tuple(digits) in HELDOUT_PAIRS


FLOW_DIGITS_TRAIN_PROMPTS = tuple(p for p in all_prompts() if not is_heldout(p))
FLOW_DIGITS_HELDOUT_PROMPTS = tuple(p for p in all_prompts() if is_heldout(p))
PROMPT_SETS = {"flow_digits_train": FLOW_DIGITS_TRAIN_PROMPTS, "flow_digits_heldout": FLOW_DIGITS_HELDOUT_PROMPTS}

# ---------------------------------------------------------------------------------------- encoder

VOCAB = ("<pad>",) + tuple(str(d) for d in range(10)) + ("left", "right", "above", "below", "of", "two")
MAX_TOKENS = 4


def tokenize(prompt: str) -> list[int]:
    """Token ids of a prompt (``parse_layout`` checks it first), padded with 0 to ``MAX_TOKENS``: "two 4s" -> two, 4."""
    parse_layout(prompt)
    words = re.sub(r"\.$", "", prompt.strip().lower()).split()
    ids = [VOCAB.index(w.removesuffix("s") if w.endswith("s") and w[:-1].isdigit() else w) for w in words]
    return ids + [0] * (MAX_TOKENS - len(ids))


class LayoutPromptEncoder(nn.Module):
    """The flow-digits world's text encoder: prompts -> (hidden [B, 4, D], pooled [B, 4 D]).

    hidden_i = E[token_i] + P[i] (a learned word embedding plus a learned position), pooled = the four hidden
    vectors concatenated: SD3's (T5 sequence, CLIP pooled) pair in miniature. Trained jointly with the
    transformer in pretraining, frozen afterwards.
    """

    def __init__(self, dim: int = 32):
        super().__init__()
        self.dim = dim
        self.words = nn.Embedding(len(VOCAB), dim)
        self.positions = nn.Parameter(torch.zeros(MAX_TOKENS, dim))
        nn.init.normal_(self.positions, std=0.02)

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.words(token_ids.to(self.words.weight.device)) + self.positions
        return hidden, hidden.flatten(1)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self(torch.tensor([tokenize(p) for p in prompts], dtype=torch.int64))


# ------------------------------------------------------------------------------------------ model

# A 0.3M-parameter MMDiT: 4x4 patches make 64 image tokens, so a step costs about as much as the digits UNet's.
TRANSFORMER_CONFIG = dict(
    sample_size=CANVAS, patch_size=4, in_channels=1, out_channels=1, num_layers=4, attention_head_dim=16,
    num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32 * MAX_TOKENS,
    pos_embed_max_size=CANVAS // 4,
)


def build_transformer(**overrides):
    """A freshly initialised ``SD3Transformer2DModel`` (``TRANSFORMER_CONFIG`` + overrides): x [B, 1, 32, 32],
    timestep [B] (sigma x 1000), encoder_hidden_states [B, 4, 32], pooled_projections [B, 128] -> velocity."""
    from diffusers import SD3Transformer2DModel

    config = {**TRANSFORMER_CONFIG, **overrides}
    config["pooled_projection_dim"] = config["joint_attention_dim"] * MAX_TOKENS
    return SD3Transformer2DModel(**config)


def make_scheduler():
    """``FlowMatchEulerDiscreteScheduler`` with shift 1: sigmas evenly spaced from 1 to 0 (rectified flow,
    Liu et al. 2023; x_sigma = (1 - sigma) x_0 + sigma noise, velocity v = noise - x_0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


# ------------------------------------------------------------------------------------------- data


@lru_cache(maxsize=1)
def _digits_by_class() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(train, held-out) images [N_c, 16, 16] in [0, 1] of each class, from the digits world's split."""
    images, labels = load_digits_dataset()
    images = (images[:, 0] + 1) / 2
    train_idx, held_idx = digits_split(len(labels))
    out = []
    for idx in (train_idx, held_idx):
        out.append(tuple(images[idx][labels[idx] == c] for c in range(10)))
    return out[0], out[1]


def render(layouts: Sequence[Layout], generator: torch.Generator, *, jitter: int = 1, split: str = "train") -> torch.Tensor:
    """Canvases [B, 1, 32, 32] in [0, 1]: each layout's digits drawn from sklearn's digits of that class (the
    ``digits_split`` part ``split``), each shifted by up to ``jitter`` pixels, combined by maximum."""
    pools = _digits_by_class()[0 if split == "train" else 1]
    canvas = torch.zeros(len(layouts), 1, CANVAS + 2 * jitter, CANVAS + 2 * jitter)
    for i, layout in enumerate(layouts):
        for slot, d in layout:
            pool = pools[d]
            img = pool[int(torch.randint(len(pool), (1,), generator=generator))]
            dy, dx = (torch.randint(0, 2 * jitter + 1, (2,), generator=generator) if jitter else torch.zeros(2, dtype=torch.int64)).tolist()
            r, c = SLOTS[slot]
            region = canvas[i, 0, r + dy:r + dy + DIGIT_SIZE, c + dx:c + dx + DIGIT_SIZE]
            torch.maximum(region, img, out=region)
    return canvas[:, :, jitter:jitter + CANVAS, jitter:jitter + CANVAS].contiguous()


def sample_training_prompts(n: int, generator: torch.Generator) -> list[str]:
    """n pretraining prompts: a single digit 20% of the time, a pair of equal digits 10%, a relation 70%
    (uniform over the four relations and the training pairs)."""
    singles = [p for p in FLOW_DIGITS_TRAIN_PROMPTS if len(p) == 1]
    pairs = [p for p in FLOW_DIGITS_TRAIN_PROMPTS if p.startswith("two")]
    relations = [p for p in FLOW_DIGITS_TRAIN_PROMPTS if p not in singles and p not in pairs]
    u = torch.rand(n, generator=generator).tolist()
    out = []
    for v in u:
        pool = singles if v < 0.2 else pairs if v < 0.3 else relations
        out.append(pool[int(torch.randint(len(pool), (1,), generator=generator))])
    return out


# ------------------------------------------------------------------------------------------ world


@dataclass
class FlowDigitsWorld:
    """The pretrained flow-digits transformer, its prompt encoder and scheduler (models in eval mode)."""

    transformer: nn.Module
    prompt_encoder: LayoutPromptEncoder
    scheduler: object  # diffusers.FlowMatchEulerDiscreteScheduler


def load_pretrained_flow_digits(device="cpu", dtype=torch.float32, directory: Union[str, Path, None] = None) -> FlowDigitsWorld:
    """Load the flow-digits world from safetensors + JSON (``diffrl_fast/assets/`` by default). Raises
    FileNotFoundError naming the missing file if it has not been built."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from safetensors.torch import load_file

    directory = Path(directory) if directory is not None else ASSETS_DIR
    config = json.loads(_asset(directory, CONFIG, "flow-digits").read_text())
    transformer = SD3Transformer2DModel.from_config(config["transformer"])
    transformer.load_state_dict(load_file(_asset(directory, TRANSFORMER_WEIGHTS, "flow-digits")))
    encoder = LayoutPromptEncoder(**config["prompt_encoder"])
    encoder.load_state_dict(load_file(_asset(directory, ENCODER_WEIGHTS, "flow-digits")))
    if dtype != torch.float32:
        transformer.to(dtype=dtype)
    return FlowDigitsWorld(
        transformer=transformer.to(device=device).eval(),
        prompt_encoder=encoder.to(device=device, dtype=dtype).eval().requires_grad_(False),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(config["scheduler"]),
    )


# ----------------------------------------------------------------------------------------- scoring

# ITU-R BT.601 luma: an RGB rendering of a grey canvas maps back to the same grey values
_LUMA = (0.299, 0.587, 0.114)


def canvas_input(images: torch.Tensor) -> torch.Tensor:
    """Canvases [B, 1 or 3, 32, 32] in [0, 1] -> grey [B, 32, 32] float in [0, 1] (RGB by luma); ValueError otherwise."""
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[-2:] != (CANVAS, CANVAS):
        raise ValueError(f"digit_layout expects flow-digits canvases [B, 1 or 3, {CANVAS}, {CANVAS}] in [0, 1], "
                         f"got shape {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 3:
        x = (x * x.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x[:, 0].clamp(0, 1)


EMPTY_WEIGHT = 5.0
# The empty region of each orientation, as a [32, 32] mask: 2 pixels away from the slots the layout uses, so a digit
# jittered by a pixel (as in the pretraining data) does not touch it.
_MARGIN = 2


def _empty_masks() -> dict[str, torch.Tensor]:
    masks = {}
    for name, box in {"single": (8, 8, 24, 24), "horizontal": (8, 0, 24, 32), "vertical": (0, 8, 32, 24)}.items():
        r0, c0, r1, c1 = box
        m = torch.ones(CANVAS, CANVAS, dtype=torch.bool)
        m[max(0, r0 - _MARGIN):r1 + _MARGIN, max(0, c0 - _MARGIN):c1 + _MARGIN] = False
        masks[name] = m
    return masks


EMPTY_MASKS = _empty_masks()


@torch.no_grad()
def layout_scores(classifier, images: torch.Tensor, layouts: Sequence[Layout]) -> dict:
    """Per-sample scores of canvases ``images`` [B, 1 (or 3), 32, 32] in [0, 1] against ``layouts``.

        reward_i  = sum over the layout's (slot, digit) of log softmax(f(crop_slot(x_i)))[digit]
                    - EMPTY_WEIGHT x mean of x_i over the layout's empty region
        correct_i = every constrained slot's top class is its digit (GenEval's pass/fail, Ghosh et al. 2023)

    f is the digit classifier (16x16 inputs), crop_slot the slot's 16x16 square (``models.flow_digits.SLOTS``).
    Range: (-inf, 0]; 0 is a certain classifier on every slot and a black empty region. A slot term is
    typically -20..0, the empty term -5..0 (all-white: -5). Returns {reward [B], correct [B] bool, slot_hits,
    slot_count} (CPU).
    """
    if len(layouts) != images.shape[0]:
        raise ValueError(f"digit_layout got {images.shape[0]} images for {len(layouts)} prompts")
    p = next(classifier.parameters())
    x = canvas_input(images.to(p.device))
    crops, targets, owner = [], [], []
    empty = torch.zeros(len(layouts))
    for i, layout in enumerate(layouts):
        kind = orientation(layout)
        if not kind:
            raise ValueError(f"digit_layout needs a layout for sample {i}; the unconditional prompt '' asks for none")
        for slot, digit in layout:
            r, c = SLOTS[slot]
            crops.append(x[i, r:r + DIGIT_SIZE, c:c + DIGIT_SIZE])
            targets.append(digit)
            owner.append(i)
        empty[i] = x[i][EMPTY_MASKS[kind].to(x.device)].float().mean().cpu()
    logp = classifier(torch.stack(crops)[:, None].to(p.dtype)).float().log_softmax(-1).cpu()
    targets_t, owner_t = torch.tensor(targets), torch.tensor(owner)
    slot_logp = logp.gather(1, targets_t[:, None]).squeeze(1)
    hit = logp.argmax(-1) == targets_t
    reward = torch.zeros(len(layouts)).index_add_(0, owner_t, slot_logp) - EMPTY_WEIGHT * empty
    misses = torch.zeros(len(layouts)).index_add_(0, owner_t, (~hit).float())
    return dict(reward=reward, correct=misses == 0, slot_hits=int(hit.sum()), slot_count=len(targets))


@torch.no_grad()
def slot_predictions(images: torch.Tensor, layouts: Sequence[Layout], classifier=None) -> list[list[tuple[int, int]]]:
    """Per image [B, 1 or 3, 32, 32] in [0, 1], (asked-for digit, the classifier's top class) of each slot its layout
    constrains, in ``SLOT_ORDER`` (the shipped digit classifier unless ``classifier`` is given)."""
    classifier = classifier if classifier is not None else _shipped_classifier()
    p = next(classifier.parameters())
    x = canvas_input(images.to(p.device))
    crops = [x[i, r:r + DIGIT_SIZE, c:c + DIGIT_SIZE] for i, layout in enumerate(layouts) for r, c in (SLOTS[s] for s, _ in layout)]
    if not crops:
        return [[] for _ in layouts]
    top = classifier(torch.stack(crops)[:, None].to(p.dtype)).argmax(-1).tolist()
    out, k = [], 0
    for layout in layouts:
        out.append([(d, top[k + j]) for j, (_, d) in enumerate(layout)])
        k += len(layout)
    return out


@lru_cache(maxsize=1)
def _shipped_classifier():
    return load_digit_classifier()


# ---------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_flow_digits(world: FlowDigitsWorld, prompts: Sequence[str], *, num_steps: int = 10, guidance_scale: float = 1.0,
                       noise_level: float = 0.7, generator: Optional[torch.Generator] = None,
                       switch_after: Optional[int] = None, other_prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Images [B, 1, 32, 32] in [0, 1], sampled with the flow SDE the trainer's rollouts use (Flow-GRPO's,
    ``diffusion.coefficients.flow_sde_schedule``): x' = a_j x + b_j v + s_j z, v = v_u + g (v_c - v_u).

    With ``switch_after=k`` the first k steps are conditioned on ``prompts`` and the rest on ``other_prompts``:
    how much of the layout the first k steps decide.
    """
    from ..diffusion.coefficients import make_schedule

    transformer, encoder = world.transformer, world.prompt_encoder
    p = next(transformer.parameters())
    B = len(prompts)
    sched = make_schedule(copy_scheduler(world.scheduler), num_steps, noise_level=noise_level)
    conds = [_conditions(encoder, prompts, guidance_scale, p)]
    if switch_after is not None:
        if other_prompts is None or len(other_prompts) != B:
            raise ValueError("switch_after needs other_prompts, one per prompt")
        conds.append(_conditions(encoder, other_prompts, guidance_scale, p))
    x = torch.randn((B, 1, CANVAS, CANVAS), generator=generator).to(p)
    for j in range(num_steps):
        hidden, pooled = conds[1 if switch_after is not None and j >= switch_after else 0]
        t = sched.timesteps[j].to(p.device).expand(len(hidden))
        model_in = torch.cat([x, x]) if guidance_scale != 1.0 else x
        v = transformer(hidden_states=model_in, timestep=t, encoder_hidden_states=hidden, pooled_projections=pooled, return_dict=False)[0]
        if guidance_scale != 1.0:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        x = float(sched.a[j]) * x + float(sched.b[j]) * v + float(sched.s[j]) * torch.randn(x.shape, generator=generator).to(p)
    return (x.float() / 2 + 0.5).clamp(0, 1)


def copy_scheduler(scheduler):
    return type(scheduler).from_config(scheduler.config)


def _conditions(encoder, prompts, guidance_scale, p):
    hidden, pooled = encoder.encode(list(prompts))
    if guidance_scale != 1.0:
        h_u, p_u = encoder.encode([""] * len(prompts))
        hidden, pooled = torch.cat([h_u, hidden]), torch.cat([p_u, pooled])
    return hidden.to(p), pooled.to(p)


@torch.no_grad()
def evaluate_layouts(world: FlowDigitsWorld, prompts: Sequence[str], *, num_samples: int, num_steps: int = 10,
                     guidance_scale: float = 1.0, noise_level: float = 0.7, seed: int = 0, batch_size: int = 250,
                     classifier=None, **sample_kwargs) -> dict:
    """Layout-correct rate and mean ``digit_layout`` reward of ``num_samples`` samples, prompt i = prompts[i mod n].

    Returns {layout_correct, layout_correct_se (binomial standard error), reward, slot_accuracy, n}.
    """
    if classifier is None:
        classifier = _shipped_classifier()
    gen = torch.Generator().manual_seed(seed)
    chosen = [prompts[i % len(prompts)] for i in range(num_samples)]
    others = sample_kwargs.pop("other_prompts", None)
    correct, rewards, slot_hits, slots = [], [], 0, 0
    for start in range(0, num_samples, batch_size):
        batch = chosen[start:start + batch_size]
        kw = dict(sample_kwargs)
        if others is not None:
            kw["other_prompts"] = [others[(start + i) % len(others)] for i in range(len(batch))]
        images = sample_flow_digits(world, batch, num_steps=num_steps, guidance_scale=guidance_scale,
                                    noise_level=noise_level, generator=gen, **kw)
        scores = layout_scores(classifier, images, [parse_layout(q) for q in batch])
        correct.append(scores["correct"])
        rewards.append(scores["reward"])
        slot_hits += int(scores["slot_hits"])
        slots += int(scores["slot_count"])
    ok = torch.cat(correct).float()
    rate = float(ok.mean())
    return dict(layout_correct=rate, layout_correct_se=math.sqrt(max(rate * (1 - rate), 1e-12) / len(ok)),
                reward=float(torch.cat(rewards).mean()), slot_accuracy=slot_hits / max(slots, 1), n=len(ok))


# -------------------------------------------------------------------------------------- pretraining


def pretrain_flow_digits(
    out_dir: Union[str, Path],
    *,
    steps: int = 6000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    cond_dropout: float = 0.1,
    caption_noise: float = 0.0,
    ema_decay: float = 0.999,
    warmup_steps: int = 200,
    log_every: int = 250,
    time_budget_s: Optional[float] = None,
    stop_after: Optional[int] = None,
    eval_every: int = 0,
    timestep_density: str = "logit_normal",
    transformer_overrides: Optional[dict] = None,
    teacher: Optional["FlowDigitsWorld"] = None,
    teacher_guidance: float = 1.0,
) -> dict:
    """Train the flow-digits transformer + prompt encoder from scratch by flow matching and write them to ``out_dir``.

    Loss (rectified flow / conditional flow matching, Liu et al. 2023, Lipman et al. 2023, as SD3 trains):
        E |v_theta(x_sigma, 1000 sigma, e(c')) - (noise - x_0)|^2,  x_sigma = (1 - sigma) x_0 + sigma noise,
    sigma ~ logit-normal(0, 1) (``timestep_density="logit_normal"``, SD3's, Esser et al. 2024) or U(0, 1)
    ("uniform", rectified flow's). Uniform trains the sampler's first steps (sigma >= 0.9, 1.4% of logit-normal's
    mass) more, but measured worse at the same step, with and without guidance (docs/worlds.md). x_0 = ``render`` of a prompt from
    ``sample_training_prompts`` (the held-out pairs never appear). c' = "" with probability ``cond_dropout`` (for
    classifier-free guidance); with probability ``caption_noise`` the image is drawn for a random other training
    prompt (noisy captions). AdamW, linear warm-up then cosine decay, gradient norm clipped to 1, EMA weights saved.
    ``stop_after`` (a step count) and ``time_budget_s`` stop early (the schedule is set for ``steps``). With ``eval_every`` the EMA weights are
    evaluated every that many steps (200 samples of the training prompts, 10 SDE steps, g = 1 and 3; off the
    clock): the metrics' quality_curve, what a shorter budget would have given. Writes the safetensors and
    flow_digits.json.

    With ``teacher`` (a ``FlowDigitsWorld``) this is guidance distillation instead (Meng et al. 2023, "On
    Distillation of Guided Diffusion Models", stage 1; FLUX.1-dev is a guidance-distilled model): the student
    starts from the teacher's transformer, keeps its frozen prompt encoder, and regresses the teacher's guided
    velocity at scale w = ``teacher_guidance`` on the same noised data:
        E |v_s(x_sigma, t, e(c')) - [v_T(x_sigma, t, e("")) + w (v_T(x_sigma, t, e(c')) - v_T(x_sigma, t, e("")))]|^2,
    so that the student's unguided sample is the teacher's guided one. For a dropped caption (c' = "") the target
    is the teacher's unconditional velocity, so the student keeps an unconditional branch and classifier-free
    guidance still works on it (a scale g on the student acts about as g x w on the teacher).
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup

    if timestep_density not in ("uniform", "logit_normal"):
        raise ValueError(f"timestep_density must be 'uniform' or 'logit_normal', got {timestep_density!r}")
    start = time.perf_counter()
    if teacher is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = build_transformer(**(transformer_overrides or {}))
            encoder = LayoutPromptEncoder(dim=transformer.config.joint_attention_dim)
        params = list(transformer.parameters()) + list(encoder.parameters())
    else:
        if transformer_overrides:
            raise ValueError("transformer_overrides cannot change a distilled student: it is a copy of the teacher")
        teacher.transformer.eval().requires_grad_(False)
        transformer = copy.deepcopy(teacher.transformer).requires_grad_(True)
        encoder = teacher.prompt_encoder
        params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    lr_schedule = get_cosine_schedule_with_warmup(opt, warmup_steps, steps)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    transformer.train()
    losses = []
    done = 0
    curve = []
    clock = 0.0  # training time, without the quality evaluations

    def evaluate_ema(step_count: int) -> None:
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
        transformer.eval()
        world = FlowDigitsWorld(transformer, encoder, make_scheduler())
        row = dict(step=step_count, train_time_s=round(clock, 1))
        for g in (1.0, 3.0):
            row[f"layout_correct_g{g:g}"] = evaluate_layouts(world, list(FLOW_DIGITS_TRAIN_PROMPTS), num_samples=200, guidance_scale=g,
                                                             seed=1)["layout_correct"]
        curve.append(row)
        print(f"[flow-digits] step {step_count}: layout correct {row['layout_correct_g1']:.3f} at g = 1, "
              f"{row['layout_correct_g3']:.3f} at g = 3 (EMA weights)", flush=True)
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
        transformer.train()

    for step in range(steps):
        tick = time.perf_counter()
        prompts = sample_training_prompts(batch_size, gen)
        drawn = list(prompts)
        noisy = (torch.rand(batch_size, generator=gen) < caption_noise).tolist()
        if any(noisy):
            others = sample_training_prompts(batch_size, gen)
            drawn = [o if n else p for p, o, n in zip(prompts, others, noisy)]
        x0 = render([parse_layout(p) for p in drawn], gen) * 2 - 1
        dropped = (torch.rand(batch_size, generator=gen) < cond_dropout).tolist()
        hidden, pooled = encoder.encode(["" if d else p for p, d in zip(prompts, dropped)])
        if timestep_density == "uniform":
            sigma = torch.rand(batch_size, generator=gen)
        else:
            sigma = torch.sigmoid(torch.randn(batch_size, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        target = noise - x0
        if teacher is not None:
            with torch.no_grad():
                h_u, p_u = encoder.encode([""] * batch_size)
                v_u, v_c = teacher.transformer(hidden_states=torch.cat([x_t, x_t]), timestep=torch.cat([sigma, sigma]) * 1000,
                                               encoder_hidden_states=torch.cat([h_u, hidden]),
                                               pooled_projections=torch.cat([p_u, pooled]), return_dict=False)[0].chunk(2)
                target = v_u + teacher_guidance * (v_c - v_u)
        v = transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=hidden, pooled_projections=pooled,
                        return_dict=False)[0]
        loss = F.mse_loss(v, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_schedule.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        done = step + 1
        clock += time.perf_counter() - tick
        if log_every and done % log_every == 0:
            recent = losses[-log_every:]
            print(f"[flow-digits] step {done}/{steps}  loss {sum(recent) / len(recent):.4f}  {clock:.0f}s", flush=True)
        if eval_every and done % eval_every == 0:
            evaluate_ema(done)
        if (time_budget_s is not None and clock > time_budget_s) or (stop_after is not None and done >= stop_after):
            break
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    transformer.eval()
    metrics = dict(steps=done, wall_time_s=round(time.perf_counter() - start, 2), train_time_s=round(clock, 2), quality_curve=curve,
                   transformer_params=sum(p.numel() for p in transformer.parameters()),
                   prompt_encoder_params=sum(p.numel() for p in encoder.parameters()), **_loss_summary(losses))
    config = dict(
        format="diffrl_fast.flow_digits", version=1, canvas=CANVAS, slots=SLOTS, heldout_pairs=[list(p) for p in HELDOUT_PAIRS],
        transformer=_public_config(transformer.config), prompt_encoder=dict(dim=encoder.dim),
        scheduler=_public_config(make_scheduler().config),
        training=dict(steps=steps, steps_done=done, batch_size=batch_size, lr=lr, seed=seed, cond_dropout=cond_dropout,
                      caption_noise=caption_noise, ema_decay=ema_decay, warmup_steps=warmup_steps, time_budget_s=time_budget_s,
                      stop_after=stop_after, timestep_density=timestep_density, distilled_at_guidance=teacher_guidance if teacher is not None else None,
                      data="sklearn load_digits (digits_split train part) rendered into layouts of the training prompts"),
        metrics=metrics,
    )
    _save(Path(out_dir), {TRANSFORMER_WEIGHTS: transformer.state_dict(), ENCODER_WEIGHTS: encoder.state_dict()}, CONFIG, config)
    return metrics


# ----------------------------------------------------------------------------------- quality report

REPORT_GUIDANCE = (1.0, 1.5, 2.0, 3.0, 4.5)


def other_prompts(prompts: Sequence[str]) -> list[str]:
    """The fixed other prompt of each prompt for the early-steps measurement: the training prompt half-way round the
    list from it, moved on until its layout differs in orientation or digits."""
    pool = FLOW_DIGITS_TRAIN_PROMPTS
    out = []
    for p in prompts:
        j = (pool.index(p) if p in pool else 0) + len(pool) // 2
        while parse_layout(pool[j % len(pool)]) == parse_layout(p):
            j += 1
        out.append(pool[j % len(pool)])
    return out


def quality_report(world: FlowDigitsWorld, *, num_samples: int = 1000, num_steps: int = 10, noise_level: float = 0.7,
                   eval_guidance: float = 1.0, guidance_scales: Sequence[float] = REPORT_GUIDANCE, seed: int = 0) -> dict:
    """The base model's quality, on ``num_samples`` fixed-seed samples each (SDE sampling, ``num_steps`` steps):

    - by_guidance: layout-correct rate and mean reward on the training prompts at each guidance scale;
    - heldout: the same at ``eval_guidance`` on the held-out prompts;
    - early_steps: layout-correct rate (against the prompt) when only the first k of T steps see the prompt and the
      rest see ``other_prompts``, k = 1, 2, T/2 and T (T: no switch), at ``eval_guidance``.
    """
    kw = dict(num_samples=num_samples, num_steps=num_steps, noise_level=noise_level, seed=seed)
    train = list(FLOW_DIGITS_TRAIN_PROMPTS)
    out = dict(num_samples=num_samples, num_steps=num_steps, noise_level=noise_level, eval_guidance=eval_guidance, seed=seed)
    start = time.perf_counter()
    out["by_guidance"] = [dict(guidance_scale=g, **evaluate_layouts(world, train, guidance_scale=g, **kw)) for g in guidance_scales]
    out["heldout"] = evaluate_layouts(world, list(FLOW_DIGITS_HELDOUT_PROMPTS), guidance_scale=eval_guidance, **kw)
    others = other_prompts(train)
    out["early_steps"] = []
    for k in sorted({1, 2, num_steps // 2, num_steps}):
        extra = dict(switch_after=k, other_prompts=others) if k < num_steps else {}
        out["early_steps"].append(dict(k=k, **evaluate_layouts(world, train, guidance_scale=eval_guidance, **kw, **extra)))
    out["wall_time_s"] = round(time.perf_counter() - start, 1)
    return out


TEACHER_SCHEDULE_STEPS = 10000  # the teacher's cosine schedule is set for this many steps ...
TEACHER_STEPS = 3700            # ... and stopped early (4000 steps gave 71.9% at g = 1 after distillation, above the 30-70% band)
DISTILL_GUIDANCE = 3.0          # the teacher's guidance scale the student learns to draw at g = 1
DISTILL_STEPS = 600


def pretrain_main(out_dir: Union[str, Path, None] = None, *, quick: bool = False, time_budget_s: float = 1500.0,
                  report_samples: int = 1000) -> dict:
    """Build the flow-digits world and write it, with flow_digits_pretrain_report.json, into ``diffrl_fast/assets/``
    unless ``out_dir`` is given:

    1. the teacher: ``pretrain_flow_digits`` from scratch, a cosine schedule of ``TEACHER_SCHEDULE_STEPS`` steps
       stopped after ``TEACHER_STEPS`` (or ``time_budget_s`` seconds, whichever comes first): a model that follows
       its prompt well only with guidance (its quality_curve in the report);
    2. the shipped model: the teacher guidance-distilled at w = ``DISTILL_GUIDANCE`` for ``DISTILL_STEPS`` steps
       (``pretrain_flow_digits(teacher=...)``), so that it draws at g = 1 what the teacher draws at g = 3, and
       guidance adds little on top (FLUX.1-dev's situation);
    3. its quality (``quality_report``).

    The teacher is stopped early on purpose: trained to the end it draws nearly every layout right, which leaves RL
    nothing to do. The digits world's classifiers (the reward) must exist: ``diffrl-fast pretrain digits`` builds
    them. ``quick=True``: a few steps and samples (a smoke test, not a usable model).
    """
    import tempfile

    from ..utils.provenance import machine_info

    machine = machine_info("cpu")  # the commit as the run starts: the code it imports
    out = Path(out_dir) if out_dir is not None else ASSETS_DIR
    print(f"[flow-digits] writing to {out}", flush=True)
    if quick:
        teacher_kw = dict(steps=20, log_every=10, warmup_steps=5)
        student_kw = dict(steps=10, log_every=10, warmup_steps=2)
    else:
        teacher_kw = dict(steps=TEACHER_SCHEDULE_STEPS, stop_after=TEACHER_STEPS, time_budget_s=time_budget_s, eval_every=1000)
        student_kw = dict(steps=DISTILL_STEPS, lr=3e-4, warmup_steps=50, eval_every=200)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_metrics = pretrain_flow_digits(tmp, **teacher_kw)
        print(f"[flow-digits] teacher: loss {teacher_metrics['loss_first']:.4f} -> {teacher_metrics['loss_last']:.4f} in "
              f"{teacher_metrics['steps']} steps, {teacher_metrics['wall_time_s']:.0f}s", flush=True)
        teacher = load_pretrained_flow_digits(directory=tmp)
        teacher_training = json.loads((Path(tmp) / CONFIG).read_text())["training"]
    metrics = pretrain_flow_digits(out, teacher=teacher, teacher_guidance=DISTILL_GUIDANCE, **student_kw)
    print(f"[flow-digits] distilled at guidance {DISTILL_GUIDANCE:g}: loss {metrics['loss_first']:.4f} -> "
          f"{metrics['loss_last']:.4f} in {metrics['steps']} steps, {metrics['wall_time_s']:.0f}s", flush=True)
    config = json.loads((out / CONFIG).read_text())
    config["teacher_training"] = teacher_training
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    world = load_pretrained_flow_digits(directory=out)
    quality = quality_report(world, num_samples=20 if quick else report_samples)
    for row in quality["by_guidance"]:
        print(f"[flow-digits] guidance {row['guidance_scale']:g}: layout correct {row['layout_correct']:.3f} "
              f"+- {row['layout_correct_se']:.3f}, reward {row['reward']:.3f}", flush=True)
    print(f"[flow-digits] held-out prompts: layout correct {quality['heldout']['layout_correct']:.3f}", flush=True)
    for row in quality["early_steps"]:
        print(f"[flow-digits] first {row['k']} of {quality['num_steps']} steps see the prompt: layout correct "
              f"{row['layout_correct']:.3f}", flush=True)
    command = "diffrl-fast pretrain flow-digits" + (" --quick" if quick else f" --budget-s {time_budget_s:g}")
    report = dict(machine=machine, command=command, teacher=teacher_metrics,
                  distillation=dict(guidance_scale=DISTILL_GUIDANCE, steps=metrics["steps"]), transformer=metrics,
                  quality=quality, prompts=dict(train=len(FLOW_DIGITS_TRAIN_PROMPTS), heldout=len(FLOW_DIGITS_HELDOUT_PROMPTS),
                                                heldout_pairs=[list(p) for p in HELDOUT_PAIRS], grammar=GRAMMAR))
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report
