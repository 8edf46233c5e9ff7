"""Request deadlines on the server side: every format's edge cases, the Gate's arithmetic (trust,
caps, margin, time spent in front), both middlewares in process, and real servers: a chain of
two uvicorn servers passing the budget along with shedder's client, and WSGI under gunicorn."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import wsgiref.util
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from shedder import Deadlines, Throttler, ThrottlerListener, current_deadline
from shedder._web import deadlines as deadlines_module
from shedder._web.deadlines import (
    parse_grpc_timeout,
    parse_milliseconds,
    parse_request_start,
    parse_seconds,
)
from shedder.asgi import LoadSheddingMiddleware as ASGIMiddleware
from shedder.wsgi import LoadSheddingMiddleware as WSGIMiddleware
from tests.support.net import wait_for
from tests.support.servers import StartServer, python_server

NOW = 1_700_000_000.5  # a unix time for the X-Request-Start parser


@pytest.fixture(autouse=True)
def _fresh_ignored_log() -> Iterator[None]:
    # The ignored-value log is rate-limited per process: each test starts with a clean slate.
    deadlines_module._ignored_since.clear()
    yield
    deadlines_module._ignored_since.clear()


# --- the formats ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1H", 3600.0),
        ("2M", 120.0),
        ("3S", 3.0),
        ("100m", 0.1),
        ("250u", 250e-6),
        ("5n", 5e-9),
        ("0n", 0.0),  # a deadline that has passed: refused on arrival, not "no deadline"
        (" 100m\t", 0.1),
        ("12345678m", 12345.678),  # 8 digits, the most gRPC allows
        ("99999999S", None),  # well formed, but three years: garbage
        ("99999999H", None),
        ("", None),
        ("m", None),
        ("100", None),  # no unit
        ("100ms", None),
        ("1s", None),  # the unit is S
        ("-1S", None),
        ("+1S", None),
        ("1.5S", None),
        ("100 m", None),
        ("123456789m", None),  # 9 digits
        ("\u0661\u0660\u0660m", None),  # Arabic-Indic digits are not ASCII digits
    ],
)
def test_grpc_timeout(value: str, seconds: float | None) -> None:
    assert parse_grpc_timeout(value) == (None if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250", 0.25),
        (" 250 ", 0.25),
        ("1", 0.001),
        ("0", None),  # Envoy's "no timeout" on the route
        ("31536000000", 31_536_000.0),  # a year: the largest taken
        ("31536000001", None),
        ("999999999999", None),  # 12 digits: well formed, but garbage
        ("9999999999999", None),  # 13 digits: malformed
        ("9" * 400, None),
        ("-5", None),
        ("2.5", None),
        ("1e3", None),
        ("0x10", None),
        ("", None),
        ("250, 300", None),  # a repeated header joined by a server
    ],
)
def test_envoy_milliseconds(value: str, seconds: float | None) -> None:
    assert parse_milliseconds(value) == (None if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1.5", 1.5),
        ("2", 2.0),
        (" 0.25 ", 0.25),
        ("0.000000001", 1e-9),
        ("99999999999", None),  # three thousand years
        ("inf", None),
        ("nan", None),
        ("-1", None),
        ("1e3", None),
        ("1.", None),
        (".5", None),
        ("1.0000000001", None),  # more than nanosecond precision
        ("", None),
    ],
)
def test_seconds_header(value: str, seconds: float | None) -> None:
    parsed = parse_seconds(value, "x-request-timeout")
    assert parsed == (None if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize(
    ("value", "spent"),
    [
        ("t=1700000000.2", 0.3),  # seconds, nginx's ${msec}
        ("1700000000.2", 0.3),  # without t=
        ("t=1700000000200", 0.3),  # milliseconds (Heroku)
        ("1700000000200", 0.3),
        ("t=1700000000200000", 0.3),  # microseconds (nginx ${msec}${usec} style, Apache's D=)
        ("t=1700000000200000000", 0.3),  # nanoseconds
        (" t=1700000000200 ", 0.3),
        ("t=1700000000.5", 0.0),
        ("t=1700000002.5", 0.0),  # 2 s in the future: clock skew, nothing spent
        ("t=1700172800.5", None),  # 2 days in the future: garbage
        ("t=1699827200.5", None),  # 2 days ago: garbage
        ("t=0", None),  # 1970
        ("t=" + "9" * 20, None),  # the largest number taken: far in the future
        ("t=" + "9" * 21, None),  # too many digits
        ("t=1e309", None),
        ("t=-5", None),
        ("t=abc", None),
        ("t=", None),
        ("", None),
    ],
)
def test_request_start(value: str, spent: float | None) -> None:
    parsed = parse_request_start(value, NOW)
    assert parsed == (None if spent is None else pytest.approx(spent, abs=1e-3))


def test_deadlines_settings_are_checked() -> None:
    with pytest.raises(TypeError, match="grpc_timeout"):
        Deadlines(grpc_timeout="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="header"):
        Deadlines(header=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="header"):
        Deadlines(header="")
    with pytest.raises(ValueError, match="header"):
        Deadlines(header="x request timeout")
    with pytest.raises(ValueError, match="max_budget"):
        Deadlines(max_budget=-1)
    with pytest.raises(TypeError, match="margin"):
        Deadlines(margin="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin"):
        Deadlines(margin=math.inf)
    with pytest.raises(TypeError, match='margin must be a number of seconds or "auto"'):
        Deadlines(margin="soon")  # type: ignore[arg-type]
    assert Deadlines().margin == "auto"
    assert Deadlines(header="X-Request-Timeout", envoy=False).header_names() == (
        "grpc-timeout",
        "x-request-timeout",
        "x-request-start",
    )


def test_the_first_well_formed_source_gives_the_budget() -> None:
    settings = Deadlines(header="x-request-timeout")

    def read(**headers: str) -> tuple[float | None, float]:
        values = {k.replace("_", "-"): v for k, v in headers.items()}
        return settings.read(values.get, NOW)

    assert read(grpc_timeout="2S", x_envoy_expected_rq_timeout_ms="500") == (2.0, 0.0)
    # A malformed one is skipped, not fatal: the next source speaks.
    assert read(grpc_timeout="soon", x_envoy_expected_rq_timeout_ms="500") == (0.5, 0.0)
    assert read(x_request_timeout="1.5") == (1.5, 0.0)
    budget, spent = read(x_request_start="t=1700000000.0")
    assert budget is None
    assert spent == pytest.approx(0.5)
    off = Deadlines(grpc_timeout=False, envoy=False, request_start=False)
    assert off.read({"grpc-timeout": "1S", "x-request-start": "t=1"}.get, NOW) == (None, 0.0)


# --- the ignored-value log --------------------------------------------------------------------


def ignored_records(caplog: pytest.LogCaptureFixture, header: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if "ignored" in r.getMessage() and header in r.getMessage()
    ]


def test_bad_values_are_counted_once_in_a_debug_log(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG, logger="shedder")
    app, _ = wsgi_recorder()
    for _ in range(3):
        status, _, _ = wsgi_call(app, {"grpc-timeout": "soon"})
        assert status.startswith("200")
    messages = ignored_records(caplog, "grpc-timeout")
    assert len(messages) == 1
    assert "1 malformed grpc-timeout" in messages[0]
    assert "'soon'" in messages[0]
    # The next record, when the interval has passed, counts the ones in between.
    monkeypatch.setattr(deadlines_module, "_LOG_INTERVAL", 0.0)
    wsgi_call(app, {"grpc-timeout": "later"})
    messages = ignored_records(caplog, "grpc-timeout")
    assert len(messages) == 2
    assert "3 malformed grpc-timeout" in messages[1]
    assert "'later'" in messages[1]


def test_the_first_record_waits_for_debug_logging(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shedder")
    app, _ = wsgi_recorder()
    wsgi_call(app, {"x-envoy-expected-rq-timeout-ms": "-1"})
    assert ignored_records(caplog, "x-envoy") == []
    caplog.set_level(logging.DEBUG, logger="shedder")
    wsgi_call(app, {"x-envoy-expected-rq-timeout-ms": "-2"})
    (message,) = ignored_records(caplog, "x-envoy")
    assert "2 malformed x-envoy-expected-rq-timeout-ms" in message


# --- in-process helpers -----------------------------------------------------------------------


class Queued(ThrottlerListener):
    """Sets ``event`` (a threading or asyncio Event) when a request starts waiting."""

    def __init__(self, throttler: Throttler, event: asyncio.Event | threading.Event) -> None:
        self.event = event
        throttler.add_listener(self)

    def on_queue(self, throttler: Throttler, priority: str) -> None:
        self.event.set()


class ASGIRecorder:
    """An ASGI app that notes what it sees of each request; ``/hold`` waits for ``opened``."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.opened = asyncio.Event()
        self.entered = asyncio.Event()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/hold":
            self.entered.set()
            await self.opened.wait()
        else:
            self.seen.append(
                {
                    "path": scope["path"],
                    "at": time.monotonic(),
                    "deadline": scope.get("shedder.deadline"),
                    "remaining": scope["shedder.permit"].remaining(),
                    "current": current_deadline(),
                }
            )
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def asgi_client(app: Any, peer: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 4321))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def unix_start(ago: float) -> str:
    """An X-Request-Start value (microseconds) for ``ago`` seconds before now."""
    return f"t={int((time.time() - ago) * 1e6)}"


