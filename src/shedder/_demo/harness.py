"""Server processes and runs: start a target under uvicorn or gunicorn, drive it, measure.

Every point of a comparison runs against a fresh server process, so a backlog left by one
load level cannot leak into the next. Servers run in their own process group on 127.0.0.1 and
are killed, group and all, when a point ends, on an error and on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal

from .loadgen import LoadGenerator, LoadResult, RequestClass
from .servers import HOST, PortInUse, ServerFailed, ServerProcess, check_port_free, free_port
from .settings import AppSettings

__all__ = [
    "HOST",
    "CpuPlan",
    "PortInUse",
    "ServerFailed",
    "ServerProcess",
    "Target",
    "TargetServer",
    "check_port_free",
    "find_free_port",
    "free_port",
    "handle_sigterm",
    "plan_cpus",
    "run_point",
]

ServerKind = Literal["uvicorn", "gunicorn"]


@dataclass(frozen=True)
class Target:
    """One configuration under test: a server, its extra arguments and the app settings.

    ``threads`` is gunicorn's gthread pool size; ignored for uvicorn.
    """

    key: str
    label: str
    server: ServerKind
    app: AppSettings
    server_args: tuple[str, ...] = ()
    threads: int = 32

    @property
    def shedder(self) -> bool:
        return bool(self.app.shedder)

    def command(self, port: int) -> list[str]:
        """The server's command line (without CPU pinning)."""
        if self.server == "uvicorn":
            return [
                sys.executable,
                "-m",
                "uvicorn",
                "shedder._demo.asgi_app:app",
                "--host",
                HOST,
                "--port",
                str(port),
                "--lifespan",
                "off",
                "--no-access-log",
                "--log-level",
                "warning",
                "--backlog",
                "4096",
                *self.server_args,
            ]
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "--worker-class",
            "gthread",
            "--workers",
            "1",
            "--threads",
            str(self.threads),
            "--bind",
            f"{HOST}:{port}",
            "--backlog",
            "4096",
            "--log-level",
            "warning",
            *self.server_args,
            "shedder._demo.wsgi_app:app",
        ]

    def describe(self) -> str:
        """The command a reader could type, with ``PORT`` for the port."""
        words = self.command(0)
        words[0] = "python"
        return " ".join(words).replace(" --port 0", " --port PORT").replace(":0 ", ":PORT ")


@dataclass(frozen=True)
class CpuPlan:
    """Which CPU the server and the load generator run on (None: not pinned)."""

    server: int | None
    generator: int | None

    def apply_to_self(self) -> None:
        """Pin this process (the generator) to its CPU, where the platform allows."""
        if self.generator is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {self.generator})


def plan_cpus() -> CpuPlan:
    """Server on the first usable CPU, generator on the second, if there are two and taskset."""
    if not hasattr(os, "sched_getaffinity") or shutil.which("taskset") is None:
        return CpuPlan(None, None)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return CpuPlan(None, None)
    return CpuPlan(server=cpus[0], generator=cpus[1])


