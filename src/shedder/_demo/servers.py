"""Start a server subprocess on 127.0.0.1, wait until it answers, stop it: the one copy.

`shedder demo`, the benchmarks and the tests' ``server`` fixture (``tests/conftest.py``) all
start their servers with :class:`ServerProcess`. Standard library only: it is shipped with the
package and must not pull in a framework.

A server runs in its own process group (so a worker it forks cannot outlive it), on a free
loopback port unless one is given; entering waits until it is ready (an HTTP path answers 200,
a TCP connect succeeds, or a predicate holds); leaving, a failed start and Ctrl-C all stop the
whole group: SIGTERM, then SIGKILL after a grace period. Its stdout and stderr go to one file,
whose tail ends every :class:`ServerFailed` message.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TypeAlias, TypeVar

__all__ = [
    "HOST",
    "PortInUse",
    "ServerFailed",
    "ServerProcess",
    "answers",
    "check_port_free",
    "free_port",
    "listening",
]

HOST = "127.0.0.1"

# The directory that holds this very copy of the ``shedder`` package (``src`` in a checkout).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent


class ServerFailed(RuntimeError):
    """A server process exited or did not become ready; the message ends with its output."""


class PortInUse(ServerFailed):
    """The port asked for is taken by another process."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def check_port_free(port: int) -> None:
    """Raise :class:`PortInUse` with a clear message if ``port`` on 127.0.0.1 is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers bind: our own connections of a previous run, in TIME_WAIT, do not
        # make the port "in use"; a process listening on it still does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            raise PortInUse(
                f"port {port} on {HOST} is already in use by another process; "
                "choose another with --port, or leave --port out to use a free one"
            ) from None


def listening(port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connect to 127.0.0.1:``port`` succeeds."""
    try:
        socket.create_connection((HOST, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def answers(port: int, path: str, timeout: float = 1.0) -> bool:
    """True if ``GET path`` on 127.0.0.1:``port`` answers 200."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


# An HTTP path that must answer 200, a predicate, or None for "accepts a TCP connection".
Ready: TypeAlias = "str | Callable[[ServerProcess], bool] | None"
# The argument list, or a function of the port that returns it.
Command: TypeAlias = "Sequence[str] | Callable[[int], Sequence[str]]"


_Server = TypeVar("_Server", bound="ServerProcess")


class ServerProcess:
    """A server subprocess on 127.0.0.1:``port``, in its own process group; a context manager.

    ``command`` is the argument list, or a function of the port that returns it. ``port``
    defaults to a free one (a given port is checked first: :class:`PortInUse`). ``env`` is
    added to this process's environment, and ``PYTHONPATH`` starts with ``pythonpath`` and the
    directory of this copy of shedder, so that a Python server imports the same code.
    ``ready`` says when it is up: an HTTP path that must answer 200, a predicate called with
    this object (an ``OSError`` it raises means "not yet"), or None for a TCP connect.
    Output goes to ``log`` if given, else to a temporary file; :meth:`output` reads its tail.

    Entering (or :meth:`start`) waits at most ``ready_timeout`` seconds and raises
    :class:`ServerFailed` with the output if the server exits or never gets ready; leaving
    (or :meth:`stop`) sends SIGTERM to the group, and SIGKILL after ``grace`` seconds.
    """

    def __init__(
        self,
        command: Command,
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        pythonpath: Sequence[str | Path] = (),
        cwd: str | Path | None = None,
        ready: Ready = None,
        ready_timeout: float = 30.0,
        grace: float = 5.0,
        log: Path | None = None,
        name: str | None = None,
    ) -> None:
        self._command = command
        self._port = port
        self.port = port if port is not None else 0
        self.env = dict(env or {})
        self.pythonpath = [str(entry) for entry in pythonpath]
        self.cwd = cwd
        self.ready = ready
        self.ready_timeout = ready_timeout
        self.grace = grace
        self.log = log
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        self._last_output = ""

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        """The argument list, for this object's port."""
        command = self._command
        return list(command(self.port) if callable(command) else command)

    def environment(self) -> dict[str, str]:
        """The server's whole environment."""
        env = dict(os.environ)
        paths = [*self.pythonpath, str(PACKAGE_ROOT)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"  # the output tail must hold the last words
        env.update(self.env)
        return env

    def start(self: _Server) -> _Server:
        """Start the server and wait until it is ready; stops it again if that fails."""
        if self._port is None:
            self.port = free_port()
        else:
            check_port_free(self._port)
        command = self.command()
        if self.name is None:
            self.name = Path(command[0]).name if len(command) < 3 else command[2]
        # Closed by stop(), which every failure path calls.
        if self.log is not None:
            self._output = self.log.open("w+b")
        else:
            self._output = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                command,
                cwd=self.cwd,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: Ctrl-C here, then we stop it all
            )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self: _Server) -> _Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def is_ready(self) -> bool:
        """One readiness probe, as ``ready`` says."""
        try:
            if self.ready is None:
                return listening(self.port)
            if isinstance(self.ready, str):
                return answers(self.port, self.ready)
            return self.ready(self)
        except OSError:
            return False

    def _wait_ready(self) -> None:
        process = self.process
        assert process is not None  # set by start() just before
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if process.poll() is not None:
                output = self.output()
                if "address already in use" in output.lower():
                    raise PortInUse(f"port {self.port} on {HOST} is already in use:\n{output}")
                status = process.returncode
                raise ServerFailed(f"{self.name} exited with status {status}:\n{output}")
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                wanted = "a connection" if self.ready is None else f"ready ({self.ready!r})"
                raise ServerFailed(
                    f"{self.name} was not {wanted} on port {self.port} within "
                    f"{self.ready_timeout} s:\n{self.output()}"
                )
            # A starting subprocess gives nothing to wait on but time: probe again shortly.
            time.sleep(0.05)

    def output(self, limit: int = 4000) -> str:
        """The tail of the server's stdout and stderr (also after :meth:`stop`)."""
        if self._output is None:
            return self._last_output[-limit:]
        self._output.flush()
        self._output.seek(0)
        return self._output.read().decode(errors="replace")[-limit:]

    def stop(self, grace: float | None = None) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
        process = self.process
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(self.grace if grace is None else grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            # The leader is gone; make sure no worker outlived it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        if self._output is not None:
            self._last_output = self.output(limit=100_000)
            self._output.close()
            self._output = None
