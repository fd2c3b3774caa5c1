"""Tiny offline pipelines: tokenizers use their own vocabularies, pipelines reload from disk and sample,
builds are deterministic, and the shared cache builds once and survives a lost race."""
import json
import os

import pytest
import torch

from diffrl_fast.models import tiny

PROMPTS = ["a photo of a cat", "two dogs playing on the beach"]


def _run(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPTS, num_inference_steps=2, generator=generator, **kwargs).images


def test_clip_tokenizer_uses_its_vocab(tmp_path):
    from transformers import CLIPTokenizer

    folder = tiny.write_tiny_clip_tokenizer(tmp_path / "tok", model_max_length=16)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.isfile(os.path.join(folder, name)), name
    vocab = json.loads((tmp_path / "tok" / "vocab.json").read_text())
    tok = CLIPTokenizer.from_pretrained(folder)
    bos, eos = vocab[tiny.BOS], vocab[tiny.EOS]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (bos, eos, eos)
    assert eos == len(vocab) - 1, "EOS must be the largest id, as in CLIP"
    # every listed word is one token, and unknown words still tokenize (byte-level pieces)
    wrong = [w for w in tiny.WORDS if tok(w, add_special_tokens=False).input_ids != [vocab[w + "</w>"]]]
    assert not wrong, f"words split into several tokens: {wrong[:10]}"
    ids = tok("A Photo of 7 zebras!", padding="max_length", max_length=16).input_ids
    assert ids[:4] == [bos, vocab["a</w>"], vocab["photo</w>"], vocab["of</w>"]]
    assert vocab["7</w>"] in ids and ids[-1] == eos and len(ids) == 16
    assert tok.decode(tok("a cat", add_special_tokens=False).input_ids) == "a cat"


def test_t5_tokenizer_uses_its_vocab(tmp_path):
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(tiny.write_tiny_t5_tokenizer(tmp_path / "t5"))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a photo of a Cat").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁a", "▁C", "a", "t", "</s>"]


