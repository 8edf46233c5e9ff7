"""Summaries, targets and output: JSON, a markdown table, a rich table and a PNG plot.

The summary and JSON parts are plain Python; rich and matplotlib are imported only by the
functions that draw.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .harness import PointRun
from .loadgen import OK, SHED, TIMEOUT, LoadResult

__all__ = [
    "SCHEMA",
    "PointSummary",
    "Row",
    "TargetCheck",
    "build_report",
    "check_targets",
    "markdown_table",
    "plot",
    "rich_table",
    "rows_from_runs",
    "side_by_side",
    "summarize",
    "summarize_classes",
    "write_json",
]

SCHEMA = "shedder-overload/1"


def _percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by the nearest-rank method; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


@dataclass(frozen=True)
class PointSummary:
    """One configuration at one offered load. Rates per second, latencies in ms, RSS in MiB.

    ``offered_rate`` is the nominal Poisson rate, ``sent_rate`` what this run's draw sent.
    """

    load_factor: float
    offered_rate: float
    sent_rate: float
    duration: float
    warmup: float
    cooldown: float
    sent: int
    ok: int
    shed: int
    timeout: int
    error: int
    goodput: float
    goodput_pct: float
    shed_pct: float
    timeout_pct: float
    p50_ok_ms: float | None
    p99_ok_ms: float | None
    p99_shed_ms: float | None
    peak_rss_mib: float | None
    server_cpu_pct: float | None
    send_lag_p99_ms: float | None
    errors: Mapping[str, int] = field(default_factory=dict)


def summarize(
    result: LoadResult,
    *,
    capacity: float,
    load_factor: float,
    peak_rss: int | None = None,
    server_cpu: float | None = None,
    wall: float | None = None,
    warmup: float = 0.0,
    cooldown: float = 0.0,
) -> PointSummary:
    """Reduce one run's per-request records to the figures of the report.

    Only requests sent in the window ``[warmup, duration - cooldown)`` count. The load runs
    before and after it: before, the server has no backlog yet; after, the load stops and a
    queue drains, which would favour whichever requests a discipline serves last. Goodput is
    the number of those requests answered 2xx within their deadline, per second of window;
    every other count, percentage and latency is of the same requests. Raises ``ValueError``
    if the window is empty.
    """
    end = result.duration - cooldown
    if not 0.0 <= warmup < end:
        raise ValueError(
            f"warmup ({warmup}) and cooldown ({cooldown}) leave no window of the "
            f"{result.duration} s run"
        )
    pairs = [
        (latency, outcome)
        for latency, outcome, at in zip(
            result.latency, result.outcome, result.scheduled, strict=True
        )
        if warmup <= at < end
    ]
    ok_latency = [latency for latency, outcome in pairs if outcome == OK]
    shed_latency = [latency for latency, outcome in pairs if outcome == SHED]
    counts = dict.fromkeys((OK, SHED, TIMEOUT), 0)
    errors = 0
    for _, out in pairs:
        if out in counts:
            counts[out] += 1
        else:
            errors += 1
    sent = len(pairs)
    window = end - warmup
    goodput = counts[OK] / window

    def pct(count: int) -> float:
        return round(100.0 * count / sent, 3) if sent else 0.0

    return PointSummary(
        load_factor=load_factor,
        offered_rate=round(result.rate, 1),
        sent_rate=round(sent / window, 1),
        duration=result.duration,
        warmup=warmup,
        cooldown=cooldown,
        sent=sent,
        ok=counts[OK],
        shed=counts[SHED],
        timeout=counts[TIMEOUT],
        error=errors,
        goodput=round(goodput, 1),
        goodput_pct=round(100.0 * goodput / capacity, 2),
        shed_pct=pct(counts[SHED]),
        timeout_pct=pct(counts[TIMEOUT]),
        p50_ok_ms=_ms(_percentile(ok_latency, 0.50)),
        p99_ok_ms=_ms(_percentile(ok_latency, 0.99)),
        p99_shed_ms=_ms(_percentile(shed_latency, 0.99)),
        peak_rss_mib=None if peak_rss is None else round(peak_rss / 2**20, 1),
        server_cpu_pct=(
            None if server_cpu is None or not wall else round(100.0 * server_cpu / wall, 1)
        ),
        send_lag_p99_ms=_ms(_percentile(result.send_lag, 0.99)),
        errors=dict(result.errors),
    )


def summarize_classes(
    result: LoadResult, *, warmup: float = 0.0, cooldown: float = 0.0
) -> dict[str, dict[str, Any]]:
    """Per request class (see :class:`~shedder._demo.loadgen.RequestClass`), of the requests
    sent in the window of :func:`summarize`: counts, success % (2xx within the deadline),
    rates per second of window, p50/p99 of the successful ones, and each class's share of all
    the refusals (503/429) in the window. Empty for a run without classes.
    """
    names = result.class_names
    if not names:
        return {}
    end = result.duration - cooldown
    window = end - warmup
    per: list[dict[str, Any]] = [
        {"sent": 0, OK: 0, SHED: 0, TIMEOUT: 0, "error": 0, "_ok": []} for _ in names
    ]
    for at, outcome, latency, kind in zip(
        result.scheduled, result.outcome, result.latency, result.request_class, strict=True
    ):
        if not warmup <= at < end:
            continue
        entry = per[kind]
        entry["sent"] += 1
        entry[outcome if outcome in (OK, SHED, TIMEOUT) else "error"] += 1
        if outcome == OK:
            entry["_ok"].append(latency)
    refusals = sum(entry[SHED] for entry in per)
    out: dict[str, dict[str, Any]] = {}
    for name, entry in zip(names, per, strict=True):
        ok_latency = entry.pop("_ok")
        sent = entry["sent"]
        entry.update(
            sent_rate=round(sent / window, 1),
            goodput=round(entry[OK] / window, 1),
            success_pct=round(100.0 * entry[OK] / sent, 3) if sent else None,
            p50_ok_ms=_ms(_percentile(ok_latency, 0.50)),
            p99_ok_ms=_ms(_percentile(ok_latency, 0.99)),
            share_of_refusals_pct=round(100.0 * entry[SHED] / refusals, 2) if refusals else None,
        )
        out[name] = entry
    return out


@dataclass(frozen=True)
class Row:
    """One configuration across the offered loads."""

    key: str
    label: str
    server: str
    shedder: Mapping[str, Any] | None
    command: str
    points: tuple[PointSummary, ...]

    def at(self, load_factor: float) -> PointSummary | None:
        for point in self.points:
            if math.isclose(point.load_factor, load_factor):
                return point
        return None


def rows_from_runs(
    runs: Sequence[PointRun], warmup: float = 0.0, cooldown: float = 0.0
) -> list[Row]:
    """Group point runs by target, in the order they ran; see :func:`summarize` for the window."""
    grouped: dict[str, list[PointRun]] = {}
    for run in runs:
        grouped.setdefault(run.target.key, []).append(run)
    rows = []
    for target_runs in grouped.values():
        target = target_runs[0].target
        points = tuple(
            summarize(
                run.result,
                capacity=target.app.capacity,
                load_factor=run.load_factor,
                peak_rss=run.peak_rss,
                server_cpu=run.server_cpu,
                wall=run.wall,
                warmup=warmup,
                cooldown=cooldown,
            )
            for run in target_runs
        )
        rows.append(
            Row(
                key=target.key,
                label=target.label,
                server=target.server,
                shedder=dict(target.app.shedder) or None,
                command=target.describe(),
                points=points,
            )
        )
    return rows


# -- targets (issue 7) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetCheck:
    """Whether one shedder configuration meets one target; ``detail`` gives the numbers."""

    row: str
    target: str
    met: bool | None  # None: not measured (the load factor was not part of the run)
    detail: str


TARGETS = {
    "goodput": "goodput >= 98% of capacity at 2x and 4x, >= 95% at 8x",
    "p99_admitted": "p99 latency of admitted requests <= 50 ms above capacity",
    "p99_shed": "p99 latency of a shed <= 2 ms at 2x and 4x",
    "shed_0.9": "<= 0.5% of requests shed at 0.9x",
    "vs_limit": "goodput >= uvicorn --limit-concurrency at every load",
}


def check_targets(
    rows: Sequence[Row], baseline_key: str | None = "asgi-limit"
) -> list[TargetCheck]:
    """Check every shedder row against the issue's targets (rows without shedder are skipped)."""
    baseline = next((r for r in rows if r.key == baseline_key), None)
    checks: list[TargetCheck] = []
    for row in rows:
        if not row.shedder:
            continue

        def check(name: str, parts: list[tuple[bool, str]], row: Row = row) -> None:
            if not parts:
                checks.append(TargetCheck(row.key, name, None, "not measured"))
                return
            met = all(ok for ok, _ in parts)
            checks.append(TargetCheck(row.key, name, met, "; ".join(text for _, text in parts)))

        parts: list[tuple[bool, str]] = []
        for factor, floor in ((2.0, 98.0), (4.0, 98.0), (8.0, 95.0)):
            point = row.at(factor)
            if point is not None:
                parts.append((point.goodput_pct >= floor, f"{factor:g}x {point.goodput_pct:.1f}%"))
        check("goodput", parts)

        parts = []
        for point in row.points:
            if point.load_factor > 1.0:
                p99 = point.p99_ok_ms
                parts.append(
                    (p99 is not None and p99 <= 50.0, f"{point.load_factor:g}x {_fmt_ms(p99)}")
                )
        check("p99_admitted", parts)

        parts = []
        for factor in (2.0, 4.0):
            point = row.at(factor)
            if point is not None:
                p99 = point.p99_shed_ms
                # No shed at all trivially meets "sheds are fast".
                parts.append((p99 is None or p99 <= 2.0, f"{factor:g}x {_fmt_ms(p99)}"))
        check("p99_shed", parts)

        point = row.at(0.9)
        parts = [] if point is None else [(point.shed_pct <= 0.5, f"{point.shed_pct:.2f}%")]
        check("shed_0.9", parts)

        parts = []
        if baseline is not None:
            for point in row.points:
                other = baseline.at(point.load_factor)
                if other is not None:
                    parts.append(
                        (
                            point.goodput >= other.goodput,
                            f"{point.load_factor:g}x {point.goodput:.0f}/{other.goodput:.0f}",
                        )
                    )
        check("vs_limit", parts)
    return checks


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


