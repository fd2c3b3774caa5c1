"""Wan2.1 text-to-video trained end to end on its tiny build: grpo, nft and awm with LoRA on video latents
[B, 16, F, H, W], video rewards on frames [B, F, 3, H, W], the adapter loading in the stock WanPipeline, and
the user's mistakes (an image reward, a frame count the VAE cannot take, a video reward of the wrong shape,
a prompt too long for the text encoder) refused with exit 2 and the fix named."""
import json
import math

import pytest
import torch

from diffrl_fast._versions import FEATURE_VERSIONS, at_least

pytestmark = pytest.mark.skipif(not at_least(*FEATURE_VERSIONS["Wan pipelines (WanPipeline)"]),
                                reason="Wan pipelines need diffusers>=0.42 (the lowest leg pins 0.32)")

from diffrl_fast.config_utils import load_config
from diffrl_fast.models.tiny import cached_tiny_pipeline
from diffrl_fast.rewards import RewardError, get_reward
from diffrl_fast.rewards.video import video_reward
from diffrl_fast.train.config import Config, validate
from diffrl_fast.train.trainer import Trainer
from tests.cli_inprocess import run_cli

TINY = ["reward.name=video_temporal_consistency", "prompts=[a cat, a dog]", "sample.num_steps=3", "sample.batch_size=4",
        "sample.height=32", "sample.width=32", "sample.num_frames=5", "sample.num_batches_per_epoch=1", "train.batch_size=4",
        "train.chunk_size=3", "log.eval_samples=2", "log.grid_samples=2", "log.progress=false", "log.tensorboard=false",
        "reward.overlap=false", "num_epochs=1", "train.learning_rate=1e-3", "sample.guidance_scale=1.0"]
# grpo keeps its states in bf16, as a video run would (sample.trajectory_dtype; tests/diffusion/test_state_dtype.py)
ALGOS = {"grpo": ["grpo.group_size=2", "sample.trajectory_dtype=bfloat16"], "nft": ["nft.group_size=2"],
         "awm": ["awm.group_size=2", "awm.train_timesteps=2"]}


@pytest.fixture(scope="module")
def wan_path(tmp_path_factory):
    return cached_tiny_pipeline("wan", root=tmp_path_factory.mktemp("tiny_wan"))


@video_reward
def wrong_shape_reward(videos, prompts, metadata):
    """A video reward that returns one value per frame, [B, F], instead of [B]."""
    return videos.mean(dim=(2, 3, 4)), {}


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_wan_trains_with_lora_and_the_adapter_loads_in_wanpipeline(wan_path, tmp_path, algo):
    cfg = validate(load_config(Config, None, [f"model.path={wan_path}", f"output_dir={tmp_path}", "name=r", f"algo={algo}",
                                              "model.lora=true", "model.gradient_checkpointing=true", *TINY, *ALGOS[algo]]))
    summary = Trainer(cfg, tmp_path / "r", log_fn=lambda s: None).run()
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
    assert summary["after"]["n"] == 2 and (tmp_path / "r" / "grid_after.png").is_file()
    if algo == "grpo":
        from diffusers import WanPipeline

        pipe = WanPipeline.from_pretrained(wan_path)
        pipe.load_lora_weights(tmp_path / "r" / "lora", weight_name="pytorch_lora_weights.safetensors")
        assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
        # the run samples at its own size and frame count, saved as strips of frames; eval refuses an image reward
        out = run_cli("sample", "--run", str(tmp_path / "r"), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s"))
        assert out.returncode == 0, out.stderr[-2000:]
        from PIL import Image

        w, h = Image.open(tmp_path / "s" / "0000.png").size
        assert w > 4 * h  # 5 frames of 32 x 32 side by side
        out = run_cli("eval", "--run", str(tmp_path / "r"), "--n", "2", "--reward", "jpeg_compressibility")
        assert out.returncode == 2 and "video_frame_mean" in out.stderr


def test_video_rewards_score_frames():
    videos = torch.rand(3, 4, 3, 16, 16)
    still = videos[:, :1].expand(-1, 4, -1, -1, -1)
    consistency = get_reward("video_temporal_consistency")
    assert torch.allclose(consistency(still, ["a"] * 3, [{}] * 3)[0], torch.ones(3))
    diff = (videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(1, 2, 3, 4))
    assert torch.allclose(consistency(videos, ["a"] * 3, [{}] * 3)[0], 1 - diff)
    frame_mean = get_reward("video_frame_mean", image_reward="brightness")
    image = get_reward("brightness")
    per_frame = torch.stack([image(videos[:, f], ["a"] * 3, [{}] * 3)[0] for f in range(4)], 1)
    assert torch.allclose(frame_mean(videos, ["a"] * 3, [{}] * 3)[0], per_frame.mean(1), atol=1e-6)
    with pytest.raises(RewardError, match="takes videos"):
        consistency(videos[:, 0], ["a"] * 3, [{}] * 3)  # images
    with pytest.raises(RewardError, match="at least 2 frames"):
        consistency(videos[:, :1], ["a"] * 3, [{}] * 3)


@pytest.mark.parametrize("extra, message", [
    (["reward.name=jpeg_compressibility"], "jpeg_compressibility scores images"),
    (["reward.track=[brightness]"], "brightness scores images"),
    (["guard.heldout_reward=[video_temporal_consistency]", "guard.diversity_encoder=digit_confidence"], "diversity_encoder=pixels"),
    (["model.channels_last=true"], "model.channels_last=false"),
    (["sample.num_frames=6"], "4k + 1"),
    (["reward.name=tests.train.test_video:wrong_shape_reward"], "wrong_shape_reward"),
    (["prompts=[a cat sitting on a chair in a room with a table and a book and a tree]"], "tokens long"),
])
def test_video_mistakes_exit_2_naming_the_fix(wan_path, tmp_path, extra, message):
    # the CLI's default preset is the digits world's: its held-out guard reward (an image classifier) is cleared here
    out = run_cli("train", f"model.path={wan_path}", f"output_dir={tmp_path}", "algo=grpo", *TINY, "grpo.group_size=2",
                  "guard.heldout_reward=[]", *extra)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]


def test_num_frames_on_an_image_model_exits_2(tmp_path):
    out = run_cli("train", "configs/flow_digits.yaml", "sample.num_frames=5", "num_epochs=1", f"output_dir={tmp_path}")
    assert out.returncode == 2 and "video models" in out.stderr
