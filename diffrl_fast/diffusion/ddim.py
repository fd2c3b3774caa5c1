"""Drop-in for ``ddim_step_with_logprob`` of ddpo-pytorch and trl, computed through the fused ops."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .._extras import require
from ..ops import step_logprob, step_mean
from .coefficients import ddim_coefficients
from .noise import draw_noise


class DDIMStepOutput(NamedTuple):
    """``ddim_step_with_logprob``'s result: the sampled (or given) prev_sample and its log-prob [B]."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor

    @property
    def log_probs(self) -> torch.Tensor:
        """``log_prob`` under trl's ``DDPOSchedulerOutput`` field name."""
        return self.log_prob


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    eta: float = 1.0,
    use_clipped_model_output: bool = False,
    generator: Optional[torch.Generator] = None,
    prev_sample: Optional[torch.Tensor] = None,
    *,
    clamp_prev_timestep: bool = True,
) -> DDIMStepOutput:
    """One DDIM step of ``scheduler`` with the log-prob of its result (DDPO, Black et al. 2023).

    Same arguments (in the same order), sampling and result as the function of this name in
    ddpo-pytorch and trl: draws prev_sample = mean + s z with z from diffusers' ``randn_tensor(generator=...)`` rules (``noise.draw_noise``)
    unless ``prev_sample`` is given, and returns (prev_sample, log_prob) with

        log_prob = mean over all but the batch dim of  log N(prev_sample; mean, s^2)
                 = -|prev_sample - mean|^2 / (2 s^2 D) - log s - log(2 pi)/2,

    mean and s being those of ``DDIMScheduler.step`` (see ``ddim_coefficients``). prev_sample equals
    ``DDIMScheduler.step(model_output, timestep, sample, eta, variance_noise=z).prev_sample``.

    The one difference between those projects and diffusers: they clamp the previous timestep index
    to 0 at the last step instead of using ``final_alpha_cumprod``. ``clamp_prev_timestep=True``
    (default) keeps their behaviour; ``False`` gives diffusers' exactly. They agree unless the
    scheduler has ``set_alpha_to_one=True`` (then diffusers' last step is deterministic and has no
    log-prob). Gradients of log_prob flow to model_output and sample, not to a given prev_sample.

    The scheduler is diffusers': without diffusers installed (the core install) this raises ``MissingExtra``
    (an ImportError) naming the package and ``pip install "diffrl_fast[train]"``.
    """
    require("diffusers", "ddim_step_with_logprob (its scheduler is a diffusers DDIMScheduler)")
    if prev_sample is not None and generator is not None:
        raise ValueError("pass either generator or prev_sample, not both: prev_sample is not sampled when given")
    if not isinstance(sample, torch.Tensor) or sample.dim() < 2:
        raise ValueError(f"sample must be a batched tensor [B, ...], got {getattr(sample, 'shape', type(sample).__name__)}")
    latent_dims = sample.dim() - 1
    coefs = ddim_coefficients(
        scheduler, timestep, sample.shape[0], eta, device=sample.device,
        use_clipped_model_output=use_clipped_model_output, clamp_prev_timestep=clamp_prev_timestep,
    )
    if prev_sample is None:
        mean = step_mean(sample, model_output, None, coefs.a, coefs.b, 1.0, clip_x0=coefs.clip_x0, latent_dims=latent_dims)
        noise = draw_noise(model_output.shape, generator, model_output.device, model_output.dtype)
        s = coefs.s.reshape(-1, *([1] * latent_dims))
        prev_sample = (mean.float() + s * noise.float()).to(sample.dtype)
    log_prob = step_logprob(
        sample, prev_sample.detach(), model_output, None, coefs.a, coefs.b, 1.0, coefs.s,
        reduction="mean", clip_x0=coefs.clip_x0, latent_dims=latent_dims,
    )
    return DDIMStepOutput(prev_sample, log_prob)
