"""The digits world: a tiny class-conditional pixel diffusion model that RL fine-tuning runs on in minutes on a CPU.

Everything here is small on purpose: sklearn's bundled 8x8 handwritten digits (1797 images, no
download) upsampled to 16x16, a 0.25M-parameter diffusers ``UNet2DConditionModel`` conditioned through
cross-attention on a one-token "prompt embedding" per class, diffusers' ``DDIMScheduler``, and a small
CNN classifier that serves as the reward model (``diffrl_fast.rewards.digits``).

Conventions
- Diffusion space: images [B, 1, 16, 16] in [-1, 1]. Reward / output space: [0, 1] (x01 = (x + 1) / 2).
- Classes 0..9 are digits; class 10 (``NULL_CLASS``) is the unconditional "empty prompt" used for
  classifier-free guidance (Ho and Salimans 2022): eps_hat = eps_u + g (eps_c - eps_u).
- Weights are safetensors, configs JSON (never pickles), in ``diffrl_fast/assets/``:
  digits_unet.safetensors + digits_prompt_encoder.safetensors + digits_unet.json (UNet, prompt-encoder
  and scheduler configs, training settings and metrics), digit_classifier.safetensors + digit_classifier.json.

The pretrained generator follows its class on purpose only imperfectly (trained with 50% caption
noise, see ``pretrain_digits_model``): at 20 DDIM steps, eta 1, about 73% of samples show the
conditioned digit at guidance 2 and 93% at guidance 3, so RL fine-tuning of ``digit_confidence``
has room to improve. Guidance 5 is nearly perfect.

Rebuild the shipped weights (the shipped report, assets/digits_pretrain_report.json: 9 s for the classifier and
108 s for the UNet on 2 CPU cores):

    diffrl-fast pretrain digits          # or: python -m diffrl_fast.models.digits
"""
from __future__ import annotations

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

from .._extras import require

IMAGE_SIZE = 16
NUM_CLASSES = 10
NULL_CLASS = 10  # the unconditional class of classifier-free guidance, and the class of the prompt ""
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

UNET_WEIGHTS = "digits_unet.safetensors"
UNET_CONFIG = "digits_unet.json"
PROMPT_ENCODER_WEIGHTS = "digits_prompt_encoder.safetensors"
CLASSIFIER_WEIGHTS = "digit_classifier.safetensors"
CLASSIFIER_CONFIG = "digit_classifier.json"
CLASSIFIER_NAME = "digit_classifier"
# A second classifier for held-out rewards (over-optimisation guards): another seed and a narrower architecture,
# trained on the same split, never optimised against.
HELDOUT_CLASSIFIER_NAME = "digit_classifier_heldout"
HELDOUT_CLASSIFIER = dict(seed=1, channels=(16, 32), hidden=64)


# ----------------------------------------------------------------------------------------- data


@lru_cache(maxsize=1)
def _digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    data = require("sklearn.datasets", "the digits world's data set").load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.as_tensor(data.target, dtype=torch.int64)