Environ = dict[str, Any]


def wsgi_recorder(
    **options: Any,
) -> tuple[WSGIMiddleware, dict[str, Any]]:
    """A WSGI middleware around an app that notes what it sees; ``/hold`` waits for
    ``state["opened"]`` (a threading.Event)."""
    state: dict[str, Any] = {
        "seen": [],
        "opened": threading.Event(),
        "entered": threading.Event(),
    }

    def app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/hold":
            state["entered"].set()
            state["opened"].wait(10)
        else:
            state["seen"].append(
                {
                    "at": time.monotonic(),
                    "deadline": environ.get("shedder.deadline"),
                    "remaining": environ["shedder.permit"].remaining(),
                    "current": current_deadline(),
                }
            )
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    options.setdefault("max_concurrency", 1)
    options.setdefault("queue_timeout", 10.0)
    return WSGIMiddleware(app, **options), state


def wsgi_call(
    app: WSGIMiddleware, headers: dict[str, str], path: str = "/", peer: str = "127.0.0.1"
) -> tuple[str, dict[str, str], bytes]:
    environ: Environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "REMOTE_ADDR": peer}
    wsgiref.util.setup_testing_defaults(environ)
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    captured: dict[str, Any] = {}

    def start_response(
        status: str, response_headers: list[tuple[str, str]], exc: Any = None
    ) -> Any:
        captured["status"] = status
        captured["headers"] = {k.lower(): v for k, v in response_headers}
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return captured["status"], captured["headers"], body


