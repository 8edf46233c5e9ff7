"""ASGI middleware: admission control in front of any ASGI app (Starlette, FastAPI, ...).

``app.add_middleware(LoadSheddingMiddleware, max_concurrency=8)`` in Starlette and FastAPI, or
``app = LoadSheddingMiddleware(app, throttler=...)`` around any ASGI 3 app. Pure ASGI: no
dependency beyond the standard library; the waiting uses asyncio.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from ._adapter import adapter_settings
from ._errors import Overloaded
from ._http import (
    DEFAULT_HEALTH_PATH,
    DEFAULT_LIVE_PATH,
    HTTPResponse,
    ShedLog,
    ShedResponder,
    health_response,
    live_response,
    method_not_allowed_response,
    shed_response,
)
from ._throttler import Permit, Throttler, ThrottlerOptions

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

_Headers = list[tuple[bytes, bytes]]


def _asgi_headers(response: HTTPResponse) -> _Headers:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in response.headers]


async def _send_response(
    send: Send, status: int, headers: _Headers, body: bytes, prefix: str = "http"
) -> None:
    await send({"type": f"{prefix}.response.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def _discard_permit(task: asyncio.Future[Permit]) -> None:
    """Done-callback of an abandoned acquisition: a slot granted at the last instant goes back."""
    if not task.cancelled() and task.exception() is None:
        task.result().release()


def _discard_message(task: asyncio.Future[Message]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


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
        responder: builds the refusal response from the :class:`~shedder.Overloaded`
            instead of the default JSON body.
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
        health_path: str | None = DEFAULT_HEALTH_PATH,
        exempt: Iterable[str] = (),
        status_code: int = 503,
        responder: ShedResponder | None = None,
        health_throttlers: Sequence[Throttler] = (),
        metrics_path: str | None = None,
        metrics_registry: Any = None,
        limit_websockets: bool = False,
        live_path: str | None = DEFAULT_LIVE_PATH,
        instance_dir: str | os.PathLike[str] | None = None,
        **throttler_options: Unpack[ThrottlerOptions],
    ) -> None:
        settings = adapter_settings(
            throttler,
            throttler_options,
            health_path=health_path,
            exempt=exempt,
            status_code=status_code,
            responder=responder,
            health_throttlers=health_throttlers,
            metrics_path=metrics_path,
            metrics_registry=metrics_registry,
            live_path=live_path,
            instance_dir=instance_dir,
        )
        self.app = app
        self.throttler = settings.throttler
        self.health_path = health_path
        self.metrics_path = metrics_path
        self.live_path = live_path
        self.limit_websockets = bool(limit_websockets)
        self._exact, self._prefixes = settings.exempt_exact, settings.exempt_prefixes
        self._status_code = status_code
        self._responder = responder
        self._shed_log = ShedLog(self.throttler.name)
        self._health_throttlers = settings.health_throttlers
        self._metrics_registry = metrics_registry
        self._metrics_response = settings.metrics_response
        # path -> builder of the endpoint's response; looked up once per request.
        self._endpoints: dict[str, Callable[[Scope], HTTPResponse]] = {}
        if metrics_path is not None:
            self._endpoints[metrics_path] = self._metrics
        if health_path is not None:
            self._endpoints[health_path] = self._health
        self._live = live_response()
        if live_path is not None:
            self._endpoints[live_path] = self._alive
        self._table = settings.table
        not_allowed = method_not_allowed_response(_READ_METHODS)
        self._not_allowed = (not_allowed.status, _asgi_headers(not_allowed), not_allowed.body)
        # Default refusals depend only on (reason, retry_after): encode each one once.
        self._refusals: dict[tuple[str, int], tuple[int, _Headers, bytes]] = {}

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
        endpoint = self._endpoints.get(path)
        if endpoint is not None:
            await self._serve(endpoint, scope, send)
            return
        if path in self._exact or (self._prefixes and path.startswith(self._prefixes)):
            await self.app(scope, receive, send)
            return

        throttler = self.throttler
        # A hint, read without the lock: if someone waits or no slot is free, this request will
        # probably queue, and queueing is when the client's disconnect must be watched for.
        # If the hint is wrong the request merely waits unwatched (bounded by queue_timeout).
        if throttler.queued or throttler.in_flight >= throttler.max_concurrency:
            await self._queue_and_call(scope, receive, send)
            return
        try:
            permit = await throttler.acquire_async()
        except Overloaded as refusal:
            await self._refuse(refusal, send)
            return

        # The hot path, inlined from _call (one coroutine frame less per request).
        release = permit.release

        async def send_then_release(message: Message) -> None:
            await send(message)
            if message["type"] in _BODY_TYPES and not message.get("more_body", False):
                release()

        scope["shedder.permit"] = permit
        try:
            await self.app(scope, receive, send_then_release)
        finally:
            if not permit._released:  # saves taking the lock when the body already freed it
                release()

    async def _call(self, permit: Permit, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app, holding ``permit`` until the response body ends or the app finishes.

        The same as the fast path at the end of ``__call__``: change both together.
        """
        release = permit.release

        async def send_then_release(message: Message) -> None:
            await send(message)
            if message["type"] in _BODY_TYPES and not message.get("more_body", False):
                release()

        scope["shedder.permit"] = permit
        try:
            await self.app(scope, receive, send_then_release)
        finally:
            if not permit._released:  # saves taking the lock when the body already freed it
                release()

    async def _queue_and_call(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The slow path: wait for a slot while watching for the client's disconnect."""
        acquire = asyncio.ensure_future(self.throttler.acquire_async())
        buffered: list[Message] = []
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
                    return
                buffered.append(message)
                budget -= len(message.get("body", b""))
                watch = budget >= 0 or not message.get("more_body", False)
            try:
                permit = await acquire
            except Overloaded as refusal:
                await self._refuse(refusal, send)
                return
            run = True
        finally:
            if not run:
                # Refused, disconnected, or cancelled ourselves: leave the queue if still in it,
                # and give back a slot that was granted at the last instant.
                acquire.cancel()
                acquire.add_done_callback(_discard_permit)
                if pending is not None:
                    pending.cancel()
                    pending.add_done_callback(_discard_message)

        if buffered or pending is not None:
            receive = self._replay(buffered, pending, receive)
        try:
            await self._call(permit, scope, receive, send)
        finally:
            if pending is not None and not pending.done():
                # The app never asked for the message we were waiting for; nobody needs it now.
                pending.cancel()
                pending.add_done_callback(_discard_message)

    @staticmethod
    def _replay(
        buffered: list[Message], pending: asyncio.Future[Message] | None, receive: Receive
    ) -> Receive:
        """A ``receive`` that hands out what the watch already took, in order, then the rest."""
        state = [pending]

        async def replay() -> Message:
            if buffered:
                return buffered.pop(0)
            task = state[0]
            if task is not None:
                state[0] = None
                return await task
            return await receive()

        return replay

    # -- responses ------------------------------------------------------------------------------

    async def _refuse(self, refusal: Overloaded, send: Send) -> None:
        self._shed_log(refusal)
        status, headers, body = self._refusal(refusal)
        await _send_response(send, status, headers, body)

    def _refusal(self, refusal: Overloaded) -> tuple[int, _Headers, bytes]:
        if self._responder is not None:
            response = self._responder(refusal)
            return response.status, _asgi_headers(response), response.body
        key = (refusal.reason, refusal.retry_after)
        encoded = self._refusals.get(key)
        if encoded is None:
            response = shed_response(refusal, self._status_code)
            encoded = (response.status, _asgi_headers(response), response.body)
            self._refusals[key] = encoded
        return encoded

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
        return self._metrics_response(
            self._metrics_registry, None if accept is None else accept.decode("latin-1")
        )

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
