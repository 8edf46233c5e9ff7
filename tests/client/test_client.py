"""shedder.client transports and clients against in-process mock servers (no real sleeping)."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

import shedder
from shedder.client import (
    REFUSED_HEADER,
    AdaptiveThrottle,
    AsyncBackpressureAwareClient,
    AsyncBackpressureTransport,
    BackpressureAwareClient,
    BackpressureTransport,
    ClientThrottled,
    DeadlineExceeded,
    GaveUp,
    MaxRetriesExceeded,
    RetryBudget,
    RetryEvent,
    RetryPolicy,
    current_deadline,
    deadline_scope,
)

NOW = 1_700_000_000.0
Reply = httpx.Response | Exception


class Server:
    """A scripted server: answers with ``replies`` in order (the last one repeats)."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []
        # A retry sends the same Request object again: snapshot what each attempt carried.
        self.headers: list[dict[str, str]] = []
        self.timeouts: list[dict[str, float | None]] = []

    def reply(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.headers.append(dict(request.headers))
        self.timeouts.append(dict(request.extensions.get("timeout", {})))
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        return httpx.Response(reply.status_code, headers=reply.headers, content=reply.content)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(request.read())
        return self.reply(request)

    async def async_handler(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(await request.aread())
        return self.reply(request)


def shed(retry_after: str | None = "2", status: int = 503) -> httpx.Response:
    # As bytes: a server may send any octets, and httpx reads non-ASCII ones as UTF-8.
    headers = {} if retry_after is None else {"Retry-After": retry_after.encode()}
    return httpx.Response(status, headers=headers, content=b'{"error":"overloaded"}')


OK = httpx.Response(200, content=b"hello")


def policy(**options: object) -> RetryPolicy:
    """A policy with deterministic randomness and clock and a budget that never bites."""
    defaults: dict[str, object] = {
        "random": lambda: 0.5,
        "clock": lambda: NOW,
        "base_delay": 0.1,
        "budget": RetryBudget(min_retries_per_second=1000),
    }
    return RetryPolicy(**{**defaults, **options})  # type: ignore[arg-type]


def client(server: Server, slept: list[float], **options: object) -> BackpressureAwareClient:
    return BackpressureAwareClient(
        transport=httpx.MockTransport(server.handler),
        policy=policy(**options),
        sleep=slept.append,
    )


# --- honouring Retry-After and backing off ----------------------------------------------------


def test_retry_after_is_honoured_until_the_answer_comes() -> None:
    server, slept = Server(shed("2"), shed("3"), OK), []
    response = client(server, slept).get("http://test/")
    assert response.status_code == 200
    assert response.text == "hello"
    assert len(server.requests) == 3
    # Retry-After plus up to base_delay of jitter (random() = 0.5): never sooner.
    assert slept == pytest.approx([2.05, 3.05])


def test_429_is_retried_and_other_errors_are_not() -> None:
    server, slept = Server(shed("1", status=429), OK), []
    assert client(server, slept).get("http://test/").status_code == 200
    server, slept = Server(shed("1", status=500), OK), []
    assert client(server, slept).get("http://test/").status_code == 500
    assert slept == []


def test_http_date_retry_after_is_honoured() -> None:
    server, slept = Server(shed(email.utils.formatdate(NOW + 7, usegmt=True)), OK), []
    assert client(server, slept).get("http://test/").status_code == 200
    assert slept == pytest.approx([7.05])


def test_long_retry_after_is_capped() -> None:
    server, slept = Server(shed("86400"), OK), []
    client(server, slept, max_retry_after=30.0, total_timeout=60.0).get("http://test/")
    assert slept == pytest.approx([30.05])


@pytest.mark.parametrize("value", [None, "soon", "-1", "1.5", "\u0661", ""])
def test_missing_or_invalid_retry_after_falls_back_to_backoff(value: str | None) -> None:
    server, slept = Server(shed(value), shed(value), shed(value), OK), []
    response = client(server, slept, random=lambda: 1.0, base_delay=0.1, max_delay=0.3).get(
        "http://test/"
    )
    assert response.status_code == 200
    assert slept == pytest.approx([0.1, 0.2, 0.3])  # the full-jitter ceilings, capped


def test_backoff_draws_are_full_jitter() -> None:
    draws = iter([0.25, 0.75])
    server, slept = Server(shed(None), shed(None), OK), []
    client(server, slept, random=lambda: next(draws), base_delay=1.0).get("http://test/")
    assert slept == pytest.approx([0.25, 1.5])  # 0.25 * 1, 0.75 * 2


# --- giving up ---------------------------------------------------------------------------------


def test_exhausted_retries_raise_with_the_last_response() -> None:
    server, slept = Server(shed("1"), shed("1"), shed("5")), []
    with pytest.raises(MaxRetriesExceeded) as info:
        client(server, slept, max_retries=2).get("http://test/")
    assert isinstance(info.value, httpx.HTTPStatusError)
    assert info.value.attempts == 3
    assert info.value.response.status_code == 503
    assert info.value.response.headers["retry-after"] == "5"
    assert info.value.response.content == b'{"error":"overloaded"}'  # already read
    assert info.value.request.url == "http://test/"
    assert "after 3 attempts" in str(info.value)
    assert len(slept) == 2


def test_exhausted_retries_can_return_the_last_response() -> None:
    server, slept = Server(shed("1"), shed("4")), []
    response = client(server, slept, max_retries=1, raise_on_exhausted=False).get("http://test/")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "4"
    assert len(server.requests) == 2


def test_zero_retries_sends_once() -> None:
    server, slept = Server(shed("1")), []
    with pytest.raises(MaxRetriesExceeded):
        client(server, slept, max_retries=0).get("http://test/")
    assert len(server.requests) == 1
    assert slept == []


# --- what may be retried -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"])
def test_idempotent_methods_are_retried(method: str) -> None:
    server, slept = Server(shed("1"), OK), []
    assert client(server, slept).request(method, "http://test/").status_code == 200
    assert len(server.requests) == 2


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_other_methods_are_not_retried_by_default(method: str) -> None:
    server, slept = Server(shed("1"), OK), []
    response = client(server, slept).request(method, "http://test/", content=b"x")
    assert response.status_code == 503  # handed back, not raised: no retry was attempted
    assert len(server.requests) == 1


def test_retried_methods_are_configurable() -> None:
    server, slept = Server(shed("1"), OK), []
    c = client(server, slept, retry_methods={"post"})
    assert c.post("http://test/", content=b"order").status_code == 200
    assert server.bodies == [b"order", b"order"]
    server, slept = Server(shed("1"), OK), []
    assert client(server, slept, retry_methods={"post"}).get("http://test/").status_code == 503


def test_a_bytes_body_is_sent_again_whole() -> None:
    server, slept = Server(shed("1"), OK), []
    client(server, slept).put("http://test/", json={"a": 1})
    assert server.bodies == [b'{"a":1}', b'{"a":1}']


def test_a_streaming_body_is_never_sent_twice() -> None:
    def body() -> Iterator[bytes]:
        yield b"part one, "
        yield b"part two"

    server, slept = Server(shed("1"), OK), []
    response = client(server, slept).put("http://test/", content=body())
    assert response.status_code == 503
    assert server.bodies == [b"part one, part two"]
    assert slept == []


# --- connection errors -------------------------------------------------------------------------


def test_connection_errors_are_retried_with_backoff() -> None:
    refused = httpx.ConnectError("connection refused")
    reset = httpx.ReadError("connection reset by peer")
    server, slept = Server(refused, reset, OK), []
    response = client(server, slept, random=lambda: 1.0).get("http://test/")
    assert response.status_code == 200
    assert slept == pytest.approx([0.1, 0.2])


def test_connection_errors_propagate_when_retries_run_out() -> None:
    server, slept = Server(httpx.ConnectError("connection refused")), []
    with pytest.raises(httpx.ConnectError, match="refused"):
        client(server, slept, max_retries=2).get("http://test/")
    assert len(server.requests) == 3


def test_connection_errors_are_not_retried_for_post() -> None:
    server, slept = Server(httpx.ConnectError("connection refused"), OK), []
    with pytest.raises(httpx.ConnectError):
        client(server, slept).post("http://test/", content=b"x")
    assert len(server.requests) == 1


def test_timeouts_are_not_retried() -> None:
    server, slept = Server(httpx.ReadTimeout("slow"), OK), []
    with pytest.raises(httpx.ReadTimeout):
        client(server, slept).get("http://test/")
    assert len(server.requests) == 1


# --- retry budget and adaptive throttling -----------------------------------------------------


def test_a_spent_budget_gives_up_at_once_like_exhausted_retries() -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10)  # one retry
    server, slept = Server(shed("1")), []
    c = client(server, slept, budget=budget, max_retries=5)
    # The first call gets its one retry, then the budget is spent: the call gives up.
    with pytest.raises(GaveUp, match=r"still 503 after 2 attempts \(the retry budget") as info:
        c.get("http://test/")
    assert info.value.reason == "budget"
    assert info.value.response.content == b'{"error":"overloaded"}'
    assert len(server.requests) == 2
    with pytest.raises(GaveUp) as info:
        c.get("http://test/")
    assert (info.value.reason, info.value.attempts) == ("budget", 1)
    assert len(server.requests) == 3
    assert len(slept) == 1


def test_a_spent_budget_returns_the_503_when_the_policy_says_so() -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.0)
    server, slept = Server(shed("1")), []
    response = client(server, slept, budget=budget, raise_on_exhausted=False).get("http://test/")
    assert response.status_code == 503
    assert len(server.requests) == 1


