"""Starlette and FastAPI helpers (extra ``starlette``): a route decorator and a health route.

- :func:`shed_load` guards one endpoint (async or sync) with its own throttler.
- :func:`health_route` / :func:`health_endpoint` serve ``/health/load`` without the middleware.

For the whole app, use :class:`shedder.asgi.LoadSheddingMiddleware`.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import weakref
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
)
from typing import Any, ParamSpec, Protocol, TypeVar, cast, overload

from ._core.errors import Overloaded
from ._core.throttler import Permit, Throttler, Waiting, throttlers
from ._core.wire import deadline_scope
from ._web.deadlines import Deadlines
from ._web.gate import DEFAULT_DEADLINES, route_gate
from ._web.http import (
    DEFAULT_HEALTH_PATH,
    HTTPResponse,
    ShedResponder,
    health_response,
)

try:
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import HTTPConnection, Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'shedder.starlette needs starlette: pip install "loadshedder[starlette]"'
    ) from None

__all__ = ["ShedLoadDecorator", "health_endpoint", "health_route", "shed_load", "to_response"]

P = ParamSpec("P")
R = TypeVar("R")


class ShedLoadDecorator(Protocol):
    """What :func:`shed_load` returns: turns an endpoint into a guarded async endpoint."""

    @overload
    def __call__(
        self, endpoint: Callable[P, Coroutine[Any, Any, R]], /
    ) -> Callable[P, Coroutine[Any, Any, R | Response]]: ...

    @overload
    def __call__(
        self, endpoint: Callable[P, R], /
    ) -> Callable[P, Coroutine[Any, Any, R | Response]]: ...


def to_response(response: HTTPResponse, *, head: bool = False) -> Response:
    """A Starlette :class:`~starlette.responses.Response` from a shedder ``HTTPResponse``."""
    return Response(
        b"" if head else response.body, status_code=response.status, headers=dict(response.headers)
    )


def _check_not_routed(endpoint: Callable[..., Any]) -> None:
    """``TypeError`` if ``endpoint`` is already a route's endpoint: the decorator is misplaced.

    ``@app.get`` registers the function it is given and returns it unchanged, so a
    ``@shed_load`` *above* it would wrap a function the route never calls: no limit, silently.
    A route (Starlette's ``Route``, FastAPI's ``APIRoute``) keeps the function in its
    ``endpoint`` attribute; the routes referring to it are found through the garbage
    collector's referrers, once per decorated endpoint, at import time.
    """
    for referrer in gc.get_referrers(endpoint):
        if (
            isinstance(referrer, dict)
            and referrer.get("endpoint") is endpoint
            and "path" in referrer
        ):
            raise TypeError(
                f"shed_load is above the route decorator of {endpoint.__qualname__} (path "
                f"{referrer['path']!r}), so the route would call the unguarded function: put "
                "@shed_load(...) directly above the def, below @app.get(...) / @app.route(...)"
            )


def shed_load(
    throttler: Throttler,
    *,
    status_code: int = 503,
    responder: ShedResponder | None = None,
    priority: str | None = None,
    deadlines: Deadlines | None = DEFAULT_DEADLINES,
    trusted_peers: Iterable[str] = (),
) -> ShedLoadDecorator:
    """Guard one Starlette or FastAPI endpoint with ``throttler``.

    The endpoint waits for a slot (per the throttler's rules) before it runs; a refused call
    returns the contract's refusal (``status_code`` 503 or 429, ``Retry-After``, JSON body, or
    what ``responder`` builds) without running the endpoint. The slot is held until the
    endpoint returns; for a :class:`~starlette.responses.StreamingResponse`, until its body
    has been streamed (or the response is dropped).

    ``priority`` names the throttler's class for this endpoint's requests (``ValueError`` at
    decoration if the throttler has no such class). ``deadlines`` reads the request's deadline
    as the middleware does (:class:`shedder.Deadlines`; None: ignore it): a request waits at
    most until its deadline, is refused with ``"deadline_exceeded"`` when that passes, and the
    endpoint finds the deadline (``time.monotonic()`` seconds) in
    ``request.scope["shedder.deadline"]``, in force for shedder's client while it runs.
    Deadlines longer than ``deadlines.max_budget`` are cut to it unless the peer is in
    ``trusted_peers``.

    FastAPI still sees the endpoint's own signature (``functools.wraps``), so dependencies,
    request bodies and the OpenAPI schema are unchanged; to read the headers, the guard asks
    FastAPI for the :class:`~starlette.requests.Request` through a hidden keyword parameter.

    Sync endpoints: the slot is taken on the event loop *before* the call is handed to the
    thread pool (anyio's default limiter: 40 threads). So waiting happens in the throttler's
    queue, bounded by ``queue_timeout`` and visible in its stats, never unseen in the pool's
    unbounded line. At most ``min(max_concurrency, 40)`` such endpoints run at once (the pool
    is shared with every other sync endpoint and dependency): keep ``max_concurrency`` of sync
    endpoints below the pool size, or admitted calls will wait for a thread.

    Raises ``TypeError`` for a throttler that is not a :class:`~shedder.Throttler` or a
    generator endpoint, ``ValueError`` for a status other than 503 or 429.
    """
    gate = route_gate(
        throttler,
        status_code=status_code,
        responder=responder,
        priority=priority,
        deadlines=deadlines,
        trusted_peers=trusted_peers,
    )

    async def admit(
        args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Permit, float | None] | Response:
        """A slot for this call and its deadline, or the refusal to return instead."""
        request = kwargs.pop(_REQUEST_PARAMETER, None)
        if request is None:
            request = _find_request(args, kwargs)
        if request is None or gate.passive:
            decision, deadline = gate.admit(_no_header, None, None, "async")
        else:
            client = request.client
            decision, deadline = gate.admit(
                request.headers.get, client.host if client else None, None, "async"
            )
        if isinstance(decision, Waiting):
            try:
                decision = await decision.wait_async()
            except Overloaded as refusal:
                decision = refusal
            else:
                decision.deadline = deadline  # a grant after a wait does not carry it
        if isinstance(decision, Overloaded):
            return to_response(gate.refusal(decision))
        if deadline is not None and request is not None:
            scope = request.scope
            known = scope.get("shedder.deadline")
            # Set by the middleware too: the endpoint sees the earlier of the two.
            scope["shedder.deadline"] = deadline if known is None else min(known, deadline)
        return decision, deadline

    def decorate(endpoint: Callable[..., Any]) -> Callable[..., Coroutine[Any, Any, Any]]:
        _check_not_routed(endpoint)
        if inspect.isgeneratorfunction(endpoint) or inspect.isasyncgenfunction(endpoint):
            raise TypeError(
                f"shed_load cannot guard generator endpoint {endpoint!r}: return a "
                "StreamingResponse instead (its slot is held until the stream ends)"
            )
        if inspect.iscoroutinefunction(endpoint):

            @functools.wraps(endpoint)
            async def guarded(*args: Any, **kwargs: Any) -> Any:
                admitted = await admit(args, kwargs)
                if isinstance(admitted, Response):
                    return admitted
                permit, deadline = admitted
                try:
                    with deadline_scope(deadline):
                        result = await endpoint(*args, **kwargs)
                except BaseException:
                    permit.release()
                    raise
                return _hold_until_sent(result, permit)

        else:

            @functools.wraps(endpoint)
            async def guarded(*args: Any, **kwargs: Any) -> Any:
                # On the loop, before the thread pool: see the docstring.
                admitted = await admit(args, kwargs)
                if isinstance(admitted, Response):
                    return admitted
                permit, deadline = admitted
                try:
                    # The thread pool runs the endpoint in a copy of this context.
                    with deadline_scope(deadline):
                        result = await run_in_threadpool(endpoint, *args, **kwargs)
                except BaseException:
                    permit.release()
                    raise
                return _hold_until_sent(result, permit)

        if not gate.passive:
            _ask_for_the_request(guarded, endpoint)
        return guarded

    return cast(ShedLoadDecorator, decorate)


_REQUEST_PARAMETER = "shedder_request__"
"""The keyword parameter through which FastAPI hands the guard the request."""


def _no_header(name: str) -> None:
    return None


def _find_request(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> HTTPConnection | None:
    """The request among an endpoint's arguments (Starlette passes it first; a method gets it
    after ``self``; FastAPI by name, when the endpoint asks for it)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, HTTPConnection):
            return value
    return None


