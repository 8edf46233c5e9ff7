"""shedder.wsgi and shedder.flask under a real gunicorn gthread worker, driven by httpx."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.support.net import wait_for
from tests.support.servers import StartServer, python_server, server_process

pytestmark = pytest.mark.server

# Must match tests/web/wsgi_server_app.py.
MAX_CONCURRENCY = 4
MAX_QUEUE = 4
# gthread sizing: every request in flight or queued in shedder holds a worker thread, so the
# pool needs max_concurrency + max_queue threads plus spare ones for health, stats and refusals.
THREADS = MAX_CONCURRENCY + MAX_QUEUE + 8


def gunicorn(app: str) -> Callable[[int], list[str]]:
    """One gthread worker with THREADS threads serving ``app`` (later options win)."""
    options = ["--threads", str(THREADS), "--workers", "1", "--graceful-timeout", "2"]
    return python_server("gunicorn", app, *options)


@pytest.fixture(scope="module")
def gunicorn_url() -> Iterator[str]:
    """One gunicorn for the module: the tests reset its state through ``/reset``."""
    command = gunicorn("tests.web.wsgi_server_app:application")
    with server_process(command, ready="/health/load") as process:
        yield process.url


@pytest.fixture
def client(gunicorn_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gunicorn_url, timeout=30) as client:
        client.post("/reset").raise_for_status()
        yield client


def health(client: httpx.Client) -> dict[str, Any]:
    data: dict[str, Any] = client.get("/health/load").json()
    return data


def in_background(base_url: str, path: str, results: list[httpx.Response]) -> threading.Thread:
    def run() -> None:
        with httpx.Client(base_url=base_url, timeout=30) as own:
            results.append(own.get(path))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_saturated_slow_view_sheds_fast_and_recovers(
    gunicorn_url: str, client: httpx.Client
) -> None:
    results: list[httpx.Response] = []
    threads = [
        in_background(gunicorn_url, "/slow?gate=saturate", results)
        for _ in range(MAX_CONCURRENCY + MAX_QUEUE)
    ]
    assert wait_for(lambda: health(client)["queued"] == MAX_QUEUE)
    load = client.get("/health/load")
    assert load.status_code == 503
    assert load.json()["status"] == "overloaded"
    assert load.json()["in_flight"] == MAX_CONCURRENCY

    timings = []
    for _ in range(7):
        started = time.perf_counter()
        refused = client.get("/slow?gate=never-opened")
        timings.append(time.perf_counter() - started)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "3"
        assert refused.json() == {"error": "overloaded", "reason": "queue_full", "retry_after": 3}
    # About a millisecond when idle; loose bound because the test machine is shared and busy.
    assert statistics.median(timings) < 0.25

    client.get("/open?gate=saturate").raise_for_status()
    for thread in threads:
        thread.join(30)
    assert [r.status_code for r in results] == [200] * (MAX_CONCURRENCY + MAX_QUEUE)
    assert client.get("/stats").json()["peak"] == MAX_CONCURRENCY
    assert wait_for(lambda: client.get("/health/load").status_code == 200)
    assert health(client)["in_flight"] == 0


def test_burst_never_exceeds_max_concurrency(gunicorn_url: str, client: httpx.Client) -> None:
    results: list[httpx.Response] = []
    threads = [in_background(gunicorn_url, "/work?ms=100", results) for _ in range(24)]
    for thread in threads:
        thread.join(30)
    statuses = [r.status_code for r in results]
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= MAX_CONCURRENCY
    assert 1 <= client.get("/stats").json()["peak"] <= MAX_CONCURRENCY


def test_streaming_response_keeps_its_slot_until_last_chunk(client: httpx.Client) -> None:
    with client.stream("GET", "/stream?gate=stream") as response:
        lines = response.iter_lines()
        assert next(lines) == "first"
        # The view has returned long ago; the slot stays taken while the body streams.
        assert health(client)["in_flight"] == 1
        client.get("/open?gate=stream").raise_for_status()
        assert list(lines) == ["last"]
    assert wait_for(lambda: health(client)["in_flight"] == 0)


def test_exception_frees_its_slot(client: httpx.Client) -> None:
    assert client.get("/boom").status_code == 500
    assert wait_for(lambda: health(client)["in_flight"] == 0)
    assert health(client)["admitted_total"] >= 1


def test_file_response_keeps_gunicorn_file_wrapper_and_frees_slot(client: httpx.Client) -> None:
    response = client.get("/file")
    assert response.status_code == 200
    assert response.content == b"0123456789" * 10_000  # FILE_BODY in wsgi_server_app
    # gunicorn got its own FileWrapper back, so it could use sendfile.
    assert client.get("/stats").json()["file_results"] == [True]
    assert wait_for(lambda: health(client)["in_flight"] == 0)


def test_flask_decorator_behind_the_middleware(gunicorn_url: str, client: httpx.Client) -> None:
    results: list[httpx.Response] = []
    first = in_background(gunicorn_url, "/heavy?gate=heavy", results)
    assert wait_for(lambda: health(client)["throttlers"][1]["in_flight"] == 1)
    refused = client.get("/heavy?gate=heavy")
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "2"
    assert refused.json()["reason"] == "queue_full"
    # The health endpoint reports the decorator's throttler too, and it is full.
    assert client.get("/health/load").status_code == 503
    client.get("/open?gate=heavy").raise_for_status()
    first.join(30)
    assert [r.status_code for r in results] == [200]
    assert wait_for(lambda: client.get("/health/load").status_code == 200)


def test_example_app_runs_with_the_documented_command(server: StartServer) -> None:
    app = server(gunicorn("examples.flask_app.app:app"), ready="/health/load")
    with httpx.Client(base_url=app.url, timeout=10) as client:
        assert client.get("/").status_code == 200
        assert client.post("/checkout").json()["priority"] == "critical"
        assert client.get("/prefetch").json()["priority"] == "sheddable"
        assert client.get("/report").status_code == 200
        with client.stream("GET", "/stream?lines=2") as response:
            assert len(list(response.iter_lines())) == 2
        load = client.get("/health/load").json()
        assert [t["name"] for t in load["throttlers"]] == ["app", "report"]
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert "text/plain" in metrics.headers["content-type"]
