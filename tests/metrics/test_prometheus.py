"""shedder.prometheus: real exposition output, parsed back and checked against stats()."""

from __future__ import annotations

import asyncio
import gc
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import shedder
from shedder import Overloaded, Permit, Throttler, ThrottlerListener
from shedder.prometheus import DEFAULT_BUCKETS, instrument, metrics_response
from tests.support.servers import StartServer, python_server

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# Both implementations must expose the same thing; "multiprocess" here runs the per-event
# metric objects in this process (their files are exercised by the gunicorn test).
MODES = [pytest.param(False, id="collector"), pytest.param(True, id="objects")]


def scrape(registry: CollectorRegistry) -> Samples:
    response = metrics_response(registry)
    assert response.status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series of ``name`` that carry ``labels`` (e.g. over every class)."""
    wanted = set(labels.items())
    found = [v for (n, have), v in samples.items() if n == name and wanted <= have]
    assert found, f"no {name} series with {labels}"
    return sum(found)


def assert_matches_stats(samples: Samples, throttler: Throttler) -> None:
    stats = throttler.stats()
    name = throttler.name
    assert value(samples, "shedder_throttler_in_flight", throttler=name) == stats.in_flight
    assert value(samples, "shedder_throttler_queued", throttler=name) == stats.queued
    assert (
        value(samples, "shedder_throttler_concurrency_limit", throttler=name)
        == stats.max_concurrency
    )
    assert value(samples, "shedder_throttler_queue_limit", throttler=name) == stats.max_queue
    assert (
        total(samples, "shedder_throttler_admitted_total", throttler=name) == stats.admitted_total
    )
    for priority, count in stats.admitted_by_priority.items():
        assert (
            value(samples, "shedder_throttler_admitted_total", throttler=name, priority=priority)
            == count
        )
    assert (
        value(samples, "shedder_throttler_cancelled_total", throttler=name) == stats.cancelled_total
    )
    for reason, count in stats.shed_total.items():
        assert (
            total(samples, "shedder_throttler_shed_total", throttler=name, reason=reason) == count
        )
    for priority, shed in stats.shed_by_priority.items():
        for reason, count in shed.items():
            labels = {"throttler": name, "priority": priority, "reason": reason}
            assert value(samples, "shedder_throttler_shed_total", **labels) == count
    # Every admission is observed, fast path included.
    assert value(samples, "shedder_throttler_queue_wait_seconds_count", throttler=name) == (
        stats.admitted_total
    )


class QueueWatch(ThrottlerListener):
    """Lets a test wait until n arrivals have joined the queue."""

    def __init__(self) -> None:
        self.queued = 0
        self.changed = threading.Condition()

    def on_queue(self, throttler: Throttler, priority: str) -> None:
        with self.changed:
            self.queued += 1
            self.changed.notify_all()

    def wait_for(self, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.queued >= n, timeout=10)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.mark.parametrize("multiprocess", MODES)
def test_admitted_and_shed_are_labelled_by_class_never_by_flow(
    registry: CollectorRegistry, multiprocess: bool
) -> None:
    throttler = Throttler(
        max_concurrency=1,
        max_queue=1,
        queue_timeout=30,
        priorities=("gold", "silver", "bronze"),
        default_priority="silver",
        name="classes",
    )
    instrument(throttler, registry=registry, multiprocess=multiprocess)
    holder = throttler.acquire(priority="gold", flow="tenant-0")
    bronze = throttler.admit(priority="bronze", flow="tenant-1")
    silver = throttler.admit(flow="tenant-2")
    gold = throttler.admit(priority="gold", flow="tenant-3")
    # Each class's room (one place) is full now: the lowest class is refused, a higher one
    # takes the newest lower place.
    assert isinstance(throttler.admit(priority="bronze", flow="tenant-4"), Overloaded)
    late_silver = throttler.admit(flow="tenant-5")
    assert isinstance(bronze, shedder.Waiting)
    with pytest.raises(Overloaded):
        bronze.wait()
    assert isinstance(throttler.admit(flow="tenant-6"), Overloaded)  # no lower class waits
    waiting = [gold, silver, late_silver]
    holder.release()
    for decision in waiting:  # served highest class first
        assert isinstance(decision, shedder.Waiting)
        decision.wait().release()

    samples = scrape(registry)
    assert_matches_stats(samples, throttler)
    admitted = {
        p: value(samples, "shedder_throttler_admitted_total", throttler="classes", priority=p)
        for p in throttler.priorities
    }
    assert admitted == {"gold": 2, "silver": 2, "bronze": 0}
    for priority, shed in [("bronze", 2), ("silver", 1), ("gold", 0)]:
        labels = {"throttler": "classes", "priority": priority, "reason": "queue_full"}
        assert value(samples, "shedder_throttler_shed_total", **labels) == shed
    # Bounded labels: the classes and reasons, never a flow.
    names = {label for _, labels in samples for label, _ in labels}
    assert names <= {"throttler", "priority", "reason", "le"}
    values = {v for _, labels in samples for _, v in labels}
    assert not any(v.startswith("tenant") for v in values)


@pytest.mark.parametrize("multiprocess", MODES)
def test_values_match_stats_while_in_flight_queued_and_shedding(
    registry: CollectorRegistry, multiprocess: bool
) -> None:
    throttler = Throttler(max_concurrency=2, max_queue=2, queue_timeout=30, name="api")
    instrument(throttler, registry=registry, multiprocess=multiprocess)
    watch = QueueWatch()
    throttler.add_listener(watch)
    assert_matches_stats(scrape(registry), throttler)

    held = [throttler.acquire(), throttler.acquire()]
    waiter_permits: list[Permit] = []
    admitted = threading.Semaphore(0)
    finish = threading.Event()

    def wait_in_queue() -> None:
        with throttler.acquire() as permit:
            waiter_permits.append(permit)
            admitted.release()
            finish.wait(10)

    threads = [threading.Thread(target=wait_in_queue) for _ in range(2)]
    for thread in threads:
        thread.start()
    watch.wait_for(2)
    with pytest.raises(Overloaded) as refused:
        throttler.acquire()
    assert refused.value.reason == "queue_full"

    samples = scrape(registry)
    assert_matches_stats(samples, throttler)
    assert value(samples, "shedder_throttler_in_flight", throttler="api") == 2
    assert value(samples, "shedder_throttler_queued", throttler="api") == 2
    assert total(samples, "shedder_throttler_shed_total", throttler="api", reason="queue_full") == 1

    # Each release hands its slot straight to a waiter.
    for permit in held:
        permit.release()
    for _ in threads:
        assert admitted.acquire(timeout=10)
    samples = scrape(registry)
    assert_matches_stats(samples, throttler)
    assert value(samples, "shedder_throttler_queued", throttler="api") == 0
    assert value(samples, "shedder_throttler_in_flight", throttler="api") == 2
    assert value(samples, "shedder_throttler_slot_hold_seconds_count", throttler="api") == 2
    # Two fast-path admissions (0 s); the two waiters waited > 0, recorded in the sum.
    assert value(samples, "shedder_throttler_queue_wait_seconds_count", throttler="api") == 4
    assert value(
        samples, "shedder_throttler_queue_wait_seconds_sum", throttler="api"
    ) == pytest.approx(sum(p.waited for p in waiter_permits))

    finish.set()
    for thread in threads:
        thread.join(10)
    samples = scrape(registry)
    assert_matches_stats(samples, throttler)
    assert value(samples, "shedder_throttler_in_flight", throttler="api") == 0
    assert value(samples, "shedder_throttler_slot_hold_seconds_count", throttler="api") == 4


@pytest.mark.parametrize("multiprocess", MODES)
def test_overloaded_and_queue_timeout_are_counted_by_reason(
    registry: CollectorRegistry, multiprocess: bool
) -> None:
    throttler = Throttler(max_concurrency=1, max_queue=3, shed_threshold=0.5, name="t")
    instrument(throttler, registry=registry, multiprocess=multiprocess)
    with throttler:
        # load (1 + 0) / 4 = 0.25 < 0.5: may wait, and times out after a short real wait.
        with pytest.raises(Overloaded) as timed_out:
            throttler.acquire(timeout=0.01)
        assert timed_out.value.reason == "queue_timeout"
        watch = QueueWatch()
        throttler.add_listener(watch)
        thread = threading.Thread(target=throttler.acquire, args=(10,))
        thread.start()
        watch.wait_for(1)
        # load (1 + 1) / 4 = 0.5 >= 0.5: refused at once.
        with pytest.raises(Overloaded) as overloaded:
            throttler.acquire()
        assert overloaded.value.reason == "overloaded"
        samples = scrape(registry)
        assert_matches_stats(samples, throttler)
        assert value(samples, "shedder_throttler_queued", throttler="t") == 1
    thread.join(10)
    samples = scrape(registry)
    assert_matches_stats(samples, throttler)
    for reason in ("overloaded", "queue_timeout"):
        assert total(samples, "shedder_throttler_shed_total", throttler="t", reason=reason) == 1
    # The thread took the handed-over slot and never released it.
    assert value(samples, "shedder_throttler_in_flight", throttler="t") == 1


@pytest.mark.parametrize("multiprocess", MODES)
async def test_cancelled_waiter_leaves_queue_and_is_counted(
    registry: CollectorRegistry, multiprocess: bool
) -> None:
    throttler = Throttler(max_concurrency=1, max_queue=2, queue_timeout=30, name="async")
    instrument(throttler, registry=registry, multiprocess=multiprocess)
    watch = QueueWatch()
    throttler.add_listener(watch)
    async with throttler:
        task = asyncio.create_task(throttler.acquire_async())
        await asyncio.to_thread(watch.wait_for, 1)
        assert value(scrape(registry), "shedder_throttler_queued", throttler="async") == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        samples = scrape(registry)
        assert_matches_stats(samples, throttler)
        assert value(samples, "shedder_throttler_queued", throttler="async") == 0
        assert value(samples, "shedder_throttler_cancelled_total", throttler="async") == 1
    assert_matches_stats(scrape(registry), throttler)


@pytest.mark.parametrize("multiprocess", MODES)
def test_gauges_return_to_zero_after_racing_threads(
    registry: CollectorRegistry, multiprocess: bool
) -> None:
    # The per-event implementation counts up and down; any misclassified event would leave
    # in_flight or queued off for good once the throttler is idle again.
    throttler = Throttler(max_concurrency=2, max_queue=2, queue_timeout=0.005, name="race")
    instrument(throttler, registry=registry, multiprocess=multiprocess)
    start = threading.Barrier(6)

    def hammer() -> None:
        start.wait()
        for _ in range(300):
            try:
                throttler.acquire().release()
            except Overloaded:
                pass

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    samples = scrape(registry)
    assert_matches_stats(samples, throttler)
    assert value(samples, "shedder_throttler_in_flight", throttler="race") == 0
    assert value(samples, "shedder_throttler_queued", throttler="race") == 0
    stats = throttler.stats()
    assert stats.admitted_total + sum(stats.shed_total.values()) == 6 * 300


def test_hold_histogram_puts_a_long_hold_in_the_right_buckets(registry: CollectorRegistry) -> None:
    throttler = Throttler(max_concurrency=1, name="hold")
    instrument(throttler, registry=registry, buckets=(0.001, 0.01))
    permit = throttler.acquire()
    done = threading.Event()
    # Simulated work: a timer releases the slot after at least 20 ms.
    threading.Timer(0.02, lambda: (permit.release(), done.set())).start()
    assert done.wait(10)
    samples = scrape(registry)
    bucket = "shedder_throttler_slot_hold_seconds_bucket"
    assert value(samples, bucket, throttler="hold", le="0.001") == 0
    assert value(samples, bucket, throttler="hold", le="0.01") == 0
    assert value(samples, bucket, throttler="hold", le="+Inf") == 1
    assert value(samples, "shedder_throttler_slot_hold_seconds_sum", throttler="hold") >= 0.02
    wait_bucket = "shedder_throttler_queue_wait_seconds_bucket"
    assert value(samples, wait_bucket, throttler="hold", le="0.001") == 1


@pytest.mark.parametrize("multiprocess", MODES)
def test_several_throttlers_share_one_registry(
    registry: CollectorRegistry, multiprocess: bool
) -> None:
    global_throttler = Throttler(max_concurrency=8, name="global")
    route = Throttler(max_concurrency=2, max_queue=0, name="/upload")
    instrument(global_throttler, registry=registry, multiprocess=multiprocess)
    instrument(route, registry=registry, multiprocess=multiprocess)
    other = instrument(route, registry=registry, prefix="app_", multiprocess=multiprocess)
    with global_throttler, route:
        samples = scrape(registry)
        assert_matches_stats(samples, global_throttler)
        assert_matches_stats(samples, route)
        assert value(samples, "app_throttler_in_flight", throttler="/upload") == 1
    assert other.prefix == "app_"
    same_name = Throttler(max_concurrency=1, name="global")
    with pytest.raises(ValueError, match="'global' is already instrumented"):
        instrument(same_name, registry=registry, multiprocess=multiprocess)
    with pytest.raises(ValueError, match="multiprocess="):
        instrument(same_name, registry=registry, prefix="app_", multiprocess=not multiprocess)


def test_detach_removes_the_series_and_the_listener(registry: CollectorRegistry) -> None:
    throttler = Throttler(max_concurrency=1, name="gone")
    metrics = instrument(throttler, registry=registry)
    assert ("shedder_throttler_in_flight", frozenset({("throttler", "gone")})) in scrape(registry)
    metrics.detach()
    metrics.detach()  # idempotent
    assert not metrics.attached
    assert ("shedder_throttler_in_flight", frozenset({("throttler", "gone")})) not in scrape(
        registry
    )
    assert throttler._listeners == ()
    # The name is free again.
    again = instrument(throttler, registry=registry)
    assert again.attached


def test_objects_detach_zeroes_this_process_gauges(registry: CollectorRegistry) -> None:
    throttler = Throttler(max_concurrency=3, name="mp")
    metrics = instrument(throttler, registry=registry, multiprocess=True)
    permit = throttler.acquire()
    assert value(scrape(registry), "shedder_throttler_in_flight", throttler="mp") == 1
    metrics.detach()
    permit.release()
    samples = scrape(registry)
    assert value(samples, "shedder_throttler_in_flight", throttler="mp") == 0
    assert value(samples, "shedder_throttler_concurrency_limit", throttler="mp") == 0
    assert total(samples, "shedder_throttler_admitted_total", throttler="mp") == 1


def test_instrumenting_a_busy_throttler_starts_from_its_state(registry: CollectorRegistry) -> None:
    throttler = Throttler(max_concurrency=2, name="busy")
    permit = throttler.acquire()
    instrument(throttler, registry=registry, multiprocess=True)
    assert value(scrape(registry), "shedder_throttler_in_flight", throttler="busy") == 1
    permit.release()
    assert value(scrape(registry), "shedder_throttler_in_flight", throttler="busy") == 0


def test_a_garbage_collected_throttler_frees_its_name(registry: CollectorRegistry) -> None:
    instrument(Throttler(max_concurrency=1, name="temp"), registry=registry)
    # The handle was dropped and nothing else holds the throttler.
    gc.collect()
    assert ("shedder_throttler_in_flight", frozenset({("throttler", "temp")})) not in scrape(
        registry
    )
    instrument(Throttler(max_concurrency=1, name="temp"), registry=registry)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prefix": "2bad"}, ValueError, "prefix must match"),
        ({"prefix": "a-b_"}, ValueError, "prefix must match"),
        ({"buckets": ()}, ValueError, "at least one finite bound"),
        ({"buckets": (1.0, 0.5)}, ValueError, "strictly increasing"),
        ({"buckets": "0.1"}, TypeError, "sequence of seconds"),
    ],
)
def test_configuration_errors_name_the_parameter(
    registry: CollectorRegistry, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        instrument(Throttler(1), registry=registry, **kwargs)  # type: ignore[arg-type]


def test_rejects_non_throttler_and_bucket_mismatch(registry: CollectorRegistry) -> None:
    with pytest.raises(TypeError, match=r"shedder\.Throttler"):
        instrument(object(), registry=registry)  # type: ignore[arg-type]
    instrument(Throttler(1, name="a"), registry=registry)
    with pytest.raises(ValueError, match="buckets"):
        instrument(Throttler(1, name="b"), registry=registry, buckets=(0.5,))
    assert DEFAULT_BUCKETS[0] == 0.001
    assert DEFAULT_BUCKETS[-1] >= 30


def test_metrics_response_content_negotiation(registry: CollectorRegistry) -> None:
    instrument(Throttler(1, name="neg"), registry=registry)
    text = metrics_response(registry)
    assert text.headers[0][1].startswith("text/plain")
    assert ("content-length", str(len(text.body))) in text.headers
    om = metrics_response(registry, accept="application/openmetrics-text; version=1.0.0")
    assert om.headers[0][1].startswith("application/openmetrics-text")
    assert om.body.endswith(b"# EOF\n")


@pytest.fixture
def multiproc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    path = str(tmp_path)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", path)
    return path


def test_metrics_response_aggregates_worker_files_in_multiprocess_mode(
    multiproc_dir: str,
) -> None:
    # No worker wrote a file yet: a fresh MultiProcessCollector registry is empty, whereas the
    # global REGISTRY would show this process's python_gc_* and process_* metrics.
    body = metrics_response().body
    assert body == b""


def test_multiprocess_is_detected_from_the_environment(
    multiproc_dir: str, registry: CollectorRegistry
) -> None:
    assert instrument(Throttler(1, name="env"), registry=registry).multiprocess


def test_import_shedder_does_not_import_prometheus_client() -> None:
    code = "import sys, shedder; print('prometheus_client' in sys.modules)"
    src = os.path.dirname(os.path.dirname(shedder.__file__))
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "False", out.stderr
    assert shedder.__name__ == "shedder"


# -- gunicorn, two worker processes, multiprocess mode ------------------------------------------

GUNICORN_APP = """
import os
import socket

