"""shedder.flask: the shed_load view decorator and the Flask health route, in process."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import flask
import pytest

import shedder.flask
from shedder import Throttler, ThrottlerListener
from shedder.flask import HealthEndpoint, health_view, shed_load
from shedder.wsgi import LoadSheddingMiddleware


@pytest.fixture
def heavy() -> Throttler:
    return Throttler(max_concurrency=1, max_queue=0, retry_after=3, name="heavy")


def make_app(heavy: Throttler, **options: Any) -> tuple[flask.Flask, list[str]]:
    app = flask.Flask(__name__)
    calls: list[str] = []

    @app.get("/heavy")
    @shed_load(heavy, **options)
    def heavy_view() -> str:
        calls.append("heavy")
        return "done"

    @app.get("/stream")
    @shed_load(heavy)
    def stream_view() -> flask.Response:
        def chunks() -> Iterator[str]:
            yield "first "
            yield "last"

        return flask.Response(chunks(), mimetype="text/plain")

    @app.get("/boom")
    @shed_load(heavy)
    def boom_view() -> str:
        raise RuntimeError("boom")

    return app, calls


def test_decorated_view_runs_and_releases(heavy: Throttler) -> None:
    app, calls = make_app(heavy)
    with app.test_client().get("/heavy") as response:
        assert (response.status_code, response.data, calls) == (200, b"done", ["heavy"])
        assert heavy.in_flight == 1  # until the server (here: the test client) closes it
    assert heavy.in_flight == 0


def test_unclosed_response_slot_is_reclaimed(
    heavy: Throttler, caplog: pytest.LogCaptureFixture
) -> None:
    app, calls = make_app(heavy)
    client = app.test_client()
    # werkzeug's test client leaves unbuffered responses open; dropping one must not leak.
    assert client.get("/heavy").status_code == 200
    assert heavy.in_flight == 1
    assert client.get("/heavy").status_code == 200
    assert calls == ["heavy", "heavy"]
    assert "garbage-collected without close()" in caplog.text


def test_refusal_never_runs_the_view(heavy: Throttler) -> None:
    app, calls = make_app(heavy)
    with heavy.acquire():
        response = app.test_client().get("/heavy")
    assert calls == []
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3"
    assert response.json == {"error": "overloaded", "reason": "queue_full", "retry_after": 3}
    assert response.headers["Content-Length"] == str(len(response.data))


def test_status_code_429_and_timeout_override() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1, queue_timeout=60)
    app, _ = make_app(throttler, status_code=429, timeout=0.01)
    with throttler.acquire():
        response = app.test_client().get("/heavy")
    # timeout=0.01 overrides queue_timeout=60: refused after a short wait, not a minute.
    assert response.status_code == 429
    assert response.json is not None
    assert response.json["reason"] == "queue_timeout"


def test_streamed_response_holds_slot_until_closed(heavy: Throttler) -> None:
    app, _ = make_app(heavy)
    client = app.test_client()
    response = client.get("/stream", buffered=False)
    chunks = iter(response.response)
    assert next(chunks) == b"first "
    assert heavy.in_flight == 1
    assert client.get("/heavy").status_code == 503
    assert next(chunks) == b"last"
    response.close()
    assert heavy.in_flight == 0
    assert client.get("/heavy").status_code == 200


def test_exception_in_view_releases(heavy: Throttler) -> None:
    app, _ = make_app(heavy)
    app.testing = False  # let Flask turn the error into a 500 instead of re-raising
    response = app.test_client().get("/boom")
    assert response.status_code == 500
    assert heavy.in_flight == 0


def test_wraps_and_keyword_only_options(heavy: Throttler) -> None:
    def view() -> str:
        """Docs."""
        return "x"

    wrapped = shed_load(heavy)(view)
    assert (wrapped.__name__, wrapped.__doc__, wrapped.__wrapped__) == ("view", "Docs.", view)  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        shed_load(heavy, 429)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="503 or 429, got 500"):
        shed_load(heavy, status_code=500)
    with pytest.raises(TypeError, match=r"shedder\.Throttler"):
        shed_load(object())  # type: ignore[arg-type]


async def test_async_view_acquires_asynchronously(heavy: Throttler) -> None:
    app = flask.Flask(__name__)
    entered = threading.Event()

    @shed_load(heavy)
    async def view() -> str:
        entered.set()
        assert heavy.in_flight == 1
        return "async done"

    with app.test_request_context("/"):
        response = await view()
        assert (response.status_code, response.get_data()) == (200, b"async done")
        assert heavy.in_flight == 1  # held until the response is closed
        response.close()
        assert heavy.in_flight == 0
        with heavy.acquire():
            refused = await view()
        assert refused.status_code == 503
    assert entered.is_set()


def test_middleware_and_decorator_together(heavy: Throttler) -> None:
    app, calls = make_app(heavy)
    app.wsgi_app = LoadSheddingMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, max_concurrency=4, max_queue=0, name="app", health_throttlers=[heavy]
    )
    client = app.test_client()
    stream = client.get("/stream", buffered=False)
    next(iter(stream.response))
    health = client.get("/health/load")
    # The decorator's throttler is full, so the health endpoint reports shedding.
    assert health.status_code == 503
    assert health.json is not None
    by_name = {t["name"]: t for t in health.json["throttlers"]}
    assert (by_name["heavy"]["in_flight"], by_name["app"]["in_flight"]) == (1, 1)
    assert health.json["in_flight"] == 1  # the middleware's own at top level
    with client.get("/heavy") as refused:
        assert (refused.status_code, calls) == (503, [])
    stream.close()
    assert (heavy.in_flight, app.wsgi_app.throttler.in_flight) == (0, 0)
    with client.get("/heavy") as response:
        assert response.status_code == 200
    assert client.get("/health/load").status_code == 200


# -- health route --------------------------------------------------------------------------------


def test_health_endpoint_extension(heavy: Throttler) -> None:
    other = Throttler(max_concurrency=2, name="other")
    app = flask.Flask(__name__)
    HealthEndpoint(app, throttlers=[heavy, other])
    client = app.test_client()
    response = client.get("/health/load")
    assert response.status_code == 200
    assert response.json is not None
    assert [t["name"] for t in response.json["throttlers"]] == ["heavy", "other"]
    with heavy.acquire():
        assert client.get("/health/load").status_code == 503
    head = client.head("/health/load")
    assert (head.status_code, head.data) == (200, b"")
    assert client.post("/health/load").status_code == 405


def test_health_endpoint_init_app_reports_all_live_throttlers(heavy: Throttler) -> None:
    health = HealthEndpoint(path="/lb/load")
    app = flask.Flask(__name__)
    health.init_app(app)
    response = app.test_client().get("/lb/load")
    assert response.json is not None
    assert "heavy" in [t["name"] for t in response.json["throttlers"]]
    with pytest.raises(ValueError, match="path must start with '/'"):
        HealthEndpoint(path="lb")


def test_health_view_with_no_throttlers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shedder.flask, "throttlers", list)
    app = flask.Flask(__name__)
    app.add_url_rule("/health/load", view_func=health_view)
    response = app.test_client().get("/health/load")
    assert response.status_code == 200
    assert json.loads(response.data) == {"status": "ok", "throttlers": []}


class _Counting(ThrottlerListener):
    def __init__(self) -> None:
        self.released = 0

    def on_release(self, throttler: Throttler, held: float) -> None:
        self.released += 1


def test_each_decorated_request_releases_exactly_once(heavy: Throttler) -> None:
    counting = _Counting()
    heavy.add_listener(counting)
    app, _ = make_app(heavy)
    client = app.test_client()
    for _ in range(3):
        with client.get("/heavy") as response:
            assert response.status_code == 200
    assert counting.released == 3


def test_async_views_run_under_flask_with_the_extra(heavy: Throttler) -> None:
    """The ``flask`` extra installs ``flask[async]``: without asgiref every async view was 500."""
    app = flask.Flask(__name__)

    @app.get("/async")
    @shed_load(heavy)
    async def view() -> str:
        return "async done"

    with app.test_client().get("/async") as response:
        assert (response.status_code, response.get_data()) == (200, b"async done")
    assert heavy.in_flight == 0


def test_shed_load_above_the_route_decorator_is_an_error() -> None:
    app = flask.Flask(__name__)
    with pytest.raises(TypeError, match=r"above the route decorator of .*misplaced"):

        @shed_load(Throttler(max_concurrency=1))
        @app.get("/items")
        def misplaced() -> str:
            return "items"


def test_shed_load_outside_flask_says_so() -> None:
    # Quart runs views outside any Flask application context: refuse clearly, not with a 500.
    @shed_load(Throttler(max_concurrency=1))
    def view() -> str:
        return "ok"

    with pytest.raises(RuntimeError, match=r"Flask views only.*Quart"):
        view()


# -- priority and deadlines ----------------------------------------------------------------------


def test_an_unknown_priority_is_named_at_decoration(heavy: Throttler) -> None:
    with pytest.raises(ValueError, match=r"priority must be one of .*'bulk'"):
        shed_load(heavy, priority="bulk")


def test_priority_and_deadlines_on_a_flask_view() -> None:
    import time

    from shedder import current_deadline

    throttler = Throttler(max_concurrency=1, max_queue=4, queue_timeout=10.0)
    app = flask.Flask(__name__)
    seen: list[tuple[float, float | None]] = []
    inside, opened = threading.Event(), threading.Event()

    @app.get("/work")
    @shed_load(throttler, priority="sheddable")
    def work() -> str:
        if flask.request.args.get("hold"):
            inside.set()
            opened.wait(10)
        else:
            seen.append((flask.request.environ["shedder.deadline"], current_deadline()))
        return "done"

    @app.get("/async")
    @shed_load(throttler)
    async def async_work() -> str:
        seen.append((flask.request.environ["shedder.deadline"], current_deadline()))
        return "done"

    def get(path: str, headers: dict[str, str] | None = None) -> Any:
        with app.test_client().get(path, headers=headers or {}) as response:  # closed: slot freed
            return response

    before = time.monotonic()
    assert get("/work", {"grpc-timeout": "2S"}).data == b"done"
    assert get("/async", {"grpc-timeout": "2S"}).data == b"done"
    expired = get("/work", {"grpc-timeout": "0n"})
    holder = threading.Thread(target=get, args=("/work?hold=1",))
    holder.start()
    try:
        assert inside.wait(5)
        started = time.monotonic()
        late = get("/work", {"x-envoy-expected-rq-timeout-ms": "100"})
        waited = time.monotonic() - started
    finally:
        opened.set()
        holder.join(5)
    assert len(seen) == 2
    for deadline, current in seen:
        assert before + 1.9 < deadline <= time.monotonic() + 2.0
        assert current == deadline
    assert expired.status_code == 503
    assert expired.json == {"error": "overloaded", "reason": "deadline_exceeded", "retry_after": 1}
    assert expired.headers["x-shedder-refused"] == "1"
    assert late.json["reason"] == "deadline_exceeded"
    assert 0.09 <= waited < 1.0
    stats = throttler.stats()
    assert stats.admitted_by_priority["sheddable"] == 2
    assert stats.shed_by_priority["sheddable"]["deadline_exceeded"] == 2
    assert throttler.in_flight == 0
