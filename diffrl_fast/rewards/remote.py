"""Rewards as a service: an HTTP reward server and the client the trainer uses for ``reward.name=http://HOST:PORT``.

Protocol (JSON over HTTP, version 1):

    GET  /health  -> {"status": "ok", "reward": NAME, "max_batch": N, "protocol": 1}
    POST /score   <- {"prompts": [B strings], "metadata": [B dicts],
                      "images": {"format": "uint8" | "float32", "shape": [B, C, H, W], "data": base64 of the raw array}
                                | {"format": "png", "data": [B base64 PNG files]}}
                  -> {"rewards": [B numbers], "info": {name: number}}
                  errors: 400 (malformed request), 413 (more than max_batch images), 422 (the reward raised),
                          each as {"error": message}

Images are the trainer's [B, C, H, W] floats in [0, 1]. ``uint8`` (the default) and ``png`` send round(255 x) as
an 8-bit image would store it; ``float32`` sends the floats exactly (4x the bytes), so a remote reward equals the
local one bit for bit.

The client (:class:`RemoteReward`) checks ``/health`` when it is built (before the trainer loads any model), sends
batches of at most the server's ``max_batch``, and retries a failed request (connection refused or reset, timeout,
HTTP 5xx, or 422: the reward raised on the server) ``retries`` times with exponential backoff. It never turns a failure into a reward: after the retries it
raises :class:`RewardServiceError`, which the trainer turns into a clean stop at its last checkpoint. A reply that is
not a valid answer (not JSON, wrong length, non-finite values) is a server bug, not a transient failure: it raises
:class:`RewardError` at once, naming the server and what was wrong.

The server is aiohttp's; the reward runs in a worker thread, one batch at a time, so ``/health`` answers while a
batch is being scored.
"""
from __future__ import annotations

import base64
import io
import json
import math

import torch

from .values import RewardError, reward_values

PROTOCOL = 1
IMAGE_FORMATS = ("uint8", "png", "float32")


class RewardServiceError(RewardError):
    """A reward server could not be reached or kept failing after the retries."""


