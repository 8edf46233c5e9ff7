"""The overload benchmark of issue 7: shedder against the alternatives, open loop.

    python benchmarks/overload/run.py [--quick] [--results DIR] [--seconds S] [--only KEY ...]
    python benchmarks/overload/run.py --compare asgi-shedder asgi-limit --reps 3
    python benchmarks/overload/run.py --scenario coldstart [priorities tenants deadlines]

Capacity 400 req/s (8 simulated database connections held 20 ms each), client deadline 1 s,
offered loads 0.5x, 0.9x, 2x, 4x and 8x capacity, a fresh server for every point. Writes
overload.json, overload.md and overload.png to benchmarks/results/ (git-ignored) unless
--results says otherwise. See README.md beside this file for the method and the settings.

``--compare A B``: the two configurations interleaved (A B A B A B per load) at ``--loads``
(default 2 4 8), medians of ``--reps``, how far each holds over those loads (goodput, and
answers within the deadline), then each one's largest sustainable overload (doubling from 2x,
or ``--sustain-loads``; none with ``--no-sustain``); writes compare.json. ``--scenario``: see
scenarios.py; writes scenario-<name>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from shedder._demo.harness import PortInUse, ServerFailed, handle_sigterm, plan_cpus
from shedder._demo.runner import (
    BENCHMARK_DEPENDENCIES,
    BENCHMARK_LOADS,
    benchmark_targets,
    missing_demo_dependencies,
    run_comparison,
)

RESULTS = Path(__file__).resolve().parent.parent / "results"
SCENARIOS = ("coldstart", "priorities", "tenants", "deadlines")


def _write(results: Path, name: str, payload: dict[str, Any], started: list[float]) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    meta = {
        "command": " ".join(["python benchmarks/overload/run.py", *sys.argv[1:]]),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": started,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }
    path.write_text(json.dumps({"meta": meta, **payload}, indent=1))
    print(f"load average before {started}, after {meta['load_average_after']}; wrote {path}")
    return path


def run_scenarios(args: argparse.Namespace, targets: list[Any]) -> None:
    """The --compare and --scenario modes (see scenarios.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import scenarios

    cpus = plan_cpus()
    cpus.apply_to_self()
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    common = {"deadline": args.deadline, "seed": args.seed, "cpus": cpus, "echo": print}
    loadavg = [round(v, 2) for v in os.getloadavg()]
    print(f"load average {loadavg}")
    if args.compare:
        by_key = {t.key: t for t in targets}
        chosen = [by_key[k] for k in args.compare]
        loads = args.loads if args.loads_given else [2.0, 4.0, 8.0]
        out = scenarios.compare(
            chosen,
            loads,
            reps=args.reps,
            duration=seconds,
            **common,
            sustain_from=None if args.no_sustain else 2.0,
            sustain_max=args.sustain_max,
            sustain_loads=args.sustain_loads,
        )
        _write(args.results, "compare", out, loadavg)
    for name in args.scenario or ():
        if name == "coldstart":
            options = json.loads(args.options) if args.options else scenarios.ZERO_CONFIG
            out = scenarios.coldstart(
                options,
                label=args.label,
                reps=args.reps,
                seconds=seconds,
                load=0.9,
                overloads=[] if args.no_overloads else [2.0, 4.0, 8.0],
                **common,
            )
        else:
            try:
                out = getattr(scenarios, name)(reps=args.reps, duration=seconds, **common)
            except ServerFailed as exc:
                # The scenarios of issues 15 and 16 need their API: say so, run the others.
                last = str(exc).strip().splitlines()[-1]
                print(f"  {name}: the server did not start ({last})", file=sys.stderr)
                out = {"error": str(exc)[-2000:]}
        _write(args.results, f"scenario-{name}{args.suffix}", out, loadavg)


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
    parser.add_argument("--compare", nargs=2, choices=keys, metavar="KEY", help="A B interleaved")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (--compare, --scenario)")
    parser.add_argument("--sustain-max", type=float, default=32.0, help="x capacity, --compare")
    parser.add_argument(
        "--sustain-loads",
        type=float,
        nargs="+",
        help="--compare: the sustain ladder (x capacity) instead of doubling from 2",
    )
    parser.add_argument(
        "--no-sustain", action="store_true", help="--compare: no sustain ladder, --loads only"
    )
    parser.add_argument("--scenario", nargs="+", choices=SCENARIOS)
    parser.add_argument("--options", help="coldstart: shedder options, JSON")
    parser.add_argument("--label", default="zero-config", help="coldstart: the options' name")
    parser.add_argument("--no-overloads", action="store_true", help="coldstart: 0.9x only")
    parser.add_argument("--suffix", default="", help="appended to the scenario's file name")
    args = parser.parse_args()
    args.loads_given = "--loads" in sys.argv
    missing = missing_demo_dependencies(BENCHMARK_DEPENDENCIES)
    if missing:
        print(f'needs: pip install "loadshedder[demo]" (missing: {", ".join(missing)})')
        return 2
    if args.compare or args.scenario:
        try:
            with handle_sigterm():
                run_scenarios(args, targets)
        except KeyboardInterrupt:
            print("interrupted: servers stopped", file=sys.stderr)
            return 130
        except (PortInUse, ServerFailed) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
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