def load_digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's bundled handwritten digits as (images [N, 1, 16, 16] float32 in [-1, 1], labels [N] int64).

    The 8x8 originals (values 0..16) are scaled to [0, 1], upsampled bilinearly to 16x16, then mapped
    to the diffusion range by x -> 2x - 1. N = 1797. Returns fresh copies (safe to modify).
    """
    images, labels = _digits_tensors()
    return images.clone(), labels.clone()


def digits_split(n: int, held_out_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train_idx, held_out_idx): a permutation of range(n) seeded by ``seed``, the last
    ``held_out_fraction`` of it held out. Both pretrainings train on train_idx only; the classifier's
    reported accuracy is on held_out_idx (360 of 1797 images with the defaults)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = int(round(n * held_out_fraction))
    return perm[: n - n_held].sort().values, perm[n - n_held:].sort().values


# --------------------------------------------------------------------------------- prompt encoder

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_TOKENS = {**{str(i): i for i in range(10)}, **{w: i for i, w in enumerate(_DIGIT_WORDS)}}
_FILLER_WORDS = frozenset({"a", "an", "the", "handwritten", "digit", "number", "of"})
_ACCEPTED_FORMS = "'7', 'a handwritten 7', 'digit 7', 'seven' (one digit 0-9 as a numeral or English word), or '' for unconditional"


def digit_prompt(class_id: int) -> str:
    """The canonical prompt of a class: "a handwritten 7" (and "" for ``NULL_CLASS``)."""
    if class_id == NULL_CLASS:
        return ""
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class_id must be in 0..9 or {NULL_CLASS} (unconditional), got {class_id}")
    return f"a handwritten {class_id}"


class DigitPromptEncoder(nn.Module):
    """The digits world's "text encoder": class c -> encoder_hidden_states [B, 1, cross_attention_dim].

    A learned table of 11 vectors (digits 0..9 and ``NULL_CLASS`` = 10 for the empty prompt), trained
    jointly with the UNet; it plays the role of CLIP's text embeddings in Stable Diffusion.
    """

    def __init__(self, cross_attention_dim: int = 32, num_classes: int = NUM_CLASSES + 1):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.embedding = nn.Embedding(num_classes, cross_attention_dim)

    @staticmethod
    def parse_prompt(prompt: str) -> int:
        """The class a prompt names: "7", "a handwritten 7", "digit 7", "Seven" -> 7; "" -> 10 (unconditional).

        Case-insensitive; words other than one digit must be fillers (a, an, the, handwritten, digit,
        number, of); a trailing "." is ignored. Raises ValueError naming the prompt otherwise.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"digit prompt must be a string, got {type(prompt).__name__} {prompt!r}; accepted forms: {_ACCEPTED_FORMS}")
        words = re.sub(r"[.!]+$", "", prompt.strip().lower()).split()
        if not words:
            return NULL_CLASS
        digits = [_DIGIT_TOKENS[w] for w in words if w in _DIGIT_TOKENS]
        unknown = [w for w in words if w not in _DIGIT_TOKENS and w not in _FILLER_WORDS]
        if len(digits) != 1 or unknown:
            why = f"unrecognised words {unknown}" if unknown else f"it names {len(digits)} digits, not exactly one"
            raise ValueError(f"cannot parse digit prompt {prompt!r}: {why}; accepted forms: {_ACCEPTED_FORMS}")
        return digits[0]

    def forward(self, class_ids: torch.Tensor) -> torch.Tensor:
        """encoder_hidden_states [B, 1, D] of class ids [B] (int64, 10 = unconditional)."""
        return self.embedding(class_ids.to(self.embedding.weight.device)).unsqueeze(1)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """encoder_hidden_states [B, 1, D] of prompt strings (see ``parse_prompt``)."""
        ids = torch.tensor([self.parse_prompt(p) for p in prompts], dtype=torch.int64)
        return self(ids)


# ---------------------------------------------------------------------------- UNet and scheduler

# Measured on 2 CPU cores (torch 2.13, inference_mode, batch 256): this config ~48 ms per forward with
# 0.25M parameters (16/32/32 channels: ~75 ms; a (32, 64) two-level UNet with cross-attention at 8x8:
# ~330 ms). Attention only at the 4x4 level keeps the conditioning (per-class features injected by
# cross-attention at 4x4, in the mid block and on the way up) at a fraction of the price. The 16x16
# digits need no more capacity: even this model draws the digits nearly perfectly at guidance 5.
DIGITS_UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=4,
    use_linear_projection=True,  # linear instead of 1x1-conv projections around attention: same maths, a bit faster on CPU
)


