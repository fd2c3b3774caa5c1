"""The reward server under load: dynamic batching against one request at a time, binary bodies against JSON ones.

The reward: a CLIP-style image encoder built locally with random weights (transformers' CLIPVisionModelWithProjection
and a linear head on its projection; ``clip_style_reward``), the images resized to its input. On a CPU (the default)
a tiny tower (64x64 inputs, 16x16 patches, width 64, 2 layers) on one thread: its cost grows with its images, with
little fixed per call (``reward_profile`` measures it: the run's first line). With ``--device cuda`` the tower of
CLIP ViT-B/16 (224x224, width 768, 12 layers) in bfloat16: a GPU reward, whose cost per call (launches, transfers,
synchronisation) is what dynamic batching merges. Served by ``diffrl-fast reward-server`` in its own process on
127.0.0.1 with dynamic batching (``--max-batch 128``, ``--max-wait-ms 5``; its default adaptive wait, and ``--wait
fixed``) and without it (``--no-batching``). 1, 4 and 16 clients (threads of this process, each a ``RemoteReward``)
send requests of 8 images back to back for ``--seconds`` each, from batches made before the clock starts: 64x64
images as binary bodies (the client's default), and 512x512 images with 16 clients as JSON and as binary bodies.
Reported per row: images per second, p50 and p99 latency of a request, the mean images per reward call, the waits
(from /metrics), the server process's CPU time per request (all its threads, from /proc), every reply checked after
the load against the reward scored here (0 mixed); and the server's resident memory after warm-up, after the load
and after a fuzz of malformed requests (``fuzz_cases``, also tests/rewards/test_reward_server.py's).

Run: ``diffrl-fast bench reward-server [--seconds 8]``; writes benchmarks/results/reward_server.{json,md}.
``--device cuda --quick`` (the GPU suite's step): batching and one at a time only, 16 clients, 64x64 and 512x512
binary bodies, no fuzz, both servers loading while the benchmark builds its own reward; the .json only (no .md), rewritten after each row so a run cut short keeps its rows.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, machine_info, reading_lines  # noqa: E402

CLIENTS = (1, 4, 16)
BIG = 512  # the bodies' comparison: SD 1.5 / SD3's generated images, 8 per request
BODY_MODES = ("batching", "one at a time")
# mode -> the server's flags beyond the common ones; "batching" is the default adaptive wait
MODES = {"batching": [], "batching, fixed wait": ["--wait", "fixed"], "one at a time": ["--no-batching"]}
IMAGES_PER_REQUEST = 8


# transformers CLIPVisionConfig fields; "tiny" on a CPU, "vit-b/16" (CLIP ViT-B/16's tower, the size of an aesthetic or
# CLIP-score reward's) on a GPU
TOWERS = {
    "tiny": dict(image_size=64, patch_size=16, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=128),
    "vit-b/16": dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, projection_dim=512),
}


def clip_style_reward(seed: int = 0, device: str = "cpu", tower: str = "tiny"):
    """A CLIP-style reward with random weights: the vision tower's projected embedding through a linear head, the images
    resized to the tower's input as CLIP's processor does. On a GPU the tower runs in bfloat16, and each image's reward
    gets 100 x the sum of its first 8 pixels (float32, before the tower): replies are then checked for mixing with a
    tolerance that bfloat16's batch-size-dependent rounding stays far inside, while another image's reward is far
    outside it."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if tower not in TOWERS:
        raise ValueError(f"tower {tower!r} is not one of {list(TOWERS)}")
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(**TOWERS[tower])
    exact = device == "cpu"
    model = CLIPVisionModelWithProjection(cfg).eval().to(device, torch.float32 if exact else torch.bfloat16)
    head = torch.nn.Linear(cfg.projection_dim, 1).to(device)
    mean = torch.tensor([0.481, 0.458, 0.408], device=device).reshape(1, 3, 1, 1)
    std = torch.tensor([0.269, 0.261, 0.276], device=device).reshape(1, 3, 1, 1)
    side = cfg.image_size

    @torch.no_grad()
    def fn(images, prompts, metadata):
        x = images.to(device).float()
        if x.shape[-2:] != (side, side):
            x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        x = (x - mean) / std
        emb = model(pixel_values=x.to(model.dtype)).image_embeds.float()
        r = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
        if exact:
            return r, {}
        return r.cpu() + 100 * images[:, 0, 0, :8].float().cpu().sum(1), {}

    fn.device = None if exact else torch.device(device)  # the server sends it 8-bit pixels, converted on the GPU
    return fn


