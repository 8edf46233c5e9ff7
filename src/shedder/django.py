"""Django: a middleware configured from ``settings.SHEDDER`` and a ``shed_load`` view decorator.

Add ``"shedder.django.LoadSheddingMiddleware"`` at the top of ``MIDDLEWARE`` and configure it::

    SHEDDER = {"max_concurrency": 8, "max_queue": 16, "queue_timeout": 1.0}

It is a new-style middleware that is both sync- and async-capable, so the same line works
under WSGI (gunicorn, waitress, uWSGI) and ASGI (uvicorn, daphne, hypercorn): Django runs it
in whichever mode its handler uses, and a queued request waits on its thread or on the event
loop accordingly. Needs the ``django`` extra.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Literal, cast

try:
    from asgiref.sync import iscoroutinefunction, markcoroutinefunction
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.http import HttpRequest, HttpResponse, HttpResponseBase
    from django.utils.module_loading import import_string
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError('shedder.django needs Django: pip install "loadshedder[django]"') from None

from ._core.errors import Overloaded
from ._core.throttler import Permit, Throttler, Waiting
from ._core.wire import deadline_scope
from ._web.deadlines import Deadlines
from ._web.gate import DEFAULT_DEADLINES, route_gate
from ._web.http import (
    DEFAULT_HEALTH_PATH,
    DEFAULT_LIVE_PATH,
    HTTPResponse,
    ShedLog,
    ShedResponder,
    health_response,
    live_response,
    method_not_allowed_response,
    path_matches,
    shed_response,
)
from ._web.settings import adapter_settings

__all__ = ["SETTING", "LoadSheddingMiddleware", "shed_load"]

SETTING = "SHEDDER"
"""The name of the Django setting that configures :class:`LoadSheddingMiddleware`."""

_READ_METHODS = ("GET", "HEAD")
# Keys of settings.SHEDDER that configure the middleware rather than its throttler.
_ADAPTER_KEYS = frozenset(
    (
        "throttler",
        "health_path",
        "exempt",
        "status_code",
        "responder",
        "health_throttlers",
        "metrics_path",
        "metrics_registry",
        "live_path",
        "instance_dir",
    )
)


def _to_django(response: HTTPResponse, method: str = "GET") -> HttpResponse:
    body = b"" if method == "HEAD" else response.body
    return HttpResponse(body, status=response.status, headers=dict(response.headers))


def _hold_until_closed(response: HttpResponseBase, permit: Permit) -> HttpResponseBase:
    """Keep ``permit`` until the server closes ``response`` (PEP 3333; Django's ASGI handler).

    A streaming response thus holds its slot while it streams. Django calls the response's
    resource closers from ``close()``, as it does for its own file responses. Should a response
    never be closed (its ASGI task cancelled on a disconnect), the slot is released when the
    response is collected: ``release`` is idempotent.
    """
    release = permit.release
    response._resource_closers.append(release)
    weakref.finalize(response, release)
    return response


def _resolve(value: Any, key: str) -> Any:
    """A dotted-path string in the settings names an object: import it."""
    if isinstance(value, str):
        try:
            return import_string(value)
        except ImportError as exc:
            raise ImproperlyConfigured(f"{SETTING}[{key!r}]: cannot import {value!r}") from exc
    return value


class LoadSheddingMiddleware:
    """Admit, queue or refuse each request before the view runs, configured from settings.

    ``settings.SHEDDER`` is a dict of the :class:`~shedder.Throttler`'s keyword arguments
    (``max_concurrency`` at least) and of the options of :class:`shedder.wsgi.
    LoadSheddingMiddleware`: ``health_path``, ``live_path``, ``metrics_path``, ``exempt``,
    ``status_code``, ``responder``, ``health_throttlers``, ``instance_dir``; or
    ``"throttler"``: a Throttler (or its dotted path) instead of the keyword arguments. A
    ``responder`` may be given as a dotted path. A wrong setting raises
    ``ImproperlyConfigured`` naming it, at start-up.

    Refusals get ``503`` (or 429) with ``Retry-After`` and the JSON body of the other adapters;
    ``/health/load``, ``/health/live`` and the metrics path are answered here and never
    throttled. The slot is held until the server closes the response, so streaming responses
    count while they stream. The request's :class:`~shedder.Permit` is in
    ``request.META["shedder.permit"]``. Put the middleware first in ``MIDDLEWARE``, so that a
    refused request costs as little as possible.
    """

    sync_capable = True
    async_capable = True

    def __init__(
        self,
        get_response: Callable[[HttpRequest], Any],
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """``options`` replaces ``settings.SHEDDER`` (for tests and programmatic set-up)."""
        if options is None:
            options = getattr(settings, SETTING, None)
            if options is None:
                raise ImproperlyConfigured(
                    f"shedder.django.LoadSheddingMiddleware needs settings.{SETTING}, e.g. "
                    f'{SETTING} = {{"max_concurrency": 8}}'
                )
        if not isinstance(options, Mapping):
            raise ImproperlyConfigured(
                f"settings.{SETTING} must be a dict, got {type(options).__name__}"
            )
        adapter = {key: value for key, value in options.items() if key in _ADAPTER_KEYS}
        throttler_options = {k: v for k, v in options.items() if k not in _ADAPTER_KEYS}
        for key in ("throttler", "responder"):
            if key in adapter:
                adapter[key] = _resolve(adapter[key], key)
        extra = adapter.get("health_throttlers", ())
        if isinstance(extra, (list, tuple)):
            adapter["health_throttlers"] = [_resolve(t, "health_throttlers") for t in extra]
        try:
            checked = adapter_settings(
                adapter.get("throttler"),
                throttler_options,
                health_path=adapter.get("health_path", DEFAULT_HEALTH_PATH),
                exempt=adapter.get("exempt", ()),
                status_code=adapter.get("status_code", 503),
                responder=adapter.get("responder"),
                health_throttlers=adapter.get("health_throttlers", ()),
                metrics_path=adapter.get("metrics_path"),
                metrics_registry=adapter.get("metrics_registry"),
                live_path=adapter.get("live_path", DEFAULT_LIVE_PATH),
                instance_dir=adapter.get("instance_dir"),
            )
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"settings.{SETTING}: {exc}") from exc
        self.get_response = get_response
        self.throttler = checked.throttler
        self._settings = checked
        # Imported only when asked for (prometheus_client is an optional extra).
        self._metrics_response: Callable[[str | None], HTTPResponse] | None = None
        if checked.metrics_path is not None:
            from .prometheus import metrics_endpoint

            try:
                self._metrics_response = metrics_endpoint(
                    checked.health_throttlers, checked.metrics_registry
                )
            except TypeError as exc:
                raise ImproperlyConfigured(f"settings.{SETTING}: {exc}") from exc
        respond: ShedResponder = checked.responder or self._default_responder
        shed_log = ShedLog(self.throttler.name)

        def log_and_respond(refusal: Overloaded) -> HTTPResponse:
            shed_log(refusal)
            return respond(refusal)

        self._responder: ShedResponder = log_and_respond
        self._endpoints: dict[str, Callable[[HttpRequest], HTTPResponse]] = {}
        for path, build in (
            (checked.metrics_path, self._metrics),
            (checked.health_path, self._health),
            (checked.live_path, self._alive),
        ):
            if path is not None:
                self._endpoints[path] = build
        self._live = live_response()
        self._not_allowed = method_not_allowed_response(_READ_METHODS)
        self._async = iscoroutinefunction(get_response)
        if self._async:
            # Tells Django (and asgiref) that calling this instance returns a coroutine.
            markcoroutinefunction(self)

    def _default_responder(self, refusal: Overloaded) -> HTTPResponse:
        return shed_response(refusal, self._settings.status_code)

    def __call__(self, request: HttpRequest) -> Any:
        if self._async:
            return self._acall(request)
        early = self._before(request)
        if early is not None:
            return early if early is not _PASS else self.get_response(request)
        try:
            permit = self.throttler.acquire()
        except Overloaded as refusal:
            return _to_django(self._responder(refusal))
        return self._run(request, permit)

    async def _acall(self, request: HttpRequest) -> Any:
        early = self._before(request)
        if early is not None:
            return early if early is not _PASS else await self.get_response(request)
        try:
            permit = await self.throttler.acquire_async()
        except Overloaded as refusal:
            return _to_django(self._responder(refusal))
        request.META["shedder.permit"] = permit
        try:
            response = await self.get_response(request)
        except BaseException:
            permit.release()
            raise
        return _hold_until_closed(response, permit)

    def _run(self, request: HttpRequest, permit: Permit) -> Any:
        request.META["shedder.permit"] = permit
        try:
            response = self.get_response(request)
        except BaseException:
            permit.release()
            raise
        return _hold_until_closed(response, permit)

    def _before(self, request: HttpRequest) -> Any:
        """The endpoints' response, ``_PASS`` for an exempt path, or None to throttle."""
        table = self._settings.table
        if table is not None:
            table.publish_all(self._settings.health_throttlers)
        path = request.path_info
        endpoint = self._endpoints.get(path)
        if endpoint is not None:
            method = request.method or "GET"
            if method not in _READ_METHODS:
                return _to_django(self._not_allowed)
            return _to_django(endpoint(request), method)
        if path_matches(path, self._settings.exempt_exact, self._settings.exempt_prefixes):
            return _PASS
        return None

    def _health(self, request: HttpRequest) -> HTTPResponse:
        return health_response(self._settings.health_throttlers, self._settings.table)

    def _alive(self, request: HttpRequest) -> HTTPResponse:
        return self._live

    def _metrics(self, request: HttpRequest) -> HTTPResponse:
        build = self._metrics_response
        if build is None:  # pragma: no cover - metrics_path implies it
            raise RuntimeError("metrics_response was not loaded")
        return build(request.headers.get("accept"))


_PASS: Any = object()  # _before's answer for an exempt path


def shed_load(
    throttler: Throttler,
    *,
    status_code: int = 503,
    responder: ShedResponder | None = None,
    timeout: float | None = None,
    priority: str | None = None,
    deadlines: Deadlines | None = DEFAULT_DEADLINES,
    trusted_peers: Iterable[str] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Throttle one Django view with ``throttler``; refusals get the 503 + ``Retry-After`` reply.

    Works on function views, sync and ``async def`` (for a class-based view, decorate the
    result of ``as_view()`` or use ``method_decorator``). The slot is held until the server
    closes the response. ``status_code`` is 503 or 429; ``responder`` builds a custom refusal;
    ``timeout`` overrides the throttler's ``queue_timeout`` (seconds).

    ``priority`` names the throttler's class for this view's requests (``ValueError`` at
    decoration if the throttler has no such class). ``deadlines`` reads the request's deadline
    as the other adapters do (:class:`shedder.Deadlines`; None: ignore it): a request waits at
    most until its deadline, is refused with ``"deadline_exceeded"`` when that passes, and the
    view finds the deadline (``time.monotonic()`` seconds) in
    ``request.META["shedder.deadline"]``, in force for shedder's client while it runs.
    Deadlines longer than ``deadlines.max_budget`` are cut to it unless the peer is in
    ``trusted_peers``.
    """
    gate = route_gate(
        throttler,
        status_code=status_code,
        responder=responder,
        priority=priority,
        deadlines=deadlines,
        trusted_peers=trusted_peers,
        timeout=timeout,
    )

    def admit(
        request: HttpRequest, waiter: Literal["thread", "async"]
    ) -> tuple[Permit | Overloaded | Waiting, float | None]:
        decision, deadline = gate.admit(
            request.headers.get, request.META.get("REMOTE_ADDR"), None, waiter
        )
        if deadline is not None:
            meta = request.META
            known = meta.get("shedder.deadline")
            # Set by the middleware too: the view sees the earlier of the two.
            meta["shedder.deadline"] = deadline if known is None else min(known, deadline)
        return decision, deadline

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(view):
            async_view = cast(Callable[..., Awaitable[Any]], view)

            @functools.wraps(view)
            async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
                decision, deadline = admit(request, "async")
                if isinstance(decision, Waiting):
                    try:
                        decision = await decision.wait_async()
                    except Overloaded as refusal:
                        decision = refusal
                    else:
                        decision.deadline = deadline  # a grant after a wait does not carry it
                if isinstance(decision, Overloaded):
                    return _to_django(gate.refusal(decision), request.method or "GET")
                permit = decision
                try:
                    with deadline_scope(deadline):
                        response = await async_view(request, *args, **kwargs)
                except BaseException:
                    permit.release()
                    raise
                return _hold_until_closed(response, permit)

            return async_wrapper

        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            decision, deadline = admit(request, "thread")
            if isinstance(decision, Waiting):
                try:
                    decision = decision.wait()
                except Overloaded as refusal:
                    decision = refusal
                else:
                    decision.deadline = deadline  # a grant after a wait does not carry it
            if isinstance(decision, Overloaded):
                return _to_django(gate.refusal(decision), request.method or "GET")
            permit = decision
            try:
                with deadline_scope(deadline):
                    response = view(request, *args, **kwargs)
            except BaseException:
                permit.release()
                raise
            return _hold_until_closed(response, permit)

        return wrapper

    return decorate
