"""shedder.client transports and clients against in-process mock servers (no real sleeping)."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

import shedder
from shedder.client import (
    AdaptiveThrottle,
    AsyncBackpressureAwareClient,
    AsyncBackpressureTransport,
    BackpressureAwareClient,
    BackpressureTransport,
    ClientThrottled,
    GaveUp,
    MaxRetriesExceeded,
    RetryBudget,
    RetryEvent,
    RetryPolicy,
)

NOW = 1_700_000_000.0
Reply = httpx.Response | Exception


class Server:
    """A scripted server: answers with ``replies`` in order (the last one repeats)."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []

    def reply(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
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