def assert_deadline_refusal(status: int, headers: Any, body: bytes) -> None:
    assert status == 503
    assert headers["x-shedder-refused"] == "1"
    assert json.loads(body)["reason"] == "deadline_exceeded"


# --- both middlewares in process --------------------------------------------------------------

GARBAGE = [
    ("grpc-timeout", "soon"),
    ("grpc-timeout", "99999999H"),
    ("grpc-timeout", "-1S"),
    ("x-envoy-expected-rq-timeout-ms", "9" * 400),
    ("x-envoy-expected-rq-timeout-ms", "-250"),
    ("x-envoy-expected-rq-timeout-ms", "1e999"),
    ("x-envoy-expected-rq-timeout-ms", "\xfc\xff"),
    ("x-request-start", "t=" + "9" * 400),
    ("x-request-start", "t=1e309"),
    ("x-request-start", "t=nan"),
    ("x-request-timeout", "inf"),
    ("x-request-timeout", "-0.5"),
]


@pytest.mark.parametrize(("header", "value"), GARBAGE)
async def test_garbage_is_ignored_never_a_500_asgi(header: str, value: str) -> None:
    app = ASGIRecorder()
    shedded = ASGIMiddleware(
        app, max_concurrency=2, deadlines=Deadlines(header="x-request-timeout")
    )
    async with asgi_client(shedded) as client:
        response = await client.get("/", headers={header.encode(): value.encode("latin-1")})
    assert response.status_code == 200
    assert app.seen[0]["deadline"] is None
    assert app.seen[0]["remaining"] is None


