"""Object sizes in an incoming git pack, checked as the pack streams in and before anything inflates an object.

A repository anyone can commit to can hold a blob of gigabytes of zeros that compresses to a few hundred
kilobytes; dulwich inflates every object whole to index the pack. `PackGuard` sits between the transport and the
file the pack is written to: it reads each object's header (type and size) and, for a delta, the result size at the
start of its delta data, and refuses the pack with PackRefused as soon as one is over the limit — before the
object is inflated, and so before the agent's memory grows by it. Objects within the limit are inflated here in
small pieces, only to find where each ends (and to check that none inflates beyond its declared size).

    guard = PackGuard(file.write, limit=32 * 1024 * 1024)
    client.fetch_pack(path, determine_wants, graph_walker, guard.write)   # raises PackRefused mid-stream
    guard.finish()                                                        # the pack ended where it should
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

from bundles.errors import SourceError

_OFS_DELTA = 6
_REF_DELTA = 7
_TYPES = {1: "commit", 2: "tree", 3: "blob", 4: "tag", _OFS_DELTA: "delta", _REF_DELTA: "delta"}
_INFLATE_STEP = 64 * 1024  # bytes inflated at a time: the guard's own memory
_DELTA_HEADER_MAX = 20  # two size varints of at most 10 bytes each
_SHA1_LEN = 20


class PackRefused(SourceError):
    """The repository sent an object over git_max_object_bytes, or data that is not a pack; nothing was stored."""

    retryable = False  # the same commit is refused again: it needs a person (a commit, a higher limit)


def mib(size: int) -> str:
    """A byte count for messages: `256 MiB`, `1.5 MiB`, `900 bytes`."""
    if size < 1024 * 1024:
        return f"{size} bytes"
    value = size / (1024 * 1024)
    return f"{value:.0f} MiB" if value == int(value) else f"{value:.1f} MiB"


class PackGuard:
    """A pack-data sink that forwards every chunk to `write` once the objects it starts are known to be small enough.

    Raises PackRefused (with the object's number, type and size) on the first object over `limit`, and on data
    that is not a pack.
    """

    def __init__(self, write: Callable[[bytes], object], limit: int) -> None:
        self._write = write
        self.limit = limit
        self._buf = bytearray()  # bytes of a header not yet complete
        self._count: int | None = None  # objects the pack header announces
        self._index = 0  # objects fully read
        self._inflater: zlib._Decompress | None = None
        self._kind = ""
        self._size = 0  # the current object's declared (inflated) size
        self._inflated = 0
        self._delta_head: bytearray | None = None  # the first inflated bytes of a delta, until its sizes are known
        self._trailer = 0  # checksum bytes still expected after the last object
        self.largest = 0  # the largest object size seen (a delta counts by its result), for tests and logs

    def write(self, data: bytes) -> int:
        """Take the next piece of the pack (dulwich's pack_data callback)."""
        view = memoryview(data)
        while view:
            view = self._step(view)
        self._write(data)
        return len(data)

    def finish(self) -> None:
        """Check the pack ended after its last object (an empty stream is no pack at all: nothing to fetch)."""
        if self._count is None and not self._buf:
            return
        if self._count is None or self._index < self._count or self._inflater is not None or self._trailer:
            raise self._refuse("the pack ended early")

    # --- the state machine: pack header, then per object a header and a zlib stream, then the checksum ---

    def _step(self, view: memoryview) -> memoryview:
        if self._count is None:
            return self._pack_header(view)
        if self._inflater is not None:
            return self._inflate(view)
        if self._index < self._count:
            return self._object_header(view)
        taken = min(len(view), self._trailer)
        self._trailer -= taken
        if len(view) > taken:
            raise self._refuse("data follows the pack's checksum")
        return view[taken:]

    def _pack_header(self, view: memoryview) -> memoryview:
        need = 12 - len(self._buf)
        self._buf += view[:need]
        if len(self._buf) < 12:
            return view[len(view) :]
        magic, version, count = struct.unpack(">4sLL", bytes(self._buf))
        if magic != b"PACK" or version not in (2, 3):
            raise self._refuse("the server sent data that is not a git pack")
        self._buf.clear()
        self._count = count
        self._trailer = _SHA1_LEN
        return view[need:]

    def _object_header(self, view: memoryview) -> memoryview:
        # type and size (4 bits, then 7 per byte while the high bit is set); a delta then names its base: an offset
        # (a varint) or an object id (20 bytes).
        for i, byte in enumerate(view):
            self._buf.append(byte)
            if self._header_complete():
                self._begin_object()
                return view[i + 1 :]
            if len(self._buf) > 32:
                raise self._refuse(f"object {self._index + 1} has a malformed header")
        return view[len(view) :]

    def _header_complete(self) -> bool:
        buf = self._buf
        n = 0
        while n < len(buf) and buf[n] & 0x80:
            n += 1
        if n == len(buf):
            return False  # the size varint goes on
        n += 1
        kind = (buf[0] >> 4) & 0x07
        if kind == _OFS_DELTA:
            m = n
            while m < len(buf) and buf[m] & 0x80:
                m += 1
            return m < len(buf)
        if kind == _REF_DELTA:
            return len(buf) >= n + _SHA1_LEN
        return True

    def _begin_object(self) -> None:
        buf = self._buf
        kind = (buf[0] >> 4) & 0x07
        if kind not in _TYPES:
            raise self._refuse(f"object {self._index + 1} has an unknown type {kind}")
        size = buf[0] & 0x0F
        shift = 4
        n = 0
        while buf[n] & 0x80:
            n += 1
            size |= (buf[n] & 0x7F) << shift
            shift += 7
        self._kind = _TYPES[kind]
        self._size = size
        self._check(size, self._kind)
        self._buf.clear()
        self._inflater = zlib.decompressobj()
        self._inflated = 0
        self._delta_head = bytearray() if kind in (_OFS_DELTA, _REF_DELTA) else None

    def _inflate(self, view: memoryview) -> memoryview:
        inflater = self._inflater
        assert inflater is not None
        data: bytes | memoryview = view
        while True:
            out = inflater.decompress(data, _INFLATE_STEP)
            self._inflated += len(out)
            if self._inflated > self._size:
                raise self._refuse(f"object {self._index + 1} inflates beyond its declared {mib(self._size)}")
            if self._delta_head is not None:
                self._read_delta_head(out)
            data = inflater.unconsumed_tail
            if not data or inflater.eof:  # past the end, the rest stays in unconsumed_tail too
                break
        if not inflater.eof:
            return view[len(view) :]
        if self._inflated != self._size or self._delta_head is not None:
            raise self._refuse(f"object {self._index + 1} does not inflate to its declared {mib(self._size)}")
        rest = inflater.unused_data
        self._inflater = None
        self._index += 1
        return memoryview(rest)

    def _read_delta_head(self, out: bytes) -> None:
        # A delta starts with two varints (7 bits per byte, low first): the base's size and the result's size.
        head = self._delta_head
        assert head is not None
        head += out[: _DELTA_HEADER_MAX - len(head)]
        ends = [i for i, byte in enumerate(head) if not byte & 0x80]
        if len(ends) < 2:
            if len(head) >= _DELTA_HEADER_MAX:
                raise self._refuse(f"object {self._index + 1} has a malformed delta header")
            return
        result = 0
        for shift, byte in enumerate(head[ends[0] + 1 : ends[1] + 1]):
            result |= (byte & 0x7F) << (7 * shift)
        self._delta_head = None
        self._check(result, "object (a delta's result)")

    def _check(self, size: int, kind: str) -> None:
        self.largest = max(self.largest, size)
        if size > self.limit:
            raise PackRefused(
                f"the repository holds a {mib(size)} {kind} (object {self._index + 1} of {self._count} in the pack), "
                f"over git_max_object_bytes ({mib(self.limit)}); nothing was fetched: remove it from the "
                "repository's history, or raise git_max_object_bytes"
            )

    def _refuse(self, what: str) -> PackRefused:
        return PackRefused(f"{what}; nothing was fetched: check the server")