def _check_ddpm_family(scheduler):
    from diffusers import DDIMScheduler

    assert isinstance(scheduler, DDIMScheduler)
    c = scheduler.config
    assert (c.beta_schedule, c.beta_start, c.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (c.clip_sample, c.set_alpha_to_one, c.steps_offset, c.prediction_type) == (False, False, 1, "epsilon")


def test_sd_reloads_and_samples(tmp_path):
    from diffusers import StableDiffusionPipeline

    path = tiny.build_tiny_sd(tmp_path / "sd")
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    _check_ddpm_family(pipe.scheduler)
    assert pipe.safety_checker is None and pipe.vae_scale_factor == 8
    assert tuple(pipe.unet.config.block_out_channels) == (32, 64) and pipe.unet.config.sample_size == 16
    assert pipe.tokenizer("cat", add_special_tokens=False).input_ids == [tiny.tiny_clip_vocab()[0]["cat</w>"]]
    images = _run(pipe, output_type="pt")
    assert images.shape == (2, 3, 128, 128) and torch.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.01


def test_sd_sizes_follow_arguments(tmp_path):
    """The benchmark's "small" UNet (wider, 2 layers per block) on 4x32x32 latents."""
    from diffusers import StableDiffusionPipeline

    path = tiny.build_tiny_sd(tmp_path / "small", block_out_channels=(64, 128), layers_per_block=2, latent_size=32)
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a cat", num_inference_steps=1, output_type="latent").images
    assert latents.shape == (1, 4, 32, 32)
    assert pipe.unet.config.layers_per_block == 2 and pipe.vae.config.sample_size == 256


def test_sdxl_reloads_and_samples(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    path = tiny.build_tiny_sdxl(tmp_path / "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True)
    _check_ddpm_family(pipe.scheduler)
    assert pipe.unet.config.addition_embed_type == "text_time"
    images = _run(pipe, output_type="pt")
    assert images.shape == (2, 3, 128, 128) and torch.isfinite(images).all()


@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no_t5"])
def test_sd3_reloads_and_samples(tmp_path, with_t5):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    path = tiny.build_tiny_sd3(tmp_path / "sd3", with_t5=with_t5)
    # diffusers does not treat the T5 branch as optional: a folder without it needs explicit Nones
    no_t5 = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True, **no_t5)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    assert (pipe.text_encoder_3 is not None) == with_t5
    images = _run(pipe, output_type="np", max_sequence_length=32)
    assert images.shape == (2, 128, 128, 3)
    latents = _run(pipe, output_type="latent", max_sequence_length=32)
    assert latents.shape == (2, 16, 16, 16)


def _weights(folder):
    from safetensors.torch import load_file

    return {
        f"{sub}/{name}": tensor
        for sub in ("unet", "vae", "text_encoder")
        for name, tensor in load_file(next((folder / sub).glob("*.safetensors"))).items()
    }


def test_builds_are_deterministic_and_leave_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_sd(tmp_path / "a", seed=0)
    assert torch.equal(torch.rand(3), expected_next), "building must not consume the caller's RNG"
    tiny.build_tiny_sd(tmp_path / "b", seed=0)
    tiny.build_tiny_sd(tmp_path / "c", seed=1)
    a, b, c = (_weights(tmp_path / k) for k in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["unet/conv_in.weight"], c["unet/conv_in.weight"])


def test_cache_builds_once_per_arguments(tmp_path):
    first = tiny.cached_tiny_pipeline("clip", root=tmp_path)
    stamp = os.stat(os.path.join(first, "tiny_build.json")).st_mtime_ns
    assert tiny.cached_tiny_pipeline("clip", root=tmp_path) == first
    assert tiny.cached_tiny_pipeline("clip", root=tmp_path, projection_dim=16, seed=0) == first, "defaults are keyed"
    assert os.stat(os.path.join(first, "tiny_build.json")).st_mtime_ns == stamp, "rebuilt a cached model"
    other = tiny.cached_tiny_pipeline("clip", root=tmp_path, projection_dim=8)
    assert other != first and json.load(open(os.path.join(other, "config.json")))["projection_dim"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([os.path.basename(first), os.path.basename(other)])
    with pytest.raises(ValueError, match="unknown tiny pipeline"):
        tiny.cached_tiny_pipeline("sd4", root=tmp_path)
    with pytest.raises(TypeError):
        tiny.cached_tiny_pipeline("clip", root=tmp_path, latent_size=8)


def test_cache_survives_losing_the_race(tmp_path, monkeypatch):
    """Another process renames its build into place while we build: we return its folder, drop ours."""
    winner = {}
    build = tiny.BUILDERS["clip"]

    def racing_build(path, **kwargs):
        build(path, **kwargs)
        final = tmp_path / tiny._cache_key("clip", kwargs)  # kwargs arrive complete, defaults included
        build(final, **kwargs)
        (final / "tiny_build.json").write_text("{}")
        winner["path"] = str(final)

    monkeypatch.setitem(tiny.BUILDERS, "clip", racing_build)
    assert tiny.cached_tiny_pipeline("clip", root=tmp_path) == winner["path"]
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(winner["path"])], "temporary build left behind"


def test_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRL_FAST_CACHE", str(tmp_path / "env"))
    assert tiny.default_cache_root() == tmp_path / "env"
    monkeypatch.delenv("DIFFRL_FAST_CACHE")
    assert tiny.default_cache_root().parts[-3:] == (".cache", "diffrl_fast", "tiny")


def test_pipeline_loads_in_the_asked_dtype(tmp_path):
    """The dtype reaches diffusers under the name its version reads (``torch_dtype`` before 0.40, ``dtype`` since;
    the other name is ignored there, which would load float32 silently)."""
    from diffrl_fast.models.pipelines import load_pipeline

    model = load_pipeline(tiny.cached_tiny_pipeline("sd", root=tmp_path), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
