"""Is the concurrency limit exact under bursts? Real gRPC servers on 127.0.0.1, sync and aio.

    python benchmarks/bench_grpc_exactness.py [--limits 4 16 32] [--waves 5] [--work-ms 20]

Each wave fires 10 x N concurrent unary calls (one in five with a deadline of 1.5 x the work,
which cancels some while queued or running) at a server whose handler counts, under a lock, how many
calls run at that instant. For each server (sync ``grpc.server``, ``grpc.aio.server``) it
compares shedder's interceptor (limit N, queue N) with grpc's own ``maximum_concurrent_rpcs=N``
and prints the most calls ever seen running at once, beside N, plus the outcomes. The target:
``max running <= N`` in every shedder row, and every refusal carrying the pushback trailer.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections import Counter
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from shedder import Throttler
from shedder.grpc import PUSHBACK_KEY, AsyncThrottlingInterceptor, ThrottlingInterceptor

SERVICE = "bench.Work"


class Probe:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0
        self.most = 0

    def enter(self) -> None:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)

    def exit(self) -> None:
        with self._lock:
            self.running -= 1


@dataclass
class Result:
    server: str
    admission: str
    limit: int
    most: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    refusals_with_pushback: int = 0
    seconds: float = 0.0


async def fire(target: str, limit: int, waves: int, work: float, result: Result) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Work")

        async def one(i: int) -> None:
            timeout = 1.5 * work if i % 5 == 0 else 10.0
            try:
                await call(b"", timeout=timeout)
                result.outcomes["ok"] += 1
            except grpc.aio.AioRpcError as error:
                result.outcomes[error.code().name] += 1
                if error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and any(
                    key == PUSHBACK_KEY for key, _ in error.trailing_metadata() or ()
                ):
                    result.refusals_with_pushback += 1

        await channel.channel_ready()
        started = time.perf_counter()
        for _ in range(waves):
            await asyncio.gather(*(one(i) for i in range(10 * limit)))
        result.seconds = time.perf_counter() - started


async def run_sync(limit: int, waves: int, work: float, shedder: bool) -> Result:
    probe = Probe()

    def work_handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        probe.enter()
        try:
            time.sleep(work)
        finally:
            probe.exit()
        return b""

    options: dict[str, Any] = {}
    if shedder:
        options["interceptors"] = [ThrottlingInterceptor(Throttler(limit, max_queue=limit))]
    else:
        options["maximum_concurrent_rpcs"] = limit
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=3 * limit), **options)
    handlers = {"Work": grpc.unary_unary_rpc_method_handler(work_handler)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    result = Result("sync", "shedder" if shedder else "maximum_concurrent_rpcs", limit)
    try:
        await fire(f"127.0.0.1:{port}", limit, waves, work, result)
    finally:
        server.stop(grace=None).wait()
    result.most = probe.most
    return result


async def run_aio(limit: int, waves: int, work: float, shedder: bool) -> Result:
    probe = Probe()

    async def work_handler(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        probe.enter()
        try:
            await asyncio.sleep(work)
        finally:
            probe.exit()
        return b""

    options: dict[str, Any] = {}
    if shedder:
        options["interceptors"] = [AsyncThrottlingInterceptor(Throttler(limit, max_queue=limit))]
    else:
        options["maximum_concurrent_rpcs"] = limit
    server = grpc.aio.server(**options)
    handlers = {"Work": grpc.unary_unary_rpc_method_handler(work_handler)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    result = Result("aio", "shedder" if shedder else "maximum_concurrent_rpcs", limit)
    try:
        await fire(f"127.0.0.1:{port}", limit, waves, work, result)
    finally:
        await server.stop(grace=None)
    result.most = probe.most
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limits", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--waves", type=int, default=5)
    parser.add_argument("--work-ms", type=float, default=20.0)
    args = parser.parse_args()
    work = args.work_ms / 1000
    header = (
        f"{'server':6} {'admission':24} {'N':>4} {'max running':>11} {'exact':>5}"
        f" {'ok':>5} {'refused':>7} {'pushback':>8} {'deadline':>8} {'s':>6}"
    )
    print(f"{args.waves} waves of 10 x N concurrent calls, {args.work_ms} ms of work each")
    print(header)
    print("-" * len(header))
    for limit in args.limits:
        for runner in (run_sync, run_aio):
            for shedder in (True, False):
                r = await runner(limit, args.waves, work, shedder)
                exact = "yes" if r.most <= r.limit else "NO"
                print(
                    f"{r.server:6} {r.admission:24} {r.limit:4} {r.most:11} {exact:>5}"
                    f" {r.outcomes['ok']:5} {r.outcomes['RESOURCE_EXHAUSTED']:7}"
                    f" {r.refusals_with_pushback:8} {r.outcomes['DEADLINE_EXCEEDED']:8}"
                    f" {r.seconds:6.2f}"
                )


if __name__ == "__main__":
    asyncio.run(main())
