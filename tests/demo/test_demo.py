"""shedder demo and the overload benchmark: settings, target app, harness, report, CLI."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import shedder
from shedder._demo.harness import (
    CpuPlan,
    PointRun,
    PortInUse,
    Target,
    check_port_free,
    run_point,
)
from shedder._demo.loadgen import ERROR, OK, SHED, TIMEOUT, LoadResult
from shedder._demo.report import (
    SCHEMA,
    build_report,
    check_targets,
    markdown_table,
    rows_from_runs,
    summarize,
)
from shedder._demo.settings import AppSettings

SRC = str(Path(shedder.__file__).resolve().parent.parent)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC}


# -- settings and the target app -----------------------------------------------------------------


def test_settings_round_trip_through_the_environment() -> None:
    settings = AppSettings(pool=4, hold_ms=12.5, shedder={"max_concurrency": 4, "max_queue": 2})
    assert AppSettings.from_env(settings.to_env()) == settings
    assert AppSettings.from_env({}) == AppSettings()
    assert AppSettings().capacity == 400.0
    with pytest.raises(ValueError, match="pool must be >= 1, got 0"):
        AppSettings(pool=0)
    with pytest.raises(ValueError, match="SHEDDER_DEMO_SHEDDER"):
        AppSettings.from_env({"SHEDDER_DEMO_SHEDDER": "[1]"})


async def test_bare_asgi_target_holds_one_of_pool_connections() -> None:
    import asyncio

    from shedder._demo.asgi_app import make_app

    app = make_app(AppSettings(pool=2, hold_ms=50))
    statuses: list[int] = []

    async def call() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app({"type": "http", "path": "/", "method": "GET"}, receive, send)

    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.gather(*(call() for _ in range(4)))
    elapsed = loop.time() - started
    # Four requests through two connections of 50 ms: two rounds, so at least 100 ms.
    assert statuses == [200] * 4
    assert elapsed >= 0.095


def test_simulated_database_serves_exactly_pool_over_hold() -> None:
    from shedder._demo.database import SimulatedDatabase

    database = SimulatedDatabase(pool=4, hold=0.010)
    first = time.monotonic()
    finishes = [database.book() for _ in range(100)]  # booking only: no sleeping
    # 100 queries over 4 connections of 10 ms: 25 rounds, the last done 250 ms from now.
    assert finishes == sorted(finishes)
    assert finishes[-1] - first == pytest.approx(0.250, abs=0.005)
    assert database.backlog() == pytest.approx(0.240, abs=0.01)
    with pytest.raises(ValueError, match="pool must be >= 1, got 0"):
        SimulatedDatabase(pool=0, hold=0.01)


async def test_shedded_asgi_target_refuses_past_its_limits() -> None:
    import asyncio

    from shedder._demo.asgi_app import make_app

    app = make_app(AppSettings(pool=1, hold_ms=100, shedder={"max_concurrency": 1, "max_queue": 0}))
    statuses: list[int] = []

    async def call(path: str) -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        scope = {"type": "http", "path": path, "method": "GET", "headers": []}
        await app(scope, receive, send)

    first = asyncio.ensure_future(call("/"))
    await asyncio.sleep(0.02)  # let the first request take the only slot (simulated work)
    await call("/")  # no slot, no queue: refused at once
    await call("/ready")  # exempt: never refused
    await first
    assert statuses == [503, 200, 200]


def test_shedded_wsgi_target_is_wrapped_with_the_settings() -> None:
    pytest.importorskip("flask")
    from shedder._demo.wsgi_app import make_app

    app = make_app(AppSettings(shedder={"max_concurrency": 3, "max_queue": 2}))
    assert app.throttler.max_concurrency == 3
    assert app.throttler.max_queue == 2


# -- harness -------------------------------------------------------------------------------------


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port_free(port)


def test_a_port_left_in_time_wait_is_free() -> None:
    # The demo's own connections of the previous step linger in TIME_WAIT on the port; the
    # check must not take them for another process (the servers bind with SO_REUSEADDR too).
    with socket.socket() as listener:
        listener.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as uvicorn's and gunicorn's
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end goes to TIME_WAIT
        client.recv(1)  # sees the FIN
        client.close()
    check_port_free(port)  # no PortInUse


def test_target_commands() -> None:
    asgi = Target("a", "a", "uvicorn", AppSettings(), server_args=("--limit-concurrency", "16"))
    command = asgi.command(8123)
    assert command[1:4] == ["-m", "uvicorn", "shedder._demo.asgi_app:app"]
    assert "8123" in command
    assert command[-2:] == ["--limit-concurrency", "16"]
    wsgi = Target("w", "w", "gunicorn", AppSettings(), threads=24)
    command = wsgi.command(8124)
    assert "gthread" in command
    assert "24" in command
    assert "127.0.0.1:8124" in command
    assert command[-1] == "shedder._demo.wsgi_app:app"
    assert "PORT" in asgi.describe()


@pytest.mark.server
def test_a_point_against_a_real_uvicorn_server() -> None:
    pytest.importorskip("uvicorn")
    pytest.importorskip("psutil")
    target = Target("asgi-bare", "bare", "uvicorn", AppSettings(pool=8, hold_ms=10))
    run = run_point(target, 0.25, duration=1.0, deadline=1.0, seed=1, cpus=CpuPlan(None, None))
    summary = summarize(run.result, capacity=target.app.capacity, load_factor=0.25)
    # 200 req/s for 1 s, far under capacity: every request answered.
    assert summary.sent > 100
    assert summary.ok == summary.sent
    assert summary.p50_ok_ms is not None
    assert summary.p50_ok_ms >= 10.0
    assert run.peak_rss is not None
    assert run.peak_rss > 5 * 2**20
    assert run.server_cpu is not None
    assert run.server_cpu > 0


# -- report --------------------------------------------------------------------------------------


def _result(outcomes: list[tuple[str, int, float]], duration: float = 1.0) -> LoadResult:
    n = len(outcomes)
    return LoadResult(
        rate=n / duration,
        duration=duration,
        deadline=1.0,
        scheduled=[0.9 * duration * i / n for i in range(n)],  # answers land in the window
        outcome=[o for o, _, _ in outcomes],
        status=[s for _, s, _ in outcomes],
        latency=[lat for _, _, lat in outcomes],
        send_lag=[0.0] * n,
    )


def test_summarize_counts_and_percentiles() -> None:
    outcomes = [(OK, 200, 0.010 * (i + 1)) for i in range(100)]  # 10..1000 ms
    outcomes += [(SHED, 503, 0.001)] * 50 + [(TIMEOUT, 0, 1.0)] * 40 + [(ERROR, 0, 0.0)] * 10
    point = summarize(_result(outcomes, duration=2.0), capacity=100.0, load_factor=1.0)
    assert (point.sent, point.ok, point.shed, point.timeout, point.error) == (200, 100, 50, 40, 10)
    assert point.goodput == 50.0
    assert point.goodput_pct == 50.0
    assert point.shed_pct == 25.0
    assert point.timeout_pct == 20.0
    assert point.p50_ok_ms == pytest.approx(500.0)
    assert point.p99_ok_ms == pytest.approx(990.0)
    assert point.p99_shed_ms == pytest.approx(1.0)


def test_summarize_counts_only_the_window() -> None:
    # Ten requests over 1 s: the first four time out (a cold start), the last two are answered
    # as the load stops; only the four sent in [0.35, 0.7) count.
    outcomes = [(TIMEOUT, 0, 1.0)] * 4 + [(OK, 200, 0.02)] * 4 + [(OK, 200, 0.001)] * 2
    result = _result(outcomes)  # sent at 0.0, 0.09, ..., 0.81
    point = summarize(result, capacity=10.0, load_factor=1.0, warmup=0.35, cooldown=0.3)
    assert (point.sent, point.ok, point.timeout) == (4, 4, 0)
    assert point.goodput == pytest.approx(4 / 0.35, abs=0.1)
    assert point.p50_ok_ms == pytest.approx(20.0)
    with pytest.raises(ValueError, match="no window"):
        summarize(result, capacity=10.0, load_factor=1.0, warmup=0.5, cooldown=0.5)


def _runs(shedder_ok: int = 396) -> list[PointRun]:
    runs = []
    shedder_app = AppSettings(pool=8, hold_ms=20, shedder={"max_concurrency": 8, "max_queue": 8})
    targets = {
        "asgi-limit": Target("asgi-limit", "limit", "uvicorn", AppSettings()),
        "asgi-shedder": Target("asgi-shedder", "shedder", "uvicorn", shedder_app),
    }
    for key, target in targets.items():
        for factor in (0.9, 2.0, 4.0, 8.0):
            sent = int(400 * factor)
            ok = min(sent, shedder_ok if key == "asgi-shedder" else 380)
            shed = sent - ok if factor > 1 else (1 if key == "asgi-shedder" else 2)
            outcomes = [(OK, 200, 0.03)] * (ok - shed if factor <= 1 else ok)
            outcomes += [(SHED, 503, 0.001)] * shed
            runs.append(
                PointRun(
                    target, factor, _result(outcomes), peak_rss=30 * 2**20, server_cpu=0.5, wall=1.2
                )
            )
    return runs


def test_targets_are_checked_per_shedder_row() -> None:
    rows = rows_from_runs(_runs())
    checks = {c.target: c for c in check_targets(rows) if c.row == "asgi-shedder"}
    assert all(c.row == "asgi-shedder" for c in check_targets(rows))  # baselines not judged
    assert checks["goodput"].met is True  # 99% everywhere
    assert checks["p99_admitted"].met is True
    assert checks["p99_shed"].met is True
    assert checks["shed_0.9"].met is True  # 1 of 360
    assert checks["vs_limit"].met is True
    assert checks["goodput"].detail == "2x 99.0%; 4x 99.0%; 8x 99.0%"
    assert checks["vs_limit"].detail == "0.9x 359/358; 2x 396/380; 4x 396/380; 8x 396/380"


def test_missed_targets_are_marked() -> None:
    rows = rows_from_runs(_runs(shedder_ok=370))  # 92.5% of capacity, below uvicorn's 380
    checks = {c.target: c for c in check_targets(rows)}
    assert checks["goodput"].met is False
    assert checks["vs_limit"].met is False
    assert "2x 370/380" in checks["vs_limit"].detail
    assert checks["shed_0.9"].met is True
    assert checks["p99_shed"].met is True


def test_report_json_shape(tmp_path: Path) -> None:
    rows = rows_from_runs(_runs())
    checks = check_targets(rows)
    report = build_report(rows, {"capacity_rps": 400.0}, checks)
    text = json.dumps(report, allow_nan=False)  # strict JSON: no NaN sneaks in
    loaded = json.loads(text)
    assert loaded["schema"] == SCHEMA
    assert [row["key"] for row in loaded["rows"]] == ["asgi-limit", "asgi-shedder"]
    point = loaded["rows"][1]["points"][1]
    for key in (
        "load_factor",
        "offered_rate",
        "goodput",
        "goodput_pct",
        "shed",
        "timeout",
        "p50_ok_ms",
        "p99_ok_ms",
        "p99_shed_ms",
        "peak_rss_mib",
        "server_cpu_pct",
    ):
        assert key in point, key
    assert point["peak_rss_mib"] == 30.0
    assert point["server_cpu_pct"] == pytest.approx(41.7, abs=0.1)
    assert {t["target"] for t in loaded["targets"]} == set(loaded["target_descriptions"])
    assert loaded["rows"][1]["shedder"] == {"max_concurrency": 8, "max_queue": 8}
    table = markdown_table(rows, checks)
    assert "| **shedder** | 0.9x |" in table
    assert "✅" in table


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from shedder._demo.report import plot

    path = plot(rows_from_runs(_runs()), tmp_path / "p.png", capacity=400, deadline=1, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nan_free_summary_when_nothing_succeeds() -> None:
    point = summarize(_result([(TIMEOUT, 0, 1.0)] * 4), capacity=4.0, load_factor=1.0)
    assert point.p50_ok_ms is None
    assert point.p99_ok_ms is None
    assert point.p99_shed_ms is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in vars(point).values())


# -- the command line ----------------------------------------------------------------------------


def test_python_m_shedder_demo_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shedder", "demo", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--seconds" in result.stdout
    assert "--port" in result.stdout


def test_demo_without_the_extra_names_the_install_command() -> None:
    # A None entry in sys.modules makes the module unimportable, as if not installed.
    code = (
        "import sys; sys.modules['rich'] = None\n"
        "from shedder.__main__ import main\n"
        "sys.exit(main(['demo']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert 'pip install "loadshedder[demo]"' in result.stderr
    assert "rich" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("seconds", ["0", "1.5", "2", "nan"])
def test_demo_rejects_steps_too_short_to_measure(
    seconds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from shedder.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--seconds", seconds])
    assert exit_info.value.code == 2
    assert "--seconds must be more than 2" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from shedder.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"shedder {shedder.__version__}"


def test_side_by_side_has_a_line_per_load() -> None:
    pytest.importorskip("rich")
    from rich.console import Console

    from shedder._demo.report import side_by_side

    console = Console(width=200, record=True)
    console.print(side_by_side(rows_from_runs(_runs()), "demo"))
    text = console.export_text()
    for factor in ("0.9x", "2x", "4x", "8x"):
        assert f"{factor} (" in text
    assert "396 (99%)" in text
