"""Qwen-Image trained end to end on its tiny build by grpo (with its norm-rescaled true CFG), nft and awm, with LoRA
that loads in the stock QwenImagePipeline."""
import json
import math

import pytest

from diffrl_fast._versions import FEATURE_VERSIONS, at_least
from diffrl_fast.config_utils import load_config
from diffrl_fast.models.tiny import cached_tiny_pipeline
from diffrl_fast.train.config import Config, validate
from diffrl_fast.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not at_least(*FEATURE_VERSIONS["Qwen-Image pipelines (QwenImagePipeline)"]),
                                reason="Qwen-Image pipelines need diffusers>=0.42 (the lowest leg pins 0.32)")
from tests.train.tiny_flow import ALGOS, TINY
ALGOS = {**ALGOS, "grpo": [*ALGOS["grpo"], "sample.negative_prompt=' '"]}  # the pipeline's examples' negative prompt



@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    return cached_tiny_pipeline("qwen_image", root=tmp_path_factory.mktemp("tiny_qwen"))


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_qwen_image_trains_with_lora(qwen_path, tmp_path, algo):
    cfg = validate(load_config(Config, None, [f"model.path={qwen_path}", f"output_dir={tmp_path}", "name=r", f"algo={algo}", *TINY,
                                              *ALGOS[algo]]))
    summary = Trainer(cfg, tmp_path / "r", log_fn=lambda s: None).run()
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]) and summary["after"]["n"] == 2
    if algo == "grpo":
        from diffusers import QwenImagePipeline

        pipe = QwenImagePipeline.from_pretrained(qwen_path)
        pipe.load_lora_weights(tmp_path / "r" / "lora", weight_name="pytorch_lora_weights.safetensors")
        assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
