"""The flow-digits world behind the ``DiffusionModel`` interface: SD3's transformer call, in pixel space.

Rollouts, recompute, the flow SDE step, the flow KL forms and the trainer see exactly what they see for Stable
Diffusion 3 (an ``SD3Transformer2DModel`` predicting the velocity, a ``FlowMatchEulerDiscreteScheduler``, hidden
and pooled prompt embeddings); only the VAE is missing: decoding maps [-1, 1] to [0, 1].
"""
from __future__ import annotations

from typing import Sequence

import torch

from .conditioning import Conditioning
from .flow_digits import CANVAS, FlowDigitsWorld, load_pretrained_flow_digits, parse_layout, slot_predictions
from .pipelines import DiffusionModel


class FlowDigitsModel(DiffusionModel):
    kind = "flow_digits"
    # check-parity's prompts when the user gives none: one of each layout
    default_prompts = ("7", "3 left of 8", "2 above 5", "two 4s")
    lora_family = "sd3"  # LoRA weights are saved in SD3's transformer format

    def __init__(self, world: FlowDigitsWorld) -> None:
        super().__init__()
        self.world = world
        self.denoiser = world.transformer
        self.scheduler = world.scheduler
        self.prompt_encoder = world.prompt_encoder
        self.latent_shape = (1, CANVAS, CANVAS)
        self.pixels_per_latent = 1
        self.latent_multiple = world.transformer.config.patch_size

    def _encode_unique(self, prompts):
        hidden, pooled = self.prompt_encoder.encode(prompts)
        return Conditioning(hidden.to(self.device), pooled.to(self.device))

    def encode(self, prompts, negative_prompts=None):
        prompts = self.validate_prompts(prompts)
        for p in prompts:
            parse_layout(p)  # a LayoutPromptError naming the grammar for a prompt this world cannot read
        return super().encode(prompts, negative_prompts)

    def prompt_metadata(self, prompts: Sequence[str]) -> list[dict]:
        return [{"layout": [list(sd) for sd in parse_layout(p)]} for p in prompts]

    def predict(self, x, t, cond):
        return self.net(hidden_states=x, timestep=t, encoder_hidden_states=cond.hidden,
                        pooled_projections=cond.pooled, return_dict=False)[0]

    @torch.no_grad()
    def verdicts(self, images: torch.Tensor, metadata: Sequence[dict]) -> list[list[tuple[int, int]]]:
        """Per image, (asked-for digit, the classifier's top class) of each slot its prompt constrains: what the
        labelled grids mark with a check or a cross per slot."""
        return slot_predictions(images, [tuple((s, int(d)) for s, d in m.get("layout", ())) for m in metadata])

    @torch.no_grad()
    def decode(self, latents):
        return ((latents.float() + 1) / 2).clamp(0, 1)


def load_flow_digits_model(device="cpu", dtype=torch.float32) -> FlowDigitsModel:
    """The pretrained flow-digits world shipped in the package (``diffrl-fast pretrain flow-digits`` rebuilds it)."""
    model = FlowDigitsModel(load_pretrained_flow_digits(device=device, dtype=dtype))
    model.denoiser.requires_grad_(True)
    return model

