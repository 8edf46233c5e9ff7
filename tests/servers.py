"""Start a real server (uvicorn, hypercorn, granian, daphne, gunicorn, waitress) on 127.0.0.1,
and the saturation check every server must pass."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

from .net import free_port, wait_for

REPO_DIR = Path(__file__).resolve().parents[1]

# How each server is told to serve APP on 127.0.0.1:PORT.
COMMANDS: dict[str, list[str]] = {
    "uvicorn": ["uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"],
    "hypercorn": ["hypercorn", "--bind", "127.0.0.1:{port}"],
    "granian": ["granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", "{port}"],
    "daphne": ["daphne", "-b", "127.0.0.1", "-p", "{port}"],
    "gunicorn": ["gunicorn", "-k", "gthread", "--threads", "8", "--bind", "127.0.0.1:{port}"],
    "waitress": ["waitress", "--listen=127.0.0.1:{port}", "--threads=8"],
}


@contextlib.contextmanager
def serve(
    server: str, app: str, env: Mapping[str, str] | None = None, ready_path: str = "/health/live"
) -> Iterator[str]:
    """Run ``app`` (``module:attribute``) under ``server``; yields the base URL."""
    port = free_port()
    command = [arg.format(port=port) for arg in COMMANDS[server]]
    environment = {**os.environ, **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", *command, app],
        cwd=REPO_DIR,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base_url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            return True
        try:
            return httpx.get(base_url + ready_path, timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        if not wait_for(ready, timeout=30) or process.poll() is not None:
            process.kill()
            _, err = process.communicate(timeout=10)
            raise RuntimeError(f"{server} did not start:\n{err.decode()[-3000:]}")
        yield base_url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()


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
