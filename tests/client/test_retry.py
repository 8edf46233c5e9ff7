"""The framework-free retry pieces: Retry-After parsing, backoff bounds, policy validation."""

from __future__ import annotations

import email.utils
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from shedder._client.retry import (
    IDEMPOTENT_METHODS,
    RetryPolicy,
    backoff_delay,
    format_timeout,
    parse_retry_after,
)

NOW = 1_700_000_000.0  # a fixed "now", seconds since the epoch
CAP = 120.0


# --- Retry-After: delay-seconds -----------------------------------------------------------


@given(st.integers(min_value=0, max_value=10**40))
@example(0)
def test_delay_seconds_is_read_and_capped(seconds: int) -> None:
    assert parse_retry_after(str(seconds), now=NOW, cap=CAP) == min(seconds, CAP)


@pytest.mark.parametrize(
    ("value", "seconds"), [("000000000001", 1), ("0" * 5000 + "7", 7), ("0000", 0), ("010", 10)]
)
def test_leading_zeros_carry_no_magnitude(value: str, seconds: int) -> None:
    assert parse_retry_after(value, now=NOW, cap=CAP) == seconds


@given(st.integers(min_value=0, max_value=10**40), st.integers(min_value=0, max_value=30))
def test_zero_padded_delay_seconds_reads_as_its_value(seconds: int, zeros: int) -> None:
    assert parse_retry_after("0" * zeros + str(seconds), now=NOW, cap=CAP) == min(seconds, CAP)


def test_huge_delay_seconds_is_capped() -> None:
    # Longer than int() accepts from a string since Python 3.11: still valid, still capped.
    assert parse_retry_after("9" * 5000, now=NOW, cap=CAP) == CAP


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["", " ", "\t", "  \t"]))
def test_delay_seconds_allows_surrounding_whitespace(seconds: int, space: str) -> None:
    assert parse_retry_after(f"{space}{seconds}{space}", now=NOW, cap=10**7) == seconds


@given(st.integers(min_value=1, max_value=10**6))
def test_negative_delay_is_invalid(seconds: int) -> None:
    assert parse_retry_after(f"-{seconds}", now=NOW, cap=CAP) is None


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=999))
def test_fractional_delay_is_invalid(whole: int, fraction: int) -> None:
    assert parse_retry_after(f"{whole}.{fraction}", now=NOW, cap=CAP) is None


@given(st.text(alphabet=st.characters(categories=["Nd"]), min_size=1).filter(str.isascii))
def test_ascii_digits_are_the_only_digits(digits: str) -> None:
    assert parse_retry_after(digits, now=NOW, cap=10**30) == min(float(int(digits)), 10**30)


@given(
    st.text(alphabet=st.characters(categories=["Nd"]), min_size=1).filter(lambda s: not s.isascii())
)
@example("\u0661\u0662")  # Arabic-Indic "12"
@example("\uff15")  # fullwidth "5"
def test_non_ascii_digits_are_invalid(digits: str) -> None:
    assert parse_retry_after(digits, now=NOW, cap=CAP) is None


@given(st.text())
@example("")
@example("soon")
@example("1e3")
@example("0x10")
@example("Sun, 31 Feb 1994 08:49:37 GMT")
@example("Sun, 06 Nov 99999 08:49:37 GMT")
def test_any_text_never_crashes_and_stays_within_bounds(value: str) -> None:
    delay = parse_retry_after(value, now=NOW, cap=CAP)
    assert delay is None or 0 <= delay <= CAP


@pytest.mark.parametrize(
    "value",
    ["soon", "", "1.5", "-1", "+5", "1e3", " ", "Tomorrow", "1, 2", "1 2", "\x001", "-0", "inf"],
)
def test_garbage_is_invalid(value: str) -> None:
    assert parse_retry_after(value, now=NOW, cap=CAP) is None


def test_absent_header_is_none() -> None:
    assert parse_retry_after(None, now=NOW, cap=CAP) is None


