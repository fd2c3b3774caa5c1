"""The reward server under load and abuse: dynamic batching that never mixes replies, backpressure (429 with
Retry-After, honoured by the client), a server-side deadline, a fuzz of malformed requests answered 4xx, the
shared token, and /metrics in Prometheus' text format."""
from __future__ import annotations

import json
import threading
import time

import pytest
import requests
import torch

from diffrl_fast.rewards import RewardError
from diffrl_fast.rewards.remote import RemoteReward, encode_images, make_app
from tests.rewards.test_remote import _fixed_app


def per_sample(images, prompts, metadata):
    """A reward of each image alone (its mean pixel plus its prompt's number): merged or not, the same values."""
    return images.flatten(1).mean(1).double() + torch.tensor([float(p) for p in prompts], dtype=torch.float64), {"n": len(prompts)}


def metrics(url, **kw) -> dict:
    out = {}
    for line in requests.get(f"{url}/metrics", timeout=10, **kw).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_concurrent_requests_are_merged_and_each_gets_its_own_rewards(serve):
    server = serve(make_app(per_sample, "per_sample", max_batch=64, max_wait_ms=100, wait="fixed"))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(4, 1, 8, 8, generator=g), [str(100 * c + i) for i in range(4)]) for c in range(16)]
    got, errors = {}, []

    def client(c):  # bodies of both kinds merged into the same reward calls: JSON float32, binary uint8 and float32
        try:
            images, prompts = batches[c]
            fmt, binary = [("float32", False), ("uint8", True), ("float32", True)][c % 3]
            got[c] = RemoteReward(server.url, image_format=fmt, binary=binary)(images, prompts, [{}] * 4)[0]
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(got) == 16
    for c, (images, prompts) in enumerate(batches):  # no reply mixed between requests; each request's own pixels
        sent = (images * 255).round() / 255 if c % 3 == 1 else images
        assert torch.equal(got[c], per_sample(sent, prompts, None)[0].float())
    m = metrics(server.url)
    assert m['reward_server_requests_total{path="/score",code="200"}'] == 16 and m["reward_server_images_total"] == 64
    assert m["reward_server_batches_total"] < 16  # merged: fewer reward calls than requests
    assert m["reward_server_batch_requests_sum"] == 16 and m["reward_server_queue_depth"] == 0
    assert 0 < m['reward_server_score_seconds{quantile="0.5"}'] <= m['reward_server_score_seconds{quantile="0.99"}']
    # without batching: one reward call per request
    plain = serve(make_app(per_sample, "per_sample", max_batch=64, batching=False))
    for images, prompts in batches[:3]:
        RemoteReward(plain.url)(images, prompts, [{}] * 4)
    assert metrics(plain.url)["reward_server_batches_total"] == 3


def test_a_reward_with_a_device_gets_its_images_there_converted_from_8_bits(serve):
    seen = []

    def on_device(images, prompts, metadata):
        seen.append((images.device, images.dtype, len(prompts)))
        return per_sample(images, prompts, metadata)

    on_device.device = torch.device("cpu")  # the path a GPU reward takes: arrays moved, then converted, there
    server = serve(make_app(on_device, "on_device", max_batch=64, max_wait_ms=200, wait="fixed"))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(3, 1, 4, 4, generator=g), [str(10 * c + i) for i in range(3)]) for c in range(4)]
    got = {}

    def client(c):  # 8-bit (binary) and float32 (JSON) requests merged into one call
        images, prompts = batches[c]
        got[c] = RemoteReward(server.url, image_format="uint8" if c % 2 else "float32", binary=bool(c % 2))(images, prompts, [{}] * 3)[0]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c, (images, prompts) in enumerate(batches):
        sent = (images * 255).round() / 255 if c % 2 else images
        assert torch.equal(got[c], per_sample(sent, prompts, None)[0].float())
    assert all(d == torch.device("cpu") and dtype == torch.float32 for d, dtype, _ in seen) and sum(n for *_, n in seen) == 12
    assert len(seen) < 4  # merged


