"""WSGI (PEP 3333) middleware: admission control in front of any WSGI app.

``app.wsgi_app = LoadSheddingMiddleware(app.wsgi_app, max_concurrency=8)`` in Flask, or wrap
``application`` in Django's ``wsgi.py``. No dependency beyond the standard library.
"""

from __future__ import annotations

import logging
import os
import queue
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from time import monotonic
from typing import TYPE_CHECKING, Any

from ._core.errors import Overloaded
from ._core.throttler import Outcome, Permit, Throttler, Waiting
from ._core.wire import _DEADLINE
from ._web.gate import (
    Request,
    default_outcome,
)
from ._web.http import (
    HTTPResponse,
    health_response,
    live_response,
    method_not_allowed_response,
    path_matches,
)
from ._web.settings import MiddlewareOptions, middleware_settings

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from typing_extensions import Unpack

__all__ = ["LoadSheddingMiddleware"]

logger = logging.getLogger("shedder")

_READ_METHODS = ("GET", "HEAD")

# Markers in LoadSheddingMiddleware._special: an exact exempt path, or a path not in it.
_EXEMPT = None
_THROTTLED: Any = object()


class LoadSheddingMiddleware:
    """Admit, queue or refuse each request before it reaches ``app``.

    Args:
        app: the WSGI application to protect.
        throttler: the :class:`~shedder.Throttler` to use; or leave it out and pass its
            keyword arguments (``max_concurrency=...``, ``max_queue=...``, ...) instead.
        health_path: where to serve ``/health/load`` (GET and HEAD, never throttled);
            ``None`` disables it. Matched against ``PATH_INFO`` (the path inside the app).
        exempt: paths never throttled: exact paths, or prefixes ending in ``/`` or ``*``.
        status_code: 503 (default) or 429 for refusals.
        responder: builds the refusal response (a :class:`shedder.HTTPResponse`) from the
            :class:`~shedder.Overloaded` instead of the default JSON body; one that takes a
            ``request`` keyword also gets the framework-free :class:`shedder.Request`.
        health_throttlers: more throttlers for the health endpoint to report (for example
            the ones guarding individual views).
        metrics_path: where to serve the Prometheus exposition (needs the ``prometheus``
            extra; ``ImportError`` at construction if it is missing). ``None``: not served.
        metrics_registry: the ``prometheus_client`` registry to expose (default: global).
        live_path: where to serve the liveness answer: always 200, whatever the load, never
            throttled (for Kubernetes liveness and readiness probes); ``None`` disables it.
        instance_dir: a directory shared by the worker processes of this instance (and
            nothing else) so ``/health/load`` reports the whole instance, summed over the
            live workers; default: ``$SHEDDER_INSTANCE_DIR`` if set, else this process only.
            ``ValueError`` if the directory does not exist.
        classify: ``classify(request) -> shedder.Classification`` (priority class and flow) for
            each request, from a framework-free :class:`shedder.Request` view.
        priority_header: a request header naming the priority class (``x-priority:
            critical``), honoured only from ``trusted_peers``; an unknown value, or one from
            any other peer, leaves the request in the default class.
        trusted_peers: addresses or networks (``"10.0.0.0/8"``) of the proxies and gateways
            whose priority header and long deadlines are believed.
        deadlines: where request deadlines come from (:class:`shedder.Deadlines`; default:
            ``grpc-timeout``, ``x-envoy-expected-rq-timeout-ms`` and ``x-request-start``);
            None ignores them all. A request waits for a slot at most until its deadline, is
            refused with ``"deadline_exceeded"`` when that passes (or had passed on arrival),
            and the app finds the deadline (``time.monotonic()`` seconds) in
            ``environ["shedder.deadline"]`` and the time left in
            ``environ["shedder.permit"].remaining()``.
        outcome: ``outcome(status, error) -> "success" | "ignore" | "dropped"``: how each
            admitted request's work ended, told to a limit algorithm. Default: an exception or
            a 5xx is ``"ignore"`` (a fast failure is no latency sample).

    A slot is held from admission until the server calls the response iterable's
    ``close()``, so a streaming response counts for as long as it streams. Waiting for a
    slot blocks the server's worker thread for at most ``queue_timeout`` seconds: size the
    server's thread pool to hold ``max_concurrency + max_queue`` requests and a few more.
    The app finds the request's :class:`~shedder.Permit` in ``environ["shedder.permit"]``.
    A server worker that already admitted the request (``shedder.gunicorn``) passes its
    :class:`~shedder.Permit` or :class:`~shedder.Waiting` in ``environ["shedder.admission"]``
    (and its deadline in ``"shedder.deadline"``); the middleware removes the key when it takes
    the decision over, and the worker settles any decision left there. Under waitress, a
    WARNING on the first request says if ``threads`` is too small to ever shed.
    """

    def __init__(
        self,
        app: WSGIApplication,
        throttler: Throttler | None = None,
        **options: Unpack[MiddlewareOptions],
    ) -> None:
        settings = middleware_settings(throttler, options)
        health_path, metrics_path = settings.health_path, settings.metrics_path
        live_path, metrics_registry = settings.live_path, settings.metrics_registry
        self.app = app
        self.throttler = settings.throttler
        self.health_path = health_path
        self.metrics_path = metrics_path
        self.live_path = live_path
        self._exact, self._prefixes = settings.exempt_exact, settings.exempt_prefixes
        self._gate = settings.gate(_encode)
        self._classify = self._gate.classify
        self._wants_request = self._gate.responder_wants_request
        # The quick lane, as in the ASGI middleware: a full throttler refuses before any
        # header is read when admission reads nothing but deadlines.
        quick = self._gate.quick_lane()
        self._quick: Callable[[], tuple[str, tuple[tuple[str, str], ...], bytes] | None] | None = (
            None
        )
        self._quick_refusal: Overloaded | None = None
        if quick is not None:
            self._quick, self._quick_refusal = quick
        self._shed_log = self._gate.shed_log
        self._throttler_admit = self.throttler.admit
        # Header name -> its environ key, for the headers the gate reads.
        self._wanted = {
            name: "HTTP_" + name.upper().replace("-", "_") for name in self._gate.header_names
        }
        self._wanted_keys = tuple(self._wanted.values())
        self._outcome = self._gate.outcome
        # Telling a limit algorithm how each request ended needs the response status, which
        # costs a start_response wrapper per request: only when someone listens.
        self._track_outcome = (
            self.throttler.limit_algorithm is not None
            or self._outcome is not default_outcome
            or self.throttler.retry_after_auto
        )
        self._health_throttlers = settings.health_throttlers
        self._metrics_registry = metrics_registry
        # Imported only when asked for: prometheus_client is an optional extra, and a missing
        # one must fail at start-up, not on the first scrape.
        self._metrics_response: Callable[[str | None], HTTPResponse] | None = None
        if metrics_path is not None:
            from .prometheus import metrics_endpoint

            self._metrics_response = metrics_endpoint(settings.health_throttlers, metrics_registry)
        self._not_allowed = method_not_allowed_response(_READ_METHODS)
        self._orphans = _Reclaimer()
        self._live = live_response()
        # path -> builder of the endpoint's response, or _EXEMPT for an exact exempt path: the
        # paths never throttled, found with one lookup per request.
        self._special: dict[str, Callable[[WSGIEnvironment], HTTPResponse] | None] = dict.fromkeys(
            self._exact, _EXEMPT
        )
        for endpoint, build in (
            (metrics_path, self._metrics),
            (health_path, self._health),
            (live_path, self._alive),
        ):
            if endpoint is not None:
                self._special[endpoint] = build
        self._table = settings.table
        self._server_checked = False  # the server's thread count, checked on the first request
        # Set by shedder.gunicorn's worker, which admits before the app and passes its decision
        # in environ["shedder.admission"]: no other server does, so no lookup without it.
        self._server_admits = False

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self._orphans.pending:  # one flag for the rare work: see _chores
            self._chores(environ)
        path = environ.get("PATH_INFO") or "/"
        special = self._special.get(path, _THROTTLED)
        if special is not _THROTTLED:
            if special is _EXEMPT:
                return self.app(environ, start_response)
            return self._serve(environ, start_response, special)
        if self._prefixes and path.startswith(self._prefixes):
            return self.app(environ, start_response)

        # Decided before the app sees the request; a refused request never reaches it.
        # Already admitted (or queued) by the server's worker, if it is shedder's.
        decision = environ.get("shedder.admission") if self._server_admits else None
        if decision is None and self._quick is not None:
            answer = self._quick()  # the refusal of a full throttler, before any header is read
            if answer is not None:
                log = self._shed_log  # logged as Gate.refusal does, inline
                if monotonic() < log._next:
                    log._suppressed += 1
                else:
                    log(self._quick_refusal)  # type: ignore[arg-type]
                status, headers, body = answer
                start_response(status, [*headers])  # a fresh list, as in _refuse()
                return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]
        deadline = None
        if decision is not None and getattr(decision, "_throttler", None) is self.throttler:
            # Ours now: removing it tells the worker not to release or cancel it itself.
            del environ["shedder.admission"]
            deadline = environ.get("shedder.deadline")
        else:
            for key in self._wanted_keys:  # a loop, not any(genexpr): this runs per request
                if key in environ:
                    decision, deadline = self._admit(environ)
                    break
            else:
                if self._classify is None:
                    decision = self._throttler_admit()
                else:
                    decision, deadline = self._admit(environ)
        if type(decision) is Waiting:
            try:
                decision = decision.wait()
                decision.deadline = deadline  # a grant after a wait does not carry it
            except Overloaded as refusal:
                decision = refusal
        if type(decision) is Overloaded:
            return self._refuse(decision, environ, start_response)
        permit: Permit = decision  # type: ignore[assignment]  # exact-type checks above
        environ["shedder.permit"] = permit
        if deadline is not None:
            environ["shedder.deadline"] = deadline
        if self._track_outcome:
            return self._call_tracked(permit, deadline, environ, start_response)
        token = None if deadline is None else _DEADLINE.set(deadline)
        try:
            result = self.app(environ, start_response)
        except BaseException as error:
            permit.release(self._outcome(None, error))
            raise
        finally:
            if token is not None:
                _DEADLINE.reset(token)
        return _hold_until_close(result, permit, environ, self._orphans, None)

    def _refuse(
        self, refusal: Overloaded, environ: WSGIEnvironment, start_response: StartResponse
    ) -> list[bytes]:
        view = self._request_view(environ) if self._wants_request else None
        status, headers, body = self._gate.refusal(refusal, view)
        # A fresh header list each time: an outer middleware may append to it.
        start_response(status, [*headers])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    def _chores(self, environ: WSGIEnvironment) -> None:
        """The rare work of the request path, behind the one flag ``_orphans.pending``: give
        back orphaned slots; in a new process (the first request, and after a fork), publish
        to the instance table and check the server's thread count."""
        self._orphans.reclaim()
        if self._table is not None:
            # In the serving process (after any fork), not at construction: see publish_all.
            self._table.publish_all(self._health_throttlers)
        if not self._server_checked:
            self._server_checked = True
            threads = _waitress_threads(environ)
            warning = (
                None
                if threads is None
                else _too_few_threads(
                    self.throttler, threads, "waitress", not self._gate.deferrable
                )
            )
            if warning is not None:
                logger.warning(warning)

    # -- for server workers that decide before the environ exists (shedder.gunicorn) ------------

    def _never_throttled(self, path: str) -> bool:
        """True for a ``PATH_INFO`` this middleware serves itself or passes through unthrottled."""
        return path_matches(path, self._special, self._prefixes)  # the paths __call__ serves

    @property
    def _early_header_names(self) -> tuple[str, ...] | None:
        """The headers admission reads (lower-case), or None if it needs the whole request."""
        return None if self._classify is not None else self._gate.header_names

    def _admit_early(
        self, headers: Mapping[str, str], client: str | None
    ) -> tuple[Permit | Overloaded | Waiting, float | None]:
        """The decision (and deadline) for a request seen only as its head, as ``__call__``
        would make it from ``headers`` (those of :attr:`_early_header_names` present);
        pass both on in ``environ["shedder.admission"]`` and ``environ["shedder.deadline"]``.
        """
        if not headers:
            return self.throttler.admit(), None
        return self._gate.admit(headers.get, client, None, "thread")

    def _refusal(self, refusal: Overloaded) -> tuple[str, tuple[tuple[str, str], ...], bytes]:
        """The refusal response (status line, headers, body), logged like ``__call__``'s."""
        return self._gate.refusal(refusal)

    def _publish(self) -> None:
        """Publish this process's figures to the instance table (once per process)."""
        if self._table is not None:
            self._table.publish_all(self._health_throttlers)

    def _admit(
        self, environ: WSGIEnvironment
    ) -> tuple[Permit | Overloaded | Waiting, float | None]:
        """The gate's decision from the headers it reads and the peer."""
        wanted = self._wanted

        def get(name: str) -> str | None:
            return environ.get(wanted[name])

        request = None
        if self._classify is not None:

            def request() -> Request:
                return self._request_view(environ)

        return self._gate.admit(get, environ.get("REMOTE_ADDR"), request, "thread")

    @staticmethod
    def _request_view(environ: WSGIEnvironment) -> Request:
        """The framework-free view of the request, for ``classify`` and responders."""
        return Request(
            environ.get("REQUEST_METHOD", "GET"),
            environ.get("PATH_INFO") or "/",
            environ.get("REMOTE_ADDR"),
            lambda: _headers_of(environ),
            environ,
        )

    def _call_tracked(
        self,
        permit: Permit,
        deadline: float | None,
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        """Run the app, noting the response status for the permit's outcome."""
        seen: list[int] = []

        def start(status: str, headers: Any, exc_info: Any = None) -> Any:
            seen[:] = [_status_code_of(status)]
            return start_response(status, headers, exc_info)

        token = None if deadline is None else _DEADLINE.set(deadline)
        try:
            result = self.app(environ, start)
        except BaseException as error:
            permit.release(self._outcome(seen[0] if seen else None, error))
            raise
        finally:
            if token is not None:
                _DEADLINE.reset(token)
        outcome = self._outcome

        def outcome_of() -> Outcome:
            return outcome(seen[0] if seen else None, None)

        return _hold_until_close(result, permit, environ, self._orphans, outcome_of)

    # -- endpoints ------------------------------------------------------------------------------

    def _serve(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        build: Callable[[WSGIEnvironment], HTTPResponse],
    ) -> list[bytes]:
        self._orphans.reclaim()  # so the figures reported are true
        if environ.get("REQUEST_METHOD", "GET") not in _READ_METHODS:
            return _send(self._not_allowed, environ, start_response)
        return _send(build(environ), environ, start_response)

    def _health(self, environ: WSGIEnvironment) -> HTTPResponse:
        return health_response(self._health_throttlers, self._table)

    def _alive(self, environ: WSGIEnvironment) -> HTTPResponse:
        return self._live

    def _metrics(self, environ: WSGIEnvironment) -> HTTPResponse:
        if self._metrics_response is None:  # pragma: no cover - metrics_path implies it
            raise RuntimeError("metrics_response was not loaded")
        return self._metrics_response(environ.get("HTTP_ACCEPT"))


def _too_few_threads(
    throttler: Throttler, threads: int, server: str, classified: bool = False
) -> str | None:
    """The warning to log if ``threads`` cannot hold every request the throttler may hold:
    ``max_concurrency + max_queue``, and ``max_queue`` more for each further priority class
    when requests are ``classified`` (each class has a room of its own).

    A WSGI request holds a server thread while it runs and while it waits for a slot, so with
    fewer threads the excess waits inside the server, invisible to the throttler, which then
    never queues or sheds. None when the threads suffice.
    """
    rooms = len(throttler.priorities) if classified else 1
    needed = throttler.max_concurrency + throttler.max_queue * rooms
    if threads >= needed:
        return None
    held = f"max_concurrency + max_queue = {throttler.max_concurrency} + {throttler.max_queue}"
    if rooms > 1:
        held = (
            f"max_concurrency + max_queue x {rooms} classes"
            f" = {throttler.max_concurrency} + {throttler.max_queue} x {rooms}"
        )
    return (
        f"{server} runs {threads} threads but throttler {throttler.name!r} admits"
        f" {held} = {needed} requests: the excess waits inside {server}, where shedder cannot"
        f" see it, so it sheds late or never. Fix: run {server} with threads={needed} or more"
        " (and a few spare for health checks), or lower max_concurrency and max_queue"
    )


def _waitress_threads(environ: WSGIEnvironment) -> int | None:
    """waitress's thread count, from the channel behind ``waitress.client_disconnected``."""
    check = environ.get("waitress.client_disconnected")
    adjustments = getattr(getattr(check, "__self__", None), "adj", None)
    threads = getattr(adjustments, "threads", None)
    return threads if isinstance(threads, int) else None


def _encode(response: HTTPResponse) -> tuple[str, tuple[tuple[str, str], ...], bytes]:
    return response.status_line, response.headers, response.body


def _status_code_of(status: str) -> int:
    try:
        return int(status[:3])
    except ValueError:
        return 0


def _headers_of(environ: WSGIEnvironment) -> dict[str, str]:
    headers = {
        key[5:].replace("_", "-").lower(): value
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").lower()] = environ[key]
    return headers


def _send(
    response: HTTPResponse, environ: WSGIEnvironment, start_response: StartResponse
) -> list[bytes]:
    start_response(response.status_line, list(response.headers))
    if environ.get("REQUEST_METHOD") == "HEAD":
        return []
    return [response.body]


def _after_fork() -> None:
    for reclaimer in list(_RECLAIMERS):
        reclaimer.pending = True  # the child's first request publishes to the instance table


_RECLAIMERS: weakref.WeakSet[_Reclaimer] = weakref.WeakSet()
if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork)


class _Reclaimer:
    """Gives back the slots of responses dropped without ``close()``.

    PEP 3333 servers always call ``close()``, but some callers do not (werkzeug's and Flask's
    test clients leave unbuffered responses open), and a leaked slot would be lost for good.
    A finaliser may run in the middle of any allocation, even one made while the throttler's
    lock is held, so it must not release there: it only queues the permit
    (``SimpleQueue.put`` is reentrant-safe) and the next request releases it.
    """

    __slots__ = ("__weakref__", "_queue", "_warned", "pending")

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Permit] = queue.SimpleQueue()
        self._warned = False
        # Set by orphan(), and in a new process (at first, and after a fork): the request path
        # checks it without a call and then does its rare work (LoadSheddingMiddleware._chores).
        self.pending = True
        _RECLAIMERS.add(self)

    def orphan(self, permit: Permit) -> None:
        """From a finaliser: the response holding ``permit`` is gone."""
        if not permit.released:
            self._queue.put(permit)
            self.pending = True

    def reclaim(self) -> None:
        """Release the orphaned permits; called on the request path, never in a finaliser."""
        self.pending = False  # before draining: an orphan queued meanwhile sets it again
        while not self._queue.empty():
            try:
                permit = self._queue.get_nowait()
            except queue.Empty:  # pragma: no cover - another thread drained it first
                return
            if permit.release() and not self._warned:
                self._warned = True
                logger.warning(
                    "a response was garbage-collected without close(); its slot was reclaimed"
                    " (close responses, or pass buffered=True to test clients)"
                )


