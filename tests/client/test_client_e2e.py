"""shedder.client end to end: a real uvicorn server sheds, the client waits as told.

The server records when each request arrived and when its 503 said the client might come
back; the tests check that the client got its answer and never came back sooner.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shedder.client import (
    AsyncBackpressureAwareClient,
    BackpressureAwareClient,
    GaveUp,
    MaxRetriesExceeded,
    RetryBudget,
    RetryPolicy,
)
from tests.support.servers import python_server, server_process

pytestmark = pytest.mark.server

# Sleeps are timed on the monotonic clock, arrivals stamped with the wall clock: allow for a
# clock slewed by NTP in between (a client that came back early would be early by ~1 s).
SLEW = 0.005


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = "tests.support.client_server:create_shedding_app"
    # Module-scoped: the shared function the ``server`` fixture uses, not the fixture.
    with server_process(python_server("uvicorn", app, "--no-access-log", "--factory")) as process:
        yield process.url


def policy() -> RetryPolicy:
    return RetryPolicy(max_retries=5, base_delay=0.05, budget=RetryBudget())


def arrivals(base_url: str, key: str) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = httpx.get(f"{base_url}/arrivals/{key}").json()
    return log


def assert_never_early(log: list[dict[str, Any]]) -> None:
    for previous, current in itertools.pairwise(log):
        assert previous["not_before"] is not None, "retried after a success"
        assert current["at"] >= previous["not_before"] - SLEW, log


def test_sync_client_waits_out_retry_after_and_gets_its_answer(base_url: str) -> None:
    key = uuid.uuid4().hex
    with BackpressureAwareClient(policy=policy(), timeout=10) as client:
        response = client.get(f"{base_url}/shed/{key}", params={"first": 2, "retry_after": 1})
    assert response.json() == {"answer": 42}
    log = arrivals(base_url, key)
    assert [entry["status"] for entry in log] == [503, 503, 200]
    assert_never_early(log)


async def test_async_client_honours_an_http_date(base_url: str) -> None:
    key = uuid.uuid4().hex
    async with AsyncBackpressureAwareClient(policy=policy(), timeout=10) as client:
        response = await client.get(
            f"{base_url}/shed/{key}", params={"first": 1, "retry_after": "date:2"}
        )
    assert response.json() == {"answer": 42}
    log = arrivals(base_url, key)
    assert [entry["status"] for entry in log] == [503, 200]
    assert_never_early(log)


def test_client_waits_while_a_throttler_refuses(base_url: str) -> None:
    key = uuid.uuid4().hex
    admitted, finished = threading.Event(), threading.Event()

    def hold_the_only_slot() -> None:
        with httpx.stream("GET", f"{base_url}/hold", params={"seconds": 1.5}, timeout=10) as r:
            for _ in r.iter_lines():
                admitted.set()
        finished.set()

    holder = threading.Thread(target=hold_the_only_slot)
    holder.start()
    try:
        assert admitted.wait(10), "the slow request was never admitted"
        with BackpressureAwareClient(policy=policy(), timeout=10) as client:
            response = client.get(f"{base_url}/work/{key}")
    finally:
        holder.join(15)
    assert finished.is_set()
    assert response.json() == {"answer": 42}
    log = arrivals(base_url, key)
    # Held 1.5 s, Retry-After 1: refused at ~0 s and at ~1 s, admitted at ~2 s.
    assert [entry["status"] for entry in log] == [503, 503, 200]
    assert_never_early(log)


def test_exhausted_client_raises_against_a_real_server(base_url: str) -> None:
    key = uuid.uuid4().hex
    with (
        BackpressureAwareClient(policy=RetryPolicy(max_retries=1, base_delay=0.01)) as client,
        pytest.raises(MaxRetriesExceeded, match="still 503 after 2 attempts") as info,
    ):
        client.get(f"{base_url}/shed/{key}", params={"first": 5, "retry_after": 0})
    assert info.value.response.json() == {"error": "overloaded"}
    assert len(arrivals(base_url, key)) == 2


# --- bounded calls (issue 16, issue 19 item 5) --------------------------------------------------


class FakeTime:
    """A monotonic clock that only the client's sleeps move: real server, no real waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_retry_after_beyond_the_deadline_ends_the_call_at_once(base_url: str) -> None:
    # Was: BackpressureAwareClient(timeout=2) against Retry-After: 10 blocked for 30.2 s.
    key = uuid.uuid4().hex
    started = time.monotonic()
    with (
        BackpressureAwareClient(timeout=2) as client,
        pytest.raises(GaveUp, match=r"still 503 after 1 attempt \(no time left") as info,
    ):
        client.get(f"{base_url}/shed/{key}", params={"first": 100, "retry_after": 10})
    assert time.monotonic() - started < 1.0
    assert info.value.reason == "deadline"
    assert info.value.response.json() == {"error": "overloaded"}
    assert len(arrivals(base_url, key)) == 1


@pytest.mark.parametrize("retry_after", [1, 60])
def test_redirect_hops_that_each_shed_share_one_bounded_budget(
    base_url: str, retry_after: int
) -> None:
    # Was: 63 sleeps, 3,788 s in one get() through hops answering 503 + Retry-After: 60.
    key, clock = uuid.uuid4().hex, FakeTime()
    policy = RetryPolicy(total_timeout=10, monotonic=clock.monotonic, budget=None)
    with (
        BackpressureAwareClient(policy=policy, sleep=clock.sleep, follow_redirects=True) as client,
        pytest.raises(GaveUp) as info,
    ):
        client.get(f"{base_url}/hop/{key}/0", params={"retry_after": retry_after})
    assert len(clock.slept) <= policy.max_retries
    assert sum(clock.slept) < 10
    assert info.value.reason == ("retries" if retry_after == 1 else "deadline")
    hops = [entry["hop"] for entry in arrivals(base_url, key)]
    assert hops == ([0, 0, 1, 1, 2, 2, 3] if retry_after == 1 else [0])


def test_a_503_307_self_loop_is_bounded(base_url: str) -> None:
    # Was: 1,263 s of sleeping in one get().
    key, clock = uuid.uuid4().hex, FakeTime()
    policy = RetryPolicy(max_retries=100, total_timeout=5, monotonic=clock.monotonic, budget=None)
    with (
        BackpressureAwareClient(policy=policy, sleep=clock.sleep, follow_redirects=True) as client,
        pytest.raises(GaveUp) as info,
    ):
        client.get(f"{base_url}/loop/{key}", params={"retry_after": 1})
    assert info.value.reason == "deadline"
    assert sum(clock.slept) < 5
    assert len(clock.slept) == 4  # 1 s plus jitter each: the fifth wait would pass 5 s
    assert [entry["status"] for entry in arrivals(base_url, key)] == [503, 307] * 4 + [503]
    assert info.value.attempts == 9  # every send of the call, the redirected ones included


def test_the_budget_flows_through_a_chain_of_two_real_services(base_url: str) -> None:
    policy = RetryPolicy(total_timeout=5, deadline_header="x-deadline")
    with BackpressureAwareClient(policy=policy) as client:
        answer = client.get(f"{base_url}/relay", params={"to": f"{base_url}/deadline"}).json()
    first, second = float(answer["received"]), float(answer["downstream"]["received"])
    assert 4 < first <= 5
    assert 0 < second < first  # the relay passed on what it had left, no more
