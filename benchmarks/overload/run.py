"""The overload benchmark of issue 7: shedder against the alternatives, open loop.

    python benchmarks/overload/run.py [--quick] [--results DIR] [--seconds S] [--only KEY ...]

Capacity 400 req/s (8 simulated database connections held 20 ms each), client deadline 1 s,
offered loads 0.5x, 0.9x, 2x, 4x and 8x capacity, a fresh server for every point. Writes
overload.json, overload.md and overload.png to benchmarks/results/ (git-ignored) unless
--results says otherwise. See README.md beside this file for the method and the settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shedder._demo.harness import PortInUse, ServerFailed, handle_sigterm
from shedder._demo.runner import (
    BENCHMARK_DEPENDENCIES,
    BENCHMARK_LOADS,
    benchmark_targets,
    missing_demo_dependencies,
    run_comparison,
)

RESULTS = Path(__file__).resolve().parent.parent / "results"


def main() -> int:
    targets = benchmark_targets()
    keys = [t.key for t in targets]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s per point instead of 8")
    parser.add_argument("--seconds", type=float, default=None, help="seconds of load per point")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"default {RESULTS}")
    parser.add_argument("--only", nargs="+", choices=keys, help="run only these rows")
    parser.add_argument(
        "--loads", type=float, nargs="+", default=list(BENCHMARK_LOADS), help="x capacity"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=1.0, help="client deadline, s")
    args = parser.parse_args()
    missing = missing_demo_dependencies(BENCHMARK_DEPENDENCIES)
    if missing:
        print(f'needs: pip install "loadshedder[demo]" (missing: {", ".join(missing)})')
        return 2
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    if args.only:
        targets = [t for t in targets if t.key in args.only]
    try:
        with handle_sigterm():
            run_comparison(
                targets,
                args.loads,
                duration=seconds,
                deadline=args.deadline,
                results_dir=args.results,
                name="overload",
                title="shedder overload benchmark",
                seed=args.seed,
            )
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        return 130
    except (PortInUse, ServerFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
