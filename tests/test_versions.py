"""The declared lower bounds are the tested ones, and an older install gets one clear message (the feature, the
version needed, the one found, the pip command) instead of an error deep inside a call."""
import re
import tomllib
from pathlib import Path

import pytest

from diffrl_fast import _versions
from diffrl_fast._extras import require, require_train
from diffrl_fast._versions import MIN_VERSIONS, VersionTooOld, parse, require_version

ROOT = Path(__file__).resolve().parent.parent


def _lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for rs in project["optional-dependencies"].values() for r in rs]
    out = {}
    for req in reqs:
        m = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", req)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_min_versions_are_pyprojects_bounds_and_the_lowest_legs_pins():
    bounds = _lower_bounds()
    for dist, version in MIN_VERSIONS.items():
        assert bounds.get(dist) == version, f"pyproject.toml's bound on {dist} is {bounds.get(dist)}, _versions says {version}"
    # CI's lowest leg installs exactly these (.ci/lowest.txt), so the bound is what a run has passed with
    pins = dict(line.split("==") for line in (ROOT / ".ci" / "lowest.txt").read_text().split() if "==" in line)
    for dist, version in MIN_VERSIONS.items():
        assert parse(pins[dist])[:len(parse(version))] == parse(version), f"{dist}: .ci/lowest.txt pins {pins[dist]}"
    python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python == ">=" + (ROOT / ".ci" / "lowest.txt").read_text().split("python==")[1].split()[0]


def test_parse_keeps_the_release_numbers():
    assert parse("2.11.0+cu130") == (2, 11, 0)
    assert parse("0.32.0.dev0") == (0, 32, 0)
    assert parse("4.48.3") > parse("4.48") and parse("3.10") > parse("3.9")
    with pytest.raises(ValueError):
        parse("main")


def test_an_older_version_names_what_is_needed():
    require_version("torch", found=MIN_VERSIONS["torch"] + ".0")  # the bound itself passes
    with pytest.raises(VersionTooOld) as info:
        require_version("torch", "diffrl_fast", found="2.5.1+cu124")
    msg = str(info.value)
    assert f"needs torch>={MIN_VERSIONS['torch']}, but torch 2.5.1+cu124 is installed" in msg
    assert f"pip install 'torch>={MIN_VERSIONS['torch']}'" in msg and "\n" not in msg
    assert isinstance(info.value, ImportError) and info.value.name == "torch"


def test_the_training_side_and_optional_features_check_versions(monkeypatch):
    real = _versions.installed_version
    monkeypatch.setattr(_versions, "installed_version", lambda d: "0.1.0" if d in ("diffusers", "deepspeed") else real(d))
    with pytest.raises(VersionTooOld, match=r"the trainer needs diffusers>=.*diffusers 0\.1\.0 is installed"):
        require_train("the trainer")
    with pytest.raises(VersionTooOld, match=r"dist\.engine=deepspeed needs deepspeed>="):
        pytest.importorskip("deepspeed")
        require("deepspeed", "dist.engine=deepspeed")


def test_a_feature_newer_than_the_floor_names_its_version(monkeypatch):
    monkeypatch.setattr(_versions, "installed_version", lambda dist: "0.32.2" if dist == "diffusers" else None)
    with pytest.raises(_versions.VersionTooOld, match=r"Wan pipelines \(WanPipeline\) needs diffusers>=0.42, but diffusers 0.32.2"):
        _versions.require_feature("Wan pipelines (WanPipeline)")
    monkeypatch.setattr(_versions, "installed_version", lambda dist: "0.42.1")
    _versions.require_feature("Wan pipelines (WanPipeline)")