class Server:
    """The reward server's aiohttp application on a free port of 127.0.0.1, served from a background thread (the
    tests' fixture)."""

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
        if not ready.wait(60):
            raise RuntimeError("the reward server did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


class ServerProcess:
    """``diffrl-fast reward-server`` serving this module's CLIP-style reward in its own process on a free port."""

    def __init__(self, *flags: str, kwargs: dict | None = None, wait: bool = True) -> None:
        import subprocess

        cmd = [sys.executable, "-m", "diffrl_fast", "reward-server", "--reward", "benchmarks.bench_reward_server:clip_style_reward",
               "--kwargs", json.dumps(kwargs or {}), "--port", "0", *flags]
        import os

        env = dict(os.environ)
        if (kwargs or {}).get("device", "cpu") == "cpu":  # the reward on one core, the clients on the other
            env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.url = None
        if wait:
            self.ready()

    def ready(self) -> "ServerProcess":
        """Wait until the server says where it listens (warnings may come first); several servers started with
        ``wait=False`` then load their rewards at the same time."""
        import re

        seen = []
        for line in self.proc.stdout:
            m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.url = f"http://127.0.0.1:{m.group(1)}"
                return self
            seen.append(line)
            if len(seen) > 500:
                break
        self.proc.kill()
        raise RuntimeError("the reward server did not start: " + "".join(seen[-20:]))

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        """The server process's CPU seconds so far (user + system, all its threads)."""
        import os

        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def scrape(url: str) -> dict:
    import requests

    out = {}
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def load(server: "ServerProcess", reward, clients: int, seconds: float, seed: int, size: int = 64, binary: bool | None = None,
         atol: float = 1e-4) -> dict:
    """``clients`` threads sending requests of 8 images of ``size`` pixels back to back for ``seconds``, each from a pool
    of distinct batches made before the clock starts (a trainer has its images already; the client's work is
    encoding and HTTP); every reply is checked against the reward scored here, after the load (off the clock).
    ``binary``: the client's body (None: binary, as the server offers it). The server's CPU time is read around the
    load: its work per request, all threads."""
    import torch

    from diffrl_fast.rewards.remote import RemoteReward

    url = server.url
    pool = 4 if size <= 128 else 2

    def batch(c, k):
        g = torch.Generator().manual_seed(seed * 100003 + c * 101 + k)
        x = (torch.rand(IMAGES_PER_REQUEST, 3, size, size, generator=g) * 255).round() / 255
        return x, [f"c{c} r{k} i{i}" for i in range(IMAGES_PER_REQUEST)]

    batches = {c: [batch(c, k) for k in range(pool)] for c in range(clients)}
    before, cpu0 = scrape(url), server.cpu_s()
    lat, errors = [], []
    replies = {c: [] for c in range(clients)}
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(c):
        remote = RemoteReward(url, image_format="uint8", timeout_s=120, retries=0, binary=binary)
        k = 0
        while time.perf_counter() < stop_at:
            x, prompts = batches[c][k % pool]
            t = time.perf_counter()
            try:
                got, _ = remote(x, prompts, [{}] * IMAGES_PER_REQUEST)
            except Exception as exc:  # noqa: BLE001
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                return
            dt = time.perf_counter() - t
            with lock:
                lat.append(dt)
            replies[c].append(got)
            k += 1
        remote.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after, cpu1 = scrape(url), server.cpu_s()
    expected = {(c, k): reward(*batches[c][k], None)[0].float() for c in range(clients) for k in range(pool)}
    mixed = sum(not torch.allclose(r, expected[c, k % pool], atol=atol, rtol=1e-4) for c, got in replies.items() for k, r in enumerate(got))
    requests = len(lat)
    images = requests * IMAGES_PER_REQUEST
    calls = after["reward_server_batches_total"] - before["reward_server_batches_total"]
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    return {"clients": clients, "size": size, "body": "json" if binary is False else "binary", "requests": requests,
            "images": images, "wall_s": round(wall, 2), "images_per_s": images / wall, "p50_ms": q(0.5), "p99_ms": q(0.99),
            "mean_batch": (after["reward_server_images_total"] - before["reward_server_images_total"]) / max(calls, 1),
            "reward_calls": int(calls), "server_cpu_ms_per_request": 1000 * (cpu1 - cpu0) / max(requests, 1),
            "batches_waited": int(after["reward_server_batches_waited_total"] - before["reward_server_batches_waited_total"]),
            "batches_at_deadline": int(after["reward_server_batches_deadline_total"] - before["reward_server_batches_deadline_total"]),
            "call_fixed_ms": 1000 * after["reward_server_call_fixed_seconds"],
            "errors": errors[:5], "error_count": len(errors), "mixed": mixed}


def reward_profile(reward, sizes=(8, 32, 128), repeats: int = 10) -> dict:
    """Milliseconds per call of ``reward`` (on one CPU thread, as the server runs a CPU reward) at each batch size of 64x64 images:
    how much a merged call can save per image."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for n in sizes:
            x = torch.rand(n, 3, 64, 64)
            reward(x, None, None)
            t = time.perf_counter()
            for _ in range(repeats):
                reward(x, None, None)
            out[n] = 1000 * (time.perf_counter() - t) / repeats
        return out
    finally:
        torch.set_num_threads(threads)


def _png(mode: str, size=(4, 4)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def fuzz_cases(max_batch: int, max_side: int) -> list[tuple[str, bytes, str, int]]:
    """Malformed /score requests and the status each must get: (name, body, its Content-Type, code), JSON bodies and
    binary (safetensors) ones, for a server of ``max_batch`` images of at most ``max_side`` pixels a side."""
    import torch
    from safetensors.torch import save

    from diffrl_fast.rewards.remote import BINARY_TYPE, JSON_TYPE, body_limit, encode_images

    def raw(value, shape):
        import math

        return {"format": "float32", "shape": shape,
                "data": base64.b64encode(torch.full((math.prod(shape),), value).numpy().tobytes()).decode()}

    good = {"prompts": ["1"], "images": encode_images(torch.zeros(1, 1, 4, 4))}
    img = lambda **kw: {**good, "images": {"format": "uint8", "shape": [1, 1, 4, 4], "data": base64.b64encode(bytes(16)).decode(), **kw}}  # noqa: E731
    n = max_batch + 1

    def st(tensors=None, **meta):  # a safetensors body: one uint8 image and one prompt unless told otherwise
        meta = {"prompts": '["1"]', **meta}
        return save(tensors or {"images": torch.zeros(1, 1, 4, 4, dtype=torch.uint8)}, metadata={k: v for k, v in meta.items() if v is not None})

    valid = st()
    binary = [
        ("binary: garbage", b"garbage", 400), ("binary: empty", b"", 400), ("binary: truncated", valid[:-5], 400),
        ("binary: header length past the body", (10**12).to_bytes(8, "little") + b"{}", 400),
        ("binary: header not JSON", (6).to_bytes(8, "little") + b"{oops}", 400),
        ("binary: two tensors", st({"images": torch.zeros(1, 1, 4, 4, dtype=torch.uint8), "x": torch.zeros(1)}), 400),
        ("binary: no images tensor", st({"x": torch.zeros(1, 1, 4, 4, dtype=torch.uint8)}), 400),
        ("binary: int64 images", st({"images": torch.zeros(1, 1, 4, 4, dtype=torch.int64)}), 400),
        ("binary: 3-d images", st({"images": torch.zeros(1, 4, 4, dtype=torch.uint8)}), 400),
        ("binary: 4 channels", st({"images": torch.zeros(1, 4, 4, 4, dtype=torch.uint8)}), 400),
        ("binary: a side over --max-side", st({"images": torch.zeros(1, 1, 1, max_side + 1, dtype=torch.uint8)}), 400),
        ("binary: NaN float32", st({"images": torch.full((1, 1, 4, 4), float("nan"))}), 400),
        ("binary: float32 above 1", st({"images": torch.full((1, 1, 4, 4), 2.0)}), 400),
        ("binary: no prompts", st(prompts=None), 400), ("binary: prompts not JSON", st(prompts="[oops"), 400),
        ("binary: prompts nested deeply", st(prompts="[" * 100000 + "]" * 100000), 400),
        ("binary: prompts of ints", st(prompts="[1]"), 400), ("binary: metadata of the wrong length", st(metadata="[{}, {}]"), 400),
        ("binary: images for other prompts", st(prompts='["1", "2"]'), 400),
        ("binary: more images than --max-batch", st({"images": torch.zeros(n, 1, 4, 4, dtype=torch.uint8)}, prompts=json.dumps(["1"] * n)), 413),
        ("binary: body over the size limit", b"\0" * (body_limit(max_batch, max_side) + 10), 413),
    ]
    return [(name, body if isinstance(body, bytes) else json.dumps(body).encode(), JSON_TYPE, code) for name, body, code in [
        ("not JSON", b"{oops", 400), ("a list", b"[1, 2]", 400), ("a string", b'"x"', 400), ("NaN constant", b'{"prompts": NaN}', 400),
        ("deeply nested list", b"[" * 100000 + b"]" * 100000, 400), ("deeply nested object", b'{"a":' * 50000 + b"1" + b"}" * 50000, 400),
        ("no prompts", {"images": good["images"]}, 400), ("prompts not a list", {**good, "prompts": "1"}, 400),
        ("prompts of ints", {**good, "prompts": [1]}, 400), ("empty prompts", {**good, "prompts": []}, 400),
        ("metadata of the wrong length", {**good, "metadata": [{}, {}]}, 400), ("metadata of strings", {**good, "metadata": ["x"]}, 400),
        ("no images", {"prompts": ["1"]}, 400), ("images a list", {**good, "images": [1]}, 400),
        ("unknown format", {**good, "images": {"format": "jpeg", "data": ""}}, 400),
        ("no shape", img(shape=None), 400), ("3-d shape", img(shape=[1, 4, 4]), 400), ("negative shape", img(shape=[1, 1, -4, 4]), 400),
        ("bool in shape", img(shape=[True, 1, 4, 4]), 400), ("float in shape", img(shape=[1, 1, 4.0, 4]), 400),
        ("4 channels", img(shape=[1, 4, 4, 4], data=base64.b64encode(bytes(64)).decode()), 400),
        ("a side over --max-side", img(shape=[1, 1, 100000, 100000]), 400), ("data not base64", img(data="%%%"), 400),
        ("data an int", img(data=7), 400), ("wrong byte count", img(data=base64.b64encode(bytes(15)).decode()), 400),
        ("all-NaN float32", {**good, "images": raw(float("nan"), [1, 1, 4, 4])}, 400),
        ("all-inf float32", {**good, "images": raw(float("inf"), [1, 1, 4, 4])}, 400),
        ("float32 above 1", {**good, "images": raw(2.0, [1, 1, 4, 4])}, 400), ("negative float32", {**good, "images": raw(-0.5, [1, 1, 4, 4])}, 400),
        ("images for other prompts", {**good, "prompts": ["1", "2"]}, 400),
        ("png data not a list", {**good, "images": {"format": "png", "data": "x"}}, 400),
        ("png garbage", {**good, "images": {"format": "png", "data": [base64.b64encode(b"\x89PNG garbage").decode()]}}, 400),
        ("png not base64", {**good, "images": {"format": "png", "data": ["%%%"]}}, 400),
        ("RGBA png", {**good, "images": {"format": "png", "data": [_png("RGBA")]}}, 400),
        ("pngs of two sizes", {**good, "prompts": ["1", "2"], "images": {"format": "png", "data": [_png("L"), _png("L", (5, 5))]}}, 400),
        ("png over --max-side", {**good, "images": {"format": "png", "data": [_png("L", (max_side + 1, 2))]}}, 400),
        ("more images than --max-batch", {"prompts": ["1"] * n, "images": encode_images(torch.zeros(n, 1, 4, 4))}, 413),
        ("body over the size limit", b" " * (body_limit(max_batch, max_side) + 10), 413),
    ]] + [(name, body, BINARY_TYPE, code) for name, body, code in binary]


def fuzz(url: str, max_batch: int, max_side: int) -> dict:
    import requests

    codes = {}
    for name, body, content_type, _ in fuzz_cases(max_batch, max_side):
        try:
            codes[name] = requests.post(f"{url}/score", data=body, headers={"Content-Type": content_type}, timeout=60).status_code
        except requests.RequestException as exc:
            codes[name] = f"{type(exc).__name__}"
    return codes


def body_pairs(data: dict) -> list[tuple[str, dict, dict]]:
    """(mode, binary row, JSON row) of the large-image rows, per mode that ran both bodies."""
    big = {(r["mode"], r["body"]): r for r in data["rows"] if r["size"] == data["summary"]["big_size"]}
    return [(mode, big[mode, "binary"], big[mode, "json"]) for mode in BODY_MODES if (mode, "json") in big and (mode, "binary") in big]


def write_md(data: dict, path: Path) -> None:
    m, rows = data["machine"], data["rows"]
    lines = ["# The reward server under load", "",
             f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, commit {m['commit']}, {m['date']}. "
             f"`diffrl-fast bench reward-server --seconds {data['seconds']:g}`: a CLIP-style reward (random weights, tower "
             f"{data['summary'].get('tower', 'tiny')} on {data['summary'].get('device', 'cpu')}) "
             f"served on 127.0.0.1; clients send {IMAGES_PER_REQUEST} images per request back to back.", "",
             "| clients | mode | image side | body | images/s | p50 latency (ms) | p99 latency (ms) | images per reward call | "
             "server CPU per request (ms) | requests | mixed replies | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['mode']} | {r['size']} | {r['body']} | {r['images_per_s']:.0f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['mean_batch']:.1f} | {r['server_cpu_ms_per_request']:.2f} | {r['requests']} | "
                     f"{r['mixed']} | {r['error_count']} |")
    s = data["summary"]
    prof = s["reward_ms_per_call"]
    lines += ["", f"With {max(CLIENTS)} clients dynamic batching scores **{s['speedup']:.2f}x** the images per second of one request "
              f"per reward call (target: at least 3x), at {s['p99_ratio']:.2f}x its p99 latency (target: at most 2x).", "",
              f"With one client the adaptive wait (the default) scores {s['one_client_adaptive_over_fixed']:.2f}x the images per second "
              f"of the fixed 5 ms wait, and {s['one_client_adaptive_over_unbatched']:.2f}x those of no batching.", "",
              f"The reward on {data['summary'].get('device', 'cpu')}, milliseconds per call: " + ", ".join(f"{n} images {ms:.1f}" for n, ms in prof.items())
              + f"; per image, calls of 8 cost {s['reward_per_image_saving']:.2f}x a call of {max(prof, key=int)}: the most merging "
              "can save of the reward's own time.", "",
              f"At {s['big_size']}x{s['big_size']} pixels with {s['big_clients']} clients, binary bodies score "
              + " and ".join(f"{r['images_per_s'] / j['images_per_s']:.2f}x ({mode})" for mode, r, j in body_pairs(data))
              + " the images per second of JSON ones, at "
              + " and ".join(f"{r['server_cpu_ms_per_request'] / j['server_cpu_ms_per_request']:.2f}x" for _, r, j in body_pairs(data))
              + f" the server's CPU time per request; with binary bodies batching scores {s['big_speedup']:.2f}x one request "
              "per reward call.", "",
              f"Fuzz: {s['fuzz_cases']} malformed requests, {s['fuzz_4xx']} answered 4xx as expected, {s['fuzz_5xx']} 5xx; the server "
              f"answered a valid request afterwards: {s['alive_after_fuzz']}. Resident memory: {s['rss_warm_mb']:.0f} MB after warm-up, "
              f"{s['rss_load_mb']:.0f} MB after the load, {s['rss_fuzz_mb']:.0f} MB after the fuzz ({s['rss_ratio']:.2f}x; target at most 1.5x).", ""]
    lines += reading_lines(path)
    path.write_text("\n".join(lines))


def _print(r: dict) -> None:
    print(f"{r['mode']:>20} {r['clients']:>2} clients, {r['size']}px {r['body']:>6}: {r['images_per_s']:.0f} images/s, "
          f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['mean_batch']:.1f} images per call, "
          f"server CPU {r['server_cpu_ms_per_request']:.2f} ms per request", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="diffrl-fast bench reward-server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="load per (mode, client count)")
    ap.add_argument("--device", default="cpu", help="where the reward runs: cpu (default) or cuda")
    ap.add_argument("--tower", choices=list(TOWERS), default=None, help="the reward's tower (default: tiny on cpu, vit-b/16 on cuda)")
    ap.add_argument("--quick", action="store_true", help="the GPU suite's configuration: batching and one at a time, 16 clients, "
                                                          "64x64 and 512x512 binary bodies, no fixed wait, JSON bodies or fuzz")
    ap.add_argument("--stem", default=None, help="result file name (default: reward_server, _smoke with --smoke)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="a tiny configuration that only checks the benchmark runs (CI)")
    args = ap.parse_args(argv)
    kwargs = {"device": args.device, "tower": args.tower or ("tiny" if args.device == "cpu" else "vit-b/16")}
    atol = 1e-4 if args.device == "cpu" else 0.5  # bfloat16 on a GPU: clip_style_reward's docstring
    max_batch, max_side = 128, 256
    big, body_clients = (128, 4) if args.smoke else (BIG, max(CLIENTS))
    modes = BODY_MODES if args.quick else tuple(MODES)
    # quick (the GPU suite's 40 s): both servers load their rewards now, while this process builds its own; one server
    # per mode serves both sizes (no fuzz, whose body limit wants a small --max-side)
    started = {mode: ServerProcess("--max-batch", str(max_batch), "--max-wait-ms", "5", "--max-side", str(big), *MODES[mode],
                                   kwargs=kwargs, wait=False) for mode in modes} if args.quick else {}
    try:
        return _run(args, kwargs, atol, max_batch, max_side, big, body_clients, modes, started)
    finally:
        for server in started.values():
            if server.proc.poll() is None:
                server.close()


def _run(args, kwargs, atol, max_batch, max_side, big, body_clients, modes, started) -> int:
    """main's measurements (``started``: the quick configuration's servers, already loading)."""
    import requests
    import torch

    from diffrl_fast.rewards.remote import encode_images

    reward = clip_style_reward(**kwargs)
    for server in started.values():  # timed below on a quiet machine
        server.ready()
    profile = reward_profile(reward, repeats=2 if args.smoke else 3 if args.quick else 10)
    print(f"reward ({kwargs['tower']} on {args.device}) ms per call: " + ", ".join(f"{n} images {ms:.1f}" for n, ms in profile.items()), flush=True)
    clients = (1, 4) if args.smoke else (max(CLIENTS),) if args.quick else CLIENTS
    rows, rss, codes = [], {}, None

    stem = args.stem or ("reward_server" + ("_smoke" if args.smoke else ""))
    args.out.mkdir(parents=True, exist_ok=True)

    def measure(mode, n, **kw):
        rows.append({"mode": mode, **load(server, reward, n, args.seconds, atol=atol, **kw)})
        _print(rows[-1])
        partial = {"machine": {**machine_info(args.device), "partial": True}, "seconds": args.seconds, "rows": rows}
        (args.out / f"{stem}.json").write_text(json.dumps(partial, indent=1) + "\n")  # the summary replaces it at the end

    for mode in modes:
        server = started[mode] if mode in started else \
            ServerProcess("--max-batch", str(max_batch), "--max-wait-ms", "5", "--max-side", str(max_side), *MODES[mode], kwargs=kwargs)
        try:
            load(server, reward, 2, 0.5, seed=99, atol=atol)  # warm-up: first calls, allocator
            if mode == "batching":
                rss["warm"] = server.rss_mb()
            for n in clients:
                measure(mode, n, seed=n)
            if args.quick:
                load(server, reward, 2, 0.5, seed=99, size=big, atol=atol)  # warm-up at this size too
                measure(mode, body_clients, seed=7, size=big)
            elif mode == "batching":
                rss["load"] = server.rss_mb()
                codes = fuzz(server.url, max_batch, max_side)
                expected = {name: code for name, _, _, code in fuzz_cases(max_batch, max_side)}
                good = {"prompts": ["1"], "images": encode_images(torch.zeros(1, 3, 64, 64))}
                alive = requests.post(f"{server.url}/score", json=good, timeout=60).status_code == 200
                rss["fuzz"] = server.rss_mb()
        finally:
            server.close()
    for mode in () if args.quick else BODY_MODES:  # own servers: --max-side big (the fuzz's server keeps its body limit small)
        server = ServerProcess("--max-batch", str(max_batch), "--max-wait-ms", "5", "--max-side", str(big), *MODES[mode], kwargs=kwargs)
        try:
            load(server, reward, 2, 0.5, seed=99, size=big, atol=atol)
            for binary in (False, True):
                measure(mode, body_clients, seed=7, size=big, binary=binary)
        finally:
            server.close()
    top = max(clients)
    main_rows = [r for r in rows if r["size"] == 64]
    fast = next(r for r in main_rows if r["mode"] == "batching" and r["clients"] == top)
    slow = next(r for r in main_rows if r["mode"] == "one at a time" and r["clients"] == top)
    body = {(r["mode"], r["body"]): r for r in rows if r["size"] == big}
    summary = {"device": args.device, "tower": kwargs["tower"], "speedup": fast["images_per_s"] / slow["images_per_s"],
               "p99_ratio": fast["p99_ms"] / slow["p99_ms"], "reward_ms_per_call": profile,
               "reward_per_image_saving": (profile[8] / 8) / (profile[max(profile)] / max(profile)),
               "big_size": big, "big_clients": body_clients,
               "big_speedup": body["batching", "binary"]["images_per_s"] / body["one at a time", "binary"]["images_per_s"],
               "mixed": sum(r["mixed"] for r in rows), "errors": sum(r["error_count"] for r in rows)}
    if not args.quick:
        one = {r["mode"]: r["images_per_s"] for r in main_rows if r["clients"] == 1}
        summary.update({
            "one_client_adaptive_over_fixed": one["batching"] / one["batching, fixed wait"],
            "one_client_adaptive_over_unbatched": one["batching"] / one["one at a time"],
            "fuzz_cases": len(codes), "fuzz_4xx": sum(codes[k] == expected[k] for k in codes),
            "fuzz_5xx": sum(isinstance(c, int) and c >= 500 for c in codes.values()), "fuzz_codes": codes,
            "alive_after_fuzz": alive, "rss_warm_mb": rss["warm"], "rss_load_mb": rss["load"], "rss_fuzz_mb": rss["fuzz"],
            "rss_ratio": max(rss["load"], rss["fuzz"]) / rss["warm"]})
    data = {"machine": machine_info(args.device), "seconds": args.seconds, "rows": rows, "summary": summary}
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    if not args.quick:
        write_md(data, args.out / f"{stem}.md")
    print(json.dumps({k: v for k, v in summary.items() if k != "fuzz_codes"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