def test_a_budget_is_shared_between_clients() -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10)
    server, slept = Server(shed("1")), []
    first = client(server, slept, budget=budget, max_retries=1, raise_on_exhausted=False)
    second = client(server, slept, budget=budget, max_retries=1, raise_on_exhausted=False)
    first.get("http://test/")
    second.get("http://test/")
    assert len(server.requests) == 3  # 2 first attempts + the one retry the budget allowed


def test_throttle_refuses_locally_without_sending() -> None:
    throttle = AdaptiveThrottle(random=lambda: 0.0)
    server, slept = Server(shed("1")), []
    c = client(server, slept, throttle=throttle, max_retries=0, raise_on_exhausted=False)
    assert c.get("http://test/").status_code == 503  # p = 0: sent
    with pytest.raises(ClientThrottled, match="refused locally"):
        c.get("http://test/")  # p = 1/2 and random() = 0: refused
    assert len(server.requests) == 1


def test_throttle_counts_accepts() -> None:
    throttle = AdaptiveThrottle(random=lambda: 0.0)
    server, slept = Server(OK), []
    c = client(server, slept, throttle=throttle)
    for _ in range(5):
        assert c.get("http://test/").status_code == 200
    assert throttle.reject_probability() == 0.0


def test_throttle_stops_retries_like_exhausted_retries() -> None:
    throttle = AdaptiveThrottle(random=lambda: 0.0)
    server, slept = Server(shed("1")), []
    with pytest.raises(GaveUp) as info:
        client(server, slept, throttle=throttle, max_retries=3).get("http://test/")
    assert info.value.reason == "throttled"  # the retry was refused locally
    assert info.value.response.status_code == 503
    assert len(server.requests) == 1
    assert slept == []
    response = client(
        server, slept, throttle=AdaptiveThrottle(random=lambda: 0.0), raise_on_exhausted=False
    ).get("http://test/")
    assert response.status_code == 503


