"""Type-checked, never run: the public API of shedder.client as users write it.

Check with ``MYPYPATH=src mypy --strict tests/typing``.
"""

from __future__ import annotations

import httpx

from shedder.client import (
    AdaptiveThrottle,
    AsyncBackpressureAwareClient,
    AsyncBackpressureTransport,
    BackpressureAwareClient,
    BackpressureTransport,
    ClientThrottled,
    MaxRetriesExceeded,
    RetryBudget,
    RetryEvent,
    RetryPolicy,
    parse_retry_after,
)


def on_retry(event: RetryEvent) -> None:
    print(event.attempt, event.delay, event.reason, event.status, event.retry_after)


budget = RetryBudget(ratio=0.1, min_retries_per_second=5, window=10)
policy = RetryPolicy(
    max_retries=2,
    base_delay=0.1,
    max_delay=5.0,
    retry_statuses={503},
    retry_methods={"GET", "POST"},
    budget=budget,
    throttle=AdaptiveThrottle(k=1.5),
    on_retry=on_retry,
)
client = BackpressureAwareClient(policy=policy, base_url="http://127.0.0.1:8000", timeout=5)
async_client = AsyncBackpressureAwareClient(policy=policy, sleep=lambda s: _nap(s))
transport: httpx.BaseTransport = BackpressureTransport(httpx.HTTPTransport(), policy=policy)
async_transport: httpx.AsyncBaseTransport = AsyncBackpressureTransport(policy=policy)
delay: float | None = parse_retry_after("120", now=0.0, cap=60.0)


async def _nap(seconds: float) -> None: ...


def fetch() -> bytes | None:
    try:
        return client.get("/").content
    except MaxRetriesExceeded as exc:
        status: int = exc.response.status_code
        attempts: int = exc.attempts
        print(status, attempts)
    except ClientThrottled as exc:
        probability: float = exc.probability
        print(probability)
    return None
