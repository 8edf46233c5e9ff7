"""gunicorn: a gthread worker that refuses before its thread pool, with the app's own throttler.

``gunicorn -k shedder.gunicorn.ThreadWorker --threads 32 myapp:app``, where the app is wrapped
in :class:`shedder.wsgi.LoadSheddingMiddleware` (no second configuration: the worker finds the
middleware by walking the app through ``.app``, ``.wsgi_app``, ``.application`` and
``__wrapped__``).

gunicorn's gthread worker hands every readable connection to a thread pool whose queue is
unbounded: under overload requests wait there, unseen by any middleware. This worker decides
when a connection becomes readable, from the request line and headers it peeks at: it admits
or queues the request in the middleware's throttler and hands it to the pool with that
decision, or answers the refusal (503 + ``Retry-After``, ``Connection: close``) itself without
using a thread. So the pool holds at most ``max_concurrency + max_queue`` throttled requests
(``max_queue`` per priority class with a ``priority_header``; plus the health, metrics and
exempt ones, which are never refused here), and the time a
request waits for a thread counts against ``queue_timeout``; the app finds it in
``environ["shedder.queued_in_server"]`` (seconds). Needs the ``gunicorn`` extra.

A refusal costs what it must and little more: new connections are accepted in batches, a
refused one never becomes a gunicorn connection object, and one whose request is complete and
carries no body is answered and closed at once (no lingering, no poller registration).
"""

from __future__ import annotations

import email.utils
import errno
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

try:
    from gunicorn.workers.gthread import TConn
    from gunicorn.workers.gthread import ThreadWorker as _GThreadWorker
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'shedder.gunicorn needs gunicorn: pip install "loadshedder[gunicorn]"'
    ) from None

from ._core.errors import Overloaded
from ._core.throttler import Permit, Waiting
from .wsgi import LoadSheddingMiddleware, _too_few_threads

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ThreadWorker", "find_middleware"]

# Bytes peeked at to read the request line and headers: gunicorn's default limits allow longer
# heads, which simply take the normal path (the middleware decides in the thread).
_PEEK_BYTES = 8192
# How long a new connection may take to send its first bytes before gunicorn's own handling
# (a thread waits for them, then the poller) takes over: gunicorn's worker data timeout.
_FIRST_BYTES_WAIT = 5.0
# A refused connection is half-closed, then drained for this long (or this much) before it is
# closed: closing with unread request bytes would send a reset that can destroy the 503.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 65536
_REFUSAL_CACHE_SIZE = 1024
# New connections taken per wake-up of the listener: one poll, one heartbeat and one pass over
# the timeouts for up to this many, which is what lets refusals keep up when they pile up. Small
# enough that the other events (threads handing connections back) wait at most a few ms.
_ACCEPT_BATCH = 32
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
_NOW = int(socket.MSG_DONTWAIT)
_ACCEPT_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED, errno.EINTR)
_ATTRIBUTES = ("app", "wsgi_app", "application", "__wrapped__")


def find_middleware(app: object) -> LoadSheddingMiddleware | None:
    """The outermost :class:`~shedder.wsgi.LoadSheddingMiddleware` inside the WSGI ``app``.

    Searched breadth-first through the attributes ``app`` (wrapping middlewares), ``wsgi_app``
    (Flask), ``application`` and ``__wrapped__``; None if there is none.
    """
    queue = [app]
    seen: set[int] = set()
    while queue and len(seen) < 64:
        candidate = queue.pop(0)
        if id(candidate) in seen:
            continue
        seen.add(id(candidate))
        if isinstance(candidate, LoadSheddingMiddleware):
            return candidate
        for name in _ATTRIBUTES:
            try:
                inner = getattr(candidate, name, None)
            except Exception:  # a property of someone else's object may raise anything
                continue
            if inner is not None:
                queue.append(inner)
    return None


class _Ticket:
    """What the main thread decided for one request, carried to the thread that serves it."""

    __slots__ = ("deadline", "decision", "enqueued", "started", "taken")

    def __init__(self, decision: Permit | Waiting | None, deadline: float | None) -> None:
        self.decision = decision
        self.deadline = deadline
        self.enqueued = time.monotonic()
        self.started = self.enqueued
        self.taken = decision is None  # the middleware took the decision over

    def settle(self) -> None:
        """Give back a decision nobody took: the connection died or the app was never called."""
        decision, self.decision = self.decision, None
        if isinstance(decision, Waiting):
            decision.cancel()
        elif isinstance(decision, Permit):
            decision.release("ignore")  # the request never ran: no latency sample


