"""The liveness path and the instance-wide health answer, in process (no server)."""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import wsgiref.util
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from shedder import Throttler
from shedder._web.http import health_response, live_response
from shedder._web.instance import InstanceTable, _read
from shedder.wsgi import LoadSheddingMiddleware


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("content-type", "text/plain")])
    return [b"hello"]


def call(
    middleware: LoadSheddingMiddleware, path: str, method: str = "GET"
) -> tuple[str, dict[str, str], bytes]:
    environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path}
    wsgiref.util.setup_testing_defaults(environ)
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured["status"], captured["headers"] = status, dict(headers)

    result = middleware(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return captured["status"], captured["headers"], body


def test_live_path_answers_200_even_while_shedding() -> None:
    middleware = LoadSheddingMiddleware(app, max_concurrency=1, max_queue=0)
    with middleware.throttler:  # full: every request is refused
        assert call(middleware, "/")[0].startswith("503")
        assert call(middleware, "/health/load")[0].startswith("503")
        status, headers, body = call(middleware, "/health/live")
        assert status == "200 OK"
        assert json.loads(body) == {"status": "alive"}
        assert headers["cache-control"] == "no-store"
        assert call(middleware, "/health/live", "HEAD")[2] == b""
        assert call(middleware, "/health/live", "POST")[0].startswith("405")
    assert middleware.throttler.stats().admitted_total == 1  # probes never took a slot


def test_live_path_can_move_or_go() -> None:
    moved = LoadSheddingMiddleware(app, max_concurrency=1, live_path="/livez")
    assert call(moved, "/livez")[0] == "200 OK"
    gone = LoadSheddingMiddleware(app, max_concurrency=1, live_path=None)
    assert call(gone, "/health/live")[2] == b"hello"  # the app's own route
    with pytest.raises(ValueError, match="live_path must be None or a path"):
        LoadSheddingMiddleware(app, max_concurrency=1, live_path="livez")
    assert live_response().status == 200


def test_health_reports_the_instance_with_a_table(tmp_path: Path) -> None:
    middleware = LoadSheddingMiddleware(app, max_concurrency=2, instance_dir=tmp_path, name="w")
    # Nothing is published until the middleware serves (a forking master never does).
    assert not list(tmp_path.iterdir())
    body = json.loads(call(middleware, "/health/load")[2])
    assert body["workers"] == 1
    assert body["max_concurrency"] == 2
    assert [p.name for p in tmp_path.iterdir()] == [f"w.{os.getpid()}.shedder"]


def test_health_without_a_table_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHEDDER_INSTANCE_DIR", raising=False)
    throttler = Throttler(max_concurrency=2)
    body = json.loads(health_response([throttler]).body)
    assert "workers" not in body
    middleware = LoadSheddingMiddleware(app, throttler)
    assert "workers" not in json.loads(call(middleware, "/health/load")[2])


def test_instance_dir_defaults_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHEDDER_INSTANCE_DIR", str(tmp_path))
    middleware = LoadSheddingMiddleware(app, max_concurrency=2, name="env")
    assert call(middleware, "/")[2] == b"hello"
    assert list(tmp_path.glob("env.*.shedder"))
    monkeypatch.setenv("SHEDDER_INSTANCE_DIR", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="existing directory"):
        LoadSheddingMiddleware(app, max_concurrency=2)


def _child_uses_inherited_throttler(throttler: Throttler, done: Any) -> None:
    with throttler, throttler:  # events in the child: must not touch the parent's record
        pass
    done.set()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
# Python 3.12+ warns about forking a process with threads; this child runs no threads' code.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_never_writes_the_parents_record(tmp_path: Path) -> None:
    throttler = Throttler(max_concurrency=4, name="forked")
    table = InstanceTable(tmp_path)
    table.publish(throttler)
    record = tmp_path / f"forked.{os.getpid()}.shedder"
    before = _read(record)
    context = multiprocessing.get_context("fork")
    done = context.Event()
    child = context.Process(target=_child_uses_inherited_throttler, args=(throttler, done))
    child.start()
    child.join(30)
    assert done.is_set()
    assert child.exitcode == 0
    assert _read(record) == before  # the parent's figures, untouched
    # The parent publishing again is a no-op, not a second writer on the same record.
    table.publish(throttler)
    with throttler:
        assert table.stats(throttler).in_flight == 1


def test_a_throttler_that_goes_away_stops_counting(tmp_path: Path) -> None:
    table = InstanceTable(tmp_path)
    throttler = Throttler(max_concurrency=4, name="gone")
    table.publish(throttler)
    assert list(tmp_path.glob("gone.*.shedder"))
    del throttler
    gc.collect()
    assert not list(tmp_path.glob("gone.*.shedder"))
    # The name is free again in this process.
    table.publish(Throttler(max_concurrency=4, name="gone"))


# -- issue 19 (1, 7) and issue 18: names, failures, the JSON's shape --------------------------


def test_health_lists_every_throttler_and_reports_the_worst() -> None:
    route = Throttler(max_concurrency=1, max_queue=0, name="route")
    middleware = LoadSheddingMiddleware(app, max_concurrency=4, name="own", health_throttlers=route)
    body = json.loads(call(middleware, "/health/load")[2])
    assert [t["name"] for t in body["throttlers"]] == ["own", "route"]
    alone = LoadSheddingMiddleware(app, max_concurrency=4, name="alone")
    assert [t["name"] for t in json.loads(call(alone, "/health/load")[2])["throttlers"]] == [
        "alone"
    ]  # used: no list with a single throttler
    with route:
        status, _, raw = call(middleware, "/health/load")
    body = json.loads(raw)
    assert status.startswith("503")
    # Top level: the worst status of all, the adapter's own figures (which are idle).
    assert (body["status"], body["name"], body["in_flight"], body["load"]) == (
        "overloaded",
        "own",
        0,
        0.0,
    )
    assert [(t["name"], t["status"], t["in_flight"]) for t in body["throttlers"]] == [
        ("own", "ok", 0),
        ("route", "overloaded", 1),
    ]


def test_throttlers_that_share_a_name_are_all_reported(tmp_path: Path) -> None:
    """A route throttler left at name="default" beside the middleware's: every request was 500."""
    route = Throttler(max_concurrency=1, max_queue=0)
    middleware = LoadSheddingMiddleware(
        app,
        max_concurrency=4,
        instance_dir=tmp_path,
        exempt=["/static/"],
        health_throttlers=[route, route],  # the same one twice is reported once
    )
    assert route.name == middleware.throttler.name == "default"
    for path in ("/", "/health/live", "/static/x"):
        assert call(middleware, path)[0] == "200 OK", path
    with route:
        status, _, raw = call(middleware, "/health/load")
    assert status.startswith("503")
    body = json.loads(raw)
    assert [(t["name"], t["max_concurrency"], t["in_flight"]) for t in body["throttlers"]] == [
        ("default", 4, 0),
        ("default", 1, 1),
    ]  # used: one entry, the second overwriting the first
    assert [t["workers"] for t in body["throttlers"]] == [1, 1]
    assert len(list(tmp_path.iterdir())) == 2


def test_a_name_that_is_no_file_name_works(tmp_path: Path) -> None:
    middleware = LoadSheddingMiddleware(
        app, max_concurrency=2, instance_dir=tmp_path, name="api/v1"
    )
    assert call(middleware, "/")[0] == "200 OK"  # used: 500 on every request
    body = json.loads(call(middleware, "/health/load")[2])
    assert (body["name"], body["workers"], body["admitted_total"]) == ("api/v1", 1, 1)


def test_no_request_fails_because_of_the_instance_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "instance"
    directory.mkdir(mode=0o700)
    middleware = LoadSheddingMiddleware(
        app, max_concurrency=2, instance_dir=directory, exempt=["/static/"], name="lost"
    )
    directory.rmdir()  # say, a cleanup job took it
    with caplog.at_level(logging.ERROR, logger="shedder"):
        for _ in range(3):
            for path in ("/", "/health/live", "/static/x"):
                assert call(middleware, path)[0] == "200 OK", path
            status, _, raw = call(middleware, "/health/load")
            assert status == "200 OK"
            assert json.loads(raw)["workers"] == 0  # this process's figures only
    assert len(caplog.records) == 2  # logged once for publishing, once for reading