from shedder import Overloaded, Throttler
from shedder._web.http import shed_response
from shedder.prometheus import instrument, metrics_response

CONTROL = ("127.0.0.1", int(os.environ["SHEDDER_TEST_CONTROL_PORT"]))
throttler = Throttler(max_concurrency=1, max_queue=0, name="app")
instrument(throttler)


def respond(start_response, response):
    start_response(response.status_line, list(response.headers))
    return [response.body]


def app(environ, start_response):
    if environ["PATH_INFO"] == "/metrics":
        return respond(start_response, metrics_response(accept=environ.get("HTTP_ACCEPT")))
    try:
        permit = throttler.acquire()
    except Overloaded as exc:
        return respond(start_response, shed_response(exc))
    try:
        # Tell the test which worker holds a slot, then hold it until the test hangs up.
        with socket.create_connection(CONTROL) as control:
            control.sendall(b"%d\\n" % os.getpid())
            control.recv(1)
    finally:
        permit.release()
    body = str(os.getpid()).encode()
    start_response("200 OK", [("content-type", "text/plain"), ("content-length", str(len(body)))])
    return [body]
"""


@pytest.fixture
def gunicorn_app(server: StartServer, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A gunicorn with 2 gthread workers in multiprocess mode; yields (base URL, control)."""
    control = socket.socket()
    control.bind(("127.0.0.1", 0))
    control.listen(32)
    (tmp_path / "app.py").write_text(GUNICORN_APP)
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir),
        "SHEDDER_TEST_CONTROL_PORT": str(control.getsockname()[1]),
    }
    options = ["-w", "2", "--threads", "4", "--chdir", str(tmp_path)]
    with control:
        app = server(python_server("gunicorn", "app:app", *options), ready="/metrics", env=env)
        yield app.url, control


