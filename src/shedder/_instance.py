"""The whole instance's load when several worker processes each have their own throttler.

gunicorn ``-w 4`` or uvicorn ``--workers 4`` run four processes, each with its own throttler, and
a load balancer's probe reaches just one of them. Each worker publishes its throttler's figures
to a small memory-mapped file of its own in a shared directory; whichever worker answers the
probe sums the files of the live workers. Files of dead workers are dropped (and removed).

Writes use a sequence counter (odd while writing) so a reader never sums a torn record: it
re-reads a record whose counter was odd or moved, a bounded handful of times.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from pathlib import Path
from types import MappingProxyType

from ._throttler import SHED_REASONS, Throttler, ThrottlerListener, ThrottlerStats

__all__ = ["InstanceTable"]

# seq, pid, in_flight, queued, max_concurrency, max_queue, admitted, cancelled, shed x 3
_RECORD = struct.Struct("<QqqqqqQQ" + "Q" * len(SHED_REASONS))
_READ_ATTEMPTS = 8


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
        self._lock = threading.Lock()

    def publish(self, throttler: Throttler) -> None:
        """Keep this process's record for ``throttler`` current from now on."""
        name = throttler.name
        if "/" in name or name.startswith("."):
            raise ValueError(f"throttler name must be usable as a file name, got {name!r}")
        path = self.directory / f"{name}.{os.getpid()}.shedder"
        with open(path, "wb") as file:
            file.write(b"\0" * _RECORD.size)
        with open(path, "r+b") as file:
            view = mmap.mmap(file.fileno(), _RECORD.size)
        throttler.add_listener(_Publisher(throttler, view, path))

    def stats(self, local: Throttler) -> ThrottlerStats:
        """The instance's totals for the throttler named like ``local`` (live workers only).

        ``local`` supplies the name and the shed threshold; if no worker has published yet, its
        own figures are returned.
        """
        totals = [0] * (_RECORD.size // 8 - 1)
        found = False
        for path in self.directory.glob(f"{local.name}.*.shedder"):
            record = _read(path)
            if record is None:
                continue
            pid = record[0]
            if not _alive(pid):
                path.unlink(missing_ok=True)
                continue
            found = True
            totals = [total + value for total, value in zip(totals, record, strict=True)]
        if not found:
            return local.stats()
        _, in_flight, queued, max_concurrency, max_queue, admitted, cancelled, *shed = totals
        return ThrottlerStats(
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

    def _write(self, throttler: Throttler) -> None:
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

    def on_queue(self, throttler: Throttler) -> None:
        self._write(throttler)

    def on_admit(self, throttler: Throttler, waited: float) -> None:
        self._write(throttler)

    def on_shed(self, throttler: Throttler, reason: str, waited: float) -> None:
        self._write(throttler)

    def on_cancel(self, throttler: Throttler, waited: float) -> None:
        self._write(throttler)

    def on_release(self, throttler: Throttler, held: float) -> None:
        self._write(throttler)


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
