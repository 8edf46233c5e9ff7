"""Fault-injection soak: many requests with random faults through both middlewares under real
servers, then check that no slot leaked and the server's memory stayed put (issue 19).

    python benchmarks/soak.py                       # 60,000 requests per server (~2-4 min)
    python benchmarks/soak.py --requests 5000       # a quick look

Servers on 127.0.0.1 only: uvicorn (shedder.asgi.LoadSheddingMiddleware, 8 slots, queue 16)
and gunicorn gthread with 8 threads (shedder.wsgi.LoadSheddingMiddleware, 3 slots, queue 2),
one worker each. A raw-socket asyncio client keeps 32 connections busy, each request one of:

- ``ok``, ``slow`` (a 0-20 ms handler, so requests queue and are shed), ``upload`` (4 KiB);
- app faults: ``raise_before`` (before the response starts), ``raise_after`` (after it ended),
  ``raise_mid`` (mid-body), ``early_return`` (returns without a response), ``stream`` (20
  chunks);
- client faults: ``leave_queued`` (closes 1 ms after sending a slow request: it is often still
  queued), ``leave_running`` (closes while a 50 ms handler runs), ``leave_uploading`` (sends half
  of a declared body, then closes), ``abort_stream`` (reads the first bytes of a stream, then
  resets the connection), ``slow_client`` (sends its request a few bytes at a time, then reads
  the answer slowly).

After the run it waits (at most 10 s) for in-flight work to drain and reads ``/health/load``:
``in_flight`` and ``queued`` must be 0. The server's RSS is read from its own ``/proc`` (an
exempt endpoint of the app) after a warm-up and at the end. It stops by itself; every request
has a 10 s client timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if str(SRC) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(SRC))

from shedder._demo.servers import ServerProcess  # noqa: E402
from shedder.asgi import LoadSheddingMiddleware as ASGIMiddleware  # noqa: E402
from shedder.wsgi import LoadSheddingMiddleware as WSGIMiddleware  # noqa: E402

CHUNK = b"x" * 256
UPLOAD = 4096
CLIENT_TIMEOUT = 10.0


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _delay(path: str) -> float:
    return 0.05 if path == "/running" else random.uniform(0.0, 0.02)


# -- the ASGI app (uvicorn) --------------------------------------------------------------------


async def _asgi_inner(scope: Any, receive: Any, send: Any) -> None:
    path = scope["path"]

    async def start(status: int = 200, length: int | None = None) -> None:
        headers = [] if length is None else [(b"content-length", str(length).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(data: bytes, more: bool = False) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": more})

    if path == "/rss":
        rss = str(_rss_kib()).encode()
        await start(length=len(rss))
        await body(rss)
    elif path in ("/slow", "/running"):
        await asyncio.sleep(_delay(path))
        await start()
        await body(b"slow")
    elif path == "/upload":
        length = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            length += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await start()
        await body(str(length).encode())
    elif path == "/raise_before":
        raise RuntimeError("soak: before the response")
    elif path == "/raise_after":
        await start()
        await body(b"done")
        raise RuntimeError("soak: after the response")
    elif path == "/raise_mid":
        await start()
        await body(CHUNK, more=True)
        raise RuntimeError("soak: mid-body")
    elif path == "/early_return":
        return
    elif path == "/stream":
        await start()
        for _ in range(20):
            await body(CHUNK, more=True)
            await asyncio.sleep(0)
        await body(b"")
    else:
        await start()
        await body(b"ok")


asgi_app = ASGIMiddleware(
    _asgi_inner, max_concurrency=8, max_queue=16, queue_timeout=0.5, exempt=["/rss"]
)


# -- the WSGI app (gunicorn gthread) -----------------------------------------------------------


def _wsgi_inner(environ: Any, start_response: Any) -> Iterator[bytes] | list[bytes]:
    path = environ.get("PATH_INFO", "/")
    headers = [("Content-Type", "text/plain")]
    if path == "/rss":
        rss = str(_rss_kib()).encode()
        start_response("200 OK", [*headers, ("Content-Length", str(len(rss)))])
        return [rss]
    if path in ("/slow", "/running"):
        time.sleep(_delay(path))
        start_response("200 OK", headers)
        return [b"slow"]
    if path == "/upload":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        data = environ["wsgi.input"].read(length)
        start_response("200 OK", headers)
        return [str(len(data)).encode()]
    if path == "/raise_before":
        raise RuntimeError("soak: before the response")
    if path == "/raise_after":

        def after() -> Iterator[bytes]:
            yield b"done"
            raise RuntimeError("soak: after the response")

        start_response("200 OK", [*headers, ("Content-Length", "4")])
        return after()
    if path == "/raise_mid":

        def mid() -> Iterator[bytes]:
            yield CHUNK
            raise RuntimeError("soak: mid-body")

        start_response("200 OK", headers)
        return mid()
    if path == "/early_return":
        return []  # no start_response: the server answers 500
    if path == "/stream":

        def stream() -> Iterator[bytes]:
            for _ in range(20):
                yield CHUNK

        start_response("200 OK", headers)
        return stream()
    start_response("200 OK", headers)
    return [b"ok"]


wsgi_app = WSGIMiddleware(
    _wsgi_inner, max_concurrency=3, max_queue=2, queue_timeout=0.5, exempt=["/rss"]
)


# -- the client --------------------------------------------------------------------------------


def _request(path: str, body: bytes = b"", length: int | None = None) -> bytes:
    method = b"POST" if length is not None or body else b"GET"
    head = b"%s %s HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n" % (method, path.encode())
    if length is not None or body:
        head += b"Content-Length: %d\r\n" % (len(body) if length is None else length)
    return head + b"\r\n" + body


def _status(data: bytes) -> str:
    if not data:
        return "closed without an answer"
    line = data.split(b"\r\n", 1)[0].split()
    return line[1].decode() if len(line) >= 2 else "garbled"


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0): an aborted connection, not a polite one."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()

    async def answer(self) -> str:
        try:
            data = await self.reader.read()
        finally:
            self.writer.close()
        return _status(data)


async def _plain(port: int, path: str, body: bytes = b"") -> str:
    conn = await Connection.open(port)
    conn.writer.write(_request(path, body))
    return await conn.answer()


async def _leave_after(port: int, path: str, seconds: float) -> str:
    conn = await Connection.open(port)
    conn.writer.write(_request(path))
    await conn.writer.drain()
    await asyncio.sleep(seconds)
    conn.reset()
    return "left"


async def _leave_uploading(port: int) -> str:
    conn = await Connection.open(port)
    conn.writer.write(_request("/upload", length=UPLOAD))
    conn.writer.write(b"x" * (UPLOAD // 2))
    await conn.writer.drain()
    await asyncio.sleep(0.002)
    conn.reset()
    return "left"


async def _abort_stream(port: int) -> str:
    conn = await Connection.open(port)
    conn.writer.write(_request("/stream"))
    first = await conn.reader.read(64)
    conn.reset()
    return f"{_status(first)}, aborted"


async def _slow_client(port: int) -> str:
    conn = await Connection.open(port)
    request = _request("/upload", b"y" * 64)
    for start in range(0, len(request), 16):
        conn.writer.write(request[start : start + 16])
        await conn.writer.drain()
        await asyncio.sleep(0.001)
    data = bytearray()
    while chunk := await conn.reader.read(16):
        data += chunk
        await asyncio.sleep(0.001)
    conn.writer.close()
    return _status(bytes(data))


ACTIONS: dict[str, tuple[float, Callable[[int], Awaitable[str]]]] = {
    "ok": (20, lambda port: _plain(port, "/")),
    "slow": (15, lambda port: _plain(port, "/slow")),
    "upload": (5, lambda port: _plain(port, "/upload", b"u" * UPLOAD)),
    "raise_before": (5, lambda port: _plain(port, "/raise_before")),
    "raise_after": (5, lambda port: _plain(port, "/raise_after")),
    "raise_mid": (5, lambda port: _plain(port, "/raise_mid")),
    "early_return": (5, lambda port: _plain(port, "/early_return")),
    "stream": (5, lambda port: _plain(port, "/stream")),
    "leave_queued": (8, lambda port: _leave_after(port, "/slow", 0.001)),
    "leave_running": (5, lambda port: _leave_after(port, "/running", 0.01)),
    "leave_uploading": (5, _leave_uploading),
    "abort_stream": (5, _abort_stream),
    "slow_client": (2, _slow_client),
}


async def _drive(port: int, requests: int, concurrency: int, seed: int) -> collections.Counter[str]:
    rng = random.Random(seed)
    names = list(ACTIONS)
    weights = [ACTIONS[name][0] for name in names]
    plan = rng.choices(names, weights, k=requests)
    outcomes: collections.Counter[str] = collections.Counter()
    position = 0

    async def worker() -> None:
        nonlocal position
        while position < len(plan):
            name = plan[position]
            position += 1
            try:
                outcome = await asyncio.wait_for(ACTIONS[name][1](port), CLIENT_TIMEOUT)
            except (ConnectionError, asyncio.IncompleteReadError) as error:
                outcome = type(error).__name__
            except TimeoutError:
                outcome = "client timeout"
            outcomes[f"{name}: {outcome}"] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


# -- running a server --------------------------------------------------------------------------


def _get(port: int, path: str) -> tuple[str, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_request(path))
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return _status(head), body


def _server(server: str) -> ServerProcess:
    """``server`` serving this file's app on a free port, ready once ``/health/live`` is 200."""
    if server == "uvicorn":
        command = ["uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--log-level", "critical"]
        command += ["--no-access-log", "soak:asgi_app"]
    else:
        command = ["gunicorn", "-k", "gthread", "--threads", "8", "--workers", "1"]
        command += ["--bind", "127.0.0.1:{port}", "--log-level", "critical", "soak:wsgi_app"]
    return ServerProcess(
        lambda port: [sys.executable, "-m", *(word.format(port=port) for word in command)],
        pythonpath=[HERE],
        cwd=HERE,
        ready="/health/live",
        grace=10,
    )