def _scrape_url(url: str) -> Samples:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


@pytest.mark.server
def test_gunicorn_two_workers_aggregate_in_multiprocess_mode(
    gunicorn_app: tuple[str, socket.socket],
) -> None:
    url, control = gunicorn_app
    events: queue.Queue[tuple[str, object]] = queue.Queue()

    def accept_holders() -> None:
        while True:
            try:
                conn, _ = control.accept()
            except OSError:  # closed by the fixture
                return
            pid = int(conn.makefile("rb").readline())
            events.put(("held", (pid, conn)))

    threading.Thread(target=accept_holders, daemon=True).start()
    holders: dict[int, socket.socket] = {}
    held_requests: list[Future[httpx.Response]] = []
    shed = 0
    with ThreadPoolExecutor(max_workers=8) as pool:
        # Each worker has one slot: a /hold lands on a free worker and holds it, or on a busy
        # one and is shed at once. Keep going until both workers hold a slot.
        for _ in range(60):
            if len(holders) == 2:
                break
            request = pool.submit(httpx.get, f"{url}/hold", timeout=30)
            request.add_done_callback(lambda done: events.put(("done", done)))
            kind, payload = events.get(timeout=20)
            if kind == "held":
                pid, conn = payload  # type: ignore[misc]
                assert pid not in holders, "a worker admitted two requests with one slot"
                holders[pid] = conn
                held_requests.append(request)
            else:
                response = request.result()
                assert response.status_code == 503
                assert response.json()["reason"] == "queue_full"
                shed += 1
        assert len(holders) == 2, "the requests never reached the second worker"
        # Both workers are full now: these are shed whichever worker takes them.
        for _ in range(3):
            response = httpx.get(f"{url}/hold", timeout=10)
            assert response.status_code == 503
            shed += 1

        samples = _scrape_url(url)
        assert (
            value(samples, "shedder_throttler_in_flight", throttler="app") == 2
        )  # livesum over workers
        assert value(samples, "shedder_throttler_queued", throttler="app") == 0
        assert value(samples, "shedder_throttler_concurrency_limit", throttler="app") == 2
        assert value(samples, "shedder_throttler_queue_limit", throttler="app") == 0
        assert total(samples, "shedder_throttler_admitted_total", throttler="app") == 2
        labels = {"throttler": "app", "priority": "default", "reason": "queue_full"}
        assert value(samples, "shedder_throttler_shed_total", **labels) == shed
        assert value(samples, "shedder_throttler_queue_wait_seconds_count", throttler="app") == 2

        for conn in holders.values():
            conn.close()
        bodies = {int(request.result().text) for request in held_requests}
        assert bodies == set(holders)

    samples = _scrape_url(url)
    assert value(samples, "shedder_throttler_in_flight", throttler="app") == 0
    assert total(samples, "shedder_throttler_admitted_total", throttler="app") == 2
    assert value(samples, "shedder_throttler_slot_hold_seconds_count", throttler="app") == 2
    assert (
        total(samples, "shedder_throttler_shed_total", throttler="app", reason="queue_full") == shed
    )


