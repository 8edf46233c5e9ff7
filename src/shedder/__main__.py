"""``shedder demo`` (also ``python -m shedder demo``): see shedder cope with overload.

Starts the example app under uvicorn with shedder in front, drives it from under capacity to
several times capacity with an open-loop load generator, then does the same without shedder,
and ends with the side-by-side table and a plot. Needs the ``demo`` extra.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__

__all__ = ["main"]

DEMO_HINT = 'shedder demo needs the demo extra: pip install "loadshedder[demo]"'
# Each step's first and last second are not counted (the runner's warm-up and cool-down), so a
# step must be longer than both together for anything to be measured.
MIN_SECONDS = 2.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shedder", description="shedder: load shedding for Python web services."
    )
    parser.add_argument("--version", action="version", version=f"shedder {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="watch an overloaded app with and without shedder (about a minute)",
        description=(
            "Start the example app (8 simulated database connections x 20 ms = 400 req/s) "
            "under uvicorn with shedder in front, offer it 0.5x to 4x its capacity with an "
            "open-loop load generator, do the same without shedder, and show the two side by "
            "side. Servers run on 127.0.0.1 and are stopped on exit and on Ctrl-C."
        ),
    )
    demo.add_argument(
        "--seconds",
        type=float,
        default=6.0,
        help=f"seconds of load per step, more than {MIN_SECONDS:g} (default 6: about a minute)",
    )
    demo.add_argument(
        "--long", action="store_true", help="15 s per step and up to 8x (about 3 minutes)"
    )
    demo.add_argument(
        "--results",
        type=Path,
        default=None,
        help="directory for demo.json, demo.md and demo.png "
        "(default: benchmarks/results if it exists here, else ./shedder-demo-results)",
    )
    demo.add_argument(
        "--port", type=int, default=None, help="port on 127.0.0.1 for the app (default: a free one)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shedder`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "demo":
        parser.print_help()
        return 2
    if not args.seconds > MIN_SECONDS:  # also refuses nan
        parser.error(
            f"--seconds must be more than {MIN_SECONDS:g} (the first and last second of each "
            f"step are not counted), got {args.seconds:g}"
        )
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    from ._demo.runner import missing_demo_dependencies

    missing = missing_demo_dependencies()
    if missing:
        print(f"{DEMO_HINT}\n(missing: {', '.join(missing)})", file=sys.stderr)
        return 2
    return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    from ._demo.harness import PortInUse, ServerFailed, handle_sigterm
    from ._demo.runner import DEMO_LOADS, demo_targets, make_console, run_comparison

    console = make_console()
    results = args.results
    if results is None:
        here = Path.cwd() / "benchmarks"
        results = here / "results" if here.is_dir() else Path.cwd() / "shedder-demo-results"
    loads = (*DEMO_LOADS, 8.0) if args.long else DEMO_LOADS
    seconds = 15.0 if args.long and args.seconds == 6.0 else args.seconds
    try:
        with handle_sigterm():
            outcome = run_comparison(
                demo_targets(),
                loads,
                duration=seconds,
                deadline=1.0,
                results_dir=results,
                name="demo",
                title="shedder demo: the same app with and without shedder",
                port=args.port,
                console=console,
                compact=True,
            )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: servers stopped[/]")
        return 130
    except PortInUse as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    except ServerFailed as exc:
        console.print(f"[red]error: the app server failed to start[/]\n{exc}")
        return 1
    with_shedder, without = outcome.rows
    top = max(loads)
    shedded, bare = with_shedder.at(top), without.at(top)
    if shedded is not None and bare is not None:
        shed_p99 = "-" if shedded.p99_shed_ms is None else f"{shedded.p99_shed_ms:.0f} ms"
        console.print(
            f"\nAt {top:g}x capacity, without shedder the app delivered {bare.goodput:.0f} good "
            f"answers/s: {bare.timeout_pct:.0f}% of requests outlived their 1 s deadline while it "
            f"worked on requests whose clients had gone. With shedder it delivered "
            f"{shedded.goodput:.0f}/s ({shedded.goodput_pct:.0f}% of capacity), and refused the "
            f"excess with 503 + Retry-After (p99 {shed_p99})."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
