"""The comparison runs behind ``shedder demo`` and ``benchmarks/overload/run.py``.

Configurations, live progress (rich) and the written results. See ``benchmarks/overload/``
for why each configuration is set the way it is.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .harness import CpuPlan, PointRun, Target, plan_cpus, run_points
from .loadgen import ERROR, OK, SHED, TIMEOUT, LoadGenerator
from .report import (
    Row,
    TargetCheck,
    build_report,
    check_targets,
    markdown_table,
    plot,
    rich_table,
    rows_from_runs,
    side_by_side,
    write_json,
)
from .settings import AppSettings

__all__ = [
    "BENCHMARK_LOADS",
    "DEMO_LOADS",
    "SHEDDER_SETTINGS",
    "Outcome",
    "benchmark_targets",
    "demo_targets",
    "make_console",
    "missing_demo_dependencies",
    "run_comparison",
]

BENCHMARK_LOADS = (0.5, 0.9, 2.0, 4.0, 8.0)
DEMO_LOADS = (0.5, 1.0, 2.0, 4.0)

SHEDDER_SETTINGS: Mapping[str, Any] = {
    # One slot more than the pool's 8 connections. A slot is held for the query *and* the
    # app's work around it (the loop waking the task, sending the answer: ~0.5 ms here); with
    # exactly 8 slots the pool idles for that tail and goodput tops out near 96%. The spare
    # slot keeps one query waiting at the pool so that it never idles.
    "max_concurrency": 9,
    # A waiting room of half a service round: at most 4 / 8 x 20 ms = 10 ms in the queue, so
    # an admitted request's p99 stays near 40 ms (20 ms query + 10 ms queue + up to 20 ms at
    # the pool) under any overload. The price: bursts at 0.9x overflow it (see below).
    "max_queue": 4,
    # A safety net, not the usual exit: the queue drains in ~10 ms unless the server stalls.
    "queue_timeout": 0.05,
}
"""shedder's settings in the comparison (P = 8 connections, S = 20 ms): latency first."""

SHEDDER_LONG_QUEUE: Mapping[str, Any] = {**SHEDDER_SETTINGS, "max_queue": 16, "queue_timeout": 0.1}
"""The other side of the FIFO trade-off: a queue that absorbs Poisson bursts at 0.9x, and
becomes a standing queue of 16 / 8 x 20 = 40 ms under overload."""

SHEDDER_CODEL: Mapping[str, Any] = {
    **SHEDDER_SETTINGS,
    "max_queue": 32,
    "queue_timeout": 0.03,
    "queue_discipline": "codel",
}
"""The controlled-delay queue (default target 5 ms, interval 100 ms), meant to do both."""

LIMIT_CONCURRENCY = SHEDDER_SETTINGS["max_concurrency"] + SHEDDER_SETTINGS["max_queue"]
"""uvicorn's --limit-concurrency gets the same budget: 13 requests inside the server."""

DEMO_DEPENDENCIES = ("uvicorn", "rich", "matplotlib", "psutil")
BENCHMARK_DEPENDENCIES = (*DEMO_DEPENDENCIES, "gunicorn", "flask")


def make_console() -> Any:
    """A rich console; wide enough for the results table when output is not a terminal."""
    from rich.console import Console

    if sys.stdout.isatty() or "COLUMNS" in os.environ:
        return Console()
    return Console(width=160)


def missing_demo_dependencies(names: Sequence[str] = DEMO_DEPENDENCIES) -> list[str]:
    """The modules of the ``demo`` extra that cannot be imported here."""
    from importlib.util import find_spec

    return [name for name in names if find_spec(name) is None]


def _app(pool: int, hold_ms: float, shedder: Mapping[str, Any] | None = None) -> AppSettings:
    return AppSettings(pool=pool, hold_ms=hold_ms, shedder=dict(shedder or {}))


