"""The ASGI disconnect watch holds bounded memory, not only bounded bytes (issue 19, item 4).

A queued request watches ``receive()`` for a disconnect and buffers the body it takes. Buffering
a dict per message let a body trickled in one-byte messages pin ~245 bytes per byte (12.3 MiB
in process; 62.5 MiB for four uploads under uvicorn). The watch now coalesces what it takes
into one buffer and counts each message's overhead against :data:`WATCH_BODY_LIMIT`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from shedder.asgi import WATCH_BODY_LIMIT, LoadSheddingMiddleware
from tests.support.net import wait_for
from tests.support.servers import StartServer, python_server

Message = dict[str, Any]

TRICKLE = 5_000  # one-byte body messages
BIG = 128_000  # one message this large
BOUND = 100 * 1024  # what the watch of one request may hold, bytes, with room for asyncio


class GatedApp:
    """Holds ``/hold`` until ``gate`` opens; any other path reads its body and answers it."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/hold":
            self.started.set()
            await self.gate.wait()
        else:
            body = bytearray()
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    break
            self.bodies.append(bytes(body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})


def scope(path: str, method: str = "GET") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/octet-stream")],
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1234),
    }


async def no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def trickle(
    count: int, on_call: Callable[[int], None] = lambda n: None
) -> tuple[Callable[[], Awaitable[Message]], list[int]]:
    """A ``receive`` handing out ``count`` one-byte messages (fresh dicts, built on demand, so
    that tracemalloc sees what is kept), then the end of the body. ``on_call(n)`` is told of
    the n-th call."""
    calls = [0]

    async def receive() -> Message:
        calls[0] += 1
        on_call(calls[0])
        n = calls[0]
        if n <= count:
            return {"type": "http.request", "body": bytes([n % 256]), "more_body": True}
        return {"type": "http.request", "body": b"", "more_body": False}

    return receive, calls


async def queued_behind_a_held_slot(
    receive: Callable[[], Awaitable[Message]], queue_timeout: float, app: GatedApp | None = None
) -> tuple[int, int, list[int]]:
    """Run one upload while ``/hold`` keeps the only slot; return (traced peak growth in bytes
    over the upload, its status, every status sent) and release the hold afterwards."""
    app = app or GatedApp()
    mw = LoadSheddingMiddleware(app, max_concurrency=1, max_queue=1, queue_timeout=queue_timeout)
    sent: list[Message] = []

    async def send(message: Any) -> None:
        sent.append(dict(message))

    hold = asyncio.create_task(mw(scope("/hold"), no_body, send))
    await app.started.wait()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        await mw(scope("/upload", "POST"), receive, send)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    app.gate.set()
    await hold
    statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert mw.throttler.in_flight == 0
    assert mw.throttler.queued == 0
    return peak, statuses[0], statuses


async def test_a_trickled_upload_waiting_in_the_queue_holds_bounded_memory() -> None:
    # Refused after queue_timeout (long enough to take all 5,000 messages if it would):
    # everything the watch took stayed in it meanwhile.
    receive, calls = trickle(TRICKLE)
    peak, status, _ = await queued_behind_a_held_slot(receive, queue_timeout=1.0)
    assert status == 503
    assert peak < BOUND, f"the watch of one queued upload held {peak} bytes"
    # It stopped reading once messages and bytes reached the budget; one dict per message
    # (the old behaviour) read all 5,000 and held ~1.2 MB.
    assert calls[0] <= WATCH_BODY_LIMIT // 200


async def test_a_trickled_upload_admitted_while_watched_gets_its_body_in_order() -> None:
    app = GatedApp()

    def open_the_gate_midway(n: int) -> None:
        if n == 100:  # the watch has taken 99 one-byte messages by now
            app.gate.set()

    receive, calls = trickle(TRICKLE, open_the_gate_midway)
    _, _, statuses = await queued_behind_a_held_slot(receive, queue_timeout=30, app=app)
    assert statuses == [200, 200]
    assert app.bodies == [bytes(n % 256 for n in range(1, TRICKLE + 1))]
    assert calls[0] == TRICKLE + 1