@pytest.mark.parametrize(("header", "value"), GARBAGE)
def test_garbage_is_ignored_never_a_500_wsgi(header: str, value: str) -> None:
    app, state = wsgi_recorder(deadlines=Deadlines(header="x-request-timeout"))
    status, _, _ = wsgi_call(app, {header: value})
    assert status.startswith("200")
    assert state["seen"][0]["deadline"] is None


EXPIRED = [
    {"grpc-timeout": "0n"},
    {"x-envoy-expected-rq-timeout-ms": "1000", "x-request-start": unix_start(2.0)},
]


@pytest.mark.parametrize("headers", EXPIRED)
async def test_an_expired_arrival_is_refused_at_once_asgi(headers: dict[str, str]) -> None:
    app = ASGIRecorder()
    shedded = ASGIMiddleware(app, max_concurrency=4, name="expired-asgi")
    async with asgi_client(shedded) as client:
        response = await client.get("/", headers=headers)
    assert_deadline_refusal(response.status_code, response.headers, response.content)
    assert app.seen == []  # never reached the app, though a slot was free
    stats = shedded.throttler.stats()
    assert stats.shed_total["deadline_exceeded"] == 1
    assert stats.admitted_total == 0


@pytest.mark.parametrize("headers", EXPIRED)
def test_an_expired_arrival_is_refused_at_once_wsgi(headers: dict[str, str]) -> None:
    app, state = wsgi_recorder(max_concurrency=4)
    status, response_headers, body = wsgi_call(app, headers)
    assert_deadline_refusal(int(status[:3]), response_headers, body)
    assert state["seen"] == []
    assert app.throttler.stats().shed_total["deadline_exceeded"] == 1


async def test_a_deadline_that_passes_in_the_queue_is_refused_asgi() -> None:
    app = ASGIRecorder()
    shedded = ASGIMiddleware(app, max_concurrency=1, max_queue=4, queue_timeout=10.0)
    async with asgi_client(shedded) as client:
        holder = asyncio.ensure_future(client.get("/hold"))
        await app.entered.wait()
        started = time.monotonic()
        response = await client.get("/", headers={"grpc-timeout": "100m"})
        waited = time.monotonic() - started
        app.opened.set()
        assert (await holder).status_code == 200
    assert_deadline_refusal(response.status_code, response.headers, response.content)
    assert 0.09 <= waited < 1.0  # its deadline, not queue_timeout's 10 s
    assert app.seen == []
    assert shedded.throttler.stats().shed_total["deadline_exceeded"] == 1


def test_a_deadline_that_passes_in_the_queue_is_refused_wsgi() -> None:
    app, state = wsgi_recorder(max_queue=4)
    holder = threading.Thread(target=wsgi_call, args=(app, {}, "/hold"))
    holder.start()
    try:
        assert state["entered"].wait(5)
        started = time.monotonic()
        status, headers, body = wsgi_call(app, {"x-envoy-expected-rq-timeout-ms": "100"})
        waited = time.monotonic() - started
    finally:
        state["opened"].set()
        holder.join(5)
    assert_deadline_refusal(int(status[:3]), headers, body)
    assert 0.09 <= waited < 1.0
    assert state["seen"] == []
    assert app.throttler.stats().shed_total["deadline_exceeded"] == 1


async def test_the_app_sees_the_deadline_and_the_time_left_asgi() -> None:
    app = ASGIRecorder()
    shedded = ASGIMiddleware(app, max_concurrency=1, max_queue=4)
    async with asgi_client(shedded) as client:
        before = time.monotonic()
        assert (
            await client.get("/", headers={"x-envoy-expected-rq-timeout-ms": "2000"})
        ).is_success
        after = time.monotonic()
        # Queued first, then granted: the permit still knows the deadline.
        holder = asyncio.ensure_future(client.get("/hold"))
        await app.entered.wait()
        waiting = asyncio.Event()
        Queued(shedded.throttler, waiting)
        queued = asyncio.ensure_future(client.get("/", headers={"grpc-timeout": "5S"}))
        await waiting.wait()
        app.opened.set()
        assert (await holder).is_success
        assert (await queued).is_success
    fast, slow = app.seen
    assert before + 2.0 <= fast["deadline"] <= after + 2.0
    assert fast["current"] == fast["deadline"]  # shedder.client calls end by it
    assert fast["remaining"] == pytest.approx(fast["deadline"] - fast["at"], abs=0.05)
    assert slow["remaining"] is not None
    assert slow["remaining"] == pytest.approx(slow["deadline"] - slow["at"], abs=0.05)
    assert 4.0 < slow["remaining"] <= 5.0


