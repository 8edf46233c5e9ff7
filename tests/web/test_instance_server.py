"""A real multi-worker gunicorn: /health/load and the agent report the whole instance.

Slots are held in two different worker processes; whichever worker answers the probe (or the
agent's check) reports their sum, and a worker killed outright stops counting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shedder import ThrottlerStats
from shedder._web.instance import _process_start, _read
from shedder.agent import agent_reply
from tests.support.haproxy import App, gunicorn_app, uvicorn_app
from tests.support.net import wait_for

from . import instance_server_app
from .test_instance import plant

pytestmark = pytest.mark.server

WORKERS = 2
# examples/flask_app: the app-wide throttler (per worker) and the report route's.
APP_CONCURRENCY, APP_QUEUE = 16, 8
REPORT_CONCURRENCY, REPORT_QUEUE = 2, 4


def in_flight_by_worker(directory: Path, name: str = "app") -> dict[int, int]:
    """pid -> in_flight of the app-wide throttler, from the workers' published records."""
    counts = {}
    for path in directory.glob(f"{name}.*.shedder"):
        record = _read(path)
        if record is not None:
            counts[record.pid] = record.in_flight
    return counts


def agent_line(app: App) -> str:
    with socket.create_connection(("127.0.0.1", app.agent_port), timeout=5) as sock:
        data = b""
        while chunk := sock.recv(100):
            data += chunk
    return data.decode()


def expected_line(in_flight: int) -> str:
    app_stats = ThrottlerStats(
        "app", in_flight, 0, APP_CONCURRENCY * WORKERS, APP_QUEUE * WORKERS, 1.0, 0, 0
    )
    report = ThrottlerStats(
        "report", 0, 0, REPORT_CONCURRENCY * WORKERS, REPORT_QUEUE * WORKERS, 1.0, 0, 0
    )
    return agent_reply([app_stats, report])


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[App]:
    with gunicorn_app(workers=WORKERS, env={"SHEDDER_INSTANCE_DIR": str(tmp_path)}) as app:
        yield app


def hold_slots_in_every_worker(
    streams: contextlib.ExitStack, url: str, directory: Path, limit: int = APP_CONCURRENCY
) -> dict[int, int]:
    """Open streams until every worker holds at least one; returns pid -> streams held.

    Each stream is a new connection, and the kernel picks the worker that accepts it.
    """
    held: dict[int, int] = {}
    for _ in range(limit):
        client = streams.enter_context(httpx.Client(timeout=10))
        response = streams.enter_context(client.stream("GET", url))
        assert response.status_code == 200
        reader = response.iter_raw()
        streams.callback(reader.close)  # kept referenced: a dropped iterator closes its stream
        next(reader)  # the slot is held from here until we hang up
        total = sum(held.values()) + 1
        assert wait_for(lambda: sum(in_flight_by_worker(directory).values()) == total)  # noqa: B023
        held = {pid: n for pid, n in in_flight_by_worker(directory).items() if n}
        if len(held) == WORKERS:
            return held
    raise AssertionError(f"every stream landed in one worker: {held}")


def test_health_and_agent_sum_the_live_workers(instance: App, tmp_path: Path) -> None:
    with contextlib.ExitStack() as streams:
        held = hold_slots_in_every_worker(streams, f"{instance.url}/stream?lines=100", tmp_path)
        total = sum(held.values())

        # Whichever worker answers (a new connection each time), it reports the instance.
        for _ in range(6):
            health = httpx.get(f"{instance.url}/health/load", timeout=10).json()
            assert health["workers"] == WORKERS
            assert health["in_flight"] == total
            assert health["max_concurrency"] == APP_CONCURRENCY * WORKERS
            report = health["throttlers"][1]
            assert (report["name"], report["max_concurrency"]) == ("report", REPORT_CONCURRENCY * 2)
            # Every worker runs an agent on the same port (SO_REUSEPORT); each sums too.
            assert agent_line(instance) == expected_line(total)

        # A worker killed outright: its record no longer counts (and is removed).
        victim, lost = next(iter(held.items()))
        os.kill(victim, signal.SIGKILL)
        remaining = total - lost

        def dropped() -> bool:
            health = httpx.get(f"{instance.url}/health/load", timeout=10).json()
            return bool(health["in_flight"] == remaining)

        assert wait_for(dropped), "the dead worker's slots still count"
        assert not list(tmp_path.glob(f"app.{victim}.shedder"))
        # gunicorn replaces the worker; its agent publishes the new worker's (idle) record.
        assert wait_for(lambda: len(in_flight_by_worker(tmp_path)) == WORKERS)
        assert agent_line(instance) == expected_line(remaining)


def test_uvicorn_workers_report_the_instance(tmp_path: Path) -> None:
    env = {"SHEDDER_INSTANCE_DIR": str(tmp_path)}
    with (
        uvicorn_app("examples.starlette_app.app:app", workers=WORKERS, env=env) as url,
        contextlib.ExitStack() as streams,
    ):
        held = hold_slots_in_every_worker(streams, f"{url}/events?n=100", tmp_path)
        for _ in range(4):
            health = httpx.get(f"{url}/health/load", timeout=10).json()
            assert health["workers"] == WORKERS
            assert health["in_flight"] == sum(held.values())
            assert health["max_concurrency"] == 32 * WORKERS  # examples/starlette_app


# -- issue 19 and issue 18 on real servers: tests/instance_server_app.py ----------------------


