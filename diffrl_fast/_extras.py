"""Optional dependencies (the extras of pyproject.toml), each reported with one clear message when missing.

``pip install diffrl_fast`` installs the core (``diffrl_fast.ops`` and the drop-in step functions: torch,
numpy, triton). The trainer, the models, the rewards and the CLI's training commands also need
``pip install "diffrl_fast[train]"``. Every optional module is imported through ``require`` (or checked
by ``require_train`` when its package is imported), so a missing one raises ``MissingExtra``: the
package, the feature that needs it and the pip command that installs it, in one line.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from ._versions import MIN_VERSIONS, require_version, require_versions

# import name -> (distribution, the extra of pyproject.toml that installs it), for every optional module
# the package imports (tests/test_extras.py checks the table against pyproject.toml)
OPTIONAL_MODULES: dict[str, tuple[str, str]] = {
    "diffusers": ("diffusers", "train"),
    "transformers": ("transformers", "train"),
    "peft": ("peft", "train"),
    "safetensors": ("safetensors", "train"),
    "yaml": ("pyyaml", "train"),
    "PIL": ("pillow", "train"),
    "tqdm": ("tqdm", "train"),
    "deepspeed": ("deepspeed", "train"),
    "matplotlib": ("matplotlib", "train"),
    "sklearn": ("scikit-learn", "train"),
    "tensorboard": ("tensorboard", "train"),
    "aiohttp": ("aiohttp", "train"),
    "requests": ("requests", "train"),
    "xformers": ("xformers", "gpu"),
    "wandb": ("wandb", "wandb"),
    "open_clip": ("open-clip-torch", "rewards"),  # the hpsv2 reward
}
# the train extra's modules that the training side imports unconditionally (checked when its packages load)
TRAIN_MODULES = {mod: OPTIONAL_MODULES[mod][0]
                 for mod in ("diffusers", "transformers", "peft", "safetensors", "yaml", "PIL", "tqdm")}


def install_command(extra: str = "train") -> str:
    """The pip command that installs ``extra``, e.g. ``pip install "diffrl_fast[train]"``."""
    return f'pip install "diffrl_fast[{extra}]"'


INSTALL_HINT = install_command("train")


class MissingExtra(ModuleNotFoundError):
    """An optional dependency (a module of one of the package's extras) is not installed."""


def message(what: str, missing: list[str], extra: str = "train") -> str:
    """One line: ``what`` needs the distributions ``missing`` of ``extra``, and the command that installs them."""
    verb = "is" if len(missing) == 1 else "are"
    return (f"{what} needs {', '.join(missing)}, which {verb} not installed (part of the {extra!r} extra); "
            f"install {'it' if len(missing) == 1 else 'them'} with: {install_command(extra)}")


def require(module: str, feature: str) -> ModuleType:
    """Import and return ``module`` (e.g. ``"sklearn.datasets"``), an optional dependency used by ``feature``.

    When the module's package is not installed this raises ``MissingExtra`` naming the distribution, the
    feature and the pip command of the extra that provides it, instead of a bare "No module named ...".
    An import error inside an installed package (one of *its* dependencies missing) propagates unchanged.
    ``module`` must belong to ``OPTIONAL_MODULES`` (a ``KeyError`` otherwise, whether installed or not). One older
    than ``_versions.MIN_VERSIONS`` raises ``VersionTooOld``, naming the version needed.
    """
    root = module.partition(".")[0]
    dist, extra = OPTIONAL_MODULES[root]
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing != module and not module.startswith(missing + "."):
            raise
        raise MissingExtra(message(feature, [dist], extra), name=root) from None
    if dist in MIN_VERSIONS:
        require_version(dist, feature)
    return imported


def installed(module: str) -> bool:
    """Whether ``module``'s top-level package can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module.partition(".")[0]) is not None
    except ValueError:  # a module in sys.modules without a spec
        return True


def require_train(what: str) -> None:
    """Raise MissingExtra when a module the training side imports unconditionally cannot be imported, and
    VersionTooOld (``_versions``) when one is older than the package is tested with."""
    missing = [mod for mod in TRAIN_MODULES if not installed(mod)]
    if missing:
        raise MissingExtra(message(what, [TRAIN_MODULES[mod] for mod in missing], "train"), name=missing[0])
    require_versions([dist for dist in TRAIN_MODULES.values() if dist in MIN_VERSIONS], what)


def as_missing_extra(exc: ModuleNotFoundError, what: str) -> MissingExtra | None:
    """The MissingExtra for a ModuleNotFoundError of an optional module (None for any other module)."""
    root = (exc.name or "").split(".")[0]
    if root not in OPTIONAL_MODULES:
        return None
    dist, extra = OPTIONAL_MODULES[root]
    return MissingExtra(message(what, [dist], extra), name=root)
