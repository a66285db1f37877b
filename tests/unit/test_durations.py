"""Go-style durations: one parser and one printer for every duration in every file."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from schemas.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", timedelta(0)),
        ("5s", timedelta(seconds=5)),
        ("1m30s", timedelta(minutes=1, seconds=30)),
        ("1.5h", timedelta(hours=1, minutes=30)),
        ("300ms", timedelta(milliseconds=300)),
        ("2h45m", timedelta(hours=2, minutes=45)),
        ("10us", timedelta(microseconds=10)),
        ("10µs", timedelta(microseconds=10)),
        (".5s", timedelta(milliseconds=500)),
        (" 5s ", timedelta(seconds=5)),
    ],
)
def test_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "-5s", "5", "5x", "1m30", "s", "5 s", "1h-5m", "5S"],
)
def test_parse_rejects_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match=r'e\.g\. "5s"|such as "5s"'):
        parse_duration(text)


@pytest.mark.parametrize("value", [5, 5.0, None, timedelta(seconds=5)])
def test_parse_rejects_non_strings(value: Any) -> None:
    # A bare number is ambiguous (seconds? nanoseconds, as Docker's API?): the file must say its unit.
    with pytest.raises(ValueError, match="expected a duration string"):
        parse_duration(value)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("100000000000h", id="past-timedelta-max"),
        pytest.param("9" * 400 + "s", id="float-overflows-to-inf"),
    ],
)
def test_parse_out_of_range_is_a_value_error(text: str) -> None:
    # A value error becomes one line naming the field; any other exception escapes the loader as a traceback.
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=5), "5s"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(hours=1, minutes=30), "1h30m0s"),
        (timedelta(hours=2, minutes=45), "2h45m0s"),
        (timedelta(milliseconds=300), "300ms"),
        (timedelta(seconds=1, milliseconds=500), "1.5s"),
        (timedelta(microseconds=10), "10us"),
    ],
)
def test_format(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


@pytest.mark.parametrize(
    "value",
    [
        timedelta(0),
        timedelta(microseconds=1),
        timedelta(microseconds=1500),
        timedelta(milliseconds=300),
        timedelta(seconds=5),
        timedelta(seconds=59, microseconds=999_999),
        timedelta(minutes=1, seconds=30),
        timedelta(hours=1, minutes=30),
        timedelta(hours=2, minutes=45),
        timedelta(hours=100, seconds=1, microseconds=7),
        timedelta(days=3),
    ],
)
def test_format_round_trips(value: timedelta) -> None:
    assert parse_duration(format_duration(value)) == value


@pytest.mark.parametrize("text", ["0", "5s", "1m30s", "1.5h", "300ms", "2h45m", "10us"])
def test_parse_format_parse_is_stable(text: str) -> None:
    once = parse_duration(text)
    assert parse_duration(format_duration(once)) == once
