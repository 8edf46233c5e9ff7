"""Real servers for the load-balancer tests: the example app under gunicorn, HAProxy in front.

Everything binds to 127.0.0.1 on free ports; every process is terminated and reaped by the
context managers, whatever happens in the test.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

import shedder

from .net import free_port, wait_for

SRC_DIR = Path(shedder.__file__).resolve().parent.parent
REPO_DIR = SRC_DIR.parent
EXAMPLE_DIR = REPO_DIR / "examples" / "haproxy"


def stop(process: subprocess.Popen[bytes]) -> str:
    """Terminate and reap ``process``; returns the tail of its output."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    output = process.stdout.read().decode(errors="replace") if process.stdout else ""
    if process.stdout:
        process.stdout.close()
    return output[-3000:]


@dataclass
class App:
    url: str
    port: int
    agent_port: int
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def gunicorn_app(
    *,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    threads: int = 32,
    app: str = "examples.haproxy.app:app",
) -> Iterator[App]:
    """``app`` (default: the Flask example + agent) under gunicorn gthread."""
    port, agent_port = free_port(), free_port()
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC_DIR), str(REPO_DIR)]),
        "SHEDDER_AGENT_PORT": str(agent_port),
        **(env or {}),
    }
    command = [sys.executable, "-m", "gunicorn", "-c", str(EXAMPLE_DIR / "gunicorn.conf.py")]
    command += ["-k", "gthread", "--threads", str(threads), "--workers", str(workers)]
    command += ["--graceful-timeout", "1", "--bind", f"127.0.0.1:{port}"]
    command += [app]
    process = subprocess.Popen(
        command, cwd=REPO_DIR, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if process.poll() is not None:
                return True
            try:
                return httpx.get(f"{url}/health/live", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        if not wait_for(ready, timeout=30) or process.poll() is not None:
            raise RuntimeError(f"gunicorn did not start:\n{stop(process)}")
        yield App(url, port, agent_port, process)
    finally:
        stop(process)


@contextlib.contextmanager
def uvicorn_app(app: str, *, workers: int, env: Mapping[str, str]) -> Iterator[str]:
    """``app`` under ``uvicorn --workers N``; yields its base URL."""
    port = free_port()
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC_DIR), str(REPO_DIR)]),
        **env,
    }
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    process = subprocess.Popen(
        command, cwd=REPO_DIR, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if process.poll() is not None:
                return True
            try:
                return httpx.get(f"{url}/health/live", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        if not wait_for(ready, timeout=30) or process.poll() is not None:
            raise RuntimeError(f"uvicorn did not start:\n{stop(process)}")
        yield url
    finally:
        stop(process)


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
    """HAProxy (foreground, ``-db``) running ``examples/haproxy/<config>``."""
    front_port = free_port()
    socket_path = tmp_path / "haproxy.sock"
    environment = {
        **os.environ,
        "FRONT_PORT": str(front_port),
        "HAPROXY_SOCKET": str(socket_path),
        "CHECK_INTER": "200ms",
        **env,
    }
    process = subprocess.Popen(
        ["haproxy", "-db", "-f", str(EXAMPLE_DIR / config)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    proxy = HAProxy(f"http://127.0.0.1:{front_port}", socket_path)
    try:

        def ready() -> bool:
            if process.poll() is not None:
                return True
            try:
                return all(s["status"] == "UP" for s in proxy.servers().values())
            except OSError:
                return False

        if not wait_for(ready, timeout=10) or process.poll() is not None:
            raise RuntimeError(f"haproxy did not start:\n{stop(process)}")
        yield proxy
    finally:
        stop(process)
