"""``diffrl-fast reward-server --reward NAME [--kwargs JSON] [--host 127.0.0.1] [--port 8000] [--max-batch 64]``:
serve a registered or dotted-path reward over HTTP (protocol: diffrl_fast/rewards/remote.py) for trainers that set
``reward.name=http://HOST:PORT``. Concurrent requests are merged into reward calls of up to --max-batch images
(dynamic batching); a full queue answers 429 with Retry-After; GET /health and GET /metrics (Prometheus) answer
while a batch is scored. Bound beyond loopback it needs --token-file. Stop it with Ctrl-C."""
from __future__ import annotations

import json
from typing import Optional

from ..cli import ArgumentParser, UsageError


def main(argv: list[str]) -> int:
    from ..rewards.remote import WAIT_MODES

    ap = ArgumentParser(prog="diffrl-fast reward-server", description=__doc__)
    ap.add_argument("--reward", required=True, help="a registered reward name or package.module:function")
    ap.add_argument("--kwargs", default="{}", help="JSON keyword arguments of the reward factory (default: {})")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface, which needs --token-file)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000; 0: a free port, printed when listening)")
    ap.add_argument("--max-batch", type=int, default=64, help="most images per reward call and per request (default: 64)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="how long the oldest waiting request may wait for others to fill a batch (default: 5)")
    ap.add_argument("--wait", choices=WAIT_MODES, default="adaptive",
                    help="adaptive (default): wait no longer than the reward's fixed cost per call (estimated from recent calls) and "
                         "only until every client (open connection) seen in the last 120 s has a request queued, so a lone "
                         "client, or a reward whose cost is all per image, pays no wait; fixed: wait for a full batch or "
                         "--max-wait-ms")
    ap.add_argument("--no-batching", action="store_true", help="one request per reward call, in arrival order (no merging)")
    ap.add_argument("--max-queue", type=int, default=256, help="waiting requests before new ones get 429 with Retry-After (default: 256)")
    ap.add_argument("--request-timeout-s", type=float, default=600.0, help="a request still waiting this long gets 503 (default: 600)")
    ap.add_argument("--max-side", type=int, default=2048, help="largest image side in pixels; with --max-batch it bounds the request body (default: 2048)")
    ap.add_argument("--max-frames", type=int, default=81, help="a video reward's largest frame count; with --max-batch and --max-side it bounds "
                                                              "the request body (default: 81, Wan2.1's)")
    ap.add_argument("--token-file", default=None, help="a file holding a shared token: every request must send 'Authorization: Bearer <token>' "
                                                       "(trainers: reward.token_file); required unless --host is loopback")
    args = ap.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--kwargs is not JSON ({exc}); e.g. --kwargs '{{\"clip_path\": \"/models/clip\"}}'") from None
    if not isinstance(kwargs, dict):
        raise UsageError("--kwargs must be a JSON object")
    if args.max_batch < 1 or not 0 <= args.port < 65536 or args.max_queue < 1 or args.max_side < 1 or args.max_frames < 1:
        raise UsageError("--max-batch, --max-queue, --max-side and --max-frames must be >= 1 and --port in 0..65535 (0: a free "
                         "port, printed)")
    if args.max_wait_ms < 0 or args.request_timeout_s <= 0:
        raise UsageError("--max-wait-ms must be >= 0 and --request-timeout-s > 0")
    if args.reward.startswith(("http://", "https://")):
        raise UsageError("--reward names the reward to serve (a registered name or package.module:function), not a URL")
    from ..rewards import RewardError, read_token
    from ..rewards.remote import LOOPBACK

    token = None
    try:
        if args.token_file:
            token = read_token(args.token_file)
    except RewardError as exc:
        raise UsageError(str(exc)) from None
    if token is None and args.host not in LOOPBACK:
        raise UsageError(f"--host {args.host} accepts connections from other machines: give --token-file FILE (a shared "
                         "token the trainers send from reward.token_file), or bind to 127.0.0.1")
    try:
        serve(args.reward, kwargs=kwargs, host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
              batching=not args.no_batching, wait=args.wait, max_queue=args.max_queue, request_timeout_s=args.request_timeout_s,
              max_side=args.max_side, max_frames=args.max_frames, token=token, print_fn=lambda s: print(s, flush=True))
    except RewardError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; pick another --port") from None
    return 0


def serve(reward: str, *, kwargs: Optional[dict] = None, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 64,
          print_fn=print, **options) -> None:
    """Serve the registered or dotted-path reward ``reward`` (rewards.remote.make_app, with ``options``: max_wait_ms,
    wait, batching, max_queue, request_timeout_s, max_side, max_frames, token) on http://host:port until interrupted (port 0: a free
    port, printed)."""
    import asyncio
    import signal

    from .._extras import require
    from ..rewards import get_reward
    from ..rewards.remote import make_app

    web = require("aiohttp.web", "the reward server")
    fn = get_reward(reward, **(kwargs or {}))
    app = make_app(fn, reward, max_batch, **options)

    async def main():
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1] if port == 0 else port
        batching = "off" if options.get("batching") is False else f"up to {max_batch} images, {options.get('wait', 'adaptive')} wait of up to {options.get('max_wait_ms', 5.0):g} ms"
        access = "a bearer token required (--token-file)" if options.get("token") else "no token (loopback only)"
        print_fn(f"serving reward {reward!r} on http://{host}:{bound} (max batch {max_batch}; dynamic batching {batching}; "
                 f"{access}); stop with Ctrl-C")
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