def build_digits_unet(**overrides):
    """A freshly initialised tiny epsilon-prediction ``UNet2DConditionModel`` (``DIGITS_UNET_CONFIG`` + overrides).

    Input x_t [B, 1, 16, 16], timesteps [B], encoder_hidden_states [B, 1, 32]; output eps_hat [B, 1, 16, 16].
    Three levels (16x16, 8x8, 4x4) with 8/16/32 channels, attention only at 4x4 and in the mid block.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**DIGITS_UNET_CONFIG, **overrides})


def make_digits_scheduler():
    """The digits world's ``DDIMScheduler`` (Song et al. 2021) over a DDPM forward process (Ho et al. 2020).

    - 1000 training timesteps with linear betas 1e-4 .. 0.02: the DDPM schedule for pixel-space models
      ("scaled_linear" is Stable Diffusion's, tuned for its latent space); abar_999 = 4e-5, so x_T is
      pure noise.
    - prediction_type "epsilon", clip_sample False: every step stays affine in the model output
      (../shared/DESIGN.md section 2).
    - set_alpha_to_one False and steps_offset 1, as Stable Diffusion: 20 steps visit t = 951, 901, ..., 1
      and the last step goes to abar_0 = 1 - 1e-4 (a stochastic step, so it has a log-prob under eta > 0).
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


# ------------------------------------------------------------------------------------- classifier


class DigitClassifier(nn.Module):
    """Small CNN: images [B, 1, 16, 16] in [0, 1] -> logits [B, 10]. The digits world's reward model.

    conv3x3(c1) - conv3x3(c1) - maxpool - conv3x3(c2) - maxpool - linear(hidden) - linear(10), ReLU
    between; about 0.2M parameters with the defaults.
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        c1, c2 = channels
        self.config = dict(channels=list(channels), hidden=hidden, dropout=dropout)
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * (IMAGE_SIZE // 4) ** 2, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, NUM_CLASSES)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # centre [0, 1] to [-1, 1]: the classifier sees the same range as the diffusion model
        return self.head(self.features(images * 2 - 1))


# ------------------------------------------------------------------------------------ the world


@dataclass
class DigitsWorld:
    """Everything RL fine-tuning in the digits world needs. Models are in eval mode; the classifier is frozen."""

    unet: nn.Module
    prompt_encoder: DigitPromptEncoder
    scheduler: object  # diffusers.DDIMScheduler
    classifier: DigitClassifier
    image_size: int = IMAGE_SIZE
    null_class: int = NULL_CLASS


def _asset(directory: Path, name: str, world: str = "digits") -> Path:
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{world} world asset {path} is missing; run `diffrl-fast pretrain {world}` to train and write it")
    return path


def _public_config(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def load_digit_classifier(directory: Union[str, Path, None] = None, device="cpu", dtype=torch.float32,
                          name: str = CLASSIFIER_NAME) -> DigitClassifier:
    """The pretrained ``DigitClassifier`` ``name`` (``digit_classifier``, or ``digit_classifier_heldout`` for the
    held-out one) from ``directory`` (default: the package assets), frozen, in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory) if directory is not None else ASSETS_DIR
    config = json.loads(_asset(directory, f"{name}.json").read_text())
    model = DigitClassifier(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["model"].items()})
    model.load_state_dict(load_file(_asset(directory, f"{name}.safetensors")))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_pretrained_digits(device="cpu", dtype=torch.float32, directory: Union[str, Path, None] = None) -> DigitsWorld:
    """Load the digits world (UNet, prompt encoder, scheduler, classifier) from safetensors + JSON.

    ``directory`` defaults to ``diffrl_fast/assets/``. Raises FileNotFoundError naming the missing file
    if the assets have not been built. The UNet and prompt encoder keep requires_grad (they are what
    fine-tuning trains); the classifier is frozen.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    directory = Path(directory) if directory is not None else ASSETS_DIR
    config = json.loads(_asset(directory, UNET_CONFIG).read_text())
    unet = UNet2DConditionModel.from_config(config["unet"])
    unet.load_state_dict(load_file(_asset(directory, UNET_WEIGHTS)))
    encoder = DigitPromptEncoder(**config["prompt_encoder"])
    encoder.load_state_dict(load_file(_asset(directory, PROMPT_ENCODER_WEIGHTS)))
    if dtype != torch.float32:  # diffusers warns on any .to(dtype), even a no-op one
        unet.to(dtype=dtype)
    return DigitsWorld(
        unet=unet.to(device=device).eval(),
        prompt_encoder=encoder.to(device=device, dtype=dtype).eval(),
        scheduler=DDIMScheduler.from_config(config["scheduler"]),
        classifier=load_digit_classifier(directory, device, dtype),
        image_size=config.get("image_size", IMAGE_SIZE),
        null_class=config.get("null_class", NULL_CLASS),
    )


# ---------------------------------------------------------------------------------------- sampler


@torch.no_grad()
def sample_digits(
    world: DigitsWorld,
    class_ids,
    *,
    num_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Reference DDIM sampler with classifier-free guidance; images [B, 1, 16, 16] in [0, 1].

    x_T ~ N(0, I); at each of ``num_steps`` timesteps eps_hat = eps_u + g (eps_c - eps_u) with eps_u the
    prediction for ``world.null_class`` (skipped when g = 1), then diffusers' ``DDIMScheduler.step``
    with ``eta`` (1.0 = DDPM-like ancestral noise). Deterministic given ``generator``. For evaluation;
    the RL rollout that records log-probs lives in ``diffrl_fast.diffusion``.
    """
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    unet = world.unet
    device, dtype = unet.device, unet.dtype
    ids = torch.as_tensor(class_ids, dtype=torch.int64, device=device).reshape(-1)
    scheduler = DDIMScheduler.from_config(world.scheduler.config)  # own copy: set_timesteps mutates
    scheduler.set_timesteps(num_steps, device=device)
    cond = world.prompt_encoder(ids).to(dtype)
    guided = guidance_scale != 1.0
    if guided:
        cond = torch.cat([cond, world.prompt_encoder(torch.full_like(ids, world.null_class)).to(dtype)])
    x = randn_tensor((ids.numel(), 1, world.image_size, world.image_size), generator=generator, device=device, dtype=dtype)
    for t in scheduler.timesteps:
        model_in = torch.cat([x, x]) if guided else x
        eps = unet(model_in, t, encoder_hidden_states=cond).sample
        if guided:
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = scheduler.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def evaluate_digits_generator(
    world: DigitsWorld,
    *,
    guidance_scales: Sequence[float] = (1.0, 2.0, 3.0, 5.0),
    num_samples: int = 256,
    num_steps: int = 20,
    eta: float = 1.0,
    seed: int = 0,
) -> list[dict]:
    """Per guidance scale g: how often the classifier recognises the conditioned class, over a fixed-seed batch.

    Class c_i = i mod 10 for i < ``num_samples``. Rows: accuracy = mean[argmax f(x_i) == c_i],
    mean_log_prob = mean log softmax(f(x_i))[c_i] (the ``digit_confidence`` reward), sample_time_s.
    """
    class_ids = torch.arange(num_samples) % NUM_CLASSES
    rows = []
    for g in guidance_scales:
        start = time.perf_counter()
        images = sample_digits(world, class_ids, num_steps=num_steps, guidance_scale=g, eta=eta,
                               generator=torch.Generator().manual_seed(seed))
        elapsed = time.perf_counter() - start
        logp = world.classifier(images.to(next(world.classifier.parameters()))).float().log_softmax(-1).cpu()
        rows.append(dict(
            guidance_scale=float(g),
            accuracy=float((logp.argmax(-1) == class_ids).float().mean()),
            mean_log_prob=float(logp.gather(1, class_ids[:, None]).mean()),
            sample_time_s=round(elapsed, 3),
        ))
    return rows