def test_the_app_sees_the_deadline_and_the_time_left_wsgi() -> None:
    app, state = wsgi_recorder(max_queue=4)
    before = time.monotonic()
    assert wsgi_call(app, {"x-envoy-expected-rq-timeout-ms": "2000"})[0].startswith("200")
    after = time.monotonic()
    holder = threading.Thread(target=wsgi_call, args=(app, {}, "/hold"))
    holder.start()
    assert state["entered"].wait(5)
    results: list[str] = []
    waiting = threading.Event()
    Queued(app.throttler, waiting)
    queued = threading.Thread(
        target=lambda: results.append(wsgi_call(app, {"grpc-timeout": "5S"})[0])
    )
    queued.start()
    try:
        assert waiting.wait(5)
    finally:
        state["opened"].set()
        holder.join(5)
        queued.join(5)
    assert results == ["200 OK"]
    fast, slow = state["seen"]
    assert before + 2.0 <= fast["deadline"] <= after + 2.0
    assert fast["current"] == fast["deadline"]
    assert fast["remaining"] == pytest.approx(fast["deadline"] - fast["at"], abs=0.05)
    assert slow["remaining"] == pytest.approx(slow["deadline"] - slow["at"], abs=0.05)


async def test_untrusted_peers_are_capped_at_max_budget() -> None:
    app = ASGIRecorder()
    settings = Deadlines(max_budget=1.0)
    untrusted = ASGIMiddleware(app, max_concurrency=4, deadlines=settings)
    trusting = ASGIMiddleware(
        app, max_concurrency=4, deadlines=settings, trusted_peers=["10.0.0.0/8"]
    )
    long = {"x-envoy-expected-rq-timeout-ms": "30000"}
    async with asgi_client(untrusted, peer="10.1.2.3") as client:
        await client.get("/", headers=long)
        # The cap is on what the peer claims; time spent in front still comes off it.
        await client.get("/", headers={**long, "x-request-start": unix_start(0.4)})
        await client.get("/", headers={"x-envoy-expected-rq-timeout-ms": "500"})  # short: as is
    async with asgi_client(trusting, peer="10.1.2.3") as client:
        await client.get("/", headers=long)
    async with asgi_client(trusting, peer="192.0.2.1") as client:
        await client.get("/", headers=long)
    left = [seen["remaining"] for seen in app.seen]
    assert 0.9 < left[0] <= 1.0
    assert 0.5 < left[1] <= 0.6
    assert 0.4 < left[2] <= 0.5
    assert 29.9 < left[3] <= 30.0
    assert 0.9 < left[4] <= 1.0


def test_untrusted_peers_are_capped_at_max_budget_wsgi() -> None:
    app, state = wsgi_recorder(
        max_concurrency=4, deadlines=Deadlines(max_budget=2.0), trusted_peers=["::1"]
    )
    wsgi_call(app, {"grpc-timeout": "1H"}, peer="203.0.113.9")
    wsgi_call(app, {"grpc-timeout": "1H"}, peer="::1")
    assert 1.9 < state["seen"][0]["remaining"] <= 2.0
    assert 3599 < state["seen"][1]["remaining"] <= 3600


async def test_time_spent_in_front_comes_off_the_budget() -> None:
    app = ASGIRecorder()
    shedded = ASGIMiddleware(app, max_concurrency=4)
    async with asgi_client(shedded) as client:
        await client.get("/", headers={"grpc-timeout": "1S", "x-request-start": unix_start(0.3)})
        # A start in the future (another host's clock) costs nothing.
        await client.get("/", headers={"grpc-timeout": "1S", "x-request-start": unix_start(-5.0)})
    assert 0.6 < app.seen[0]["remaining"] <= 0.7
    assert 0.9 < app.seen[1]["remaining"] <= 1.0