# --- visibility: hook and log -----------------------------------------------------------------


def test_every_retry_is_logged_and_hooked(caplog: pytest.LogCaptureFixture) -> None:
    events: list[RetryEvent] = []
    refused = httpx.ConnectError("refused")
    server, slept = Server(shed("2"), refused, shed(None, status=429), OK), []
    caplog.set_level(logging.INFO, logger="shedder.client")
    client(server, slept, on_retry=events.append).get("http://test/path?token=secret")
    assert [(e.attempt, e.reason, e.status) for e in events] == [
        (1, "status 503", 503),
        (2, "ConnectError", None),
        (3, "status 429", 429),
    ]
    assert [e.delay for e in events] == pytest.approx(slept)
    assert events[0].retry_after == 2.0
    assert events[1].error is refused
    assert events[2].retry_after is None
    records = [r for r in caplog.records if r.name == "shedder.client"]
    assert [r.retry_attempt for r in records] == [1, 2, 3]  # type: ignore[attr-defined]
    assert "GET http://test/path: retry 1 of 3 in 2.050 s (status 503)" in caplog.text
    assert "secret" not in caplog.text


def test_a_failing_hook_is_logged_and_does_not_stop_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def hook(event: RetryEvent) -> None:
        raise RuntimeError("hook broke")

    server, slept = Server(shed("1"), OK), []
    assert client(server, slept, on_retry=hook).get("http://test/").status_code == 200
    assert "retry hook" in caplog.text
    assert "hook broke" in caplog.text


