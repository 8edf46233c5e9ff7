"""shedder.client end to end: a real uvicorn server sheds, the client waits as told.

The server records when each request arrived and when its 503 said the client might come
back; the tests check that the client got its answer and never came back sooner.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shedder.client import (
    AsyncBackpressureAwareClient,
    BackpressureAwareClient,
    MaxRetriesExceeded,
    RetryBudget,
    RetryPolicy,
)

from .client_server import serve

pytestmark = pytest.mark.server

# Sleeps are timed on the monotonic clock, arrivals stamped with the wall clock: allow for a
# clock slewed by NTP in between (a client that came back early would be early by ~1 s).
SLEW = 0.005


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve("client_server:create_shedding_app", factory=True) as url:
        yield url


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
