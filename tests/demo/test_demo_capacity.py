"""The demo target's capacity changes and named limit algorithms (benchmarks/adaptive)."""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any

import pytest

import shedder
from shedder._demo.database import SimulatedDatabase
from shedder._demo.settings import AppSettings, throttler_options
from shedder.limits import AIMDLimit, Gradient2Limit, VegasLimit


def test_slowdown_and_named_limit_round_trip_through_the_environment() -> None:
    settings = AppSettings(
        shedder={"limit": {"vegas": {"max_limit": 50}}, "max_queue": 8},
        slowdown=((10.0, 20.0, 3.0),),
    )
    back = AppSettings.from_env(settings.to_env())
    assert back == settings
    assert [back.factor_at(t) for t in (0.0, 9.99, 10.0, 19.99, 20.0)] == [1, 1, 3, 3, 1]
    options = throttler_options(back.shedder)
    assert isinstance(options["max_concurrency"], VegasLimit)
    assert options["max_concurrency"].max_limit == 50
    assert options["max_queue"] == 8
    assert "limit" not in options


def test_the_existing_settings_are_unchanged() -> None:
    settings = AppSettings(shedder={"max_concurrency": 9, "max_queue": 4})
    assert settings.to_env()["SHEDDER_DEMO_SLOWDOWN"] == ""
    assert throttler_options(settings.shedder) == {"max_concurrency": 9, "max_queue": 4}


@pytest.mark.parametrize(("name", "cls"), [("aimd", AIMDLimit), ("gradient2", Gradient2Limit)])
def test_every_algorithm_by_name(name: str, cls: type) -> None:
    assert isinstance(throttler_options({"limit": {name: {}}})["max_concurrency"], cls)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"limit": {"nope": {}}}, "one of fixed, aimd, vegas, gradient2"),
        ({"limit": {"vegas": {}, "aimd": {}}}, "with one name"),
        ({"limit": {"vegas": {}}, "max_concurrency": 3}, "not both"),
    ],
)
def test_bad_limit_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        throttler_options(options)


@pytest.mark.parametrize("raw", ['{"a": 1}', "[[1, 2]]", "[[5, 2, 3]]", "[[0, 1, 0]]"])
def test_bad_slowdown_names_the_variable_or_the_stretch(raw: str) -> None:
    with pytest.raises(ValueError, match=r"SHEDDER_DEMO_SLOWDOWN|slowdown"):
        AppSettings.from_env({"SHEDDER_DEMO_SLOWDOWN": raw})


def test_the_database_holds_longer_during_a_slowdown() -> None:
    # From the first booking on, every query is 3x slower for the next hour.
    database = SimulatedDatabase(1, 0.02, lambda elapsed: 3.0 if elapsed < 3600 else 1.0)
    before = time.monotonic()
    first = database.book()
    second = database.book()  # queues behind the first on the only connection
    assert second - first == pytest.approx(0.06)
    assert 0.06 <= first - before < 0.5  # loose: the machine may be busy


def test_record_and_json_only_options_round_trip() -> None:
    settings = AppSettings(
        shedder={"max_concurrency": 9, "trusted_peers": ["127.0.0.1"], "classify": "tenant-header"},
        record=0.1,
    )
    back = AppSettings.from_env(settings.to_env())
    assert back.record == 0.1
    options = throttler_options(back.shedder)
    assert options["trusted_peers"] == ("127.0.0.1",)  # JSON lists become the tuples asked for
    assert callable(options["classify"])
    with pytest.raises(ValueError, match="classify must name one of tenant-header"):
        throttler_options({"classify": "nope"})
    deadlines = throttler_options({"deadlines": {"margin": 0.05}})["deadlines"]
    assert deadlines == shedder.Deadlines(margin=0.05)
    assert throttler_options({"deadlines": None}) == {"deadlines": None}
    with pytest.raises(ValueError, match="SHEDDER_DEMO_RECORD"):
        AppSettings.from_env({"SHEDDER_DEMO_RECORD": "often"})


async def test_the_recording_app_counts_requests_that_reach_it_after_their_deadline() -> None:
    import json

    from shedder._demo.asgi_app import make_app

    app = make_app(AppSettings(pool=8, hold_ms=1.0, shedder={"max_concurrency": 9}, record=0.05))
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    def scope(path: str, scheduled: float | None = None) -> MutableMapping[str, Any]:
        headers = [(b"x-envoy-expected-rq-timeout-ms", b"100")]
        if scheduled is not None:
            headers.append((b"x-bench-scheduled", f"{scheduled:.6f}".encode()))
        return {"type": "http", "method": "GET", "path": path, "headers": headers}

    now = time.monotonic()
    await app(scope("/", now - 1.0), receive, send)  # sent a second ago: 900 ms late
    await app(scope("/", now), receive, send)  # in time
    await app(scope("/"), receive, send)  # no stamp: counted apart
    sent.clear()
    await app(scope("/bench/stats"), receive, send)  # exempt: never throttled
    report = json.loads(sent[1]["body"])
    assert (report["started"], report["late"], report["unstamped"]) == (3, 1, 1)
    assert 850 < report["late_max_ms"] < 1500