def test_budget_refusal_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shedder.client")
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.0)
    client(Server(shed("1")), [], budget=budget, raise_on_exhausted=False).get("http://test/")
    assert "gave up on 503 after 1 attempt: the retry budget is spent" in caplog.text


# --- the transport on its own, and the clients -------------------------------------------------


def test_transport_wraps_any_transport_and_closes_it() -> None:
    closed: list[bool] = []

    class Inner(httpx.MockTransport):
        def close(self) -> None:
            closed.append(True)

    server, slept = Server(shed("1"), OK), []
    transport = BackpressureTransport(Inner(server.handler), policy=policy(), sleep=slept.append)
    with httpx.Client(transport=transport) as c:
        assert c.get("http://test/").status_code == 200
    assert closed == [True]


def test_client_wraps_mounted_transports_too() -> None:
    server, slept = Server(shed("1"), OK), []
    c = BackpressureAwareClient(
        mounts={"http://mounted": httpx.MockTransport(server.handler)},
        policy=policy(),
        sleep=slept.append,
    )
    assert c.get("http://mounted/").status_code == 200
    assert len(slept) == 1


def test_default_transport_is_real_http() -> None:
    transport = BackpressureTransport()
    assert isinstance(transport.transport, httpx.HTTPTransport)
    transport.close()


# --- async ---------------------------------------------------------------------------------------


def async_client(server: Server, slept: list[float], **options: object) -> httpx.AsyncClient:
    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    return AsyncBackpressureAwareClient(
        transport=httpx.MockTransport(server.async_handler),
        policy=policy(**options),
        sleep=sleep,
    )


async def test_async_client_honours_retry_after() -> None:
    server, slept = Server(shed("2"), shed(None), OK), []
    async with async_client(server, slept, random=lambda: 1.0) as c:
        response = await c.get("http://test/")
    assert response.status_code == 200
    assert slept == pytest.approx([2.1, 0.2])


async def test_async_client_raises_when_exhausted() -> None:
    server, slept = Server(shed("1")), []
    async with async_client(server, slept, max_retries=1) as c:
        with pytest.raises(MaxRetriesExceeded) as info:
            await c.get("http://test/")
    assert info.value.response.content == b'{"error":"overloaded"}'
    assert len(server.requests) == 2


async def test_async_streaming_body_is_never_sent_twice() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"once"

    server, slept = Server(shed("1"), OK), []
    async with async_client(server, slept) as c:
        response = await c.put("http://test/", content=body())
    assert response.status_code == 503
    assert server.bodies == [b"once"]


async def test_async_connection_errors_are_retried() -> None:
    server, slept = Server(httpx.ConnectError("refused"), OK), []
    async with async_client(server, slept) as c:
        assert (await c.get("http://test/")).status_code == 200
    assert len(slept) == 1


