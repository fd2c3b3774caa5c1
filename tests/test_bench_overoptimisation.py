"""The over-optimisation experiment runs end to end in a tiny configuration (so it cannot rot) and writes its
findings, curves and grids."""
import json

from benchmarks import bench_overoptimisation as b


def test_overoptimisation_smoke(tmp_path):
    assert b.main(["--smoke", "--epochs", "2", "--guard-samples", "8", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "overoptimisation_smoke.json").read_text())
    assert set(data["runs"]) == {"watch", "stop", "grpo_guard"}
    f = data["findings"]
    assert f["peak_epoch"] in (0, 1, 2) and f["kept_epoch"] is not None and f["prefix_identical"] in (True, False)
    watch = data["runs"]["watch"]
    assert [h["epoch"] for h in watch["guard"]["history"]] == [0, 1, 2]
    assert {"reward_brightness", "reward_digit_layout", "guard_heldout", "guard_drift"} <= set(watch["records"][-1])
    assert "grpo.guard=true" in data["runs"]["grpo_guard"]["overrides"]
    md = (tmp_path / "overoptimisation_smoke.md").read_text()
    assert "within 2 evaluations after the peak" in md and "GRPO-Guard" in md
    for png in ("overoptimisation_smoke.png", "overoptimisation_smoke_grids.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert b.main(["--epochs", "1", "--out", str(tmp_path)]) == 2
