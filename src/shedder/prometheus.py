"""Prometheus metrics for throttlers (extra ``prometheus``).

Work in progress: for now only the exposition helper the adapters use to serve ``/metrics``.
"""

from __future__ import annotations

from typing import Any

from ._http import HTTPResponse

__all__ = ["metrics_response"]

try:
    import prometheus_client
    from prometheus_client import exposition
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'shedder.prometheus needs prometheus_client: pip install "loadshedder[prometheus]"'
    ) from None


def metrics_response(registry: Any = None, accept: str | None = None) -> HTTPResponse:
    """The text exposition of ``registry`` (default: the global one) as a complete response.

    ``accept`` is the request's ``Accept`` header, used to pick the exposition format.
    """
    registry = prometheus_client.REGISTRY if registry is None else registry
    encoder, content_type = exposition.choose_encoder(accept or "")
    body = encoder(registry)
    return HTTPResponse(
        200,
        (("content-type", content_type), ("content-length", str(len(body)))),
        body,
    )