def test_metrics_path_serves_every_reported_throttler_from_the_first_scrape() -> None:
    # No instrument() call: add_middleware builds the middleware on the first request, and
    # that first request is the scrape itself.
    import asyncio

    import httpx
    from starlette.applications import Starlette

    from shedder.asgi import LoadSheddingMiddleware

    registry = CollectorRegistry()
    reports = Throttler(max_concurrency=1, name="reports-route")
    app = Starlette()
    app.add_middleware(
        LoadSheddingMiddleware,
        max_concurrency=2,
        name="app-wide",
        health_throttlers=[reports],
        metrics_path="/metrics",
        metrics_registry=registry,
    )

    async def first_scrape() -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get("/metrics")).text

    text = asyncio.run(first_scrape())
    assert 'shedder_throttler_concurrency_limit{throttler="app-wide"} 2.0' in text
    assert 'shedder_throttler_concurrency_limit{throttler="reports-route"} 1.0' in text


def test_metrics_path_keeps_an_instrument_of_your_own(caplog: pytest.LogCaptureFixture) -> None:
    from shedder.wsgi import LoadSheddingMiddleware

    registry = CollectorRegistry()
    throttler = Throttler(max_concurrency=1, name="mine")
    metrics = instrument(throttler, registry=registry)
    LoadSheddingMiddleware(
        lambda e, s: [], throttler, metrics_path="/metrics", metrics_registry=registry
    )
    assert metrics.attached
    namesake = Throttler(max_concurrency=1, name="mine")
    LoadSheddingMiddleware(
        lambda e, s: [], namesake, metrics_path="/metrics", metrics_registry=registry
    )
    assert "another one already has that name" in caplog.text
    assert value(scrape(registry), "shedder_throttler_concurrency_limit", throttler="mine") == 1


