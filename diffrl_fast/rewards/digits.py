"""Digits-world reward: how confidently the pretrained digit classifier sees the conditioned digit."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..models.digits import IMAGE_SIZE, NUM_CLASSES, DigitPromptEncoder, load_digit_classifier
from . import register

# ITU-R BT.601 luma, so an RGB rendering of a grey digit maps back to the same grey values
_LUMA = (0.299, 0.587, 0.114)


def _to_classifier_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 1 or 3, H, W] in [0, 1] -> [B, 1, size, size] in [0, 1] (luma, then bilinear resize)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"digit_confidence expects images [B, 1 or 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    images = images.float()
    if images.shape[1] == 3:
        images = (images * images.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return images.clamp(0, 1)


def _class_ids(prompts: list, metadata: Optional[list], batch: int) -> torch.Tensor:
    """metadata[i]["class_id"] when present, else the digit named by prompts[i]."""
    ids = []
    for i in range(batch):
        meta = metadata[i] if metadata is not None and i < len(metadata) and metadata[i] else {}
        c = int(meta["class_id"]) if "class_id" in meta else DigitPromptEncoder.parse_prompt(prompts[i])
        if not 0 <= c < NUM_CLASSES:
            raise ValueError(f"digit_confidence needs a digit 0..9 for sample {i}, got class {c} (prompt {prompts[i]!r}); "
                             "the unconditional prompt '' has no target digit")
        ids.append(c)
    return torch.tensor(ids, dtype=torch.int64)


def frozen_classifier(classifier=None, device="cpu"):
    """``classifier`` (default: the shipped ``DigitClassifier``) in eval mode without gradients, and its first
    parameter (where inputs go, in which dtype): the set-up of every digit-classifier reward."""
    if classifier is None:
        classifier = load_digit_classifier(device=device)
    classifier = classifier.eval().requires_grad_(False)
    return classifier, next(classifier.parameters())


@register("digit_confidence")
def digit_confidence(device="cpu", classifier=None):
    """Reward r(x, c) = log softmax(f(x))[c]: the digit classifier's log-probability of the conditioned class.

    ``f`` is ``classifier`` or the pretrained ``DigitClassifier`` from the package assets; c comes from
    metadata[i]["class_id"] if present, else from ``DigitPromptEncoder.parse_prompt(prompts[i])``.
    Rewards lie in (-inf, 0]; 0 means certain. Info: accuracy (argmax f = c) and mean class probability.
    """
    classifier, param = frozen_classifier(classifier, device)

    @torch.no_grad()
    def fn(images: torch.Tensor, prompts: list, metadata: Optional[list] = None):
        batch = images.shape[0]
        target = _class_ids(prompts, metadata, batch).to(param.device)
        x = _to_classifier_input(images.to(param.device), IMAGE_SIZE).to(param.dtype)
        logp = classifier(x).float().log_softmax(-1)
        rewards = logp.gather(1, target[:, None]).squeeze(1)
        info = dict(
            accuracy=float((logp.argmax(-1) == target).float().mean()),
            class_prob=float(rewards.exp().mean()),
        )
        return rewards, info

    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        """The classifier's penultimate features (after the hidden ReLU), L2-normalised: [B, hidden] (the
        image encoder TDPO's critic uses, as CLIP's embedding in the paper)."""
        x = _to_classifier_input(images.to(param.device), IMAGE_SIZE).to(param.dtype)
        h = classifier.head[:3](classifier.features(x * 2 - 1)).float()
        return h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp(min=1e-12)

    fn.embed = embed
    return fn


@register("digit_confidence_heldout")
def digit_confidence_heldout(device="cpu"):
    """``digit_confidence`` scored by the held-out classifier (another seed and a narrower architecture,
    ``models.digits.HELDOUT_CLASSIFIER``): a guard against fooling the training classifier only."""
    from ..models.digits import HELDOUT_CLASSIFIER_NAME

    return digit_confidence(device=device, classifier=load_digit_classifier(device=device, name=HELDOUT_CLASSIFIER_NAME))
