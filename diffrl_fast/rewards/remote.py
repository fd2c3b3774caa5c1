"""Rewards as a service: an HTTP reward server and the client the trainer uses for ``reward.name=http://HOST:PORT``.

Protocol (HTTP, version 1):

    GET  /health  -> {"status": "ok", "reward": NAME, "max_batch": N, "protocol": 1, "bodies": ["json", "safetensors"], ...}
    GET  /metrics -> Prometheus text format: requests by endpoint and status, images, reward calls and their mean
                     size, queue depth, /score latency quantiles
    POST /score   <- {"prompts": [B strings], "metadata": [B objects],
                      "images": {"format": "uint8" | "float32", "shape": [B, C, H, W], "data": base64 of the raw array}
                                | {"format": "png", "data": [B base64 PNG files]}}
                     or, as Content-Type application/octet-stream, a safetensors file: one tensor "images" (uint8 or
                     float32 [B, C, H, W]) and, in its header's metadata, "prompts" and "metadata" as JSON strings
                  -> {"rewards": [B numbers or null (a non-finite reward)], "info": {name: number}}
                  errors, each as {"error": message}: 400 (malformed request: JSON, shapes, base64, NaN/inf or
                  out-of-range floats, images over --max-side), 401 (no or wrong token), 413 (more than max_batch images,
                  or a body over the size limit), 422 (the reward raised), 429 (the queue is full; Retry-After says when
                  to come back), 503 (the request waited longer than --request-timeout-s)

Images are the trainer's [B, C, H, W] floats in [0, 1], C = 1 or 3. ``uint8`` (the default) and ``png`` send
round(255 x) as an 8-bit image would store it; ``float32`` sends the floats exactly (4x the bytes), so a remote reward
equals the local one bit for bit. The client sends raw formats as the binary body where the server takes it (its
/health lists "safetensors"): the server then reads the pixels without base64 or a JSON string of them, which at
512x512 is most of its work per request.

The server (``make_app``) is aiohttp's. Concurrent requests are merged into reward calls of up to max_batch images
(dynamic batching: whole requests of the same image size, formed once full or --max-wait-ms after the oldest arrived),
run one at a time in a worker thread so /health and /metrics answer meanwhile (8-bit pixels become the reward's
floats there, not on the event loop), and split back to their requests.

The client (:class:`RemoteReward`) checks ``/health`` when it is built (before the trainer loads any model), sends
batches of at most the server's ``max_batch`` (with the bearer token of reward.token_file where the server needs one),
and retries a failed request (connection refused or reset, timeout, HTTP 5xx, 429 after its Retry-After, or 422: the
reward raised on the server) ``retries`` times with exponential backoff. It never turns a failure into a reward:
after the retries it raises :class:`RewardServiceError`, which the trainer turns into a clean stop at its last
checkpoint. A reply that is not a valid answer (not JSON, wrong length, values that are not numbers) is a server bug,
not a transient failure: it raises :class:`RewardError` at once, naming the server and what was wrong.
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
JSON_TYPE, BINARY_TYPE = "application/json", "application/octet-stream"  # a /score body's Content-Type
BODIES = ("json", "safetensors")  # the bodies a server takes (/health's "bodies")


class RewardServiceError(RewardError):
    """A reward server could not be reached or kept failing after the retries."""


# ---- images on the wire ---------------------------------------------------------------------------------------
def _wire_array(images: torch.Tensor, fmt: str) -> torch.Tensor:
    """The array a format sends: float32 as given (exact), or round(255 x) of x clamped to [0, 1] as uint8."""
    x = images.detach().float().cpu()
    if fmt == "float32":
        return x.contiguous()
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()


def encode_images(images: torch.Tensor, fmt: str = "uint8") -> dict:
    """[B, C, H, W] floats in [0, 1] (or videos [B, F, C, H, W]) as the JSON ``images`` field: raw uint8 / float32
    bytes, or one PNG per image (images only)."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format {fmt!r} is not one of {IMAGE_FORMATS}")
    if images.dim() == 5 and fmt == "png":
        raise ValueError("videos travel as raw uint8 or float32 (reward.remote_format), not PNG")
    arr = _wire_array(images, fmt)
    if fmt != "png":
        return {"format": fmt, "shape": list(arr.shape), "data": base64.b64encode(arr.numpy().tobytes()).decode()}
    from PIL import Image

    files = []
    for img in arr:
        a = img.permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
        files.append(base64.b64encode(buf.getvalue()).decode())
    return {"format": fmt, "data": files}


