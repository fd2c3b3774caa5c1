"""Rewards served over HTTP on 127.0.0.1: equal scores, batching, a killed server (clean stop, then resume), a slow
server, malformed replies, a failed health check, and weighted sums of local and remote rewards."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from diffrl_fast.rewards import RewardError, WeightedReward, get_reward
from diffrl_fast.rewards.remote import (RemoteReward, RewardServiceError, decode_binary, decode_images, encode_images,
                                        encode_request, make_app, to_unit)

ROOT = Path(__file__).resolve().parents[2]


def _images(n=5, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_remote_scores_equal_the_local_reward_in_batches(serve):
    local = get_reward("jpeg_compressibility")
    counted = {"calls": 0}

    def counting(images, prompts, metadata):
        counted["calls"] += 1
        return local(images, prompts, metadata)

    server = serve(make_app(counting, "jpeg_compressibility", max_batch=2))
    images, prompts, meta = _images(), [f"p{i}" for i in range(5)], [{"class_id": i} for i in range(5)]
    exact = RemoteReward(server.url, image_format="float32")
    assert exact.name == "jpeg_compressibility" and exact.batch_size == 2
    got, _ = exact(images, prompts, meta)
    assert counted["calls"] == 3  # 5 images in batches of the server's max 2
    assert torch.equal(got, local(images, prompts, meta)[0].float())
    q = (images * 255).round() / 255  # what an 8-bit image holds
    for fmt in ("uint8", "png"):
        got, _ = RemoteReward(server.url, image_format=fmt, batch_size=8)(images, prompts, meta)
        assert torch.equal(got, local(q, prompts, meta)[0].float()), fmt


def test_images_round_trip_in_every_format():
    x = _images(2)
    assert torch.equal(decode_images(encode_images(x, "float32")), x)
    q = (x * 255).round() / 255
    assert torch.equal(decode_images(encode_images(x, "uint8")), q)
    assert torch.equal(decode_images(encode_images(x, "png")), q)
    gray = x[:, :1]
    assert decode_images(encode_images(gray, "png")).shape == gray.shape
    meta = [{"seed": 1}, {}]
    for fmt, want in (("float32", x), ("uint8", q)):  # the binary body: a safetensors file, prompts in its header
        body, ctype = encode_request(x, ["a", "b"], meta, fmt, binary=True)
        assert ctype == "application/octet-stream" and len(body) < x.numel() * (4 if fmt == "float32" else 1) + 512
        images, prompts, metadata = decode_binary(body)
        assert images.dtype == (torch.float32 if fmt == "float32" else torch.uint8)
        assert torch.equal(to_unit(images), want) and prompts == ["a", "b"] and metadata == meta
    with pytest.raises(ValueError, match="raw uint8 or float32"):
        encode_request(x, ["a", "b"], meta, "png", binary=True)


def _fixed_app(handler):
    """A server whose /health is fine and whose /score is ``handler`` (a misbehaving reward service)."""
    from aiohttp import web

    app = web.Application()
    calls = {"n": 0}

    async def health(request):
        return web.json_response({"status": "ok", "reward": "broken", "max_batch": 8, "protocol": 1})

    async def score(request):
        calls["n"] += 1
        return await handler(request)

    app.router.add_get("/health", health)
    app.router.add_post("/score", score)
    return app, calls


def test_a_server_without_binary_bodies_gets_json(serve):
    from aiohttp import web

    seen = []

    async def handler(request):  # a server of before binary bodies: its /health lists no "bodies"
        seen.append(request.content_type)
        body = await request.json()
        return web.json_response({"rewards": [0.5] * len(body["prompts"])})

    app, _ = _fixed_app(handler)
    server = serve(app)
    assert RemoteReward(server.url)(torch.zeros(2, 1, 4, 4), ["a", "b"], [{}, {}])[0].tolist() == [0.5, 0.5]
    assert seen == ["application/json"]
    with pytest.raises(RewardServiceError, match="does not take binary bodies"):
        RemoteReward(server.url, binary=True)
    with pytest.raises(RewardError, match="png travels as JSON"):
        RemoteReward(server.url, binary=True, image_format="png")


@pytest.mark.parametrize("reply,message", [
    ('{"rewards": [1.0, 2.0]}', r"returned shape \(2,\); expected \[3\]"),
    ('{"rewards": [1.0, NaN, 2.0]}', "non-finite"),
    ("<html>oops</html>", "not JSON"),
    ('{"score": [1, 2, 3]}', "without a 'rewards' list"),
])
def test_malformed_replies_are_clear_errors_and_not_retried(serve, reply, message):
    from aiohttp import web

    async def handler(request):
        return web.Response(text=reply, content_type="application/json")

    app, calls = _fixed_app(handler)
    server = serve(app)
    with pytest.raises(RewardError, match=message) as info:
        RemoteReward(server.url, retries=3, backoff_s=0)(_images(3), ["a", "b", "c"], [{}, {}, {}])
    assert server.url in str(info.value) and not isinstance(info.value, RewardServiceError)
    assert calls["n"] == 1  # a malformed answer is a server bug, not a transient failure


def test_a_slow_server_hits_the_timeout_and_is_retried(serve):
    from aiohttp import web

    async def handler(request):
        await asyncio.sleep(2.0)
        return web.json_response({"rewards": [0.0]})

    app, calls = _fixed_app(handler)
    server = serve(app)
    reward = RemoteReward(server.url, timeout_s=0.2, retries=1, backoff_s=0.01)
    t0 = time.perf_counter()
    with pytest.raises(RewardServiceError, match=r"failed 2 times .*no reply within reward.timeout_s=0.2 s"):
        reward(_images(1), ["a"], [{}])
    assert calls["n"] == 2 and time.perf_counter() - t0 < 3.9  # the server answers each after 2 s: never waited for


def test_a_reward_that_raises_on_the_server_is_named_and_retried(serve):
    calls = {"n": 0}

    def bad(images, prompts, metadata):
        calls["n"] += 1
        raise ValueError("model weights missing")

    server = serve(make_app(bad, "bad", max_batch=4))
    with pytest.raises(RewardServiceError, match=r"failed 3 times.*HTTP 422: reward 'bad' raised ValueError: model weights missing"):
        RemoteReward(server.url, retries=2, backoff_s=0)(_images(2), ["a", "b"], [{}, {}])
    assert calls["n"] == 3  # a transient failure of the reward there (out of memory) is worth a retry


def test_nonfinite_rewards_pass_through_only_when_the_run_drops_them(serve):
    from aiohttp import web

    async def handler(request):
        return web.Response(text='{"rewards": [1.0, NaN]}', content_type="application/json")

    app, _ = _fixed_app(handler)
    server = serve(app)
    got, _ = RemoteReward(server.url, allow_nonfinite=True)(_images(2), ["a", "b"], [{}, {}])
    assert got[0] == 1.0 and torch.isnan(got[1])
    with pytest.raises(RewardError, match="non-finite"):
        RemoteReward(server.url)(_images(2), ["a", "b"], [{}, {}])


def test_closing_a_client_stops_its_retries(serve):
    from aiohttp import web

    async def handler(request):
        return web.Response(status=503, text="busy")

    app, calls = _fixed_app(handler)
    server = serve(app)
    reward = RemoteReward(server.url, retries=50, backoff_s=0.5)
    threading.Timer(0.3, reward.close).start()
    t0 = time.perf_counter()
    with pytest.raises(RewardServiceError, match="client was closed"):
        reward(_images(1), ["a"], [{}])
    assert calls["n"] <= 2 and time.perf_counter() - t0 < 5


def test_user_errors_in_reward_specs_are_named():
    from diffrl_fast.rewards import WeightedReward

    with pytest.raises(RewardError, match=r"reward 'jpeg_compressibility' given keyword arguments \['quality_x'\]: got an unexpected"):
        get_reward("jpeg_compressibility", quality_x=3)
    fn = get_reward("jpeg_compressibility")
    with pytest.raises(RewardError, match="label 'mean' would be logged as reward_mean"):
        WeightedReward([("mean", 1.0, fn)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONSTRUCTED = []


def recording_reward_factory():
    """A local reward whose construction is recorded (stands for a reward model that takes long to load)."""
    CONSTRUCTED.append("local")
    return lambda images, prompts, metadata: (torch.zeros(len(prompts)), {})


def test_reward_servers_are_checked_before_local_rewards_load():
    from diffrl_fast.rewards import build_reward
    from diffrl_fast.train.config import RewardConfig

    CONSTRUCTED.clear()
    url = f"http://127.0.0.1:{_free_port()}"
    cfg = RewardConfig(name=[{"name": "tests.rewards.test_remote:recording_reward_factory"}, {"name": url, "weight": 0.5}])
    with pytest.raises(RewardServiceError, match="connection refused"):
        build_reward(cfg)
    assert CONSTRUCTED == []  # listed first, never built: the dead server stopped the run before it


def test_failed_health_check_exits_2_before_any_model_loads(tmp_path):
    from tests.cli_inprocess import run_cli

    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(RewardServiceError, match="connection refused"):
        RemoteReward(url)
    # model.path names no model: had the run loaded one, the error would be about the model
    res = run_cli("train", f"reward.name={url}", "model.path=/nonexistent/model", f"output_dir={tmp_path}")
    assert res.returncode == 2 and url in res.stderr and "health check" in res.stderr, res.stderr


def test_weighted_sum_mixes_local_and_remote_and_normalises_per_component(serve):
    from diffrl_fast.rewards import build_reward
    from diffrl_fast.train.config import RewardConfig

    server = serve(make_app(get_reward("jpeg_compressibility"), "jpeg_compressibility", max_batch=8))
    cfg = RewardConfig(name=[{"name": server.url, "weight": 2.0}, {"name": "jpeg_incompressibility", "weight": 0.5}],
                       remote_format="float32")
    fn = build_reward(cfg)
    assert isinstance(fn, WeightedReward)
    images, prompts = _images(4), ["a", "a", "b", "b"]
    total, info = fn(images, prompts, [{}] * 4)
    comp = info["components"]
    assert set(comp) == {"jpeg_compressibility", "jpeg_incompressibility"}
    assert torch.allclose(total, 2.0 * comp["jpeg_compressibility"] + 0.5 * comp["jpeg_incompressibility"])
    z = lambda v: ((v.double() - v.double().mean()) / (v.double().std(unbiased=False) + 1e-8)).float()  # noqa: E731
    by_batch = fn.combine(comp, prompts, norm="batch")
    assert torch.allclose(by_batch, 2.0 * z(comp["jpeg_compressibility"]) + 0.5 * z(comp["jpeg_incompressibility"]))
    by_prompt = fn.combine(comp, prompts, norm="prompt")
    for idx in ([0, 1], [2, 3]):
        want = sum(w * z(comp[k][idx]) for k, w in (("jpeg_compressibility", 2.0), ("jpeg_incompressibility", 0.5)))
        assert torch.allclose(by_prompt[idx], want)


# ---- the trainer against a real `diffrl-fast reward-server` process ------------------------------------------
def _start_server(port: int = 0) -> tuple[subprocess.Popen, int]:
    """`diffrl-fast reward-server` on ``port`` (0: a free one, read from the line it prints when it listens)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffrl_fast", "reward-server", "--reward", "tests.algos.toy:toy_reward",
                             "--port", str(port), "--max-batch", "4"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 120  # importing torch on a loaded 2-core machine
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError("".join(lines))
        lines.append(line)
        if line.startswith("serving reward"):
            return proc, int(line.split("http://127.0.0.1:")[1].split()[0])
    proc.kill()
    raise AssertionError("the reward server did not start in 120 s:\n" + "".join(lines))


