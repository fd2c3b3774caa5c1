"""diffrl_fast: performance-first RL and preference fine-tuning of text-to-image diffusion models."""
__version__ = "0.1.0"

from ._versions import require_versions  # noqa: E402

require_versions(("torch", "numpy"))  # one clear message instead of an AttributeError deep inside a call

from .diffusion.ddim import ddim_step_with_logprob  # noqa: E402
from .diffusion.sde import sde_step_with_logprob  # noqa: E402

__all__ = ["ddim_step_with_logprob", "sde_step_with_logprob", "__version__"]