find_free_port = free_port  # the demo's name for it


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that ``finally`` blocks stop the servers."""


@contextlib.contextmanager
def handle_sigterm() -> Iterator[None]:
    """While active, SIGTERM unwinds the stack like Ctrl-C does (and exits with status 143)."""

    def raise_terminated(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    except _Terminated:
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


class TargetServer(ServerProcess):
    """A target's server on 127.0.0.1:``port`` (a free one if None), in its own process group.

    Entering starts it and waits (at most ``ready_timeout`` seconds) until ``GET /ready``
    answers; leaving kills the whole group. Raises :class:`PortInUse` or
    :class:`ServerFailed` (with the server's output) if it cannot start.
    """

    def __init__(
        self,
        target: Target,
        port: int | None = None,
        *,
        cpu: int | None = None,
        ready_timeout: float = 20.0,
    ) -> None:
        self.target = target
        self.cpu = cpu
        super().__init__(
            self._target_command,
            port=port,
            env=target.app.to_env(),
            ready="/ready",
            ready_timeout=ready_timeout,
            grace=1.0,
            name=target.server,
        )

    def _target_command(self, port: int) -> list[str]:
        command = self.target.command(port)
        if self.cpu is not None:
            command = ["taskset", "-c", str(self.cpu), *command]
        return command

    def _processes(self) -> list[Any]:
        import psutil  # type: ignore[import-untyped]

        if self.process is None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def peak_rss(self) -> int | None:
        """Peak resident memory of the server's processes, bytes (summed over the tree).

        Linux's ``VmHWM`` (high-water mark) where available, else the current RSS.
        """
        import psutil

        total = 0
        found = False
        # taskset execs the server, so the tree is the server and its workers only.
        for proc in self._processes():
            try:
                total += _high_water_mark(proc.pid) or proc.memory_info().rss
                found = True
            except (psutil.Error, OSError):
                continue
        return total if found else None

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the server's processes have used so far."""
        import psutil

        total = 0.0
        found = False
        for proc in self._processes():
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
            found = True
        return total if found else None


def _high_water_mark(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class PointRun:
    """The raw outcome of one point: the generator's result and the server's figures."""

    target: Target
    load_factor: float
    result: LoadResult
    peak_rss: int | None
    server_cpu: float | None
    wall: float
    extra: dict[str, Any] = field(default_factory=dict)


TickCallback = Callable[[LoadGenerator], None]


def run_point(
    target: Target,
    load_factor: float,
    *,
    duration: float,
    deadline: float,
    seed: int,
    cpus: CpuPlan,
    port: int | None = None,
    on_tick: TickCallback | None = None,
    classes: Sequence[RequestClass] | None = None,
    headers: Sequence[tuple[str, str]] = (),
    stamp_header: str | None = None,
    request_start: bool = False,
) -> PointRun:
    """Start ``target``'s server, offer ``load_factor`` x capacity for ``duration`` s, stop it.

    ``classes``, ``headers``, ``stamp_header`` and ``request_start`` go to the
    :class:`LoadGenerator`. When the
    app records (``target.app.record``), its ``/bench/stats`` are read before the server stops
    and kept in ``extra["recorded"]``, with the generator's start time in ``extra["t0"]``.
    """
    rate = target.app.capacity * load_factor
    with TargetServer(target, port, cpu=cpus.server) as server:
        generator = LoadGenerator(
            HOST,
            server.port,
            rate=rate,
            duration=duration,
            deadline=deadline,
            seed=seed,
            classes=classes,
            headers=headers,
            stamp_header=stamp_header,
            request_start=request_start,
        )
        cpu_before = server.cpu_seconds() or 0.0
        started = time.monotonic()
        tick = (lambda: on_tick(generator)) if on_tick is not None else None
        result = asyncio.run(generator.run(tick))
        wall = time.monotonic() - started
        cpu_after = server.cpu_seconds()
        extra: dict[str, Any] = {"t0": generator.started_at}
        if target.app.record:
            extra["recorded"] = _read_json(server.port, "/bench/stats")
        return PointRun(
            target=target,
            load_factor=load_factor,
            result=result,
            peak_rss=server.peak_rss(),
            server_cpu=None if cpu_after is None else cpu_after - cpu_before,
            wall=wall,
            extra=extra,
        )


def _read_json(port: int, path: str) -> Any:
    import json

    connection = http.client.HTTPConnection(HOST, port, timeout=10.0)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def run_points(
    targets: Sequence[Target],
    load_factors: Sequence[float],
    *,
    duration: float,
    deadline: float,
    seed: int,
    cpus: CpuPlan,
    port: int | None = None,
    on_start: Callable[[Target, float], None] | None = None,
    on_tick: TickCallback | None = None,
    on_done: Callable[[PointRun], None] | None = None,
) -> list[PointRun]:
    """Every target at every load factor, in that order; the same seed for each row."""
    runs: list[PointRun] = []
    for target in targets:
        for index, factor in enumerate(load_factors):
            if on_start is not None:
                on_start(target, factor)
            run = run_point(
                target,
                factor,
                duration=duration,
                deadline=deadline,
                seed=seed + index,
                cpus=cpus,
                port=port,
                on_tick=on_tick,
            )
            runs.append(run)
            if on_done is not None:
                on_done(run)
    return runs