def test_adaptive_wait_spares_a_lone_client_and_still_merges_concurrent_ones(serve):
    def slow(images, prompts, metadata):  # 50 ms a call: requests that arrive meanwhile queue up
        time.sleep(0.05)
        return per_sample(images, prompts, metadata)

    adaptive = serve(make_app(slow, "slow", max_batch=64, max_wait_ms=300))
    fixed = serve(make_app(slow, "slow", max_batch=64, max_wait_ms=300, wait="fixed"))
    images, prompts = torch.rand(2, 1, 4, 4), ["1", "2"]
    for server in (adaptive, fixed):
        client = RemoteReward(server.url)
        for _ in range(3):  # one client, one request at a time
            client(images, prompts, [{}] * 2)
    assert metrics(adaptive.url)["reward_server_batches_waited_total"] == 0  # scored at once, 3 x 300 ms spared
    assert metrics(fixed.url)["reward_server_batches_waited_total"] == 3
    assert requests.get(f"{adaptive.url}/health", timeout=10).json()["wait"] == "adaptive"
    done, errors = [], []

    def client():
        try:
            done.append(RemoteReward(adaptive.url)(images, prompts, [{}] * 2))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    m = metrics(adaptive.url)
    assert not errors and len(done) == 12 and m["reward_server_batch_requests_sum"] == 15
    assert m["reward_server_batches_total"] - 3 < 12  # merged: the requests that arrived during a call share the next
    with pytest.raises(ValueError, match="wait must be one of"):
        make_app(per_sample, "per_sample", wait="sometimes")


def test_fixed_cost_is_the_intercept_of_call_time_against_images():
    from diffrl_fast.rewards.remote import fixed_cost

    assert fixed_cost([(8, 0.05 + 0.001 * 8)] * 10) is None  # one size only: cannot tell (the server keeps its last)
    assert fixed_cost([(n, 0.05 + 0.001 * n) for n in (8, 16, 8, 32, 24)]) == pytest.approx(0.05)
    assert fixed_cost([(n, 0.001 * n) for n in (8, 16, 8, 32)]) == pytest.approx(0.0, abs=1e-12)
    assert fixed_cost([(n, 0.5 - 0.01 * n) for n in (8, 16, 8, 32)]) == pytest.approx(0.5 - 0.01 * 16)  # clamped to the mean
    assert fixed_cost([(8, 0.1), (16, 0.2), (8, 0.1)]) is None  # fewer than 4 calls


