"""Flask helpers (extra ``flask``): a per-view throttle and a ``/health/load`` route.

For the whole app, wrap ``app.wsgi_app`` in :class:`shedder.wsgi.LoadSheddingMiddleware`;
these helpers are for throttling single views and for serving the health endpoint from Flask
when no middleware is used.
"""

from __future__ import annotations

import functools
import gc
import inspect
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal, ParamSpec, Protocol, cast, overload

try:
    import flask
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError('shedder.flask needs Flask: pip install "loadshedder[flask]"') from None

from ._core.errors import Overloaded
from ._core.throttler import Permit, Throttler, Waiting, throttlers
from ._core.wire import deadline_scope
from ._web.deadlines import Deadlines
from ._web.gate import DEFAULT_DEADLINES, route_gate
from ._web.http import (
    DEFAULT_HEALTH_PATH,
    HTTPResponse,
    ShedResponder,
    _json_response,
    health_response,
)
from .wsgi import _Reclaimer

__all__ = ["HealthEndpoint", "ViewDecorator", "health_view", "shed_load"]

P = ParamSpec("P")


class ViewDecorator(Protocol):
    """What :func:`shed_load` returns: keeps the view's parameters, returns a response."""

    @overload
    def __call__(
        self, view: Callable[P, Awaitable[Any]]
    ) -> Callable[P, Awaitable[flask.Response]]: ...

    @overload
    def __call__(self, view: Callable[P, Any]) -> Callable[P, flask.Response]: ...


def _to_flask(response: HTTPResponse) -> flask.Response:
    return flask.Response(response.body, status=response.status, headers=list(response.headers))


def _check_flask() -> None:
    """A view guarded here must run in a Flask app: Quart's look-alike API is not Flask's."""
    if not flask.has_app_context():
        raise RuntimeError(
            "shedder.flask.shed_load guards Flask views only, and this view runs outside a "
            "Flask application context (a Quart app?). For Quart, wrap the app instead: "
            "app.asgi_app = shedder.asgi.LoadSheddingMiddleware(app.asgi_app, ...)"
        )


def _check_not_routed(view: Callable[..., Any]) -> None:
    """``TypeError`` if ``view`` is already registered in a Flask app: the decorator is above
    ``@app.route``, which stores the function it is given, so the guard would never run."""
    for referrer in gc.get_referrers(view):
        if not isinstance(referrer, dict):
            continue
        for owner in gc.get_referrers(referrer):
            if isinstance(owner, dict) and owner.get("view_functions") is referrer:
                raise TypeError(
                    f"shed_load is above the route decorator of {view.__qualname__}, so Flask "
                    "would call the unguarded function: put @shed_load(...) directly above "
                    "the def, below @app.route(...) / @app.get(...)"
                )


