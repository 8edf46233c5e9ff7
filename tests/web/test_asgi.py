"""shedder.asgi.LoadSheddingMiddleware, in process: raw ASGI calls and Starlette over httpx."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from shedder import Overloaded, Throttler
from shedder._web.http import HTTPResponse
from shedder.asgi import WATCH_BODY_LIMIT, LoadSheddingMiddleware

Message = dict[str, Any]


def http_scope(path: str = "/", method: str = "GET", headers: Any = ()) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in headers],
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1234),
    }


class Conn:
    """One fake connection: a queue of incoming messages and a list of sent ones."""

    def __init__(self, *incoming: Message) -> None:
        self.incoming: asyncio.Queue[Message] = asyncio.Queue()
        for message in incoming:
            self.incoming.put_nowait(message)
        self.sent: list[Message] = []
        self.receive_calls = 0

    async def receive(self) -> Message:
        self.receive_calls += 1
        return await self.incoming.get()

    async def send(self, message: Any) -> None:
        self.sent.append(dict(message))

    @property
    def status(self) -> int | None:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        return starts[0]["status"] if starts else None

    @property
    def headers(self) -> dict[str, str]:
        start = next(m for m in self.sent if m["type"].endswith("response.start"))
        return {k.decode(): v.decode() for k, v in start["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"].endswith(".body"))


def empty_request() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


class GatedApp:
    """An ASGI app that records its calls and answers once its gate opens."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.calls: list[str] = []
        self.received: list[Message] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls.append(scope["path"])
        self.started.set()
        await self.gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Let the loop run until ``predicate`` holds (test helper, bounded)."""

    async def spin() -> None:
        # Yields to the loop (no sleeping) until the state under test is reached: the
        # throttler's counters have no event to wait on, and the wait is bounded below.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0)

    await asyncio.wait_for(spin(), timeout)


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


# -- configuration -------------------------------------------------------------------------------


def test_takes_a_throttler_or_its_options() -> None:
    throttler = Throttler(max_concurrency=2)
    assert LoadSheddingMiddleware(ok_app, throttler).throttler is throttler
    built = LoadSheddingMiddleware(ok_app, max_concurrency=3, max_queue=1)
    assert (built.throttler.max_concurrency, built.throttler.max_queue) == (3, 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, TypeError, "max_concurrency"),
        ({"max_queue": 3}, TypeError, "max_concurrency"),
        ({"throttler": Throttler(1), "max_concurrency": 2}, TypeError, "not both"),
        ({"throttler": "nope"}, TypeError, "shedder.Throttler"),
        ({"max_concurrency": 1, "status_code": 500}, ValueError, "503 or 429, got 500"),
        ({"max_concurrency": 1, "health_path": "health"}, ValueError, "health_path"),
        ({"max_concurrency": 1, "exempt": "/static/"}, TypeError, "single string"),
        ({"max_concurrency": 1, "health_throttlers": [1]}, TypeError, "health_throttlers"),
        ({"max_concurrency": 0}, ValueError, "max_concurrency must be >= 1"),
    ],
)
def test_configuration_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        LoadSheddingMiddleware(ok_app, **kwargs)


# -- admission -----------------------------------------------------------------------------------


async def test_admitted_request_reaches_the_app_with_its_permit() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["shedder.permit"])
        await ok_app(scope, receive, send)

    mw = LoadSheddingMiddleware(app, max_concurrency=1)
    conn = Conn(empty_request())
    await mw(http_scope("/x"), conn.receive, conn.send)
    assert conn.status == 200
    assert conn.body == b"ok"
    assert seen[0].released
    assert mw.throttler.in_flight == 0
    assert conn.receive_calls == 0  # the fast path never touches receive


async def test_refusal_is_503_with_retry_after_and_json_body() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=0, retry_after=7)
    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await ok_app(scope, receive, send)

    mw = LoadSheddingMiddleware(app, throttler)
    with throttler.acquire():
        conn = Conn(empty_request())
        await mw(http_scope("/x"), conn.receive, conn.send)
    assert conn.status == 503
    assert conn.headers["retry-after"] == "7"
    assert conn.headers["content-type"] == "application/json"
    assert int(conn.headers["content-length"]) == len(conn.body)
    assert json.loads(conn.body) == {
        "error": "overloaded",
        "reason": "queue_full",
        "retry_after": 7,
    }
    assert calls == []


@pytest.mark.parametrize(
    ("throttler_options", "options"),
    [
        ({}, {}),  # the quick lane: a full throttler refuses before any header is read
        ({}, {"priority_header": "x-priority"}),  # admit() decides, headers read first
        ({"queue_discipline": "codel"}, {}),  # no quick lane for codel
    ],
)
async def test_refusals_each_get_their_own_header_list(
    throttler_options: dict[str, Any], options: dict[str, Any]
) -> None:
    """An outer middleware that appends to a refusal's headers changes only that response."""
    throttler = Throttler(max_concurrency=1, max_queue=0, **throttler_options)
    mw = LoadSheddingMiddleware(ok_app, throttler, **options)

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        async def tagging_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"].append((b"x-request-id", b"1"))
            await send(message)

        await mw(scope, receive, tagging_send)

    with throttler.acquire():
        conns = [Conn(empty_request()) for _ in range(3)]
        for conn in conns:
            await outer(http_scope(headers=[("x-priority", "critical")]), conn.receive, conn.send)
    for conn in conns:
        assert conn.status == 503
        start = next(m for m in conn.sent if m["type"] == "http.response.start")
        assert [k for k, _ in start["headers"]].count(b"x-request-id") == 1
    assert throttler.stats().shed_total["queue_full"] == 3