async def test_time_spent_in_front_counts_against_queue_timeout() -> None:
    app = ASGIRecorder()
    shedded = ASGIMiddleware(app, max_concurrency=1, max_queue=4, queue_timeout=0.5)
    async with asgi_client(shedded) as client:
        holder = asyncio.ensure_future(client.get("/hold"))
        await app.entered.wait()
        started = time.monotonic()
        response = await client.get("/", headers={"x-request-start": unix_start(0.4)})
        waited = time.monotonic() - started
        app.opened.set()
        await holder
    assert response.status_code == 503
    assert response.json()["reason"] == "queue_timeout"  # no deadline: the queue's own limit
    assert waited < 0.3


async def test_the_margin_shortens_the_wait_not_the_deadline() -> None:
    app = ASGIRecorder()
    shedded = ASGIMiddleware(app, max_concurrency=1, max_queue=4, deadlines=Deadlines(margin=0.15))
    async with asgi_client(shedded) as client:
        assert (await client.get("/", headers={"grpc-timeout": "250m"})).is_success
        # Less budget than the margin: nothing useful can be done, refused at once.
        too_short = await client.get("/", headers={"grpc-timeout": "100m"})
        holder = asyncio.ensure_future(client.get("/hold"))
        await app.entered.wait()
        started = time.monotonic()
        queued = await client.get("/", headers={"grpc-timeout": "250m"})
        waited = time.monotonic() - started
        app.opened.set()
        await holder
    (seen,) = app.seen
    assert 0.2 < seen["remaining"] <= 0.25  # the deadline itself, for the app's own use
    assert_deadline_refusal(too_short.status_code, too_short.headers, too_short.content)
    assert_deadline_refusal(queued.status_code, queued.headers, queued.content)
    assert 0.09 <= waited < 0.2  # gave up at 250 - 150 ms


async def test_deadlines_none_reads_nothing() -> None:
    app = ASGIRecorder()
    shedded = ASGIMiddleware(app, max_concurrency=1, deadlines=None)
    async with asgi_client(shedded) as client:
        assert (await client.get("/", headers={"grpc-timeout": "0n"})).is_success
    assert app.seen[0]["deadline"] is None


async def test_deadline_refusals_are_counted_in_health_and_metrics() -> None:
    registry = CollectorRegistry()
    app = ASGIRecorder()
    shedded = ASGIMiddleware(
        app,
        max_concurrency=2,
        name="deadline-metrics",
        metrics_path="/metrics",
        metrics_registry=registry,
    )
    async with asgi_client(shedded) as client:
        for _ in range(2):
            refused = await client.get("/", headers={"grpc-timeout": "0n"})
            assert refused.status_code == 503
        assert (await client.get("/", headers={"grpc-timeout": "1S"})).is_success
        health = (await client.get("/health/load")).json()
        exposition = (await client.get("/metrics")).text
    assert shedded.throttler.stats().shed_total["deadline_exceeded"] == 2
    assert health["shed_total"]["deadline_exceeded"] == 2
    assert health["priorities"]["default"]["shed_total"]["deadline_exceeded"] == 2
    shed = {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(exposition)
        if family.name == "shedder_throttler_shed"
        for sample in family.samples
        if sample.name == "shedder_throttler_shed_total"
        and sample.labels["throttler"] == "deadline-metrics"
        and sample.labels["priority"] == "default"
    }
    assert shed == {
        "deadline_exceeded": 2.0,
        "overloaded": 0.0,
        "queue_full": 0.0,
        "queue_timeout": 0.0,
    }


@pytest.mark.parametrize("margin", ["auto", 0.0])
def test_the_auto_margin_keeps_the_observed_service_time(margin: Any) -> None:
    now = [1000.0]
    throttler = Throttler(max_concurrency=1, clock=lambda: now[0])
    assert throttler.service_time is None  # measured from now on
    for _ in range(3):  # three requests held 200 ms each on the throttler's clock
        with throttler.acquire():
            now[0] += 0.2
    assert throttler.service_time == pytest.approx(0.2)

    def inner(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [])
        return [b""]

    shedded = WSGIMiddleware(inner, throttler, deadlines=Deadlines(margin=margin))
    short, _, body = wsgi_call(shedded, {"grpc-timeout": "150m"})
    long, _, _ = wsgi_call(shedded, {"grpc-timeout": "300m"})
    assert long.startswith("200")
    if margin == "auto":  # 150 ms cannot hold 200 ms of work: refused at once
        assert short.startswith("503")
        assert json.loads(body)["reason"] == "deadline_exceeded"
    else:
        assert short.startswith("200")


