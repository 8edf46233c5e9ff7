"""Real servers for the tests: how each server (uvicorn, hypercorn, granian, daphne, gunicorn,
waitress) is told to serve an app, the tests' defaults for :class:`ServerProcess`, and the
saturation check every server must pass."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import httpx

from shedder._demo.servers import PACKAGE_ROOT, Command, Ready, ServerProcess
from tests.support.net import wait_for

REPO_DIR = Path(__file__).resolve().parents[2]
SRC_DIR = PACKAGE_ROOT  # this copy of shedder

# How each server is told to serve an app on 127.0.0.1:{port}; the app comes last.
COMMANDS: dict[str, list[str]] = {
    "uvicorn": ["uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"],
    "hypercorn": ["hypercorn", "--bind", "127.0.0.1:{port}"],
    "granian": ["granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", "{port}"],
    "daphne": ["daphne", "-b", "127.0.0.1", "-p", "{port}"],
    "gunicorn": ["gunicorn", "-k", "gthread", "--threads", "8", "--bind", "127.0.0.1:{port}"],
    "waitress": ["waitress", "--listen=127.0.0.1:{port}", "--threads=8"],
}


class StartServer(Protocol):
    """``server(command, ready=...)``: start a server, wait until it is ready, return it."""

    def __call__(
        self,
        command: Command,
        *,
        ready: Ready = None,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        ready_timeout: float = 30.0,
        grace: float = 10.0,
        log: Path | None = None,
        cwd: Path = REPO_DIR,
    ) -> ServerProcess: ...


def python_server(server: str, app: str, *args: str) -> Callable[[int], list[str]]:
    """The command that runs ``app`` (``module:attribute``) under ``server`` on a given port."""
    words = [*COMMANDS[server], *args, app]
    return lambda port: [sys.executable, "-m", *(word.format(port=port) for word in words)]


def server_process(
    command: Command,
    *,
    ready: Ready = None,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    ready_timeout: float = 30.0,
    grace: float = 10.0,
    log: Path | None = None,
    cwd: Path = REPO_DIR,
) -> ServerProcess:
    """A :class:`ServerProcess` (not started) with the tests' defaults: run from the repository
    root with it on ``PYTHONPATH``, so that apps import as ``tests.web.matrix_app:asgi_app``.

    Tests take the ``server`` fixture (tests/conftest.py); a module-scoped server uses this
    directly, as a context manager."""
    return ServerProcess(
        command,
        port=port,
        env=env,
        pythonpath=[REPO_DIR],
        cwd=cwd,
        ready=ready,
        ready_timeout=ready_timeout,
        grace=grace,
        log=log,
    )


def check_saturation(base_url: str, hold: str = "/hold", release: str = "/release") -> None:
    """One slot, no queue: while ``hold`` runs, a request gets 503 + Retry-After + JSON and
    ``/health/load`` answers 503; once ``release`` lets it finish, health is 200 again."""
    with httpx.Client(base_url=base_url, timeout=10) as client:
        assert client.get("/health/load").status_code == 200
        held: list[httpx.Response] = []
        holder = threading.Thread(target=lambda: held.append(client.get(hold)))
        holder.start()
        try:
            assert wait_for(lambda: client.get("/health/load").status_code == 503, timeout=10)
            refused = client.get(hold)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json() == {
                "error": "overloaded",
                "reason": "queue_full",
                "retry_after": 1,
            }
            health = client.get("/health/load")
            assert health.json()["status"] == "overloaded"
        finally:
            client.get(release)
            holder.join(timeout=10)
        assert [response.status_code for response in held] == [200]
        assert wait_for(lambda: client.get("/health/load").status_code == 200, timeout=10)
