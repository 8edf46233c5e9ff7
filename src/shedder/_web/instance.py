"""The whole instance's load when several worker processes each have their own throttler.

gunicorn ``-w 4`` or uvicorn ``--workers 4`` run four processes, each with its own throttler, and
a load balancer's probe reaches just one of them. Each worker publishes its throttler's figures
to a small memory-mapped file of its own in a shared directory; whichever worker answers the
probe sums the files of the live workers. Files of dead workers are dropped (and removed).

Writes use a sequence counter (odd while writing) so a reader never sums a torn record: it
re-reads a record whose counter was odd or moved, a bounded handful of times.

Publishing is per process: a record belongs to the process that created it. A forked child
(gunicorn forks its workers from the master, after ``--preload`` even from a master that
built the app) must publish again; it never writes into the record it inherited.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType

from shedder._core.throttler import SHED_REASONS, Throttler, ThrottlerListener, ThrottlerStats

__all__ = ["INSTANCE_DIR_ENV", "InstanceTable", "instance_table"]

INSTANCE_DIR_ENV = "SHEDDER_INSTANCE_DIR"
"""The environment variable adapters and the agent read when no ``instance_dir`` is given."""

# seq, pid, in_flight, queued, max_concurrency, max_queue, admitted, cancelled, shed x 3
_RECORD = struct.Struct("<QqqqqqQQ" + "Q" * len(SHED_REASONS))
_READ_ATTEMPTS = 8

# One publisher per record file in this process, whichever table asked: two writers with their
# own sequence counters on one record would tear it. Keyed by path (the pid is in the name).
_publishers: dict[Path, tuple[weakref.ref[Throttler], _Publisher]] = {}
_publishers_lock = threading.Lock()


def instance_table(instance_dir: str | os.PathLike[str] | None) -> InstanceTable | None:
    """The table for an adapter's ``instance_dir`` option: that directory, else the one named
    by ``$SHEDDER_INSTANCE_DIR`` when set and not empty, else None (single process).

    Raises ``ValueError`` if the directory does not exist.
    """
    if instance_dir is None:
        instance_dir = os.environ.get(INSTANCE_DIR_ENV) or None
        if instance_dir is None:
            return None
    return InstanceTable(instance_dir)


class InstanceTable:
    """Publishes throttlers' figures for sibling worker processes and sums theirs.

    ``directory`` must be shared by the workers of one instance and by nothing else (a fresh
    ``tempfile.mkdtemp()`` made by the server's master process, or a path in the environment).
    Call :meth:`publish` once per throttler in each worker; :meth:`stats` gives the instance's
    totals for a throttler name.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ValueError(f"directory must be an existing directory, got {str(directory)!r}")
        self._published_in = 0  # the pid that last ran publish_all

    def publish(self, throttler: Throttler) -> None:
        """Keep this process's record for ``throttler`` current from now on.

        Idempotent within a process. Raises ``ValueError`` if the throttler's name is not
        usable as a file name, or if another live throttler of the same name already
        publishes to this directory from this process (their figures would be confused).
        """
        name = throttler.name
        if "/" in name or name.startswith("."):
            raise ValueError(f"throttler name must be usable as a file name, got {name!r}")
        path = self.directory.resolve() / f"{name}.{os.getpid()}.shedder"
        with _publishers_lock:
            entry = _publishers.get(path)
            if entry is not None:
                owner = entry[0]()
                if owner is throttler and path.exists():
                    return
                if owner is not None and owner is not throttler:
                    raise ValueError(
                        f"another throttler named {name!r} already publishes to {self.directory}"
                    )
                if owner is not None:  # the file was removed under us: start a new record
                    owner.remove_listener(entry[1])
            with open(path, "wb") as file:
                file.write(b"\0" * _RECORD.size)
            with open(path, "r+b") as file:
                view = mmap.mmap(file.fileno(), _RECORD.size)
            publisher = _Publisher(throttler, view, path)
            _publishers[path] = (weakref.ref(throttler), publisher)
        throttler.add_listener(publisher)
        # A throttler that goes away must stop counting, though its process lives on.
        weakref.finalize(throttler, _retire, path, publisher)

    def publish_all(self, throttlers: Sequence[Throttler]) -> None:
        """:meth:`publish` each throttler once per process; cheap enough for every request.

        Adapters call this when serving, not when constructed, so a server's master process
        that builds the app before forking (gunicorn ``--preload``) publishes nothing.
        """
        pid = os.getpid()
        if self._published_in == pid:
            return
        for throttler in throttlers:
            self.publish(throttler)
        self._published_in = pid

    def stats(self, local: Throttler) -> ThrottlerStats:
        """The instance's totals for the throttler named like ``local`` (live workers only).

        ``local`` supplies the name and the shed threshold; if no worker has published yet, its
        own figures are returned.
        """
        return self.stats_and_workers(local)[0]

    def stats_and_workers(self, local: Throttler) -> tuple[ThrottlerStats, int]:
        """:meth:`stats` and the number of live worker records summed (0: local figures)."""
        totals = [0] * (_RECORD.size // 8 - 1)
        workers = 0
        for path in self.directory.glob(f"{local.name}.*.shedder"):
            record = _read(path)
            if record is None:
                continue
            pid = record[0]
            if not _alive(pid):
                path.unlink(missing_ok=True)
                continue
            workers += 1
            totals = [total + value for total, value in zip(totals, record, strict=True)]
        if not workers:
            return local.stats(), 0
        _, in_flight, queued, max_concurrency, max_queue, admitted, cancelled, *shed = totals
        stats = ThrottlerStats(
            name=local.name,
            in_flight=in_flight,
            queued=queued,
            max_concurrency=max(1, max_concurrency),
            max_queue=max_queue,
            shed_threshold=local.shed_threshold,
            admitted_total=admitted,
            cancelled_total=cancelled,
            shed_total=MappingProxyType(dict(zip(SHED_REASONS, shed, strict=True))),
        )
        return stats, workers


class _Publisher(ThrottlerListener):
    """Rewrites the record after every event, reading the throttler under its own lock so the
    last write always carries the latest state."""

    def __init__(self, throttler: Throttler, view: mmap.mmap, path: Path) -> None:
        self._view = view
        self._path = path
        self._lock = threading.Lock()
        self._seq = 0
        self._pid = os.getpid()
        self._write(throttler)

    def owned_by_this_process(self) -> bool:
        return os.getpid() == self._pid

    def _write(self, throttler: Throttler) -> None:
        if os.getpid() != self._pid:
            # A forked child inherited this listener and the parent's shared mapping: writing
            # would overwrite the parent's record with the child's figures.
            return
        with self._lock:
            stats = throttler.stats()
            self._seq += 1  # odd: writing
            struct.pack_into("<Q", self._view, 0, self._seq)
            _RECORD.pack_into(
                self._view,
                0,
                self._seq,
                self._pid,
                stats.in_flight,
                stats.queued,
                stats.max_concurrency,
                stats.max_queue,
                stats.admitted_total,
                stats.cancelled_total,
                *(stats.shed_total[reason] for reason in SHED_REASONS),
            )
            self._seq += 1  # even: done
            struct.pack_into("<Q", self._view, 0, self._seq)

    def on_queue(self, throttler: Throttler, priority: str) -> None:
        self._write(throttler)

    def on_admit(self, throttler: Throttler, waited: float, priority: str) -> None:
        self._write(throttler)

    def on_shed(self, throttler: Throttler, reason: str, waited: float, priority: str) -> None:
        self._write(throttler)

    def on_cancel(self, throttler: Throttler, waited: float) -> None:
        self._write(throttler)

    def on_release(self, throttler: Throttler, held: float) -> None:
        self._write(throttler)


def _retire(path: Path, publisher: _Publisher) -> None:
    """The throttler is gone: drop its record (unless a newer publisher took the path)."""
    with _publishers_lock:
        entry = _publishers.get(path)
        if entry is None or entry[1] is not publisher:
            return
        del _publishers[path]
    if publisher.owned_by_this_process():
        path.unlink(missing_ok=True)


def _read(path: Path) -> tuple[int, ...] | None:
    """A consistent record (without its sequence number), or None if unreadable.

    Two identical copies with an even sequence number mean no write overlapped the first.
    """
    try:
        previous = path.read_bytes()
        for _ in range(_READ_ATTEMPTS):
            current = path.read_bytes()
            if len(current) < _RECORD.size:
                return None
            seq, *fields = _RECORD.unpack_from(current)
            if current == previous and seq % 2 == 0 and seq > 0:
                return tuple(fields)
            previous = current
    except OSError:
        return None
    return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
