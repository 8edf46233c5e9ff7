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

Nothing in the directory is trusted. A record file is ``<name>.<pid>.shedder`` with the name
percent-encoded (any throttler name works, and names are matched exactly, never by pattern);
every record read is checked (size, format, pid range, figures) and one that fails is skipped.
A record is live only while its process is: same pid *and* same process start time (Linux
``/proc/PID/stat``; elsewhere the pid alone), so a dead worker's record, a reused pid or a
planted pid expire. Files are created ``0600`` with ``O_EXCL | O_NOFOLLOW`` and read with
``O_NOFOLLOW``; a directory other users can write is refused unless the operator insists.
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
import stat
import struct
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from shedder._core.throttler import SHED_REASONS, Throttler, ThrottlerListener, ThrottlerStats

__all__ = [
    "INSECURE_ENV",
    "INSTANCE_DIR_ENV",
    "RECENT_SHED_SECONDS",
    "InstanceStats",
    "InstanceTable",
    "instance_table",
]

logger = logging.getLogger("shedder")

INSTANCE_DIR_ENV = "SHEDDER_INSTANCE_DIR"
"""The environment variable adapters and the agent read when no ``instance_dir`` is given."""

INSECURE_ENV = "SHEDDER_INSTANCE_DIR_INSECURE"
"""Set to ``1`` to accept an instance directory that other users can write (not advised)."""

RECENT_SHED_SECONDS = 1.0
"""A worker that refused a request this recently counts as shedding in the instance's health."""

_MAGIC = b"SHDR"
_VERSION = 1
# seq, magic, version, pid, process start, in_flight, queued, max_concurrency, max_queue,
# shed_threshold, admitted, cancelled, last shed (Unix time, 0: never), shed by reason.
# Signed throughout, so a negative figure is seen for what it is rather than read as huge.
_RECORD = struct.Struct("<q4siqqqqqqdqqd" + "q" * len(SHED_REASONS))
_SEQ = struct.Struct("<q")
_READ_ATTEMPTS = 8
_SUFFIX = ".shedder"
_MAX_PID = 2**31 - 1  # pid_t is a C int: anything larger is garbage (and overflows os.kill)
_MAX_FIGURE = 2**53  # exact as a JSON number; far above any real count
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a planted FIFO must not block the reader
_SAFE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_MAX_KEY = 120  # file names are at most 255 bytes: longer encoded names go by their digest
_HAVE_PROC = os.path.exists(f"/proc/{os.getpid()}/stat")

# One publisher per record file in this process, whichever table asked: two writers with their
# own sequence counters on one record would tear it. Keyed by path (the pid is in the name).
_publishers: dict[Path, tuple[weakref.ref[Throttler], _Publisher]] = {}
# Where each throttler publishes, per (directory, pid): several live throttlers may share a
# name, and each needs a record of its own (see _record_name).
_record_paths: weakref.WeakKeyDictionary[Throttler, dict[tuple[Path, int], Path]] = (
    weakref.WeakKeyDictionary()
)
_publishers_lock = threading.Lock()


def instance_table(
    instance_dir: str | os.PathLike[str] | None, *, insecure: bool | None = None
) -> InstanceTable | None:
    """The table for an adapter's ``instance_dir`` option: that directory, else the one named
    by ``$SHEDDER_INSTANCE_DIR`` when set and not empty, else None (single process).

    Raises ``ValueError`` if the directory does not exist or is not private (see
    :class:`InstanceTable`).
    """
    if instance_dir is None:
        instance_dir = os.environ.get(INSTANCE_DIR_ENV) or None
        if instance_dir is None:
            return None
    elif not isinstance(instance_dir, (str, os.PathLike)):
        raise TypeError(f"instance_dir must be a path (str or os.PathLike), got {instance_dir!r}")
    try:
        return InstanceTable(instance_dir, insecure=insecure)
    except ValueError as error:
        raise ValueError(f"instance_dir: {error}") from None


@dataclass(frozen=True, slots=True)
class InstanceStats:
    """One throttler's figures for the whole instance, and how its workers are doing."""

    stats: ThrottlerStats
    """Summed over the live workers' records; this process's own figures without any."""
    workers: int | None
    """Worker records summed: None without an instance table, 0 when none was readable."""
    shedding_workers: int = 0
    """Workers at or over their own shed threshold, or that refused a request within
    :data:`RECENT_SHED_SECONDS`: a sum below the threshold can hide one full worker."""

    @property
    def overloaded(self) -> bool:
        """True while the summed load is at the threshold or any worker is shedding."""
        return self.stats.overloaded or self.shedding_workers > 0