def _settled_load(port: int) -> dict[str, Any]:
    """``/health/load`` once nothing is in flight or queued, or after 10 s, whichever first."""
    deadline = time.monotonic() + 10
    while True:
        load: dict[str, Any] = json.loads(_get(port, "/health/load")[1])
        if (load["in_flight"], load["queued"]) == (0, 0) or time.monotonic() > deadline:
            return load
        time.sleep(0.05)


def soak(server: str, requests: int, concurrency: int, seed: int) -> dict[str, Any]:
    with _server(server) as process:
        port = process.port
        asyncio.run(_drive(port, 1000, concurrency, seed + 1))  # warm-up, not counted
        _settled_load(port)
        rss_start = int(_get(port, "/rss")[1])
        started = time.monotonic()
        outcomes = asyncio.run(_drive(port, requests, concurrency, seed))
        elapsed = time.monotonic() - started
        load = _settled_load(port)
        rss_end = int(_get(port, "/rss")[1])
        alive = process.process is not None and process.process.poll() is None
    return {
        "server": server,
        "requests": requests,
        "seconds": round(elapsed, 1),
        "in_flight_after": load["in_flight"],
        "queued_after": load["queued"],
        "admitted_total": load["admitted_total"],
        "shed_total": load["shed_total"],
        "cancelled_total": load["cancelled_total"],
        "rss_start_mib": round(rss_start / 1024, 1),
        "rss_end_mib": round(rss_end / 1024, 1),
        "server_alive": alive,
        "outcomes": dict(sorted(outcomes.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60_000, help="per server")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--servers", default="uvicorn,gunicorn")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = []
    for server in args.servers.split(","):
        result = soak(server, args.requests, args.concurrency, args.seed)
        results.append(result)
        print(f"\n== {server}: {result['requests']} requests in {result['seconds']} s")
        print(
            f"slots leaked: in_flight={result['in_flight_after']} queued={result['queued_after']}"
            f"   admitted={result['admitted_total']} shed={result['shed_total']}"
            f" cancelled={result['cancelled_total']}"
        )
        print(
            f"server RSS: {result['rss_start_mib']} MiB -> {result['rss_end_mib']} MiB;"
            f" server alive: {result['server_alive']}"
        )
        print("outcomes (action: what the client saw):")
        for outcome, count in result["outcomes"].items():
            print(f"  {count:7d}  {outcome}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    leaked = any(
        r["in_flight_after"] or r["queued_after"] or not r["server_alive"] for r in results
    )
    sys.exit(1 if leaked else 0)


if __name__ == "__main__":
    main()
