"""The open-loop load generator (shedder._demo.loadgen) against a tiny server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from shedder._demo.loadgen import (
    ERROR,
    OK,
    SHED,
    TIMEOUT,
    LoadGenerator,
    RequestClass,
    classify,
    poisson_schedule,
)
from shedder._demo.report import summarize_classes

HOST = "127.0.0.1"


@dataclass
class TinyServer:
    """Answers by path: /ok 200, /shed 503, /plain 200 without content-length, /hang never."""

    port: int = 0
    requests: int = 0
    hung: int = 0
    closed_by_client: list[float] = field(default_factory=list)
    all_hung_closed: asyncio.Event = field(default_factory=asyncio.Event)
    expected_hung: int = -1

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        self.requests += 1
        path = head.split(b" ", 2)[1]
        if path == b"/ok":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        elif path == b"/shed":
            body = b'{"error":"overloaded"}'
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        elif path == b"/plain":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nstreamed until close")
        elif path == b"/hang":
            self.hung += 1
            # Never answer; the client must give up and close. EOF (or a reset) tells us it did.
            try:
                await reader.read()
            except ConnectionError:
                pass
            self.closed_by_client.append(time.monotonic())
            if len(self.closed_by_client) == self.expected_hung:
                self.all_hung_closed.set()
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()


@pytest.fixture
async def tiny_server() -> AsyncIterator[TinyServer]:
    state = TinyServer()
    server = await asyncio.start_server(state.handle, HOST, 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


async def test_every_scheduled_request_is_sent_once_and_counted(tiny_server: TinyServer) -> None:
    generator = LoadGenerator(
        HOST, tiny_server.port, rate=400, duration=0.5, deadline=2.0, path="/ok", seed=7
    )
    expected = len(generator.schedule)
    assert 120 < expected < 280  # 200 expected; the seed fixes it
    result = await generator.run()
    assert len(result.outcome) == expected
    assert result.count(OK) == expected
    assert tiny_server.requests == expected
    assert set(result.status) == {200}
    assert all(0 <= latency < 2.0 for latency in result.latency)
    assert generator.outstanding == 0


async def test_statuses_map_to_outcomes(tiny_server: TinyServer) -> None:
    for path, outcome, status in (("/shed", SHED, 503), ("/plain", OK, 200), ("/nope", ERROR, 404)):
        generator = LoadGenerator(
            HOST, tiny_server.port, rate=100, duration=0.1, deadline=2.0, path=path, seed=1
        )
        result = await generator.run()
        assert result.outcome, path
        assert set(result.outcome) == {outcome}, path
        assert set(result.status) == {status}, path


async def test_deadline_abandons_the_request_and_closes_its_connection(
    tiny_server: TinyServer,
) -> None:
    deadline = 0.2
    generator = LoadGenerator(
        HOST, tiny_server.port, rate=50, duration=0.2, deadline=deadline, path="/hang", seed=3
    )
    sent = len(generator.schedule)
    assert sent >= 3
    tiny_server.expected_hung = sent
    started = time.monotonic()
    result = await generator.run()
    finished = time.monotonic()
    assert result.count(TIMEOUT) == sent
    assert all(latency == deadline for latency in result.latency)
    # Abandoned on time: the run ends about `deadline` after the last send (generous bound for
    # a loaded machine), not when the server answers (it never does).
    assert finished - started < 0.2 + deadline + 1.0
    # Every abandoned connection was closed by the client: the server sees EOF on each.
    await asyncio.wait_for(tiny_server.all_hung_closed.wait(), timeout=5.0)
    assert len(tiny_server.closed_by_client) == sent == tiny_server.hung


async def test_refused_connections_are_errors_not_timeouts() -> None:
    # A port nobody listens on: bind one, note it, close it.
    server = await asyncio.start_server(lambda r, w: None, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    generator = LoadGenerator(HOST, port, rate=100, duration=0.1, deadline=1.0, seed=2)
    result = await generator.run()
    assert result.outcome
    assert set(result.outcome) == {ERROR}
    assert result.errors == {"ECONNREFUSED": len(result.outcome)}


async def test_open_loop_sends_on_schedule_while_earlier_requests_hang(
    tiny_server: TinyServer,
) -> None:
    # A closed-loop client would send one request and wait; open loop sends all of them.
    generator = LoadGenerator(
        HOST, tiny_server.port, rate=200, duration=0.3, deadline=0.5, path="/hang", seed=5
    )
    tiny_server.expected_hung = len(generator.schedule)
    result = await generator.run()
    assert tiny_server.hung == len(generator.schedule) > 20
    assert statistics.median(result.send_lag) < 0.05  # on time, generously


def test_poisson_schedule_statistics() -> None:
    rate, duration = 1000.0, 60.0
    times = poisson_schedule(rate, duration, random.Random(42))
    n = len(times)
    # Count: Poisson(60000), standard deviation ~245; 5 sigma.
    assert abs(n - rate * duration) < 5 * (rate * duration) ** 0.5
    assert times == sorted(times)
    assert times[0] > 0
    assert times[-1] < duration
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean_gap = statistics.fmean(gaps)
    assert mean_gap == pytest.approx(1 / rate, rel=0.02)
    # Exponential gaps: standard deviation equals the mean.
    assert statistics.pstdev(gaps) / mean_gap == pytest.approx(1.0, abs=0.03)
    # Counts per 100 ms window are Poisson: variance equals mean (dispersion index ~1).
    windows = [0] * int(duration * 10)
    for at in times:
        windows[int(at * 10)] += 1
    dispersion = statistics.pvariance(windows) / statistics.fmean(windows)
    assert dispersion == pytest.approx(1.0, abs=0.15)


def test_poisson_schedule_is_reproducible_and_bounded() -> None:
    first = poisson_schedule(500, 2.0, random.Random(9))
    assert first == poisson_schedule(500, 2.0, random.Random(9))
    assert first != poisson_schedule(500, 2.0, random.Random(10))
    assert len(poisson_schedule(500, 10.0, random.Random(9), max_requests=100)) == 100
    with pytest.raises(ValueError, match="rate"):
        poisson_schedule(0, 1.0, random.Random(1))
    with pytest.raises(ValueError, match="duration"):
        poisson_schedule(10, 0, random.Random(1))


def test_classify() -> None:
    assert [classify(s) for s in (200, 204, 503, 429, 500, 404)] == [
        OK,
        OK,
        SHED,
        SHED,
        ERROR,
        ERROR,
    ]


def test_generator_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="deadline"):
        LoadGenerator(HOST, 1, rate=10, duration=1, deadline=0)
    with pytest.raises(ValueError, match="max_requests"):
        LoadGenerator(HOST, 1, rate=10, duration=1, max_requests=0)


async def test_request_classes_carry_their_headers_and_are_summarised_per_class() -> None:
    """Two classes in one schedule: each request carries its class's header and the stamp of
    its scheduled send time; the server answers by class, and the summary splits by class."""
    stamps: list[float] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        stamps.append(float(head.split(b"x-sent: ", 1)[1].split(b"\r\n", 1)[0]))
        if b"x-kind: bulk" in head:
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    classes = [
        RequestClass("vip", 1.0, (("x-kind", "vip"),)),
        RequestClass("bulk", 3.0, (("x-kind", "bulk"),)),
    ]
    generator = LoadGenerator(
        HOST, port, rate=400, duration=0.5, seed=5, classes=classes, stamp_header="x-sent"
    )
    same_seed = LoadGenerator(HOST, port, rate=400, duration=0.5, seed=5)
    try:
        result = await generator.run()
    finally:
        server.close()
        await server.wait_closed()
    assert generator.schedule == same_seed.schedule  # classes do not move the send times
    assert result.class_names == ("vip", "bulk")
    by_class = summarize_classes(result)
    vip, bulk = by_class["vip"], by_class["bulk"]
    assert vip["sent"] + bulk["sent"] == len(result.outcome)
    assert 0.15 < vip["sent"] / len(result.outcome) < 0.35  # weight 1 of 4
    assert vip["success_pct"] == 100.0
    assert bulk[SHED] == bulk["sent"]
    assert bulk["share_of_refusals_pct"] == 100.0
    # Stamped with the scheduled send time, on the clock the server reads too.
    assert len(stamps) == len(result.outcome)
    assert all(abs(time.monotonic() - s) < 5 for s in stamps)