# --- Retry-After: HTTP-date ----------------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    [
        lambda t: email.utils.formatdate(t, usegmt=True),  # IMF-fixdate
        lambda t: email.utils.formatdate(t, usegmt=True)[:-4],  # no zone: read as UTC
        lambda t: email.utils.formatdate(t, usegmt=True)[:-4] + " -0000",
    ],
    ids=["imf-fixdate", "no-zone", "minus-zero"],
)
def test_http_date_in_the_future(form: Any) -> None:
    assert parse_retry_after(form(NOW + 42), now=NOW, cap=CAP) == pytest.approx(42)


def test_obsolete_date_forms_are_read() -> None:
    now = email.utils.parsedate_to_datetime("Sun, 06 Nov 1994 08:49:00 GMT").timestamp()
    rfc850 = "Sunday, 06-Nov-94 08:49:37 GMT"
    asctime = "Sun Nov  6 08:49:37 1994"
    assert parse_retry_after(rfc850, now=now, cap=CAP) == pytest.approx(37)
    assert parse_retry_after(asctime, now=now, cap=CAP) == pytest.approx(37)


def test_http_date_with_an_offset_is_converted() -> None:
    # 10:00:42 at +02:00 is 08:00:42 UTC.
    now = email.utils.parsedate_to_datetime("Mon, 01 Jan 2024 08:00:00 GMT").timestamp()
    value = "Mon, 01 Jan 2024 10:00:42 +0200"
    assert parse_retry_after(value, now=now, cap=CAP) == pytest.approx(42)


def test_past_http_date_is_zero() -> None:
    value = email.utils.formatdate(NOW - 3600, usegmt=True)
    assert parse_retry_after(value, now=NOW, cap=CAP) == 0.0


def test_far_http_date_is_capped() -> None:
    value = email.utils.formatdate(NOW + 86_400, usegmt=True)
    assert parse_retry_after(value, now=NOW, cap=CAP) == CAP


# --- backoff ---------------------------------------------------------------------------------


