"""Integration: a shortened DDPO run on the digits world raises the reward far beyond seed noise.

Measured (6 epochs x 128 samples, 128 fixed-seed eval samples, seeds 0/1/2): the eval reward rose by
+2.72, +2.51 and +2.43 (mean +2.56, sd 0.12) from -3.91. The threshold below, +1.5, is ~8 sd under the
mean improvement; an untrained policy scores exactly the "before" value on the same seeds.
"""
import json

import pytest

from diffrl_fast.config_utils import load_config
from diffrl_fast.train.config import Config, validate
from diffrl_fast.train.trainer import Trainer


@pytest.mark.slow
def test_short_ddpo_run_raises_digit_confidence(tmp_path):
    cfg = validate(load_config(Config, None, ["num_epochs=6", "log.eval_samples=128", "log.progress=false",
                                              f"output_dir={tmp_path}", "name=it"]))
    summary = Trainer(cfg, tmp_path / "it").run()
    before, after = summary["before"], summary["after"]
    assert after["mean"] - before["mean"] > 1.5, (before, after)
    records = [json.loads(x) for x in (tmp_path / "it" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["reward_mean"] > records[0]["reward_mean"]
    text = (tmp_path / "it" / "summary.md").read_text()
    assert "before" in text and "after" in text
