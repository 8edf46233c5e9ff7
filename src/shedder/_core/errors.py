"""Exceptions raised by shedder."""

from __future__ import annotations

from typing import Literal

__all__ = ["Overloaded", "ShedReason"]

ShedReason = Literal["overloaded", "queue_full", "queue_timeout", "deadline_exceeded"]
"""Why a request was refused: see the admission rules in the README."""


class Overloaded(Exception):
    """A request was refused by a throttler instead of being run.

    ``reason`` is one of ``"overloaded"`` (the house is fuller than ``shed_threshold``),
    ``"queue_full"`` (no room to wait) or ``"queue_timeout"`` (no slot came within
    ``queue_timeout``), or ``"deadline_exceeded"`` (the request's own deadline passed, or
    would have, before a slot came). ``retry_after`` is the whole number of seconds (>= 1)
    after which the client should try again; adapters send it as the ``Retry-After`` header.
    ``priority`` is the class the request was refused in.
    """

    __slots__ = ("_shared", "priority", "reason", "retry_after")

    def __init__(self, reason: ShedReason, retry_after: int, priority: str = "default") -> None:
        super().__init__(reason, retry_after)
        self.reason: ShedReason = reason
        self.retry_after: int = retry_after
        self.priority: str = priority
        self._shared = False  # one instance serves many refusals: never raise it as is

    def copy(self) -> Overloaded:
        """A new instance with the same fields (to raise a refusal that may be shared)."""
        return Overloaded(self.reason, self.retry_after, self.priority)

    def __str__(self) -> str:
        return f"request shed ({self.reason}); retry after {self.retry_after} s"

    def __repr__(self) -> str:
        return (
            f"Overloaded(reason={self.reason!r}, retry_after={self.retry_after},"
            f" priority={self.priority!r})"
        )
