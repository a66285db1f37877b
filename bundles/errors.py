"""Errors a bundle can cause: each one line naming the file, the field and the fix.

BundleError            one problem in one place (file, field path, message, fix)
InvalidBundles         raised by loaders: every BundleError found, reported at once (a terminal DabctlError)
SourceError            a git source cannot be reached or read (agent.sources.git; defined here so that catching it
                       does not import dulwich); a retryable DabctlError
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass

from schemas.errors import DabctlError
from schemas.quoting import printable


@dataclass(frozen=True)
class BundleError:
    """One problem: where it is (file, optional line/column, field path) and how to fix it.

    Its text is one line: a file name or key holding a newline or an escape sequence is printed escaped.
    """

    file: str
    message: str
    _: KW_ONLY
    field: str = ""
    fix: str = ""
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}" + (f":{self.column}" if self.column is not None else "")
        text = f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        return printable(f"{text}; {self.fix}" if self.fix else text)


class InvalidBundles(DabctlError):
    """One or more bundle files are invalid; nothing may be applied."""

    def __init__(self, errors: Sequence[BundleError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class SourceError(DabctlError):
    """The repository cannot be reached or read; one line with what and how to fix (never a credential)."""

    retryable = True
