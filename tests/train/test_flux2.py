"""FLUX.2 trained end to end on its tiny builds by grpo, nft and awm: [klein] (grpo with CFG) and [dev] (its embedded
guidance); the LoRA loads in the stock Flux2KleinPipeline / Flux2Pipeline."""
import json
import math

import pytest

from diffrl_fast._versions import FEATURE_VERSIONS, at_least
from diffrl_fast.config_utils import load_config
from diffrl_fast.models.tiny import cached_tiny_pipeline
from diffrl_fast.train.config import Config, validate
from diffrl_fast.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not at_least(*FEATURE_VERSIONS["FLUX.2 pipelines (Flux2Pipeline, Flux2KleinPipeline)"]),
                                reason="FLUX.2 pipelines need diffusers>=0.42 (the lowest leg pins 0.32)")
from tests.train.tiny_flow import ALGOS, TINY



# klein with CFG where grpo runs it; dev with its embedded guidance (one pass per step), every algorithm at g = 1
CASES = [("flux2_klein", algo, ALGOS[algo]) for algo in sorted(ALGOS)]
CASES += [("flux2_dev", algo, [*ALGOS[algo], "sample.guidance_scale=1.0"]) for algo in sorted(ALGOS)]


@pytest.mark.parametrize("variant,algo,extra", CASES, ids=[f"{v}-{a}" for v, a, _ in CASES])
def test_flux2_trains_with_lora(tmp_path_factory, tmp_path, variant, algo, extra):
    path = cached_tiny_pipeline(variant, root=tmp_path_factory.getbasetemp() / "tiny_flux2")
    cfg = validate(load_config(Config, None, [f"model.path={path}", f"output_dir={tmp_path}", "name=r", f"algo={algo}", *TINY, *extra]))
    trainer = Trainer(cfg, tmp_path / "r", log_fn=lambda s: None)
    # the default LoRA reaches the single-stream blocks too (their fused qkv-mlp projection and their to_out)
    adapted = {n.split(".lora_")[0] for n, _ in trainer.model.denoiser.named_parameters() if ".lora_" in n}
    assert any(n.startswith("single_transformer_blocks.0.attn.to_qkv_mlp_proj") for n in adapted)
    assert any(n.startswith("single_transformer_blocks.0.attn.to_out") for n in adapted)
    if variant == "flux2_dev":
        assert trainer.model.guidance == 4.0  # Flux2Pipeline's default embedded guidance unless model.embedded_guidance sets one
    summary = trainer.run()
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]) and summary["after"]["n"] == 2
    if algo == "grpo":
        import torch
        from diffusers import Flux2KleinPipeline, Flux2Pipeline

        pipe = (Flux2Pipeline if variant == "flux2_dev" else Flux2KleinPipeline).from_pretrained(path)
        kw = dict(prompt=["a cat"], guidance_scale=4.0 if variant == "flux2_dev" else 1.0, num_inference_steps=2, height=64, width=64,
                  output_type="latent")
        before = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        pipe.load_lora_weights(tmp_path / "r" / "lora", weight_name="pytorch_lora_weights.safetensors")
        loaded = [n for n, _ in pipe.transformer.named_parameters() if "lora" in n]
        # every adapted module loads: the double blocks' projections and the single blocks' fused ones
        assert any(n.startswith("transformer_blocks.0.attn.to_q.") for n in loaded)
        assert any(n.startswith("single_transformer_blocks.0.attn.to_qkv_mlp_proj.") for n in loaded)
        after = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        assert not torch.allclose(before, after)  # the trained adapter changes the stock pipeline's samples


def test_flux2_dev_refuses_classifier_free_guidance(tmp_path_factory, tmp_path):
    path = cached_tiny_pipeline("flux2_dev", root=tmp_path_factory.getbasetemp() / "tiny_flux2")
    cfg = validate(load_config(Config, None, [f"model.path={path}", f"output_dir={tmp_path}", "name=r", "algo=grpo", *TINY,
                                              "grpo.group_size=2", "sample.guidance_scale=4.0"]))
    with pytest.raises(ValueError, match="sample.guidance_scale=1"):
        Trainer(cfg, tmp_path / "r", log_fn=lambda s: None)