# ------------------------------------------------------------------------------------- pretraining


def _loss_summary(losses: list[float], buckets: int = 10) -> dict:
    """First/last-10% means and the curve as ``buckets`` chunk means (enough to see it converge)."""
    n = len(losses)
    k = max(1, n // buckets)
    curve = [sum(losses[i:i + k]) / len(losses[i:i + k]) for i in range(0, n, k)][:buckets]
    tail = max(1, n // 10)
    return dict(loss_first=sum(losses[:tail]) / tail, loss_last=sum(losses[-tail:]) / tail, loss_curve=[round(v, 5) for v in curve])


def _save(directory: Path, weights: dict[str, dict[str, torch.Tensor]], config_name: str, config: dict) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    for name, state in weights.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / name), metadata={"format": "pt"})
        (directory / name).chmod(0o644)  # safetensors writes 0600; these files are shipped package data
    (directory / config_name).write_text(json.dumps(config, indent=2) + "\n")


def pretrain_digits_model(
    out_dir: Union[str, Path],
    *,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    cond_dropout: float = 0.1,
    label_noise: float = 0.5,
    ema_decay: float = 0.995,
    warmup_steps: int = 100,
    weight_decay: float = 0.0,
    log_every: int = 100,
    unet_overrides: Optional[dict] = None,
) -> dict:
    """Train the digits UNet + prompt encoder from scratch (DDPM, Ho et al. 2020) and write them to ``out_dir``.

    Loss (epsilon-MSE): E_{x0, c, t, eps} |eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, e(c'))|^2,
    t ~ U{0..999}, c' = NULL_CLASS with probability ``cond_dropout`` else c (label dropout, so one model
    gives both eps_c and eps_u for classifier-free guidance, Ho and Salimans 2022).

    ``label_noise`` (caption noise) first replaces c by a uniformly random digit with that probability, so
    the model learns p(x | c) = (1 - p) p_data(x | c) + p p_data(x): it follows its prompt only partly,
    like a text-to-image model trained on noisy web captions, and the default p = 0.5 leaves RL
    fine-tuning room to improve prompt alignment (DDPO's alignment task, Black et al. 2023). Guidance
    g sharpens it towards class c, since (1 - p) p_data(x | c) / p_data(x) + p grows with c's likelihood.

    AdamW with ``warmup_steps`` linear warm-up then cosine decay to 0, gradients clipped to norm 1.
    With ``ema_decay`` > 0 the saved weights are an exponential moving average
    theta_ema <- d theta_ema + (1 - d) theta with d = min(ema_decay, (1 + n) / (10 + n)) at update n.
    Trains on the ``digits_split`` train part. Deterministic given ``seed`` (on one machine and thread count).
    Writes digits_unet.safetensors, digits_prompt_encoder.safetensors, digits_unet.json; returns metrics.
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup

    start = time.perf_counter()
    images, labels = load_digits_dataset()
    train_idx, _ = digits_split(len(labels))
    images, labels = images[train_idx], labels[train_idx]
    with torch.random.fork_rng(devices=[]):  # diffusers initialises from the global RNG
        torch.manual_seed(seed)
        unet = build_digits_unet(**(unet_overrides or {}))
        encoder = DigitPromptEncoder(cross_attention_dim=unet.config.cross_attention_dim)
    scheduler = make_digits_scheduler()
    abar = scheduler.alphas_cumprod.float()
    params = list(unet.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    lr_schedule = get_cosine_schedule_with_warmup(opt, warmup_steps, steps)
    ema = [p.detach().clone() for p in params] if ema_decay > 0 else None
    gen = torch.Generator().manual_seed(seed)
    unet.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(len(labels), (batch_size,), generator=gen)
        x0, c = images[idx], labels[idx].clone()
        noisy = torch.rand(batch_size, generator=gen) < label_noise
        c[noisy] = torch.randint(NUM_CLASSES, (int(noisy.sum()),), generator=gen)
        c[torch.rand(batch_size, generator=gen) < cond_dropout] = NULL_CLASS
        t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=encoder(c)).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_schedule.step()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            print(f"[digits unet] step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    unet.eval()
    metrics = dict(
        steps=steps, wall_time_s=round(time.perf_counter() - start, 2),
        unet_params=sum(p.numel() for p in unet.parameters()),
        prompt_encoder_params=sum(p.numel() for p in encoder.parameters()),
        **_loss_summary(losses),
    )
    config = dict(
        format="diffrl_fast.digits_unet", version=1, image_size=IMAGE_SIZE, null_class=NULL_CLASS,
        unet=_public_config(unet.config),
        prompt_encoder=dict(cross_attention_dim=encoder.cross_attention_dim, num_classes=encoder.embedding.num_embeddings),
        scheduler=_public_config(scheduler.config),
        training=dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, cond_dropout=cond_dropout, label_noise=label_noise, ema_decay=ema_decay,
                      warmup_steps=warmup_steps, weight_decay=weight_decay, data="sklearn load_digits, digits_split train part"),
        metrics=metrics,
    )
    _save(Path(out_dir), {UNET_WEIGHTS: unet.state_dict(), PROMPT_ENCODER_WEIGHTS: encoder.state_dict()}, UNET_CONFIG, config)
    return metrics


def _random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Each image translated by an independent (dy, dx) in [-max_shift, max_shift]^2, zero (background) fill."""
    b, _, h, w = x.shape
    m = max_shift
    padded = F.pad(x, (m, m, m, m))
    dy, dx = torch.randint(0, 2 * m + 1, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(b, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(b, h, w)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def classifier_accuracy(classifier: DigitClassifier, images01: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images01`` ([N, 1, 16, 16] in [0, 1]) whose argmax logit equals ``labels``."""
    was_training = classifier.training
    classifier.eval()
    param = next(classifier.parameters())
    pred = classifier(images01.to(param)).argmax(-1).cpu()
    classifier.train(was_training)
    return float((pred == labels.cpu()).float().mean())


def pretrain_digit_classifier(
    out_dir: Union[str, Path],
    *,
    epochs: int = 30,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    max_shift: int = 1,
    noise_std: float = 0.05,
    channels: tuple[int, int] = (32, 64),
    hidden: int = 128,
    name: str = CLASSIFIER_NAME,
) -> dict:
    """Train the ``DigitClassifier`` (cross-entropy, AdamW, cosine LR) and write it to ``out_dir`` as ``name``.

    Augmentation: each image shifted by up to ``max_shift`` px and given Gaussian pixel noise of std
    ``noise_std`` (clamped to [0, 1]) so the reward model tolerates the small artefacts of generated
    samples. Trains on the ``digits_split`` train part; reports accuracy on the held-out part.
    Deterministic given ``seed``. Writes ``name``.safetensors + ``name``.json.
    """
    start = time.perf_counter()
    images, labels = load_digits_dataset()
    images = (images + 1) / 2
    train_idx, held_idx = digits_split(len(labels))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(channels=channels, hidden=hidden)
    gen = torch.Generator().manual_seed(seed)
    n = len(train_idx)
    steps_per_epoch = math.ceil(n / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    model.train()
    losses = []
    with torch.random.fork_rng(devices=[]):  # dropout draws from the global RNG
        torch.manual_seed(seed)
        for _ in range(epochs):
            perm = train_idx[torch.randperm(n, generator=gen)]
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                x = _random_shift(images[idx], gen, max_shift) if max_shift else images[idx]
                if noise_std:
                    x = (x + noise_std * torch.randn(x.shape, generator=gen)).clamp(0, 1)
                loss = F.cross_entropy(model(x), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                lr_schedule.step()
                losses.append(loss.item())
    model.eval()
    metrics = dict(
        epochs=epochs, wall_time_s=round(time.perf_counter() - start, 2), params=sum(p.numel() for p in model.parameters()),
        train_accuracy=classifier_accuracy(model, images[train_idx], labels[train_idx]),
        held_out_accuracy=classifier_accuracy(model, images[held_idx], labels[held_idx]),
        held_out_count=len(held_idx), **_loss_summary(losses),
    )
    config = dict(
        format="diffrl_fast.digit_classifier", version=1, image_size=IMAGE_SIZE, input_range=[0.0, 1.0], model=model.config,
        training=dict(epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, weight_decay=weight_decay, max_shift=max_shift,
                      noise_std=noise_std, data="sklearn load_digits, digits_split train part"),
        metrics=metrics,
    )
    _save(Path(out_dir), {f"{name}.safetensors": model.state_dict()}, f"{name}.json", config)
    return metrics


def pretrain_main(out_dir: Union[str, Path, None] = None, *, quick: bool = False) -> dict:
    """Build the digits world: train the classifier, then the UNet, then evaluate the generator.

    Writes into ``diffrl_fast/assets/`` unless ``out_dir`` is given (the shipped assets were made by
    ``pretrain_main()``). ``quick=True`` runs a few steps only (a smoke test, not a usable model).
    Returns {"classifier": ..., "unet": ..., "generator": rows of ``evaluate_digits_generator``} and
    also writes it to digits_pretrain_report.json.
    """
    out = Path(out_dir) if out_dir is not None else ASSETS_DIR
    print(f"[digits] writing to {out}", flush=True)
    classifier = pretrain_digit_classifier(out, epochs=1 if quick else 30)
    print(f"[digits classifier] held-out accuracy {classifier['held_out_accuracy']:.4f}  {classifier['wall_time_s']:.0f}s", flush=True)
    heldout = pretrain_digit_classifier(out, epochs=1 if quick else 30, name=HELDOUT_CLASSIFIER_NAME, **HELDOUT_CLASSIFIER)
    print(f"[digits held-out classifier] held-out accuracy {heldout['held_out_accuracy']:.4f}  {heldout['wall_time_s']:.0f}s", flush=True)
    unet = pretrain_digits_model(out, **(dict(steps=20, log_every=10) if quick else {}))
    print(f"[digits unet] loss {unet['loss_first']:.4f} -> {unet['loss_last']:.4f}  {unet['wall_time_s']:.0f}s", flush=True)
    world = load_pretrained_digits(directory=out)
    generator = evaluate_digits_generator(world, num_samples=20 if quick else 256)
    for row in generator:
        print(f"[digits generator] guidance {row['guidance_scale']:.0f}: accuracy {row['accuracy']:.3f}  "
              f"mean log p(class) {row['mean_log_prob']:.3f}  ({row['sample_time_s']:.1f}s)", flush=True)
    report = dict(classifier=classifier, heldout_classifier=heldout, unet=unet, generator=generator)
    (out / "digits_pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    pretrain_main()