def encode_request(images: torch.Tensor, prompts: list, metadata: list, fmt: str = "uint8", binary: bool = False) -> tuple[bytes, str]:
    """A /score body and its Content-Type. JSON: ``{"prompts", "metadata", "images": encode_images(images, fmt)}``.
    ``binary`` (raw formats only): a safetensors file whose one tensor ``images`` is the uint8 / float32 array and
    whose header metadata holds ``prompts`` and ``metadata`` as JSON strings: no base64 and no JSON string of the
    pixels to parse, so the server's work per request no longer grows with the image's bytes through Python."""
    if not binary:
        body = {"prompts": prompts, "metadata": metadata, "images": encode_images(images, fmt)}
        return json.dumps(body).encode(), JSON_TYPE
    if fmt not in ("uint8", "float32"):
        raise ValueError(f"binary bodies carry raw uint8 or float32 arrays, not {fmt!r}")
    from safetensors.torch import save

    meta = {"prompts": json.dumps(prompts), "metadata": json.dumps(metadata)}
    return save({"images": _wire_array(images, fmt)}, metadata=meta), BINARY_TYPE


def _reject_constant(value):
    raise ValueError(f"{value} is not JSON")


def _check_shape(shape: list, max_side: int, max_frames: int, what: str) -> None:
    """ValueError unless ``shape`` is a batch a server takes: [B, C, H, W] (or [B, F, C, H, W] when ``max_frames`` > 0)
    of positive sizes, C = 1 or 3, sides of at most ``max_side``, at most ``max_frames`` frames."""
    dims, form = (5, "[B, F, C, H, W] (videos: this server's reward takes them)") if max_frames else (4, "[B, C, H, W]")
    if len(shape) != dims or not all(s > 0 for s in shape):
        raise ValueError(f"{what} {shape} must be {form} of positive integers")
    if shape[-3] not in (1, 3):
        raise ValueError(f"{what} {shape} has {shape[-3]} channels; images are grayscale (1) or RGB (3)")
    if max(shape[-2:]) > max_side:
        raise ValueError(f"{what} {shape} is {shape[-2]}x{shape[-1]} pixels; this server takes at most {max_side} a side (--max-side)")
    if max_frames and shape[1] > max_frames:
        raise ValueError(f"{what} {shape} has {shape[1]} frames; this server takes at most {max_frames} (--max-frames)")