class InstanceTable:
    """Publishes throttlers' figures for sibling worker processes and sums theirs.

    ``directory`` must be shared by the workers of one instance and by nothing else (a fresh
    ``tempfile.mkdtemp()`` made by the server's master process, or a path in the environment).
    Call :meth:`publish` once per throttler in each worker; :meth:`report` gives the instance's
    totals for a throttler.

    Raises ``ValueError`` if ``directory`` is not an existing directory, or if other users
    could write to it (world-writable, or owned by another user): they could plant records
    that take the instance out of rotation. ``insecure=True`` (default: ``$SHEDDER_INSTANCE_DIR_
    INSECURE`` set to ``1``) accepts such a directory anyway.
    """

    def __init__(self, directory: str | os.PathLike[str], *, insecure: bool | None = None) -> None:
        path = Path(directory)
        try:
            info = os.stat(path)
        except (OSError, ValueError):
            info = None
        if info is None or not stat.S_ISDIR(info.st_mode):
            raise ValueError(f"directory must be an existing directory, got {str(directory)!r}")
        if insecure is None:
            insecure = os.environ.get(INSECURE_ENV, "").strip().lower() in ("1", "true", "yes")
        if not insecure:
            _check_private(path, info)
        self.directory = path
        self._resolved = path.resolve()
        self._published_in = 0  # the pid that last ran publish_all
        self._logged: set[str] = set()

    def publish(self, throttler: Throttler) -> None:
        """Keep this process's record for ``throttler`` current from now on.

        Idempotent within a process. Live throttlers that share a name each get a record of
        their own (the n-th one of a name in every worker is summed with the n-th of the
        others). Raises ``OSError`` if the record cannot be created.
        """
        pid = os.getpid()
        key = (self._resolved, pid)
        with _publishers_lock:
            places = _record_paths.setdefault(throttler, {})
            path = places.get(key)
            entry = None if path is None else _publishers.get(path)
            if path is not None and entry is not None and entry[0]() is throttler:
                if os.path.lexists(path):
                    return
                # The file was removed under us: start a new record in the same place.
                throttler.remove_listener(entry[1])
            else:
                path = self._free_path(throttler.name, pid)
            view = _create(path)
            publisher = _Publisher(throttler, view, path)
            _publishers[path] = (weakref.ref(throttler), publisher)
            places[key] = path
        throttler.add_listener(publisher)
        # A throttler that goes away must stop counting, though its process lives on.
        weakref.finalize(throttler, _retire, path, publisher)

    def _free_path(self, name: str, pid: int) -> Path:
        """The first record path for ``name`` in this process that no live throttler holds."""
        encoded = _encode_name(name)
        ordinal = 0
        while True:
            path = self._resolved / _file_name(_record_key(encoded, ordinal), pid)
            entry = _publishers.get(path)
            if entry is None or entry[0]() is None:
                return path
            ordinal += 1

    def publish_all(self, throttlers: Sequence[Throttler]) -> None:
        """:meth:`publish` each throttler once per process; cheap enough for every request.

        Never raises: a record that cannot be created is logged (once) and that throttler is
        reported from this process's figures alone, so no request fails for it. Adapters call
        this when serving, not when constructed, so a server's master process that builds the
        app before forking (gunicorn ``--preload``) publishes nothing.
        """
        pid = os.getpid()
        if self._published_in == pid:
            return
        self._published_in = pid
        for throttler in throttlers:
            try:
                self.publish(throttler)
            except Exception:
                self._log_once("publish", f"could not publish throttler {throttler.name!r}")

    def stats(self, local: Throttler) -> ThrottlerStats:
        """The instance's totals for ``local`` (live workers only); see :meth:`report`."""
        return self.report(local).stats

    def report(self, local: Throttler) -> InstanceStats:
        """The instance's totals for the throttler ``local`` and the state of its workers.

        ``local`` supplies the record name and the shed threshold of the sum; if no worker
        has published yet, its own figures are returned (``workers == 0``). Never raises: a
        failure to read the directory is logged (once) and reported as that.
        """
        try:
            return self._report(local)
        except Exception:
            self._log_once("read", f"could not read the instance directory {self.directory}")
            return InstanceStats(local.stats(), 0)

    def _report(self, local: Throttler) -> InstanceStats:
        pid = os.getpid()
        with _publishers_lock:
            path = _record_paths.get(local, {}).get((self._resolved, pid))
        key = _record_key(_encode_name(local.name), 0) if path is None else _parse(path.name)[0]
        totals = [0] * (6 + len(SHED_REASONS))  # in_flight .. cancelled, then shed by reason
        workers = shedding = 0
        now = time.time()
        for path, record_pid in _records(self._resolved, key):
            found = _read_file(path)
            if found is None:
                continue  # being created, torn, or not a record: skip it, never trust it
            record, info = found
            verdict = _check(record, record_pid)
            if verdict == "stale":
                _unlink_if_same(path, info)
                continue
            if verdict == "garbage":
                continue
            workers += 1
            figures = (
                record.in_flight,
                record.queued,
                record.max_concurrency,
                record.max_queue,
                record.admitted,
                record.cancelled,
                *record.shed,
            )
            totals = [total + value for total, value in zip(totals, figures, strict=True)]
            load = (record.in_flight + record.queued) / (record.max_concurrency + record.max_queue)
            if load >= record.shed_threshold or 0.0 <= now - record.last_shed < RECENT_SHED_SECONDS:
                shedding += 1
        if not workers:
            return InstanceStats(local.stats(), 0)
        in_flight, queued, max_concurrency, max_queue, admitted, cancelled, *shed = totals
        stats = ThrottlerStats(
            name=local.name,
            in_flight=in_flight,
            queued=queued,
            max_concurrency=max_concurrency,
            max_queue=max_queue,
            shed_threshold=local.shed_threshold,
            admitted_total=admitted,
            cancelled_total=cancelled,
            shed_total=MappingProxyType(dict(zip(SHED_REASONS, shed, strict=True))),
        )
        return InstanceStats(stats, workers, shedding)

    def _log_once(self, what: str, message: str) -> None:
        """Log the current exception the first time ``what`` fails for this table."""
        if what not in self._logged:
            self._logged.add(what)
            logger.exception("shedder: %s; reporting this process's figures instead", message)


