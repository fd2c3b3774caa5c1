"""A model that cannot be loaded gives one message naming the cause and the fix, and exit code 2 at the CLI:
a hub id this machine cannot reach, a gated model without access, an unknown id, a broken pipeline folder."""
from __future__ import annotations

import json

import pytest

from diffrl_fast.models.pipelines import ModelLoadError, load_pipeline
from tests.cli_inprocess import run_cli


def test_unreachable_hub_id_names_the_cache_and_the_download(tmp_path):
    # the suite runs with HF_HUB_OFFLINE=1 (conftest): the id is not cached, the hub is not asked
    with pytest.raises(ModelLoadError, match=r"not in the local Hugging Face cache.*hf download stabilityai/sd-x --local-dir DIR"):
        load_pipeline("stabilityai/sd-x")


def _raising(exc):
    def from_pretrained(*args, **kwargs):
        try:
            raise exc
        except Exception as inner:
            raise OSError("diffusers' wrapper of the hub error") from inner
    return from_pretrained


def test_gated_and_unknown_repositories(monkeypatch):
    from diffusers import DiffusionPipeline
    from huggingface_hub import errors

    response = type("R", (), {"headers": {}, "status_code": 401, "request": None, "url": "u"})()
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", _raising(errors.GatedRepoError("gated", response=response)))
    with pytest.raises(ModelLoadError, match=r"gated model.*accept its licence on https://huggingface.co/org/m.*hf auth login"):
        load_pipeline("org/m")
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", _raising(errors.RepositoryNotFoundError("404", response=response)))
    with pytest.raises(ModelLoadError, match="not a model on the Hugging Face Hub, or it is private"):
        load_pipeline("org/m")


def test_broken_pipeline_folder(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ModelLoadError, match="could not load this pipeline folder.*complete save_pretrained folder"):
        load_pipeline(str(tmp_path))


def test_cli_exits_2_with_one_message_and_no_traceback(tmp_path):
    from diffrl_fast.train.config import PRESETS

    r = run_cli("train", str(PRESETS / "sd3.yaml"), f"output_dir={tmp_path}", "log.tensorboard=false")
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "stabilityai/stable-diffusion-3.5-medium" in r.stderr and "model.path=DIR" in r.stderr
