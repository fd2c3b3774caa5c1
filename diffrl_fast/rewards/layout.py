"""Flow-digits reward: does the canvas show the digits the prompt asks for, where it asks for them?

The analogue of GenEval's detector-based scoring (Ghosh et al. 2023; Flow-GRPO's headline task) in the
flow-digits world (``models/flow_digits.py``): the digits world's classifier reads each slot the prompt constrains.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..models.digits import load_digit_classifier
from ..models.flow_digits import DIGIT_SIZE, SLOTS, Layout, canvas_input, layout_scores, parse_layout
from . import register
from .digits import frozen_classifier


def _layouts(prompts: list, metadata: Optional[list], batch: int) -> list[Layout]:
    out = []
    for i in range(batch):
        meta = metadata[i] if metadata is not None and i < len(metadata) and metadata[i] else {}
        layout = meta.get("layout")
        out.append(tuple((s, int(d)) for s, d in layout) if layout is not None else parse_layout(prompts[i]))
    return out


@register("digit_layout")
def digit_layout(device="cpu", classifier=None):
    """Reward of the flow-digits world: the layout log-likelihood of ``layout_scores`` (range (-inf, 0]).

    The layout comes from metadata[i]["layout"] when present (the flow-digits model adds it), else from parsing
    prompts[i] (``models.flow_digits.parse_layout``). Info: layout_correct (the fraction of samples whose every
    constrained slot's top class is right; per sample in info["per_sample"], which the trainer logs beside the
    reward) and slot_accuracy.
    """
    classifier, param = frozen_classifier(classifier, device)

    @torch.no_grad()
    def fn(images: torch.Tensor, prompts: list, metadata: Optional[list] = None):
        scores = layout_scores(classifier, images, _layouts(prompts, metadata, images.shape[0]))
        correct = scores["correct"].float()
        return scores["reward"], dict(layout_correct=float(correct.mean()), slot_accuracy=scores["slot_hits"] / max(1, scores["slot_count"]),
                                      per_sample={"layout_correct": correct})

    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        """The classifier's penultimate features of the five slot crops, concatenated and L2-normalised:
        [B, 5 x hidden] (the image encoder of TDPO's critic)."""
        x = canvas_input(images.to(param.device))[:, None].to(param.dtype)
        crops = torch.cat([x[:, :, r:r + DIGIT_SIZE, c:c + DIGIT_SIZE] for r, c in SLOTS.values()])
        h = classifier.head[:3](classifier.features(crops * 2 - 1)).float()
        h = torch.cat(h.chunk(len(SLOTS)), dim=1)
        return h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp(min=1e-12)

    fn.embed = embed
    return fn


@register("digit_layout_heldout")
def digit_layout_heldout(device="cpu"):
    """``digit_layout`` scored by the digits world's held-out classifier (another seed and architecture): a guard
    against fooling the training classifier only, never optimised."""
    from ..models.digits import HELDOUT_CLASSIFIER_NAME

    return digit_layout(device=device, classifier=load_digit_classifier(device=device, name=HELDOUT_CLASSIFIER_NAME))