@pytest.mark.parametrize("multiprocess", MODES)
def test_refusals_of_the_quick_lane_are_counted(multiprocess: bool) -> None:
    """A full throttler refuses in the middlewares' quick lane, without the lock: the
    exposition still counts every refusal, by class and reason, as stats() does."""
    import wsgiref.util

    from shedder.asgi import LoadSheddingMiddleware as AsgiMiddleware
    from shedder.wsgi import LoadSheddingMiddleware as WsgiMiddleware

    registry = CollectorRegistry()
    throttler = Throttler(max_concurrency=1, max_queue=0, name="lane")
    instrument(throttler, registry=registry, multiprocess=multiprocess)

    def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("a refused request must not reach the app")

    wsgi = WsgiMiddleware(wsgi_app, throttler)
    asgi = AsgiMiddleware(asgi_app, throttler)
    assert wsgi._quick is not None  # the lane is what this test is about
    assert asgi._quick is not None
    statuses: list[str] = []

    async def refuse_asgi() -> None:
        async def receive() -> Any:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            if message["type"] == "http.response.start":
                statuses.append(str(message["status"]))

        scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "client": None}
        for _ in range(2):
            await asgi(scope, receive, send)

    with throttler.acquire():
        for _ in range(3):
            environ: dict[str, Any] = {}
            wsgiref.util.setup_testing_defaults(environ)
            wsgi(environ, lambda status, headers, exc_info=None: statuses.append(status[:3]))
        asyncio.run(refuse_asgi())
        samples = scrape(registry)
        assert_matches_stats(samples, throttler)
    assert statuses == ["503"] * 5
    assert throttler.stats().shed_total["queue_full"] == 5
    shed = total(samples, "shedder_throttler_shed_total", throttler="lane", reason="queue_full")
    assert shed == 5
