"""In-process cost of a refusal and of an admission, ASGI and WSGI side by side (issue 13).

    python benchmarks/bench_refusal.py [--requests 20000] [--reps 5] [--cold 1000]

Four apps per protocol, each driven in process (no server, no sockets), interleaved repetition
by repetition so that drift on a shared machine hits them all alike:

- ``floor``: a hand-written app that sends the same 503 + Retry-After + JSON body shedder
  sends (pre-encoded once): the least a refusal can cost.
- ``refusal``: ``LoadSheddingMiddleware`` with a full throttler (one slot, held for the whole
  run) and ``max_queue=0``: every request is refused at once.
- ``pass-through``: a plain middleware (ASGI: wraps ``send`` in a closure; WSGI: wraps
  ``start_response``) around an app that answers 200.
- ``admitted``: ``LoadSheddingMiddleware`` around the same 200 app with free slots (the fast
  path).

Each repetition gives µs/request for every app; ratios (refusal / floor, admitted -
pass-through) are taken within a repetition, then the median over repetitions is reported.
Targets: refusal <= 3x the floor, admitted <= 2 µs over the pass-through.

Cold start: a fresh interpreter per repetition (a subprocess) times the first ``--cold``
requests through a freshly constructed refusing middleware, against the floor's first
``--cold`` in the same interpreter: what the first requests after a deploy pay.

The ASGI ``receive`` behaves like a server's: the request message once, then it blocks until
the client disconnects (never, here), so a middleware that watches for disconnects pays for
that the way it does under uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if str(SRC) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(SRC))

import shedder.asgi  # noqa: E402
import shedder.wsgi  # noqa: E402
from bench_asgi_overhead import PassThrough as AsgiPassThrough  # noqa: E402  (its baseline)


def _captured_refusal() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The exact refusal shedder's ASGI middleware sends (one slot held, max_queue=0), so the
    hand-written floor sends byte-for-byte the same, whatever the adapter's encoding becomes."""
    middleware = shedder.asgi.LoadSheddingMiddleware(asgi_ok, max_concurrency=1, max_queue=0)
    middleware.throttler.acquire()
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(middleware(dict(_SCOPE), receive, send))
    start, body = sent
    return start["status"], [(bytes(k), bytes(v)) for k, v in start["headers"]], body["body"]


_ASGI_200_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
}
_ASGI_200_BODY = {"type": "http.response.body", "body": b"ok"}
_WSGI_200_HEADERS = [("content-type", "text/plain"), ("content-length", "2")]


# -- ASGI apps ----------------------------------------------------------------------------------


async def asgi_floor(scope: Any, receive: Any, send: Any) -> None:
    """The hand-written 503: two pre-built messages."""
    await send(_ASGI_503_START)
    await send(_ASGI_503_BODY)


async def asgi_ok(scope: Any, receive: Any, send: Any) -> None:
    await send(_ASGI_200_START)
    await send(_ASGI_200_BODY)


def refusing_asgi() -> Any:
    """shedder's ASGI middleware with its one slot taken for good: every request refused."""
    middleware = shedder.asgi.LoadSheddingMiddleware(asgi_ok, max_concurrency=1, max_queue=0)
    middleware.throttler.acquire()  # held for the whole run, never released
    return middleware


def admitting_asgi() -> Any:
    return shedder.asgi.LoadSheddingMiddleware(asgi_ok, max_concurrency=64, max_queue=64)


_SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench")],
    "client": ("127.0.0.1", 40000),
    "server": ("127.0.0.1", 8000),
}
_REQUEST = {"type": "http.request", "body": b"", "more_body": False}

_STATUS, _HEADERS_503, _BODY_503 = _captured_refusal()
_ASGI_503_START = {"type": "http.response.start", "status": _STATUS, "headers": _HEADERS_503}
_ASGI_503_BODY = {"type": "http.response.body", "body": _BODY_503}
_WSGI_503_STATUS = "503 Service Unavailable"
_WSGI_503_HEADERS = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in _HEADERS_503]


async def asgi_per_request(app: Any, requests: int) -> float:
    """µs per request of ``app``, each with a fresh scope and a server-like receive/send."""
    never = asyncio.get_running_loop().create_future()  # the client never disconnects

    async def send(message: Any) -> None:
        pass

    started = time.perf_counter()
    for _ in range(requests):
        delivered = False

        async def receive() -> Any:
            nonlocal delivered
            if not delivered:
                delivered = True
                return _REQUEST
            return await asyncio.shield(never)  # like uvicorn: wait for a disconnect

        await app(dict(_SCOPE), receive, send)
    elapsed = time.perf_counter() - started
    # Let cancelled watcher tasks (if any) finish, outside the timed part.
    await asyncio.sleep(0)
    return elapsed / requests * 1e6