def benchmark_targets(
    pool: int = 8,
    hold_ms: float = 20.0,
    *,
    threads: int = 17,
    limit_concurrency: int = LIMIT_CONCURRENCY,
) -> list[Target]:
    """The comparison of issue 7, in the order it runs.

    gunicorn gets ``threads`` = max_concurrency + max_queue + 4 (the WSGI section's sizing
    rule: a queued request waits on a worker thread, and a few spare threads answer the 503s).
    """
    return [
        Target("asgi-bare", "bare ASGI app (uvicorn)", "uvicorn", _app(pool, hold_ms)),
        Target(
            "asgi-limit",
            f"uvicorn --limit-concurrency {limit_concurrency}",
            "uvicorn",
            _app(pool, hold_ms),
            server_args=("--limit-concurrency", str(limit_concurrency)),
        ),
        Target(
            "asgi-shedder",
            "shedder ASGI, queue 4",
            "uvicorn",
            _app(pool, hold_ms, SHEDDER_SETTINGS),
        ),
        Target(
            "asgi-shedder-q16",
            "shedder ASGI, queue 16",
            "uvicorn",
            _app(pool, hold_ms, SHEDDER_LONG_QUEUE),
        ),
        Target(
            "asgi-shedder-codel",
            "shedder ASGI, codel queue 32",
            "uvicorn",
            _app(pool, hold_ms, SHEDDER_CODEL),
        ),
        Target(
            "wsgi-bare",
            "bare Flask app (gunicorn gthread)",
            "gunicorn",
            _app(pool, hold_ms),
            threads=threads,
        ),
        Target(
            "wsgi-shedder",
            "shedder WSGI, queue 4",
            "gunicorn",
            _app(pool, hold_ms, SHEDDER_SETTINGS),
            threads=threads,
        ),
        # Issue 14: the same app and settings under shedder's gthread worker, which refuses
        # before gunicorn's thread pool; and gunicorn's own ceiling, a trivial app answering
        # 503 to everything under plain gthread (its app name comes first: gunicorn serves
        # the first one given).
        Target(
            "wsgi-worker",
            "shedder WSGI, queue 4, shedder.gunicorn.ThreadWorker",
            "gunicorn",
            _app(pool, hold_ms, SHEDDER_SETTINGS),
            server_args=("--worker-class", "shedder.gunicorn.ThreadWorker"),
            threads=threads,
        ),
        Target(
            "wsgi-503",
            "trivial 503 app (gunicorn gthread, 32 threads)",
            "gunicorn",
            _app(pool, hold_ms),
            server_args=("shedder._demo.wsgi_503:app",),
            threads=32,
        ),
    ]


def demo_targets(pool: int = 8, hold_ms: float = 20.0) -> list[Target]:
    """The demo: the example app with shedder in front, then without, both under uvicorn."""
    return [
        Target("asgi-shedder", "with shedder", "uvicorn", _app(pool, hold_ms, SHEDDER_SETTINGS)),
        Target("asgi-bare", "without shedder", "uvicorn", _app(pool, hold_ms)),
    ]


@dataclass
class Outcome:
    """What a comparison produced: the rows, target checks and the files written."""

    rows: list[Row]
    checks: list[TargetCheck]
    files: list[Path]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


class _LiveProgress:
    """Rich progress: one bar for the whole run, one for the current point, live counts."""

    def __init__(self, console: Any, total_points: int, warmup: float, cooldown: float) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console
        self.warmup = warmup
        self.cooldown = cooldown
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=4,
            transient=True,
        )
        self.overall = self.progress.add_task("all points", total=total_points, counts="")
        self.current = self.progress.add_task("", total=1, counts="", visible=False)

    def __enter__(self) -> _LiveProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, target: Target, factor: float) -> None:
        rate = target.app.capacity * factor
        self.progress.reset(
            self.current,
            description=f"{target.label} @ {factor:g}x ({rate:.0f} req/s)",
            total=None,
            completed=0,
            counts="starting server",
            visible=True,
        )

    def tick(self, generator: LoadGenerator) -> None:
        counts = generator.counts
        self.progress.update(
            self.current,
            total=len(generator.schedule),
            completed=generator.sent,
            counts=(
                f"[green]ok {counts[OK]}[/] [yellow]shed {counts[SHED]}[/] "
                f"[red]timeout {counts[TIMEOUT]}[/] error {counts[ERROR]} "
                f"in flight {generator.outstanding}"
            ),
        )

    def done(self, run: PointRun, capacity: float) -> None:
        from .report import summarize

        point = summarize(
            run.result,
            capacity=capacity,
            load_factor=run.load_factor,
            warmup=self.warmup,
            cooldown=self.cooldown,
        )
        p99 = "-" if point.p99_ok_ms is None else f"{point.p99_ok_ms:.0f} ms"
        self.console.print(
            f"  {run.target.label:<42} {run.load_factor:>4g}x  goodput {point.goodput:6.0f}/s "
            f"({point.goodput_pct:5.1f}%)  p99 ok {p99:>7}  shed {point.shed_pct:5.1f}%  "
            f"timeout {point.timeout_pct:5.1f}%"
        )
        self.progress.advance(self.overall)


