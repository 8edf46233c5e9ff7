"""The adaptive-limits benchmark of issue 10: fixed limits against learned ones, open loop.

    python benchmarks/adaptive/run.py [--quick] [--results DIR] [--only KEY ...]

Two parts, one run. Steady: the 400 req/s target (8 connections x 20 ms, client deadline 1 s)
at 0.9x, 2x and 4x capacity. Capacity change: 800 req/s offered (2x the original capacity)
while the database slows down 3x (20 ms -> 60 ms) for a stretch and then recovers; the
throttler's current limit is polled from /health/load every 100 ms. Writes adaptive.json,
adaptive.md and adaptive.png to benchmarks/results/ (git-ignored) unless --results says
otherwise. See README.md beside this file.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from shedder._demo.harness import (
    HOST,
    PortInUse,
    ServerFailed,
    Target,
    TargetServer,
    handle_sigterm,
    plan_cpus,
)
from shedder._demo.loadgen import OK, SHED, TIMEOUT, LoadGenerator, LoadResult
from shedder._demo.report import summarize
from shedder._demo.runner import make_console, missing_demo_dependencies
from shedder._demo.settings import AppSettings

RESULTS = Path(__file__).resolve().parent.parent / "results"
POOL, HOLD_MS = 8, 20.0
CAPACITY = POOL * 1000.0 / HOLD_MS
STEADY_LOADS = (0.9, 2.0, 4.0)
SLOW_FACTOR = 3.0

FIXED: Mapping[str, Any] = {"max_concurrency": 9, "max_queue": 4, "queue_timeout": 0.05}
"""The best hand-tuned fixed limit of the overload benchmark: P + 1 slots, half a round of queue."""

CONFIGS: dict[str, tuple[str, Mapping[str, Any]]] = {
    "fixed-9": ("fixed 9, queue 4 (hand-tuned)", FIXED),
    "fixed-90": ("fixed 90, queue 4 (10x too high)", {**FIXED, "max_concurrency": 90}),
    "vegas": (
        "Vegas, codel queue 8",
        {
            "limit": {"vegas": {}},
            "max_queue": 8,
            "queue_timeout": 0.05,
            "queue_discipline": "codel",
        },
    ),
    "vegas-fifo": (
        "Vegas, fifo queue 4",
        {"limit": {"vegas": {}}, "max_queue": 4, "queue_timeout": 0.05},
    ),
    "gradient2": (
        "Gradient2, codel queue 8",
        {
            "limit": {"gradient2": {}},
            "max_queue": 8,
            "queue_timeout": 0.05,
            "queue_discipline": "codel",
        },
    ),
    "aimd": (
        "AIMD, codel queue 8",
        {"limit": {"aimd": {}}, "max_queue": 8, "queue_timeout": 0.05, "queue_discipline": "codel"},
    ),
}
CHANGE_KEYS = ("fixed-9", "fixed-90", "vegas")


def target(key: str, slowdown: tuple[tuple[float, float, float], ...] = ()) -> Target:
    label, options = CONFIGS[key]
    app = AppSettings(pool=POOL, hold_ms=HOLD_MS, shedder=dict(options), slowdown=slowdown)
    return Target(key, label, "uvicorn", app)


class LimitPoller(threading.Thread):
    """Reads /health/load every ``period`` s: (seconds since ``t0``, limit, in flight, queued)."""

    def __init__(self, port: int, t0: float, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.port, self.t0, self.period = port, t0, period
        self.samples: list[tuple[float, int, int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=1.0)
        next_at = time.monotonic()
        # Benchmark code, not library code: polling a server's health endpoint is the point.
        while not self.stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.period
            try:
                connection.request("GET", "/health/load")
                body = json.loads(connection.getresponse().read())
            except (OSError, http.client.HTTPException, ValueError):
                connection.close()
                connection = http.client.HTTPConnection(HOST, self.port, timeout=1.0)
                continue
            self.samples.append(
                (
                    round(time.monotonic() - self.t0, 3),
                    int(body["max_concurrency"]),
                    int(body["in_flight"]),
                    int(body["queued"]),
                )
            )
        connection.close()


@dataclass
class Run:
    key: str
    label: str
    rate: float
    result: LoadResult
    limits: list[tuple[float, int, int, int]] = field(default_factory=list)


def drive(tgt: Target, rate: float, duration: float, deadline: float, seed: int, cpus: Any) -> Run:
    """A fresh server for ``tgt``, ``rate`` req/s for ``duration`` s, the limit polled."""
    with TargetServer(tgt, cpu=cpus.server) as server:
        generator = LoadGenerator(
            HOST, server.port, rate=rate, duration=duration, deadline=deadline, seed=seed
        )
        poller = LimitPoller(server.port, time.monotonic() + 0.01)
        poller.start()
        try:
            result = asyncio.run(generator.run())
        finally:
            poller.stop.set()
            poller.join(2.0)
    return Run(tgt.key, tgt.label, rate, result, poller.samples)


def _p(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 1)


def window_stats(result: LoadResult, start: float, end: float, capacity: float) -> dict[str, Any]:
    """Figures of the requests scheduled in [start, end): goodput vs ``capacity``, p99s."""
    ok: list[float] = []
    shed: list[float] = []
    counts = dict.fromkeys((OK, SHED, TIMEOUT, "error"), 0)
    for at, outcome, latency in zip(result.scheduled, result.outcome, result.latency, strict=True):
        if start <= at < end:
            counts[outcome if outcome in counts else "error"] += 1
            if outcome == OK:
                ok.append(latency)
            elif outcome == SHED:
                shed.append(latency)
    span = end - start
    goodput = counts[OK] / span
    return {
        "goodput": round(goodput, 1),
        "goodput_pct": round(100.0 * goodput / capacity, 1),
        "p50_ok_ms": _ms(_p(ok, 0.5)),
        "p99_ok_ms": _ms(_p(ok, 0.99)),
        "p99_shed_ms": _ms(_p(shed, 0.99)),
        "sent": sum(counts.values()),
        **counts,
    }


def phases_of(duration: float, slow: tuple[float, float]) -> list[tuple[str, float, float, float]]:
    """(name, start, end, service time in ms) of the capacity-change run."""
    return [
        ("before (S = 20 ms)", 0.0, slow[0], HOLD_MS),
        (f"slowdown (S = {HOLD_MS * SLOW_FACTOR:g} ms)", slow[0], slow[1], HOLD_MS * SLOW_FACTOR),
        ("recovered (S = 20 ms)", slow[1], duration, HOLD_MS),
    ]


def recovery_seconds(per_second: list[dict[str, Any]], start: float, end: float) -> int | None:
    """Whole seconds after ``start`` until the first second of the phase that meets the targets."""
    for second in per_second:
        if start <= second["t"] < end and second["meets"]:
            return int(second["t"] - start)
    return None


def missed_seconds(per_second: list[dict[str, Any]], start: float, end: float) -> list[int]:
    """The seconds of the phase (from t = 1) that missed a target."""
    return [s["t"] for s in per_second if max(start, 1) <= s["t"] < end and not s["meets"]]


def analyse_change(run: Run, duration: float, slow: tuple[float, float]) -> dict[str, Any]:
    per_second = []
    for second in range(int(duration)):
        hold = HOLD_MS * (SLOW_FACTOR if slow[0] <= second < slow[1] else 1.0)
        capacity = POOL * 1000.0 / hold
        stats = window_stats(run.result, second, second + 1, capacity)
        p99 = stats["p99_ok_ms"]
        stats["t"] = second
        stats["capacity"] = capacity
        stats["meets"] = stats["goodput_pct"] >= 95.0 and p99 is not None and p99 <= 3 * hold
        per_second.append(stats)
    phases = []
    for index, (name, start, end, hold) in enumerate(phases_of(duration, slow)):
        capacity = POOL * 1000.0 / hold
        # The first second of the run has no backlog yet: it is left out of the first phase.
        stats = window_stats(run.result, max(start, 1.0), end, capacity)
        stats.update(
            name=name,
            start=start,
            end=end,
            hold_ms=hold,
            capacity=capacity,
            p99_target_ms=3 * hold,
            back_within_s=recovery_seconds(per_second, start, end) if index else None,
            missed_s=missed_seconds(per_second, start, end),
        )
        stats["meets"] = stats["goodput_pct"] >= 95.0 and (stats["p99_ok_ms"] or 1e9) <= 3 * hold
        phases.append(stats)
    return {
        "key": run.key,
        "label": run.label,
        "phases": phases,
        "per_second": per_second,
        "limits": run.limits,
    }


def _missed(phase: Mapping[str, Any]) -> str:
    missed = phase["missed_s"]
    if not missed:
        return "none"
    shown = ", ".join(str(t) for t in missed[:6]) + ("..." if len(missed) > 6 else "")
    return f"{len(missed)} (t = {shown})"


def _fmt(value: Any, suffix: str = "") -> str:
    return "-" if value is None else f"{value:g}{suffix}"


def _mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def steady_rows(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        point = summarize(
            run.result, capacity=CAPACITY, load_factor=run.rate / CAPACITY, warmup=1.0, cooldown=1.0
        )
        limits = [s[1] for s in run.limits if 1.0 <= s[0] < run.result.duration - 1.0]
        rows.append(
            {
                "key": run.key,
                "label": run.label,
                "load": round(run.rate / CAPACITY, 2),
                "goodput": point.goodput,
                "goodput_pct": point.goodput_pct,
                "shed_pct": point.shed_pct,
                "timeout_pct": point.timeout_pct,
                "p50_ok_ms": point.p50_ok_ms,
                "p99_ok_ms": point.p99_ok_ms,
                "p99_shed_ms": point.p99_shed_ms,
                "limit_median": _p(limits, 0.5),
                "limit_range": [min(limits), max(limits)] if limits else None,
            }
        )
    for row in rows:
        row["meets"] = steady_meets(row)
    return rows


def steady_meets(row: Mapping[str, Any]) -> bool:
    """Goodput >= 95% of capacity (of the offered load below it), p99 ok <= 3 S, and <= 0.5%
    shed below capacity."""
    offered = row["load"] * CAPACITY
    p99 = row["p99_ok_ms"]
    return bool(
        row["goodput"] >= 0.95 * min(offered, CAPACITY)
        and p99 is not None
        and p99 <= 3 * HOLD_MS
        and (row["load"] > 1 or row["shed_pct"] <= 0.5)
    )


def markdown(
    steady: list[dict[str, Any]], change: list[dict[str, Any]], meta: Mapping[str, Any]
) -> str:
    lines = [
        f"`{meta['command']}`, {meta['started']}, load average before "
        f"{meta['load_average_before']}, after {meta.get('load_average_after')}, "
        f"uvicorn {meta['versions'].get('uvicorn')} ({meta['server_stack']})",
        "",
        "Steady load, capacity 400 req/s (P = 8, S = 20 ms); target: goodput >= 95% of capacity,"
        " (of the offered load at 0.9x), p99 of admitted <= 60 ms (3 S), <= 0.5% shed at 0.9x.",
        "",
        "| configuration | load | goodput | shed | p99 ok | p99 shed | limit (median, range) "
        "| targets |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in steady:
        rng = r["limit_range"]
        limit = f"{_fmt(r['limit_median'])} ({rng[0]}-{rng[1]})" if rng else "-"
        lines.append(
            f"| {r['label']} | {r['load']:g}x | {r['goodput']:.0f}/s ({r['goodput_pct']:.1f}%) "
            f"| {r['shed_pct']:.1f}% | {_fmt(r['p99_ok_ms'], ' ms')} "
            f"| {_fmt(r['p99_shed_ms'], ' ms')} | {limit} | {_mark(r['meets'])} |"
        )
    lines += [
        "",
        f"Capacity change: {meta['change_rate']:.0f} req/s offered; the database slows down "
        f"{SLOW_FACTOR:g}x from t = {meta['slow'][0]:g} s to t = {meta['slow'][1]:g} s. Per "
        "phase: goodput as % of that phase's capacity, p99 of admitted vs 3x that phase's S, "
        "seconds after the change until the first second that meets both, and the seconds of "
        "the phase that missed one.",
        "",
        "| configuration | phase | goodput | p99 ok (target) | back within | seconds missed "
        "| limit (median) | targets |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for c in change:
        for ph in c["phases"]:
            limits = [s[1] for s in c["limits"] if ph["start"] + 1 <= s[0] < ph["end"]]
            back = ph["back_within_s"]
            lines.append(
                f"| {c['label']} | {ph['name']} | {ph['goodput']:.0f}/s ({ph['goodput_pct']:.1f}%) "
                f"| {_fmt(ph['p99_ok_ms'], ' ms')} ({ph['p99_target_ms']:g}) "
                f"| {'-' if ph['start'] == 0 else ('never' if back is None else f'{back} s')} "
                f"| {_missed(ph)} | {_fmt(_p(limits, 0.5))} | {_mark(ph['meets'])} |"
            )
    return "\n".join(lines) + "\n"


def plot(
    change: list[dict[str, Any]], slow: tuple[float, float], duration: float, path: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    limit_ax, goodput_ax, p99_ax = axes
    for ax in axes:
        ax.axvspan(slow[0], slow[1], color="0.9", label="_nolegend_")
        ax.grid(alpha=0.3)
    for c in change:
        ts = [s[0] for s in c["limits"]]
        limit_ax.step(ts, [s[1] for s in c["limits"]], where="post", label=c["label"])
        secs = [s["t"] + 0.5 for s in c["per_second"]]
        goodput_ax.plot(secs, [s["goodput"] for s in c["per_second"]], marker=".", label=c["label"])
        p99_ax.plot(secs, [s["p99_ok_ms"] for s in c["per_second"]], marker=".", label=c["label"])
    edges = [0, slow[0], slow[0], slow[1], slow[1], duration]
    caps = [CAPACITY, CAPACITY, CAPACITY / SLOW_FACTOR, CAPACITY / SLOW_FACTOR, CAPACITY, CAPACITY]
    goodput_ax.plot(edges, caps, "k--", lw=1, label="capacity")
    p99_ax.plot(
        edges,
        [
            3 * c_ms
            for c_ms in (
                HOLD_MS,
                HOLD_MS,
                HOLD_MS * SLOW_FACTOR,
                HOLD_MS * SLOW_FACTOR,
                HOLD_MS,
                HOLD_MS,
            )
        ],
        "k--",
        lw=1,
        label="3x service time",
    )
    limit_ax.set_ylabel("concurrency limit")
    limit_ax.set_yscale("log")
    limit_ax.set_title(
        f"capacity change: 800 req/s offered; database {SLOW_FACTOR:g}x slower "
        f"from {slow[0]:g} s to {slow[1]:g} s (shaded)"
    )
    goodput_ax.set_ylabel("goodput, req/s")
    p99_ax.set_ylabel("p99 of admitted, ms")
    p99_ax.set_yscale("log")
    p99_ax.set_xlabel("seconds")
    limit_ax.legend(fontsize=8)
    goodput_ax.legend(fontsize=8)
    p99_ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def rich_tables(steady: list[dict[str, Any]], change: list[dict[str, Any]]) -> list[Any]:
    from rich.table import Table

    a = Table(title="steady load (capacity 400 req/s)")
    for col in ("configuration", "load", "goodput", "shed", "p99 ok", "p99 shed", "limit", "ok?"):
        a.add_column(col)
    for r in steady:
        a.add_row(
            r["label"],
            f"{r['load']:g}x",
            f"{r['goodput']:.0f} ({r['goodput_pct']:.1f}%)",
            f"{r['shed_pct']:.1f}%",
            _fmt(r["p99_ok_ms"], " ms"),
            _fmt(r["p99_shed_ms"], " ms"),
            _fmt(r["limit_median"]),
            _mark(r["meets"]),
        )
    b = Table(title="capacity change")
    for col in ("configuration", "phase", "goodput", "p99 ok (target)", "back within", "missed"):
        b.add_column(col)
    b.add_column("ok?")
    for c in change:
        for ph in c["phases"]:
            back = ph["back_within_s"]
            b.add_row(
                c["label"],
                ph["name"],
                f"{ph['goodput']:.0f} ({ph['goodput_pct']:.1f}%)",
                f"{_fmt(ph['p99_ok_ms'], ' ms')} ({ph['p99_target_ms']:g})",
                "-" if ph["start"] == 0 else ("never" if back is None else f"{back} s"),
                _missed(ph),
                _mark(ph["meets"]),
            )
    return [a, b]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def write_outputs(
    steady: list[dict[str, Any]], change: list[dict[str, Any]], meta: dict[str, Any], results: Path
) -> list[Path]:
    results.mkdir(parents=True, exist_ok=True)
    files = [results / "adaptive.json", results / "adaptive.md"]
    report = {"schema": "shedder-adaptive/1", "meta": meta, "steady": steady, "change": change}
    files[0].write_text(json.dumps(report, indent=1))
    files[1].write_text(markdown(steady, change, meta))
    if change:
        slow = (meta["slow"][0], meta["slow"][1])
        files.append(plot(change, slow, meta["change_seconds"], results / "adaptive.png"))
    return files


def rerender(source: Path, results: Path) -> int:
    """Recompute the verdicts of a saved run (after a change to them) and redraw its outputs."""
    report = json.loads(source.read_text())
    steady, change, meta = report["steady"], report["change"], report["meta"]
    for row in steady:
        row["meets"] = steady_meets(row)
    slow = (meta["slow"][0], meta["slow"][1])
    for c in change:
        per_second = c["per_second"]
        for index, (phase, (_, start, end, _)) in enumerate(
            zip(c["phases"], phases_of(meta["change_seconds"], slow), strict=True)
        ):
            phase["back_within_s"] = recovery_seconds(per_second, start, end) if index else None
            phase["missed_s"] = missed_seconds(per_second, start, end)
    console = make_console()
    for table in rich_tables(steady, change):
        console.print(table)
    for path in write_outputs(steady, change, meta, results):
        console.print(f"wrote {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter points (noisier)")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"default {RESULTS}")
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="steady rows to run")
    parser.add_argument(
        "--change",
        nargs="*",
        choices=list(CONFIGS),
        default=list(CHANGE_KEYS),
        help="configurations of the capacity-change run (none: skip it)",
    )
    parser.add_argument("--loads", type=float, nargs="*", default=list(STEADY_LOADS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rerender", type=Path, help="redraw the outputs from an adaptive.json")
    args = parser.parse_args()
    if args.rerender:
        return rerender(args.rerender, args.results)
    missing = missing_demo_dependencies(("uvicorn", "rich", "matplotlib", "psutil"))
    if missing:
        print(f'needs: pip install "loadshedder[demo]" (missing: {", ".join(missing)})')
        return 2
    steady_seconds = 5.0 if args.quick else 8.0
    slow = (6.0, 14.0) if args.quick else (10.0, 20.0)
    change_seconds = 20.0 if args.quick else 30.0
    change_rate = 2 * CAPACITY
    deadline = 1.0
    keys = args.only or list(CONFIGS)
    console = make_console()
    cpus = plan_cpus()
    cpus.apply_to_self()
    try:
        import httptools  # type: ignore[import-not-found]  # noqa: F401
        import uvloop  # type: ignore[import-not-found]  # noqa: F401

        stack = "uvicorn with httptools + uvloop"
    except ImportError:
        stack = "uvicorn with h11 + asyncio"
    meta: dict[str, Any] = {
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/adaptive/run.py", *sys.argv[1:]]),
        "load_average_before": [round(v, 2) for v in os.getloadavg()],
        "capacity_rps": CAPACITY,
        "steady_seconds": steady_seconds,
        "change_seconds": change_seconds,
        "change_rate": change_rate,
        "slow": list(slow),
        "configs": {k: dict(v[1]) for k, v in CONFIGS.items()},
        "server_stack": stack,
        "pinning": {"server": cpus.server, "generator": cpus.generator},
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("uvicorn", "httptools", "uvloop", "h11")},
    }
    console.print(
        f"[bold]shedder adaptive-limits benchmark[/] ({stack}); load average "
        f"{meta['load_average_before']}"
    )
    steady_runs: list[Run] = []
    change_runs: list[dict[str, Any]] = []
    try:
        with handle_sigterm():
            for key in keys:
                for index, factor in enumerate(args.loads):
                    run = drive(
                        target(key),
                        CAPACITY * factor,
                        steady_seconds,
                        deadline,
                        args.seed + index,
                        cpus,
                    )
                    steady_runs.append(run)
                    (row,) = steady_rows([run])
                    console.print(
                        f"  {row['label']:<34} {factor:>4g}x goodput {row['goodput_pct']:5.1f}% "
                        f"p99 ok {_fmt(row['p99_ok_ms'], ' ms'):>9} shed {row['shed_pct']:5.1f}% "
                        f"p99 shed {_fmt(row['p99_shed_ms'], ' ms'):>8} limit {row['limit_median']}"
                    )
            for key in args.change:
                tgt = target(key, ((slow[0], slow[1], SLOW_FACTOR),))
                run = drive(tgt, change_rate, change_seconds, deadline, args.seed + 10, cpus)
                analysed = analyse_change(run, change_seconds, slow)
                change_runs.append(analysed)
                for ph in analysed["phases"]:
                    console.print(
                        f"  {run.label:<34} {ph['name']:<22} goodput {ph['goodput_pct']:5.1f}% "
                        f"p99 ok {_fmt(ph['p99_ok_ms'], ' ms'):>9} (<= {ph['p99_target_ms']:g}) "
                        f"back within {ph['back_within_s']}"
                    )
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        return 130
    except (PortInUse, ServerFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    meta["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    steady = steady_rows(steady_runs)
    for table in rich_tables(steady, change_runs):
        console.print(table)
    files = write_outputs(steady, change_runs, meta, args.results)
    console.print(
        f"load average after: {meta['load_average_after']}\n"
        + "\n".join(f"wrote {f}" for f in files)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