# -- JSON ----------------------------------------------------------------------------------------


def build_report(
    rows: Sequence[Row], meta: Mapping[str, Any], checks: Sequence[TargetCheck]
) -> dict[str, Any]:
    """The JSON document: ``schema``, ``meta``, ``rows`` (with ``points``) and ``targets``."""
    return {
        "schema": SCHEMA,
        "meta": dict(meta),
        "rows": [asdict(row) for row in rows],
        "targets": [asdict(check) for check in checks],
        "target_descriptions": dict(TARGETS),
    }


def write_json(report: Mapping[str, Any], path: Path) -> Path:
    """Write ``report`` atomically (a temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


# -- tables --------------------------------------------------------------------------------------

_COLUMNS = (
    "configuration",
    "load",
    "offered/s",
    "goodput/s",
    "% of cap.",
    "shed %",
    "timeout %",
    "p50 ok",
    "p99 ok",
    "p99 shed",
    "peak RSS",
)


def _cells(row: Row, point: PointSummary, first: bool) -> list[str]:
    def ms(value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"

    return [
        row.label if first else "",
        f"{point.load_factor:g}x",
        f"{point.sent_rate:.0f}",
        f"{point.goodput:.0f}",
        f"{point.goodput_pct:.1f}",
        f"{point.shed_pct:.2f}",
        f"{point.timeout_pct:.1f}",
        ms(point.p50_ok_ms),
        ms(point.p99_ok_ms),
        ms(point.p99_shed_ms),
        "-" if point.peak_rss_mib is None else f"{point.peak_rss_mib:.0f} MiB",
    ]


def _marks(checks: Sequence[TargetCheck]) -> dict[str, str]:
    marks: dict[str, str] = {}
    for check in checks:
        symbol = "✓" if check.met else ("✗" if check.met is False else "·")
        marks[check.row] = marks.get(check.row, "") + symbol
    return marks


def markdown_table(rows: Sequence[Row], checks: Sequence[TargetCheck]) -> str:
    """The results and the target checks as two GitHub-flavoured markdown tables."""
    lines = [
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(_COLUMNS))) + "|",
    ]
    for row in rows:
        for index, point in enumerate(row.points):
            cells = _cells(row, point, index == 0)
            if index == 0:
                cells[0] = f"**{cells[0]}**"
            lines.append("| " + " | ".join(cells) + " |")
    if checks:
        labels = {row.key: row.label for row in rows}
        names = list(TARGETS)
        lines += ["", "| target | " + " | ".join(labels[k] for k in _check_rows(checks)) + " |"]
        lines.append("| --- |" + " --- |" * len(_check_rows(checks)))
        for name in names:
            cells = []
            for key in _check_rows(checks):
                check = next((c for c in checks if c.row == key and c.target == name), None)
                if check is None or check.met is None:
                    cells.append("not measured")
                else:
                    cells.append(("✅ " if check.met else "❌ ") + check.detail)
            lines.append(f"| {TARGETS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _check_rows(checks: Sequence[TargetCheck]) -> list[str]:
    keys: list[str] = []
    for check in checks:
        if check.row not in keys:
            keys.append(check.row)
    return keys


def rich_table(rows: Sequence[Row], checks: Sequence[TargetCheck], title: str) -> Any:
    """A :class:`rich.table.Table` of the results, plus one of the target checks (a Group)."""
    from rich.console import Group
    from rich.table import Table

    marks = _marks(checks)
    table = Table(title=title, title_justify="left", header_style="bold")
    for index, column in enumerate(_COLUMNS):
        table.add_column(column, justify="left" if index == 0 else "right", no_wrap=index > 0)
    for row in rows:
        for index, point in enumerate(row.points):
            cells = _cells(row, point, index == 0)
            if index == 0 and row.key in marks:
                cells[0] = f"{cells[0]} {marks[row.key]}"
            style = _goodput_style(point)
            cells[3] = f"[{style}]{cells[3]}[/]"
            cells[4] = f"[{style}]{cells[4]}[/]"
            table.add_row(*cells, end_section=index == len(row.points) - 1)
    if not checks:
        return table
    labels = {row.key: row.label for row in rows}
    keys = _check_rows(checks)
    targets = Table(title="Targets (issue 7)", title_justify="left", header_style="bold")
    targets.add_column("target")
    for key in keys:
        targets.add_column(labels[key])
    for name, description in TARGETS.items():
        cells = []
        for key in keys:
            check = next((c for c in checks if c.row == key and c.target == name), None)
            if check is None or check.met is None:
                cells.append("[dim]not measured[/]")
            else:
                colour = "green" if check.met else "red"
                cells.append(f"[{colour}]{'✓' if check.met else '✗'} {check.detail}[/]")
        targets.add_row(description, *cells)
    return Group(table, targets)


def side_by_side(rows: Sequence[Row], title: str) -> Any:
    """A rich table with one line per load and each configuration's key figures side by side."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("offered load", justify="right")
    for row in rows:
        table.add_column(f"{row.label}\ngoodput/s", justify="right")
        table.add_column(f"{row.label}\np99 ok (ms)", justify="right")
        table.add_column(f"{row.label}\nrefused / timed out", justify="right")
    offered = {p.load_factor: p.offered_rate for row in rows for p in row.points}
    for factor in sorted(offered):
        cells = [f"{factor:g}x ({offered[factor]:.0f}/s)"]
        for row in rows:
            point = row.at(factor)
            if point is None:
                cells += ["-", "-", "-"]
                continue
            style = _goodput_style(point)
            p99 = "-" if point.p99_ok_ms is None else f"{point.p99_ok_ms:.0f}"
            cells += [
                f"[{style}]{point.goodput:.0f} ({point.goodput_pct:.0f}%)[/]",
                p99,
                f"{point.shed_pct:.0f}% / {point.timeout_pct:.0f}%",
            ]
        table.add_row(*cells)
    return table