@pytest.mark.slow
def test_killed_server_stops_the_run_cleanly_and_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    from diffrl_fast.config_utils import load_config
    from diffrl_fast.train.config import Config, validate
    from diffrl_fast.train.trainer import Trainer, TrainingError
    from tests.algos.toy import ToyModel, toy_reward

    monkeypatch.setattr("diffrl_fast.train.trainer.save_final_weights", lambda *a, **k: None)  # the toy has no format
    server, port = _start_server()
    common = ["prompts=[a, b]", "sample.num_steps=3", "sample.batch_size=4", "sample.num_batches_per_epoch=2", "train.batch_size=4",
              "num_epochs=3", "log.eval_samples=0", "log.progress=false", "log.tensorboard=false", "log.grid_samples=0",
              f"output_dir={tmp_path}"]
    remote = [f"reward.name=http://127.0.0.1:{port}", "reward.remote_format=float32", "reward.retries=1",
              "reward.backoff_s=0.05", "reward.timeout_s=5"]

    def trainer(*extra, reward_fn=None, name):
        cfg = validate(load_config(Config, None, [*common, *extra, f"name={name}"]))
        return Trainer(cfg, tmp_path / name, model=ToyModel(), reward_fn=reward_fn, log_fn=lambda s: None)

    try:
        whole = trainer(name="whole", reward_fn=toy_reward)
        whole.run()
        part = trainer(*remote, name="part")

        def kill_after_first_epoch(t, record):
            if record["epoch"] == 1:
                server.kill()
                server.wait()

        with pytest.raises(TrainingError, match=r"failed 2 times.*(connection refused|closed the connection).*stopped during epoch 2.*"
                                                r"last checkpoint \(epoch 1\)"):
            part.run(on_epoch=kill_after_first_epoch)
        assert len((tmp_path / "part" / "metrics.jsonl").read_text().splitlines()) == 1
        server, _ = _start_server(port)
        resumed = trainer(*remote, name="part")
        assert resumed.resume() and resumed.epoch == 1
        resumed.run()
    finally:
        server.kill()
        server.wait()
    read = lambda n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["epoch"] for r in read("part")] == [1, 2, 3]
    assert [r["reward_mean"] for r in read("part")] == pytest.approx([r["reward_mean"] for r in read("whole")], rel=1e-6)
    w1 = torch.cat([p.detach().flatten() for p in whole.model.denoiser.parameters()])
    w2 = torch.cat([p.detach().flatten() for p in resumed.model.denoiser.parameters()])
    assert torch.allclose(w1, w2, rtol=1e-6, atol=1e-9)


