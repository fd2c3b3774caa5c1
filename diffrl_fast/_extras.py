"""The optional ``train`` extra: the trainer's dependencies, checked once with one clear message.

``pip install diffrl_fast`` installs the core (``diffrl_fast.ops`` and the drop-in step functions: torch,
numpy, triton). The trainer, the models, the rewards and the CLI's training commands also need
``pip install 'diffrl_fast[train]'``; importing them without it raises ``MissingExtra`` naming what is
missing and the command that installs it.
"""
from __future__ import annotations

import importlib.util

# import name -> distribution name, for the modules the training side imports unconditionally
TRAIN_MODULES = {"diffusers": "diffusers", "transformers": "transformers", "peft": "peft",
                 "safetensors": "safetensors", "yaml": "pyyaml", "PIL": "pillow", "tqdm": "tqdm"}
# imported lazily by single features; a missing one is reported the same way when it is reached
LAZY_TRAIN_MODULES = {"deepspeed": "deepspeed", "matplotlib": "matplotlib", "sklearn": "scikit-learn"}
INSTALL_HINT = "pip install 'diffrl_fast[train]'"


class MissingExtra(ImportError):
    """A dependency of the ``train`` extra is not installed."""


def message(what: str, missing: list[str]) -> str:
    return (f"{what} needs the trainer's dependencies, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed; install them with: {INSTALL_HINT}")


def require_train(what: str) -> None:
    """Raise MissingExtra when a module of the ``train`` extra cannot be imported."""
    missing = [dist for mod, dist in TRAIN_MODULES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise MissingExtra(message(what, missing))


def as_missing_extra(exc: ModuleNotFoundError, what: str) -> MissingExtra | None:
    """The MissingExtra for a ModuleNotFoundError of a train-extra module (None for any other module)."""
    root = (exc.name or "").split(".")[0]
    dist = TRAIN_MODULES.get(root) or LAZY_TRAIN_MODULES.get(root)
    return MissingExtra(message(what, [dist])) if dist else None
