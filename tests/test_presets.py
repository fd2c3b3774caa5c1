"""The shipped presets keep every algorithm's reference values: a preset changes an algorithmic key only under
its by_algo entry of that algorithm or its model_facts (docs/algorithms.md, train/config.py's layers)."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from diffrl_fast.config_utils import config_sources, load_config, provenance_lines, resolve_config
from diffrl_fast.algos import ALGORITHMS
from diffrl_fast.train.config import PRESETS, Config, count_prompts, preset_key, validate

ALGOS = Config.algorithm_names()
PRESET_FILES = sorted(PRESETS.glob("*.yaml"))


def leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("kwargs",):
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_every_preset_is_checked():
    assert {p.stem for p in PRESET_FILES} >= {"digits", "sd15", "sdxl", "sd3", "flux"}


@pytest.mark.parametrize("preset", PRESET_FILES, ids=lambda p: p.stem)
def test_presets_top_level_sets_no_algorithmic_key(preset):
    raw = yaml.safe_load(preset.read_text())
    raw.pop("by_algo", None), raw.pop("model_facts", None)
    algorithmic = [k for k in leaves(raw) if not preset_key(k)]
    assert not algorithmic, f"{preset.name} sets {algorithmic} for every algorithm: move each under by_algo (with its reason) or model_facts"


@pytest.mark.parametrize("preset", PRESET_FILES, ids=lambda p: p.stem)
def test_preset_keeps_each_algorithms_reference_values(preset):
    raw = yaml.safe_load(preset.read_text())
    facts = set(leaves(raw.get("model_facts") or {}))
    bad = []
    for algo in ALGOS:
        named = set(leaves((raw.get("by_algo") or {}).get(algo, {}))) | facts
        ours = leaves(dataclasses.asdict(validate(load_config(Config, preset, [f"algo={algo}"]))))
        ref = leaves(dataclasses.asdict(load_config(Config, None, [f"algo={algo}"])))
        for key, value in ref.items():
            if not preset_key(key) and ours[key] != value and key not in named:
                bad.append(f"{algo}: {key} = {ours[key]!r}, reference {value!r}")
        # the minibatch, accumulation (and for chunk-stepping algorithms the chunk) make the optimiser step: where the
        # reference sets them, a preset's sizes for memory do not silently apply
        ref_sets = set(ALGORITHMS[algo].reference_defaults(count_prompts(raw)))
        step = {"train.batch_size", "train.gradient_accumulation_steps"} | (
            {"train.chunk_size"} if ref["train.optimizer_step_every"] == "chunks" else set())
        for key in sorted(step & ref_sets - named):
            if ours[key] != ref[key]:
                bad.append(f"{algo}: {key} = {ours[key]!r} (the optimiser step's size), reference {ref[key]!r}")
    assert not bad, f"{preset.name} silently replaces reference values:\n" + "\n".join(bad)


def test_reference_values_win_over_defaults_and_presets_values_are_traced(tmp_path):
    cfg, sources = resolve_config(Config, PRESETS / "sd15.yaml", ["algo=dpok", "train.learning_rate=2e-5"])
    assert cfg.sample.guidance_scale == 7.5 and sources["sample.guidance_scale"] == "reference of dpok"
    assert cfg.train.learning_rate == 2e-5 and sources["train.learning_rate"] == "command line"
    assert sources["model.path"] == f"preset {PRESETS / 'sd15.yaml'}"
    assert sources["train.chunk_size"] == f"preset {PRESETS / 'sd15.yaml'} by_algo.dpok"
    assert sources["grpo.kl_form"] == f"preset {PRESETS / 'sd15.yaml'} model_facts"
    lines = provenance_lines(cfg)
    assert "sample.guidance_scale: 7.5  # reference of dpok" in lines and "train.learning_rate: 2.0e-05  # command line" in lines
    assert not any(line.startswith("train.clip_range") for line in lines)  # at its default, set by no layer
    assert set(config_sources(load_config(Config))) == {"name"}  # the run name follows model.path and algo


def test_model_facts_and_top_level_may_not_both_set_a_key(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("sample:\n  guidance_scale: 2.0\nmodel_facts:\n  sample:\n    guidance_scale: 1.0\n")
    from diffrl_fast.config_utils import ConfigError

    with pytest.raises(ConfigError, match="both at its top level and under model_facts"):
        load_config(Config, f)