def _ask_for_the_request(guarded: Callable[..., Any], endpoint: Callable[..., Any]) -> None:
    """Add a keyword parameter typed ``HTTPConnection`` to ``guarded``'s signature, so that
    FastAPI passes the request (it injects one for a parameter of that type, in a slot of its
    own: an endpoint's ``request: Request`` is still served); Starlette ignores signatures.
    OpenAPI lists no such parameter: a connection is not a field."""
    try:
        signature = inspect.signature(endpoint)
    except (TypeError, ValueError):  # pragma: no cover - a builtin or an odd callable
        return
    parameters = list(signature.parameters.values())
    for parameter in parameters:
        annotation = parameter.annotation
        if annotation is HTTPConnection or (
            isinstance(annotation, str) and annotation.rpartition(".")[2] == "HTTPConnection"
        ):
            return  # FastAPI fills one such slot only; the guard finds it among the arguments
    hidden = inspect.Parameter(
        _REQUEST_PARAMETER, inspect.Parameter.KEYWORD_ONLY, annotation=HTTPConnection
    )
    at = len(parameters)
    if parameters and parameters[-1].kind is inspect.Parameter.VAR_KEYWORD:
        at -= 1  # keyword-only parameters come before **kwargs
    parameters.insert(at, hidden)
    guarded.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]