# ---- images on the wire ---------------------------------------------------------------------------------------
def encode_images(images: torch.Tensor, fmt: str = "uint8") -> dict:
    """[B, C, H, W] floats in [0, 1] as the JSON ``images`` field: raw uint8 / float32 bytes, or one PNG per image."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format {fmt!r} is not one of {IMAGE_FORMATS}")
    x = images.detach().float().cpu()
    if fmt == "float32":
        return {"format": fmt, "shape": list(x.shape), "data": base64.b64encode(x.contiguous().numpy().tobytes()).decode()}
    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if fmt == "uint8":
        return {"format": fmt, "shape": list(u8.shape), "data": base64.b64encode(u8.contiguous().numpy().tobytes()).decode()}
    from PIL import Image

    files = []
    for img in u8:
        arr = img.permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
        files.append(base64.b64encode(buf.getvalue()).decode())
    return {"format": fmt, "data": files}


def decode_images(field) -> torch.Tensor:
    """The JSON ``images`` field back as [B, C, H, W] float32 in [0, 1]; ValueError names what is malformed."""
    import numpy as np

    if not isinstance(field, dict) or field.get("format") not in IMAGE_FORMATS:
        raise ValueError(f"'images' must be an object with 'format' one of {list(IMAGE_FORMATS)}")
    fmt, data = field["format"], field.get("data")
    if fmt == "png":
        from PIL import Image

        if not isinstance(data, list) or not data:
            raise ValueError("'images.data' must be a non-empty list of base64 PNG files")
        arrays = []
        for i, item in enumerate(data):
            try:
                arr = np.asarray(Image.open(io.BytesIO(base64.b64decode(item))))
            except Exception as exc:  # noqa: BLE001 - any decoding failure is the client's malformed input
                raise ValueError(f"image {i} is not a base64 PNG file ({exc})") from None
            arrays.append(arr[..., None] if arr.ndim == 2 else arr)
        if len({a.shape for a in arrays}) != 1:
            raise ValueError("the PNG images have different sizes")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    shape = field.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError("'images.shape' must be [B, C, H, W] of positive integers")
    try:
        raw = base64.b64decode(data, validate=True)
    except Exception:  # noqa: BLE001
        raise ValueError("'images.data' is not base64") from None
    dtype = np.uint8 if fmt == "uint8" else np.float32
    if len(raw) != math.prod(shape) * np.dtype(dtype).itemsize:
        raise ValueError(f"'images.data' holds {len(raw)} bytes; shape {shape} of {fmt} needs "
                         f"{math.prod(shape) * np.dtype(dtype).itemsize}")
    x = torch.from_numpy(np.frombuffer(raw, dtype=dtype).reshape(shape).copy())
    return x.float() / 255 if fmt == "uint8" else x


# ---- the server -------------------------------------------------------------------------------------------------
def make_app(reward_fn, name: str, max_batch: int = 64):
    """The aiohttp application serving ``reward_fn(images, prompts, metadata) -> (rewards, info)`` under ``name``."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from .._extras import require

    web = require("aiohttp.web", "the reward server")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")  # one batch at a time
    served = {"batches": 0, "images": 0}

    def fail(status: int, message: str):
        return web.json_response({"error": message}, status=status)

    async def health(request):
        return web.json_response({"status": "ok", "reward": name, "max_batch": max_batch, "protocol": PROTOCOL, **served})

    def compute(images, prompts, metadata):
        with torch.no_grad():
            out = reward_fn(images, prompts, metadata)
        # NaN/inf travel as they are: the client decides (reward.drop_nonfinite) what a non-finite reward means
        rewards = reward_values(name, out, len(prompts), allow_nonfinite=True)
        scalars = {}
        for k, v in (out[1] or {}).items():
            try:
                scalars[str(k)] = float(v)
            except (TypeError, ValueError):
                pass  # only scalar statistics travel
        return rewards.tolist(), scalars

    async def score(request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return fail(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return fail(400, "the request body must be a JSON object")
        prompts, metadata = body.get("prompts"), body.get("metadata")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            return fail(400, "'prompts' must be a list of strings")
        metadata = [{} for _ in prompts] if metadata is None else metadata
        if not isinstance(metadata, list) or len(metadata) != len(prompts):
            return fail(400, f"'metadata' must be a list of {len(prompts)} objects")
        if len(prompts) > max_batch:
            return fail(413, f"{len(prompts)} images in one request; this server takes at most {max_batch} (send smaller batches)")
        try:
            images = decode_images(body.get("images"))
        except ValueError as exc:
            return fail(400, str(exc))
        if images.shape[0] != len(prompts):
            return fail(400, f"{images.shape[0]} images for {len(prompts)} prompts")
        try:
            rewards, info = await asyncio.get_running_loop().run_in_executor(worker, compute, images, prompts, metadata)
        except Exception as exc:  # noqa: BLE001 - the reward's own failure goes back to the client, named
            return fail(422, f"reward {name!r} raised {type(exc).__name__}: {exc}")
        served["batches"] += 1
        served["images"] += len(prompts)
        return web.json_response({"rewards": rewards, "info": info})

    async def close_worker(app):
        worker.shutdown(wait=False)

    app = web.Application(client_max_size=1 << 30)  # a batch of 64 1024-px float32 images is ~800 MB
    app.router.add_get("/health", health)
    app.router.add_post("/score", score)
    app.on_cleanup.append(close_worker)
    return app


# ---- the client -------------------------------------------------------------------------------------------------
class RemoteReward:
    """A reward served by ``diffrl-fast reward-server``: ``fn(images, prompts, metadata) -> (rewards, info)``.

    Requests go in batches of ``min(batch_size, the server's max_batch)``; each may take ``timeout_s``; a failed request
    (connection error, timeout, HTTP 5xx or 422) is retried ``retries`` times after backoff_s, 2 backoff_s, 4 backoff_s,
    ...; ``close()`` stops it between attempts.
    """

    def __init__(self, url: str, *, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 1.0,
                 image_format: str = "uint8", batch_size: int = 0, health_timeout_s: float = 10.0,
                 allow_nonfinite: bool = False) -> None:
        import threading

        from .._extras import require

        requests = require("requests", "reward servers (reward.name=http://...)")

        if image_format not in IMAGE_FORMATS:
            raise RewardError(f"reward.remote_format {image_format!r} is not one of {list(IMAGE_FORMATS)}")
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s, self.image_format = timeout_s, retries, backoff_s, image_format
        self.allow_nonfinite = allow_nonfinite  # reward.drop_nonfinite: NaN/inf rewards are kept, the trainer drops them
        self.closed = threading.Event()
        self.session = requests.Session()
        try:
            reply = self.session.get(f"{self.url}/health", timeout=health_timeout_s)
            reply.raise_for_status()
            health = reply.json()
        except requests.RequestException as exc:
            raise RewardServiceError(f"reward server {self.url} failed its health check: {_cause(exc)}. Start it with "
                                     f"`diffrl-fast reward-server --reward NAME --port PORT`, or fix reward.name") from None
        except ValueError:
            raise RewardServiceError(f"reward server {self.url} answered /health with something that is not JSON: "
                                     f"is it a diffrl-fast reward server?") from None
        if not isinstance(health, dict) or health.get("status") != "ok" or not isinstance(health.get("max_batch"), int):
            raise RewardServiceError(f"reward server {self.url} answered /health with {str(health)[:200]!r}, not a "
                                     f"diffrl-fast reward server's status")
        if health.get("protocol") != PROTOCOL:
            raise RewardServiceError(f"reward server {self.url} speaks protocol {health.get('protocol')!r}, this client "
                                     f"{PROTOCOL}: run the same diffrl_fast version on both sides")
        self.name = str(health.get("reward", "remote"))
        self.batch_size = min(batch_size, health["max_batch"]) if batch_size > 0 else health["max_batch"]

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, reward={self.name!r})"

    def close(self) -> None:
        """Stop: no new request or retry starts (one in flight ends within timeout_s); the connections close."""
        self.closed.set()
        self.session.close()

    def __call__(self, images: torch.Tensor, prompts: list, metadata: list):
        rewards, infos = [], []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            r, info = self._score(images[start:stop], list(prompts[start:stop]), list(metadata[start:stop]))
            rewards.append(r)
            infos.append((len(r), info))
        out = torch.cat(rewards) if rewards else torch.zeros(0)
        keys = {k for _, i in infos for k in i}  # each request's statistics, weighted by its number of images
        return out, {k: sum(n * i[k] for n, i in infos if k in i) / sum(n for n, i in infos if k in i) for k in keys}

    def _score(self, images: torch.Tensor, prompts: list, metadata: list):
        import requests

        body = json.dumps({"prompts": prompts, "metadata": _jsonable(metadata),
                           "images": encode_images(images, self.image_format)})
        last = ""
        for attempt in range(self.retries + 1):
            if attempt and self.closed.wait(self.backoff_s * 2 ** (attempt - 1)):
                break
            if self.closed.is_set():
                break
            try:
                reply = self.session.post(f"{self.url}/score", data=body, timeout=self.timeout_s,
                                          headers={"Content-Type": "application/json"})
            except requests.Timeout:
                last = f"no reply within reward.timeout_s={self.timeout_s:g} s"
                continue
            except requests.RequestException as exc:
                last = _cause(exc)
                continue
            if reply.status_code >= 500 or reply.status_code == 422:  # 422: the reward raised there (e.g. out of memory)
                last = f"HTTP {reply.status_code}: {_error_text(reply)}"
                continue
            if reply.status_code != 200:  # the request itself is wrong: retrying would not help
                raise RewardError(f"reward server {self.url} refused the batch (HTTP {reply.status_code}): "
                                  f"{_error_text(reply)}")
            return self._parse(reply, len(prompts))
        if self.closed.is_set():
            raise RewardServiceError(f"reward server {self.url}: its client was closed (the run is stopping); last: {last or 'nothing sent'}")
        raise RewardServiceError(f"reward server {self.url} failed {self.retries + 1} times (reward.retries="
                                 f"{self.retries}); last: {last}")

    def _parse(self, reply, n: int):
        try:
            body = reply.json()
        except ValueError:
            raise RewardError(f"reward server {self.url} replied with something that is not JSON: "
                              f"{reply.text[:200]!r}") from None
        if not isinstance(body, dict) or not isinstance(body.get("rewards"), list):
            raise RewardError(f"reward server {self.url} replied without a 'rewards' list: {str(body)[:200]!r}")
        values = body["rewards"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise RewardError(f"reward server {self.url} replied with rewards that are not numbers: {str(values)[:200]}")
        rewards = reward_values(f"{self.name} at {self.url}", (torch.tensor(values, dtype=torch.float32), {}), n,
                                self.allow_nonfinite)
        info = body.get("info") if isinstance(body.get("info"), dict) else {}
        return rewards, {k: float(v) for k, v in info.items() if isinstance(v, (int, float))}


def _cause(exc) -> str:
    """A short reason for a requests exception ('connection refused', ...), not its long wrapper text."""
    text = str(exc)
    for known, short in (("refused", "connection refused"), ("reset by peer", "connection reset"),
                         ("remote end closed", "the server closed the connection"), ("not known", "unknown host")):
        if known in text.lower():
            return short
    return f"{type(exc).__name__}: {text[:200]}"


def _error_text(reply) -> str:
    try:
        return str(reply.json().get("error", reply.text))[:300]
    except ValueError:
        return reply.text[:300]


def _jsonable(metadata: list) -> list:
    """Metadata dicts with tensors and numpy scalars as plain JSON values."""
    def plain(v):
        if isinstance(v, torch.Tensor):
            return v.tolist()
        if hasattr(v, "item") and callable(v.item):
            return v.item()
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return [plain(m) for m in metadata]