async def test_full_throttler_refuses_a_request_with_an_expired_deadline_as_queue_full() -> None:
    """The quick lane refuses before reading deadlines: no deadline changes that answer."""
    throttler = Throttler(max_concurrency=1, max_queue=0)
    mw = LoadSheddingMiddleware(ok_app, throttler)
    with throttler.acquire():
        conn = Conn(empty_request())
        await mw(http_scope(headers=[("grpc-timeout", "0m")]), conn.receive, conn.send)
    assert conn.status == 503
    assert json.loads(conn.body)["reason"] == "queue_full"
    conn = Conn(empty_request())
    await mw(http_scope(headers=[("grpc-timeout", "0m")]), conn.receive, conn.send)
    assert json.loads(conn.body)["reason"] == "deadline_exceeded"  # a free slot: read first


async def test_status_code_429_and_custom_responder() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=0)

    def teapot(refusal: Overloaded) -> HTTPResponse:
        return HTTPResponse(503, (("x-why", refusal.reason),), b"busy")

    too_many = LoadSheddingMiddleware(ok_app, throttler, status_code=429)
    custom = LoadSheddingMiddleware(ok_app, throttler, responder=teapot)
    with throttler.acquire():
        first, second = Conn(empty_request()), Conn(empty_request())
        await too_many(http_scope(), first.receive, first.send)
        await custom(http_scope(), second.receive, second.send)
    assert first.status == 429
    assert "retry-after" in first.headers
    assert (second.status, second.headers, second.body) == (503, {"x-why": "queue_full"}, b"busy")


async def test_exempt_paths_are_never_throttled() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=0)
    mw = LoadSheddingMiddleware(ok_app, throttler, exempt=["/healthz", "/static/", "/files*"])
    with throttler.acquire():
        statuses = {}
        for path in ["/healthz", "/static/a.css", "/files/x", "/filesystem", "/healthz/x", "/"]:
            conn = Conn(empty_request())
            await mw(http_scope(path), conn.receive, conn.send)
            statuses[path] = conn.status
    assert statuses == {
        "/healthz": 200,
        "/static/a.css": 200,
        "/files/x": 200,
        "/filesystem": 200,
        "/healthz/x": 503,
        "/": 503,
    }


# -- holding the slot ----------------------------------------------------------------------------


