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
from shedder._instance import _read
from shedder.agent import agent_reply

from .haproxy_helpers import App, gunicorn_app, uvicorn_app, wait_for

pytestmark = pytest.mark.server

WORKERS = 2
# examples/flask_app: the app-wide throttler (per worker) and the report route's.
APP_CONCURRENCY, APP_QUEUE = 16, 8
REPORT_CONCURRENCY, REPORT_QUEUE = 2, 4


def in_flight_by_worker(directory: Path) -> dict[int, int]:
    """pid -> in_flight of the app-wide throttler, from the workers' published records."""
    counts = {}
    for path in directory.glob("app.*.shedder"):
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
