"""In-process tests of shedder.wsgi: admission, every release path, endpoints, file wrappers."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import wsgiref.util
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import shedder
from shedder import Overloaded, Throttler, ThrottlerListener
from shedder._web.http import HTTPResponse
from shedder.wsgi import LoadSheddingMiddleware

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
App = Callable[[Environ, StartResponse], Iterable[bytes]]


class Releases(ThrottlerListener):
    """Counts releases, to prove each slot comes back exactly once."""

    def __init__(self) -> None:
        self.count = 0

    def on_release(self, throttler: Throttler, held: float) -> None:
        self.count += 1


class Captured:
    """A start_response that records what the app (or middleware) sent."""

    def __init__(self) -> None:
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.status = status
        self.headers = headers
        return lambda data: None

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def make_environ(path: str = "/", method: str = "GET", **extra: object) -> Environ:
    environ: Environ = {"PATH_INFO": path, "REQUEST_METHOD": method}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(extra)
    return environ


def call(app: App, path: str = "/", method: str = "GET", **extra: Any) -> tuple[Captured, bytes]:
    """Run one request to the end, the way a server does: iterate, then close."""
    captured = Captured()
    result = app(make_environ(path, method, **extra), captured)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return captured, body


def hello(environ: Environ, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [("content-type", "text/plain")])
    return [b"hello"]


@pytest.fixture
def throttler() -> Throttler:
    return Throttler(max_concurrency=1, max_queue=0, retry_after=7, name="wsgi-test")


@pytest.fixture
def releases(throttler: Throttler) -> Releases:
    listener = Releases()
    throttler.add_listener(listener)
    return listener


def hold_slot(middleware: LoadSheddingMiddleware) -> Iterable[bytes]:
    """Start a request that keeps its slot until the returned iterable is closed."""
    return middleware(make_environ("/busy"), Captured())


# -- admission -------------------------------------------------------------------------------


def test_admitted_request_reaches_app_and_frees_its_slot(
    throttler: Throttler, releases: Releases
) -> None:
    mw = LoadSheddingMiddleware(hello, throttler)
    captured, body = call(mw)
    assert (captured.status, body) == ("200 OK", b"hello")
    assert throttler.in_flight == 0
    assert releases.count == 1


def test_refused_request_never_reaches_app(throttler: Throttler) -> None:
    calls: list[str] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        calls.append(environ["PATH_INFO"])
        return hello(environ, start_response)

    mw = LoadSheddingMiddleware(app, throttler)
    held = hold_slot(mw)
    captured, body = call(mw, "/refused")
    assert calls == ["/busy"]
    assert captured.status == "503 Service Unavailable"
    assert captured.header("retry-after") == "7"
    assert captured.header("content-length") == str(len(body))
    assert json.loads(body) == {"error": "overloaded", "reason": "queue_full", "retry_after": 7}
    held.close()  # type: ignore[attr-defined]
    assert throttler.in_flight == 0


@pytest.mark.parametrize(
    ("throttler_options", "options"),
    [
        ({}, {}),  # the quick lane: a full throttler refuses before any header is read
        ({}, {"priority_header": "x-priority"}),  # admit() decides, headers read first
        ({"queue_discipline": "codel"}, {}),  # no quick lane for codel
    ],
)
def test_refusals_each_get_their_own_header_list(
    throttler_options: dict[str, Any], options: dict[str, Any]
) -> None:
    """An outer middleware that appends to a refusal's headers changes only that response."""
    throttler = Throttler(max_concurrency=1, max_queue=0, **throttler_options)
    mw = LoadSheddingMiddleware(hello, throttler, **options)

    def outer(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        def tagging_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            headers.append(("x-request-id", "1"))
            return start_response(status, headers, exc_info)

        return mw(environ, tagging_start_response)

    with throttler.acquire():
        answers = [call(outer, HTTP_X_PRIORITY="critical")[0] for _ in range(3)]
    for captured in answers:
        assert captured.status == "503 Service Unavailable"
        assert [k for k, _ in captured.headers].count("x-request-id") == 1
    assert throttler.stats().shed_total["queue_full"] == 3


def test_full_throttler_refuses_a_request_with_an_expired_deadline_as_queue_full() -> None:
    """The quick lane refuses before reading deadlines: no deadline changes that answer."""
    throttler = Throttler(max_concurrency=1, max_queue=0)
    mw = LoadSheddingMiddleware(hello, throttler)
    with throttler.acquire():
        _, body = call(mw, HTTP_GRPC_TIMEOUT="0m")
    assert json.loads(body)["reason"] == "queue_full"
    _, body = call(mw, HTTP_GRPC_TIMEOUT="0m")
    assert json.loads(body)["reason"] == "deadline_exceeded"  # a free slot: read first


def test_status_code_429(throttler: Throttler) -> None:
    mw = LoadSheddingMiddleware(hello, throttler, status_code=429)
    held = hold_slot(mw)
    captured, _ = call(mw)
    assert captured.status == "429 Too Many Requests"
    assert captured.header("retry-after") == "7"
    held.close()  # type: ignore[attr-defined]


def test_custom_responder(throttler: Throttler) -> None:
    def responder(refusal: Overloaded) -> HTTPResponse:
        return HTTPResponse(503, (("x-reason", refusal.reason),), b"busy")

    mw = LoadSheddingMiddleware(hello, throttler, responder=responder)
    held = hold_slot(mw)
    captured, body = call(mw)
    assert (captured.status, captured.header("x-reason"), body) == (
        "503 Service Unavailable",
        "queue_full",
        b"busy",
    )
    held.close()  # type: ignore[attr-defined]


def test_waiter_gets_slot_when_holder_closes() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1, queue_timeout=30)
    mw = LoadSheddingMiddleware(hello, throttler)
    held = hold_slot(mw)
    outcome: list[tuple[str | None, bytes]] = []

    def second() -> None:
        captured, body = call(mw)
        outcome.append((captured.status, body))

    queued = threading.Event()

    class OnQueue(ThrottlerListener):
        def on_queue(self, throttler: Throttler, priority: str) -> None:
            queued.set()

    throttler.add_listener(OnQueue())
    waiter = threading.Thread(target=second)
    waiter.start()
    # The worker thread blocks inside acquire(); the app has not run.
    assert queued.wait(10)
    assert outcome == []
    held.close()  # type: ignore[attr-defined]
    waiter.join(10)
    assert outcome == [("200 OK", b"hello")]
    assert throttler.in_flight == 0


