"""The cluster backup's sealed file (agent/state/backup.py): what goes in comes out with the passphrase only."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from agent.state.backup import MANIFEST, SNAPSHOT, BackupError, seal, unseal

FILES = {SNAPSHOT: b"\x00etcd snapshot" * 100, MANIFEST: b"{}", "pki/ca.key": b"-----BEGIN PRIVATE KEY-----"}
RIGHT = b"a long passphrase"
CHEAP = 10  # scrypt's cost: n=2**10 keeps these tests fast; the default (15) is checked once


def sealed(files: dict[str, bytes] = FILES) -> bytes:
    return seal(files, RIGHT, cost=CHEAP)


def test_round_trip_and_nothing_in_the_clear() -> None:
    default = seal(FILES, RIGHT)
    assert unseal(default, RIGHT, "f") == FILES
    assert b"etcd snapshot" not in default and b"PRIVATE KEY" not in default
    assert sealed() != sealed()  # a fresh salt and nonce each time


def _same(b: bytes) -> bytes:
    return b


@pytest.mark.parametrize(
    ("mutate", "passphrase", "message"),
    [
        pytest.param(_same, b"another passphrase", "wrong passphrase", id="wrong passphrase"),
        pytest.param(lambda b: b[:-1] + bytes([b[-1] ^ 1]), RIGHT, "wrong passphrase", id="a changed byte"),
        pytest.param(lambda b: b"PK\x03\x04" + b[4:], RIGHT, "not a dabctl cluster backup", id="another file"),
        pytest.param(lambda b: b[:16] + b"\x02" + b[17:], RIGHT, "damaged", id="a changed cost"),
        pytest.param(lambda b: b[:16] + b"\x0b" + b[17:], RIGHT, "wrong passphrase", id="cost: header authenticated"),
        pytest.param(lambda b: sealed({MANIFEST: b"{}"}), RIGHT, "lacks snapshot.db", id="no snapshot"),
    ],
)
def test_refused(mutate: Callable[[bytes], bytes], passphrase: bytes, message: str) -> None:
    with pytest.raises(BackupError, match=message):
        unseal(mutate(sealed()), passphrase, "f")