class _Record(NamedTuple):
    seq: int
    magic: bytes
    version: int
    pid: int
    start: int  # process start time, in clock ticks since boot (0: unknown on this system)
    in_flight: int
    queued: int
    max_concurrency: int
    max_queue: int
    shed_threshold: float
    admitted: int
    cancelled: int
    last_shed: float  # Unix time of the last refusal, 0.0: none yet
    shed: tuple[int, ...]

    @classmethod
    def unpack(cls, data: bytes) -> _Record:
        values = _RECORD.unpack_from(data)
        return cls._make((*values[:13], tuple(values[13:])))


def _check(record: _Record, pid_in_name: int) -> str:
    """``"ok"``, ``"stale"`` (its process is gone, or never was: remove it) or ``"garbage"``."""
    if record.magic != _MAGIC or record.version != _VERSION:
        return "garbage"
    if not 1 <= record.pid <= _MAX_PID or record.pid != pid_in_name:
        return "stale"
    if not _alive(record.pid, record.start):
        return "stale"
    counts = (
        record.in_flight,
        record.queued,
        record.max_queue,
        record.admitted,
        record.cancelled,
        *record.shed,
    )
    if not all(0 <= count <= _MAX_FIGURE for count in counts):
        return "garbage"
    if not 1 <= record.max_concurrency <= _MAX_FIGURE:
        return "garbage"
    if not (math.isfinite(record.shed_threshold) and 0.0 < record.shed_threshold <= 1.0):
        return "garbage"
    if not (math.isfinite(record.last_shed) and record.last_shed >= 0.0):
        return "garbage"
    return "ok"


def _check_private(path: Path, info: os.stat_result) -> None:
    """Refuse a directory that users other than this one can write to."""
    hint = (
        "use a directory only this user can write (tempfile.mkdtemp() makes one), or set "
        f"{INSECURE_ENV}=1 (insecure=True) to accept it"
    )
    if info.st_mode & stat.S_IWOTH:
        raise ValueError(
            f"instance directory {str(path)!r} is writable by every user (mode "
            f"{stat.S_IMODE(info.st_mode):04o}): anyone could plant records that change this "
            f"instance's health; {hint}"
        )
    euid = os.geteuid() if hasattr(os, "geteuid") else None
    if euid is not None and info.st_uid != euid:
        raise ValueError(
            f"instance directory {str(path)!r} belongs to uid {info.st_uid}, not to this "
            f"process's uid {euid}: its owner could plant records; {hint}"
        )


def _encode_name(name: str) -> str:
    """``name`` as a file-name part: letters, digits, ``_`` and ``-`` kept, the rest ``%XX``
    (UTF-8), so no two names share an encoding and none holds ``.``, ``/`` or ``~``."""
    parts = []
    for char in name:
        if char in _SAFE_CHARS:
            parts.append(char)
        else:
            parts.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    encoded = "".join(parts)
    if len(encoded) > _MAX_KEY:
        # "%%" never occurs in an encoding, so a digest cannot pass for a short name.
        encoded = "%%" + hashlib.sha256(encoded.encode("ascii")).hexdigest()
    return encoded


def _record_key(encoded: str, ordinal: int) -> str:
    """The n-th live throttler of a name in a process: ``api``, then ``api~1``, ``api~2``..."""
    return encoded if ordinal == 0 else f"{encoded}~{ordinal}"