async def test_async_transport_default_sleep_is_anyio() -> None:
    # A zero Retry-After and zero jitter: the real default sleep runs, for no time at all.
    server = Server(shed("0"), OK)
    transport = AsyncBackpressureTransport(
        httpx.MockTransport(server.async_handler), policy=policy(random=lambda: 0.0)
    )
    async with httpx.AsyncClient(transport=transport) as c:
        assert (await c.get("http://test/")).status_code == 200
    assert len(server.requests) == 2


# --- imports -------------------------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    src = str(Path(shedder.__file__).parent.parent)  # this worktree's code, not an install
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": src},
    )


def test_import_shedder_does_not_import_httpx() -> None:
    result = run_python("import shedder, sys; print('httpx' in sys.modules)")
    assert result.stdout.strip() == "False", result.stderr


def test_missing_httpx_names_the_extra() -> None:
    result = run_python(
        "import sys; sys.modules['httpx'] = None\n"
        "try:\n    import shedder.client\n"
        "except ImportError as exc:\n    print(exc, exc.__suppress_context__)"
    )
    assert 'pip install "loadshedder[client]"' in result.stdout, result.stderr
    assert result.stdout.strip().endswith("True")  # raised `from None`


async def test_cancelling_during_the_wait_stops_at_once() -> None:
    server = Server(shed("30"), OK)
    transport = AsyncBackpressureTransport(
        httpx.MockTransport(server.async_handler), policy=policy(total_timeout=None)
    )
    async with httpx.AsyncClient(transport=transport) as c:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(c.get("http://test/"), timeout=0.2)
    assert len(server.requests) == 1  # cancelled in its 30 s wait, never sent again


# --- total_timeout and deadlines ---------------------------------------------------------------


