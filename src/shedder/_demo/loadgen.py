"""An open-loop HTTP/1.1 load generator: Poisson arrivals, one connection per request.

Open loop means every request leaves at its scheduled time whether or not earlier ones have
been answered, as independent users do; closed-loop tools (wrk, ab) wait for an answer before
sending the next request and so never offer more than their connection count, which hides
overload. Each request has a client deadline: when it passes, the request is abandoned and its
connection closed, as a real client with a timeout does, and the server is left to notice.

The client is deliberately lean (an :class:`asyncio.Protocol`, ``Connection: close``, a parser
that reads only the status line and ``content-length``) so that one core can offer several
thousand requests per second; httpx costs several times more per request. It talks only to
the address it is given and is meant for 127.0.0.1.

Latency is measured from the *scheduled* send time, not the actual one, so that a generator
running late cannot hide the wait (no coordinated omission); ``LoadResult.send_lag`` says how
late it ran.
"""

from __future__ import annotations

import asyncio
import errno
import math
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "ERROR",
    "OK",
    "OUTCOMES",
    "SHED",
    "TIMEOUT",
    "LoadGenerator",
    "LoadResult",
    "RequestClass",
    "classify",
    "poisson_schedule",
]

OK = "ok"
"""A 2xx answer within the deadline."""
SHED = "shed"
"""A 503 or 429 answer within the deadline: the server refused the request."""
TIMEOUT = "timeout"
"""No complete answer within the deadline: abandoned, connection closed."""
ERROR = "error"
"""Connection refused or reset, a malformed answer, or any other status."""
OUTCOMES = (OK, SHED, TIMEOUT, ERROR)

_HEADER_END = b"\r\n\r\n"
_CONTENT_LENGTH = b"\r\ncontent-length:"


def classify(status: int) -> str:
    """The outcome of a complete answer with HTTP ``status`` received within the deadline."""
    if 200 <= status < 300:
        return OK
    if status in (503, 429):
        return SHED
    return ERROR


def poisson_schedule(
    rate: float, duration: float, rng: random.Random, max_requests: int | None = None
) -> list[float]:
    """Send times, in seconds from the start, of a Poisson process of ``rate`` per second.

    Inter-arrival gaps are exponential with mean ``1 / rate``; times stop before ``duration``
    seconds or at ``max_requests`` requests, whichever comes first. Raises ``ValueError`` for a
    non-positive rate or duration.
    """
    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"rate must be a positive finite number of requests/s, got {rate}")
    if not duration > 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    limit = math.inf if max_requests is None else max_requests
    times: list[float] = []
    at = rng.expovariate(rate)
    while at < duration and len(times) < limit:
        times.append(at)
        at += rng.expovariate(rate)
    return times


@dataclass(frozen=True)
class RequestClass:
    """One kind of request in a mixed schedule: its name, weight and extra headers.

    Each request of a schedule is drawn at random with probability ``weight / total weight``:
    the superposition of independent Poisson processes, one per class.
    """

    name: str
    weight: float
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.weight > 0 or math.isinf(self.weight):
            raise ValueError(f"weight must be a positive finite number, got {self.weight}")


@dataclass(slots=True)
class LoadResult:
    """Per-request outcomes of one run, in send order; latencies in seconds.

    ``scheduled[i]`` is request ``i``'s send time in seconds from the start; ``latency[i]`` runs
    from that time to its complete answer (or to the deadline, for a timeout); ``status[i]`` is
    0 when no answer was parsed. With request classes, ``request_class[i]`` indexes
    ``class_names`` (empty without classes).
    """

    rate: float
    duration: float
    deadline: float
    scheduled: list[float] = field(default_factory=list)
    outcome: list[str] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    send_lag: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    request_class: list[int] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        """How many requests ended with ``outcome`` (one of :data:`OUTCOMES`)."""
        return sum(1 for o in self.outcome if o == outcome)


