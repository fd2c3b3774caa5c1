"""Load: 500 consecutive training steps without memory growth, and 10 resume cycles equal to one run."""
import json

import pytest

from diffrl_fast.config_utils import load_config
from diffrl_fast.train.config import Config, validate
from diffrl_fast.train.trainer import Trainer
from diffrl_fast.utils.memory import _status_kb

SOAK = ["sample.num_steps=4", "sample.batch_size=8", "sample.num_batches_per_epoch=1", "train.batch_size=8",
        "train.chunk_size=4", "log.eval_samples=0", "log.progress=false", "log.tensorboard=false", "reward.overlap=false"]


@pytest.mark.slow
def test_500_training_steps_without_memory_growth(tmp_path):
    """The full loop (sample, reward, train, log, checkpoint) with 25 optimiser steps per epoch."""
    cfg = validate(load_config(Config, None, [*SOAK, "train.num_inner_epochs=25", "num_epochs=2", f"output_dir={tmp_path}", "name=soak"]))
    trainer = Trainer(cfg, tmp_path / "soak", log_fn=lambda s: None)
    trainer.logger.print = lambda s: None
    trainer.run()  # warm-up: 50 steps
    rss_warm = _status_kb("VmRSS:")
    cfg.num_epochs = 22
    trainer.run()  # 500 more, over 20 epochs (rollouts, rewards, checkpoints)
    rss_end = _status_kb("VmRSS:")
    steps = [json.loads(x)["optimizer_steps"] for x in (tmp_path / "soak" / "metrics.jsonl").read_text().splitlines()]
    assert sum(steps) == 550
    growth = (rss_end - rss_warm) / rss_warm
    print(f"RSS after warm-up {rss_warm / 1024:.0f} MB, after 500 steps {rss_end / 1024:.0f} MB ({growth:+.1%})")
    assert growth < 0.05


@pytest.mark.slow
def test_ten_resume_cycles_equal_one_uninterrupted_run(tmp_path):
    def cfg(name, epochs):
        return validate(load_config(Config, None, [*SOAK, f"num_epochs={epochs}", f"output_dir={tmp_path}", f"name={name}"]))

    Trainer(cfg("once", 10), tmp_path / "once", log_fn=lambda s: None).run()
    for cycle in range(1, 11):
        t = Trainer(cfg("cycles", cycle), tmp_path / "cycles", log_fn=lambda s: None)
        assert t.resume() == (cycle > 1)
        t.run()
    read = lambda name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    keys = ("reward_mean", "reward_std", "loss", "clipfrac", "approx_kl", "grad_norm")
    assert [[r[k] for k in keys] for r in read("once")] == [[r[k] for k in keys] for r in read("cycles")]