@given(
    retry=st.integers(min_value=1, max_value=10_000),
    base=st.floats(min_value=0.001, max_value=10),
    ceiling=st.floats(min_value=10, max_value=1000),
    draw=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_backoff_is_within_full_jitter_bounds(
    retry: int, base: float, ceiling: float, draw: float
) -> None:
    delay = backoff_delay(retry, base_delay=base, max_delay=ceiling, random=lambda: draw)
    bound = min(ceiling, base * 2.0 ** min(retry - 1, 64))
    assert 0 <= delay <= bound
    assert delay == pytest.approx(draw * bound)


def test_backoff_doubles_then_stays_at_max_delay() -> None:
    ceilings = [
        backoff_delay(retry, base_delay=0.1, max_delay=1.0, random=lambda: 1.0)
        for retry in range(1, 8)
    ]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_backoff_with_random_zero_is_zero() -> None:
    assert backoff_delay(3, base_delay=1, max_delay=10, random=lambda: 0.0) == 0.0


# --- policy ------------------------------------------------------------------------------------


def test_default_policy() -> None:
    policy = RetryPolicy()
    assert policy.retry_statuses == frozenset({429, 503})
    assert policy.retry_methods == IDEMPOTENT_METHODS
    assert {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"} == IDEMPOTENT_METHODS
    assert policy.budget is not None
    assert RetryPolicy().budget is not policy.budget  # each policy its own budget
    assert policy.throttle is None


def test_policy_normalises_methods_and_statuses() -> None:
    policy = RetryPolicy(retry_methods=["get", "Post"], retry_statuses=[503])
    assert policy.retry_methods == frozenset({"GET", "POST"})
    assert policy.retry_statuses == frozenset({503})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_retries": -1}, "max_retries must be >= 0, got -1"),
        ({"base_delay": -0.5}, "base_delay must be >= 0 seconds, got -0.5"),
        ({"base_delay": float("nan")}, "base_delay must be >= 0 seconds, got nan"),
        ({"base_delay": 2.0, "max_delay": 1.0}, "max_delay must be >= base_delay, 2.0, got 1.0"),
        ({"max_retry_after": float("inf")}, "max_retry_after must be a finite number of seconds"),
        ({"retry_statuses": [503, 99]}, "retry_statuses must hold statuses 100..599, got 99"),
    ],
)
def test_policy_rejects_bad_values(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        RetryPolicy(**options)


@pytest.mark.parametrize("value", [True, 1.5, "3"])
def test_policy_rejects_non_int_max_retries(value: Any) -> None:
    with pytest.raises(TypeError, match="max_retries must be an int"):
        RetryPolicy(max_retries=value)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"total_timeout": 0}, ValueError, "total_timeout must be > 0 seconds, got 0"),
        ({"total_timeout": -1.0}, ValueError, "total_timeout must be >= 0 seconds, got -1.0"),
        ({"total_timeout": float("inf")}, ValueError, "total_timeout must be a finite number"),
        (
            {"total_timeout": "10"},
            TypeError,
            "total_timeout must be a number of seconds, got str '10'",
        ),
        ({"inherit_deadline": 1}, TypeError, "inherit_deadline must be True or False, got int 1"),
        ({"retry_unprocessed": None}, TypeError, "retry_unprocessed must be True or False"),
        ({"raise_on_exhausted": "no"}, TypeError, "raise_on_exhausted must be True or False"),
        ({"deadline_header": 5}, TypeError, "deadline_header must be a str, got int 5"),
        (
            {"deadline_header": "x deadline"},
            ValueError,
            "deadline_header must be an HTTP header name",
        ),
        ({"deadline_header": ""}, ValueError, "deadline_header must be a non-empty string"),
        ({"deadline_format": "ms"}, ValueError, "deadline_format must be one of"),
    ],
)
def test_policy_rejects_bad_deadline_options(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message.replace(".", r"\.").replace("(", r"\(")):
        RetryPolicy(**options)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("grpc-timeout", "grpc-timeout"),
        ("GRPC-Timeout", "grpc-timeout"),
        ("x-envoy-expected-rq-timeout-ms", "milliseconds"),
        ("x-request-timeout", "seconds"),
    ],
)
def test_deadline_format_is_inferred_from_the_header(header: str, expected: str) -> None:
    policy = RetryPolicy(deadline_header=header)
    assert policy.deadline_format == expected
    assert policy.deadline_header == header.lower()


def test_explicit_deadline_format_wins() -> None:
    policy = RetryPolicy(deadline_header="grpc-timeout", deadline_format="seconds")
    assert policy.deadline_value(1.5) == "1.5"


# --- writing a budget for downstream -----------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "fmt", "text"),
    [
        (1.25, "seconds", "1.25"),
        (2.0, "seconds", "2"),
        (0.0004, "seconds", "0"),
        (0.1, "grpc-timeout", "100m"),
        (1.9999, "grpc-timeout", "1999m"),
        (99_999.999, "grpc-timeout", "99999999m"),
        (100_000.0, "grpc-timeout", "100000S"),
        (10.0**9, "grpc-timeout", "16666666M"),
        (10.0**10, "grpc-timeout", "2777777H"),
        (10.0**13, "grpc-timeout", "99999999H"),
        (0.25, "milliseconds", "250"),
        (-3.0, "seconds", "0"),
        (-3.0, "grpc-timeout", "0m"),
    ],
)
def test_format_timeout(seconds: float, fmt: Any, text: str) -> None:
    assert format_timeout(seconds, fmt) == text


@given(st.floats(min_value=0, max_value=10**12, allow_nan=False))
def test_format_timeout_never_promises_more_than_is_left(seconds: float) -> None:
    assert float(format_timeout(seconds, "seconds")) <= seconds
    grpc = format_timeout(seconds, "grpc-timeout")
    unit = {"m": 1e-3, "S": 1.0, "M": 60.0, "H": 3600.0}[grpc[-1]]
    assert len(grpc) <= 9
    assert int(grpc[:-1]) * unit <= seconds * (1 + 1e-12)


def test_format_timeout_rejects_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        format_timeout(1.0, "minutes")  # type: ignore[arg-type]
