"""Host paths as the engine will see them: a bind-mount source resolved on this node, following only symlinks
that nobody but root could have planted.

Docker resolves a bind source each time it starts a container, so a container that can write under a mounted
directory could plant a symlink there (`data -> /`) for the next start. A symlink in a source path is followed
only when it and every directory above it are owned by root and writable by root alone (Debian's
`/var/run -> /run`); any other symlink is refused. The part of a path that does not exist yet is kept as written.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections import deque

from bundles.policy import normalise
from schemas.errors import DabctlError

MAX_LINKS = 40  # as the kernel's MAXSYMLINKS
UNTRUSTED_SYMLINK = "no-untrusted-symlink"


class UntrustedPath(DabctlError):
    """A bind-mount source passes through a symlink that someone other than root could have made or changed."""

    def __init__(self, message: str, rule: str = UNTRUSTED_SYMLINK) -> None:
        super().__init__(message)
        self.rule = rule


def _root_only(st: os.stat_result) -> bool:
    """Owned by root and writable by nobody else (no group or other write bit)."""
    return st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _untrusted_above(directory: str) -> str | None:
    """The first directory from `directory` up to `/` that is not root's alone, or None."""
    current = directory
    while True:
        st = os.lstat(current)
        if not _root_only(st):
            return current
        if current == "/":
            return None
        current = posixpath.dirname(current)


def resolve(path: str) -> str:
    """`path` with every symlink followed (each one checked), `.` and `..` applied; UntrustedPath otherwise."""
    parts = deque(p for p in normalise(path).split("/") if p)
    current = "/"
    links = 0
    while parts:
        name = parts.popleft()
        if name == ".":
            continue
        if name == "..":
            current = posixpath.dirname(current)
            continue
        candidate = posixpath.join(current, name)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            return normalise(posixpath.join(candidate, *parts))
        except OSError as exc:
            raise UntrustedPath(f"{path}: cannot look at {candidate}: {exc.strerror}") from None
        if not stat.S_ISLNK(st.st_mode):
            current = candidate
            continue
        links += 1
        if links > MAX_LINKS:
            raise UntrustedPath(
                f"{path}: more than {MAX_LINKS} symlinks (a loop?), refused by rule {UNTRUSTED_SYMLINK!r}"
            )
        if st.st_uid != 0:
            raise UntrustedPath(
                f"{path}: {candidate} is a symlink owned by uid {st.st_uid}, not root: refused by policy rule "
                f"{UNTRUSTED_SYMLINK!r} (a container could have planted it)"
            )
        loose = _untrusted_above(current)
        if loose is not None:
            raise UntrustedPath(
                f"{path}: the symlink {candidate} lies in {loose}, which someone other than root owns or can write: "
                f"refused by policy rule {UNTRUSTED_SYMLINK!r} (a container could have planted it)"
            )
        target = os.readlink(candidate)
        if target.startswith("/"):
            current = "/"
        parts.extendleft(reversed([p for p in target.split("/") if p]))
    return current


def realpath(path: str) -> str:
    """Where a trusted path (a config entry, a built-in one) leads now, symlinks followed without checks."""
    return normalise(os.path.realpath(path))