@contextlib.contextmanager
def serve(server: str, directory: Path, *, extras: bool) -> Iterator[tuple[str, int | None]]:
    """The instance test app under ``server`` with 2 workers: (base URL, agent port or None)."""
    env = {"SHEDDER_INSTANCE_DIR": str(directory), "INSTANCE_APP_EXTRAS": "1" if extras else "0"}
    if server == "gunicorn":
        app = "tests.web.instance_server_app:wsgi"
        with gunicorn_app(workers=WORKERS, env=env, threads=8, app=app) as running:
            yield running.url, running.agent_port
    else:
        with uvicorn_app("tests.web.instance_server_app:asgi", workers=WORKERS, env=env) as url:
            yield url, None


def ask_agent(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        data = b""
        while chunk := sock.recv(100):
            data += chunk
    return data.decode()


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_odd_names_and_untrusted_records_never_fail_a_request(server: str, tmp_path: Path) -> None:
    """Issue 19: every request answered 500 with a second "default" throttler or a name like
    "api/v1"; a planted record with a pid that overflows a C int made every probe 500; pid 0
    or an unrelated live pid never expired; negative figures made the weight "up 712%"."""
    init_start = _process_start(1)
    assert init_start is not None
    expiring = [
        plant(tmp_path, "default.1099511627776.shedder", 2**40, in_flight=50),
        plant(tmp_path, "default.5.shedder", 0, in_flight=50),
        # This test process: alive, but it is no worker (its start time is not in the record).
        plant(tmp_path, f"default.{os.getpid()}.shedder", os.getpid(), start=1, in_flight=50),
    ]
    # pid 1 with its true start time counts as alive: its figures are what give it away.
    negative = plant(tmp_path, "default.1.shedder", 1, start=init_start, in_flight=-30)
    with serve(server, tmp_path, extras=True) as (url, agent_port):
        for path in ("/", "/static/x", "/health/live") * 3:
            assert httpx.get(url + path, timeout=10).status_code == 200, path
        # Each worker publishes when it first serves; each probe is a new connection.
        assert wait_for(lambda: httpx.get(f"{url}/health/load", timeout=10).json()["workers"] == 2)
        for _ in range(4):
            response = httpx.get(f"{url}/health/load", timeout=10)
            assert response.status_code == 200
            body = response.json()
            assert (body["status"], body["in_flight"], body["workers"]) == ("ok", 0, WORKERS)
            assert [
                (t["name"], t["max_concurrency"], t["workers"]) for t in body["throttlers"]
            ] == [
                ("default", 2 * WORKERS, WORKERS),
                ("default", 2 * WORKERS, WORKERS),
                ("api/v1", 2 * WORKERS, WORKERS),
                ("api", 2 * WORKERS, WORKERS),  # not summed with "api.v2"
                ("api.v2", 3 * WORKERS, WORKERS),
            ]
            if agent_port is not None:
                assert wait_for(lambda: ask_agent(agent_port) == "up 100%\n")  # streams end lazily
    for path in expiring:
        assert not path.exists(), path.name
    assert negative.exists()  # skipped, not summed; its (live) process may yet rewrite it


def fill_one_worker(streams: contextlib.ExitStack, url: str, directory: Path) -> dict[int, int]:
    """Open streams until one worker's slots are all held; returns pid -> streams held."""
    limit = instance_server_app.MAX_CONCURRENCY
    for opened in range(1, WORKERS * (limit - 1) + 2):
        client = streams.enter_context(httpx.Client(timeout=10))
        response = streams.enter_context(client.stream("GET", url))
        assert response.status_code == 200
        reader = response.iter_raw()
        streams.callback(reader.close)  # kept referenced: a dropped iterator closes its stream
        next(reader)
        assert wait_for(
            lambda: sum(in_flight_by_worker(directory, "default").values()) == opened  # noqa: B023
        )
        held = in_flight_by_worker(directory, "default")
        if limit in held.values():
            return held
    raise AssertionError(f"no worker filled up: {held}")


def test_one_full_worker_makes_the_instance_overloaded(tmp_path: Path) -> None:
    """Issue 18: with 2 workers, /health/load said 200 "ok" at a summed load of 0.97 while one
    worker refused every request."""
    with serve("gunicorn", tmp_path, extras=False) as (url, agent_port):
        assert agent_port is not None
        # A worker publishes its record on its first request: until both have served one, the
        # instance has one worker as far as anyone can tell (the kernel may hand every stream
        # below to the same worker).
        assert wait_for(
            lambda: httpx.get(f"{url}/health/load", timeout=10).json()["workers"] == WORKERS,
            timeout=20,
        )
        with contextlib.ExitStack() as streams:
            held = fill_one_worker(streams, f"{url}/stream?lines=100", tmp_path)
            total = sum(held.values())
            assert total < 2 * WORKERS  # the sum alone is below the threshold
            for _ in range(4):  # whichever worker answers
                response = httpx.get(f"{url}/health/load", timeout=10)
                body = response.json()
                assert response.status_code == 503
                assert (body["status"], body["in_flight"]) == ("overloaded", total)
                assert (body["workers"], body["shedding_workers"]) == (WORKERS, 1)
                assert ask_agent(agent_port) == "up 1%\n"
        assert wait_for(lambda: httpx.get(f"{url}/health/load", timeout=10).status_code == 200)
        assert wait_for(lambda: ask_agent(agent_port) == "up 100%\n")  # streams end lazily
