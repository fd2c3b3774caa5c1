"""The meta-device memory counting of benchmarks/estimate_sdxl_memory.py, on a small UNet (and SDXL's size)."""
import pytest
import torch

from benchmarks.estimate_sdxl_memory import (SDXL_UNET_PARAMS, LiveBytes, UNetMemory, count_parameters, unet_inputs,
                                             working_memory)

# an SD-style UNet small enough to run for real on a CPU: two levels, cross-attention, linear projections
SMALL = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
             transformer_layers_per_block=1, attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=8,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
             use_linear_projection=True)
LATENT = 16


@pytest.fixture(autouse=True, scope="module")
def _quiet_diffusers():
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # ".to(dtype)" warns on every cast
    yield
    logging.set_verbosity(level)


def activations(r: dict) -> int:
    return r["activation"] + r["checkpoint_input"]


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ckpt", "ckpt"])
def test_counted_activations_are_linear_in_rows(mode, checkpointing):
    m = UNetMemory(SMALL, mode=mode, lora_rank=4, checkpointing=checkpointing)
    one, two = m.saved_bytes(1, LATENT), m.saved_bytes(2, LATENT)
    assert activations(one) > 0
    ratio = activations(two) / (2 * activations(one))
    assert abs(ratio - 1) < 0.01, f"2 rows = {ratio:.4f} x (2 x 1 row)"
    assert two["weight_copy"] == one["weight_copy"], "autocast's weight copies do not grow with the rows"


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_checkpointing_reduces_counted_bytes(mode):
    plain = UNetMemory(SMALL, mode=mode, lora_rank=4).saved_bytes(4, LATENT)
    ckpt = UNetMemory(SMALL, mode=mode, lora_rank=4, checkpointing=True).saved_bytes(4, LATENT)
    assert ckpt["checkpoint_input"] > 0, "the checkpointed blocks' inputs are counted"
    assert ckpt["total"] < 0.5 * plain["total"], f"checkpointing: {ckpt['total']} B, without: {plain['total']} B"


@pytest.mark.parametrize("precision", ["autocast", "bf16"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_meta_count_matches_real_tensors(mode, precision):
    """The same forward on real CPU tensors, each saved storage counted once by its data pointer."""
    meta = UNetMemory(SMALL, mode=mode, lora_rank=4, precision=precision).saved_bytes(2, LATENT)
    real = UNetMemory(SMALL, mode=mode, lora_rank=4, precision=precision, device="cpu")
    params = {p.untyped_storage().data_ptr() for p in real.unet.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    x, t, text, added = unet_inputs(real.unet, 2, LATENT, real.input_dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), real._mode():
        out = real.unet(x, t, text, added_cond_kwargs=added).sample
    assert torch.isfinite(out.float()).all()
    counted = sum(seen.values())
    assert abs(meta["total"] - counted) <= 0.01 * counted, f"meta {meta['total']} B, real {counted} B"


def test_peak_model_and_live_bytes():
    m = UNetMemory(SMALL, mode="full", checkpointing=True)
    p2, p4 = m.peak_bytes(2, LATENT), m.peak_bytes(4, LATENT)
    assert p4["backward_peak"] > p2["backward_peak"] > 0
    assert p2["after_forward"] <= p2["forward_peak"]
    fits = {k: (2 * p2[k] - p4[k], (p4[k] - p2[k]) / 2) for k in ("forward_peak", "backward_peak", "after_forward")}
    # the model is fitted through 2 and 4 rows; it must predict a direct count at 8 rows
    p8 = m.peak_bytes(8, LATENT)
    assert working_memory(fits, 8) == pytest.approx(p8["peak"], rel=0.02), (working_memory(fits, 8), p8["peak"])
    live = LiveBytes()
    with live:
        a = torch.empty(1000, device="meta")
        b = a.view(10, 100)  # a view is no allocation
        del a, b
    assert live.peak == 4000 and live.current == 0


def test_sdxl_parameter_count():
    assert count_parameters() == SDXL_UNET_PARAMS == 2_567_463_684
