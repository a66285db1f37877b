"""How text a user wrote appears in an error line: escaped so it stays one line, cut so it stays short."""

from __future__ import annotations

QUOTE_LIMIT = 80


def printable(text: str) -> str:
    """`text` with every non-printable character (newline, ESC, a lone surrogate ...) escaped as repr() would."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """repr() of a value from a file, its first `limit` characters only: `'xxx...'... (3145728 characters)`."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits)
        return f"a {type(value).__name__} too long to print"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def env_name(entry: str) -> str:
    """An Env entry for an error line: its name only, the value hidden (`'PASS WORD=...' (value not shown)`)."""
    name, sep, value = entry.partition("=")
    return f"{quoted(name + sep + ('...' if value else ''))} (value not shown)" if sep else quoted(name)


def describe(value: object) -> str:
    """A value's kind and, for a scalar, the value: `string 'x'`, `int 5`, `null`, `dict`."""
    if isinstance(value, str):
        return f"string {quoted(value)}"
    if value is None:
        return "null"
    return f"{type(value).__name__} {quoted(value)}" if not isinstance(value, (dict, list)) else type(value).__name__