def test_queue_timeout_refuses_with_reason() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1, queue_timeout=0.05)
    mw = LoadSheddingMiddleware(hello, throttler)
    held = hold_slot(mw)
    captured, body = call(mw)
    assert captured.status == "503 Service Unavailable"
    assert json.loads(body)["reason"] == "queue_timeout"
    held.close()  # type: ignore[attr-defined]


def test_permit_is_in_environ(throttler: Throttler) -> None:
    seen: list[Any] = []

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        seen.append(environ["shedder.permit"])
        return hello(environ, start_response)

    call(LoadSheddingMiddleware(app, throttler))
    assert len(seen) == 1
    assert seen[0].released


def test_throttler_options_build_a_throttler() -> None:
    mw = LoadSheddingMiddleware(hello, max_concurrency=3, max_queue=5, name="built")
    assert (mw.throttler.max_concurrency, mw.throttler.max_queue, mw.throttler.name) == (
        3,
        5,
        "built",
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, TypeError, "at least max_concurrency"),
        ({"max_queue": 3}, TypeError, "at least max_concurrency"),
        ({"throttler": Throttler(1), "max_concurrency": 2}, TypeError, "not both"),
        ({"throttler": object()}, TypeError, "shedder.Throttler"),
        ({"max_concurrency": 1, "status_code": 500}, ValueError, "503 or 429, got 500"),
        ({"max_concurrency": 1, "health_path": "health"}, ValueError, "health_path"),
        ({"max_concurrency": 1, "exempt": "/static/"}, TypeError, "single string"),
        ({"max_concurrency": 0}, ValueError, "max_concurrency must be >= 1"),
        ({"max_concurrency": 1, "health_throttlers": ["api"]}, TypeError, "health_throttlers"),
    ],
)
def test_configuration_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        LoadSheddingMiddleware(hello, **kwargs)


# -- release paths -----------------------------------------------------------------------------


def test_app_raising_before_start_response_releases(
    throttler: Throttler, releases: Releases
) -> None:
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        call(LoadSheddingMiddleware(app, throttler))
    assert (throttler.in_flight, releases.count) == (0, 1)


