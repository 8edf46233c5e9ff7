"""Real servers for the load-balancer tests: the example app under gunicorn, HAProxy in front.

Everything binds to 127.0.0.1 on free ports; every process is started and stopped by
``server_process`` (the ``server`` fixture's function), whatever happens in the test.
"""

from __future__ import annotations

import contextlib
import csv
import io
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from shedder._demo.servers import ServerProcess
from tests.support.net import free_port
from tests.support.servers import REPO_DIR, python_server, server_process

EXAMPLE_DIR = REPO_DIR / "examples" / "haproxy"


@dataclass
class App:
    url: str
    port: int
    agent_port: int
    process: subprocess.Popen[bytes]
    server: ServerProcess


@contextlib.contextmanager
def gunicorn_app(
    *,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    threads: int = 32,
    app: str = "examples.haproxy.app:app",
) -> Iterator[App]:
    """``app`` (default: the Flask example + agent) under gunicorn gthread."""
    agent_port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-c", str(EXAMPLE_DIR / "gunicorn.conf.py")]
    command += ["-k", "gthread", "--threads", str(threads), "--workers", str(workers)]
    command += ["--graceful-timeout", "1", "--bind", "127.0.0.1:{port}", app]
    environment = {"SHEDDER_AGENT_PORT": str(agent_port), **(env or {})}
    with server_process(
        lambda port: [word.format(port=port) for word in command],
        env=environment,
        ready="/health/live",
    ) as server:
        assert server.process is not None
        yield App(server.url, server.port, agent_port, server.process, server)


@contextlib.contextmanager
def uvicorn_app(app: str, *, workers: int, env: Mapping[str, str]) -> Iterator[str]:
    """``app`` under ``uvicorn --workers N``; yields its base URL."""
    extra = ("--workers", str(workers), "--no-access-log")
    with server_process(python_server("uvicorn", app, *extra), env=env, ready="/health/live") as s:
        yield s.url


@dataclass
class HAProxy:
    url: str
    socket_path: Path

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` for the backend's servers: name -> columns (status, weight, ...)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        text = b"".join(chunks).decode().lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == "app" and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    def status(self, server: str) -> str:
        return self.servers()[server]["status"]

    def weight(self, server: str) -> int:
        return int(self.servers()[server]["weight"])


@contextlib.contextmanager
def haproxy(config: str, tmp_path: Path, env: Mapping[str, str]) -> Iterator[HAProxy]:
    """HAProxy (foreground, ``-db``) running ``examples/haproxy/<config>``, ready once every
    backend server is UP."""
    front_port = free_port()
    socket_path = tmp_path / "haproxy.sock"
    environment = {
        "FRONT_PORT": str(front_port),
        "HAPROXY_SOCKET": str(socket_path),
        "CHECK_INTER": "200ms",
        **env,
    }
    proxy = HAProxy(f"http://127.0.0.1:{front_port}", socket_path)

    def ready(_: ServerProcess) -> bool:
        return all(s["status"] == "UP" for s in proxy.servers().values())

    command = ["haproxy", "-db", "-f", str(EXAMPLE_DIR / config)]
    with server_process(command, port=front_port, env=environment, ready=ready, ready_timeout=10):
        yield proxy