def _file_name(key: str, pid: int) -> str:
    return f"{key}.{pid}{_SUFFIX}"


def _parse(file_name: str) -> tuple[str, int]:
    """``(key, pid)`` of a record's file name; ``("", 0)`` for any other name."""
    if not file_name.endswith(_SUFFIX):
        return "", 0
    key, _, pid_text = file_name[: -len(_SUFFIX)].rpartition(".")
    if not key or "." in key or not (pid_text.isascii() and pid_text.isdigit()):
        return "", 0
    if len(pid_text) > 10:
        return key, -1  # a pid far out of range: a stale record
    return key, int(pid_text)


def _records(directory: Path, key: str) -> Iterator[tuple[Path, int]]:
    """The record files of exactly ``key`` in ``directory``, with the pid in each name."""
    with os.scandir(directory) as entries:
        for entry in entries:
            found, pid = _parse(entry.name)
            if found == key:
                yield directory / entry.name, pid


def _create(path: Path) -> mmap.mmap:
    """A new zero record at ``path``: ``0600``, never through a symlink or into a file that
    was already there (a stale record of an earlier process with this pid is replaced)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)  # removes a planted symlink itself, never its target
        fd = os.open(path, flags, 0o600)
    try:
        os.ftruncate(fd, _RECORD.size)
        return mmap.mmap(fd, _RECORD.size)
    finally:
        os.close(fd)


class _Publisher(ThrottlerListener):
    """Rewrites the record after every event, reading the throttler under its own lock so the
    last write always carries the latest state."""

    def __init__(self, throttler: Throttler, view: mmap.mmap, path: Path) -> None:
        self._view = view
        self._path = path
        self._lock = threading.Lock()
        self._seq = 0
        self._pid = os.getpid()
        self._start = _process_start(self._pid) or 0
        self._last_shed = 0.0
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
            _SEQ.pack_into(self._view, 0, self._seq)
            _RECORD.pack_into(
                self._view,
                0,
                self._seq,
                _MAGIC,
                _VERSION,
                self._pid,
                self._start,
                stats.in_flight,
                stats.queued,
                stats.max_concurrency,
                stats.max_queue,
                stats.shed_threshold,
                stats.admitted_total,
                stats.cancelled_total,
                self._last_shed,
                *(stats.shed_total[reason] for reason in SHED_REASONS),
            )
            self._seq += 1  # even: done
            _SEQ.pack_into(self._view, 0, self._seq)

    def on_queue(self, throttler: Throttler, priority: str) -> None:
        self._write(throttler)

    def on_admit(self, throttler: Throttler, waited: float, priority: str) -> None:
        self._write(throttler)

    def on_shed(self, throttler: Throttler, reason: str, waited: float, priority: str) -> None:
        self._last_shed = time.time()  # wall clock: compared by other processes
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


def _read(path: Path) -> _Record | None:
    """A consistent record, unchecked, or None if unreadable (for tests and tools)."""
    found = _read_file(path)
    return None if found is None else found[0]


def _read_file(path: Path) -> tuple[_Record, os.stat_result] | None:
    """A consistent record and the file's status, or None if unreadable or not a record file.

    Never follows a symlink, never blocks on a FIFO. Two identical copies with an even, non-zero
    sequence number mean no write overlapped the first.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != _RECORD.size:
            return None
        previous = os.pread(fd, _RECORD.size, 0)
        for _ in range(_READ_ATTEMPTS):
            current = os.pread(fd, _RECORD.size, 0)
            if len(current) != _RECORD.size:
                return None
            (seq,) = _SEQ.unpack_from(current)
            if current == previous and seq % 2 == 0 and seq > 0:
                return _Record.unpack(current), info
            previous = current
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def _unlink_if_same(path: Path, info: os.stat_result) -> None:
    """Remove a stale record, unless a new process already put a new file in its place."""
    try:
        current = os.lstat(path)
        if (current.st_dev, current.st_ino) == (info.st_dev, info.st_ino):
            os.unlink(path)
    except OSError:
        pass


def _alive(pid: int, start: int) -> bool:
    """Whether the process that wrote a record still runs: its pid, and on Linux its start
    time too, so that a reused or a planted pid of some other live process does not count."""
    actual = _process_start(pid)
    if actual is None:
        return False
    return not _HAVE_PROC or actual == start


def _process_start(pid: int) -> int | None:
    """Process ``pid``'s start time (clock ticks since boot, field 22 of ``/proc/PID/stat``),
    None if no such process runs (a zombie has stopped running); 0 without ``/proc``."""
    if not _HAVE_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, someone else's
        return 0
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold anything, ")" included.
    fields = data.rpartition(b")")[2].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None
