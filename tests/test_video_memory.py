"""The video memory benchmark and the counted Wan estimate: one in-process measurement on the tiny Wan, the line fit,
and the meta-device count of a small Wan transformer (linear in rows; checkpointing per block holds less)."""
import pytest
import torch

from diffrl_fast._versions import FEATURE_VERSIONS, at_least

pytestmark = pytest.mark.skipif(not at_least(*FEATURE_VERSIONS["Wan pipelines (WanPipeline)"]),
                                reason="Wan pipelines need diffusers>=0.42")
SMALL_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=32,
                 freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                 rope_max_seq_len=32)


def test_fit_recovers_a_line():
    from benchmarks.bench_video_memory import fit

    f = fit([1, 5, 9, 17], [3 + 2 * x for x in (1, 5, 9, 17)])
    assert f["slope_mb_per_frame"] == pytest.approx(2) and f["intercept_mb"] == pytest.approx(3) and f["r2"] == pytest.approx(1)


def test_one_measurement_on_the_tiny_wan(tmp_path):
    from benchmarks.bench_video_memory import measure
    from diffrl_fast.models.tiny import cached_tiny_pipeline

    r = measure(cached_tiny_pipeline("wan", root=tmp_path / "tiny"), 5, True, 32, "cpu", 1, tmp_path / "w")
    assert r["latent_frames"] == 2 and r["tokens"] == 2 * 2 * 2  # 2 latent frames of 4x4 latents in 2x2 patches
    assert r["stored_states"] == 5 and r["trajectory_mb_per_sample"] == pytest.approx(5 * 16 * 2 * 4 * 4 * 4 / 2**20)
    assert r["peak_mb"] >= 0


def test_counted_rows_are_linear_and_checkpointing_holds_less():
    from benchmarks.estimate_sdxl_memory import MetaAutocast
    from benchmarks.estimate_wan_memory import build, latent_shape, row_peak

    shape = latent_shape(frames=9, height=64, width=64)
    assert shape == (16, 3, 8, 8)
    peaks = {}
    for ckpt in (False, True):
        model = build(SMALL_WAN, 4, ckpt, [None], lambda: MetaAutocast("autocast"))
        one, two = row_peak(model, 1, shape)["peak"], row_peak(model, 2, shape)["peak"]
        assert 0 < one < two
        peaks[ckpt] = one
    assert peaks[True] < peaks[False]
    with torch.device("meta"):
        assert latent_shape() == (16, 21, 60, 104)  # Wan2.1's 81 frames of 480 x 832
