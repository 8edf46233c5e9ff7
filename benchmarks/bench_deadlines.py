"""Deadlines under overload (issue 16): does a long queue still serve clients in time?

    python benchmarks/bench_deadlines.py [--seconds 8] [--repeats 3] [--load 4] [--margin 0.03]

Capacity 400 req/s (8 simulated database connections held 20 ms each, as in the overload
benchmark), a misconfigured long queue (``max_queue=200, queue_timeout=1.0``), open-loop
Poisson arrivals at ``--load`` x capacity from clients that give up after 100 ms and say so
in ``x-envoy-expected-rq-timeout-ms: 100``. Each client also stamps the wall-clock time it
gives up at in ``x-bench-deadline``, which only the app reads: it counts every request that
reaches it after that time (work for a client that has gone) and every one it finishes late.

Configurations, each under uvicorn, a fresh server per run, repetitions interleaved:

- ``deadlines=None``: the middleware ignores the header (the queue and its 1 s timeout only);
- ``deadlines=Deadlines()``: the default, no margin;
- ``deadlines=Deadlines(margin=M)``: a request waits at most until 100 ms - M.

Goodput within the deadline is 2xx answers received by the client within its 100 ms, per
second. Prints medians of the repetitions; ``--json FILE`` writes every run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shedder._demo.harness import HOST, Target, TargetServer, plan_cpus
from shedder._demo.loadgen import OK, SHED, TIMEOUT, LoadGenerator
from shedder._demo.settings import AppSettings

DEADLINES_ENV = "SHEDDER_BENCH_DEADLINES"  # "none", or JSON keyword arguments of Deadlines
BUDGET = 0.100  # the clients' deadline, seconds
HOLD_MS = 20.0

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


# --- the server side (imported by uvicorn: --factory bench_deadlines:make_app) -----------------


def make_app() -> Any:
    """The demo's database behind shedder's middleware, counting work done for gone clients."""
    import os

    from shedder import Deadlines
    from shedder._demo.database import SimulatedDatabase
    from shedder.asgi import LoadSheddingMiddleware

    settings = AppSettings.from_env()
    database = SimulatedDatabase(settings.pool, settings.hold_ms / 1000.0)
    counts = {"reached": 0, "reached_late": 0, "finished_late": 0}
    plain = [(b"content-type", b"text/plain"), (b"content-length", b"2")]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/counts":
            body = json.dumps(counts).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        if path != "/ready":
            gives_up = next(
                (float(v) for k, v in scope["headers"] if k == b"x-bench-deadline"), None
            )
            counts["reached"] += 1
            if gives_up is not None and time.time() > gives_up:
                counts["reached_late"] += 1
            await database.query_async()
            if gives_up is not None and time.time() > gives_up:
                counts["finished_late"] += 1
        await send({"type": "http.response.start", "status": 200, "headers": plain})
        await send({"type": "http.response.body", "body": b"ok"})

    raw = os.environ.get(DEADLINES_ENV, "none")
    deadlines = None if raw == "none" else Deadlines(**json.loads(raw))
    return LoadSheddingMiddleware(
        app, exempt=["/ready", "/counts"], deadlines=deadlines, **settings.shedder
    )


# --- the client side ----------------------------------------------------------------------------


class StampingGenerator(LoadGenerator):
    """The demo's open-loop generator, sending the deadline headers with every request.

    With ``request_start``, also ``x-request-start: t=<µs>``, the send time, as a proxy in
    front stamps it: the server then knows how long the request sat in its accept queue.
    """

    request_start = False

    def request_for(self, index: int) -> bytes:
        # Built when the request is sent: stamped with the time the client gives up.
        now = time.time()
        budget_ms = round(BUDGET * 1000)
        extra = f"x-request-start: t={int(now * 1e6)}\r\n" if self.request_start else ""
        stamp = f"x-envoy-expected-rq-timeout-ms: {budget_ms}\r\n{extra}"
        stamp += f"x-bench-deadline: {now + BUDGET:.6f}\r\n\r\n"
        return super().request_for(index)[:-2] + stamp.encode()


@dataclass(frozen=True)
class Config:
    key: str
    deadlines: dict[str, Any] | None  # Deadlines keyword arguments, or None: deadlines=None


@dataclass(frozen=True)
class DeadlineTarget(Target):
    """The demo's uvicorn target, serving this file's app instead of the demo's."""

    deadlines: str = "none"

    def command(self, port: int) -> list[str]:
        words = super().command(port)
        at = words.index("shedder._demo.asgi_app:app")
        words[at : at + 1] = ["--factory", "bench_deadlines:make_app"]
        return [*words, "--app-dir", str(Path(__file__).resolve().parent)]