def _hold_until_close(
    result: Iterable[bytes],
    permit: Permit,
    environ: WSGIEnvironment,
    orphans: _Reclaimer,
    outcome_of: Callable[[], Outcome] | None,
) -> Iterable[bytes]:
    """Tie the permit's release to ``result.close()``, which the server calls when done.

    ``outcome_of`` says how the request ended (None: ``"success"``), asked at release time.
    """
    file_wrapper = None if type(result) is list else environ.get("wsgi.file_wrapper")
    if isinstance(file_wrapper, type) and isinstance(result, file_wrapper):
        # Servers (gunicorn) use sendfile only for their own file wrapper type: keep the
        # object, and hook the release onto its close() instead of wrapping it.
        inner_close = getattr(result, "close", None)

        def close() -> None:
            try:
                if inner_close is not None:
                    inner_close()
            finally:
                permit.release("success" if outcome_of is None else outcome_of())

        try:
            result.close = close  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            pass  # __slots__ or a read-only close: fall back to wrapping (no sendfile)
        else:
            return result
    return _ReleasingIterable(result, permit, orphans, outcome_of)


class _ReleasingIterable:
    """Forwards the app's iterable and releases the permit on ``close()``, exactly once."""

    __slots__ = ("_closed", "_failed", "_iterable", "_iterator", "_orphans", "_outcome", "_permit")

    def __init__(
        self,
        iterable: Iterable[bytes],
        permit: Permit,
        orphans: _Reclaimer,
        outcome_of: Callable[[], Outcome] | None = None,
    ) -> None:
        self._iterable = iterable
        self._iterator: Iterator[bytes] | None = None
        self._permit = permit
        self._orphans = orphans
        self._outcome = outcome_of
        self._closed = False
        self._failed = False

    def __iter__(self) -> Iterator[bytes]:
        if self._iterator is None:
            self._iterator = iter(self._iterable)
        if self._outcome is None:
            # Nobody learns how the request ended (see _track_outcome), so a body that breaks
            # half-way needs no noting: the server iterates the app's own iterator, at C speed.
            return self._iterator
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            self._iterator = iter(self._iterable)
        try:
            return next(self._iterator)
        except StopIteration:
            raise
        except BaseException:
            self._failed = True  # the body broke half-way: no latency sample
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            inner_close = getattr(self._iterable, "close", None)
            if inner_close is not None:
                inner_close()
        finally:
            if self._failed:
                outcome: Outcome = "ignore"
            else:
                outcome = "success" if self._outcome is None else self._outcome()
            permit = self._permit
            permit._throttler._release(permit, outcome)  # one call less than permit.release

    def __del__(self) -> None:
        if not self._closed:
            self._orphans.orphan(self._permit)