def run_comparison(
    targets: Sequence[Target],
    load_factors: Sequence[float],
    *,
    duration: float,
    deadline: float,
    results_dir: Path,
    name: str,
    title: str,
    seed: int = 1,
    warmup: float = 1.0,
    cooldown: float = 1.0,
    port: int | None = None,
    console: Any = None,
    extra_meta: Mapping[str, Any] | None = None,
    compact: bool = False,
) -> Outcome:
    """Run every target at every load with live progress; print and write the results.

    Requests sent in the first ``warmup`` and the last ``cooldown`` seconds of each point load
    the server but are not counted (see :func:`~shedder._demo.report.summarize`).
    ``compact`` prints one line per load with the configurations side by side (the demo)
    instead of the full table with the target checks. Writes ``<name>.json``, ``<name>.md``
    and ``<name>.png`` in ``results_dir``. Servers are stopped whatever happens (Ctrl-C too).
    """
    console = console or make_console()
    cpus: CpuPlan = plan_cpus()
    cpus.apply_to_self()
    capacity = targets[0].app.capacity
    meta: dict[str, Any] = {
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "capacity_rps": capacity,
        "pool": targets[0].app.pool,
        "hold_ms": targets[0].app.hold_ms,
        "deadline_s": deadline,
        "duration_s": duration,
        "warmup_s": warmup,
        "cooldown_s": cooldown,
        "load_factors": list(load_factors),
        "seed": seed,
        "cpus": os.cpu_count(),
        "pinning": {"server": cpus.server, "generator": cpus.generator},
        "load_average_before": _load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            pkg: _version(pkg) for pkg in ("loadshedder", "uvicorn", "gunicorn", "flask", "h11")
        },
        **(extra_meta or {}),
    }
    pinning = (
        f"server on CPU {cpus.server}, generator on CPU {cpus.generator}"
        if cpus.server is not None
        else "no CPU pinning (needs taskset and 2 CPUs)"
    )
    console.print(
        f"[bold]{title}[/]\ncapacity {capacity:.0f} req/s "
        f"({targets[0].app.pool} connections x {targets[0].app.hold_ms:g} ms), "
        f"client deadline {deadline:g} s, {duration:g} s of load per point (requests sent in the "
        f"first {warmup:g} s and the last {cooldown:g} s not counted), {pinning}; "
        f"load average {meta['load_average_before']}"
    )
    with _LiveProgress(console, len(targets) * len(load_factors), warmup, cooldown) as live:
        runs = run_points(
            targets,
            load_factors,
            duration=duration,
            deadline=deadline,
            seed=seed,
            cpus=cpus,
            port=port,
            on_start=live.start,
            on_tick=live.tick,
            on_done=lambda run: live.done(run, capacity),
        )
    meta["load_average_after"] = _load_average()
    meta["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = rows_from_runs(runs, warmup, cooldown)
    checks = check_targets(rows)
    console.print()
    if compact:
        console.print(side_by_side(rows, title))
    else:
        console.print(rich_table(rows, checks, title))
    report = build_report(rows, meta, checks)
    files = [
        write_json(report, results_dir / f"{name}.json"),
        _write_text(results_dir / f"{name}.md", _markdown(title, meta, rows, checks)),
        plot(rows, results_dir / f"{name}.png", capacity=capacity, deadline=deadline, title=title),
    ]
    console.print(
        f"load average after: {meta['load_average_after']}\n"
        + "\n".join(f"wrote {path}" for path in files)
    )
    return Outcome(rows, checks, files)


def _markdown(
    title: str, meta: Mapping[str, Any], rows: Sequence[Row], checks: Sequence[TargetCheck]
) -> str:
    return (
        f"### {title}\n\n`{meta['command']}`, {meta['started']}, load average before "
        f"{meta['load_average_before']}, after {meta.get('load_average_after')}\n\n"
        + markdown_table(rows, checks)
    )


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
