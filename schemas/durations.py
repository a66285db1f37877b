"""Go-style durations ("300ms", "1m30s", "2h"), parsed and printed in one place."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

from schemas.quoting import quoted

_UNITS_US = {"ns": 0.001, "us": 1.0, "µs": 1.0, "μs": 1.0, "ms": 1000.0, "s": 1e6, "m": 60e6, "h": 3600e6}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_MAX_US = 10 * 365 * 24 * 3_600_000_000  # ten years: far beyond any timeout, far below overflow
PATTERN = r"^(0|((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+)$"


def parse_duration(text: str) -> timedelta:
    """Parse a non-negative Go duration string; raise ValueError with an example on bad input."""
    if not isinstance(text, str):
        raise ValueError(f'expected a duration string such as "5s" or "1m30s", got {type(text).__name__}')
    s = text.strip()
    if s == "0":
        return timedelta(0)
    if not s or s.startswith("-"):
        raise ValueError(f'invalid duration {quoted(text)}: use a non-negative Go duration such as "5s" or "1m30s"')
    pos, micros = 0, 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if not m:
            raise ValueError(
                f'invalid duration {quoted(text)}: use a number with a unit (ns, us, ms, s, m, h), e.g. "5s", "1m30s"'
            )
        micros += float(m.group(1)) * _UNITS_US[m.group(2)]
        pos = m.end()
    if micros > _MAX_US:
        raise ValueError(f"duration {quoted(text)} is too long: at most {_MAX_US // 3_600_000_000} hours")
    return timedelta(microseconds=round(micros))


def format_duration(value: timedelta) -> str:
    """Print a timedelta the way Go's time.Duration.String() does (without sub-microsecond parts)."""
    micros = round(value.total_seconds() * 1e6)
    if micros == 0:
        return "0s"
    if micros < 1_000_000:
        if micros % 1000 == 0:
            return f"{micros // 1000}ms"
        return f"{micros}us"
    hours, rest = divmod(micros, 3600_000_000)
    minutes, rest = divmod(rest, 60_000_000)
    seconds = rest / 1e6
    out = ""
    if hours:
        out += f"{hours}h"
    if hours or minutes:
        out += f"{minutes}m"
    out += f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"
    return out


def _validate(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    return parse_duration(value)


Duration = Annotated[
    timedelta,
    BeforeValidator(_validate),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": PATTERN, "examples": ["5s", "1m30s", "500ms"]}),
]
"""A non-negative Go-style duration; loads from a string, dumps back to the canonical Go string."""
