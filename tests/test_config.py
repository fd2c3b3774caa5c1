"""Typed configs: YAML + dotted overrides, unknown keys and wrong types rejected with the closest valid key."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffrl_fast.config_utils import ConfigError, describe, load_config
from diffrl_fast.train.config import Config, validate


def test_defaults_are_valid_and_documented():
    cfg = validate(load_config(Config))
    assert cfg.algo == "ddpo_is" and cfg.model.path == "digits"
    lines = describe(Config)
    assert any(line.strip().startswith("train.learning_rate (float") for line in lines)
    assert all(line.rstrip().endswith((".", ":", ")")) or "help" not in line for line in lines)


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\ntrain:\n  learning_rate: 0.001\n  chunk_size: 2\nprompts: [a, b]\n")
    cfg = load_config(Config, f, ["train.learning_rate=1e-4", "sample.guidance_scale=3", "model.lora=false", "reward.kwargs={quality: 80}"])
    assert cfg.name == "x" and cfg.train.learning_rate == 1e-4 and cfg.train.chunk_size == 2
    assert cfg.sample.guidance_scale == 3.0 and cfg.model.lora is False and cfg.prompts == ["a", "b"]
    assert cfg.reward.kwargs == {"quality": 80}


@pytest.mark.parametrize("override,match", [
    (["train.learnig_rate=1e-4"], "did you mean 'train.learning_rate'"),
    (["trian.learning_rate=1e-4"], "did you mean 'train'"),
    (["train.chunk_size=two"], "train.chunk_size: expected an integer"),
    (["model.lora=maybe"], "model.lora: expected true or false"),
    (["train=3"], "train is a section"),
    (["num_epochs"], "key=value"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Config, None, override)


@pytest.mark.parametrize("override,match", [
    (["train.chunk_size=0"], "chunk_size"),
    (["algo=dense", "train.optimizer_step_every=chunks"], "couples all trained steps"),
    (["algo=ddpo_sf", "train.num_inner_epochs=2"], "score-function estimator is biased"),
    (["algo=dpok", "dpok.kl_form=l2"], "dpok.kl_form"),
    (["sample.batch_size=10", "train.batch_size=3"], "multiple of train.batch_size"),
    (["sample.eta=0"], "eta"),
    (["algo=ppo"], "algo"),
    (["model.mixed_precision=fp8"], "mixed_precision"),
    (["prompts=[]"], "no prompts"),
    (["sample.trajectory_device=gpu0"], "trajectory_device"),
    (["algo=grpo", "reward.drop_nonfinite=true"], "drop_nonfinite"),
])
def test_impossible_combinations(override, match):
    with pytest.raises(ConfigError, match=match):
        validate(load_config(Config, None, override))


def test_yaml_booleans_do_not_break_string_options(tmp_path):
    cfg = load_config(Config, None, ["model.mixed_precision=no", "name=on", "sample.negative_prompt=yes please"])
    assert cfg.model.mixed_precision == "no" and cfg.name == "on" and cfg.sample.negative_prompt == "yes please"
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  mixed_precision: no\n")
    assert load_config(Config, f).model.mixed_precision == "no"


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Config, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Config, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Config, listy)


KEYS = ["name", "seed", "num_epochs", "train.learning_rate", "train.chunk_size", "sample.num_steps", "model.lora", "prompts"]


@settings(max_examples=150, deadline=None)
@given(key=st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=12)), value=st.text(max_size=12))
def test_fuzzed_overrides_never_crash(key, value):
    """Any key=value either loads into a well-typed config or raises ConfigError; never anything else."""
    try:
        cfg = load_config(Config, None, [f"{key}={value}"])
    except ConfigError:
        return
    assert isinstance(cfg.seed, int) and isinstance(cfg.train.learning_rate, float) and isinstance(cfg.prompts, list)


def test_shipped_configs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    files = sorted(root.glob("*.yaml"))
    assert {f.name for f in files} >= {"digits.yaml", "sd15.yaml", "sdxl.yaml", "sd3.yaml", "flux.yaml"}
    for f in files:
        validate(load_config(Config, f))


def test_layers_defaults_algorithm_reference_file_overrides(tmp_path):
    """Dataclass defaults (DDPO's) < the algorithm's reference values < the YAML file < key=value overrides."""
    from diffrl_fast.train.config import DEFAULT_PRESET

    assert load_config(Config).train.learning_rate == 3e-4  # ddpo-pytorch
    dpok = load_config(Config, None, ["algo=dpok"])
    assert (dpok.train.learning_rate, dpok.train.max_grad_norm, dpok.dpok.kl_form, dpok.train.optimizer_step_every) == (1e-5, 0.1, "eps_mse", "chunks")
    assert load_config(Config, None, ["algo=dpok", "train.learning_rate=1e-3"]).train.learning_rate == 1e-3
    f = tmp_path / "c.yaml"
    f.write_text("algo: dpok\ntrain:\n  max_grad_norm: 2.0\n")
    from_file = load_config(Config, f, [])
    assert from_file.train.max_grad_norm == 2.0 and from_file.train.learning_rate == 1e-5
    # the dense-reward reference switches its settings on the number of prompts, as its parse_args.py does
    one = load_config(Config, None, ["algo=dense", "prompts=[a cat]"])
    many = load_config(Config, None, ["algo=dense", "prompts=[a cat, a dog]"])
    assert (one.dense.temperature, one.dense.log_ratio_clip, one.dense.num_timesteps) == (10.0, 1e-4, 3)
    assert (many.dense.temperature, many.dense.log_ratio_clip, many.dense.num_timesteps) == (12.5, 5e-4, 1)
    # the digits preset sets the digits world's scale (and its by_algo entries), not the algorithms' conventions
    digits = load_config(Config, DEFAULT_PRESET, ["algo=dpok"])
    assert digits.train.learning_rate == 1e-4 and digits.dpok.advantage == "normalized"  # by_algo.dpok
    assert digits.train.max_grad_norm == 0.1 and digits.dpok.ratio_clip == "clamp"  # DPOK's own
    assert load_config(Config, DEFAULT_PRESET, ["algo=dpok", "train.learning_rate=2e-5"]).train.learning_rate == 2e-5
    assert load_config(Config, DEFAULT_PRESET, ["algo=ddpo_is"]).train.learning_rate == 3e-4


def test_help_shows_list_defaults():
    """List and dict fields (default_factory) show their real default in describe and in `diffrl-fast train --help`."""
    from tests.cli_inprocess import run_cli

    text = "\n".join(describe(Config))
    assert "MISSING" not in text and "default ['0', '1'" in text and "reward.kwargs (dict, default {})" in text
    out = run_cli("train", "--help")
    assert out.returncode == 0 and "MISSING" not in out.stdout, out.stdout[:2000]
    for line in ("  prompts (list, default ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9'])",
                 "  model.lora_targets (list, default ['to_q', 'to_k', 'to_v', 'to_out.0'])",
                 "  reward.kwargs (dict, default {})", "  reward.track (list, default [])"):
        assert line in out.stdout, line


def test_deepspeed_scheduler_section_is_rejected(tmp_path):
    from diffrl_fast.train.distributed import deepspeed_config

    cfg = validate(load_config(Config, None, []))
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}')
    with pytest.raises(ValueError, match="train.lr_schedule"):
        deepspeed_config(cfg, str(path))
    path.write_text('{"zero_optimization": {"stage": 3}}')
    ds = deepspeed_config(cfg, str(path))
    assert ds["zero_optimization"]["stage"] == 3 and ds["optimizer"]["params"]["lr"] == cfg.train.learning_rate


def test_d3po_step_per_pair_needs_a_constant_schedule_and_one_process(monkeypatch):
    base = ["algo=d3po", "d3po.samples_per_prompt=4", "sample.batch_size=8", "train.batch_size=8"]
    validate(load_config(Config, None, base))
    with pytest.raises(ConfigError, match="lr_schedule=constant"):
        validate(load_config(Config, None, [*base, "train.lr_schedule=cosine"]))
    validate(load_config(Config, None, [*base, "train.lr_schedule=cosine", "d3po.step_per_pair=false"]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="several processes set d3po.step_per_pair=false"):
        validate(load_config(Config, None, base))
