"""The instance table: worker processes publish, any one of them sums the live ones."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from shedder import Throttler
from shedder._web.instance import InstanceTable


def worker(directory: str, holds: int, ready: object, done: object) -> None:
    throttler = Throttler(max_concurrency=4, max_queue=2, name="api")
    InstanceTable(directory).publish(throttler)
    permits = [throttler.acquire() for _ in range(holds)]
    ready.set()  # type: ignore[attr-defined]
    done.wait(30)  # type: ignore[attr-defined]
    for permit in permits:
        permit.release()


def test_the_answering_worker_sums_live_workers_and_drops_dead_ones(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    # One "done" event per worker: a process killed while waiting on a shared one would leave
    # that event unable to wake the others.
    dones = []
    processes = []
    for holds in (1, 3):
        ready, done = context.Event(), context.Event()
        dones.append(done)
        process = context.Process(target=worker, args=(str(tmp_path), holds, ready, done))
        process.start()
        assert ready.wait(30)
        processes.append(process)
    try:
        local = Throttler(max_concurrency=4, max_queue=2, name="api")
        table = InstanceTable(tmp_path)
        table.publish(local)
        with local:
            stats = table.stats(local)
            assert stats.in_flight == 1 + 3 + 1
            assert stats.max_concurrency == 12
            assert stats.max_queue == 6
            assert stats.admitted_total == 5
            assert stats.load == pytest.approx(5 / 18)
        # A worker killed outright leaves its file behind; it no longer counts.
        os.kill(processes[1].pid, signal.SIGKILL)  # type: ignore[arg-type]
        processes[1].join(10)
        stats = table.stats(local)
        assert stats.in_flight == 1
        assert stats.max_concurrency == 8
        assert len(list(tmp_path.glob("api.*.shedder"))) == 2
    finally:
        dones[0].set()
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()


def test_without_published_records_the_local_figures_answer(tmp_path: Path) -> None:
    local = Throttler(max_concurrency=3, name="solo")
    assert InstanceTable(tmp_path).stats(local) == local.stats()


def test_throttlers_of_other_names_are_kept_apart(tmp_path: Path) -> None:
    table = InstanceTable(tmp_path)
    a, b = Throttler(2, name="a"), Throttler(5, name="b")
    table.publish(a)
    table.publish(b)
    with b:
        assert table.stats(a).in_flight == 0
        assert table.stats(b).in_flight == 1
        assert table.stats(b).max_concurrency == 5


def test_bad_directory_and_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="existing directory"):
        InstanceTable(tmp_path / "missing")
    with pytest.raises(ValueError, match="file name"):
        InstanceTable(tmp_path).publish(Throttler(1, name="a/b"))
