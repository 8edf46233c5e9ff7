"""shedder.gunicorn's reading of a peeked request head, without a server."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("gunicorn")

from shedder.gunicorn import _header_needles, _parse_head

WANTED = ("grpc-timeout", "x-request-start")
NEEDLES = _header_needles(WANTED)


def test_a_complete_bodyless_head_gives_its_length() -> None:
    data = b"GET /a%20b?q=1#f HTTP/1.1\r\nHost: x\r\nGRPC-Timeout:  5S \r\n\r\n"
    head = _parse_head(data, NEEDLES, "")
    assert head is not None
    assert (head.method, head.path, head.headers) == (b"GET", "/a b", {"grpc-timeout": "5S"})
    assert head.length == len(data)
    # Bare newlines end the head too.
    bare = b"HEAD /x HTTP/1.0\nHost: x\n\n"
    head = _parse_head(bare, NEEDLES, "")
    assert head is not None
    assert (head.method, head.length) == (b"HEAD", len(bare))


@pytest.mark.parametrize(
    "header", ["Content-Length: 0", "content-length: 3", "Transfer-Encoding: chunked"]
)
def test_a_head_that_may_announce_a_body_has_no_length(header: str) -> None:
    data = f"POST /x HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\nabc".encode()
    head = _parse_head(data, NEEDLES, "")
    assert head is not None
    assert head.length == 0  # a refusal lingers: more bytes may come


def test_an_incomplete_head() -> None:
    partial = b"GET /x HTTP/1.1\r\nHost: x\r\n"
    assert _parse_head(partial, NEEDLES, "") is None  # wanted headers may still come
    head = _parse_head(partial, (), "")
    assert head is not None
    assert (head.path, head.length) == ("/x", 0)  # decided on the request line alone
    assert _parse_head(b"GET /x HTT", (), "") is None


@pytest.mark.parametrize(
    "line",
    [b"PRI * HTTP/2.0", b"OPTIONS * HTTP/1.1", b"CONNECT a:443 HTTP/1.1", b"GET /x", b"junk"],
)
def test_heads_left_to_gunicorn(line: bytes) -> None:
    assert _parse_head(line + b"\r\n\r\n", (), "") is None


def test_absolute_targets_and_script_name() -> None:
    head = _parse_head(b"GET http://h:1/app/x?y HTTP/1.1\r\n\r\n", (), "/app")
    assert head is not None
    assert head.path == "/x"
    assert _parse_head(b"GET /other HTTP/1.1\r\n\r\n", (), "/app") is None


_names = st.sampled_from([*WANTED, "host", "x-grpc-timeout", "grpc-timeout-x", "accept"])
_values = st.text(alphabet="abc019 =;.", max_size=12).map(str.strip)


@given(st.lists(st.tuples(_names, _values, st.booleans()), max_size=8), st.booleans())
def test_headers_read_as_a_line_by_line_parse_would(
    fields: list[tuple[str, str, bool]], crlf: bool
) -> None:
    eol = "\r\n" if crlf else "\n"
    lines = [f"{n.upper() if up else n}: {v}" for n, v, up in fields]
    data = eol.join(["GET / HTTP/1.1", *lines, "", ""]).encode()
    expected: dict[str, str] = {}
    for name, value, _ in fields:
        if name in WANTED:
            expected[name] = value  # the last one counts
    head = _parse_head(data, NEEDLES, "")
    assert head is not None
    assert head.headers == expected
    assert head.length == len(data)