class _Linger:
    """A refused socket draining before it closes: until when, and how much it has read."""

    __slots__ = ("drained", "until")

    def __init__(self, until: float) -> None:
        self.until = until
        self.drained = 0


class _Head:
    """The parts of a peeked request head that admission and a refusal need."""

    __slots__ = ("headers", "length", "method", "path")

    def __init__(self, method: bytes, path: str, headers: dict[str, str], length: int) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        # Bytes of the head if it is complete and announces no body, else 0: only then can a
        # refusal close the connection at once (nothing more is coming to cause a reset).
        self.length = length


def _header_needles(names: Iterable[str]) -> tuple[tuple[str, bytes], ...]:
    """What :func:`_parse_head` looks for to find each of the (lower-case) header ``names``."""
    return tuple((name, b"\n" + name.encode("latin-1") + b":") for name in names)


def _parse_head(
    data: bytes, needles: tuple[tuple[str, bytes], ...], script_name: str
) -> _Head | None:
    """The request's method, ``PATH_INFO`` and wanted headers (``needles``, from
    :func:`_header_needles`), or None to take the normal path (head incomplete, not HTTP/1.x,
    or a request target this worker does not interpret)."""
    end = data.find(b"\n")
    if end < 0:
        return None
    parts = data[:end].rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None  # HTTP/2 prior knowledge ("PRI * HTTP/2.0"), junk: gunicorn's business
    method, target = parts[0], parts[1]
    if not target.startswith(b"/"):
        scheme = target.find(b"://")
        if scheme < 0:
            return None  # "*" (OPTIONS) or an authority (CONNECT)
        slash = target.find(b"/", scheme + 3)
        target = b"/" if slash < 0 else target[slash:]
    if b"?" in target:
        target = target.split(b"?", 1)[0]
    if b"#" in target:
        target = target.split(b"#", 1)[0]
    # What gunicorn puts in PATH_INFO.
    path = (unquote_to_bytes(target) if b"%" in target else target).decode("latin-1")
    if script_name:
        if not path.startswith(script_name):
            return None  # gunicorn refuses it; let it
        path = path[len(script_name) :]
    block_end = data.find(b"\r\n\r\n", end - 1)
    length = block_end + 4
    if block_end < 0:
        block_end = data.find(b"\n\n", end)
        length = block_end + 2
    if block_end < 0:
        if needles:
            return None  # headers still arriving: the middleware reads them in the thread
        return _Head(method, path, {}, 0)
    # From the request line's end: each header line starts with a newline. Field names admit
    # no whitespace before the colon (RFC 9112), so one search per wanted name finds it.
    lowered = data[end:block_end].lower()
    if b"\ncontent-length:" in lowered or b"\ntransfer-encoding:" in lowered:
        length = 0  # a body may follow (or not: a refusal lingers either way)
    headers: dict[str, str] = {}
    for name, needle in needles:
        at = lowered.rfind(needle)  # the last one, as before
        if at >= 0:
            start = end + at + len(needle)
            stop = data.find(b"\n", start)  # there is one: the head's end
            headers[name] = data[start:stop].strip().decode("latin-1")
    return _Head(method, path, headers, length)