class _Exchange:
    """One request on its own non-blocking socket: connect, write, read just enough, close.

    Driven by the loop's reader/writer callbacks rather than transports and tasks: a third of
    the CPU per request, which is what lets one core offer thousands of requests per second.
    """

    __slots__ = (
        "_buffer",
        "_generator",
        "_header_end",
        "_length",
        "_reading",
        "_writing",
        "index",
        "sock",
    )

    def __init__(self, generator: LoadGenerator, index: int) -> None:
        self._generator = generator
        self.index = index
        self.sock: socket.socket | None = None
        self._buffer = b""
        self._header_end = -1
        self._length = -1  # content-length; -1 until the headers are parsed, -2 if absent
        self._reading = False
        self._writing = False

    def start(self, loop: asyncio.AbstractEventLoop, address: tuple[str, int]) -> None:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:  # EMFILE and friends: out of sockets
            self._fail(_error_name(exc))
            return
        self.sock = sock
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err == 0:
            self._send(loop)
        elif err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            self._writing = True
            loop.add_writer(sock.fileno(), self._connected, loop)
        else:
            self._fail(errno.errorcode.get(err, str(err)))

    def _connected(self, loop: asyncio.AbstractEventLoop) -> None:
        sock = self.sock
        if sock is None:
            return
        loop.remove_writer(sock.fileno())
        self._writing = False
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(errno.errorcode.get(err, str(err)))
        else:
            self._send(loop)

    def _send(self, loop: asyncio.AbstractEventLoop) -> None:
        sock = self.sock
        if sock is None:
            return
        request = self._generator.request_for(self.index)
        try:
            # A fresh socket's send buffer takes a small request whole.
            sent = sock.send(request)
        except OSError as exc:
            self._fail(_error_name(exc))
            return
        if sent != len(request):
            self._fail("short write")
            return
        self._reading = True
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(_error_name(exc))
            return
        if not data:
            # The server closed: an answer without content-length ends here.
            if self._header_end >= 0 and self._length == -2:
                self._complete()
            else:
                self._fail("closed before answer")
            return
        self._buffer += data
        buffer = self._buffer
        if self._header_end < 0:
            end = buffer.find(_HEADER_END)
            if end < 0:
                return
            self._header_end = end + 4
            head = buffer[:end].lower()
            at = head.find(_CONTENT_LENGTH)
            if at < 0:
                self._length = -2
            else:
                stop = head.find(b"\r\n", at + 2)
                try:
                    self._length = int(head[at + len(_CONTENT_LENGTH) : stop if stop > 0 else None])
                except ValueError:
                    self._length = -2
        if self._length >= 0 and len(buffer) - self._header_end >= self._length:
            self._complete()

    def _complete(self) -> None:
        buffer = self._buffer
        try:
            status = int(buffer[9:12]) if buffer.startswith(b"HTTP/1.") else 0
        except ValueError:
            status = 0
        if status:
            self._generator.finish(self.index, classify(status), status, None)
        else:
            self._generator.finish(self.index, ERROR, 0, "malformed answer")

    def _fail(self, error: str) -> None:
        self._generator.finish(self.index, ERROR, 0, error)

    def close(self) -> None:
        """Stop watching the socket and close it (abandon or done: the same, for a client)."""
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        loop = self._generator.loop
        if self._reading:
            loop.remove_reader(sock.fileno())
        if self._writing:
            loop.remove_writer(sock.fileno())
        sock.close()


def _header_lines(headers: Sequence[tuple[str, str]]) -> str:
    for name, value in headers:
        if any(c in name + value for c in "\r\n") or not name:
            raise ValueError(f"bad header {name!r}: {value!r}")
    return "".join(f"{name}: {value}\r\n" for name, value in headers)


def _error_name(exc: OSError) -> str:
    if exc.errno is not None and exc.errno in errno.errorcode:
        return errno.errorcode[exc.errno]
    return type(exc).__name__