class FakeTime:
    """A monotonic clock moved only by the client's sleeps."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def timed_client(server: Server, clock: FakeTime, **options: object) -> BackpressureAwareClient:
    return BackpressureAwareClient(
        transport=httpx.MockTransport(server.handler),
        policy=policy(monotonic=clock.monotonic, **options),
        sleep=clock.sleep,
    )


def test_default_policy_bounds_every_call() -> None:
    assert RetryPolicy().total_timeout == 10.0
    server, clock = Server(shed("10")), FakeTime()
    with pytest.raises(GaveUp) as info:
        timed_client(server, clock, total_timeout=RetryPolicy().total_timeout).get("http://t/")
    assert info.value.reason == "deadline"
    assert clock.slept == []
    assert len(server.requests) == 1


def test_waits_stop_before_they_would_pass_the_deadline() -> None:
    server, clock = Server(shed("3")), FakeTime()
    with pytest.raises(GaveUp, match="no time left before the call's deadline") as info:
        timed_client(server, clock, total_timeout=10, max_retries=10).get("http://t/")
    assert clock.slept == pytest.approx([3.05, 3.05, 3.05])  # a fourth would end at 12.2 s
    assert info.value.attempts == 4
    assert info.value.response.headers["retry-after"] == "3"


def test_backoff_waits_are_bounded_by_the_deadline_too() -> None:
    server, clock = Server(httpx.ConnectError("refused")), FakeTime()
    with pytest.raises(httpx.ConnectError):
        timed_client(
            server, clock, total_timeout=1, max_retries=50, random=lambda: 0.99, base_delay=0.1
        ).get("http://t/")
    assert sum(clock.slept) < 1
    assert len(server.requests) == len(clock.slept) + 1


def test_each_attempt_timeout_is_capped_at_the_time_left() -> None:
    server, clock = Server(shed("1"), OK), FakeTime()
    client = timed_client(server, clock, total_timeout=2)
    client.get("http://t/", timeout=httpx.Timeout(5, connect=0.5))
    first, second = server.timeouts
    assert first == {"connect": 0.5, "read": 2, "write": 2, "pool": 2}
    assert second["read"] == pytest.approx(2 - 1.05)
    assert second["connect"] == 0.5


def test_without_total_timeout_the_call_has_no_deadline_of_its_own() -> None:
    server, clock = Server(shed("50"), OK), FakeTime()
    response = timed_client(server, clock, total_timeout=None, max_retry_after=60).get("http://t/")
    assert response.status_code == 200
    assert clock.slept == pytest.approx([50.05])
    assert server.timeouts[0]["read"] == 5.0  # httpx's own, untouched


@pytest.mark.parametrize(
    ("header", "fmt", "values"),
    [
        ("x-deadline", None, ["2", "0.95"]),
        ("grpc-timeout", None, ["2000m", "950m"]),
        ("x-envoy-expected-rq-timeout-ms", None, ["2000", "950"]),
        ("X-Budget", "grpc-timeout", ["2000m", "950m"]),
    ],
)
def test_the_time_left_is_sent_downstream_on_each_attempt(
    header: str, fmt: str | None, values: list[str]
) -> None:
    server, clock = Server(shed("1"), OK), FakeTime()
    timed_client(server, clock, total_timeout=2, deadline_header=header, deadline_format=fmt).get(
        "http://t/"
    )
    assert [headers[header.lower()] for headers in server.headers] == values


def test_no_deadline_header_by_default() -> None:
    server, clock = Server(OK), FakeTime()
    timed_client(server, clock).get("http://t/")
    assert not {"grpc-timeout", "x-deadline"} & set(server.headers[0])


def test_the_deadline_of_the_request_being_served_is_inherited() -> None:
    server, clock = Server(shed("1"), OK), FakeTime()
    client = timed_client(server, clock, deadline_header="x-deadline")
    assert current_deadline() is None
    with deadline_scope(clock.now + 1.5) as deadline:
        assert current_deadline() == deadline == clock.now + 1.5
        client.get("http://t/")
    assert current_deadline() is None
    assert [headers["x-deadline"] for headers in server.headers] == ["1.5", "0.45"]


def test_a_short_inherited_deadline_ends_the_call_at_once() -> None:
    server, clock = Server(shed("1")), FakeTime()
    with deadline_scope(clock.now + 0.5), pytest.raises(GaveUp) as info:
        timed_client(server, clock).get("http://t/")
    assert info.value.reason == "deadline"
    assert clock.slept == []


def test_inherit_deadline_false_ignores_the_scope() -> None:
    server, clock = Server(shed("1"), OK), FakeTime()
    with deadline_scope(clock.now + 0.5):
        response = timed_client(server, clock, inherit_deadline=False).get("http://t/")
    assert response.status_code == 200


def test_an_expired_deadline_sends_nothing() -> None:
    server, clock = Server(OK), FakeTime()
    with deadline_scope(clock.now - 1), pytest.raises(DeadlineExceeded, match="not sent") as info:
        timed_client(server, clock, raise_on_exhausted=False).get("http://t/")
    assert isinstance(info.value, httpx.TimeoutException)
    assert server.requests == []


def test_deadline_scopes_nest_and_never_extend() -> None:
    with deadline_scope(100.0):
        with deadline_scope(200.0) as inner:
            assert inner == 100.0
        with deadline_scope(50) as inner:
            assert inner == 50.0
        with deadline_scope(None) as inner:
            assert inner == 100.0
        assert current_deadline() == 100.0
    assert current_deadline() is None


@pytest.mark.parametrize(
    ("deadline", "error"), [("soon", TypeError), (True, TypeError), (float("nan"), ValueError)]
)
def test_deadline_scope_rejects_bad_deadlines(deadline: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="deadline must be a number"), deadline_scope(deadline):  # type: ignore[arg-type]
        pass


async def test_async_inherits_the_deadline_across_tasks_and_shares_it() -> None:
    clock = FakeTime()
    servers = [Server(shed("1"), OK) for _ in range(2)]

    async def call(server: Server) -> int:
        async def sleep(seconds: float) -> None:
            clock.sleep(seconds)

        async with AsyncBackpressureAwareClient(
            transport=httpx.MockTransport(server.async_handler),
            policy=policy(monotonic=clock.monotonic, deadline_header="grpc-timeout"),
            sleep=sleep,
        ) as c:
            return (await c.get("http://t/")).status_code

    with deadline_scope(clock.now + 3):
        # Each task copies the context: both calls end by the same deadline.
        assert await asyncio.gather(call(servers[0]), call(servers[1])) == [200, 200]
    assert servers[0].headers[0]["grpc-timeout"] == "3000m"
    assert float(servers[1].headers[1]["grpc-timeout"][:-1]) < 3000 - 1000


async def test_two_hops_pass_the_budget_along() -> None:
    """Service A reads its budget from a header, calls B inside that deadline; B sees less."""
    seen: dict[str, float] = {}

    async def service_b(scope: dict[str, object], receive: object, send: object) -> None:
        headers = dict(scope["headers"])  # type: ignore[call-overload]
        seen["b"] = float(headers[b"x-deadline"])
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"b"})  # type: ignore[operator]

    b_client = AsyncBackpressureAwareClient(
        transport=httpx.ASGITransport(app=service_b),  # type: ignore[arg-type]
        policy=RetryPolicy(deadline_header="x-deadline"),
    )

    async def service_a(scope: dict[str, object], receive: object, send: object) -> None:
        headers = dict(scope["headers"])  # type: ignore[call-overload]
        arrived, seen["a"] = time.monotonic(), float(headers[b"x-deadline"])
        await asyncio.sleep(0.05)  # work before the downstream call spends budget
        with deadline_scope(arrived + seen["a"]):
            await b_client.get("http://b/")
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"a"})  # type: ignore[operator]

    async with AsyncBackpressureAwareClient(
        transport=httpx.ASGITransport(app=service_a),  # type: ignore[arg-type]
        policy=RetryPolicy(total_timeout=0.5, deadline_header="x-deadline"),
    ) as a_client:
        assert (await a_client.get("http://a/")).text == "a"
    await b_client.aclose()
    assert 0.4 < seen["a"] <= 0.5
    assert 0 < seen["b"] <= seen["a"] - 0.05  # B's default 10 s did not stretch A's budget


# --- redirects: one logical call ----------------------------------------------------------------


def redirect(to: str) -> httpx.Response:
    return httpx.Response(307, headers={"Location": to})


def test_redirect_hops_share_the_call_retries_and_deadline() -> None:
    server = Server(
        shed("1"), redirect("http://t/2"), shed("1"), redirect("http://t/3"), shed("1"), shed("1")
    )
    clock = FakeTime()
    client = BackpressureAwareClient(
        transport=httpx.MockTransport(server.handler),
        policy=policy(monotonic=clock.monotonic, max_retries=3),
        sleep=clock.sleep,
        follow_redirects=True,
    )
    with pytest.raises(GaveUp) as info:
        client.get("http://t/1")
    assert info.value.reason == "retries"
    assert len(clock.slept) == 3  # not 3 per hop
    assert [r.url.path for r in server.requests] == ["/1", "/1", "/2", "/2", "/3", "/3"]


def test_a_bare_transport_bounds_each_hop() -> None:
    server = Server(shed("1"), redirect("http://t/2"), shed("1"), OK)
    clock = FakeTime()
    transport = BackpressureTransport(
        httpx.MockTransport(server.handler),
        policy=policy(monotonic=clock.monotonic, max_retries=1),
        sleep=clock.sleep,
    )
    with httpx.Client(transport=transport, follow_redirects=True) as c:
        assert c.get("http://t/1").status_code == 200  # each hop had its own one retry
    assert len(clock.slept) == 2


# --- shedder's refusals: any method may be retried ----------------------------------------------


def refused(retry_after: str = "1", value: str = "1") -> httpx.Response:
    return httpx.Response(
        503, headers={"Retry-After": retry_after, REFUSED_HEADER: value}, content=b"{}"
    )


def test_refused_header_is_shedders() -> None:
    assert REFUSED_HEADER == "x-shedder-refused"


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_a_refusal_shedder_vouches_for_is_retried_for_any_method(method: str) -> None:
    server, slept = Server(refused(), OK), []
    response = client(server, slept).request(method, "http://t/", content=b"order")
    assert response.status_code == 200
    assert server.bodies == [b"order", b"order"]


def test_without_the_header_post_is_handed_back() -> None:
    server, slept = Server(refused(value="0"), OK), []
    assert client(server, slept).post("http://t/", content=b"x").status_code == 503
    assert len(server.requests) == 1


def test_retry_unprocessed_false_ignores_the_header() -> None:
    server, slept = Server(refused(), OK), []
    c = client(server, slept, retry_unprocessed=False)
    assert c.post("http://t/", content=b"x").status_code == 503
    assert len(server.requests) == 1


def test_a_vouched_refusal_still_never_resends_a_stream() -> None:
    def body() -> Iterator[bytes]:
        yield b"once"

    server, slept = Server(refused(), OK), []
    assert client(server, slept).post("http://t/", content=body()).status_code == 503
    assert server.bodies == [b"once"]


def test_connection_errors_still_are_not_retried_for_post() -> None:
    server, slept = Server(httpx.ConnectError("refused"), OK), []
    with pytest.raises(httpx.ConnectError):
        client(server, slept).post("http://t/", content=b"x")


# --- one outcome model ---------------------------------------------------------------------------


def give_up_by(reason: str) -> dict[str, object]:
    return {
        "retries": {"max_retries": 0},
        "budget": {"budget": RetryBudget(ratio=0.0, min_retries_per_second=0.0)},
        "deadline": {"total_timeout": 0.5},
        "throttled": {"throttle": AdaptiveThrottle(random=lambda: 0.0)},
    }[reason]


@pytest.mark.parametrize("reason", ["retries", "budget", "deadline", "throttled"])
def test_every_give_up_raises_the_same_way(reason: str) -> None:
    server, clock = Server(shed("1")), FakeTime()
    with pytest.raises(GaveUp) as info:
        timed_client(server, clock, **give_up_by(reason)).get("http://t/")
    assert info.value.reason == reason
    assert info.value.attempts == 1
    assert info.value.response.content == b'{"error":"overloaded"}'
    assert isinstance(info.value, MaxRetriesExceeded)  # the former name still catches it


@pytest.mark.parametrize("reason", ["retries", "budget", "deadline", "throttled"])
def test_every_give_up_returns_the_same_way(reason: str) -> None:
    server, clock = Server(shed("1")), FakeTime()
    options = {**give_up_by(reason), "raise_on_exhausted": False}
    response = timed_client(server, clock, **options).get("http://t/")
    assert response.status_code == 503
    assert response.content == b'{"error":"overloaded"}'
    assert clock.slept == []


async def test_async_gives_up_on_the_deadline() -> None:
    server = Server(shed("5"))
    async with async_client(server, [], total_timeout=1) as c:
        with pytest.raises(GaveUp) as info:
            await c.get("http://t/")
    assert info.value.reason == "deadline"


# --- docs/client.md ------------------------------------------------------------------------------


def docs_examples() -> list[str]:
    """The ```python blocks of docs/client.md that are not marked ``% fragment``."""
    text = (Path(__file__).parents[2] / "docs" / "client.md").read_text()
    blocks = re.findall(r"(?:^|\n)(% fragment\n)?```python\n(.*?)\n```", text, re.S)
    return [code for fragment, code in blocks if not fragment]


def test_docs_examples_run(capsys: pytest.CaptureFixture[str]) -> None:
    examples = docs_examples()
    assert len(examples) == 3
    for code in examples:
        exec(compile(code, "docs/client.md", "exec"), {})
    hi, sent, gave_up = capsys.readouterr().out.splitlines()
    assert hi == "hi"
    assert re.fullmatch(r"\['2[0-4][0-9]m'\]", sent)
    assert gave_up == "deadline 503"
