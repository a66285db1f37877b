"""What only root may read: the state directory and its files, and the secret files the configuration names.

The state directory holds every applied bundle (and so every `Env` password) and the lock files: it is created
0700 and its files 0600; one that exists already is tightened on first write (its direct entries too: a
subdirectory at 0700 shields what is below it). A state directory that another user owns or may write is
refused — they could have planted a symbolic link where a lock file or the database goes. A directory given to a
group for traversal only (0710, group not root) keeps that bit.

Token, key and webhook-secret files are held to ssh's rules: a file that group or others may read, or that is
owned by neither root nor this user, is refused with one line naming the setting, the file and the fix.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from schemas.errors import DabctlError

DIR_MODE = 0o700
FILE_MODE = 0o600


class PrivateFileRefused(DabctlError):
    """A state directory, lock file or secret file that other users could read or replace."""


def _owner_ok(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid())


def private_dir(path: Path) -> None:
    """Create `path` 0700, or check and tighten it; refuse one another user owns or may write (PrivateFileRefused)."""
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        st = os.stat(path)
    except OSError as exc:
        raise PrivateFileRefused(
            f"cannot create the state directory {path}: {exc.strerror}; check --state-dir and its parents"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise PrivateFileRefused(f"the state directory {path} is not a directory; choose another --state-dir")
    if st.st_uid != os.geteuid():
        raise PrivateFileRefused(
            f"the state directory {path} is owned by uid {st.st_uid}, not this user ({os.geteuid()}): its owner could "
            "plant files in it; use a directory root owns, such as /var/lib/dabctl"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise PrivateFileRefused(
            f"the state directory {path} may be written by group or others (mode {mode:04o}): they could plant files "
            f"in it; check what is in it, then chmod 700 {path}"
        )
    wanted = DIR_MODE | (0o010 if mode & 0o010 and st.st_gid != 0 else 0)  # a control group may traverse
    if created or mode == wanted:
        if created and mode != wanted:
            os.chmod(path, wanted)  # the umask cannot widen 0700, but a parent's default ACL can
        return
    os.chmod(path, wanted)
    _tighten_entries(path)


def _tighten_entries(path: Path) -> None:
    """An existing state directory's files to 0600 and subdirectories to 0700 (symbolic links left alone)."""
    with os.scandir(path) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
                    os.chmod(entry.path, stat.S_IMODE(st.st_mode) & FILE_MODE)
                elif stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
                    os.chmod(entry.path, DIR_MODE)


def open_private(path: Path, flags: int = os.O_RDWR) -> int:
    """Open (creating 0600) a file in the state directory without following a symbolic link; tighten a looser one.

    A symbolic link, a file that is not regular or one another user owns is refused: root writing through a
    planted link would truncate whatever it points to.
    """
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        if os.path.islink(path):
            raise PrivateFileRefused(
                f"{path} is a symbolic link: another user may have planted it; remove it (dabctl creates the file)"
            ) from None
        raise PrivateFileRefused(f"cannot open {path}: {exc.strerror}; check the state directory") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise PrivateFileRefused(
            f"{path} is not a regular file of this user (uid {st.st_uid}); remove it (dabctl creates the file)"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.fchmod(fd, FILE_MODE)
    return fd


def create_private(path: Path) -> None:
    """Make sure `path` exists as a private file (0600) before a library opens it with its own default mode."""
    os.close(open_private(path))


def tighten_if_present(path: Path) -> None:
    """A file a library created next to ours (SQLite's -wal and -shm) to 0600, when it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.close(open_private(path, os.O_RDONLY))


def read_secret_file(path: str, setting: str) -> str:
    """The content of a secret file (trailing whitespace dropped), refusing one others may read, as ssh does."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            check_secret_stat(st, path, setting)
            raw = f.read(1024 * 1024)
    except OSError as exc:
        raise PrivateFileRefused(f"{setting}: cannot read {path}: {exc.strerror}") from None
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise PrivateFileRefused(f"{setting}: {path} is not UTF-8 text; write the secret alone on one line") from None


def check_secret_file(path: str, setting: str) -> None:
    """Refuse a secret file (a key that another program reads) that others may read; a missing one is left to it."""
    try:
        st = os.stat(path)
    except OSError:
        return
    check_secret_stat(st, path, setting)


def check_secret_stat(st: os.stat_result, path: str, setting: str) -> None:
    if not _owner_ok(st):
        raise PrivateFileRefused(
            f"{setting}: {path} is owned by uid {st.st_uid}, not root: its owner could change the secret; "
            f"chown root {path}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise PrivateFileRefused(
            f"{setting}: {path} may be read by group or others (mode {mode:04o}); chmod 600 {path}"
        )
