"""ASGI middleware: admission control in front of any ASGI app (Starlette, FastAPI, ...).

``app.add_middleware(LoadSheddingMiddleware, max_concurrency=8)`` in Starlette and FastAPI, or
``app = LoadSheddingMiddleware(app, throttler=...)`` around any ASGI 3 app. Pure ASGI: no
dependency beyond the standard library; the waiting uses asyncio.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from ._core.checks import check_bool
from ._core.errors import Overloaded
from ._core.throttler import Permit, Throttler, ThrottlerOptions, Waiting
from ._core.wire import _DEADLINE
from ._web.gate import Request, default_outcome
from ._web.http import (
    HTTPResponse,
    health_response,
    live_response,
    method_not_allowed_response,
)
from ._web.settings import MiddlewareOptions, middleware_settings

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["WATCH_BODY_LIMIT", "ASGIApp", "LoadSheddingMiddleware", "ThrottlerOptions"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

WATCH_BODY_LIMIT = 64 * 1024
"""Bytes of request body a queued request may buffer while it watches for a disconnect.

See :class:`LoadSheddingMiddleware`: past this, the request stops watching and simply waits.
"""


_READ_METHODS = ("GET", "HEAD")
# Messages that may end a response: the slot is freed once the one without more_body is sent.
_BODY_TYPES = frozenset(
    ("http.response.body", "http.response.pathsend", "http.response.zerocopysend")
)
_WS_TRY_AGAIN_LATER = 1013  # RFC 6455 registry: "Try Again Later"
# What one buffered body message costs beyond its bytes (its dict and its place in a list),
# counted against WATCH_BODY_LIMIT; measured at about 245 bytes on CPython 3.11.
_MESSAGE_OVERHEAD = 256

_Headers = list[tuple[bytes, bytes]]

# Markers in LoadSheddingMiddleware._special: an exact exempt path, or a path not in it.
_EXEMPT = None
_THROTTLED: Any = object()


def _asgi_headers(response: HTTPResponse) -> _Headers:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in response.headers]


async def _send_response(
    send: Send, status: int, headers: _Headers, body: bytes, prefix: str = "http"
) -> None:
    # A copy of the (maybe cached) header list: an outer middleware may append to it.
    await send({"type": f"{prefix}.response.start", "status": status, "headers": [*headers]})
    await send({"type": f"{prefix}.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def _discard_permit(waiting: Waiting, task: asyncio.Future[Permit]) -> None:
    """Done-callback of an abandoned acquisition: a slot granted at the last instant goes back.

    A task cancelled before it ever ran never left the queue itself: leave it here.
    """
    if task.cancelled():
        waiting.cancel()  # idempotent: a no-op if the task's own cleanup already ran
    elif task.exception() is None:
        task.result().release("ignore")


def _discard_message(task: asyncio.Future[Message]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


def _replay(
    first: Message | None, pending: asyncio.Future[Message] | None, receive: Receive
) -> Receive:
    """A ``receive`` that hands out what the watch already took, in order, then the rest."""
    state: list[Any] = [first, pending]

    async def replay() -> Message:
        message = state[0]
        if message is not None:
            state[0] = None
            return message  # type: ignore[no-any-return]
        task = state[1]
        if task is not None:
            state[1] = None
            return await task  # type: ignore[no-any-return]
        return await receive()

    return replay


def _encode(response: HTTPResponse) -> tuple[int, _Headers, bytes]:
    return response.status, _asgi_headers(response), response.body


class LoadSheddingMiddleware:
    """Admit, queue or refuse each HTTP request before it reaches ``app``.

    Args:
        app: the ASGI application to protect.
        throttler: the :class:`~shedder.Throttler` to use; or leave it out and pass its
            keyword arguments (``max_concurrency=...``, ``max_queue=...``, ...) instead.
        health_path: where to serve ``/health/load`` (GET and HEAD, never throttled);
            ``None`` disables it. Matched against ``scope["path"]``.
        exempt: paths never throttled: exact paths, or prefixes ending in ``/`` or ``*``.
        status_code: 503 (default) or 429 for refusals.
        responder: builds the refusal response (a :class:`shedder.HTTPResponse`) from the
            :class:`~shedder.Overloaded` instead of the default JSON body; one that takes a
            ``request`` keyword also gets the framework-free :class:`shedder.Request`.
        health_throttlers: more throttlers for the health endpoint to report (for example
            the ones guarding individual routes with :func:`shedder.starlette.shed_load`).
        metrics_path: where to serve the Prometheus exposition (needs the ``prometheus``
            extra; ``ImportError`` at construction if it is missing). ``None``: not served.
        metrics_registry: the ``prometheus_client`` registry to expose (default: global).
        live_path: where to serve the liveness answer: always 200, whatever the load, never
            throttled (for Kubernetes liveness and readiness probes); ``None`` disables it.
        instance_dir: a directory shared by the worker processes of this instance (and
            nothing else) so ``/health/load`` reports the whole instance, summed over the
            live workers; default: ``$SHEDDER_INSTANCE_DIR`` if set, else this process only.
            ``ValueError`` if the directory does not exist.
        limit_websockets: also put websocket connections through the throttler, holding a slot
            for the life of the connection. A refused handshake gets the refusal as an HTTP
            response where the server supports the ``websocket.http.response`` extension
            (uvicorn, hypercorn), else ``websocket.close`` with code 1013 "Try Again Later"
            before accept (which servers turn into an HTTP 403, as the ASGI spec says).
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
            ``scope["shedder.deadline"]`` and the time left in
            ``scope["shedder.permit"].remaining()``.
        outcome: ``outcome(status, error) -> "success" | "ignore" | "dropped"``: how each
            admitted request's work ended, told to a limit algorithm. Default: an exception or
            a 5xx is ``"ignore"`` (a fast failure is no latency sample).

    A slot is held from admission until the message that ends the response body
    (``more_body`` false) has been sent, or the app returns or raises, whichever comes first:
    a streaming response or server-sent events count for as long as they stream. The app finds
    the request's :class:`~shedder.Permit` in ``scope["shedder.permit"]``. ``lifespan`` scopes,
    and websocket scopes unless ``limit_websockets``, pass through untouched.

    A queued request whose client disconnects leaves the queue at once and never runs. To see
    the disconnect it must call ``receive()`` while it waits, and replays what it got to the
    app in order, so nothing is lost. It never does so for a request with
    ``Expect: 100-continue`` (the server would then ask the client to upload a body that may
    be refused); such a request waits without watching, for at most ``queue_timeout``. A
    request with a body buffers at most :data:`WATCH_BODY_LIMIT` bytes while it watches, then
    stops watching. Admission on the fast path (a free slot, nobody waiting) never touches
    ``receive``.
    """

    def __init__(
        self,
        app: ASGIApp,
        throttler: Throttler | None = None,
        *,
        limit_websockets: bool = False,
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
        self.limit_websockets = check_bool("limit_websockets", limit_websockets)
        self._exact, self._prefixes = settings.exempt_exact, settings.exempt_prefixes
        self._health_throttlers = settings.health_throttlers
        self._metrics_registry = metrics_registry
        # Imported only when asked for: prometheus_client is an optional extra, and a missing
        # one must fail at start-up, not on the first scrape.
        self._metrics_response: Callable[[str | None], HTTPResponse] | None = None
        if metrics_path is not None:
            from .prometheus import metrics_endpoint

            self._metrics_response = metrics_endpoint(settings.health_throttlers, metrics_registry)
        # path -> builder of the endpoint's response, or _EXEMPT for an exact exempt path: the
        # paths never throttled, found with one lookup per request.
        self._special: dict[str, Callable[[Scope], HTTPResponse] | None] = dict.fromkeys(
            self._exact, _EXEMPT
        )
        if metrics_path is not None:
            self._special[metrics_path] = self._metrics
        if health_path is not None:
            self._special[health_path] = self._health
        self._live = live_response()
        if live_path is not None:
            self._special[live_path] = self._alive
        self._table = settings.table
        not_allowed = method_not_allowed_response(_READ_METHODS)
        self._not_allowed = (not_allowed.status, _asgi_headers(not_allowed), not_allowed.body)
        self._gate = settings.gate(_encode)
        self._classify = self._gate.classify
        self._wants_request = self._gate.responder_wants_request
        # The quick lane: when admission reads nothing but deadlines, a full throttler refuses
        # before any header is read (no deadline turns that refusal into anything else).
        self._refuse_full = (
            self.throttler._quick_lane(self._gate.rank) if self._gate.deferrable else None
        )
        self._wanted = {name.encode("latin-1"): name for name in self._gate.header_names}
        self._throttler_admit = self.throttler.admit
        self._outcome = self._gate.outcome
        # Noting each response's status only matters to whoever learns from outcomes.
        self._track_outcome = (
            self.throttler.limit_algorithm is not None
            or self._outcome is not default_outcome
            or self.throttler.retry_after_auto
        )

    # -- dispatch -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket" and self.limit_websockets:
                await self._websocket(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if self._table is not None:
            # In the serving process (after any fork), not at construction: see publish_all.
            self._table.publish_all(self._health_throttlers)
        path = scope["path"]
        special = self._special.get(path, _THROTTLED)
        if special is not _THROTTLED:
            if special is _EXEMPT:
                await self.app(scope, receive, send)
            else:
                await self._serve(special, scope, send)
            return
        if self._prefixes and path.startswith(self._prefixes):
            await self.app(scope, receive, send)
            return
        if self._refuse_full is not None:
            refusal = self._refuse_full()
            if refusal is not None:
                view = self._request_view(scope) if self._wants_request else None
                code, headers, body = self._gate.refusal(refusal, view)
                # A fresh header list each time: an outer middleware may append to it.
                await send({"type": "http.response.start", "status": code, "headers": [*headers]})
                await send({"type": "http.response.body", "body": body})
                return

        # One synchronous decision: no task, no future, unless the request really waits.
        deadline = None
        found = None
        if self._wanted:
            for key, value in scope.get("headers", ()):
                name = self._wanted.get(key)
                if name is not None:
                    if found is None:
                        found = {}
                    found[name] = value.decode("latin-1")
        if found is None and self._classify is None:
            decision = self._throttler_admit(waiter="async")
        else:
            decision, deadline = self._admit(scope, found or {})
        pending: asyncio.Future[Message] | None = None
        if type(decision) is not Permit:  # exact types: cheaper than isinstance, never subclassed
            if type(decision) is Overloaded:
                view = self._request_view(scope) if self._wants_request else None
                code, headers, body = self._gate.refusal(decision, view)
                await send({"type": "http.response.start", "status": code, "headers": [*headers]})
                await send({"type": "http.response.body", "body": body})
                return
            waited = await self._wait(decision, scope, receive, send)  # type: ignore[arg-type]
            if waited is None:
                return  # refused (and answered) or the client left (nothing to answer)
            decision, receive, pending = waited

        # Run the app, holding the slot until the response body ends or the app finishes.
        permit: Permit = decision
        release = permit._throttler._release  # one call frame less than permit.release
        outcome = self._outcome
        status: int | None = None
        send_then_release: Send

        if self._track_outcome:

            async def send_then_release(message: Message) -> None:
                nonlocal status
                await send(message)
                kind = message["type"]
                if kind == "http.response.start":
                    status = message["status"]
                elif kind in _BODY_TYPES and not message.get("more_body", False):
                    release(permit, outcome(status, None))

        else:
            # Nobody learns from how requests end (a fixed limit and Retry-After, the default
            # outcome): skip noting the status. An exception is still told as "ignore".

            async def send_then_release(message: Message) -> None:
                await send(message)
                if message["type"] in _BODY_TYPES and not message.get("more_body", False):
                    release(permit, "success")

        scope["shedder.permit"] = permit
        token = None
        if deadline is not None:
            scope["shedder.deadline"] = deadline
            permit.deadline = deadline  # a grant after a wait carries only its latest start
            # So that shedder.client calls made by the app end by this request's deadline.
            token = _DEADLINE.set(deadline)
        try:
            await self.app(scope, receive, send_then_release)
        except BaseException as error:
            release(permit, outcome(status, error))
            raise
        finally:
            if token is not None:
                _DEADLINE.reset(token)
            if pending is not None and not pending.done():
                # The app never asked for the message the watch was waiting for.
                pending.cancel()
                pending.add_done_callback(_discard_message)
        if not permit._released:  # saves taking the lock when the body already freed it
            release(permit, outcome(status, None))

    def _admit(
        self, scope: Scope, found: dict[str, str]
    ) -> tuple[Permit | Overloaded | Waiting, float | None]:
        """The gate's decision from the headers it reads (``found``) and the peer."""
        client = scope.get("client")
        host = client[0] if client else None
        request = None
        if self._gate.classify is not None:

            def request() -> Request:
                return self._request_view(scope)

        return self._gate.admit(found.get, host, request, "async")

    @staticmethod
    def _request_view(scope: Scope) -> Request:
        """The framework-free view of the request, for ``classify`` and responders."""
        client = scope.get("client")
        return Request(
            scope.get("method", "GET"),
            scope["path"],
            client[0] if client else None,
            lambda: {
                k.decode("latin-1").lower(): v.decode("latin-1")
                for k, v in scope.get("headers", ())
            },
            scope,
        )

    async def _wait(
        self, waiting: Waiting, scope: Scope, receive: Receive, send: Send
    ) -> tuple[Permit, Receive, asyncio.Future[Message] | None] | None:
        """The slow path: wait for a slot while watching for the client's disconnect.

        Returns the permit, the ``receive`` the app must use (it replays what the watch took)
        and the watch's pending ``receive()`` (for the caller to drop if the app never asks);
        None when refused (the refusal is sent here) or when the client left.
        """
        acquire = asyncio.ensure_future(waiting.wait_async())
        # What the watch took: the first chunk as is, later ones coalesced into one buffer
        # (never a dict per chunk), so a single large message is never held twice.
        first_chunk = b""
        body: bytearray | None = None
        more_body = True
        taken = False
        pending: asyncio.Future[Message] | None = None
        run = False
        try:
            watch = _header(scope, b"expect") is None  # see the class docstring: 100-continue
            budget = WATCH_BODY_LIMIT
            while watch and not acquire.done():
                if pending is None:
                    pending = asyncio.ensure_future(receive())
                await asyncio.wait((acquire, pending), return_when=asyncio.FIRST_COMPLETED)
                if not pending.done():
                    break  # admitted or refused; pending passes on to the app
                message = pending.result()
                pending = None
                if message["type"] == "http.disconnect":
                    # The client is gone: leave the queue now, never run, send nothing.
                    acquire.cancel()
                    await asyncio.wait((acquire,))
                    return None
                chunk = message.get("body", b"")
                if not taken:
                    first_chunk = chunk
                elif body is None:
                    body = bytearray(first_chunk)
                    body += chunk
                else:
                    body += chunk
                taken = True
                more_body = bool(message.get("more_body", False))
                # Each message costs its bytes and its dict: count both, so a trickle of tiny
                # messages cannot pin more memory than the budget.
                budget -= len(chunk) + _MESSAGE_OVERHEAD
                watch = budget > 0 or not more_body  # a complete body: only a disconnect can follow
            try:
                permit = await acquire
            except Overloaded as refusal:
                view = self._request_view(scope) if self._gate.responder_wants_request else None
                status, headers, payload = self._gate.refusal(refusal, view)
                await _send_response(send, status, headers, payload)
                return None
            run = True
        finally:
            if not run:
                # Refused, disconnected, or cancelled ourselves: leave the queue if still in it,
                # and give back a slot that was granted at the last instant.
                acquire.cancel()
                acquire.add_done_callback(functools.partial(_discard_permit, waiting))
                if pending is not None:
                    pending.cancel()
                    pending.add_done_callback(_discard_message)

        if taken or pending is not None:
            first = (
                {
                    "type": "http.request",
                    "body": first_chunk if body is None else bytes(body),
                    "more_body": more_body,
                }
                if taken
                else None
            )
            del body, first_chunk
            receive = _replay(first, pending, receive)
        return permit, receive, pending

    # -- responses ------------------------------------------------------------------------------

    def _refusal(self, refusal: Overloaded) -> tuple[int, _Headers, bytes]:
        return self._gate.refusal(refusal)

    async def _serve(
        self, build: Callable[[Scope], HTTPResponse], scope: Scope, send: Send
    ) -> None:
        method = scope.get("method", "GET")
        if method not in _READ_METHODS:
            await _send_response(send, *self._not_allowed)
            return
        response = build(scope)
        body = b"" if method == "HEAD" else response.body
        await _send_response(send, response.status, _asgi_headers(response), body)

    def _health(self, scope: Scope) -> HTTPResponse:
        return health_response(self._health_throttlers, self._table)

    def _alive(self, scope: Scope) -> HTTPResponse:
        return self._live

    def _metrics(self, scope: Scope) -> HTTPResponse:
        if self._metrics_response is None:  # pragma: no cover - metrics_path implies it
            raise RuntimeError("metrics_response was not loaded")
        accept = _header(scope, b"accept")
        return self._metrics_response(None if accept is None else accept.decode("latin-1"))

    # -- websockets -----------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            permit = await self.throttler.acquire_async()
        except Overloaded as refusal:
            message = await receive()  # the handshake's websocket.connect, answered below
            if message["type"] != "websocket.connect":
                return  # the client left before its handshake was answered
            if "websocket.http.response" in (scope.get("extensions") or {}):
                status, headers, body = self._refusal(refusal)
                await _send_response(send, status, headers, body, prefix="websocket.http")
            else:
                await send(
                    {
                        "type": "websocket.close",
                        "code": _WS_TRY_AGAIN_LATER,
                        "reason": "Try Again Later",
                    }
                )
            return
        scope["shedder.permit"] = permit
        try:
            await self.app(scope, receive, send)
        finally:
            permit.release()
