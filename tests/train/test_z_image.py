"""Z-Image trained end to end on its tiny build by grpo (with guidance), nft and awm, with LoRA that loads in the
stock ZImagePipeline."""
import json
import math

import pytest

from diffrl_fast._versions import FEATURE_VERSIONS, at_least
from diffrl_fast.config_utils import load_config
from diffrl_fast.models.tiny import cached_tiny_pipeline
from diffrl_fast.train.config import Config, validate
from diffrl_fast.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not at_least(*FEATURE_VERSIONS["Z-Image pipelines (ZImagePipeline)"]),
                                reason="Z-Image pipelines need diffusers>=0.42 (the lowest leg pins 0.32)")
from tests.train.tiny_flow import ALGOS, TINY



@pytest.fixture(scope="module")
def z_image_path(tmp_path_factory):
    return cached_tiny_pipeline("z_image", root=tmp_path_factory.mktemp("tiny_z_image"))


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_z_image_trains_with_lora(z_image_path, tmp_path, algo):
    cfg = validate(load_config(Config, None, [f"model.path={z_image_path}", f"output_dir={tmp_path}", "name=r", f"algo={algo}", *TINY,
                                              *ALGOS[algo]]))
    summary = Trainer(cfg, tmp_path / "r", log_fn=lambda s: None).run()
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]) and summary["after"]["n"] == 2
    if algo == "grpo":
        import torch
        from diffusers import ZImagePipeline

        pipe = ZImagePipeline.from_pretrained(z_image_path)
        before = pipe(["a cat"], guidance_scale=0.0, num_inference_steps=2, height=64, width=64, output_type="latent",
                      generator=torch.Generator().manual_seed(0)).images
        pipe.load_lora_weights(tmp_path / "r" / "lora", weight_name="pytorch_lora_weights.safetensors")
        assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
        after = pipe(["a cat"], guidance_scale=0.0, num_inference_steps=2, height=64, width=64, output_type="latent",
                     generator=torch.Generator().manual_seed(0)).images
        assert not torch.allclose(before, after)  # the trained adapter changes the stock pipeline's samples