def test_trainer_logs_each_component_and_normalises_before_summing(tmp_path, monkeypatch):
    """reward.name as a list (parsed from a key=value override): each component's epoch mean is logged as
    reward_<label>; with component_norm=prompt the summed reward is a sum of per-prompt z-scores (mean 0)."""
    from diffrl_fast.config_utils import ConfigError, load_config
    from diffrl_fast.train.config import Config, validate
    from diffrl_fast.train.trainer import Trainer
    from tests.algos.toy import ToyModel

    spec = "reward.name=[{name: 'tests.algos.toy:toy_reward', weight: 2.0, label: toy}, {name: jpeg_compressibility, weight: 0.5}]"
    common = ["prompts=[a, b]", "sample.num_steps=2", "sample.batch_size=4", "train.batch_size=4", "num_epochs=1",
              "log.eval_samples=0", "log.progress=false", "log.tensorboard=false", "log.grid_samples=0", f"output_dir={tmp_path}"]
    monkeypatch.setattr("diffrl_fast.train.trainer.save_final_weights", lambda *a, **k: None)
    records, trained_on = {}, {}
    for norm in ("none", "prompt"):
        cfg = validate(load_config(Config, None, [*common, spec, f"reward.component_norm={norm}", f"name={norm}"]))
        assert cfg.reward.name[0] == {"name": "tests.algos.toy:toy_reward", "weight": 2.0, "label": "toy"}
        t = Trainer(cfg, tmp_path / norm, model=ToyModel(), log_fn=lambda s: None)
        prepare = t.algo.prepare
        t.algo.prepare = lambda tr, traj, r, norm=norm: trained_on.setdefault(norm, (list(traj.prompts), r)) and prepare(tr, traj, r)
        t.run()
        records[norm] = json.loads((tmp_path / norm / "metrics.jsonl").read_text().splitlines()[0])
    plain, normed = records["none"], records["prompt"]
    for rec in (plain, normed):  # the records show the plain weighted sum, normalised or not
        assert rec["reward_mean"] == pytest.approx(2.0 * rec["reward_toy"] + 0.5 * rec["reward_jpeg_compressibility"], rel=1e-5)
    assert normed["reward_toy"] == plain["reward_toy"] and normed["reward_mean"] == plain["reward_mean"]
    prompts, r = trained_on["prompt"]  # the algorithm trains on per-prompt z-scores: each prompt's sum is 0
    for p in set(prompts):
        assert abs(float(r[[i for i, q in enumerate(prompts) if q == p]].sum())) < 1e-4
    assert torch.allclose(trained_on["none"][1].mean(), torch.tensor(plain["reward_mean"]), rtol=1e-5)
    with pytest.raises(ConfigError, match=r"reward.name\[1\] has unknown keys \['wieght'\]"):
        validate(load_config(Config, None, [*common, "reward.name=[{name: a}, {name: b, wieght: 1}]"]))