def _lockstep(url, remotes, rounds, images, prompts):
    """The clients ``remotes`` send in lockstep rounds (all send, all replies back, next round); /metrics before the
    second round, read while nobody sends."""
    barrier, errors, marks = threading.Barrier(len(remotes)), [], {}

    def client(c):
        try:
            for r in range(rounds):
                if r == 1 and barrier.wait(30) == 0:
                    marks["round 2"] = metrics(url)
                barrier.wait(30)
                remotes[c](images, prompts, [{}] * len(prompts))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(remotes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    return marks["round 2"]


def test_adaptive_wait_merges_active_clients_when_the_reward_has_a_fixed_cost(serve):
    def launch_bound(images, prompts, metadata):  # a GPU reward's profile: 0.2 s a call, whatever its size
        time.sleep(0.2)
        return per_sample(images, prompts, metadata)

    server = serve(make_app(launch_bound, "launch_bound", max_batch=64, max_wait_ms=5000))
    first = RemoteReward(server.url)
    for n in (1, 2, 3, 4):  # calls of different sizes: the server learns the reward's cost per call
        first(torch.rand(n, 1, 4, 4), [str(i) for i in range(n)], [{}] * n)
    assert 0.15 < metrics(server.url)["reward_server_call_fixed_seconds"] < 0.3
    images, prompts = torch.rand(2, 1, 4, 4), ["1", "2"]
    remotes = [first] + [RemoteReward(server.url) for _ in range(3)]  # 4 trainer processes: 4 keep-alive connections
    before = _lockstep(server.url, remotes, 3, images, prompts)
    m = metrics(server.url)
    # rounds 2 and 3: one reward call each, formed when the fourth request arrived, not when the wait ran out (8
    # images never fill --max-batch 64)
    assert m["reward_server_batches_total"] - before["reward_server_batches_total"] == 2
    assert m["reward_server_batch_requests_sum"] - before["reward_server_batch_requests_sum"] == 8
    assert m["reward_server_batches_deadline_total"] == before["reward_server_batches_deadline_total"]
    first(images, prompts, [{}] * 2)  # the others were seen within 120 s: a request alone waits, for ~0.2 s, not 5 s
    deadline = m["reward_server_batches_deadline_total"] + 1
    assert metrics(server.url)["reward_server_batches_deadline_total"] == deadline
    for remote in remotes[1:]:  # those clients leave: their connections close, and they no longer count
        remote.close()
    time.sleep(0.2)
    first(images, prompts, [{}] * 2)
    assert metrics(server.url)["reward_server_batches_deadline_total"] == deadline


def test_adaptive_wait_does_not_wait_when_the_cost_is_per_image(serve):
    def per_image(images, prompts, metadata):  # a CPU reward's profile: 20 ms an image, nothing per call
        time.sleep(0.02 * len(prompts))
        return per_sample(images, prompts, metadata)

    server = serve(make_app(per_image, "per_image", max_batch=64, max_wait_ms=5000))
    first = RemoteReward(server.url)
    for n in (1, 2, 3, 4):
        first(torch.rand(n, 1, 4, 4), [str(i) for i in range(n)], [{}] * n)
    assert metrics(server.url)["reward_server_call_fixed_seconds"] < 0.01
    remotes = [first] + [RemoteReward(server.url) for _ in range(3)]
    _lockstep(server.url, remotes, 2, torch.rand(2, 1, 4, 4), ["1", "2"])
    assert metrics(server.url)["reward_server_batches_deadline_total"] <= 2  # waits of at most ~10 ms, never 5 s
    assert metrics(server.url)['reward_server_score_seconds{quantile="0.99"}'] < 2.0


def test_a_request_that_breaks_the_reward_fails_alone(serve):
    def picky(images, prompts, metadata):
        if "bad" in prompts:
            raise ValueError("cannot score 'bad'")
        return per_sample(images, prompts, metadata)

    server = serve(make_app(picky, "picky", max_batch=16, max_wait_ms=200, wait="fixed"))
    codes = {}

    def post(name, prompts):
        body = {"prompts": prompts, "images": encode_images(torch.zeros(len(prompts), 1, 4, 4))}
        codes[name] = requests.post(f"{server.url}/score", json=body, timeout=30)

    threads = [threading.Thread(target=post, args=("good", ["1", "2"])), threading.Thread(target=post, args=("bad", ["bad"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert codes["good"].status_code == 200 and codes["good"].json()["rewards"] == [1.0, 2.0]
    assert codes["bad"].status_code == 422 and "cannot score 'bad'" in codes["bad"].json()["error"]


def test_full_queue_answers_429_and_old_requests_expire(serve):
    gate = threading.Event()

    def slow(images, prompts, metadata):
        gate.wait(20)
        return per_sample(images, prompts, metadata)

    server = serve(make_app(slow, "slow", max_batch=1, max_queue=1, max_wait_ms=0, request_timeout_s=0.5))
    body = {"prompts": ["1"], "images": encode_images(torch.zeros(1, 1, 4, 4))}
    replies = []
    first = threading.Thread(target=lambda: replies.append(requests.post(f"{server.url}/score", json=body, timeout=30)))
    first.start()
    time.sleep(0.3)  # the first is in the reward; the second waits in the queue
    second = threading.Thread(target=lambda: replies.append(requests.post(f"{server.url}/score", json=body, timeout=30)))
    second.start()
    time.sleep(0.3)
    full = requests.post(f"{server.url}/score", json=body, timeout=30)
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1 and "--max-queue" in full.json()["error"]
    time.sleep(0.5)  # past the second's deadline while the reward still holds the first
    gate.set()
    first.join(30)
    second.join(30)
    assert sorted(r.status_code for r in replies) == [200, 503]
    assert "waited more than 0.5 s" in [r for r in replies if r.status_code == 503][0].json()["error"]


def test_client_waits_for_retry_after(serve):
    from aiohttp import web

    async def handler(request):
        if calls["n"] == 1:
            return web.json_response({"error": "busy"}, status=429, headers={"Retry-After": "1"})
        return web.json_response({"rewards": [0.5]})

    app, calls = _fixed_app(handler)
    server = serve(app)
    t0 = time.perf_counter()
    got, _ = RemoteReward(server.url, retries=1, backoff_s=0.0)(torch.zeros(1, 1, 4, 4), ["a"], [{}])
    assert got.tolist() == [0.5] and calls["n"] == 2 and time.perf_counter() - t0 >= 0.95


GOOD = {"prompts": ["1"], "images": encode_images(torch.zeros(1, 1, 4, 4))}


def test_fuzz_of_malformed_requests_gets_4xx_and_the_server_goes_on(serve):
    from benchmarks.bench_reward_server import fuzz_cases

    server = serve(make_app(per_sample, "per_sample", max_batch=8, max_side=256))
    cases = fuzz_cases(8, 256)
    assert len(cases) >= 30
    assert sum(ctype == "application/octet-stream" for _, _, ctype, _ in cases) >= 15  # binary bodies too
    for name, body, ctype, code in cases:
        reply = requests.post(f"{server.url}/score", data=body, headers={"Content-Type": ctype}, timeout=30)
        assert reply.status_code == code, (name, reply.status_code, reply.text[:200])
        assert reply.json()["error"], name
    assert requests.post(f"{server.url}/score", json=GOOD, timeout=30).json()["rewards"] == [1.0]
    # a JSON body sent without a Content-Type (which aiohttp reads as application/octet-stream) is still JSON
    bare = requests.Request("POST", f"{server.url}/score", data=json.dumps(GOOD).encode()).prepare()
    bare.headers.pop("Content-Type", None)
    assert requests.Session().send(bare, timeout=30).json()["rewards"] == [1.0]
    assert not any(k.endswith(f'code="{c}"}}') for k in metrics(server.url) for c in range(500, 600))


def test_nonfinite_rewards_travel_as_null(serve):
    server = serve(make_app(lambda im, p, m: (torch.tensor([1.0, float("nan")]), {}), "nan", max_batch=8))
    body = {"prompts": ["a", "b"], "images": encode_images(torch.zeros(2, 1, 4, 4))}
    assert requests.post(f"{server.url}/score", json=body, timeout=30).json()["rewards"] == [1.0, None]
    got, _ = RemoteReward(server.url, allow_nonfinite=True)(torch.zeros(2, 1, 4, 4), ["a", "b"], [{}, {}])
    assert got[0] == 1.0 and torch.isnan(got[1])


def test_token_is_required_when_set(serve, tmp_path):
    from diffrl_fast.cli import main as cli
    from diffrl_fast.rewards import read_token

    server = serve(make_app(per_sample, "per_sample", max_batch=8, token="s3cret"))
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 401
    assert requests.post(f"{server.url}/score", json=GOOD, headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
    with pytest.raises(RewardError, match="health check"):
        RemoteReward(server.url)
    assert RemoteReward(server.url, token="s3cret")(torch.zeros(1, 1, 4, 4), ["1"], [{}])[0].tolist() == [1.0]
    (tmp_path / "t").write_text("s3cret\n")
    assert read_token(str(tmp_path / "t")) == "s3cret"
    with pytest.raises(RewardError, match="does not exist"):
        read_token(str(tmp_path / "missing"))
    # beyond loopback without a token: refused before anything loads
    assert cli(["reward-server", "--reward", "brightness", "--host", "0.0.0.0", "--port", "0"]) == 2