async def test_one_large_message_is_replayed_whole() -> None:
    app = GatedApp()
    big = bytes(range(256)) * (BIG // 256)
    calls = [0]

    async def receive() -> Message:
        calls[0] += 1
        if calls[0] == 1:
            loop = asyncio.get_running_loop()
            loop.call_soon(app.gate.set)  # admitted once the watch took the message
            return {"type": "http.request", "body": big, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the client waits for its answer
        raise AssertionError("unreachable")

    _, _, statuses = await queued_behind_a_held_slot(receive, queue_timeout=30, app=app)
    assert statuses == [200, 200]
    assert app.bodies == [big]


async def test_one_large_message_is_not_copied_while_queued() -> None:
    async def receive() -> Message:
        calls[0] += 1
        if calls[0] == 1:
            return {"type": "http.request", "body": b"y" * BIG, "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    calls = [0]
    peak, status, _ = await queued_behind_a_held_slot(receive, queue_timeout=0.2)
    assert status == 503
    # The message itself (the server made it) plus at most the watch's budget.
    assert peak < BIG + WATCH_BODY_LIMIT, f"held {peak} bytes for one {BIG}-byte message"


# -- under real uvicorn ------------------------------------------------------------------------

UPLOADS = 4
SERVER_TRICKLE = 2_000  # one-byte sends per upload


def _mem(client: httpx.Client, reset: bool = False) -> dict[str, int]:
    report: dict[str, int] = client.get("/mem?reset" if reset else "/mem").json()
    return report


def _settled(client: httpx.Client) -> Callable[[], bool]:
    """True once the server has pulled no more body messages since the last call."""
    last = [-1]

    def settled() -> bool:
        pulled = _mem(client)["pulled"]
        done = pulled == last[0]
        last[0] = pulled
        return done

    return settled


def _load(client: httpx.Client) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(client.get("/health/load").content)
    return body


@pytest.mark.server
def test_trickled_uploads_queued_under_uvicorn_hold_bounded_memory(server: StartServer) -> None:
    app = python_server("uvicorn", "tests.web.asgi_watch_server_app:app")
    base_url = server(app, ready="/health/live").url
    with httpx.Client(base_url=base_url, timeout=30) as client:
        held: list[httpx.Response] = []
        holder = threading.Thread(target=lambda: held.append(client.get("/hold")))
        holder.start()
        host, port = base_url.removeprefix("http://").split(":")
        sockets = []
        try:
            assert wait_for(lambda: _load(client)["in_flight"] == 1)
            for _ in range(UPLOADS):
                sock = socket.create_connection((host, int(port)), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(
                    b"POST /upload HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n" % SERVER_TRICKLE
                )
                sockets.append(sock)
            assert wait_for(lambda: _load(client)["queued"] == UPLOADS)
            before = _mem(client, reset=True)
            for _ in range(SERVER_TRICKLE):
                for sock in sockets:
                    sock.send(b"x")
                # A slow client: one byte per upload per round, so that the server reads
                # (and makes a message of) each byte rather than a batch.
                time.sleep(0.0005)
            # Every byte is sent; wait until the server has taken what it will take.
            assert wait_for(_settled(client))
            after = _mem(client)
            grown = after["peak"] - before["current"]
            assert grown < UPLOADS * BOUND, f"{UPLOADS} queued uploads held {grown} bytes"
            # Whatever uvicorn made of the trickle, the watches stopped taking messages at
            # their budget (about 250 one-byte messages each).
            assert after["pulled"] <= UPLOADS * (WATCH_BODY_LIMIT // 200)
        finally:
            client.get("/release")
            holder.join(timeout=30)
            answers = []
            for sock in sockets:
                with sock, sock.makefile("rb") as reply:
                    answers.append(reply.read())  # to the end: Connection: close
        assert held[0].status_code == 200
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 200")
            assert answer.endswith(b"\r\n\r\n%d" % SERVER_TRICKLE)
        assert wait_for(lambda: (_load(client)["in_flight"], _load(client)["queued"]) == (0, 0))