async def test_slot_is_held_until_the_last_body_message_is_sent() -> None:
    middle, after_last, finish = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def streaming(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        middle.set()
        await finish.wait()
        await send({"type": "http.response.body", "body": b"b", "more_body": False})
        after_last.set()
        await asyncio.Event().wait()  # the app lingers after its response: cancelled below

    mw = LoadSheddingMiddleware(streaming, max_concurrency=1)
    conn = Conn(empty_request())
    task = asyncio.create_task(mw(http_scope(), conn.receive, conn.send))
    await middle.wait()
    assert mw.throttler.in_flight == 1  # still streaming
    finish.set()
    await after_last.wait()
    assert mw.throttler.in_flight == 0  # freed by the last body message, app still running
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert mw.throttler.stats().admitted_total == 1
    assert conn.body == b"ab"


async def test_exception_before_response_frees_the_slot_and_propagates() -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    mw = LoadSheddingMiddleware(broken, max_concurrency=1)
    conn = Conn(empty_request())
    with pytest.raises(RuntimeError, match="boom"):
        await mw(http_scope(), conn.receive, conn.send)
    assert conn.sent == []  # no 503 for an app error: the server answers 500
    assert mw.throttler.in_flight == 0


async def test_exception_after_response_started_sends_nothing_more() -> None:
    async def half(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        raise RuntimeError("midway")

    mw = LoadSheddingMiddleware(half, max_concurrency=1)
    conn = Conn(empty_request())
    with pytest.raises(RuntimeError, match="midway"):
        await mw(http_scope(), conn.receive, conn.send)
    assert [m["type"] for m in conn.sent] == ["http.response.start", "http.response.body"]
    assert mw.throttler.in_flight == 0


# -- queued requests and disconnects -------------------------------------------------------------


async def test_queued_request_whose_client_disconnects_never_runs() -> None:
    app = GatedApp()
    mw = LoadSheddingMiddleware(app, max_concurrency=1, max_queue=4, queue_timeout=30)
    holder = Conn(empty_request())
    first = asyncio.create_task(mw(http_scope("/first"), holder.receive, holder.send))
    await app.started.wait()

    queued = Conn(empty_request())
    second = asyncio.create_task(mw(http_scope("/second"), queued.receive, queued.send))
    await until(lambda: mw.throttler.queued == 1)
    queued.incoming.put_nowait({"type": "http.disconnect"})
    await second  # returns as soon as the disconnect is seen, without a slot
    assert mw.throttler.queued == 0
    assert mw.throttler.stats().cancelled_total == 1
    assert queued.sent == []

    app.gate.set()
    await first
    assert app.calls == ["/first"]
    assert mw.throttler.in_flight == 0


async def test_buffered_body_is_replayed_to_the_app_in_order() -> None:
    chunks = [
        {"type": "http.request", "body": b"one,", "more_body": True},
        {"type": "http.request", "body": b"two", "more_body": False},
    ]
    received: list[Message] = []
    gate = asyncio.Event()

    async def echo(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/hold":
            await gate.wait()
            await ok_app(scope, receive, send)
            return
        while True:
            message = await receive()
            received.append(message)
            if not message.get("more_body"):
                break
        body = b"".join(m["body"] for m in received)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    mw = LoadSheddingMiddleware(echo, max_concurrency=1, max_queue=2, queue_timeout=30)
    holder = Conn(empty_request())
    hold = asyncio.create_task(mw(http_scope("/hold"), holder.receive, holder.send))
    await until(lambda: mw.throttler.in_flight == 1)
    poster = Conn(*chunks)
    post = asyncio.create_task(
        mw(http_scope("/echo", "POST", [("content-length", "7")]), poster.receive, poster.send)
    )
    await until(lambda: poster.receive_calls == 3)  # both chunks taken, watching for disconnect
    gate.set()
    await hold
    await post
    # What the watch buffered reaches the app coalesced into one message, in order.
    assert received == [{"type": "http.request", "body": b"one,two", "more_body": False}]
    assert poster.body == b"one,two"
    assert mw.throttler.in_flight == 0


async def test_pending_receive_passes_to_the_admitted_app() -> None:
    """The receive() the watch was waiting on is handed over, so no message can be lost."""
    got: list[Message] = []
    gate = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/hold":
            await gate.wait()
        else:
            got.append(await receive())  # the buffered empty body
            got.append(await receive())  # the pending one: resolved by the test below
        await ok_app(scope, receive, send)

    mw = LoadSheddingMiddleware(app, max_concurrency=1, max_queue=1, queue_timeout=30)
    holder = Conn(empty_request())
    hold = asyncio.create_task(mw(http_scope("/hold"), holder.receive, holder.send))
    await until(lambda: mw.throttler.in_flight == 1)
    conn = Conn(empty_request())
    task = asyncio.create_task(mw(http_scope("/app"), conn.receive, conn.send))
    await until(lambda: conn.receive_calls == 2)
    gate.set()
    await hold
    await until(lambda: len(got) == 1)
    conn.incoming.put_nowait({"type": "http.disconnect"})
    await task
    assert got == [empty_request(), {"type": "http.disconnect"}]
    assert conn.receive_calls == 2  # the app's second receive() was the watch's own call
    assert conn.status == 200


async def test_expect_100_continue_is_not_read_while_queued() -> None:
    app = GatedApp()
    mw = LoadSheddingMiddleware(app, max_concurrency=1, max_queue=1, queue_timeout=0.05)
    holder = Conn(empty_request())
    hold = asyncio.create_task(mw(http_scope("/hold"), holder.receive, holder.send))
    await app.started.wait()
    conn = Conn()
    scope = http_scope("/upload", "POST", [("content-length", "9"), ("expect", "100-continue")])
    await mw(scope, conn.receive, conn.send)
    assert conn.status == 503
    assert json.loads(conn.body)["reason"] == "queue_timeout"
    assert conn.receive_calls == 0  # the server was never asked for the body
    app.gate.set()
    await hold


async def test_large_body_stops_watching_past_the_limit() -> None:
    big = b"x" * (WATCH_BODY_LIMIT + 1)
    app = GatedApp()
    mw = LoadSheddingMiddleware(app, max_concurrency=1, max_queue=1, queue_timeout=0.2)
    holder = Conn(empty_request())
    hold = asyncio.create_task(mw(http_scope("/hold"), holder.receive, holder.send))
    await app.started.wait()
    conn = Conn(
        {"type": "http.request", "body": big, "more_body": True},
        {"type": "http.request", "body": b"rest", "more_body": False},
    )
    await mw(http_scope("/upload", "POST"), conn.receive, conn.send)
    assert conn.receive_calls == 1  # took one chunk, then stopped reading
    assert conn.status == 503
    app.gate.set()
    await hold


async def test_cancelled_while_queued_leaves_the_queue_and_loses_no_slot() -> None:
    app = GatedApp()
    mw = LoadSheddingMiddleware(app, max_concurrency=1, max_queue=2, queue_timeout=30)
    holder = Conn(empty_request())
    hold = asyncio.create_task(mw(http_scope("/hold"), holder.receive, holder.send))
    await app.started.wait()
    conn = Conn(empty_request())
    task = asyncio.create_task(mw(http_scope("/q"), conn.receive, conn.send))
    await until(lambda: mw.throttler.queued == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: mw.throttler.queued == 0)
    app.gate.set()
    await hold
    assert mw.throttler.in_flight == 0
    assert app.calls == ["/hold"]


# -- health and metrics --------------------------------------------------------------------------


async def test_health_get_head_and_other_methods() -> None:
    extra = Throttler(max_concurrency=2, name="extra-health")
    mw = LoadSheddingMiddleware(ok_app, max_concurrency=1, max_queue=0, health_throttlers=[extra])
    get, head, post = Conn(), Conn(), Conn()
    await mw(http_scope("/health/load"), get.receive, get.send)
    await mw(http_scope("/health/load", "HEAD"), head.receive, head.send)
    await mw(http_scope("/health/load", "POST"), post.receive, post.send)
    payload = json.loads(get.body)
    assert get.status == 200
    assert payload["status"] == "ok"
    for key in ("in_flight", "queued", "max_concurrency", "max_queue", "load", "shed_threshold"):
        assert key in payload
    assert [t["name"] for t in payload["throttlers"]] == ["default", "extra-health"]
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-length"] == get.headers["content-length"]
    assert post.status == 405
    assert post.headers["allow"] == "GET, HEAD"

    with mw.throttler.acquire():  # full house: the instance is shedding
        busy = Conn()
        await mw(http_scope("/health/load"), busy.receive, busy.send)
    assert busy.status == 503
    assert json.loads(busy.body)["status"] == "overloaded"


async def test_health_path_configurable_and_disabled() -> None:
    moved = LoadSheddingMiddleware(ok_app, max_concurrency=1, health_path="/lb")
    off = LoadSheddingMiddleware(ok_app, max_concurrency=1, health_path=None)
    a, b = Conn(), Conn(empty_request())
    await moved(http_scope("/lb"), a.receive, a.send)
    await off(http_scope("/health/load"), b.receive, b.send)
    assert a.status == 200
    assert "in_flight" in json.loads(a.body)
    assert b.body == b"ok"  # reached the app


async def test_metrics_path_serves_the_registry() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("shedder_asgi_test", "a test counter", registry=registry).inc()
    throttler = Throttler(max_concurrency=1, max_queue=0)
    mw = LoadSheddingMiddleware(
        ok_app, throttler, metrics_path="/metrics", metrics_registry=registry
    )
    with throttler.acquire():  # never throttled
        conn = Conn()
        await mw(http_scope("/metrics"), conn.receive, conn.send)
    assert conn.status == 200
    assert b"shedder_asgi_test_total 1.0" in conn.body


# -- other scopes --------------------------------------------------------------------------------


async def test_lifespan_and_websocket_pass_through_untouched() -> None:
    seen: list[tuple[Any, Any, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    throttler = Throttler(max_concurrency=1, max_queue=0)
    mw = LoadSheddingMiddleware(app, throttler)
    conn = Conn()
    with throttler.acquire():  # full, yet not consulted
        for scope in ({"type": "lifespan"}, {"type": "websocket", "path": "/ws"}):
            await mw(scope, conn.receive, conn.send)
    assert [s[0]["type"] for s in seen] == ["lifespan", "websocket"]
    assert all(s[1] == conn.receive and s[2] == conn.send for s in seen)


async def test_limit_websockets_refuses_with_1013_or_an_http_denial() -> None:
    app_calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        app_calls.append(scope["type"])
        await receive()
        await send({"type": "websocket.accept"})

    throttler = Throttler(max_concurrency=1, max_queue=0)
    mw = LoadSheddingMiddleware(app, throttler, limit_websockets=True)
    ws_scope: dict[str, Any] = {"type": "websocket", "path": "/ws", "headers": []}
    admitted = Conn({"type": "websocket.connect"})
    await mw(dict(ws_scope), admitted.receive, admitted.send)
    assert admitted.sent == [{"type": "websocket.accept"}]
    assert throttler.in_flight == 0

    with throttler.acquire():
        plain = Conn({"type": "websocket.connect"})
        await mw(dict(ws_scope), plain.receive, plain.send)
        denial = Conn({"type": "websocket.connect"})
        scope = {**ws_scope, "extensions": {"websocket.http.response": {}}}
        await mw(scope, denial.receive, denial.send)
    assert plain.sent == [{"type": "websocket.close", "code": 1013, "reason": "Try Again Later"}]
    assert denial.sent[0]["type"] == "websocket.http.response.start"
    assert denial.sent[0]["status"] == 503
    assert denial.headers["retry-after"] == "1"
    assert json.loads(denial.body)["error"] == "overloaded"
    assert app_calls == ["websocket"]


# -- with Starlette ------------------------------------------------------------------------------


def make_starlette(gate: asyncio.Event, **options: Any) -> Starlette:
    async def slow(request: Any) -> PlainTextResponse:
        await gate.wait()
        return PlainTextResponse("slow")

    async def fast(request: Any) -> PlainTextResponse:
        return PlainTextResponse("fast")

    app = Starlette(routes=[Route("/slow", slow), Route("/fast", fast)])
    app.add_middleware(LoadSheddingMiddleware, **options)
    return app


async def test_starlette_add_middleware_end_to_end() -> None:
    gate = asyncio.Event()
    app_throttler = Throttler(max_concurrency=1, max_queue=1, queue_timeout=10)
    app = make_starlette(gate, throttler=app_throttler)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        running = asyncio.create_task(client.get("/slow"))
        waiting = asyncio.create_task(client.get("/fast"))

        async def health() -> dict[str, Any]:
            return dict((await client.get("/health/load")).json())

        await until(lambda: app_throttler.queued == 1)
        refused = await client.get("/fast")
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        gate.set()
        assert (await running).text == "slow"
        assert (await waiting).text == "fast"
        assert (await health())["in_flight"] == 0


def test_shedder_asgi_imports_no_framework() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    import shedder

    env = dict(os.environ, PYTHONPATH=str(Path(shedder.__file__).parents[1]))
    code = (
        "import sys, shedder, shedder.asgi; "
        "print(sorted(m for m in ('starlette', 'httpx', 'prometheus_client', 'flask') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]"


def test_a_misspelt_keyword_is_named_with_the_close_match() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    with pytest.raises(TypeError, match=r"'max_concurency'; did you mean 'max_concurrency'\?"):
        LoadSheddingMiddleware(app, max_concurency=4)  # type: ignore[call-arg]
