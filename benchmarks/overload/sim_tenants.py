"""The tenants scenario in one process: no HTTP, no sockets, the same app and the same mix.

``python benchmarks/overload/sim_tenants.py [--seconds 8] [--reps 3] [--options JSON]``

The benchmark's app (:func:`shedder._demo.asgi_app.make_app`: 8 connections x 20 ms behind
``LoadSheddingMiddleware``) is called directly from one event loop, with Poisson arrivals of a
``heavy`` tenant at 8x capacity and a ``light`` one at 20% (header ``x-tenant``), as in
``run.py --scenario tenants``. Reports, per configuration: the light tenant's success and p99,
the refusals by reason, and goodput, over the window after a 1 s warm-up. Cheap enough to try a
queue rule in seconds; the real scenario (uvicorn, a load generator process) has the word.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from shedder._demo.asgi_app import make_app
from shedder._demo.runner import SHEDDER_SETTINGS
from shedder._demo.settings import AppSettings

POOL, HOLD_MS = 8, 20.0
CAPACITY = POOL * 1000.0 / HOLD_MS
MIX = (("heavy", 8.0), ("light", 0.2))
CONFIGS: Mapping[str, Mapping[str, Any]] = {
    "fair": {**SHEDDER_SETTINGS, "classify": "tenant-header"},
    "unclassified": SHEDDER_SETTINGS,
}


async def _one(app: Any, tenant: str, out: list[tuple[str, float, int, str]]) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": [(b"host", b"bench"), (b"x-tenant", tenant.encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    never = asyncio.Event()
    status = 0
    body = b""

    async def receive() -> dict[str, Any]:
        await never.wait()  # the client never leaves
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        nonlocal status, body
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")

    started = time.monotonic()
    await app(scope, receive, send)
    reason = ""
    if status == 503:
        reason = json.loads(body).get("reason", "?")
    out.append((tenant, time.monotonic() - started, status, reason))


async def run(options: Mapping[str, Any], seconds: float, seed: int) -> dict[str, Any]:
    app = make_app(AppSettings(POOL, HOLD_MS, dict(options)))
    rng = random.Random(seed)
    total = sum(load for _, load in MIX) * CAPACITY
    names = [name for name, _ in MIX]
    weights = [load for _, load in MIX]
    records: list[tuple[str, float, int, str]] = []
    counted: list[tuple[str, float, int, str]] = []
    tasks = set()
    loop = asyncio.get_running_loop()
    start = loop.time()
    at = 0.0
    while at < seconds:
        at += rng.expovariate(total)
        tenant = rng.choices(names, weights)[0]
        delay = start + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        target = counted if 1.0 <= at < seconds - 0.5 else records
        task = asyncio.ensure_future(_one(app, tenant, target))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    late = loop.time() - start - seconds
    await asyncio.gather(*tasks)
    window = seconds - 1.5
    result: dict[str, Any] = {"late_s": round(late, 3)}
    for name in names:
        mine = [r for r in counted if r[0] == name]
        ok = [r[1] for r in mine if r[2] == 200]
        result[name] = {
            "sent": len(mine),
            "success_pct": round(100.0 * len(ok) / len(mine), 2) if mine else None,
            "p99_ms": round(1000 * statistics.quantiles(ok, n=100)[98], 1) if len(ok) > 1 else None,
            "refused": dict(Counter(r[3] for r in mine if r[2] == 503)),
        }
    good = sum(1 for r in counted if r[2] == 200)
    result["goodput_pct"] = round(100.0 * good / window / CAPACITY, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS))
    parser.add_argument("--options", help="extra middleware options for 'fair', JSON")
    args = parser.parse_args()
    configs = {k: v for k, v in CONFIGS.items() if not args.only or k in args.only}
    if args.options:
        configs = {
            **configs,
            "fair": {**configs.get("fair", CONFIGS["fair"]), **json.loads(args.options)},
        }
    print(f"load average {' / '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}")
    for rep in range(args.reps):
        for key, options in configs.items():  # interleaved
            res = asyncio.run(run(options, args.seconds, args.seed + rep))
            light, heavy = res["light"], res["heavy"]
            print(
                f"rep {rep} {key:>12}: light {light['success_pct']}% ok p99 {light['p99_ms']} ms"
                f" refused {light['refused']}; heavy {heavy['success_pct']}%;"
                f" goodput {res['goodput_pct']}% (late {res['late_s']} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
