"""Scenarios of the overload benchmark beyond the load sweep: run by ``run.py``.

- ``compare``: two configurations interleaved (A B A B A B per load), medians of the
  repetitions, then the largest sustainable overload of each (issue 13).
- ``coldstart``: the zero-config adaptive limit from a cold start, counted from the first
  second, with the throttler's state traced every 100 ms (issue 13).
- ``priorities``, ``tenants``, ``deadlines``: who gets refused (issue 15) and work nobody waits
  for (issue 16). Written against the API those issues add; on a checkout without it the
  server fails to start and the scenario says so.

Every point is a fresh server (``shedder._demo.harness.run_point``), pinned as the sweep is.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shedder._demo.harness import CpuPlan, PointRun, ServerFailed, Target, run_point
from shedder._demo.loadgen import OK, SHED, RequestClass
from shedder._demo.report import summarize, summarize_classes
from shedder._demo.runner import SHEDDER_SETTINGS
from shedder._demo.settings import AppSettings

POOL, HOLD_MS = 8, 20.0
CAPACITY = POOL * 1000.0 / HOLD_MS
SERVICE_MS = HOLD_MS

ZERO_CONFIG: Mapping[str, Any] = {"limit": {"vegas": {}}, "max_queue": 0}
"""The zero-config setting of issue 13, as the README recommends it: ``VegasLimit()`` with its
defaults and no queue of shedder's own (Vegas's allowance of 3-6 requests beyond the service's
no-load concurrency is the queue; a FIFO queue of 2 and CoDel's of 8 measured worse p99s)."""

Echo = Callable[[str], None]


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def uvicorn_target(key: str, label: str, shedder: Mapping[str, Any], **app: Any) -> Target:
    return Target(key, label, "uvicorn", AppSettings(POOL, HOLD_MS, dict(shedder), **app))


# -- compare: A B A B A B, then the sustainable overload -----------------------------------------


def _point(run: PointRun, warmup: float = 1.0, cooldown: float = 1.0) -> dict[str, Any]:
    s = summarize(
        run.result,
        capacity=run.target.app.capacity,
        load_factor=run.load_factor,
        server_cpu=run.server_cpu,
        wall=run.wall,
        warmup=warmup,
        cooldown=cooldown,
    )
    return {
        "goodput": s.goodput,
        "goodput_pct": s.goodput_pct,
        "shed_pct": s.shed_pct,
        "timeout_pct": s.timeout_pct,
        "p99_ok_ms": s.p99_ok_ms,
        "p99_shed_ms": s.p99_shed_ms,
        "server_cpu_pct": s.server_cpu_pct,
        "send_lag_p99_ms": s.send_lag_p99_ms,
        # Answered (2xx or a refusal) within the deadline: what a server that only refuses
        # (the trivial 503 app) keeps up with; below 95% it has collapsed.
        "answered_pct": round(100.0 * (s.ok + s.shed) / s.sent, 2) if s.sent else None,
        # Server CPU per request sent over the whole point, warm-up and cool-down included.
        "cpu_us_per_request": (
            round(1e6 * run.server_cpu / len(run.result.scheduled), 1)
            if run.server_cpu is not None and run.result.scheduled
            else None
        ),
    }