def test_app_raising_after_start_response_releases(
    throttler: Throttler, releases: Releases
) -> None:
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        call(LoadSheddingMiddleware(app, throttler))
    assert (throttler.in_flight, releases.count) == (0, 1)


def test_streaming_holds_slot_until_close_not_until_exhaustion(
    throttler: Throttler, releases: Releases
) -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"one"
        yield b"two"

    result = LoadSheddingMiddleware(app, throttler)(make_environ(), Captured())
    chunks = list(result)
    assert chunks == [b"one", b"two"]
    # Exhausted but not closed: the server may still be writing the last chunk.
    assert throttler.in_flight == 1
    result.close()  # type: ignore[attr-defined]
    assert (throttler.in_flight, releases.count) == (0, 1)


def test_iterable_raising_midway_releases_on_close(
    throttler: Throttler, releases: Releases
) -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"one"
        raise RuntimeError("mid-stream")

    with pytest.raises(RuntimeError, match="mid-stream"):
        call(LoadSheddingMiddleware(app, throttler))
    assert (throttler.in_flight, releases.count) == (0, 1)


def test_generator_raising_before_start_response_releases(
    throttler: Throttler, releases: Releases
) -> None:
    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        raise RuntimeError("lazy boom")
        yield b""  # a generator app: start_response would come on first iteration

    with pytest.raises(RuntimeError, match="lazy boom"):
        call(LoadSheddingMiddleware(app, throttler))
    assert (throttler.in_flight, releases.count) == (0, 1)


def test_close_raising_still_releases(throttler: Throttler, releases: Releases) -> None:
    class FailingClose:
        def __iter__(self) -> Iterator[bytes]:
            yield b"x"

        def close(self) -> None:
            raise OSError("close failed")

    def app(environ: Environ, start_response: StartResponse) -> FailingClose:
        start_response("200 OK", [])
        return FailingClose()

    with pytest.raises(OSError, match="close failed"):
        call(LoadSheddingMiddleware(app, throttler))
    assert (throttler.in_flight, releases.count) == (0, 1)


def test_iterable_without_close_releases_on_close(throttler: Throttler, releases: Releases) -> None:
    class NoClose:
        def __iter__(self) -> Iterator[bytes]:
            return iter([b"a", b"b"])

    def app(environ: Environ, start_response: StartResponse) -> NoClose:
        start_response("200 OK", [])
        return NoClose()

    result = LoadSheddingMiddleware(app, throttler)(make_environ(), Captured())
    assert b"".join(result) == b"ab"
    assert throttler.in_flight == 1
    result.close()  # type: ignore[attr-defined]
    assert (throttler.in_flight, releases.count) == (0, 1)


def test_abandoned_generator_is_closed_and_releases(
    throttler: Throttler, releases: Releases
) -> None:
    finalised = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        try:
            while True:
                yield b"chunk"
        finally:
            finalised.set()

    result = LoadSheddingMiddleware(app, throttler)(make_environ(), Captured())
    iterator = iter(result)
    assert next(iterator) == b"chunk"
    # The client went away: the server stops iterating and closes.
    result.close()  # type: ignore[attr-defined]
    assert finalised.is_set()
    assert (throttler.in_flight, releases.count) == (0, 1)


def test_close_twice_releases_and_closes_once(throttler: Throttler, releases: Releases) -> None:
    inner_closes: list[int] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            return iter([b"x"])

        def close(self) -> None:
            inner_closes.append(1)

    def app(environ: Environ, start_response: StartResponse) -> Body:
        start_response("200 OK", [])
        return Body()

    result = LoadSheddingMiddleware(app, throttler)(make_environ(), Captured())
    result.close()  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]
    assert (inner_closes, releases.count) == ([1], 1)


# -- wsgi.file_wrapper ---------------------------------------------------------------------------


def file_app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("content-length", "9")])
    wrapped: Iterable[bytes] = environ["wsgi.file_wrapper"](io.BytesIO(b"file body"))
    environ["test.returned"] = wrapped
    return wrapped


