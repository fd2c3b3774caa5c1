"""What a person sees of a run: labelled before/after grids, per-epoch grids in TensorBoard, the Weights & Biases
logger (offline), run names that follow the model and the algorithm, and commands whose defaults fit the model."""
import json
import struct
import sys

import pytest
import torch

from diffrl_fast.config_utils import load_config
from diffrl_fast.train.config import DEFAULT_PRESET, Config, validate
from tests.cli_inprocess import run_cli

GREEN, RED = (0, 140, 0), (200, 0, 0)


def _colour_count(image, colour) -> int:
    pixels = torch.from_numpy(__import__("numpy").asarray(image.convert("RGB")).copy()).reshape(-1, 3)
    return int((pixels == torch.tensor(colour, dtype=pixels.dtype)).all(1).sum())


def test_labelled_grid_marks_each_image():
    """Each tile gets its prompt and reward; a green check where the classifier's top class is the prompted digit,
    a red cross (and the digit it saw) where not; 16x16 tiles are enlarged with nearest-neighbour sampling."""
    from diffrl_fast.train.outputs import labelled_grid

    images = torch.rand(2, 1, 16, 16)
    ok = labelled_grid(images[:1], [{"prompt": "3", "reward": -0.1, "slots": [[3, 3]]}], title="t")
    bad = labelled_grid(images[1:], [{"prompt": "4", "reward": -5.0, "slots": [[4, 9]]}])
    assert _colour_count(ok, GREEN) > 10 and _colour_count(ok, RED) == 0
    assert _colour_count(bad, RED) > 10 and _colour_count(bad, GREEN) == 0
    assert ok.width >= 96 and ok.height > 96 + 20  # the tile is 96 px wide (6x), with two caption lines below
    # the tile (4-pixel margin, no title) is the image enlarged 6x, each pixel a 6x6 block
    tile = torch.from_numpy(__import__("numpy").asarray(bad.convert("L"))[4:100, 4:100].copy())
    expected = (images[1, 0] * 255).round().to(torch.uint8).repeat_interleave(6, 0).repeat_interleave(6, 1)
    assert torch.equal(tile, expected)
    # a layout prompt gets a mark per slot: one right (check), one wrong (cross), on a 32x32 canvas
    both = labelled_grid(torch.rand(1, 1, 32, 32), [{"prompt": "3 left of 8", "reward": -4.0, "slots": [[3, 3], [8, 1]]}])
    assert _colour_count(both, GREEN) > 10 and _colour_count(both, RED) > 10
    one = labelled_grid(torch.rand(1, 1, 32, 32), [{"prompt": "3 left of 8", "reward": -4.0, "slots": [[3, 3], [8, 8]]}])
    assert _colour_count(one, GREEN) > _colour_count(ok, GREEN) and _colour_count(one, RED) == 0
    plain = labelled_grid(torch.rand(3, 3, 8, 8), [{"prompt": "a cat", "reward": 1.5}] * 3)
    assert _colour_count(plain, GREEN) == 0 and _colour_count(plain, RED) == 0
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        labelled_grid(images, [{"prompt": "3", "reward": 0.0}])


