"""The request path both middlewares and the route decorators share: classify, admit, refuse.

Framework-free: an adapter hands over a header getter, the peer's address and (only when a
``classify`` callable needs one) a :class:`Request` view; it gets back the throttler's decision
and the request's deadline, and turns refusals into its own protocol's messages, encoded once
per ``(reason, retry_after, priority)`` by :meth:`Gate.refusal`.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from time import monotonic
from typing import Any, Generic, Literal, TypeVar

from shedder._core.checks import (
    check_callable,
    check_choice,
    check_header_name,
    check_instance,
    check_seconds,
    check_strings,
)
from shedder._core.errors import Overloaded
from shedder._core.throttler import Outcome, Permit, Throttler, Waiting

from .deadlines import Deadlines
from .http import HTTPResponse, ShedLog, ShedResponder, shed_response

__all__ = [
    "DEFAULT_DEADLINES",
    "Classification",
    "Classifier",
    "Gate",
    "OutcomeOf",
    "Request",
    "default_outcome",
    "route_gate",
]

logger = logging.getLogger("shedder")

E = TypeVar("E")  # an adapter's encoded response


@dataclass(frozen=True, slots=True)
class Classification:
    """Who a request is, for admission: its priority class and its flow.

    ``priority`` names one of the throttler's classes (None: the default class); ``flow`` is
    any hashable key (a tenant, an API key, a user, a client address) whose waiters are served
    in turn with other flows' and may hold at most ``flow_queue_limit`` places in the queue.
    """

    priority: str | None = None
    flow: Hashable = None


class Request:
    """The framework-free view of a request that a ``classify`` callable receives.

    ``headers`` has lower-case names (the last value wins for a repeated header); ``client``
    is the peer's address (no port), or None; ``raw`` is the ASGI scope or the WSGI environ.
    """

    __slots__ = ("_headers", "_load", "client", "method", "path", "raw")

    def __init__(
        self,
        method: str,
        path: str,
        client: str | None,
        load_headers: Callable[[], dict[str, str]],
        raw: Any,
    ) -> None:
        self.method = method
        self.path = path
        self.client = client
        self.raw = raw
        self._load = load_headers
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> Mapping[str, str]:
        if self._headers is None:  # built on first use: most classifiers read one header
            self._headers = self._load()
        return self._headers

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path} from {self.client}>"


Classifier = Callable[[Request], "Classification | None"]
"""Maps a request to its :class:`Classification` (None: default class, no flow)."""

OutcomeOf = Callable[[int | None, BaseException | None], Outcome]
"""How a request's work ended, from its response status (None if no response started) and the
exception the app raised (None if none): what the permit reports to a limit algorithm."""


def default_outcome(status: int | None, error: BaseException | None) -> Outcome:
    """``"ignore"`` for an exception or a 5xx (a fast failure is no latency sample), else
    ``"success"``."""
    if error is not None or (status is not None and status >= 500):
        return "ignore"
    return "success"


_TRUST_CACHE_SIZE = 4096

DEFAULT_DEADLINES = Deadlines()
"""The middlewares' default: read grpc-timeout, Envoy's header and X-Request-Start."""


class Gate(Generic[E]):
    """Admission for one middleware or decorator; see the module docstring.

    ``encode`` turns an :class:`HTTPResponse` into the adapter's ready-to-send form; refusals
    built by the default responder are encoded once per (reason, retry_after, priority).
    """

    def __init__(
        self,
        throttler: Throttler,
        encode: Callable[[HTTPResponse], E],
        *,
        status_code: int = 503,
        responder: ShedResponder | None = None,
        classify: Classifier | None = None,
        priority_header: str | None = None,
        trusted_peers: Iterable[str] = (),
        deadlines: Deadlines | None = None,
        outcome: OutcomeOf = default_outcome,
        priority: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """``priority``: the class of requests no ``classify`` or priority header places
        (None: the throttler's default); ``timeout``: replaces the throttler's
        ``queue_timeout`` for these requests (a route decorator's ``timeout=``)."""
        self.throttler = throttler
        self._encode = encode
        self._status_code = check_choice("status_code", status_code, (503, 429))
        self._responder = None if responder is None else check_callable("responder", responder)
        self.responder_wants_request = _takes_request(self._responder)
        """True when the responder takes ``request=``: adapters then pass the request view."""
        if classify is not None:
            check_callable("classify", classify)
        self.classify = classify
        self._priority_header = (
            None
            if priority_header is None
            else check_header_name("priority_header", priority_header)
        )
        self._trusted = _trusted_networks(trusted_peers)
        self._trust_cache: dict[str, bool] = {}
        if deadlines is not None and not isinstance(deadlines, Deadlines):
            raise TypeError(f"deadlines must be a shedder.Deadlines or None, got {deadlines!r}")
        self.deadlines = deadlines
        if not callable(outcome):
            raise TypeError(f"outcome must be callable, got {outcome!r}")
        self.outcome = outcome
        if priority is not None:
            if not isinstance(priority, str):
                raise TypeError(f"priority must be a class name or None, got {priority!r}")
            if priority not in throttler.priorities:
                raise ValueError(
                    f"priority must be one of the classes of throttler {throttler.name!r} "
                    f"({', '.join(throttler.priorities)}), got {priority!r}"
                )
        self.priority = priority
        self.rank = throttler._rank(priority or throttler.default_priority)
        """The class rank of requests that nothing else places (see :attr:`deferrable`)."""
        self._timeout = None if timeout is None else check_seconds("timeout", timeout)
        names = [] if self._priority_header is None else [self._priority_header]
        if deadlines is not None:
            names.extend(deadlines.header_names())
        self.header_names: tuple[str, ...] = tuple(dict.fromkeys(names))
        """The request headers the gate reads (lower-case); adapters fetch only these."""
        self._refusals: dict[tuple[str, int, str], E] = {}
        # Keyed by the throttler's shared refusal instances (they live as long as it does).
        self._by_refusal: dict[Overloaded, E] = {}
        self.shed_log = ShedLog(throttler.name)
        self._unknown_class_logged = False

    def quick_lane(self) -> tuple[Callable[[], E | None], Overloaded] | None:
        """The throttler's quick lane for this gate's requests, answering the encoded refusal
        (see ``Throttler._quick_lane``), and that refusal (for the shed log); None when there
        is none, or when a request could change the answer (:attr:`deferrable` is False) or a
        responder builds each refusal itself.

        An adapter calls the lane first for every request, before it reads any header, and
        logs what it answers as :meth:`refusal` would (the shed log's fast path, inline).
        """
        if not self.deferrable or self._responder is not None:
            return None
        refusal = self.throttler._quick_refusal(self.rank)
        if refusal is None:
            return None
        lane = self.throttler._quick_lane(self.rank, self._encoded(refusal))
        return None if lane is None else (lane, refusal)

    @property
    def deferrable(self) -> bool:
        """True when nothing a request says can change an immediate refusal: no classifier
        and no priority header (deadlines only shorten waits). Adapters then ask the
        throttler's quick lane (:meth:`quick_lane`) before they read any header."""
        return self.classify is None and self._priority_header is None

    @property
    def passive(self) -> bool:
        """True when admission needs nothing from the request (no headers, no classifier)."""
        return not self.header_names and self.classify is None

    def is_trusted(self, client: str | None) -> bool:
        """Whether the peer at ``client`` may set priorities and long deadlines."""
        if client is None or not self._trusted:
            return False
        trusted = self._trust_cache.get(client)
        if trusted is None:
            try:
                address = ipaddress.ip_address(client)
            except ValueError:
                trusted = False
            else:
                trusted = any(address in network for network in self._trusted)
            if len(self._trust_cache) >= _TRUST_CACHE_SIZE:
                self._trust_cache.clear()  # bounded: a scan of many peers must not grow it
            self._trust_cache[client] = trusted
        return trusted

    def admit(
        self,
        get: Callable[[str], str | None],
        client: str | None,
        request: Callable[[], Request] | None,
        waiter: Literal["thread", "async"],
    ) -> tuple[Permit | Overloaded | Waiting, float | None]:
        """The throttler's decision for one request, and its deadline (monotonic s, or None).

        ``get`` reads one of :attr:`header_names` (None if absent); ``request`` builds the
        view for ``classify`` (needed only when one is configured). A :class:`Permit` given
        here carries the deadline; one granted later by a :class:`Waiting` does not (the
        throttler only knows when the wait must end): set ``permit.deadline`` from the
        returned deadline.
        """
        priority: str | None = None
        flow: Hashable = None
        throttler = self.throttler
        if self.classify is not None and request is not None:
            classification = self.classify(request())
            if classification is not None:
                priority, flow = classification.priority, classification.flow
                if priority is not None and priority not in throttler.priorities:
                    self._unknown_class(priority)
                    priority = None
        if priority is None and self._priority_header is not None:
            value = get(self._priority_header)
            # A client must not make itself critical: only trusted peers (a gateway) may say.
            if value is not None and value in throttler.priorities and self.is_trusted(client):
                priority = value
        if priority is None:
            priority = self.priority
        deadline = wait_until = on_clock = None
        timeout = self._timeout
        deadlines = self.deadlines
        if deadlines is not None:
            budget, spent = deadlines.read(get, time.time())
            if spent:
                # Time spent in front counts against the queue's own limit as well.
                queue_timeout = throttler.queue_timeout if timeout is None else timeout
                timeout = max(queue_timeout - spent, 0.0)
            if budget is not None:
                if budget > deadlines.max_budget and not self.is_trusted(client):
                    budget = deadlines.max_budget
                left = budget - spent
                # The app and the client read time.monotonic(); the throttler its own clock.
                deadline = time.monotonic() + left
                on_clock = throttler._clock() + left
                margin = deadlines.margin
                if margin == "auto":
                    margin = throttler._work_reserve()  # the work must fit too (0 until known)
                wait_until = on_clock - margin
        decision = throttler.admit(
            priority=priority, flow=flow, deadline=wait_until, timeout=timeout, waiter=waiter
        )
        if on_clock is not None and type(decision) is Permit:
            decision.deadline = on_clock  # the request's, not its latest start (the margin)
        return decision, deadline

    def refusal(self, refusal: Overloaded, request: Request | None = None) -> E:
        """The encoded refusal response: the responder's, or the contract's (cached).

        Also logs the refusal (rate-limited: see :class:`ShedLog`). ``request`` reaches a
        responder that takes ``request=`` (see :attr:`responder_wants_request`).
        """
        log = self.shed_log
        if monotonic() < log._next:
            log._suppressed += 1  # the common case under overload, without another call
        else:
            log(refusal)
        if self._responder is not None:
            if self.responder_wants_request:
                return self._encode(self._responder(refusal, request=request))  # type: ignore[call-arg]
            return self._encode(self._responder(refusal))
        return self._encoded(refusal)

    def _encoded(self, refusal: Overloaded) -> E:
        """The contract's refusal response for ``refusal``, encoded once (cached)."""
        # The throttler shares one refusal per kind: most lookups hit by identity.
        encoded = self._by_refusal.get(refusal)
        if encoded is not None:
            return encoded
        key = (refusal.reason, refusal.retry_after, refusal.priority)
        encoded = self._refusals.get(key)
        if encoded is None:
            encoded = self._encode(shed_response(refusal, self._status_code))
            if len(self._refusals) < 1024:  # retry_after="auto" varies; keep the cache bounded
                self._refusals[key] = encoded
        if refusal._shared and len(self._by_refusal) < 1024:
            self._by_refusal[refusal] = encoded
        return encoded

    def _unknown_class(self, priority: str) -> None:
        if not self._unknown_class_logged:
            self._unknown_class_logged = True
            logger.error(
                "classify returned an unknown priority %r (classes: %s); using the default",
                priority,
                ", ".join(self.throttler.priorities),
            )


def route_gate(
    throttler: Throttler,
    *,
    status_code: int,
    responder: ShedResponder | None,
    priority: str | None,
    deadlines: Deadlines | None,
    trusted_peers: Iterable[str],
    timeout: float | None = None,
) -> Gate[HTTPResponse]:
    """The gate of a route decorator (Starlette, Flask, Django), arguments checked.

    Its refusals are built per request, never shared: what runs after the view (Flask's
    ``after_request``, Django's middleware) may change a response, and a shared one would leak
    those changes between users.
    """
    check_instance("throttler", throttler, Throttler, "a shedder.Throttler")
    return Gate(
        throttler,
        _as_is,
        status_code=status_code,
        responder=responder,
        priority=priority,
        deadlines=deadlines,
        trusted_peers=trusted_peers,
        timeout=timeout,
    )


def _as_is(response: HTTPResponse) -> HTTPResponse:
    return response


def _takes_request(responder: Callable[..., Any] | None) -> bool:
    if responder is None:
        return False
    try:
        parameters = inspect.signature(responder).parameters
    except (TypeError, ValueError):  # a builtin without a signature: the one-argument form
        return False
    return "request" in parameters


def _trusted_networks(
    peers: Iterable[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for peer in check_strings("trusted_peers", peers):
        try:
            networks.append(ipaddress.ip_network(peer, strict=False))
        except ValueError:
            raise ValueError(
                f"trusted_peers must hold IP addresses or networks, got {peer!r}"
            ) from None
    return tuple(networks)
