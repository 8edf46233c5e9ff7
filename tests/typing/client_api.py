"""Type-checked, never run: the public API of shedder.client as users write it.

Check with ``MYPYPATH=src mypy --strict tests/typing``.
"""

from __future__ import annotations

import httpx

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
    GiveUpReason,
    MaxRetriesExceeded,
    RetryBudget,
    RetryEvent,
    RetryPolicy,
    current_deadline,
    deadline_scope,
    format_timeout,
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
    total_timeout=2.5,
    inherit_deadline=True,
    deadline_header="grpc-timeout",
    deadline_format="grpc-timeout",
    retry_unprocessed=False,
    raise_on_exhausted=True,
)
unbounded = RetryPolicy(total_timeout=None)
header: str = REFUSED_HEADER
budget_text: str = format_timeout(1.5, "milliseconds")
deadline: float | None = current_deadline()
client = BackpressureAwareClient(policy=policy, base_url="http://127.0.0.1:8000", timeout=5)
async_client = AsyncBackpressureAwareClient(policy=policy, sleep=lambda s: _nap(s))
transport: httpx.BaseTransport = BackpressureTransport(httpx.HTTPTransport(), policy=policy)
async_transport: httpx.AsyncBaseTransport = AsyncBackpressureTransport(policy=policy)
delay: float | None = parse_retry_after("120", now=0.0, cap=60.0)


async def _nap(seconds: float) -> None: ...


def fetch() -> bytes | None:
    try:
        return client.get("/").content
    except GaveUp as exc:
        status: int = exc.response.status_code
        attempts: int = exc.attempts
        reason: GiveUpReason = exc.reason
        print(status, attempts, reason)
    except DeadlineExceeded as exc:
        print(exc.request.url)
    except ClientThrottled as exc:
        probability: float = exc.probability
        print(probability)
    return None


def fetch_within(deadline_at: float) -> int:
    with deadline_scope(deadline_at) as in_force:
        assert in_force is None or in_force <= deadline_at
        try:
            return client.get("/").status_code
        except MaxRetriesExceeded as exc:  # the former name of GaveUp
            return exc.response.status_code