class DeadlineServer(TargetServer):
    def environment(self) -> dict[str, str]:
        env = super().environment()
        assert isinstance(self.target, DeadlineTarget)
        env[DEADLINES_ENV] = self.target.deadlines
        return env


def run_once(
    config: Config, load: float, seconds: float, seed: int, pool: int, request_start: bool
) -> dict[str, Any]:
    queue = {"max_concurrency": pool, "max_queue": 200, "queue_timeout": 1.0}
    app = AppSettings(pool=pool, hold_ms=HOLD_MS, shedder=queue)
    target = DeadlineTarget(
        key=config.key,
        label=config.key,
        server="uvicorn",
        app=app,
        deadlines="none" if config.deadlines is None else json.dumps(config.deadlines),
    )
    cpus = plan_cpus()
    with DeadlineServer(target, cpu=cpus.server) as server:
        generator = StampingGenerator(
            HOST,
            server.port,
            rate=app.capacity * load,
            duration=seconds,
            deadline=BUDGET,
            seed=seed,
        )
        generator.request_start = request_start
        result = asyncio.run(generator.run())
        time.sleep(1.2)  # let requests still queued inside the server run out (queue_timeout)
        import http.client

        connection = http.client.HTTPConnection(HOST, server.port, timeout=5)
        connection.request("GET", "/counts")
        counts = json.loads(connection.getresponse().read())
        connection.close()
    good = [lat for lat, out in zip(result.latency, result.outcome, strict=True) if out == OK]
    sent = len(result.outcome)
    return {
        "config": config.key,
        "seed": seed,
        "offered_rps": sent / seconds,
        "goodput_rps": len(good) / seconds,
        "goodput_share": len(good) / seconds / app.capacity,
        "shed": result.count(SHED),
        "timeout": result.count(TIMEOUT),
        "sent": sent,
        "p50_ok_ms": 1000 * statistics.median(good) if good else None,
        "send_lag_p99_ms": 1000 * _quantile(result.send_lag, 0.99),
        **counts,
        "reached_late_share": counts["reached_late"] / max(counts["reached"], 1),
    }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of load per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (>= 3)")
    parser.add_argument("--load", type=float, default=4.0, help="offered load, x capacity")
    parser.add_argument("--margin", type=float, default=0.03, help="Deadlines(margin=...), s")
    parser.add_argument(
        "--pool", type=int, default=8, help="database connections (capacity: 50/s each)"
    )
    parser.add_argument(
        "--request-start", action="store_true", help="clients also send x-request-start"
    )
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    args = parser.parse_args()
    plan_cpus().apply_to_self()
    configs = [
        Config("deadlines=None", None),
        Config("Deadlines()", {}),
        Config(f"Deadlines(margin={args.margin:g})", {"margin": args.margin}),
    ]
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for config in configs:  # interleaved: a drift of the machine hits every row alike
            run = run_once(
                config,
                args.load,
                args.seconds,
                seed=100 + repeat,
                pool=args.pool,
                request_start=args.request_start,
            )
            runs.append(run)
            print(
                f"  {config.key:<24} run {repeat + 1}: goodput {run['goodput_rps']:6.1f}/s, "
                f"reached late {run['reached_late']:5d} of {run['reached']}",
                file=sys.stderr,
            )
    columns = [
        ("goodput_rps", "goodput in 100 ms (req/s)", "{:.1f}"),
        ("goodput_share", "of capacity", "{:.1%}"),
        ("reached_late", "reached app late", "{:.0f}"),
        ("reached_late_share", "late share of reached", "{:.1%}"),
        ("finished_late", "finished late", "{:.0f}"),
        ("reached", "reached app", "{:.0f}"),
        ("shed", "refused", "{:.0f}"),
        ("timeout", "client gave up", "{:.0f}"),
        ("p50_ok_ms", "p50 of good (ms)", "{:.1f}"),
    ]
    print(
        f"\n{args.load:g}x capacity ({args.pool * 1000 / HOLD_MS:.0f} req/s), max_queue=200, "
        f"queue_timeout=1.0, x-request-start {'sent' if args.request_start else 'not sent'}, "
        f"{args.seconds:g} s per run, medians of {args.repeats} runs\n"
    )
    print("| configuration | " + " | ".join(title for _, title, _ in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for config in configs:
        mine = [run for run in runs if run["config"] == config.key]
        cells = []
        for key, _, form in columns:
            values = [run[key] for run in mine if run[key] is not None]
            cells.append(form.format(statistics.median(values)) if values else "-")
        print(f"| {config.key} | " + " | ".join(cells) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
