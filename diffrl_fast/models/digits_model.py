"""The digits world behind the ``DiffusionModel`` interface, so it runs through exactly the same rollout,
recompute and trainer code as Stable Diffusion: the class embedding plays the text encoder, the UNet
works directly in pixel space (no VAE), and decoding maps [-1, 1] to [0, 1]."""
from __future__ import annotations

from typing import Sequence

import torch

from .conditioning import Conditioning
from .digits import DigitPromptEncoder, DigitsWorld, load_pretrained_digits
from .pipelines import DiffusionModel


class DigitsModel(DiffusionModel):
    kind = "digits"
    default_prompts = tuple(str(d) for d in range(10))  # the digits preset's prompts (configs/digits.yaml)

    def __init__(self, world: DigitsWorld) -> None:
        super().__init__()
        self.world = world
        self.denoiser = world.unet
        self.scheduler = world.scheduler
        self.prompt_encoder = world.prompt_encoder.requires_grad_(False).eval()
        self.latent_shape = (1, world.image_size, world.image_size)
        self.pixels_per_latent = 1
        self.latent_multiple = 2 ** (len(world.unet.config.block_out_channels) - 1)

    def _encode_unique(self, prompts):
        return Conditioning(self.prompt_encoder.encode(prompts).to(self.device))

    def encode(self, prompts, negative_prompts=None):
        prompts = self.validate_prompts(prompts)
        for p in prompts:
            DigitPromptEncoder.parse_prompt(p)  # a clear ValueError for a prompt the digits world cannot read
        return super().encode(prompts, negative_prompts)

    def prompt_metadata(self, prompts: Sequence[str]) -> list[dict]:
        return [{"class_id": DigitPromptEncoder.parse_prompt(p)} for p in prompts]

    def predict(self, x, t, cond):
        return self.net(x, t, encoder_hidden_states=cond.hidden, return_dict=False)[0]

    @torch.no_grad()
    def verdicts(self, images: torch.Tensor, metadata: Sequence[dict]) -> list[list[tuple[int, int]]]:
        """Per image, [(prompted digit, the classifier's top class)], or [] for the unconditional prompt: what the
        before/after grids mark with a check or a cross, whatever reward the run optimises."""
        top = self.top_class(images).tolist()
        return [[(int(m["class_id"]), p)] if 0 <= int(m.get("class_id", -1)) < 10 else [] for m, p in zip(metadata, top)]

    @torch.no_grad()
    def top_class(self, images: torch.Tensor) -> torch.Tensor:
        """The digit classifier's most likely class [B] (int64, CPU) of images [B, 1 or 3, H, W] in [0, 1]."""
        clf = self.world.classifier
        p = next(clf.parameters())
        x = images.to(p.device, torch.float32)
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (self.world.image_size, self.world.image_size):
            x = torch.nn.functional.interpolate(x, size=(self.world.image_size,) * 2, mode="bilinear", antialias=True)
        return clf(x.clamp(0, 1).to(p.dtype)).argmax(-1).cpu()

    @torch.no_grad()
    def decode(self, latents):
        return ((latents.float() + 1) / 2).clamp(0, 1)


def load_digits_model(device="cpu", dtype=torch.float32) -> DigitsModel:
    """The pretrained digits world shipped in the package (``diffrl-fast pretrain digits`` rebuilds it)."""
    model = DigitsModel(load_pretrained_digits(device=device, dtype=dtype))
    model.denoiser.requires_grad_(True)
    return model
