"""Polling another process's state from a test."""

from __future__ import annotations

import time
from collections.abc import Callable

from shedder._demo.servers import free_port

__all__ = ["free_port", "wait_for"]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll another process's state until ``predicate`` holds; False if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