def test_cli_stops_at_its_checkpoint_with_the_resume_command_when_the_server_fails(serve, tmp_path):
    """The train command against a server that answers /health but fails every batch: exit code 1, the cause,
    where the checkpoint is, and the exact command that resumes the run."""
    from aiohttp import web

    from tests.cli_inprocess import run_cli

    async def handler(request):
        return web.Response(status=503, text="overloaded")

    app, calls = _fixed_app(handler)
    server = serve(app)
    args = ["train", f"reward.name={server.url}", "reward.retries=1", "reward.backoff_s=0", "num_epochs=2",
            "sample.batch_size=4", "sample.num_batches_per_epoch=1", "train.batch_size=4", "log.eval_samples=0",
            "log.progress=false", "log.tensorboard=false", "guard.heldout_reward=[]", f"output_dir={tmp_path}", "name=cli"]
    res = run_cli(*args)  # (the guard off: its evaluation before training would meet the failing server first)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "HTTP 503: overloaded" in res.stderr and "stopped during epoch 1" in res.stderr
    assert "Resume after fixing the cause with: diffrl-fast train" in res.stderr and res.stderr.rstrip().endswith("--resume")
    assert (tmp_path / "cli" / "checkpoints").is_dir() and calls["n"] == 2


def test_a_video_reward_is_served_videos_and_refuses_images(serve):
    """A video reward's server takes [B, F, C, H, W] (raw formats), says so in /health, scores as the local reward,
    refuses images, PNG and too many frames with 400s; the client knows it serves videos (a trainer checks that)."""
    import requests

    from diffrl_fast.rewards.video import takes_video

    local = get_reward("video_temporal_consistency")
    server = serve(make_app(local, "video_temporal_consistency", max_batch=4, max_frames=5))
    videos = torch.rand(3, 5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    client = RemoteReward(server.url, image_format="float32")
    assert client.video and takes_video(client)
    got, _ = client(videos, ["a", "b", "c"], [{}] * 3)
    assert torch.allclose(got, local(videos, ["a", "b", "c"], [{}] * 3)[0].float())
    cases = [(encode_images(videos[:, 0], "float32"), "[B, F, C, H, W]"),
             (encode_images(torch.rand(3, 6, 3, 8, 8), "uint8"), "at most 5"),
             ({"format": "png", "data": encode_images(videos[:, 0], "png")["data"]}, "not PNG")]
    for images, message in cases:
        reply = requests.post(f"{server.url}/score", json={"images": images, "prompts": ["a", "b", "c"]}, timeout=10)
        assert reply.status_code == 400 and message in reply.json()["error"], reply.text
    with pytest.raises(RewardError, match="raw frames"):
        RemoteReward(server.url, image_format="png")
    image_server = serve(make_app(get_reward("jpeg_compressibility"), "jpeg_compressibility", max_batch=4))
    assert not RemoteReward(image_server.url).video