def _hold_until_sent(result: R, permit: Permit) -> R:
    """Release now, or, for a streaming response, once its body is done."""
    if not isinstance(result, StreamingResponse):
        permit.release()
        return result
    stream = _release_after(result.body_iterator, permit)
    # A response dropped before streaming (client gone before the first chunk) never starts
    # the generator, so its ``finally`` never runs: release when it is collected. Through the
    # loop, because a finaliser may run while the throttler's own lock is held on this thread.
    loop = asyncio.get_running_loop()
    weakref.finalize(stream, _release_soon, loop, permit)
    result.body_iterator = stream
    return result


async def _release_after(body: AsyncIterable[Any], permit: Permit) -> AsyncIterator[Any]:
    try:
        async for chunk in body:
            yield chunk
    finally:
        permit.release()


def _release_soon(loop: asyncio.AbstractEventLoop, permit: Permit) -> None:
    if not permit.released:
        try:
            loop.call_soon_threadsafe(permit.release)
        except RuntimeError:  # the loop is closed: nothing can race us any more
            permit.release()


def health_endpoint(*reported: Throttler | str) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint serving ``/health/load`` (GET and HEAD) without the middleware.

    Reports the given throttlers (objects, or names looked up in :func:`shedder.throttlers`
    at request time; an unknown name raises ``LookupError``), or, with none given, every live
    throttler in the process, so route-level throttlers created later are included. 200 while
    none is shedding, 503 while one is.
    """
    for item in reported:
        if not isinstance(item, (Throttler, str)):
            raise TypeError(f"expected Throttler objects or names, got {item!r}")

    def resolve() -> list[Throttler]:
        if not reported:
            return throttlers()
        live: dict[str, Throttler] | None = None
        resolved = []
        for item in reported:
            if isinstance(item, Throttler):
                resolved.append(item)
                continue
            if live is None:
                live = {t.name: t for t in throttlers()}
            if item not in live:
                raise LookupError(f"no live throttler named {item!r}")
            resolved.append(live[item])
        return resolved

    async def health(request: Request) -> Response:
        current = resolve()
        head = request.method == "HEAD"
        if not current:
            # Nothing throttles yet, so nothing sheds.
            response = JSONResponse({"status": "ok", "throttlers": []})
            if head:
                response.body = b""
            return response
        return to_response(health_response(current), head=head)

    return health


def health_route(
    *reported: Throttler | str, path: str = DEFAULT_HEALTH_PATH, name: str = "health_load"
) -> Route:
    """A :class:`~starlette.routing.Route` for :func:`health_endpoint` at ``path``.

    ``Starlette(routes=[..., health_route()])``, or ``app.router.routes.append(health_route())``
    in FastAPI (kept out of the OpenAPI schema). Other methods get 405 from the router.
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"path must start with '/', got {path!r}")
    return Route(
        path,
        health_endpoint(*reported),
        methods=["GET", "HEAD"],
        name=name,
        include_in_schema=False,
    )
