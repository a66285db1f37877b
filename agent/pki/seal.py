"""Sealing a cluster backup with the operator's passphrase (for agent/state/backup.py and agent/node/recovery.py).

The sealed bytes are `DABCTL-BACKUP-1\\n`, one byte log2(n) of scrypt's cost, a 16-byte scrypt salt, a 12-byte
nonce, then AES-256-GCM over a tar archive of the files; the key is scrypt(passphrase, salt, n=2**cost, r=8, p=1),
cost 15 by default (recorded, so a later dabctl can raise it and still read older files). GCM authenticates the
whole file, header included: a wrong passphrase or a changed byte is refused, never half-read. Here because
cryptography is agent.pki's alone (an import-linter contract).
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from schemas.errors import DabctlError

MAGIC = b"DABCTL-BACKUP-1\n"


class BackupError(DabctlError):
    """A backup cannot be written or read (wrong passphrase, a damaged or foreign file): the message says which."""


COST = 15
_COSTS = range(10, 21)


def _key(passphrase: bytes, salt: bytes, cost: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=2**cost, r=8, p=1).derive(passphrase)


def seal(files: Mapping[str, bytes], passphrase: bytes, cost: int = COST) -> bytes:
    """The backup file's bytes holding `files` (name -> content)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(content))
    if cost not in _COSTS:
        raise ValueError(f"scrypt cost {cost} outside {_COSTS}")
    salt, nonce = os.urandom(16), os.urandom(12)
    header = MAGIC + bytes([cost])
    return header + salt + nonce + AESGCM(_key(passphrase, salt, cost)).encrypt(nonce, buf.getvalue(), header)


def unseal(data: bytes, passphrase: bytes, source: str) -> dict[str, bytes]:
    """The files of a backup file's bytes (BackupError naming `source` when it is not one, or the passphrase is
    wrong)."""
    if not data.startswith(MAGIC):
        raise BackupError(f"{source} is not a dabctl cluster backup (made by `dabctl cluster backup`)")
    head = len(MAGIC) + 1
    cost = data[head - 1] if len(data) >= head else 0
    if cost not in _COSTS:
        raise BackupError(f"{source}: damaged (scrypt cost {cost} in its header)")
    salt, nonce, body = data[head : head + 16], data[head + 16 : head + 28], data[head + 28 :]
    try:
        plain = AESGCM(_key(passphrase, salt, cost)).decrypt(nonce, body, data[:head])
    except InvalidTag:
        raise BackupError(f"{source}: wrong passphrase, or the file was changed since the backup") from None
    files = {}
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r") as tar:
        for member in tar.getmembers():
            extracted = tar.extractfile(member) if member.isfile() else None
            if extracted is not None:
                files[member.name] = extracted.read()
    return files