def test_a_throttler_with_its_own_clock_gets_deadlines_on_that_clock() -> None:
    # A simulated clock far from time.monotonic(): the arrival is neither expired nor eternal.
    throttler = Throttler(max_concurrency=1, clock=lambda: 1e6)
    seen: list[Any] = []

    def inner(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        seen.append((environ["shedder.deadline"], environ["shedder.permit"].deadline))
        start_response("200 OK", [])
        return [b""]

    status, _, _ = wsgi_call(WSGIMiddleware(inner, throttler), {"grpc-timeout": "2S"})
    assert status.startswith("200")
    ((deadline, on_clock),) = seen
    assert on_clock == pytest.approx(1e6 + 2.0)
    assert deadline == pytest.approx(time.monotonic() + 2.0, abs=0.1)


# --- real servers -----------------------------------------------------------------------------


@pytest.mark.server
def test_a_chain_of_two_uvicorn_servers_passes_the_budget_along(server: StartServer) -> None:
    factory = ("--no-access-log", "--factory")
    back = server(python_server("uvicorn", "tests.web.deadline_apps:create_back", *factory)).url
    front = server(python_server("uvicorn", "tests.web.deadline_apps:create_front", *factory)).url
    started = time.monotonic()
    response = httpx.get(
        f"{front}/relay",
        params={"to": f"{back}/remaining", "sleep": "0.3"},
        headers={"x-envoy-expected-rq-timeout-ms": "2000"},
        timeout=5,
    )
    spent = time.monotonic() - started  # the whole round trip: more than the front spent
    assert response.status_code == 200
    downstream = response.json()["downstream"]
    # The front spent 0.3 s of its 2 s, and a little on the way: the back has the rest.
    assert 2000 - 1000 * spent - 1 <= int(downstream["header"]) <= 1700  # whole ms
    assert 2.0 - spent < downstream["remaining"] <= 1.7
    assert downstream["permit_remaining"] == pytest.approx(downstream["remaining"], abs=0.05)
    # Without a deadline coming in, the client's own total_timeout (10 s) goes out.
    plain = httpx.get(f"{front}/relay", params={"to": f"{back}/remaining", "sleep": "0"}, timeout=5)
    assert 9000 < int(plain.json()["downstream"]["header"]) <= 10_000


@pytest.mark.server
def test_wsgi_under_gunicorn_refuses_what_its_deadline_left_in_the_queue(
    server: StartServer,
) -> None:
    app = server(
        python_server("gunicorn", "tests.web.deadline_apps:wsgi_app"), ready="/health/live"
    )
    with httpx.Client(base_url=app.url, timeout=10) as client:
        held: list[int] = []
        holder = threading.Thread(target=lambda: held.append(client.get("/hold").status_code))
        holder.start()
        try:
            assert wait_for_in_flight(client, 1)
            started = time.monotonic()
            refused = client.get("/work", headers={"grpc-timeout": "200m"})
            waited = time.monotonic() - started
            expired = client.get("/work", headers={"grpc-timeout": "0n"})
        finally:
            client.get("/release")
            holder.join(10)
        admitted = client.get("/work", headers={"x-envoy-expected-rq-timeout-ms": "3000"})
        seen = client.get("/seen").json()["seen"]
        health = client.get("/health/load").json()
    assert held == [200]
    assert_deadline_refusal(refused.status_code, refused.headers, refused.content)
    assert 0.15 < waited < 2.0
    assert_deadline_refusal(expired.status_code, expired.headers, expired.content)
    assert admitted.status_code == 200
    assert len(seen) == 1  # only the admitted one reached the app
    assert 2.5 < seen[0] <= 3.0
    assert health["shed_total"]["deadline_exceeded"] == 2


def wait_for_in_flight(client: httpx.Client, count: int) -> bool:
    return wait_for(lambda: client.get("/health/load").json()["in_flight"] == count, timeout=10)
