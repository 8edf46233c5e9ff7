"""A waiter granted a slot only after its wait ended is refused, and the slot passes on.

That happens when nobody waits on the ``Waiting`` yet: gunicorn's worker admits a request on
its main loop and a pool thread takes it up later.
"""

from __future__ import annotations

import time

import pytest

from shedder import Overloaded, Permit, Throttler, Waiting


def test_a_grant_taken_up_after_the_wait_ended_is_refused_and_passed_on() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=2, queue_timeout=0.05)
    holder = throttler.acquire()
    late = throttler.admit()
    behind = throttler.admit(timeout=5)
    assert isinstance(late, Waiting)
    assert isinstance(behind, Waiting)
    time.sleep(0.08)  # nobody waits on `late` yet: its 50 ms pass
    holder.release()  # the slot goes to `late`, too late
    with pytest.raises(Overloaded) as refused:
        late.wait()
    assert refused.value.reason == "queue_timeout"
    permit = behind.wait()  # the slot passed on: the next waiter runs
    assert isinstance(permit, Permit)
    permit.release()
    stats = throttler.stats()
    assert (stats.in_flight, stats.queued) == (0, 0)
    assert stats.admitted_total == 2  # the holder and `behind`, not `late`
    assert stats.shed_total["queue_timeout"] == 1


def test_a_late_grant_with_a_deadline_is_refused_as_deadline_exceeded() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1, queue_timeout=5)
    holder = throttler.acquire()
    late = throttler.admit(deadline=time.monotonic() + 0.05)
    assert isinstance(late, Waiting)
    time.sleep(0.08)
    holder.release()
    with pytest.raises(Overloaded) as refused:
        late.wait()
    assert refused.value.reason == "deadline_exceeded"
    assert throttler.stats().in_flight == 0


def test_a_grant_taken_up_in_time_is_admitted() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=1, queue_timeout=5)
    holder = throttler.acquire()
    waiting = throttler.admit()
    assert isinstance(waiting, Waiting)
    holder.release()
    permit = waiting.wait()
    assert permit.waited >= 0
    permit.release()
    assert throttler.stats().in_flight == 0
