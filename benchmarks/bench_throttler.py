"""Micro-benchmark: ns per uncontended acquire+release, beside the stdlib semaphores.

    python benchmarks/bench_throttler.py [--rounds 7] [--n 200000]

Each variant runs in the same process, interleaved round by round, and the report gives the
median ns per operation and its ratio to the stdlib semaphore of the same world (threads or
asyncio): the machine is shared and noisy, so ratios in one run are what compare.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Callable

from shedder import Throttler


def sync_variants(n: int) -> dict[str, Callable[[], float]]:
    semaphore = threading.Semaphore(8)
    bounded = threading.BoundedSemaphore(8)
    throttler = Throttler(max_concurrency=8, max_queue=8)

    def bench_semaphore() -> float:
        started = time.perf_counter_ns()
        for _ in range(n):
            with semaphore:
                pass
        return (time.perf_counter_ns() - started) / n

    def bench_bounded() -> float:
        started = time.perf_counter_ns()
        for _ in range(n):
            with bounded:
                pass
        return (time.perf_counter_ns() - started) / n

    def bench_throttler_with() -> float:
        started = time.perf_counter_ns()
        for _ in range(n):
            with throttler:
                pass
        return (time.perf_counter_ns() - started) / n

    def bench_throttler_verbs() -> float:
        acquire = throttler.acquire
        started = time.perf_counter_ns()
        for _ in range(n):
            acquire().release()
        return (time.perf_counter_ns() - started) / n

    return {
        "threading.Semaphore (with)": bench_semaphore,
        "threading.BoundedSemaphore (with)": bench_bounded,
        "Throttler (with)": bench_throttler_with,
        "Throttler (acquire/release)": bench_throttler_verbs,
    }


def async_variants(n: int, loop: asyncio.AbstractEventLoop) -> dict[str, Callable[[], float]]:
    semaphore = asyncio.Semaphore(8)
    throttler = Throttler(max_concurrency=8, max_queue=8)

    async def semaphore_loop() -> float:
        started = time.perf_counter_ns()
        for _ in range(n):
            async with semaphore:
                pass
        return (time.perf_counter_ns() - started) / n

    async def throttler_with_loop() -> float:
        started = time.perf_counter_ns()
        for _ in range(n):
            async with throttler:
                pass
        return (time.perf_counter_ns() - started) / n

    async def throttler_verbs_loop() -> float:
        acquire = throttler.acquire_async
        started = time.perf_counter_ns()
        for _ in range(n):
            (await acquire()).release()
        return (time.perf_counter_ns() - started) / n

    return {
        "asyncio.Semaphore (async with)": lambda: loop.run_until_complete(semaphore_loop()),
        "Throttler (async with)": lambda: loop.run_until_complete(throttler_with_loop()),
        "Throttler (acquire_async/release)": lambda: loop.run_until_complete(
            throttler_verbs_loop()
        ),
    }


def run(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, bench in variants.items():
            samples[name].append(bench())
    return {name: statistics.median(values) for name, values in samples.items()}


def report(title: str, medians: dict[str, float]) -> None:
    baseline = next(iter(medians.values()))
    print(f"\n{title}")
    print(f"  {'variant':<38} {'ns/op':>8} {'vs baseline':>12}")
    for name, ns in medians.items():
        print(f"  {name:<38} {ns:>8.0f} {ns / baseline:>11.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=200_000, help="operations per sample")
    args = parser.parse_args()
    report("threads (uncontended acquire+release)", run(sync_variants(args.n), args.rounds))
    loop = asyncio.new_event_loop()
    try:
        report(
            "asyncio (uncontended acquire+release)",
            run(async_variants(args.n, loop), args.rounds),
        )
    finally:
        loop.close()


if __name__ == "__main__":
    main()