@pytest.mark.parametrize(
    "wrapper_class",
    [wsgiref.util.FileWrapper, pytest.param("gunicorn", id="gunicorn.FileWrapper")],
)
def test_file_wrapper_is_returned_as_is_and_released_on_close(
    throttler: Throttler, releases: Releases, wrapper_class: Any
) -> None:
    if wrapper_class == "gunicorn":
        from gunicorn.http.wsgi import FileWrapper

        wrapper_class = FileWrapper
    environ = make_environ("/", "GET", **{"wsgi.file_wrapper": wrapper_class})
    result = LoadSheddingMiddleware(file_app, throttler)(environ, Captured())
    # The server's own object, so it can still use sendfile.
    assert result is environ["test.returned"]
    assert type(result) is wrapper_class
    assert b"".join(result) == b"file body"
    assert throttler.in_flight == 1
    result.close()
    assert (throttler.in_flight, releases.count) == (0, 1)
    assert result.filelike.closed


def test_file_wrapper_with_slots_falls_back_to_wrapping(
    throttler: Throttler, releases: Releases
) -> None:
    class SlotsWrapper:
        __slots__ = ("filelike",)

        def __init__(self, filelike: io.BytesIO) -> None:
            self.filelike = filelike

        def __iter__(self) -> Iterator[bytes]:
            return iter([self.filelike.read()])

        def close(self) -> None:
            self.filelike.close()

    environ = make_environ("/", "GET", **{"wsgi.file_wrapper": SlotsWrapper})
    result = LoadSheddingMiddleware(file_app, throttler)(environ, Captured())
    assert result is not environ["test.returned"]
    assert b"".join(result) == b"file body"
    result.close()  # type: ignore[attr-defined]
    assert (throttler.in_flight, releases.count) == (0, 1)
    assert environ["test.returned"].filelike.closed


# -- endpoints and exemptions --------------------------------------------------------------------


def test_health_get_head_and_other_methods(throttler: Throttler) -> None:
    other = Throttler(max_concurrency=2, name="other")
    mw = LoadSheddingMiddleware(hello, throttler, health_throttlers=[other])
    captured, body = call(mw, "/health/load")
    assert captured.status == "200 OK"
    payload = json.loads(body)
    assert payload["status"] == "ok"
    assert [t["name"] for t in payload["throttlers"]] == ["wsgi-test", "other"]

    head, head_body = call(mw, "/health/load", "HEAD")
    assert (head.status, head_body) == ("200 OK", b"")
    assert head.header("content-length") == str(len(body))

    post, _ = call(mw, "/health/load", "POST")
    assert post.status == "405 Method Not Allowed"
    assert post.header("allow") == "GET, HEAD"


def test_health_is_503_while_shedding_and_never_throttled(throttler: Throttler) -> None:
    mw = LoadSheddingMiddleware(hello, throttler)
    held = hold_slot(mw)
    captured, body = call(mw, "/health/load")
    assert captured.status == "503 Service Unavailable"
    assert json.loads(body)["status"] == "overloaded"
    assert json.loads(body)["in_flight"] == 1
    held.close()  # type: ignore[attr-defined]
    captured, _ = call(mw, "/health/load")
    assert captured.status == "200 OK"


def test_health_path_configurable_and_disabled(throttler: Throttler) -> None:
    moved = LoadSheddingMiddleware(hello, throttler, health_path="/lb")
    assert json.loads(call(moved, "/lb")[1])["status"] == "ok"
    assert call(moved, "/health/load")[1] == b"hello"
    disabled = LoadSheddingMiddleware(hello, throttler, health_path=None)
    assert call(disabled, "/health/load")[1] == b"hello"


def test_exempt_paths_bypass_a_full_throttler(throttler: Throttler) -> None:
    mw = LoadSheddingMiddleware(hello, throttler, exempt=["/ping", "/static/", "/assets*"])
    held = hold_slot(mw)
    for path in ("/ping", "/static/app.js", "/assets-v2/x.css"):
        captured, body = call(mw, path)
        assert (path, captured.status, body) == (path, "200 OK", b"hello")
    assert call(mw, "/ping/more")[0].status == "503 Service Unavailable"
    held.close()  # type: ignore[attr-defined]


def test_metrics_endpoint(throttler: Throttler) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("wsgi_test_things", "things", registry=registry).inc()
    mw = LoadSheddingMiddleware(
        hello, throttler, metrics_path="/metrics", metrics_registry=registry
    )
    held = hold_slot(mw)  # a full throttler does not stop scrapes
    captured, body = call(mw, "/metrics")
    assert captured.status == "200 OK"
    assert (captured.header("content-type") or "").startswith("text/plain")
    assert b"wsgi_test_things_total 1.0" in body
    assert call(mw, "/metrics", "POST")[0].status == "405 Method Not Allowed"
    held.close()  # type: ignore[attr-defined]