def _check_values(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` if it is uint8, or float32 finite and in [0, 1]; ValueError naming what is not."""
    if x.dtype == torch.float32:
        if not bool(torch.isfinite(x).all()):
            raise ValueError("the float32 images hold NaN or infinite values")
        if bool((x < 0).any() or (x > 1).any()):
            raise ValueError(f"the float32 images hold values outside [0, 1] (min {float(x.min()):g}, max {float(x.max()):g})")
    elif x.dtype != torch.uint8:
        raise ValueError(f"{what} is {x.dtype}; images travel as uint8 or float32")
    return x


def to_unit(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A decoded batch as the reward's float32 in [0, 1]: uint8 v -> v / 255, float32 as it is; written into ``out``
    (a slice of a merged batch) when given."""
    if out is None:
        return x.float().div_(255) if x.dtype == torch.uint8 else x  # in place: one float array, not two
    out.copy_(x)
    return out.div_(255) if x.dtype == torch.uint8 else out


def _decode_field(field, max_side: int, max_frames: int) -> torch.Tensor:
    """The JSON ``images`` field as its checked uint8 (uint8, png) or float32 array (decode_images without the
    conversion, which the server leaves to its reward thread)."""
    import numpy as np

    if not isinstance(field, dict) or field.get("format") not in IMAGE_FORMATS:
        raise ValueError(f"'images' must be an object with 'format' one of {list(IMAGE_FORMATS)}")
    fmt, data = field["format"], field.get("data")
    if fmt == "png":
        from PIL import Image

        if max_frames:
            raise ValueError("this server scores videos: send them as raw uint8 or float32 [B, F, C, H, W], not PNG")
        if not isinstance(data, list) or not data or not all(isinstance(d, str) for d in data):
            raise ValueError("'images.data' must be a non-empty list of base64 PNG files")
        arrays = []
        for i, item in enumerate(data):
            try:
                im = Image.open(io.BytesIO(base64.b64decode(item, validate=True)), formats=["PNG"])
                w, h = im.size  # checked before the pixels are decoded
                if max(h, w) > max_side:
                    raise ValueError(f"image {i} is {h}x{w} pixels; this server takes at most {max_side} a side (--max-side)")
                if im.mode not in ("L", "RGB"):
                    raise ValueError(f"image {i} is a PNG of mode {im.mode}; send grayscale (L) or RGB")
                arr = np.asarray(im)
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001 - any decoding failure is the client's malformed input
                raise ValueError(f"image {i} is not a base64 PNG file ({type(exc).__name__})") from None
            arrays.append(arr[..., None] if arr.ndim == 2 else arr)
        if len({a.shape for a in arrays}) != 1:
            raise ValueError("the PNG images have different sizes or modes")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    shape = field.get("shape")
    if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
        raise ValueError("'images.shape' must be a list of integers, " + ("[B, F, C, H, W]" if max_frames else "[B, C, H, W]"))
    _check_shape(shape, max_side, max_frames, "'images.shape'")
    if not isinstance(data, str):
        raise ValueError("'images.data' must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except Exception:  # noqa: BLE001
        raise ValueError("'images.data' is not base64") from None
    dtype = np.uint8 if fmt == "uint8" else np.float32
    if len(raw) != math.prod(shape) * np.dtype(dtype).itemsize:
        raise ValueError(f"'images.data' holds {len(raw)} bytes; shape {shape} of {fmt} needs "
                         f"{math.prod(shape) * np.dtype(dtype).itemsize}")
    return _check_values(torch.from_numpy(np.frombuffer(raw, dtype=dtype).reshape(shape).copy()), "'images.data'")


def decode_images(field, max_side: int = 1 << 16, max_frames: int = 0) -> torch.Tensor:
    """The JSON ``images`` field back as [B, C, H, W] float32 in [0, 1] (C = 1 or 3, H and W at most ``max_side``), or
    with ``max_frames`` > 0 (a video reward's server) videos [B, F, C, H, W] of at most ``max_frames`` frames, raw
    formats only; ValueError names what is malformed: the format, the shape, the base64, the byte count, a PNG that is
    not one or not grayscale / RGB, float32 values that are not finite or outside [0, 1]."""
    return to_unit(_decode_field(field, max_side, max_frames))


def decode_binary(body: bytes, max_side: int = 1 << 16, max_frames: int = 0) -> tuple[torch.Tensor, list, list]:
    """A binary /score body (``encode_request(..., binary=True)``: a safetensors file) as (images as sent, uint8 or
    float32, checked as decode_images checks them; prompts; metadata, or None when absent); ValueError names what is
    malformed: not a safetensors file, tensors other than one ``images``, its dtype, shape or values, prompts or
    metadata that are not JSON strings in the header."""
    from safetensors.torch import load

    try:
        tensors = load(body)
    except Exception as exc:  # noqa: BLE001 - safetensors' own message says what is wrong with the file
        raise ValueError(f"the binary body is not a safetensors file ({str(exc)[:200]})") from None
    if set(tensors) != {"images"}:
        raise ValueError(f"a binary body holds one tensor, 'images'; this one holds {sorted(tensors)[:8]}")
    n = int.from_bytes(body[:8], "little")  # the header safetensors has just read and checked
    meta = json.loads(body[8:8 + n]).get("__metadata__") or {}
    fields = []
    for key in ("prompts", "metadata"):
        text = meta.get(key)
        if text is None:
            fields.append(None)
            continue
        try:
            fields.append(json.loads(text, parse_constant=_reject_constant))
        except (ValueError, RecursionError):
            raise ValueError(f"the header's '{key}' is not JSON, or nests too deeply (it holds the list as a JSON "
                                 "string)") from None
    x = tensors["images"]
    _check_shape(list(x.shape), max_side, max_frames, "'images'")
    x = _check_values(x, "'images'")
    # float32 reaches the reward as it is: a copy of its own, not a view of the request's immutable bytes
    return (x.clone() if x.dtype == torch.float32 else x), fields[0], fields[1]


# ---- the server -------------------------------------------------------------------------------------------------
LOOPBACK = ("127.0.0.1", "::1", "localhost")


WAIT_MODES = ("adaptive", "fixed")  # the batcher's wait for more requests (make_app)
# the adaptive wait counts the clients (open connections) that sent a request within this window: a trainer process
# sending once an epoch counts while its epochs take less than that
ACTIVE_WINDOW_S = 120.0


def body_limit(max_batch: int, max_side: int, max_frames: int = 0) -> int:
    """The largest /score body a server takes: ``max_batch`` float32 RGB images (videos of ``max_frames`` frames) of
    ``max_side`` pixels a side in base64 (4/3 of the bytes), and 64 KiB of prompt and metadata per sample, plus 64 KiB."""
    return int(max_batch * (max(1, max_frames) * 3 * max_side * max_side * 4 * 4 / 3 + 65536)) + 65536


def fixed_cost(calls) -> float | None:
    """The fixed part f of a reward call's cost t(n) = f + p n for n pixel values (images x their C x H x W), from
    recent calls [(n, seconds)]: the least-squares intercept, clamped to [0, mean t]; None when the calls cannot tell
    (fewer than 4, or all of one size: the caller keeps its last estimate, 0 at first). Merging k requests into one
    call saves (k - 1) f: the adaptive wait never waits longer than f."""
    if len(calls) < 4:
        return None
    mn = sum(n for n, _ in calls) / len(calls)
    mt = sum(t for _, t in calls) / len(calls)
    var = sum((n - mn) ** 2 for n, _ in calls)
    if var == 0:
        return None
    slope = sum((n - mn) * (t - mt) for n, t in calls) / var
    return min(max(mt - slope * mn, 0.0), mt)


class _Pending:
    """One /score request waiting in the server's queue."""

    __slots__ = ("images", "prompts", "metadata", "future", "t0", "deadline")

    def __init__(self, images, prompts, metadata, future, t0, deadline) -> None:
        self.images, self.prompts, self.metadata, self.future, self.t0, self.deadline = images, prompts, metadata, future, t0, deadline

    @property
    def key(self):
        return tuple(self.images.shape[1:])


class _Stats:
    """The server's counters for /health and /metrics."""

    def __init__(self) -> None:
        import collections

        self.codes = collections.Counter()  # (path, status) -> requests
        self.latency = collections.deque(maxlen=4096)  # seconds of the last answered /score requests
        self.latency_sum, self.latency_count = 0.0, 0
        self.images = self.batches = self.batch_requests = 0
        self.waited = 0  # batches whose batcher waited for more requests
        self.deadline = 0  # of those, the batches whose wait ran out (max_wait_ms; adaptive: or the fixed cost)
        self.calls = collections.deque(maxlen=64)  # (pixel values, seconds) of the recent reward calls
        self.fixed_s = 0.0  # the reward's estimated fixed cost per call (fixed_cost of self.calls)

    @property
    def call_s(self) -> float:
        """Mean seconds of the recent reward calls (Retry-After's estimate); 0 before the first."""
        return sum(t for _, t in self.calls) / len(self.calls) if self.calls else 0.0

    def quantile(self, q: float) -> float:
        vals = sorted(self.latency)
        return vals[min(len(vals) - 1, int(q * len(vals)))] if vals else float("nan")


def make_app(reward_fn, name: str, max_batch: int = 64, *, max_wait_ms: float = 5.0, max_queue: int = 256,
             request_timeout_s: float = 600.0, max_side: int = 2048, batching: bool = True, token: str | None = None,
             wait: str = "adaptive", max_frames: int = 81):
    """The aiohttp application serving ``reward_fn(images, prompts, metadata) -> (rewards, info)`` under ``name``.

    Dynamic batching (``batching``): requests wait in one queue; a batcher forms a reward call from the oldest request
    and the ones behind it with the same image size, whole requests only, up to ``max_batch`` images, once it has
    them or ``max_wait_ms`` after the oldest arrived, then splits the rewards back (each request gets its own; the
    ``info`` statistics are the formed batch's). ``wait="adaptive"`` (the default) waits only as long as merging
    can pay: at most the reward's fixed cost per call (``fixed_cost`` of the recent calls' durations against their
    sizes: merging a latecomer saves one call's fixed cost and no more), and only until every client that sent
    requests of that size within ACTIVE_WINDOW_S (120 s; a client is an open connection, as a trainer process's
    keep-alive session; a closed one no longer counts) has one queued. A lone client, or a reward whose cost grows
    with its images alone, is scored at once; a reward with a large cost per call (a GPU model's launches and
    transfers) merges the active clients as soon as the last one's request is in. ``"fixed"`` always waits for a
    full batch or ``max_wait_ms``.
    A reward with a ``device`` attribute (the registered model rewards given ``device``) gets its images on that
    device, the 8-bit pixels copied there and converted there; otherwise on the CPU.
    A formed batch whose reward raises is scored again request by request,
    so only a request that fails alone gets its 422. Without batching, one request per reward call (in arrival order).
    Backpressure: more than ``max_queue`` waiting requests get 429 with Retry-After (seconds, estimated from the
    queue and the recent reward calls); a request still queued ``request_timeout_s`` after it arrived gets 503.
    Limits: bodies over ``body_limit(max_batch, max_side)`` bytes get 413; images over ``max_side`` pixels a side,
    non-finite or out-of-range floats and malformed JSON get 400. ``token``: every endpoint then needs
    ``Authorization: Bearer <token>`` (401 otherwise). A video reward (``rewards.video.takes_video``) is served
    videos [B, F, C, H, W] of at most ``max_frames`` frames (raw formats; /health says ``"video": true``); an image
    reward, images.
    """
    import asyncio
    import hmac
    import time
    from concurrent.futures import ThreadPoolExecutor

    from .._extras import require

    web = require("aiohttp.web", "the reward server")
    if max_batch < 1 or max_queue < 1 or max_wait_ms < 0 or request_timeout_s <= 0 or max_side < 1:
        raise ValueError("max_batch, max_queue and max_side must be >= 1, max_wait_ms >= 0 and request_timeout_s > 0")
    if wait not in WAIT_MODES:
        raise ValueError(f"wait must be one of {WAIT_MODES}, got {wait!r}")
    from .values import takes_video

    if max_frames < 1:
        raise ValueError("max_frames must be >= 1")
    video = takes_video(reward_fn)
    device = getattr(reward_fn, "device", None)  # where the reward wants its images (e.g. the GPU its model is on)
    device = None if device is None else torch.device(device)
    frames = max_frames if video else 0
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")  # one reward call at a time
    stats, queue = _Stats(), []
    limit = body_limit(max_batch, max_side, frames)
    state: dict = {}
    clients: dict = {}  # a connection that sent /score -> (when its last request was queued, its image size)

    def forget_gone() -> None:
        """Drop the connections that closed (a client gone) or sent nothing within ACTIVE_WINDOW_S."""
        old = asyncio.get_running_loop().time() - ACTIVE_WINDOW_S
        for conn in [conn for conn, (t, _) in clients.items() if t < old or conn.is_closing()]:
            del clients[conn]

    def expected(key) -> int:
        """The open connections that sent requests of this image size within the last ACTIVE_WINDOW_S: the adaptive
        wait's guess of how many requests one reward call could merge."""
        forget_gone()
        return max(1, sum(k == key for _, k in clients.values()))

    def fail(status: int, message: str, **headers):
        return web.json_response({"error": message}, status=status, headers=headers or None)

    def compute(arrays, prompts, metadata):
        # in the reward thread (torch releases the GIL): the requests' arrays as the reward's floats, converted into
        # their slices of one batch (one pass over the pixels, no per-request float copies to concatenate)
        t = time.perf_counter()  # timed here, not around the hand-over to this thread: the call's own cost
        if device is not None:  # 8-bit pixels to the reward's device, converted there: a quarter of the bytes to copy
            arrays = [a.to(device) for a in arrays]
        if len(arrays) == 1:
            images = to_unit(arrays[0])
        else:
            images = torch.empty((sum(a.shape[0] for a in arrays), *arrays[0].shape[1:]), dtype=torch.float32,
                                 device=arrays[0].device)
            start = 0
            for a in arrays:
                to_unit(a, out=images[start:start + a.shape[0]])
                start += a.shape[0]
        with torch.no_grad():
            out = reward_fn(images, prompts, metadata)
        # NaN/inf travel as null: the client decides (reward.drop_nonfinite) what a non-finite reward means
        rewards = reward_values(name, out, len(prompts), allow_nonfinite=True)
        scalars = {}
        for k, v in (out[1] or {}).items():
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue  # only scalar statistics travel
            if math.isfinite(f):
                scalars[str(k)] = f
        return [v if math.isfinite(v) else None for v in rewards.tolist()], scalars, time.perf_counter() - t

    async def call(items):
        """One reward call on the concatenated requests ``items``; each future gets ("ok", (rewards, info)) or
        ("raised", message)."""
        loop = asyncio.get_running_loop()
        try:
            rewards, info, dt = await loop.run_in_executor(worker, compute, [p.images for p in items], [x for p in items for x in p.prompts],
                                                       [x for p in items for x in p.metadata])
        except Exception as exc:  # noqa: BLE001 - the reward's own failure goes back to its request, named
            if len(items) > 1:  # find the request that makes it fail: each alone
                for p in items:
                    await call([p])
                return
            if not items[0].future.done():
                items[0].future.set_result(("raised", f"reward {name!r} raised {type(exc).__name__}: {exc}"))
            return
        stats.calls.append((sum(p.images.numel() for p in items), dt))
        estimate = fixed_cost(stats.calls)
        stats.fixed_s = stats.fixed_s if estimate is None else estimate
        stats.batches += 1
        stats.batch_requests += len(items)
        stats.images += sum(len(p.prompts) for p in items)
        start = 0
        for p in items:
            n = len(p.prompts)
            if not p.future.done():
                p.future.set_result(("ok", (rewards[start:start + n], info)))
            start += n

    async def batcher():
        loop = asyncio.get_running_loop()
        wake = state["wake"]
        while True:
            while not queue:
                wake.clear()
                await wake.wait()
            now = loop.time()
            for p in [p for p in queue if p.future.done() or now > p.deadline]:  # gone (client left) or too old
                queue.remove(p)
                if not p.future.done():
                    p.future.set_result(("expired", None))
            if not queue:
                continue
            key = queue[0].key
            if batching:  # wait for more requests, at most max_wait_ms after the oldest arrived (adaptive: and no longer
                # than the reward's fixed cost per call, which is all that merging a latecomer saves)
                limit = max_wait_ms / 1000 if wait == "fixed" else min(max_wait_ms / 1000, stats.fixed_s)
                until, waited = queue[0].t0 + limit, False
                while True:
                    same = [p for p in queue if p.key == key]
                    if sum(len(p.prompts) for p in same) >= max_batch or loop.time() >= until:
                        break
                    if wait == "adaptive" and len(same) >= expected(key):  # every recent client is in
                        break
                    if not waited:  # counted once per batch, and only when it does wait
                        stats.waited, waited = stats.waited + 1, True
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), until - loop.time())
                    except asyncio.TimeoutError:
                        stats.deadline += 1
                        break
            picked, n = [], 0
            for p in list(queue):
                if p.key != key or p.future.done():
                    continue
                if picked and (not batching or n + len(p.prompts) > max_batch):
                    break
                picked.append(p)
                n += len(p.prompts)
                queue.remove(p)
            if picked:
                await call(picked)

    @web.middleware
    async def middleware(request, handler):
        t0 = time.perf_counter()
        sent = request.headers.get("Authorization", "")
        if token is not None and not hmac.compare_digest(sent.encode("utf-8", "replace"), f"Bearer {token}".encode()):
            resp = fail(401, "this server needs its token: send 'Authorization: Bearer <token>' (the trainer's reward.token_file)")
        else:
            try:
                resp = await handler(request)
            except web.HTTPRequestEntityTooLarge:
                what = f"videos of at most --max-frames {frames} frames" if video else "images"
                resp = fail(413, f"the request body is larger than this server takes ({limit} bytes: --max-batch {max_batch} "
                                 f"{what} of at most --max-side {max_side} pixels a side); send smaller batches or images")
            except web.HTTPException as exc:  # aiohttp's own answers (404, 405, ...), as JSON like ours
                resp = fail(exc.status, exc.reason)
        stats.codes[(request.path if request.path in ("/score", "/health", "/metrics") else "other", resp.status)] += 1
        if request.path == "/score" and resp.status == 200:
            dt = time.perf_counter() - t0
            stats.latency.append(dt)
            stats.latency_sum += dt
            stats.latency_count += 1
        return resp

    async def health(request):
        return web.json_response({"status": "ok", "reward": name, "max_batch": max_batch, "protocol": PROTOCOL, "bodies": list(BODIES),
                                  "batching": batching, "wait": wait, "max_side": max_side, "queued": len(queue),
                                  "video": video, "max_frames": frames,
                                  "batches": stats.batches, "images": stats.images})

    async def metrics(request):
        lines = ["# HELP reward_server_requests_total Requests answered, by endpoint and HTTP status.",
                 "# TYPE reward_server_requests_total counter"]
        lines += [f'reward_server_requests_total{{path="{path}",code="{code}"}} {n}' for (path, code), n in sorted(stats.codes.items())]
        lines += ["# HELP reward_server_images_total Images scored.", "# TYPE reward_server_images_total counter",
                  f"reward_server_images_total {stats.images}",
                  "# HELP reward_server_batches_total Reward calls (batches formed).", "# TYPE reward_server_batches_total counter",
                  f"reward_server_batches_total {stats.batches}",
                  "# HELP reward_server_batches_waited_total Batches for which the batcher waited for more requests.",
                  "# TYPE reward_server_batches_waited_total counter", f"reward_server_batches_waited_total {stats.waited}",
                  "# HELP reward_server_call_fixed_seconds The reward's estimated fixed cost per call (the adaptive wait's cap).",
                  "# TYPE reward_server_call_fixed_seconds gauge", f"reward_server_call_fixed_seconds {stats.fixed_s:.6f}",
                  "# HELP reward_server_batches_deadline_total Batches formed when the wait ran out (--max-wait-ms; adaptive: "
                  "or the reward's fixed cost per call).",
                  "# TYPE reward_server_batches_deadline_total counter", f"reward_server_batches_deadline_total {stats.deadline}",
                  "# HELP reward_server_batch_images Images per reward call (mean: _sum / _count).",
                  "# TYPE reward_server_batch_images summary",
                  f"reward_server_batch_images_sum {stats.images}", f"reward_server_batch_images_count {stats.batches}",
                  "# HELP reward_server_batch_requests Requests merged into a reward call (mean: _sum / _count).",
                  "# TYPE reward_server_batch_requests summary",
                  f"reward_server_batch_requests_sum {stats.batch_requests}", f"reward_server_batch_requests_count {stats.batches}",
                  "# HELP reward_server_queue_depth Requests waiting for a reward call.", "# TYPE reward_server_queue_depth gauge",
                  f"reward_server_queue_depth {len(queue)}",
                  "# HELP reward_server_score_seconds Seconds from a /score request's arrival to its reply (quantiles over "
                  "the last 4096 answered).", "# TYPE reward_server_score_seconds summary"]
        for q in (0.5, 0.9, 0.99):
            lines.append(f'reward_server_score_seconds{{quantile="{q}"}} {stats.quantile(q):.6f}')
        lines += [f"reward_server_score_seconds_sum {stats.latency_sum:.6f}", f"reward_server_score_seconds_count {stats.latency_count}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def score(request):
        pending = await receive(request)
        if not isinstance(pending, _Pending):
            return pending  # the request's error answer
        if batching and wait == "adaptive" and request.transport is not None:  # a trainer's keep-alive connection
            forget_gone()  # here too: a client opening a connection per request must not grow the table
            clients[request.transport] = (pending.t0, pending.key)
        queue.append(pending)
        state["wake"].set()
        kind, value = await pending.future
        if kind == "expired":
            return fail(503, f"the request waited more than {request_timeout_s:g} s (--request-timeout-s) in the queue: "
                             "the server is overloaded")
        if kind == "raised":
            return fail(422, value)
        rewards, info = value
        return web.json_response({"rewards": rewards, "info": info})

    async def receive(request):
        """The checked request as a _Pending, or the error response that refuses it."""
        # a safetensors file: the images, and prompts / metadata in its header (aiohttp reads a missing Content-Type
        # as application/octet-stream: such bodies stay JSON, as before binary bodies)
        if "Content-Type" in request.headers and request.content_type == BINARY_TYPE:
            try:
                images, prompts, metadata = decode_binary(await request.read(), max_side=max_side, max_frames=frames)
            except ValueError as exc:
                return fail(400, str(exc))
        else:
            try:
                body = json.loads(await request.text(), parse_constant=_reject_constant)
            except (ValueError, UnicodeDecodeError):
                return fail(400, "the request body is not JSON (or send a safetensors file as application/octet-stream)")
            except RecursionError:
                return fail(400, "the request body nests too deeply")
            if not isinstance(body, dict):
                return fail(400, "the request body must be a JSON object")
            prompts, metadata, images = body.get("prompts"), body.get("metadata"), None
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            return fail(400, "'prompts' must be a non-empty list of strings")
        metadata = [{} for _ in prompts] if metadata is None else metadata
        if not isinstance(metadata, list) or len(metadata) != len(prompts) or not all(isinstance(m, dict) for m in metadata):
            return fail(400, f"'metadata' must be a list of {len(prompts)} objects")
        if len(prompts) > max_batch:
            return fail(413, f"{len(prompts)} images in one request; this server takes at most {max_batch} (send smaller batches)")
        if images is None:
            try:  # uint8 stays uint8 until the reward thread converts it
                images = _decode_field(body.get("images"), max_side=max_side, max_frames=frames)
            except ValueError as exc:
                return fail(400, str(exc))
        if images.shape[0] != len(prompts):
            return fail(400, f"{images.shape[0]} images for {len(prompts)} prompts")
        if len(queue) >= max_queue:
            waiting = sum(len(p.prompts) for p in queue)
            retry = max(1, math.ceil((waiting / max_batch + 1) * max(stats.call_s, 1e-3)))
            return fail(429, f"{len(queue)} requests are waiting (--max-queue {max_queue}); retry after {retry} s",
                        **{"Retry-After": str(retry)})
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        return _Pending(images, prompts, metadata, loop.create_future(), t0, t0 + request_timeout_s)

    async def start(app):
        state["wake"] = asyncio.Event()
        state["task"] = asyncio.get_running_loop().create_task(batcher())

    async def stop(app):
        task = state.get("task")
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for p in queue:
            if not p.future.done():
                p.future.set_result(("expired", None))
        worker.shutdown(wait=False)

    app = web.Application(client_max_size=limit, middlewares=[middleware])
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/score", score)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


# ---- the client -------------------------------------------------------------------------------------------------
class RemoteReward:
    """A reward served by ``diffrl-fast reward-server``: ``fn(images, prompts, metadata) -> (rewards, info)``.

    Requests go in batches of ``min(batch_size, the server's max_batch)``; each may take ``timeout_s``; a failed request
    (connection error, timeout, HTTP 5xx, 429 or 422) is retried ``retries`` times after backoff_s, 2 backoff_s, 4 backoff_s,
    ... (after a 429, at least its Retry-After); ``close()`` stops it between attempts. ``token``: sent as
    ``Authorization: Bearer <token>`` (a server bound beyond loopback needs it). ``binary``: raw formats travel as a
    safetensors body (``encode_request``); None (the default) when the server's /health lists it, else JSON.
    """

    def __init__(self, url: str, *, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 1.0,
                 image_format: str = "uint8", batch_size: int = 0, health_timeout_s: float = 10.0,
                 allow_nonfinite: bool = False, token: str | None = None, binary: bool | None = None) -> None:
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
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
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
        self.video = bool(health.get("video", False))  # the served reward takes videos (rewards.video.takes_video)
        if self.video and image_format == "png":
            raise RewardError(f"reward server {self.url} scores videos, which travel as raw frames: set reward.remote_format "
                              f"to uint8 or float32")
        self.batch_size = min(batch_size, health["max_batch"]) if batch_size > 0 else health["max_batch"]
        offered = "safetensors" in (health.get("bodies") or ())  # a server before binary bodies lists none
        if binary and image_format == "png":
            raise RewardError("binary bodies carry raw arrays: reward.remote_format png travels as JSON")
        if binary and not offered:
            raise RewardServiceError(f"reward server {self.url} does not take binary bodies (its /health lists "
                                     f"{health.get('bodies')!r}): update it, or send JSON")
        self.binary = (offered if binary is None else binary) and image_format != "png"

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

        body, content_type = encode_request(images, prompts, _jsonable(metadata), self.image_format, self.binary)
        last, retry_after = "", 0.0
        for attempt in range(self.retries + 1):
            if attempt and self.closed.wait(max(retry_after, self.backoff_s * 2 ** (attempt - 1))):
                break
            retry_after = 0.0
            if self.closed.is_set():
                break
            try:
                reply = self.session.post(f"{self.url}/score", data=body, timeout=self.timeout_s,
                                          headers={"Content-Type": content_type})
            except requests.Timeout:
                last = f"no reply within reward.timeout_s={self.timeout_s:g} s"
                continue
            except requests.RequestException as exc:
                last = _cause(exc)
                continue
            if reply.status_code == 429:  # the server's queue is full: come back when it says
                try:
                    retry_after = min(float(reply.headers.get("Retry-After", 0)), self.timeout_s)
                except ValueError:
                    retry_after = 0.0
                last = f"HTTP 429: {_error_text(reply)}"
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
        if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
            raise RewardError(f"reward server {self.url} replied with rewards that are not numbers: {str(values)[:200]}")
        values = [math.nan if v is None else v for v in values]  # null: a non-finite reward (JSON has no NaN)
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
