"""FSDP2 units sized for the models people train: SDXL's UNet, built from its config on the meta device, is cut by
the trainer's plan (every transformer block and resnet, then the root) into units of at most 5% of its parameters
each; a whole down or up block would hold up to 47% (up_blocks[0]: 1,207M of 2,567M)."""
from __future__ import annotations

from benchmarks.estimate_fsdp_units import MODELS, build, unit_sizes
from benchmarks.estimate_sdxl_memory import SDXL_UNET_PARAMS


def test_sdxl_units_hold_at_most_5_percent_each():
    cls_name, config, _, _ = MODELS["SDXL-base UNet"]
    unet = build(cls_name, config)
    rows = unit_sizes(unet)
    total = sum(r["params"] for r in rows)
    assert total == SDXL_UNET_PARAMS  # every parameter in exactly one unit
    shares = {r["name"]: r["params"] / total for r in rows}
    worst = max(shares, key=shares.get)
    assert shares[worst] <= 0.05, f"unit {worst} holds {100 * shares[worst]:.1f}% of the parameters"
    assert rows[-1]["name"] == "(root)" and len(rows) > 50
    # the plan's units are blocks and resnets, never a whole down/up block
    assert not any(r["name"].count(".") == 1 and r["name"].startswith(("down_blocks", "up_blocks")) for r in rows)
    old_largest = sum(p.numel() for p in unet.up_blocks[0].parameters())
    assert old_largest / total > 0.45  # what per-block wrapping put in one unit
