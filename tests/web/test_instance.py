"""The instance table: worker processes publish, any one of them sums the live ones."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import stat
from pathlib import Path
from typing import Any

import pytest

from shedder import SHED_REASONS, Overloaded, Throttler
from shedder._web.instance import _MAGIC, _RECORD, _VERSION, InstanceTable, _process_start, _read


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


def test_bad_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="existing directory"):
        InstanceTable(tmp_path / "missing")
    (tmp_path / "file").touch()
    with pytest.raises(ValueError, match="existing directory"):
        InstanceTable(tmp_path / "file")


# -- issue 19: names, untrusted records, private files ---------------------------------------


def plant(directory: Path, file_name: str, pid: int, **figures: Any) -> Path:
    """Write a well-formed record that no live worker published (defaults: an idle worker)."""
    values: dict[str, Any] = {
        "start": 0,
        "in_flight": 0,
        "queued": 0,
        "max_concurrency": 4,
        "max_queue": 0,
        "shed_threshold": 1.0,
        "admitted": 0,
        "cancelled": 0,
        "last_shed": 0.0,
    }
    values.update(figures)
    path = directory / file_name
    shed = [0] * len(SHED_REASONS)
    path.write_bytes(_RECORD.pack(2, _MAGIC, _VERSION, pid, *values.values(), *shed))
    return path


@pytest.mark.parametrize(
    "names",
    [
        ("api/v1", "api"),  # "/" used to fail on every request
        ("api", "api.v2"),  # a glob "api.*" summed both
        ("[x]", "x"),  # a glob "[x].*" read throttler "x"
        ("..", ".", "a b", "\u00fc", "~", "%41", "A"),  # no encoding collides ("%41" vs "A")
        ("n" * 300, "n" * 301),  # longer than a file name may be
    ],
)
def test_any_name_works_and_names_match_exactly(tmp_path: Path, names: tuple[str, ...]) -> None:
    table = InstanceTable(tmp_path)
    throttlers = [Throttler(2 + i, name=name) for i, name in enumerate(names)]
    for throttler in throttlers:
        table.publish(throttler)
    permits = [throttlers[0].acquire()]  # only the first throttler is busy
    for i, throttler in enumerate(throttlers):
        report = table.report(throttler)
        assert report.workers == 1, throttler.name
        assert report.stats.max_concurrency == 2 + i, throttler.name
        assert report.stats.in_flight == (1 if i == 0 else 0), throttler.name
    for permit in permits:
        permit.release()


def test_throttlers_that_share_a_name_each_get_a_record(tmp_path: Path) -> None:
    table = InstanceTable(tmp_path)
    first, second = Throttler(2, name="default"), Throttler(5, name="default")
    table.publish(first)
    table.publish(second)  # used to raise ValueError
    table.publish_all([first, second])
    assert len(list(tmp_path.iterdir())) == 2
    with second:
        assert table.report(first).stats.in_flight == 0
        assert table.report(first).stats.max_concurrency == 2
        assert table.report(second).stats.in_flight == 1
        assert table.report(second).stats.max_concurrency == 5


def test_records_that_cannot_be_trusted_expire_or_are_skipped(tmp_path: Path) -> None:
    local = Throttler(max_concurrency=4, name="api")
    table = InstanceTable(tmp_path)
    table.publish(local)
    me, parent = os.getpid(), os.getppid()
    parent_start = _process_start(parent)
    assert parent_start  # this suite runs on Linux, with /proc
    expiring = [
        plant(tmp_path, "api.1099511627776.shedder", 2**40),  # overflows a C int (used: 500)
        plant(tmp_path, "api.5.shedder", 0),  # pid 0 (used: never expired)
        plant(tmp_path, "api.6.shedder", -1),  # pid -1
        plant(tmp_path, "api.7.shedder", 7, in_flight=3),  # name and record disagree
        plant(tmp_path, "api.1.shedder", 1, in_flight=3),  # pid 1 lives, but wrote nothing
        # A live, unrelated process: the pid is right, the start time is not (pid reuse).
        plant(tmp_path, f"api.{parent}.shedder", parent, start=parent_start + 1),
    ]
    garbage = tmp_path / "api.8.shedder"
    garbage.write_bytes(b"\xff" * _RECORD.size)
    short = tmp_path / "api.9.shedder"
    short.write_bytes(b"\x02" + b"\0" * 20)
    os.mkfifo(tmp_path / "api.10.shedder")  # must not block the reader
    (tmp_path / "api.11.shedder").symlink_to(f"api.{me}.shedder")
    with local:
        report = table.report(local)
    assert (report.workers, report.stats.in_flight, report.stats.max_concurrency) == (1, 1, 4)
    assert report.shedding_workers == 0
    for path in expiring:
        assert not path.exists(), f"{path.name} did not expire"
    assert garbage.exists()
    assert short.exists()


def test_skipped_records_of_this_process_do_not_count(tmp_path: Path) -> None:
    """A record of a live process (this one) with impossible figures is not summed."""
    local = Throttler(max_concurrency=4, name="neg")
    table = InstanceTable(tmp_path)
    me, start = os.getpid(), _process_start(os.getpid())
    for figures in ({"in_flight": -50}, {"queued": -1}, {"max_concurrency": 0}, {"admitted": -1}):
        path = plant(tmp_path, f"neg.{me}.shedder", me, start=start, **figures)
        assert table.report(local).workers == 0, figures
        assert path.exists()
    plant(tmp_path, f"neg.{me}.shedder", me, start=start, in_flight=2)
    assert table.report(local).stats.in_flight == 2  # the same record, sane: it counts


def test_records_are_private_and_never_written_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    victim.write_bytes(b"v" * 500)
    path = tmp_path / f"sym.{os.getpid()}.shedder"
    path.symlink_to(victim)
    old_umask = os.umask(0)
    try:
        throttler = Throttler(3, name="sym")
        InstanceTable(tmp_path).publish(throttler)
    finally:
        os.umask(old_umask)
    assert victim.read_bytes() == b"v" * 500  # used: truncated to the record's size
    info = os.lstat(path)
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600  # used: 0666 under umask 000
    record = _read(path)
    assert record is not None
    assert record.max_concurrency == 3


def test_a_directory_others_can_write_is_refused_unless_insisted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHEDDER_INSTANCE_DIR_INSECURE", raising=False)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(ValueError, match=r"writable by every user.*SHEDDER_INSTANCE_DIR_INSECURE"):
        InstanceTable(shared)
    assert InstanceTable(shared, insecure=True).directory == shared
    monkeypatch.setenv("SHEDDER_INSTANCE_DIR_INSECURE", "1")
    assert InstanceTable(shared).directory == shared
    monkeypatch.delenv("SHEDDER_INSTANCE_DIR_INSECURE")
    if os.geteuid() == 0:  # only root can give a directory away
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 4242, 4242)
        with pytest.raises(ValueError, match="belongs to uid 4242"):
            InstanceTable(foreign)
    shared.chmod(0o700)
    assert InstanceTable(shared).directory == shared


def shedding_worker(directory: str, holds: int, shed: bool, ready: Any, done: Any) -> None:
    throttler = Throttler(max_concurrency=2, max_queue=0, name="busy")
    InstanceTable(directory).publish(throttler)
    permits = [throttler.acquire() for _ in range(holds)]
    if shed:
        try:
            throttler.acquire()
        except Overloaded:
            pass
        for permit in permits:
            permit.release()
    ready.set()
    done.wait(30)
    for permit in permits:
        permit.release()


@pytest.mark.parametrize(("holds", "shed"), [(2, False), (2, True)])
def test_one_worker_shedding_makes_the_instance_overloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, holds: int, shed: bool
) -> None:
    """Issue 18: 200 "ok" at a summed load of 0.97 while one worker refused queue_full."""
    context = multiprocessing.get_context("spawn")
    ready, done = context.Event(), context.Event()
    process = context.Process(
        target=shedding_worker, args=(str(tmp_path), holds, shed, ready, done)
    )
    process.start()
    try:
        assert ready.wait(30)
        local = Throttler(max_concurrency=2, max_queue=0, name="busy")
        table = InstanceTable(tmp_path)
        table.publish(local)
        report = table.report(local)
        assert report.workers == 2
        # The sum looks fine: the other worker is full (or just refused) while this one idles.
        assert not report.stats.overloaded
        assert report.shedding_workers == 1
        assert report.overloaded
        if shed:  # it shed and then emptied: it counts as shedding for a short while only
            assert report.stats.in_flight == 0
            monkeypatch.setattr("shedder._web.instance.RECENT_SHED_SECONDS", 0.0)
            assert not table.report(local).overloaded
    finally:
        done.set()
        process.join(10)
        if process.is_alive():
            process.kill()


def test_a_table_that_fails_is_logged_once_and_reports_local_figures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "gone"
    directory.mkdir(mode=0o700)
    table = InstanceTable(directory)
    directory.rmdir()
    local = Throttler(3, name="lost")
    with caplog.at_level(logging.ERROR, logger="shedder"):
        for _ in range(3):
            table.publish_all([local])  # never raises
            report = table.report(local)  # never raises
            assert (report.workers, report.stats) == (0, local.stats())
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages  # one for publishing, one for reading: not per call
    assert "could not publish throttler 'lost'" in messages[0]
    assert "could not read the instance directory" in messages[1]