def _encode_refusal(
    status: str, headers: tuple[tuple[str, str], ...], body: bytes, head_only: bool
) -> bytes:
    lines = [f"HTTP/1.1 {status}"]
    lines += [f"{name}: {value}" for name, value in headers if name.lower() != "connection"]
    lines += [f"date: {email.utils.formatdate(usegmt=True)}", "connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + (b"" if head_only else body)


class ThreadWorker(_GThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, admitting each request before its thread pool.

    ``gunicorn -k shedder.gunicorn.ThreadWorker``; everything else (keep-alive, graceful
    shutdown, ``max_requests``, TLS) is gthread's. Requests whose head cannot be read at once
    (TLS, HTTP/2, a head longer than 8 KiB or still arriving) and apps with a ``classify``
    callable take the normal path: the middleware decides in the thread. Size ``threads`` to
    at least ``max_concurrency + max_queue`` (``max_queue`` per priority class when requests
    are classified) plus a few for health checks: the worker warns at start-up otherwise.
    """

    wsgi: WSGIApplication  # gunicorn's loaded app (set by load_wsgi)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shedder_middleware: LoadSheddingMiddleware | None = None
        """The middleware whose throttler admits requests (None: plain gthread)."""
        self._header_needles: tuple[tuple[str, bytes], ...] = ()
        self._script_name = ""
        self._local = threading.local()
        # Connections (insertion-ordered, so oldest first) and when each stops waiting.
        self._awaiting: dict[Any, float] = {}  # new ones, until their first bytes arrive
        self._lingering: dict[Any, _Linger] = {}  # refused sockets, draining before close
        # id(encoded refusal) -> (that refusal, its bytes, its bytes without the body)
        self._refusals: dict[int, tuple[Any, bytes, bytes]] = {}
        self._refusals_date = 0
        self._listeners: dict[Any, tuple[Any, ...]] = {}

    # -- start-up ---------------------------------------------------------------------------------

    def load_wsgi(self) -> None:
        super().load_wsgi()
        middleware = find_middleware(self.wsgi)
        if middleware is None:
            self.log.warning(
                "shedder.gunicorn.ThreadWorker found no shedder.wsgi.LoadSheddingMiddleware"
                " in the app (looked through .app, .wsgi_app, .application, __wrapped__):"
                " serving as plain gthread, refusing nothing early"
            )
            return
        middleware._publish()  # this worker counts in the instance's health from now on
        middleware._server_admits = True  # it finds our decisions in environ["shedder.admission"]
        classified = not middleware._gate.deferrable
        warning = _too_few_threads(middleware.throttler, self.cfg.threads, "gunicorn", classified)
        if warning is not None:
            self.log.warning(warning)
        names = middleware._early_header_names
        if names is None or self.cfg.is_ssl:
            self.log.info(
                "shedder: %s, so the middleware admits each request in its thread",
                "TLS" if self.cfg.is_ssl else "a classify callable needs the whole request",
            )
            return
        self.shedder_middleware = middleware
        self._header_needles = _header_needles(names)
        self._script_name = _script_name(self.cfg)
        self.wsgi = _with_tickets(self.wsgi, self._local)
        for listener in self.sockets:
            _defer_accept(listener)

    # -- the main thread: admission when a connection becomes readable ----------------------------

    def accept(self, *args: Any) -> None:
        """Take up to :data:`_ACCEPT_BATCH` new connections and decide each at once.

        A connection whose request is already here is admitted or refused before it becomes a
        gunicorn connection object: a refusal costs the accept, one peek, the send, one read
        and the close. One that has not spoken yet waits on the poller.
        """
        middleware = self.shedder_middleware
        if middleware is None:
            super().accept(*args)
            return
        listener = args[-1]  # gthread < 24 passes (server address, listener)
        entry = self._listeners.get(listener)
        if entry is None:
            raw = getattr(listener, "sock", listener)  # gunicorn wraps the socket object
            entry = (raw._accept, raw.family, raw.type, raw.proto, listener.getsockname())
            self._listeners[listener] = entry
        accept, family, kind, proto, server = entry
        for _ in range(max(1, min(_ACCEPT_BATCH, self.worker_connections - self.nr_conns))):
            try:
                fd, client = accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY:
                    return  # none left (or that one gave up): back to the poller
                raise
            self.nr_conns += 1
            self._accepted(socket.socket(family, kind, proto, fd), client, server, middleware)

    def _accepted(
        self,
        sock: socket.socket,
        client: Any,
        server: Any,
        middleware: LoadSheddingMiddleware,
    ) -> None:
        try:
            data = sock.recv(_PEEK_BYTES, _PEEK_NOW)
        except BlockingIOError:
            data = b""
        except OSError:  # reset before it spoke: nothing to answer
            self._close_socket(sock)
            return
        ticket = None
        if data:
            head = _parse_head(data, self._header_needles, self._script_name)
            if head is not None and not middleware._never_throttled(head.path):
                decision, deadline = middleware._admit_early(
                    head.headers, client[0] if isinstance(client, tuple) else None
                )
                if isinstance(decision, Overloaded):
                    self._refuse(sock, b"", head, middleware, decision)
                    return
                ticket = _Ticket(decision, deadline)
        conn = TConn(self.cfg, sock, client, server)
        if not data:
            self._await_first_bytes(conn)  # decide once it speaks
            return
        self._submit(conn, _Ticket(None, None) if ticket is None else ticket)

    def enqueue_req(self, conn: Any) -> None:
        middleware = self.shedder_middleware
        if middleware is None or getattr(conn, "is_http2", False):
            super().enqueue_req(conn)
            return
        buffered = _buffered(conn)
        data = buffered
        if b"\n" not in data:
            try:
                data += conn.sock.recv(_PEEK_BYTES, _PEEK_NOW)
            except BlockingIOError:
                if not data and conn not in self._awaiting and not conn.initialized:
                    self._await_first_bytes(conn)  # just accepted: decide once it speaks
                    return
            except OSError:
                pass  # gunicorn finds the error itself
        head = _parse_head(data, self._header_needles, self._script_name) if data else None
        if head is None or middleware._never_throttled(head.path):
            self._submit(conn, _Ticket(None, None))  # the middleware serves or decides it
            return
        client = conn.client[0] if isinstance(conn.client, tuple) else None
        decision, deadline = middleware._admit_early(head.headers, client)
        if isinstance(decision, Overloaded):
            self._refuse(conn.sock, buffered, head, middleware, decision)
            return
        self._submit(conn, _Ticket(decision, deadline))

    def _submit(self, conn: Any, ticket: _Ticket) -> None:
        conn.shedder_ticket = ticket
        conn.data_ready = True  # gthread >= 24: no need to wait for bytes already here
        try:
            super().enqueue_req(conn)
        except BaseException:
            conn.shedder_ticket = None
            ticket.settle()
            raise

    def _refuse(
        self,
        sock: socket.socket,
        buffered: bytes,
        head: _Head,
        middleware: LoadSheddingMiddleware,
        refusal: Overloaded,
    ) -> None:
        """Answer the refusal on the socket and close it: no thread used.

        ``buffered`` is what gunicorn's parser already read of the request. If the head is
        complete, announces no body and is all that arrived, the connection closes at once
        (nothing unread, nothing more coming: a clean FIN); otherwise it is half-closed and
        drained before it closes, as closing with unread bytes sends a reset that can destroy
        the 503.
        """
        encoded = middleware._refusal(refusal)
        head_only = head.method == b"HEAD"
        raw = self._encoded_refusal(encoded, head_only)
        try:
            # A fresh or idle connection's send buffer is empty: this small answer fits at once.
            sock.send(raw, _NOW)
        except OSError:
            self._close_socket(sock)
            return
        if head.length:
            try:
                drained = len(sock.recv(_LINGER_BYTES, _NOW))
            except BlockingIOError:
                drained = 0  # the parser had read it all
            except OSError:  # reset: nobody left to answer
                self._close_socket(sock)
                return
            if len(buffered) + drained == head.length:
                self._close_socket(sock)
                return
        self._linger(sock)

    def _encoded_refusal(
        self, encoded: tuple[str, tuple[tuple[str, str], ...], bytes], head_only: bool
    ) -> bytes:
        """The refusal's bytes on the wire, cached for the second its ``Date`` names."""
        now = int(time.time())
        if now != self._refusals_date:  # the Date header changes every second
            self._refusals.clear()
            self._refusals_date = now
        # The gate shares one encoded refusal per kind: most lookups hit by identity.
        cached = self._refusals.get(id(encoded))
        if cached is not None and cached[0] is encoded:
            return cached[2] if head_only else cached[1]
        status, headers, body = encoded
        full = _encode_refusal(status, headers, body, head_only=False)
        bare = _encode_refusal(status, headers, body, head_only=True)
        if len(self._refusals) < _REFUSAL_CACHE_SIZE:
            self._refusals[id(encoded)] = (encoded, full, bare)
        return bare if head_only else full

    def _on_linger(self, sock: Any) -> None:
        linger = self._lingering.get(sock)
        if linger is None:  # pragma: no cover - unregistered with its entry
            return
        try:
            data = sock.recv(_LINGER_BYTES, _NOW)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        linger.drained += len(data)
        if data and linger.drained < _LINGER_BYTES:
            return
        del self._lingering[sock]
        self._unregister(sock)
        self._close_socket(sock)

    def _await_first_bytes(self, conn: Any) -> None:
        self._awaiting[conn] = time.monotonic() + _FIRST_BYTES_WAIT
        with self._poller_lock():
            self.poller.register(
                conn.sock, selectors.EVENT_READ, partial(self._on_first_bytes, conn)
            )

    def _on_first_bytes(self, conn: Any, sock: Any) -> None:
        del self._awaiting[conn]
        self._unregister(sock)
        self.enqueue_req(conn)

    def murder_keepalived(self, *args: Any, **kwargs: Any) -> None:
        super().murder_keepalived(*args, **kwargs)
        force = bool(args and args[0]) or bool(kwargs.get("force"))
        # Both dicts are in order of their deadlines: stop at the first one still running.
        awaiting = self._awaiting
        if awaiting:
            now = time.monotonic()
            while awaiting:
                conn = next(iter(awaiting))
                if awaiting[conn] > now and not force:
                    break
                del awaiting[conn]
                self._unregister(conn.sock)
                if force:
                    self._close_socket(conn.sock)
                else:
                    super().enqueue_req(conn)  # silent so far: gunicorn's own timeouts take over
        lingering = self._lingering
        if lingering:
            now = time.monotonic()
            while lingering:
                sock = next(iter(lingering))
                if lingering[sock].until > now and not force:
                    break
                del lingering[sock]
                self._unregister(sock)
                self._close_socket(sock)

    def finish_request(self, *args: Any) -> None:
        """gthread's, except that a connection that ends is drained on the poller.

        gthread >= 24 half-closes it and then waits, blocking the main thread, until the
        client closes too (up to 2 s): under overload that stalls every refusal behind one
        slow client. Here it is half-closed and left to :meth:`_on_linger`.
        """
        if self.shedder_middleware is not None and len(args) == 2:
            conn, future = args
            if not future.cancelled() and future.exception() is None and future.result() is False:
                self._linger(conn.sock)
                return
        super().finish_request(*args)

    def _linger(self, sock: Any) -> None:
        """Half-close ``sock`` and drain it on the poller until the client closes too."""
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_socket(sock)
            return
        self._lingering[sock] = _Linger(time.monotonic() + _LINGER_SECONDS)
        with self._poller_lock():
            self.poller.register(sock, selectors.EVENT_READ, self._on_linger)

    def _close_socket(self, sock: Any) -> None:
        self.nr_conns -= 1
        try:
            sock.close()
        except OSError:
            pass

    def _unregister(self, sock: Any) -> None:
        with self._poller_lock():
            try:
                self.poller.unregister(sock)
            except (KeyError, ValueError, OSError):
                pass  # already gone with the socket

    def _poller_lock(self) -> AbstractContextManager[Any]:
        # gthread < 24 touches its poller from pool threads too, under this lock.
        lock = getattr(self, "_lock", None)
        return nullcontext() if lock is None else lock

    # -- the pool's threads -----------------------------------------------------------------------

    def handle(self, conn: Any) -> Any:
        ticket = getattr(conn, "shedder_ticket", None)
        if ticket is not None:
            ticket.started = time.monotonic()
        try:
            return super().handle(conn)
        finally:
            ticket = getattr(conn, "shedder_ticket", None)
            if ticket is not None:  # the request never reached handle_request
                conn.shedder_ticket = None
                ticket.settle()

    def handle_request(self, req: Any, conn: Any) -> Any:
        ticket = getattr(conn, "shedder_ticket", None)
        conn.shedder_ticket = None
        self._local.ticket = ticket
        try:
            return super().handle_request(req, conn)
        finally:
            self._local.ticket = None
            if ticket is not None and not ticket.taken:
                ticket.settle()


def _with_tickets(app: WSGIApplication, local: threading.local) -> WSGIApplication:
    """``app``, receiving in its environ the decision the main thread made for the request."""

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        ticket: _Ticket | None = getattr(local, "ticket", None)
        if ticket is None:
            return app(environ, start_response)
        local.ticket = None
        environ["shedder.queued_in_server"] = ticket.started - ticket.enqueued
        if ticket.decision is None:
            return app(environ, start_response)
        environ["shedder.admission"] = ticket.decision
        if ticket.deadline is not None:
            environ["shedder.deadline"] = ticket.deadline
        try:
            return app(environ, start_response)
        finally:
            # The middleware removes the key when it takes the decision over.
            ticket.taken = "shedder.admission" not in environ

    return serve


def _defer_accept(listener: Any) -> None:
    """Have the kernel hand over a TCP connection only once its first bytes are there (Linux),
    so that a new connection is decided when it is accepted instead of waiting on the poller;
    one silent for :data:`_FIRST_BYTES_WAIT` is accepted anyway and waits as before."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None or getattr(listener, "family", None) not in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        return
    try:
        listener.setsockopt(socket.IPPROTO_TCP, option, int(_FIRST_BYTES_WAIT))
    except OSError:  # pragma: no cover - not every TCP stack has it
        pass


def _buffered(conn: Any) -> bytes:
    """Bytes gunicorn's parser already read from the socket (read ahead after a request)."""
    buffer = getattr(getattr(conn.parser, "unreader", None), "buf", None)
    getvalue: Callable[[], bytes] | None = getattr(buffer, "getvalue", None)
    return b"" if getvalue is None else getvalue()


def _script_name(cfg: Any) -> str:
    env = getattr(cfg, "env", None) or {}
    return str(env.get("SCRIPT_NAME") or os.environ.get("SCRIPT_NAME", ""))
