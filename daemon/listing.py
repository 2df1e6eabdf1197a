"""Pure: listings — the source's index sent in bounded, verifiable parts.

A listing answers a mirror whose checkpoint disagreed: it is the source's whole index for one volume
at one point of the stream. It travels as ordinary *sequenced* ``listing`` events (deduplicated by
(epoch, seq) like every other event, so a replay never re-runs it), each part small enough for the
record limits with room to spare (:data:`PART_BYTES` of JSON rows, far under the decoder's 64 KiB
header limit). Rows are in path order (bytewise UTF-8, the order of the volume digest), strictly
increasing across parts, so a part can be checked on its own and the whole listing can be digested
as it streams in, without holding it in memory:

* every part carries ``phash`` = XXH3-128 of its rows' canonical JSON;
* the last part carries ``count`` (rows in the whole listing) and ``root`` — the volume digest of
  the rows (:func:`daemon.digest.volume_digest`), the same value a checkpoint at that point carries.

A mirror acts on a listing only when every part arrived, in order, contiguous in sequence, and the
count and root match. Nothing here does I/O.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator

import xxhash

from .digest import _encode, entry_key

PART_BYTES = 24 * 1024  # JSON bytes of rows per part (the header limit is 64 KiB)


@dataclass(frozen=True)
class Row:
    """One listing entry, shaped like an index entry for :func:`daemon.digest.entry_key`."""

    path: str
    kind: str
    size: int = 0
    mode: int = 0
    mtime_ns: int = 0
    root: bytes = b""
    target: str | None = None

    @classmethod
    def of(cls, r: list) -> "Row":
        path, kind, size, mode, mtime, x = r
        if kind == "f":
            return cls(path, "f", size, mode, mtime, bytes.fromhex(x))
        if kind == "d":
            return cls(path, "d", mode=mode)
        return cls(path, "l", target=x)


def rows_json(rows: list) -> bytes:
    """Canonical bytes of a part's rows (what ``phash`` covers)."""
    return json.dumps(rows, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


def part_hash(rows: list) -> str:
    return xxhash.xxh3_128_hexdigest(rows_json(rows))


def split(rows: Iterable[list], part_bytes: int = PART_BYTES) -> Iterator[list]:
    """Group rows (in path order) into parts of at most ``part_bytes`` of JSON; at least one part."""
    part: list = []
    size = 2
    for r in rows:
        n = len(rows_json(r)) + 1
        if part and size + n > part_bytes:
            yield part
            part, size = [], 2
        part.append(r)
        size += n
    yield part


def parts(rows: Iterable[list], nonce: str, part_bytes: int = PART_BYTES) -> Iterator[dict]:
    """The ``listing`` event fields for ``rows`` (listing rows in path order), part by part.

    Streams: holds one part (plus one look-ahead) in memory, so a source can feed rows straight
    from its index cursor. The last part carries ``count`` and ``root``."""
    d = Digest()
    prev: list | None = None
    n = 0
    for part in split(_digesting(rows, d), part_bytes):
        if prev is not None:
            yield {"nonce": nonce, "part": n, "last": False, "entries": prev, "phash": part_hash(prev)}
            n += 1
        prev = part
    if prev is None:  # split() yields at least one (possibly empty) part
        raise ValueError("listing.parts: split() produced no part")
    yield {"nonce": nonce, "part": n, "last": True, "entries": prev, "phash": part_hash(prev), "count": d.count, "root": d.hexdigest()}


def _digesting(rows: Iterable[list], d: "Digest") -> Iterator[list]:
    for r in rows:
        d.add(Row.of(r))
        yield r


class Digest:
    """The volume digest over entries fed in path order (bytewise), streaming.

    Equal to :func:`daemon.digest.volume_digest` over the same entries; raises ValueError if an
    entry is not strictly after the previous one (a listing out of order or with a duplicate)."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()
        self._last: bytes | None = None
        self.count = 0
        self.files = 0
        self.bytes = 0

    def add(self, e: Row) -> None:
        p = e.path.encode("utf-8", "surrogateescape")
        if self._last is not None and p <= self._last:
            raise ValueError(f"listing rows out of order at {e.path!r}")
        self._last = p
        k = entry_key(e)
        rec = _encode(e.path, k)
        self._h.update(struct.pack(">I", len(rec)))
        self._h.update(rec)
        self.count += 1
        if k[0] == "f":
            self.files += 1
            self.bytes += k[1]

    def hexdigest(self) -> str:
        return self._h.hexdigest()
