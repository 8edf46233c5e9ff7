"""The shedding ceiling of gunicorn itself: a WSGI app that refuses every request at once.

``gunicorn -k gthread shedder._demo.wsgi_503:app``: ``GET /ready`` answers 200 (the harness
waits for it), anything else a 503 + ``Retry-After``, with no work at all. The rate at which
this app collapses is the fastest any middleware can shed behind gunicorn's thread pool.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["app"]

_BODY = b'{"error":"overloaded"}'
_REFUSED = [
    ("content-type", "application/json"),
    ("content-length", str(len(_BODY))),
    ("retry-after", "1"),
]


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/ready":
        start_response("200 OK", [("content-type", "text/plain"), ("content-length", "2")])
        return [b"ok"]
    start_response("503 Service Unavailable", list(_REFUSED))
    return [_BODY]
