"""The oldest versions of the dependencies the package is tested with, and one clear error where an older one is
installed.

``MIN_VERSIONS`` are pyproject.toml's lower bounds (tests/test_versions.py checks that the two agree), and CI runs
the quick tests at exactly those versions (.ci/matrix lowest). An older install would otherwise fail with an
AttributeError deep inside a call (FSDP2's ``fully_shard`` exists from torch 2.6, for example); instead the
package says at import, or at the first use of the feature, which version it needs and how to get it.
"""
from __future__ import annotations

import importlib.metadata
import re

# distribution -> the oldest version a CI run has passed with (pyproject.toml's ">=" bounds)
MIN_VERSIONS: dict[str, str] = {
    "torch": "2.6",
    "numpy": "1.24",
    "triton": "3.2",
    "diffusers": "0.32",
    "transformers": "4.48",
    "peft": "0.14",
    "deepspeed": "0.16",
}


# features that need a newer release than MIN_VERSIONS: feature -> (distribution, version)
# (the oldest release a run has passed with: diffusers 0.42 for each; the lowest leg pins 0.32, which has none of them)
FEATURE_VERSIONS: dict[str, tuple[str, str]] = {
    "Wan pipelines (WanPipeline)": ("diffusers", "0.42"),
    "Qwen-Image pipelines (QwenImagePipeline)": ("diffusers", "0.42"),
    "Z-Image pipelines (ZImagePipeline)": ("diffusers", "0.42"),
    "FLUX.2 pipelines (Flux2Pipeline, Flux2KleinPipeline)": ("diffusers", "0.42"),
}


class VersionTooOld(ImportError):
    """An installed dependency is older than the oldest version the package is tested with."""


def parse(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: ``"2.11.0+cu130"`` -> (2, 11, 0), ``"0.32.0.dev0"`` -> (0, 32, 0)."""
    m = re.match(r"\d+(?:\.\d+)*", version.strip())
    if m is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(x) for x in m.group(0).split("."))


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def too_old(dist: str, found: str | None = None) -> bool:
    """Whether ``dist`` (installed, or at version ``found``) is older than ``MIN_VERSIONS[dist]``; False when it is
    not installed (a missing package is ``_extras``' concern)."""
    found = installed_version(dist) if found is None else found
    return found is not None and not _reaches(found, MIN_VERSIONS[dist])


def at_least(dist: str, version: str) -> bool:
    """Whether ``dist`` is installed at ``version`` or newer (for an argument renamed between supported releases)."""
    found = installed_version(dist)
    return found is not None and _reaches(found, version)


def _reaches(found: str, version: str) -> bool:
    """``found`` >= ``version``, compared on as many release numbers as ``version`` has."""
    need = parse(version)
    return parse(found)[:len(need)] >= need


def require_version(dist: str, feature: str = "diffrl_fast", found: str | None = None) -> None:
    """Raise ``VersionTooOld`` when ``dist`` is installed at a version older than ``MIN_VERSIONS[dist]``: the message
    names the feature, the version needed, the one found and the pip command that upgrades it."""
    found = installed_version(dist) if found is None else found
    if too_old(dist, found):
        need = MIN_VERSIONS[dist]
        hint = " (install the build for your platform first, as the README says)" if dist == "torch" else ""
        raise VersionTooOld(f"{feature} needs {dist}>={need}, but {dist} {found} is installed; upgrade with: "
                            f"pip install '{dist}>={need}'{hint}", name=dist)


def require_versions(dists, feature: str = "diffrl_fast") -> None:
    """``require_version`` for each of ``dists``."""
    for dist in dists:
        require_version(dist, feature)


def require_feature(feature: str) -> None:
    """Raise ``VersionTooOld`` when ``FEATURE_VERSIONS[feature]``'s distribution is older than the release that has it."""
    dist, need = FEATURE_VERSIONS[feature]
    found = installed_version(dist)
    if found is not None and not _reaches(found, need):
        raise VersionTooOld(f"{feature} needs {dist}>={need}, but {dist} {found} is installed; upgrade with: "
                            f"pip install '{dist}>={need}'", name=dist)