def test_werkzeug_client_streaming_holds_slot_until_response_closed(
    throttler: Throttler,
) -> None:
    from werkzeug.test import Client

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("content-type", "text/plain")])
        yield b"first "
        yield b"last"

    client = Client(LoadSheddingMiddleware(app, throttler))
    response = client.get("/", buffered=False)
    chunks = iter(response.response)
    assert next(chunks) == b"first "
    assert throttler.in_flight == 1
    assert client.get("/").status_code == 503
    assert next(chunks) == b"last"
    response.close()
    assert throttler.in_flight == 0
    assert client.get("/").status_code == 200


def test_unclosed_dropped_response_slot_is_reclaimed_on_next_request(
    throttler: Throttler, releases: Releases
) -> None:
    mw = LoadSheddingMiddleware(hello, throttler)
    result = mw(make_environ(), Captured())
    assert b"".join(result) == b"hello"
    assert throttler.in_flight == 1
    del result  # dropped without close(): CPython finalises it at once
    assert throttler.in_flight == 1  # the finaliser only queues the permit...
    captured, _ = call(mw)  # ...and the next request gives it back first
    assert captured.status == "200 OK"
    assert (throttler.in_flight, releases.count) == (0, 2)


def test_missing_prometheus_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "shedder.prometheus", raising=False)
    with pytest.raises(ImportError, match=r"loadshedder\[prometheus\]"):
        LoadSheddingMiddleware(hello, max_concurrency=1, metrics_path="/metrics")
    # Without metrics_path nothing is imported, and nothing fails.
    assert LoadSheddingMiddleware(hello, max_concurrency=1).metrics_path is None


def test_import_shedder_wsgi_imports_no_framework() -> None:
    code = (
        "import sys, shedder, shedder.wsgi; "
        "print(sorted(m for m in ('flask', 'werkzeug', 'starlette', 'httpx', 'prometheus_client')"
        " if m in sys.modules))"
    )
    src = str(Path(shedder.__file__).resolve().parent.parent)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": src},
    )
    assert out.stdout.strip() == "[]"


def test_a_misspelt_keyword_is_named_with_the_close_match() -> None:
    with pytest.raises(TypeError, match=r"'helth_path'; did you mean 'health_path'\?"):
        LoadSheddingMiddleware(lambda e, s: [], max_concurrency=4, helth_path="/h")  # type: ignore[call-arg]


def test_sheds_are_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shedder._web.http

    now = [100.0]
    monkeypatch.setattr(shedder._web.http.time, "monotonic", lambda: now[0])
    throttler = Throttler(max_concurrency=1, max_queue=0, name="logged")
    app = LoadSheddingMiddleware(lambda environ, start_response: [b"ok"], throttler)

    def call() -> str:
        env: dict[str, Any] = {}
        wsgiref.util.setup_testing_defaults(env)
        statuses: list[str] = []
        body = app(env, lambda status, headers, exc_info=None: statuses.append(status))
        list(body)
        return statuses[0]

    with caplog.at_level("WARNING", logger="shedder"), throttler:
        assert [call() for _ in range(3)] == ["503 Service Unavailable"] * 3
        now[0] += shedder._web.http.SHED_LOG_INTERVAL
        call()
    records = [r for r in caplog.records if r.name == "shedder"]
    assert len(records) == 2  # the first refusal, then one line for the next interval
    assert records[0].shedder_throttler == "logged"  # type: ignore[attr-defined]
    assert records[0].shedder_reason == "queue_full"  # type: ignore[attr-defined]
    assert records[1].shedder_suppressed == 2  # type: ignore[attr-defined]
    assert "2 more shed since the last line" in records[1].getMessage()


def test_quick_lane_refuses_an_environ_without_request_method() -> None:
    """A full throttler refuses before reading anything but the path: an environ missing a
    key PEP 3333 requires still gets the 503, never an error."""
    throttler = Throttler(max_concurrency=1, max_queue=0)
    mw = LoadSheddingMiddleware(hello, throttler)
    captured = Captured()
    with throttler.acquire():
        body = mw({"PATH_INFO": "/"}, captured)
    assert captured.status == "503 Service Unavailable"
    assert json.loads(b"".join(body))["reason"] == "queue_full"
