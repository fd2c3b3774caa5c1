"""``diffrl-fast reward-server --reward NAME [--kwargs JSON] [--host 127.0.0.1] [--port 8000] [--max-batch 64]``:
serve a registered or dotted-path reward over HTTP (protocol: diffrl_fast/rewards/remote.py) for trainers that set
``reward.name=http://HOST:PORT``. GET /health answers while a batch is scored; stop it with Ctrl-C."""
from __future__ import annotations

import json
from typing import Optional

from ..cli import ArgumentParser, UsageError


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="diffrl-fast reward-server", description=__doc__)
    ap.add_argument("--reward", required=True, help="a registered reward name or package.module:function")
    ap.add_argument("--kwargs", default="{}", help="JSON keyword arguments of the reward factory (default: {})")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000; 0: a free port, printed when listening)")
    ap.add_argument("--max-batch", type=int, default=64, help="most images per request (default: 64); clients send batches of at most this")
    args = ap.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--kwargs is not JSON ({exc}); e.g. --kwargs '{{\"clip_path\": \"/models/clip\"}}'") from None
    if not isinstance(kwargs, dict):
        raise UsageError("--kwargs must be a JSON object")
    if args.max_batch < 1 or not 0 <= args.port < 65536:
        raise UsageError("--max-batch must be >= 1 and --port in 0..65535 (0: a free port, printed)")
    if args.reward.startswith(("http://", "https://")):
        raise UsageError("--reward names the reward to serve (a registered name or package.module:function), not a URL")
    from ..rewards import RewardError

    try:
        serve(args.reward, kwargs=kwargs, host=args.host, port=args.port, max_batch=args.max_batch,
              print_fn=lambda s: print(s, flush=True))
    except RewardError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; pick another --port") from None
    return 0


def serve(reward: str, *, kwargs: Optional[dict] = None, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 64,
          print_fn=print) -> None:
    """Serve the registered or dotted-path reward ``reward`` (rewards.remote.make_app) on http://host:port until
    interrupted (port 0: a free port, printed)."""
    import asyncio
    import signal

    from .._extras import require
    from ..rewards import get_reward
    from ..rewards.remote import make_app

    web = require("aiohttp.web", "the reward server")
    fn = get_reward(reward, **(kwargs or {}))
    app = make_app(fn, reward, max_batch)

    async def main():
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1] if port == 0 else port
        print_fn(f"serving reward {reward!r} on http://{host}:{bound} (max batch {max_batch}); stop with Ctrl-C")
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
