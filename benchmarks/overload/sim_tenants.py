"""The tenants and priorities scenarios in one process: no HTTP, no sockets, same app and mix.

``python benchmarks/overload/sim_tenants.py [--scenario tenants|priorities-0.9x|priorities-4x|
priorities-8x] [--seconds 8] [--reps 3] [--options JSON]``

The benchmark's app (:func:`shedder._demo.asgi_app.make_app`: 8 connections x 20 ms behind
``LoadSheddingMiddleware``) is called directly from one event loop with the Poisson mix of
``run.py --scenario``: for ``tenants`` a ``heavy`` tenant at 8x capacity and a ``light`` one at
20% (header ``x-tenant``); for ``priorities-0.9x`` critical at 0.225x and sheddable at 0.675x,
for ``priorities-4x`` (``-8x``) critical at 0.25x and sheddable at 4x (8x) (header
``x-priority``). Reports, per configuration and class: success, p99 and refusals by
reason, and goodput, over the window after a 1 s warm-up; configurations interleaved. Cheap
enough to try a queue rule in seconds; the real scenario (uvicorn, a load generator process)
has the word.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
_CLASSES: Mapping[str, Any] = {
    "classes": {
        **SHEDDER_SETTINGS,
        "priority_header": "x-priority",
        "trusted_peers": ["127.0.0.1"],
    },
    "no classes": SHEDDER_SETTINGS,
}
# scenario -> (the mix: name, load x capacity, header), configurations by name
SCENARIOS: Mapping[str, tuple[tuple[tuple[str, float, str], ...], Mapping[str, Any]]] = {
    "tenants": (
        (("heavy", 8.0, "x-tenant"), ("light", 0.2, "x-tenant")),
        {
            "fair": {**SHEDDER_SETTINGS, "classify": "tenant-header"},
            "unclassified": SHEDDER_SETTINGS,
        },
    ),
    # The priorities scenario at 0.9x: no class may be refused more than without classes.
    "priorities-0.9x": (
        (("critical", 0.225, "x-priority"), ("sheddable", 0.675, "x-priority")),
        _CLASSES,
    ),
    # Overload: critical served (>= 99.5%, p99 <= 40 ms), sheddable takes the refusals.
    "priorities-4x": (
        (("critical", 0.25, "x-priority"), ("sheddable", 4.0, "x-priority")),
        _CLASSES,
    ),
    "priorities-8x": (
        (("critical", 0.25, "x-priority"), ("sheddable", 8.0, "x-priority")),
        _CLASSES,
    ),
}


async def _one(app: Any, tenant: str, header: str, out: list[tuple[str, float, int, str]]) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": [(b"host", b"bench"), (header.encode(), tenant.encode())],
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


async def run(
    mix: tuple[tuple[str, float, str], ...], options: Mapping[str, Any], seconds: float, seed: int
) -> dict[str, Any]:
    app = make_app(AppSettings(POOL, HOLD_MS, dict(options)))
    rng = random.Random(seed)
    total = sum(load for _, load, _ in mix) * CAPACITY
    names = [name for name, _, _ in mix]
    weights = [load for _, load, _ in mix]
    headers = {name: header for name, _, header in mix}
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
        task = asyncio.ensure_future(_one(app, tenant, headers[tenant], target))
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
    parser.add_argument("--scenario", choices=list(SCENARIOS), default="tenants")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="configurations to run (default: all)")
    parser.add_argument("--options", help="extra middleware options for the first one, JSON")
    args = parser.parse_args()
    mix, configs = SCENARIOS[args.scenario]
    configs = {k: v for k, v in configs.items() if not args.only or k in args.only}
    if args.options:
        first = next(iter(configs))
        configs = {**configs, first: {**configs[first], **json.loads(args.options)}}
    print(f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    names = [name for name, _, _ in mix]
    for rep in range(args.reps):
        for key, options in configs.items():  # interleaved
            res = asyncio.run(run(mix, options, args.seconds, args.seed + rep))
            parts = [
                f"{n} {res[n]['success_pct']}% ok p99 {res[n]['p99_ms']} ms"
                f" refused {res[n]['refused']}"
                for n in names
            ]
            print(
                f"rep {rep} {key:>12}: {'; '.join(parts)}; goodput {res['goodput_pct']}%"
                f" (late {res['late_s']} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
