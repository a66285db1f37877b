"""PackGuard: an object over the limit is refused by the size in its pack header (or, for a delta, in its delta
header) before a byte of it is inflated; packs within the limit pass through unchanged, split anywhere."""

from __future__ import annotations

import hashlib
import struct
import zlib

import pytest

from agent.sources.packguard import PackGuard, PackRefused, mib

MiB = 1024 * 1024
BLOB, OFS_DELTA, REF_DELTA = 3, 6, 7


def varint(n: int) -> bytes:
    """A delta header's size: 7 bits per byte, low first."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def header(kind: int, size: int) -> bytes:
    out = bytearray([(kind << 4) | (size & 0x0F)])
    size >>= 4
    while size:
        out[-1] |= 0x80
        out.append(size & 0x7F)
        size >>= 7
    return bytes(out)


def entry(kind: int, data: bytes, declared: int | None = None, base: bytes = b"") -> bytes:
    return header(kind, len(data) if declared is None else declared) + base + zlib.compress(data)


def pack(*entries: bytes) -> bytes:
    body = b"PACK" + struct.pack(">LL", 2, len(entries)) + b"".join(entries)
    return body + hashlib.sha1(body).digest()


def delta(base_size: int, result_size: int) -> bytes:
    """Delta data: the two sizes, then copy instructions (offset 0, 64 KiB each) up to the result."""
    out = varint(base_size) + varint(result_size)
    return out + b"\x90" * (result_size // 0x10000)  # 0x90: copy, one size byte 0 = 0x10000


def feed(guard: PackGuard, data: bytes, step: int) -> None:
    for i in range(0, len(data), step):
        guard.write(data[i : i + step])
    guard.finish()


@pytest.mark.parametrize("step", [1, 7, 4096, 1 << 20])
def test_a_pack_within_the_limit_passes_through_unchanged_however_it_is_split(step: int) -> None:
    data = pack(
        entry(BLOB, b"hello\n"),
        entry(BLOB, b"\0" * (2 * MiB)),
        entry(REF_DELTA, delta(6, 0x20000), base=b"\x11" * 20),
        entry(OFS_DELTA, delta(6, 0x10000), base=b"\x05"),
    )
    received: list[bytes] = []
    guard = PackGuard(received.append, limit=4 * MiB)
    feed(guard, data, step)
    assert b"".join(received) == data
    assert guard.largest == 2 * MiB


def test_a_blob_over_the_limit_is_refused_by_its_header_before_its_data_arrives() -> None:
    received: list[bytes] = []
    guard = PackGuard(received.append, limit=32 * MiB)
    head = b"PACK" + struct.pack(">LL", 2, 1) + header(BLOB, 256 * MiB)  # no zlib data at all: nothing to inflate
    with pytest.raises(PackRefused) as info:
        guard.write(head)
    assert str(info.value) == (
        "the repository holds a 256 MiB blob (object 1 of 1 in the pack), over git_max_object_bytes (32 MiB); "
        "nothing was fetched: remove it from the repository's history, or raise git_max_object_bytes"
    )
    assert received == []  # nothing of it reaches the file


@pytest.mark.parametrize("kind, base", [(REF_DELTA, b"\x11" * 20), (OFS_DELTA, b"\x85\x01")])
def test_a_small_delta_whose_result_is_over_the_limit_is_refused_by_its_delta_header(kind: int, base: bytes) -> None:
    small = delta(1024, 256 * MiB)  # 4 KiB of copy instructions that would build 256 MiB
    assert len(small) < 5000
    guard = PackGuard(lambda _: None, limit=32 * MiB)
    with pytest.raises(PackRefused, match=r"a 256 MiB object \(a delta's result\) \(object 2 of 2"):
        guard.write(pack(entry(BLOB, b"\0" * 1024), entry(kind, small, base=base)))


def test_an_object_that_inflates_beyond_its_declared_size_is_refused() -> None:
    guard = PackGuard(lambda _: None, limit=32 * MiB)
    with pytest.raises(PackRefused, match=r"object 1 inflates beyond its declared 10 bytes; nothing was fetched"):
        guard.write(pack(entry(BLOB, b"\0" * MiB, declared=10)))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"<html>not found</html>", "the server sent data that is not a git pack"),
        (pack(entry(BLOB, b"x"))[:-25], "the pack ended early"),
        (pack(entry(BLOB, b"x")) + b"more", "data follows the pack's checksum"),
        (b"PACK" + struct.pack(">LL", 2, 1) + bytes([0x05]), "object 1 has an unknown type 0"),
    ],
)
def test_data_that_is_not_a_whole_pack_is_refused(data: bytes, message: str) -> None:
    guard = PackGuard(lambda _: None, limit=MiB)
    with pytest.raises(PackRefused, match=message):
        feed(guard, data, 3)


def test_an_empty_answer_is_no_pack_at_all() -> None:
    PackGuard(lambda _: None, limit=MiB).finish()


@pytest.mark.parametrize("size, text", [(900, "900 bytes"), (32 * MiB, "32 MiB"), (3 * MiB // 2, "1.5 MiB")])
def test_sizes_in_messages(size: int, text: str) -> None:
    assert mib(size) == text
