"""The target app's settings, passed from the harness to the server process in the environment.

One module serves the bare and the shedded variants, so the server command line stays the same
and only ``SHEDDER_DEMO_SHEDDER`` (JSON keyword arguments for ``LoadSheddingMiddleware``, empty
for the bare app) changes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AppSettings"]

POOL_ENV = "SHEDDER_DEMO_POOL"
HOLD_ENV = "SHEDDER_DEMO_HOLD_MS"
SHEDDER_ENV = "SHEDDER_DEMO_SHEDDER"


@dataclass(frozen=True)
class AppSettings:
    """A route that holds one of ``pool`` database connections for ``hold_ms`` milliseconds.

    Capacity is ``pool / hold_ms * 1000`` requests per second. ``shedder`` holds the keyword
    arguments for ``LoadSheddingMiddleware`` (``max_concurrency``, ``max_queue``, ...), or is
    empty for the bare app.
    """

    pool: int = 8
    hold_ms: float = 20.0
    shedder: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")
        if not self.hold_ms > 0:
            raise ValueError(f"hold_ms must be > 0, got {self.hold_ms}")

    @property
    def capacity(self) -> float:
        """Requests per second the simulated database can serve."""
        return self.pool * 1000.0 / self.hold_ms

    def to_env(self) -> dict[str, str]:
        """The environment variables that make a server process build this app."""
        return {
            POOL_ENV: str(self.pool),
            HOLD_ENV: repr(self.hold_ms),
            SHEDDER_ENV: json.dumps(dict(self.shedder)) if self.shedder else "",
        }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AppSettings:
        """Read the settings back; ``ValueError`` names a malformed variable."""
        env = os.environ if environ is None else environ
        try:
            pool = int(env.get(POOL_ENV, "8"))
            hold_ms = float(env.get(HOLD_ENV, "20"))
        except ValueError as exc:
            raise ValueError(f"{POOL_ENV} must be an int and {HOLD_ENV} a number: {exc}") from None
        raw = env.get(SHEDDER_ENV, "")
        options = json.loads(raw) if raw else {}
        if not isinstance(options, dict):
            raise ValueError(f"{SHEDDER_ENV} must be a JSON object, got {raw!r}")
        return cls(pool=pool, hold_ms=hold_ms, shedder=options)