def _medians(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    keys = points[0].keys()
    return {k: _median([p[k] for p in points]) for k in keys}


def compare(
    targets: Sequence[Target],
    loads: Sequence[float],
    *,
    reps: int,
    duration: float,
    deadline: float,
    seed: int,
    cpus: CpuPlan,
    echo: Echo,
    sustain_from: float | None = 2.0,
    sustain_max: float = 32.0,
    sustain_pct: float = 95.0,
    sustain_loads: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Every target at every load, ``reps`` times, interleaved; medians per target and load.

    Then, unless ``sustain_from`` is None, each target's largest sustainable overload: the
    offered load doubles from ``sustain_from`` (or climbs ``sustain_loads``, if given),
    reusing the comparison's points, until the median goodput of ``reps`` runs falls below
    ``sustain_pct`` % of capacity, or ``sustain_max`` is passed. The generator's own limit
    shows as ``send_lag_p99_ms``. ``holds`` gives, from the interleaved loads alone, each
    target's largest load up to which every median goodput, and every median share answered
    within the deadline (``answered_pct``: what a server that only refuses keeps up with),
    stays at or above ``sustain_pct``, and the first load where each falls below.
    """
    raw: dict[str, dict[float, list[dict[str, Any]]]] = {t.key: {} for t in targets}

    def measure(target: Target, load: float, rep: int) -> dict[str, Any]:
        run = run_point(
            target, load, duration=duration, deadline=deadline, seed=seed + rep, cpus=cpus
        )
        point = _point(run)
        raw[target.key].setdefault(load, []).append(point)
        echo(
            f"  {target.label:<34} {load:>4g}x rep {rep + 1}: goodput {point['goodput_pct']:5.1f}%"
            f"  p99 ok {point['p99_ok_ms']} ms  p99 shed {point['p99_shed_ms']} ms"
            f"  send lag p99 {point['send_lag_p99_ms']} ms  answered {point['answered_pct']}%"
            f"  cpu {point['cpu_us_per_request']} us/request"
        )
        return point

    for load in loads:
        for rep in range(reps):
            # Same seed for both targets within a repetition: the same arrivals.
            for target in targets:
                measure(target, load, rep)
    medians = {
        key: {str(load): _medians(points) for load, points in by_load.items()}
        for key, by_load in raw.items()
    }
    holds = {
        target.key: {
            metric: _holds([(load, medians[target.key][str(load)][metric]) for load in loads])
            for metric in ("goodput_pct", "answered_pct")
        }
        for target in targets
    }
    for target in targets:
        for metric, held in holds[target.key].items():
            up_to, below = held["up_to"], held["first_below"]
            echo(
                f"  {target.label}: {metric} >= {sustain_pct:g}% up to"
                f" {'-' if up_to is None else f'{up_to:g}x'}"
                f" (first below: {'-' if below is None else f'{below:g}x'})"
            )
    sustainable: dict[str, Any] = {}
    if sustain_from is not None:
        for target in targets:
            ladder = iter(sustain_loads) if sustain_loads else None
            load = next(ladder, sustain_max + 1) if ladder else sustain_from
            best: float | None = None
            while load <= sustain_max:
                if load not in raw[target.key]:
                    for rep in range(reps):
                        measure(target, load, rep)
                median = _medians(raw[target.key][load])
                medians[target.key][str(load)] = median
                if (median["goodput_pct"] or 0.0) < sustain_pct:
                    break
                best = load
                load = next(ladder, sustain_max + 1) if ladder else load * 2
            tried = max(raw[target.key])
            sustainable[target.key] = {
                "largest_sustained": best,
                "stopped_at": load,
                "largest_tried": tried,
            }
            echo(f"  {target.label}: largest sustainable overload {best}x (tried up to {tried:g}x)")
    return {"medians": medians, "runs": raw, "holds": holds, "sustainable": sustainable}


def _holds(points: Sequence[tuple[float, float | None]], pct: float = 95.0) -> dict[str, Any]:
    """The largest load up to which every value is >= ``pct``, and the first load below."""
    up_to: float | None = None
    for load, value in sorted(points):
        if value is None or value < pct:
            return {"up_to": up_to, "first_below": load}
        up_to = load
    return {"up_to": up_to, "first_below": None}


# -- cold start ----------------------------------------------------------------------------------


def timeline(run: PointRun, bin_s: float = 0.1) -> list[dict[str, Any]]:
    """Per ``bin_s`` of the run: requests sent and refused (by send time), joined with the
    throttler's state sampled nearest the bin's end (needs a recording target)."""
    result = run.result
    t0 = run.extra.get("t0") or 0.0
    bins = math.ceil(result.duration / bin_s)
    sent = [0] * bins
    shed = [0] * bins
    for at, outcome in zip(result.scheduled, result.outcome, strict=True):
        index = min(bins - 1, int(at / bin_s))
        sent[index] += 1
        shed[index] += outcome == SHED
    samples = (run.extra.get("recorded") or {}).get("samples", [])
    rows = []
    cursor = 0
    for index in range(bins):
        end = t0 + (index + 1) * bin_s
        while cursor + 1 < len(samples) and samples[cursor + 1]["t"] <= end:
            cursor += 1
        sample = dict(samples[cursor]) if samples and samples[cursor]["t"] <= end else {}
        sample.pop("t", None)
        rows.append({"t": round(index * bin_s, 2), "sent": sent[index], "refused": shed[index]})
        rows[-1].update(sample)
    return rows


def coldstart(
    options: Mapping[str, Any],
    *,
    label: str,
    reps: int,
    seconds: float,
    load: float,
    overloads: Sequence[float],
    deadline: float,
    seed: int,
    cpus: CpuPlan,
    echo: Echo,
    trace_period: float = 0.1,
) -> dict[str, Any]:
    """``options`` started fresh at ``load`` x capacity, counted from the first second, ``reps``
    times, traced; then ``overloads`` (counted from 1 s, as the sweep does) for goodput and p99.
    """
    target = uvicorn_target("coldstart", label, options, record=trace_period)
    cold: list[dict[str, Any]] = []
    traces = []
    for rep in range(reps):
        run = run_point(
            target, load, duration=seconds, deadline=deadline, seed=seed + rep, cpus=cpus
        )
        point = _point(run, warmup=0.0, cooldown=0.0)
        first_second = _point(run, warmup=0.0, cooldown=seconds - 1.0)
        point["shed_pct_first_s"] = first_second["shed_pct"]
        cold.append(point)
        traces.append(timeline(run))
        echo(
            f"  {label} {load:g}x cold, rep {rep + 1}: refused {point['shed_pct']:.2f}% "
            f"(first second {point['shed_pct_first_s']:.1f}%), goodput {point['goodput']:.0f}/s"
        )
    over: dict[str, Any] = {}
    for factor in overloads:
        points = []
        for rep in range(reps):
            run = run_point(
                target, factor, duration=8.0, deadline=deadline, seed=seed + rep, cpus=cpus
            )
            points.append(_point(run))
            traces.append(timeline(run))
        over[str(factor)] = _medians(points) | {"runs": points}
        m = over[str(factor)]
        echo(
            f"  {label} {factor:g}x: goodput {m['goodput_pct']}%  p99 ok {m['p99_ok_ms']} ms "
            f"(target <= {3 * SERVICE_MS:g})"
        )
    return {
        "options": dict(options),
        "cold": {"runs": cold, "median": _medians(cold)},
        "overloads": over,
        "traces": traces,  # the cold runs', then each overload's, in order
    }


# -- priorities, tenants, deadlines (issues 15 and 16) --------------------------------------------

PRIORITY_OPTIONS: Mapping[str, Any] = {
    **SHEDDER_SETTINGS,
    "priority_header": "x-priority",
    "trusted_peers": ["127.0.0.1"],
}
TENANT_OPTIONS: Mapping[str, Any] = {**SHEDDER_SETTINGS, "classify": "tenant-header"}
DEADLINE_OPTIONS: Mapping[str, Any] = {"max_concurrency": 9, "max_queue": 200, "queue_timeout": 1.0}


def _classed(
    target: Target,
    classes: Sequence[tuple[str, float, tuple[tuple[str, str], ...]]],
    *,
    reps: int,
    duration: float,
    deadline: float,
    seed: int,
    cpus: CpuPlan,
    headers: Sequence[tuple[str, str]] = (),
    stamp: bool = False,
    within_ms: float | None = None,
    request_start: bool = False,
) -> list[dict[str, Any]]:
    """``classes`` = (name, load as x capacity, headers); one Poisson schedule of the sum.

    ``within_ms``: also count goodput of answers within that many ms (``goodput_within_pct``).
    """
    total = sum(load for _, load, _ in classes)
    mix = [RequestClass(name, load, hdrs) for name, load, hdrs in classes]
    out = []
    for rep in range(reps):
        run = run_point(
            target,
            total,
            duration=duration,
            deadline=deadline,
            seed=seed + rep,
            cpus=cpus,
            classes=mix,
            headers=headers,
            stamp_header="x-bench-scheduled" if stamp else None,
            request_start=request_start,
        )
        point = _point(run)
        point["classes"] = summarize_classes(run.result, warmup=1.0, cooldown=1.0)
        if within_ms is not None:
            point["goodput_within_pct"] = _goodput_within(run, within_ms / 1000.0)
        if "recorded" in run.extra:
            recorded = dict(run.extra["recorded"])
            samples = recorded.pop("samples", None) or []
            for name in ("release_gap_ms", "work_reserve_ms"):
                seen = [s[name] for s in samples if s.get(name)]
                if seen:  # the throttler's estimates, median over the run (deadline scenario)
                    recorded[f"{name}_median"] = _median(seen)
            point["app"] = recorded
        out.append(point)
    return out


def _goodput_within(run: PointRun, budget: float, warmup: float = 1.0) -> float:
    """% of capacity answered 2xx within ``budget`` s, of the requests sent in the window."""
    result = run.result
    end = result.duration - 1.0
    ok = sum(
        1
        for at, outcome, latency in zip(
            result.scheduled, result.outcome, result.latency, strict=True
        )
        if warmup <= at < end and outcome == OK and latency <= budget
    )
    return round(100.0 * ok / (end - warmup) / run.target.app.capacity, 2)


def _class_medians(points: Sequence[Mapping[str, Any]], name: str) -> dict[str, Any]:
    keys = ("success_pct", "p99_ok_ms", "share_of_refusals_pct", "goodput", "sent_rate")
    return {k: _median([p["classes"][name][k] for p in points]) for k in keys}


def priorities(
    *, reps: int, duration: float, deadline: float, seed: int, cpus: CpuPlan, echo: Echo
) -> dict[str, Any]:
    """Critical at 25% of capacity, sheddable at 4x then 8x, in one schedule (issue 15).

    Targets: critical success >= 99.5% with p99 <= 2x the service time; sheddable takes
    >= 99% of the refusals; total goodput >= 98% of capacity. Then the same 1:3 mix at 0.9x,
    with and without the classes: no class is refused more than without them.
    """
    target = uvicorn_target("priorities", "shedder, priority header", PRIORITY_OPTIONS)
    out: dict[str, Any] = {}
    for sheddable in (4.0, 8.0):
        classes = [
            ("critical", 0.25, (("x-priority", "critical"),)),
            ("sheddable", sheddable, (("x-priority", "sheddable"),)),
        ]
        points = _classed(
            target, classes, reps=reps, duration=duration, deadline=deadline, seed=seed, cpus=cpus
        )
        critical = _class_medians(points, "critical")
        shed_class = _class_medians(points, "sheddable")
        goodput_pct = _median([p["goodput_pct"] for p in points])
        verdict = {
            "critical_success": (critical["success_pct"] or 0) >= 99.5,
            "critical_p99": (critical["p99_ok_ms"] or math.inf) <= 2 * SERVICE_MS,
            "sheddable_refusals": (shed_class["share_of_refusals_pct"] or 0) >= 99.0,
            "goodput": (goodput_pct or 0) >= 98.0,
        }
        out[f"sheddable {sheddable:g}x"] = {
            "critical": critical,
            "sheddable": shed_class,
            "goodput_pct": goodput_pct,
            "meets": verdict,
            "runs": points,
        }
        echo(
            f"  priorities, sheddable {sheddable:g}x: critical {critical['success_pct']}% ok, "
            f"p99 {critical['p99_ok_ms']} ms; sheddable's share of refusals "
            f"{shed_class['share_of_refusals_pct']}%; goodput {goodput_pct}% {verdict}"
        )
    # At 0.9x (the same 1:3 mix), with and without the classes, interleaved: no class may be
    # refused more than without classes.
    mix = [
        ("critical", 0.225, (("x-priority", "critical"),)),
        ("sheddable", 0.675, (("x-priority", "sheddable"),)),
    ]
    plain = uvicorn_target("priorities-off", "shedder, no classes", SHEDDER_SETTINGS)
    by_config: dict[str, list[dict[str, Any]]] = {"classes": [], "no classes": []}
    for rep in range(reps):
        for key, config in (("classes", target), ("no classes", plain)):
            by_config[key] += _classed(
                config,
                mix,
                reps=1,
                duration=duration,
                deadline=deadline,
                seed=seed + rep,
                cpus=cpus,
            )
    below: dict[str, Any] = {}
    for key, points in by_config.items():
        below[key] = {
            name: {
                "refused_pct": _median([100.0 - p["classes"][name]["success_pct"] for p in points])
            }
            for name in ("critical", "sheddable")
        }
        below[key]["runs"] = points
    verdict_09 = {
        name: (below["classes"][name]["refused_pct"] or 0.0)
        <= (below["no classes"][name]["refused_pct"] or 0.0)
        for name in ("critical", "sheddable")
    }
    out["0.9x"] = {**below, "meets": verdict_09}
    echo(
        "  priorities at 0.9x, % not answered 2xx (critical, sheddable): with classes "
        f"{below['classes']['critical']['refused_pct']}, "
        f"{below['classes']['sheddable']['refused_pct']}; without "
        f"{below['no classes']['critical']['refused_pct']}, "
        f"{below['no classes']['sheddable']['refused_pct']} {verdict_09}"
    )
    return out


def tenants(
    *, reps: int, duration: float, deadline: float, seed: int, cpus: CpuPlan, echo: Echo
) -> dict[str, Any]:
    """Heavy tenant at 8x capacity, light at 20%, one class (issue 15).

    Targets: light success >= 99.5% with p99 <= 3x the service time; goodput >= 98%. The same
    with ``max_queue=8``, and the mix without ``classify``, run beside it for the contrast.
    """
    classes = [
        ("heavy", 8.0, (("x-tenant", "heavy"),)),
        ("light", 0.2, (("x-tenant", "light"),)),
    ]
    out: dict[str, Any] = {}
    configurations = (
        ("fair", TENANT_OPTIONS),
        # The same with a room of 8: four places of 4 cannot hold the light tenant's Poisson
        # arrivals between two bursts of grants (see benchmarks/overload/README.md, Tenants).
        ("fair-q8", {**TENANT_OPTIONS, "max_queue": 8}),
        ("unclassified", SHEDDER_SETTINGS),
    )
    for key, options in configurations:
        target = uvicorn_target(f"tenants-{key}", f"shedder, {key}", options)
        try:
            points = _classed(
                target,
                classes,
                reps=reps,
                duration=duration,
                deadline=deadline,
                seed=seed,
                cpus=cpus,
            )
        except ServerFailed as exc:
            out[key] = {"error": _last_line(exc)}
            echo(f"  tenants ({key}): the server did not start: {_last_line(exc)}")
            continue
        light = _class_medians(points, "light")
        goodput_pct = _median([p["goodput_pct"] for p in points])
        verdict = {
            "light_success": (light["success_pct"] or 0) >= 99.5,
            "light_p99": (light["p99_ok_ms"] or math.inf) <= 3 * SERVICE_MS,
            "goodput": (goodput_pct or 0) >= 98.0,
        }
        out[key] = {
            "light": light,
            "heavy": _class_medians(points, "heavy"),
            "goodput_pct": goodput_pct,
            "meets": verdict,
            "runs": points,
        }
        echo(
            f"  tenants ({key}): light {light['success_pct']}% ok, p99 {light['p99_ok_ms']} ms; "
            f"goodput {goodput_pct}% {verdict}"
        )
    return out


def _last_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else repr(exc)


def deadlines(
    *,
    reps: int,
    duration: float,
    deadline: float,
    seed: int,
    cpus: CpuPlan,
    echo: Echo,
    load: float = 4.0,
    budget_ms: int = 100,
) -> dict[str, Any]:
    """Clients that wait ``budget_ms``, say so and then hang up, a long queue, at ``load`` x
    capacity (issue 16): requests reaching the app after their deadline, and goodput within
    it, with deadline support on and off (``deadlines=None``), interleaved. The run's client
    deadline (``deadline``) is not used: the clients' own is ``budget_ms``.

    Configurations: the default ``Deadlines()``, the same behind a proxy that stamps
    ``x-request-start`` (the generator does), ``Deadlines(margin=0.05)`` and ``deadlines=None``.

    Target (with deadlines): none reaches the app late; goodput within the deadline >= 95%.
    On a checkout without issue 16, "deadlines" is today's behaviour (no deadline support,
    only the ASGI disconnect watch) and "no deadlines" cannot start.
    """
    configs = {
        "deadlines": uvicorn_target("deadlines-on", "deadlines on", DEADLINE_OPTIONS, record=1.0),
        # The default again, behind a "proxy" that stamps x-request-start (the generator does):
        # the server then also knows the time a request spent before it read it.
        "deadlines, x-request-start": uvicorn_target(
            "deadlines-start", "Deadlines(), x-request-start", DEADLINE_OPTIONS, record=1.0
        ),
        "deadlines, margin 50 ms": uvicorn_target(
            "deadlines-margin",
            "Deadlines(margin=0.05)",
            {**DEADLINE_OPTIONS, "deadlines": {"margin": 0.05}},
            record=1.0,
        ),
        "no deadlines": uvicorn_target(
            "deadlines-off", "deadlines=None", {**DEADLINE_OPTIONS, "deadlines": None}, record=1.0
        ),
    }
    headers = (("x-envoy-expected-rq-timeout-ms", str(budget_ms)),)
    classes = [("all", load, ())]
    points: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
    out: dict[str, Any] = {}
    for rep in range(reps):
        for key, target in configs.items():
            if key in out:
                continue  # failed to start: not again
            try:
                (point,) = _classed(
                    target,
                    classes,
                    reps=1,
                    duration=duration,
                    deadline=budget_ms / 1000.0,
                    seed=seed + rep,
                    cpus=cpus,
                    headers=headers,
                    stamp=True,
                    within_ms=budget_ms,
                    request_start=key.endswith("x-request-start"),
                )
            except ServerFailed as exc:
                out[key] = {"error": _last_line(exc)}
                echo(f"  {key}: the server did not start: {_last_line(exc)}")
                continue
            points[key].append(point)
            app = point["app"]
            echo(
                f"  {key} rep {rep + 1}: {app['late']} of {app['started']} reached the app late;"
                f" goodput within {budget_ms} ms {point['goodput_within_pct']}% of capacity;"
                f" server CPU {point['server_cpu_pct']}%; release gap"
                f" {app.get('release_gap_ms_median')} ms, work reserve"
                f" {app.get('work_reserve_ms_median')} ms"
            )
    for key, runs in points.items():
        if not runs:
            continue
        late_pct = [100.0 * p["app"]["late"] / max(1, p["app"]["started"]) for p in runs]
        out[key] = {
            "late_at_app": _median([p["app"]["late"] for p in runs]),
            "started_at_app": _median([p["app"]["started"] for p in runs]),
            "late_pct_of_started": _median(late_pct),
            "goodput_within_deadline_pct": _median([p["goodput_within_pct"] for p in runs]),
            "budget_ms": budget_ms,
            "runs": runs,
        }
        echo(
            f"  {key}: median {out[key]['late_at_app']} of {out[key]['started_at_app']} requests"
            f" reached the app after their deadline; goodput within {budget_ms} ms "
            f"{out[key]['goodput_within_deadline_pct']}% of capacity"
        )
    return out


__all__ = [
    "CAPACITY",
    "ZERO_CONFIG",
    "ServerFailed",
    "coldstart",
    "compare",
    "deadlines",
    "priorities",
    "tenants",
    "timeline",
]