# -- WSGI apps ----------------------------------------------------------------------------------


def wsgi_floor(environ: Any, start_response: Any) -> Iterable[bytes]:
    start_response(_WSGI_503_STATUS, _WSGI_503_HEADERS)
    return [_BODY_503]


def wsgi_ok(environ: Any, start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", _WSGI_200_HEADERS)
    return [b"ok"]


class WsgiPassThrough:
    """A plain WSGI middleware: wraps start_response in a closure that notes the status."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        seen: list[str] = []

        def wrapped_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            seen.append(status)
            return start_response(status, headers, exc_info)

        return self.app(environ, wrapped_start_response)  # type: ignore[no-any-return]


def refusing_wsgi() -> Any:
    middleware = shedder.wsgi.LoadSheddingMiddleware(wsgi_ok, max_concurrency=1, max_queue=0)
    middleware.throttler.acquire()
    return middleware


def admitting_wsgi() -> Any:
    return shedder.wsgi.LoadSheddingMiddleware(wsgi_ok, max_concurrency=64, max_queue=64)


_ENVIRON = {
    "REQUEST_METHOD": "GET",
    "SCRIPT_NAME": "",
    "PATH_INFO": "/",
    "QUERY_STRING": "",
    "SERVER_NAME": "127.0.0.1",
    "SERVER_PORT": "8000",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "HTTP_HOST": "127.0.0.1:8000",
    "HTTP_USER_AGENT": "bench",
    "REMOTE_ADDR": "127.0.0.1",
    "wsgi.version": (1, 0),
    "wsgi.url_scheme": "http",
    "wsgi.multithread": True,
    "wsgi.multiprocess": False,
    "wsgi.run_once": False,
}


def wsgi_per_request(app: Any, requests: int) -> float:
    """µs per request: a fresh environ, start_response, the body iterated, close() called."""

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
        return _write

    started = time.perf_counter()
    for _ in range(requests):
        result = app(dict(_ENVIRON), start_response)
        for _chunk in result:
            pass
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return (time.perf_counter() - started) / requests * 1e6


def _write(data: bytes) -> None:
    pass


# -- the run ------------------------------------------------------------------------------------

NAMES = ("floor", "refusal", "pass-through", "admitted")


def warm_run(requests: int, reps: int) -> dict[str, dict[str, list[float]]]:
    """Per protocol and app, µs/request of each repetition (apps interleaved within each)."""
    asgi_apps = {
        "floor": asgi_floor,
        "refusal": refusing_asgi(),
        "pass-through": AsgiPassThrough(asgi_ok),
        "admitted": admitting_asgi(),
    }
    wsgi_apps = {
        "floor": wsgi_floor,
        "refusal": refusing_wsgi(),
        "pass-through": WsgiPassThrough(wsgi_ok),
        "admitted": admitting_wsgi(),
    }
    samples: dict[str, dict[str, list[float]]] = {
        "asgi": {n: [] for n in NAMES},
        "wsgi": {n: [] for n in NAMES},
    }

    async def asgi_rounds() -> None:
        for app in asgi_apps.values():  # warm up
            await asgi_per_request(app, max(100, requests // 10))
        for _ in range(reps):
            for name, app in asgi_apps.items():
                samples["asgi"][name].append(await asgi_per_request(app, requests))
            for name, wapp in wsgi_apps.items():  # WSGI in the same repetition: same drift
                samples["wsgi"][name].append(wsgi_per_request(wapp, requests))

    for wapp in wsgi_apps.values():
        wsgi_per_request(wapp, max(100, requests // 10))
    asyncio.run(asgi_rounds())
    return samples


def cold_child(protocol: str, requests: int) -> dict[str, float]:
    """In a fresh interpreter: the first ``requests`` refusals of a fresh middleware, and the
    floor's first ``requests``, alternating which goes first by the parent's choice."""
    order = os.environ.get("BENCH_COLD_ORDER", "floor-first")
    result: dict[str, float] = {}
    if protocol == "asgi":

        async def go() -> None:
            steps = ["floor", "refusal"] if order == "floor-first" else ["refusal", "floor"]
            for step in steps:
                if step == "floor":
                    result["floor"] = await asgi_per_request(asgi_floor, requests)
                else:
                    built = time.perf_counter()
                    app = refusing_asgi()
                    result["construct_us"] = (time.perf_counter() - built) * 1e6
                    result["refusal"] = await asgi_per_request(app, requests)

        asyncio.run(go())
    else:
        steps = ["floor", "refusal"] if order == "floor-first" else ["refusal", "floor"]
        for step in steps:
            if step == "floor":
                result["floor"] = wsgi_per_request(wsgi_floor, requests)
            else:
                built = time.perf_counter()
                app = refusing_wsgi()
                result["construct_us"] = (time.perf_counter() - built) * 1e6
                result["refusal"] = wsgi_per_request(app, requests)
    return result


def cold_run(requests: int, reps: int) -> dict[str, list[dict[str, float]]]:
    runs: dict[str, list[dict[str, float]]] = {"asgi": [], "wsgi": []}
    for rep in range(reps):
        for protocol in ("asgi", "wsgi"):
            env = dict(os.environ, BENCH_COLD_ORDER=("floor-first", "refusal-first")[rep % 2])
            out = subprocess.run(
                [sys.executable, __file__, "--cold-child", protocol, "--cold", str(requests)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            runs[protocol].append(json.loads(out.stdout))
    return runs


def _median(values: list[float]) -> float:
    return statistics.median(values)


def report(samples: dict[str, dict[str, list[float]]], cold: Any, args: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    print(
        f"Python {sys.version.split()[0]}, in process, {args.reps} interleaved repetitions x "
        f"{args.requests} requests; load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print("medians of the repetitions; ratios taken within each repetition\n")
    header = f"{'':<6}{'app':<14}{'µs/request':>12}{'vs floor':>10}{'vs pass-through':>18}"
    print(header)
    for protocol, apps in samples.items():
        floor, through = apps["floor"], apps["pass-through"]
        rows: dict[str, Any] = {}
        for name in NAMES:
            values = apps[name]
            vs_floor = _median([v / f for v, f in zip(values, floor, strict=True)])
            vs_through = _median([v - p for v, p in zip(values, through, strict=True)])
            rows[name] = {
                "us": round(_median(values), 3),
                "us_all": [round(v, 3) for v in values],
                "vs_floor": round(vs_floor, 2),
                "minus_pass_through_us": round(vs_through, 3),
            }
            print(
                f"{protocol:<6}{name:<14}{_median(values):>12.2f}{vs_floor:>9.2f}x"
                f"{vs_through:>+14.2f} µs"
            )
        refusal_ratio = rows["refusal"]["vs_floor"]
        fast_extra = rows["admitted"]["minus_pass_through_us"]
        rows["targets"] = {
            "refusal_le_3x_floor": refusal_ratio <= 3.0,
            "admitted_le_2us_over_pass_through": fast_extra <= 2.0,
        }
        print(
            f"{'':<6}-> refusal {refusal_ratio:.2f}x the floor "
            f"({'meets' if refusal_ratio <= 3 else 'MISSES'} <= 3x); admitted "
            f"{fast_extra:+.2f} µs over pass-through "
            f"({'meets' if fast_extra <= 2 else 'MISSES'} <= 2 µs)"
        )
        out[protocol] = rows
    if cold:
        print(f"\ncold start: the first {args.cold} requests, fresh interpreter and middleware")
        print(f"{'':<6}{'floor µs':>10}{'refusal µs':>12}{'ratio':>8}{'construct µs':>14}")
        for protocol, runs in cold.items():
            ratio = _median([r["refusal"] / r["floor"] for r in runs])
            floor = _median([r["floor"] for r in runs])
            refusal = _median([r["refusal"] for r in runs])
            construct = _median([r["construct_us"] for r in runs])
            print(f"{protocol:<6}{floor:>10.2f}{refusal:>12.2f}{ratio:>7.2f}x{construct:>14.0f}")
            out.setdefault("cold", {})[protocol] = {
                "floor_us": round(floor, 3),
                "refusal_us": round(refusal, 3),
                "ratio": round(ratio, 2),
                "construct_us": round(construct, 1),
                "runs": runs,
            }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="per app per repetition")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (>= 3)")
    parser.add_argument("--cold", type=int, default=1000, help="requests of the cold-start line")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-start line")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--cold-child", choices=("asgi", "wsgi"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold_child:
        print(json.dumps(cold_child(args.cold_child, args.cold)))
        return 0
    if args.reps < 3:
        parser.error("--reps must be >= 3: medians of fewer say little on a shared machine")
    samples = warm_run(args.requests, args.reps)
    cold = None if args.no_cold else cold_run(args.cold, args.reps)
    figures = report(samples, cold, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"load_average": os.getloadavg(), **figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
