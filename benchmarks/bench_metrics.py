"""What metrics cost per request: ns per uncontended acquire + release, metrics off and on.

    python benchmarks/bench_metrics.py [--number 20000] [--repeat 7]

Variants, all measured in the same run (best of ``--repeat`` timings of ``--number`` calls):

* ``off``: no listener, the throttler's fastest path.
* ``noop listener``: an empty ThrottlerListener, the core's own cost of dispatching events.
* ``collector``: ``instrument()`` in one process (gauges/counters read at scrape time, two
  lean histogram observations per request).
* ``objects``: ``instrument(multiprocess=True)`` without the env var: prometheus_client metric
  objects updated per event, values in memory.
* ``objects+mmap``: real multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before
  prometheus_client is imported), in a child process with its own ``off`` baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
sys.path.insert(0, str(SRC))

from shedder import Throttler, ThrottlerListener  # noqa: E402


def _ns_per_call(func: Callable[[], object], number: int, repeat: int) -> float:
    func()  # warm up
    return min(timeit.repeat(func, number=number, repeat=repeat)) / number * 1e9


def _cycle(throttler: Throttler) -> Callable[[], object]:
    acquire = throttler.acquire

    def acquire_release() -> object:
        return acquire().release()

    return acquire_release


def measure(variant: str, number: int, repeat: int) -> float:
    throttler = Throttler(max_concurrency=64, name=variant)
    if variant == "noop listener":
        throttler.add_listener(ThrottlerListener())
    elif variant != "off":
        from prometheus_client import CollectorRegistry

        from shedder.prometheus import instrument

        instrument(throttler, registry=CollectorRegistry(), multiprocess=variant != "collector")
    return _ns_per_call(_cycle(throttler), number, repeat)


def _child(number: int, repeat: int) -> None:
    """Run in a process that imports prometheus_client in multiprocess mode."""
    results = {
        "off": measure("off", number, repeat),
        "objects+mmap": measure("objects+mmap", number, repeat),
    }
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=7, help="timings; the best is kept")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.number, args.repeat)
        return

    results = {
        variant: measure(variant, args.number, args.repeat)
        for variant in ("off", "noop listener", "collector", "objects")
    }
    with tempfile.TemporaryDirectory() as multiproc_dir:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": multiproc_dir}
        command = [sys.executable, __file__, "--child", f"--number={args.number}"]
        command.append(f"--repeat={args.repeat}")
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    child = json.loads(out.stdout)

    base = results["off"]
    print(f"ns per uncontended acquire + release (best of {args.repeat} x {args.number})")
    print(f"{'variant':<16}{'ns':>9}{'x off':>8}{'+ns':>8}")
    for variant, ns in results.items():
        print(f"{variant:<16}{ns:>9.0f}{ns / base:>8.2f}{ns - base:>8.0f}")
    child_base, mmap = child["off"], child["objects+mmap"]
    print(f"{'objects+mmap':<16}{mmap:>9.0f}{mmap / child_base:>8.2f}{mmap - child_base:>8.0f}")
    print(f"  (multiprocess child process; its own 'off' baseline: {child_base:.0f} ns)")


if __name__ == "__main__":
    main()
