"""A float64 toy diffusion model for exact algorithm tests: a 1x4x4 "latent", a denoiser linear in its
parameters, SD 1.5's DDIM schedule or SD3's flow-matching schedule, prompts embedded as fixed vectors.

    eps(x, t, h) = w * x + (h P).reshape(x) + u * t / 1000

The same function, written once here, is the model both for diffrl_fast (``ToyModel``) and for the
reference transcriptions (``eps_fn``): the objectives are what the tests compare, not the model.
"""
from __future__ import annotations

import torch
from torch import nn

from diffrl_fast.models.conditioning import Conditioning
from diffrl_fast.models.pipelines import DiffusionModel

SHAPE = (1, 4, 4)
EMBED = 3


def toy_eps(w, P, u, x, t, h):
    return w * x + (h @ P).reshape(x.shape) + u * (t / 1000.0).reshape(-1, 1, 1, 1)


class ToyDenoiser(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = torch.Size(SHAPE).numel()
        self.w = nn.Parameter(0.3 + 0.05 * torch.randn(SHAPE, generator=g, dtype=torch.float64))
        self.P = nn.Parameter(0.3 * torch.randn(EMBED, d, generator=g, dtype=torch.float64))
        self.u = nn.Parameter(0.2 * torch.randn(SHAPE, generator=g, dtype=torch.float64))

    def forward(self, x, t, hidden):
        return toy_eps(self.w, self.P, self.u, x, t.to(x.dtype), hidden.mean(1).to(x.dtype))


class ToyModel(DiffusionModel):
    kind = "toy"
    latent_shape = SHAPE

    def __init__(self, scheduler: str = "ddim", seed: int = 0) -> None:
        super().__init__()
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        self.denoiser = ToyDenoiser(seed)
        if scheduler == "ddim":  # SD 1.5's scheduler config
            self.scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                           beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        else:
            self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        self.table = torch.randn(16, EMBED, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)

    def prompt_vector(self, prompt: str) -> torch.Tensor:
        return torch.zeros(EMBED, dtype=torch.float64) if prompt == "" else self.table[sum(map(ord, prompt)) % 16]

    def _encode_unique(self, prompts):
        return Conditioning(torch.stack([self.prompt_vector(p) for p in prompts])[:, None, :])

    def predict(self, x, t, cond):
        return self.net(x, t, cond.hidden)

    def decode(self, latents):
        return ((latents + 1) / 2).clamp(0, 1).float()


def toy_reward(images, prompts, metadata):
    """A smooth reward of the image and prompt with no ties: 10 x mean pixel + a per-prompt offset."""
    r = images.float().mean((1, 2, 3)) * 10 + torch.tensor([0.1 * (sum(map(ord, p)) % 7) for p in prompts])
    return r, {}


def toy_embed(images):
    """A toy image encoder: the flattened image, L2-normalised."""
    f = images.float().flatten(1)
    return f / torch.linalg.vector_norm(f, dim=-1, keepdim=True)


toy_reward.embed = toy_embed
