"""diffrl-fast convert-reward (a pickled reward head -> safetensors, weights_only) and diffrl-fast eval with a reward's
keyword arguments (--reward NAME --kwargs JSON), in-process."""
import hashlib
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from diffrl_fast.models.tiny import build_tiny_clip
from diffrl_fast.rewards import get_reward
from diffrl_fast.rewards.clip import AestheticMLP
from tests.cli_inprocess import run_cli

PROJECTION_DIM = 16


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"), image_size=32, projection_dim=PROJECTION_DIM)


@pytest.fixture(scope="module")
def laion_pth(tmp_path_factory):
    """A tiny LAION aesthetic head saved as its .pth is: torch.save of the module's state dict (a pickle)."""
    torch.manual_seed(0)
    mlp = AestheticMLP(PROJECTION_DIM)
    with torch.no_grad():
        for p in mlp.parameters():
            p.mul_(10)  # default init gives outputs ~0; make the head matter
    path = tmp_path_factory.mktemp("laion") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(mlp.state_dict(), path)
    return path, mlp.eval()


def test_convert_writes_safetensors_that_score_like_the_original_module(clip_dir, laion_pth, tmp_path):
    src, mlp = laion_pth
    dst = tmp_path / "aesthetic.safetensors"
    out = run_cli("convert-reward", str(src), str(dst))
    assert out.returncode == 0, out.stderr
    for i in (0, 2, 4, 6, 7):
        assert f"layers.{i}.weight" in out.stdout
    assert "(1024, 16)" in out.stdout and "10 tensors" in out.stdout
    assert f"sha256 {hashlib.sha256(src.read_bytes()).hexdigest()}  {src}" in out.stdout
    assert f"sha256 {hashlib.sha256(dst.read_bytes()).hexdigest()}  {dst}" in out.stdout
    converted = load_file(str(dst))
    assert converted.keys() == mlp.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in mlp.state_dict().items())

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fn = get_reward("aesthetic", clip_path=clip_dir, mlp_path=str(dst))
    rewards, _ = fn(images, ["a", "b", "c"], [{}] * 3)
    with torch.no_grad():
        expected = mlp(fn.embed(images))  # the original module on the same L2-normalised CLIP embeddings
    torch.testing.assert_close(rewards, expected, rtol=1e-6, atol=1e-6)
    assert rewards.std() > 0

    again = run_cli("convert-reward", str(src), str(dst))  # never overwrites silently
    assert again.returncode == 2 and "--force" in again.stderr
    assert run_cli("convert-reward", str(src), str(dst), "--force").returncode == 0
    default = run_cli("convert-reward", str(src))  # default output: the suffix swapped
    assert default.returncode == 0 and src.with_suffix(".safetensors").is_file()


class _Custom:  # a pickled object that weights_only refuses: loading it would run code
    def __init__(self):
        self.w = torch.ones(2)


def test_convert_reports_missing_and_unsafe_files_with_exit_2(tmp_path):
    out = run_cli("convert-reward", str(tmp_path / "missing.pth"))
    assert out.returncode == 2 and "missing.pth not found" in out.stderr and "Traceback" not in out.stderr
    torch.save({"head": _Custom()}, tmp_path / "unsafe.pth")
    out = run_cli("convert-reward", str(tmp_path / "unsafe.pth"))
    err = out.stderr.strip()
    assert out.returncode == 2 and "weights_only=True" in err and "refuses to run code" in err, err
    assert not (tmp_path / "unsafe.safetensors").exists()
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    out = run_cli("convert-reward", str(tmp_path / "junk.pth"))
    assert out.returncode == 2 and "junk.pth" in out.stderr and "Traceback" not in out.stderr


def test_eval_takes_each_rewards_kwargs_and_reward_servers(clip_dir, laion_pth, tmp_path, serve):
    from diffrl_fast.rewards.remote import make_app

    src, _ = laion_pth
    kwargs = {"clip_path": clip_dir, "mlp_path": str(src)}
    server = serve(make_app(get_reward("aesthetic", **kwargs), "aesthetic"))
    out = run_cli("eval", "--model", "digits", "--prompt", "3", "--n", "2", "--steps", "2",
                  "--reward", "aesthetic", "--kwargs", json.dumps(kwargs), "--reward", "jpeg_compressibility",
                  "--reward", "aesthetic", "--kwargs", json.dumps(kwargs), "--reward", server.url,
                  "--json", str(tmp_path / "e.json"), "--device", "cpu")
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "e.json").read_text())["rewards"]
    assert set(data) == {"aesthetic", "jpeg_compressibility", "aesthetic#2", server.url}
    assert data["aesthetic"] == data["aesthetic#2"] and data["aesthetic"]["n"] == 2
    # the served reward scores the images sent as 8-bit arrays (reward.remote_format's default)
    assert data[server.url]["mean"] == pytest.approx(data["aesthetic"]["mean"], rel=0.02, abs=0.05)
    assert "aesthetic:" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--kwargs", "{}", "--reward", "aesthetic"], "--kwargs must follow the --reward"),
    (["--reward", "aesthetic", "--kwargs", "{bad"], "--kwargs of --reward aesthetic is not JSON"),
    (["--reward", "aesthetic", "--kwargs", "[1]"], "must be a JSON object"),
    (["--reward", "aesthetic"], "--reward aesthetic: .*missing.*clip_path.*--kwargs JSON"),
    (["--reward", "hpsv2", "--kwargs", '{"checkpoint": "/nowhere/HPS_v2.1_compressed.pt", "frobnicate": 1}'],
     "--reward hpsv2: .*unexpected keyword argument 'frobnicate'"),
    (["--reward", "image_reward", "--kwargs", '{"checkpoint": "/nowhere/ImageReward.pt", "tokenizer_path": "/x"}'],
     "/nowhere/ImageReward.pt not found"),
    (["--reward", "http://127.0.0.1:9"], "reward server http://127.0.0.1:9 failed its health check"),
])
def test_eval_reward_usage_errors_exit_2_before_the_policy_loads(args, message):
    out = run_cli("eval", "--model", "/nowhere/model", "--n", "1", *args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("diffrl-fast eval: error: ") and "Traceback" not in out.stderr
    assert re.search(message, out.stderr), out.stderr
