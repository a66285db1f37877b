"""Reading the models' field annotations (for error messages, environment variables and property tests)."""

from __future__ import annotations

import types
import typing
from typing import Any


def field_types(annotation: Any) -> list[Any]:
    """The types a field annotation accepts: Annotated and unions (Optional too) unwrapped, generic aliases such
    as list[str] kept whole."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return field_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) for t in field_types(a)]
    return [annotation]