class LoadGenerator:
    """Offers ``rate`` requests per second to ``http://host:port/path`` for ``duration`` s.

    ``run()`` returns a :class:`LoadResult` once every request has been answered or abandoned,
    at most ``duration + deadline`` seconds (plus a little slack) after it starts. ``sent``,
    ``outstanding`` and ``counts`` may be read from another thread for live progress.

    Args:
        host, port, path: the target; plain HTTP/1.1, ``Connection: close``.
        rate: mean arrivals per second (Poisson).
        duration: how long to offer load, seconds.
        deadline: client timeout per request, seconds, from its scheduled send time.
        seed: for the arrival schedule; the same seed gives the same schedule.
        max_requests: a hard cap on requests sent, whatever ``rate * duration`` is.
        classes: a mix of request kinds in the one schedule (see :class:`RequestClass`); each
            request's class is drawn from its own seeded stream, so the send times stay those
            of ``seed``. None: one kind.
        headers: extra headers on every request.
        stamp_header: if set, every request carries this header with its scheduled send time
            (``time.monotonic()`` seconds, the clock every process on the host shares), so
            the server can tell how long after it a request reached the app.
        request_start: if true, every request also carries ``x-request-start: t=<µs>``, the
            wall-clock time it is sent, as a proxy in front (nginx, Heroku's router) stamps it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        rate: float,
        duration: float,
        deadline: float = 1.0,
        path: str = "/",
        seed: int | None = None,
        max_requests: int = 200_000,
        classes: Sequence[RequestClass] | None = None,
        headers: Sequence[tuple[str, str]] = (),
        stamp_header: str | None = None,
        request_start: bool = False,
    ) -> None:
        if not deadline > 0:
            raise ValueError(f"deadline must be > 0 seconds, got {deadline}")
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests}")
        self.host = host
        self.port = port
        self._address = (host, port)
        self.rate = rate
        self.duration = duration
        self.deadline = deadline
        self.schedule = poisson_schedule(rate, duration, random.Random(seed), max_requests)
        head = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
            "User-Agent: shedder-loadgen\r\n" + _header_lines(headers)
        )
        self.request_bytes = (head + "\r\n").encode("latin-1")
        n = len(self.schedule)
        self.classes = tuple(classes or ())
        self._heads = [head + _header_lines(c.headers) for c in self.classes] or [head]
        self._stamp = stamp_header
        self._request_start = request_start
        self._class_of: list[int] = []
        if self.classes:
            picker = random.Random(None if seed is None else f"classes-{seed}")
            weights = [c.weight for c in self.classes]
            self._class_of = picker.choices(range(len(self.classes)), weights, k=n)
        self._requests = [(h + "\r\n").encode("latin-1") for h in self._heads]
        self._result = LoadResult(
            rate=rate,
            duration=duration,
            deadline=deadline,
            scheduled=self.schedule,
            outcome=[""] * n,
            status=[0] * n,
            latency=[math.nan] * n,
            send_lag=[],
            class_names=tuple(c.name for c in self.classes),
            request_class=self._class_of,
        )
        self._starts: list[float] = [0.0] * n
        self._exchanges: list[_Exchange | None] = [None] * n
        self._timers: list[asyncio.TimerHandle | None] = [None] * n
        self.sent = 0
        self.outstanding = 0
        self.counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.started_at: float | None = None
        """The loop time (``time.monotonic()``) the schedule counts from, once running."""
        self._all_done = asyncio.Event()  # binds to a loop on first use, not here
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop; only valid while :meth:`run` runs."""
        if self._loop is None:
            raise RuntimeError("the load generator is not running")
        return self._loop

    def request_for(self, index: int) -> bytes:
        """The bytes of request ``index``: its class's headers, and its stamp if asked for."""
        kind = self._class_of[index] if self._class_of else 0
        if self._stamp is None and not self._request_start:
            return self._requests[kind]
        stamp = "" if self._stamp is None else f"{self._stamp}: {self._starts[index]:.6f}\r\n"
        if self._request_start:
            stamp += f"x-request-start: t={int(time.time() * 1e6)}\r\n"
        stamp += "\r\n"
        return (self._heads[kind] + stamp).encode("latin-1")

    def finish(self, index: int, outcome: str, status: int, error: str | None) -> None:
        """Record request ``index``'s outcome and close its socket; later calls are ignored."""
        result = self._result
        if result.outcome[index]:
            return
        result.outcome[index] = outcome
        result.status[index] = status
        result.latency[index] = self.loop.time() - self._starts[index]
        if error is not None:
            result.errors[error] = result.errors.get(error, 0) + 1
        self.counts[outcome] += 1
        timer = self._timers[index]
        if timer is not None:
            timer.cancel()
            self._timers[index] = None
        exchange = self._exchanges[index]
        if exchange is not None:
            self._exchanges[index] = None
            exchange.close()
        self.outstanding -= 1
        if self.outstanding == 0 and self.sent == len(self.schedule):
            self._all_done.set()

    def _expire(self, index: int) -> None:
        self._timers[index] = None
        # finish() closes the socket: the client walks away, as a real one with a timeout does.
        self.finish(index, TIMEOUT, 0, None)
        self._result.latency[index] = self.deadline

    # -- the run -------------------------------------------------------------------------------

    def _launch(self, index: int, scheduled: float) -> None:
        loop = self.loop
        self._starts[index] = scheduled
        self.sent += 1
        self.outstanding += 1
        exchange = _Exchange(self, index)
        self._exchanges[index] = exchange
        self._timers[index] = loop.call_at(scheduled + self.deadline, self._expire, index)
        exchange.start(loop, self._address)

    async def run(self, on_tick: Callable[[], None] | None = None) -> LoadResult:
        """Offer the load and wait for every request to finish; see the class docstring.

        ``on_tick``, if given, is called from the loop about ten times a second.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        _raise_open_file_limit()
        start = loop.time() + 0.01
        self.started_at = start
        try:
            await self._offer(start, on_tick)
        finally:
            # Cancelled (Ctrl-C) or failed: close every socket still open before leaving.
            for exchange in self._exchanges:
                if exchange is not None:
                    exchange.close()
            for timer in self._timers:
                if timer is not None:
                    timer.cancel()
        return self._result

    async def _offer(self, start: float, on_tick: Callable[[], None] | None) -> None:
        loop = self.loop
        schedule = self.schedule
        n = len(schedule)
        lag = self._result.send_lag
        next_tick = start
        index = 0
        while index < n:
            now = loop.time()
            # Everything that is due goes out now, even if we woke late: open loop.
            while index < n and start + schedule[index] <= now:
                scheduled = start + schedule[index]
                lag.append(now - scheduled)
                self._launch(index, scheduled)
                index += 1
            if on_tick is not None and now >= next_tick:
                on_tick()
                next_tick = now + 0.1
            if index < n:
                await asyncio.sleep(start + schedule[index] - loop.time())
        if self.outstanding:
            # Every request has its own deadline timer, so this ends within `deadline`; the
            # 0.1 s timeout only gives live progress a chance to redraw.
            waiting = asyncio.ensure_future(self._all_done.wait())
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=0.1 if on_tick else None)
                if on_tick is not None:
                    on_tick()
        if on_tick is not None:
            on_tick()


def _raise_open_file_limit() -> None:
    """One socket per outstanding request: at 3,000 req/s and a 1 s deadline, thousands."""
    try:
        import resource
    except ImportError:  # not on Unix: keep the default limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass  # keep the lower limit; running out shows up as errors in the result