def _goodput_style(point: PointSummary) -> str:
    expected = min(point.load_factor, 1.0) * 100.0
    if point.goodput_pct >= 0.95 * expected:
        return "green"
    if point.goodput_pct >= 0.5 * expected:
        return "yellow"
    return "red"


# -- plot ----------------------------------------------------------------------------------------


def plot(rows: Sequence[Row], path: Path, *, capacity: float, deadline: float, title: str) -> Path:
    """Goodput and p99 latency of successes against offered load, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for row in rows:
        factors = [p.load_factor for p in row.points]
        style = "-" if row.shedder else "--"
        marker = "o" if row.server == "uvicorn" else "s"
        left.plot(factors, [p.goodput for p in row.points], style, marker=marker, label=row.label)
        right.plot(
            factors,
            [math.nan if p.p99_ok_ms is None else p.p99_ok_ms for p in row.points],
            style,
            marker=marker,
            label=row.label,
        )

    def guide(axis: Any, value: float, text: str, colour: str) -> None:
        axis.axhline(value, color=colour, linestyle=":", linewidth=1)
        axis.annotate(
            text,
            (0.02, value),
            xycoords=("axes fraction", "data"),
            va="bottom",
            fontsize=8,
            color=colour,
        )

    guide(left, capacity, f"capacity {capacity:.0f}/s", "grey")
    left.set_xscale("log")
    left.set_xlabel("offered load (x capacity)")
    left.set_ylabel("goodput: 2xx within the deadline (/s)")
    left.set_ylim(bottom=0, top=capacity * 1.15)
    guide(right, deadline * 1000.0, "client deadline", "grey")
    guide(right, 50.0, "50 ms target", "tab:green")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("offered load (x capacity)")
    right.set_ylabel("p99 latency of successes (ms)")
    ticks = sorted({p.load_factor for row in rows for p in row.points})
    for axis in (left, right):
        axis.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        axis.minorticks_off()
        axis.grid(True, alpha=0.3)
    left.legend(fontsize=8, loc="lower left")
    figure.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
