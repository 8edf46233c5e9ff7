"""Per-request overhead of shedder's ASGI middleware on a trivial route.

In process (µs per request, same run, interleaved rounds): the bare app, the app behind a plain
pass-through ASGI middleware (it wraps ``send`` in a closure, as most middlewares do), and the
app behind ``shedder.asgi.LoadSheddingMiddleware`` (fast path: a free slot). Then end to end:
the same three apps under uvicorn on 127.0.0.1, driven by httpx clients.

    python benchmarks/bench_asgi_overhead.py                 # both parts
    python benchmarks/bench_asgi_overhead.py --no-server     # in process only

The target: at most 2 µs per request more than the pass-through middleware.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if str(SRC) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(SRC))

from shedder._demo.servers import ServerProcess  # noqa: E402
from shedder.asgi import LoadSheddingMiddleware  # noqa: E402

_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
_BODY = {"type": "http.response.body", "body": b"ok"}


async def bare_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return  # lifespan: nothing to start
    await send(_START)
    await send(_BODY)


class PassThrough:
    """A plain pure-ASGI middleware: wraps send in a closure that looks at each message."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def wrapped_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, receive, wrapped_send)


passthrough_app = PassThrough(bare_app)
shedder_app = LoadSheddingMiddleware(bare_app, max_concurrency=64, max_queue=64)
APPS = {"bare": bare_app, "pass-through": passthrough_app, "shedder": shedder_app}


# -- in process ---------------------------------------------------------------------------------


async def _per_request(app: Any, requests: int) -> float:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [],
        "query_string": b"",
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    started = time.perf_counter()
    for _ in range(requests):
        await app(dict(scope), receive, send)
    return (time.perf_counter() - started) / requests * 1e6


async def in_process(requests: int, rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in APPS}
    for app in APPS.values():  # warm up
        await _per_request(app, requests // 10)
    for _ in range(rounds):
        for name, app in APPS.items():  # interleaved, so drift hits all three alike
            samples[name].append(await _per_request(app, requests))
    # The fastest round: on a shared machine, noise only ever adds time (as timeit advises).
    return {name: min(values) for name, values in samples.items()}


# -- under uvicorn ------------------------------------------------------------------------------


async def _drive(url: str, requests: int, concurrency: int) -> tuple[float, float]:
    import httpx

    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        for _ in range(50):  # warm up connections
            await client.get("/")
        remaining = requests

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                response = await client.get("/")
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    raise RuntimeError(f"unexpected {response.status_code}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return requests / elapsed, statistics.median(latencies) * 1e3


def under_uvicorn(name: str, requests: int, concurrency: int) -> tuple[float, float]:
    target = {"bare": "bare_app", "pass-through": "passthrough_app", "shedder": "shedder_app"}
    command = [sys.executable, "-m", "uvicorn", f"bench_asgi_overhead:{target[name]}"]
    command += ["--app-dir", str(HERE), "--host", "127.0.0.1", "--log-level", "warning"]
    command += ["--no-access-log", "--port"]
    with ServerProcess(lambda port: [*command, str(port)], ready="/") as server:
        return asyncio.run(_drive(server.url, requests, concurrency))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000, help="per in-process round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-server", action="store_true", help="skip the uvicorn part")
    parser.add_argument("--server-requests", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    print(f"Python {sys.version.split()[0]}, in process, {args.rounds} rounds")
    print(f"x {args.requests} requests (fastest round)")
    results = asyncio.run(in_process(args.requests, args.rounds))
    bare, passthrough = results["bare"], results["pass-through"]
    print(f"{'app':<14}{'µs/request':>12}{'vs bare':>10}{'vs pass-through':>18}")
    for name, micros in results.items():
        print(
            f"{name:<14}{micros:>12.2f}{micros / bare:>9.2f}x"
            f"{micros - passthrough:>+14.2f} µs ({micros / passthrough:.2f}x)"
        )
    extra = results["shedder"] - passthrough
    verdict = "within" if extra <= 2.0 else "OVER"
    print(f"shedder costs {extra:+.2f} µs/request over the pass-through: {verdict} the 2 µs target")

    if args.no_server:
        return
    print(
        f"\nunder uvicorn (1 worker), httpx, {args.server_requests} requests, "
        f"{args.concurrency} connections; the client shares the CPU with the server"
    )
    print(f"{'app':<14}{'req/s':>10}{'median ms':>12}")
    for name in APPS:
        rate, median_ms = under_uvicorn(name, args.server_requests, args.concurrency)
        print(f"{name:<14}{rate:>10.0f}{median_ms:>12.2f}")


if __name__ == "__main__":
    main()
