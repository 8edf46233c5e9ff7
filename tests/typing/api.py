"""Type-checked by `mypy --strict` (see .ci/run), never run by pytest: keeps the public API's
types honest for users."""

from __future__ import annotations

from typing_extensions import assert_type

import shedder
from shedder import Overloaded, Permit, Throttler, ThrottlerStats


def sync_use(throttler: Throttler) -> int:
    with throttler as permit:
        assert_type(permit, Permit)
    permit2 = throttler.acquire(timeout=0.5)
    assert_type(permit2.release(), bool)
    stats = throttler.stats()
    assert_type(stats, ThrottlerStats)
    assert_type(stats.load, float)
    assert_type(stats.overloaded, bool)
    return stats.shed_total["queue_full"]


async def async_use(throttler: Throttler) -> float:
    async with throttler as permit:
        assert_type(permit, Permit)
    permit2 = await throttler.acquire_async()
    permit2.release()
    return permit2.waited


def refusal(exc: Overloaded) -> tuple[str, int]:
    return exc.reason, exc.retry_after


throttler = Throttler(max_concurrency=4, max_queue=8, queue_timeout=0.5, retry_after="auto")
all_throttlers: list[Throttler] = shedder.throttlers()