def test_digits_run_labels_grids_and_logs_images_to_tensorboard(tmp_path):
    """The digits world, 1 epoch of 8 two-step samples: the trainer's evaluation captions carry the prompted digit and
    the classifier's verdict; grid_before/after.png are labelled grids; TensorBoard holds the epoch's grid and both
    before/after grids (read back with its EventAccumulator)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from diffrl_fast.train.trainer import Trainer

    cfg = validate(load_config(Config, DEFAULT_PRESET, [
        "num_epochs=1", "sample.num_steps=2", "sample.batch_size=8", "sample.num_batches_per_epoch=1", "train.batch_size=8",
        "log.eval_samples=8", "log.grid_samples=4", "log.progress=false", "reward.overlap=false", f"output_dir={tmp_path}"]))
    assert cfg.name == "digits_ddpo" and cfg.log.tensorboard
    trainer = Trainer(cfg, tmp_path / "run", log_fn=lambda s: None)
    rewards, images, caps = trainer.evaluate(8, captions=True)
    assert rewards.shape == (8,) and images.shape == (4, 1, 16, 16) and len(caps) == 4
    assert [c["prompt"] for c in caps] == ["0", "1", "2", "3"] and [c["slots"][0][0] for c in caps] == [0, 1, 2, 3]
    assert all(len(c["slots"]) == 1 and 0 <= c["slots"][0][1] <= 9 for c in caps)
    assert [c["reward"] for c in caps] == pytest.approx(rewards[:4].tolist())
    assert len(trainer.evaluate(8)) == 2  # callers without captions get (rewards, images) as before
    trainer.run()
    run = tmp_path / "run"
    from PIL import Image

    for tag in ("before", "after"):
        grid = Image.open(run / f"grid_{tag}.png")
        assert grid.width >= 2 * 96 and _colour_count(grid, GREEN) + _colour_count(grid, RED) > 0, tag
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    assert {"samples", "grid_before", "grid_after"} <= set(tags), tags
    assert [e.step for e in acc.Images("samples")] == [1] and acc.Images("samples")[0].width >= 2 * 96
    assert "reward_mean" in acc.Tags()["scalars"]
    assert trainer.logger.tb is None  # closed at the end of the run


def _wandb_records(path):
    """The records of a .wandb file (wandb's LevelDB-style log of protobuf Records: 32 KiB blocks of chunks with a
    7-byte header, crc32 / length / type FULL=1 FIRST=2 MIDDLE=3 LAST=4, after the file's 7-byte ':W&B' header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def _flatten(items) -> dict:
    return {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}


def test_wandb_offline_run_holds_config_history_and_grids(tmp_path, monkeypatch):
    """log.wandb=true with WANDB_MODE=offline: the offline run's .wandb file holds the config, each epoch's scalars at
    steps 1 and 2, the epoch grids and the before/after grids (as image files in the run's media folder)."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install \"diffrl_fast[wandb]\")")
    from diffrl_fast.train.trainer import Trainer
    from tests.algos.toy import ToyModel

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    monkeypatch.setattr("diffrl_fast.train.trainer.save_final_weights", lambda *a, **k: None)
    cfg = validate(load_config(Config, None, [
        "reward.name=tests.algos.toy:toy_reward", "prompts=[a, b]", "sample.num_steps=2", "sample.batch_size=4",
        "train.batch_size=4", "num_epochs=2", "log.eval_samples=2", "log.grid_samples=2", "log.progress=false",
        "log.tensorboard=false", "log.wandb=true", "log.wandb_project=test_project", f"output_dir={tmp_path}"]))
    Trainer(cfg, tmp_path / "run", model=ToyModel(), log_fn=lambda s: None).run()
    files = list((tmp_path / "wb").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    records = list(_wandb_records(files[0]))
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].project == "test_project" and runs[0].display_name == "digits_ddpo"
    config = _flatten(runs[0].config.update)
    assert config["algo"] == "ddpo_is" and config["log"]["wandb"] is True and config["num_epochs"] == 2
    history = [_flatten(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    scalars = [h for h in history if "reward_mean" in h]
    assert [h["_step"] for h in scalars] == [1, 2]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["reward_mean"] for h in scalars] == pytest.approx([m["reward_mean"] for m in metrics])
    logged = {k.split("/")[0] for h in history for k in h}
    assert {"samples", "grid_before", "grid_after", "loss", "grad_norm"} <= logged, logged
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_flatten(r.summary.update))
    assert summary["eval_after_mean"] == pytest.approx(json.loads((tmp_path / "run" / "eval_after.json").read_text())["mean"])
    media = list(files[0].parent.glob("files/media/images/*.png"))
    assert len(media) >= 3, media  # before, after and at least one epoch grid
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() == runs[0].run_id


def test_wandb_missing_names_its_extra(monkeypatch, tmp_path):
    """log.wandb=true without wandb: exit code 2 and one line naming the extra, before any model loads."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = run_cli("train", "log.wandb=true", f"output_dir={tmp_path}", "reward.name=tests.algos.toy:toy_reward")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "log.wandb=true needs wandb" in out.stderr and 'pip install "diffrl_fast[wandb]"' in out.stderr
    assert "Traceback" not in out.stderr


def test_run_name_follows_model_and_algorithm():
    """Unset, the name is <model>_<algo>; a name from the YAML file or the command line wins."""
    name = lambda path, *o: load_config(Config, path, list(o)).name  # noqa: E731
    assert name(DEFAULT_PRESET) == name(None) == "digits_ddpo"
    assert name(DEFAULT_PRESET, "algo=grpo") == "digits_grpo"
    assert name(DEFAULT_PRESET, "model.path=/models/sd3-medium/", "algo=grpo") == "sd3-medium_grpo"
    assert name(None, "model.path=stabilityai/stable-diffusion-3.5-medium", "algo=nft") == "stable-diffusion-3.5-medium_nft"
    assert name(DEFAULT_PRESET, "model.path=/models/sd3", "algo=grpo", "name=mine") == "mine"
    assert name(DEFAULT_PRESET.parent / "sd3.yaml", "algo=nft") == "stable-diffusion-3.5-medium_nft"  # presets set no name


def test_check_parity_digits_defaults_fit_the_model():
    """check-parity --model digits with its default prompts: the digits world's own (not "a photo of a cat")."""
    out = run_cli("check-parity", "--model", "digits", "--samples", "3", "--steps", "3")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PASS" in out.stdout
