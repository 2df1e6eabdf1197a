"""Pure: the volume digest both sides compute for a checkpoint, and listing entries.

A volume digest is XXH3-128 over every index entry in path order (bytewise UTF-8 with surrogate
escapes, i.e. the order of the file names' bytes): path, kind, and what defines the entry — for a
file its size, mode, mtime_ns and root hash; for a directory its mode; for a symlink its target. The
source computes it from its index (what it told the stream), the mirror from its own index (what it
applied); equal digests at the same point of the stream mean the two trees are identical as of that
point.
"""

from __future__ import annotations

import os
import struct
from typing import Iterable, Protocol

import xxhash


class EntryLike(Protocol):
    path: str
    kind: str
    size: int
    mtime_ns: int
    mode: int
    target: str | None
    root: bytes


def entry_key(e: EntryLike) -> tuple:
    """The facts of an entry that must match between source and mirror."""
    if e.kind == "f":
        return ("f", e.size, e.mode, e.mtime_ns, bytes(e.root))
    if e.kind == "d":
        return ("d", e.mode)
    return ("l", e.target or "")


def _encode(path: str, key: tuple) -> bytes:
    p = os.fsencode(path)
    if key[0] == "f":
        # mtime_ns is signed: files dated before 1970 are legal (same bytes as unsigned when >= 0)
        return p + b"\0f" + struct.pack(">QIq", key[1], key[2], key[3]) + key[4]
    if key[0] == "d":
        return p + b"\0d" + struct.pack(">I", key[1])
    return p + b"\0l" + os.fsencode(key[1])


def volume_digest(entries: Iterable[EntryLike]) -> tuple[bytes, int, int]:
    """(root, number of files, bytes in files) over entries; sorts them by path bytes."""
    items = sorted(((os.fsencode(e.path), e) for e in entries), key=lambda t: t[0])
    h = xxhash.xxh3_128()
    files = nbytes = 0
    for _, e in items:
        k = entry_key(e)
        rec = _encode(e.path, k)
        h.update(struct.pack(">I", len(rec)))
        h.update(rec)
        if k[0] == "f":
            files += 1
            nbytes += k[1]
    return h.digest(), files, nbytes


def listing_row(e: EntryLike) -> list:
    """Compact JSON row of a listing event: [path, kind, size, mode, mtime_ns, root-hex | target]."""
    if e.kind == "f":
        return [e.path, "f", e.size, e.mode, e.mtime_ns, bytes(e.root).hex()]
    if e.kind == "d":
        return [e.path, "d", 0, e.mode, 0, ""]
    return [e.path, "l", 0, 0, 0, e.target or ""]
