"""Human preferences: `diffrl-fast label` records choices; D3PO trains on exactly the labelled images."""
import json
import subprocess
import sys

import pytest
import torch

from diffrl_fast.config_utils import load_config
from diffrl_fast.train.config import DEFAULT_PRESET, Config, validate
from diffrl_fast.train.trainer import Trainer


def test_label_then_train_d3po_on_the_choices(tmp_path):
    labels = tmp_path / "labels.json"
    out = subprocess.run([sys.executable, "-m", "diffrl_fast", "label", "--prompt", "3", "--prompt", "a handwritten 8",
                          "--pairs", "4", "--choices", "1,2,s,2", "--steps", "4", "--out", str(labels),
                          "--images", str(tmp_path / "img")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(labels.read_text())
    assert [it["choice"] for it in data["items"]] == [0, 1, 1] and (tmp_path / "img" / "pair_0000.png").exists()
    assert data["items"][1]["seeds"] == [2, 3]

    cfg = validate(load_config(Config, DEFAULT_PRESET, ["algo=d3po", f"d3po.preferences={labels}", "sample.num_steps=4",
                                              "sample.batch_size=4", "sample.num_batches_per_epoch=1", "train.batch_size=4",
                                              "num_epochs=1", "log.eval_samples=0", "log.progress=false",
                                              f"output_dir={tmp_path}", "name=h"]))
    trainer = Trainer(cfg, tmp_path / "h", log_fn=lambda s: None)
    traj, rewards = trainer.sample_epoch(0)
    items = {(it["prompt"], tuple(it["seeds"])): it for it in data["items"]}
    assert all((traj.prompts[i], (int(traj.seeds[i]), int(traj.seeds[i + 1]))) in items for i in range(0, 4, 2))
    assert torch.equal(traj.latents[0, 0], traj.latents[1, 0])  # the pair shares x_T, as labelled
    data_ = trainer.algo.prepare(trainer.run_context, traj, rewards)
    winners = {int(w) for w, _ in data_.extra["pairs"].tolist()}
    for i in range(0, 4, 2):  # the human's choice wins, whatever the reward says
        it = items[(traj.prompts[i], (int(traj.seeds[i]), int(traj.seeds[i + 1])))]
        assert i + it["choice"] in winners and i + 1 - it["choice"] not in winners
    trainer.run()
    assert (tmp_path / "h" / "metrics.jsonl").exists()

    bad = validate(load_config(Config, DEFAULT_PRESET, ["algo=d3po", f"d3po.preferences={labels}", "sample.num_steps=20"]))
    with pytest.raises(ValueError, match="other settings"):
        Trainer(bad, tmp_path / "x", log_fn=lambda s: None)