def shed_load(
    throttler: Throttler,
    *,
    status_code: int = 503,
    responder: ShedResponder | None = None,
    timeout: float | None = None,
    priority: str | None = None,
    deadlines: Deadlines | None = DEFAULT_DEADLINES,
    trusted_peers: Iterable[str] = (),
) -> ViewDecorator:
    """Throttle one Flask view with ``throttler``; refusals get the 503 + ``Retry-After`` reply.

    Put it under ``@app.route``. The slot is held until the response is closed, so a
    streamed response counts while it streams. ``status_code`` is 503 or 429; ``responder``
    builds a custom refusal; ``timeout`` overrides the throttler's ``queue_timeout`` (seconds).
    Works for sync and ``async def`` views; the view's return value is turned into a
    response with ``make_response``.

    ``priority`` names the throttler's class for this view's requests (``ValueError`` at
    decoration if the throttler has no such class). ``deadlines`` reads the request's deadline
    as the middleware does (:class:`shedder.Deadlines`; None: ignore it): a request waits at
    most until its deadline, is refused with ``"deadline_exceeded"`` when that passes, and the
    view finds the deadline (``time.monotonic()`` seconds) in
    ``request.environ["shedder.deadline"]``, in force for shedder's client while it runs.
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
    orphans = _Reclaimer()

    def admit(
        waiter: Literal["thread", "async"],
    ) -> tuple[Permit | Overloaded | Waiting, float | None]:
        request = flask.request
        decision, deadline = gate.admit(request.headers.get, request.remote_addr, None, waiter)
        if deadline is not None:
            environ = request.environ
            known = environ.get("shedder.deadline")
            # Set by the middleware too: the view sees the earlier of the two.
            environ["shedder.deadline"] = deadline if known is None else min(known, deadline)
        return decision, deadline

    def decorate(view: Callable[P, Any]) -> Callable[P, Any]:
        _check_not_routed(view)
        if inspect.iscoroutinefunction(view):
            async_view = cast(Callable[P, Awaitable[Any]], view)

            @functools.wraps(view)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> flask.Response:
                _check_flask()
                orphans.reclaim()
                decision, deadline = admit("async")
                if isinstance(decision, Waiting):
                    try:
                        decision = await decision.wait_async()
                    except Overloaded as refusal:
                        decision = refusal
                    else:
                        decision.deadline = deadline  # a grant after a wait does not carry it
                if isinstance(decision, Overloaded):
                    return _to_flask(gate.refusal(decision))
                permit = decision
                try:
                    with deadline_scope(deadline):
                        rv = await async_view(*args, **kwargs)
                except BaseException:
                    permit.release()
                    raise
                return _hold_until_closed(rv, permit, orphans)

            return async_wrapper

        @functools.wraps(view)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> flask.Response:
            _check_flask()
            orphans.reclaim()
            decision, deadline = admit("thread")
            if isinstance(decision, Waiting):
                try:
                    decision = decision.wait()
                except Overloaded as refusal:
                    decision = refusal
                else:
                    decision.deadline = deadline  # a grant after a wait does not carry it
            if isinstance(decision, Overloaded):
                return _to_flask(gate.refusal(decision))
            permit = decision
            try:
                with deadline_scope(deadline):
                    rv = view(*args, **kwargs)
            except BaseException:
                permit.release()
                raise
            return _hold_until_closed(rv, permit, orphans)

        return wrapper

    return cast(ViewDecorator, decorate)


def _hold_until_closed(rv: Any, permit: Permit, orphans: _Reclaimer) -> flask.Response:
    """Convert the view's return value and tie the release to the response's close()."""
    try:
        response = flask.current_app.make_response(rv)
        # Werkzeug calls this when the server closes the response iterable (PEP 3333), after
        # the last chunk of a stream. An after_request hook that swaps in a new response
        # object must close the old one, as werkzeug's own wrappers do.
        response.call_on_close(permit.release)
        # A response dropped unclosed (test clients do that) must not keep its slot forever.
        weakref.finalize(response, orphans.orphan, permit)
    except BaseException:
        permit.release()
        raise
    return response


def health_view(throttlers_: Sequence[Throttler] | None = None) -> flask.Response:
    """The ``/health/load`` response as a Flask response; mount it with ``add_url_rule``.

    Reports ``throttlers_``, or every live throttler in the process (:func:`shedder.throttlers`)
    when ``None``. 200 while none is shedding, 503 while any one is.
    """
    reported = list(throttlers()) if throttlers_ is None else list(throttlers_)
    if not reported:
        # Nothing can shed: healthy, with nothing to report.
        return _to_flask(_json_response(200, {"status": "ok", "throttlers": []}))
    return _to_flask(health_response(reported))


class HealthEndpoint:
    """Serves ``/health/load`` as a Flask route, for apps that use no middleware.

    ``HealthEndpoint(app)`` or ``health = HealthEndpoint(); health.init_app(app)``. Reports
    ``throttlers`` (default: every live throttler in the process) and answers GET and HEAD
    (Flask answers 405 to other methods). The route is registered under the endpoint name
    ``endpoint``; it is not throttled, except by a middleware you add in front of it.
    """

    def __init__(
        self,
        app: flask.Flask | None = None,
        *,
        path: str = DEFAULT_HEALTH_PATH,
        throttlers: Sequence[Throttler] | None = None,
        endpoint: str = "shedder_health",
    ) -> None:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        if throttlers is not None:
            throttlers = tuple(throttlers)
            for t in throttlers:
                if not isinstance(t, Throttler):
                    raise TypeError(f"throttlers must be shedder.Throttler objects, got {t!r}")
        self.path = path
        self.throttlers = throttlers
        self.endpoint = endpoint
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Register the route on ``app``."""
        app.add_url_rule(
            self.path, endpoint=self.endpoint, view_func=self.view, methods=["GET", "HEAD"]
        )

    def view(self) -> flask.Response:
        """The route's view function."""
        return health_view(self.throttlers)
