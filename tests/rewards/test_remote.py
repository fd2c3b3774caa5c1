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
from diffrl_fast.rewards.remote import RemoteReward, RewardServiceError, decode_images, encode_images, make_app

ROOT = Path(__file__).resolve().parents[2]


class ServerThread:
    """An aiohttp application served from a background thread on a free port of 127.0.0.1."""

    def __init__(self, app) -> None:
        from aiohttp import web

        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        ready = threading.Event()

        def main():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def serve():
    servers = []

    def start(app):
        servers.append(ServerThread(app))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


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
    assert calls["n"] == 2 and time.perf_counter() - t0 < 1.5


def test_a_reward_that_raises_on_the_server_is_named(serve):
    def bad(images, prompts, metadata):
        raise ValueError("model weights missing")

    server = serve(make_app(bad, "bad", max_batch=4))
    with pytest.raises(RewardError, match=r"HTTP 422.*reward 'bad' raised ValueError: model weights missing"):
        RemoteReward(server.url, retries=2, backoff_s=0)(_images(2), ["a", "b"], [{}, {}])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def _start_server(port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffrl_fast", "reward-server", "--reward", "tests.algos.toy:toy_reward",
                             "--port", str(port), "--max-batch", "4"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import requests

    for _ in range(300):
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the reward server did not start in 30 s")


@pytest.mark.slow
def test_killed_server_stops_the_run_cleanly_and_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    from diffrl_fast.config_utils import load_config
    from diffrl_fast.train.config import Config, validate
    from diffrl_fast.train.trainer import Trainer, TrainingError
    from tests.algos.toy import ToyModel, toy_reward

    monkeypatch.setattr("diffrl_fast.train.trainer.save_final_weights", lambda *a, **k: None)  # the toy has no format
    port = _free_port()
    common = ["prompts=[a, b]", "sample.num_steps=3", "sample.batch_size=4", "sample.num_batches_per_epoch=2", "train.batch_size=4",
              "num_epochs=3", "log.eval_samples=0", "log.progress=false", "log.tensorboard=false", "log.grid_samples=0",
              f"output_dir={tmp_path}"]
    remote = [f"reward.name=http://127.0.0.1:{port}", "reward.remote_format=float32", "reward.retries=1",
              "reward.backoff_s=0.05", "reward.timeout_s=5"]

    def trainer(*extra, reward_fn=None, name):
        cfg = validate(load_config(Config, None, [*common, *extra, f"name={name}"]))
        return Trainer(cfg, tmp_path / name, model=ToyModel(), reward_fn=reward_fn, log_fn=lambda s: None)

    whole = trainer(name="whole", reward_fn=toy_reward)
    whole.run()
    server = _start_server(port)
    try:
        part = trainer(*remote, name="part")

        def kill_after_first_epoch(t, record):
            if record["epoch"] == 1:
                server.kill()
                server.wait()

        with pytest.raises(TrainingError, match=r"failed 2 times.*connection refused.*last checkpoint \(epoch 1\)"):
            part.run(on_epoch=kill_after_first_epoch)
        assert len((tmp_path / "part" / "metrics.jsonl").read_text().splitlines()) == 1
        server = _start_server(port)
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
    records = {}
    for norm in ("none", "prompt"):
        cfg = validate(load_config(Config, None, [*common, spec, f"reward.component_norm={norm}", f"name={norm}"]))
        assert cfg.reward.name[0] == {"name": "tests.algos.toy:toy_reward", "weight": 2.0, "label": "toy"}
        Trainer(cfg, tmp_path / norm, model=ToyModel(), log_fn=lambda s: None).run()
        records[norm] = json.loads((tmp_path / norm / "metrics.jsonl").read_text().splitlines()[0])
    plain, normed = records["none"], records["prompt"]
    assert plain["reward_mean"] == pytest.approx(2.0 * plain["reward_toy"] + 0.5 * plain["reward_jpeg_compressibility"], rel=1e-5)
    assert normed["reward_toy"] == plain["reward_toy"] and abs(normed["reward_mean"]) < 1e-5
    with pytest.raises(ConfigError, match=r"reward.name\[1\] has unknown keys \['wieght'\]"):
        validate(load_config(Config, None, [*common, "reward.name=[{name: a}, {name: b, wieght: 1}]"]))
