"""Pure block logic: split, hash (XXH3-128), zero detection, diff, file root.

No paths, Kafka, metrics or logging here: functions take bytes and known hashes and return plain
values, so they are tested with fixed vectors. A file of size S with block size B has
``ceil(S / B)`` blocks; the last one may be short; an empty file has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import xxhash

HASH_LEN = 16  # XXH3-128 digest


def block_hash(data: bytes | memoryview) -> bytes:
    """XXH3-128 digest of one block (16 bytes, big-endian canonical form)."""
    return xxhash.xxh3_128_digest(data)


def is_zero(data: bytes | memoryview) -> bool:
    """True when every byte of the block is 0 (cheap: compares against a zero buffer)."""
    n = len(data)
    if n == 0:
        return True
    return data == _zeros(n)


_ZERO_CACHE: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    z = _ZERO_CACHE.get(n)
    if z is None:
        z = bytes(n)
        if len(_ZERO_CACHE) < 64:
            _ZERO_CACHE[n] = z
    return z


def zero_hash(length: int) -> bytes:
    return block_hash(_zeros(length))


def block_count(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


@dataclass(frozen=True)
class Block:
    """One block of a file as read: index, offset, length, hash, and whether it is all zero."""

    index: int
    offset: int
    length: int
    hash: bytes
    zero: bool


def split(data: bytes, block_size: int, start_index: int = 0) -> Iterator[tuple[Block, memoryview]]:
    """Split a buffer into blocks; yields (Block, payload view)."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    mv = memoryview(data)
    for i in range(0, len(mv), block_size):
        chunk = mv[i : i + block_size]
        idx = start_index + i // block_size
        yield Block(idx, idx * block_size, len(chunk), block_hash(chunk), is_zero(chunk)), chunk


def changed(block: Block, known: bytes | None) -> bool:
    """Has this block changed relative to the concatenated hash list ``known``?"""
    return differs(known, block.index, block.hash)


def differs(known: bytes | None, index: int, h: bytes) -> bool:
    """Is ``h`` not the hash of block ``index`` in the concatenated hash list ``known``? (The
    reader's form of :func:`changed`: no Block is built for the blocks that did not change.)"""
    if known is None:
        return True
    start = index * HASH_LEN
    return known[start : start + HASH_LEN] != h


def truncate_hashes(hashes: bytes, size: int, block_size: int) -> bytes:
    """Hash list of a file after truncation to ``size``: whole blocks kept, a cut last block dropped.

    A block that was cut short no longer matches its old hash; callers rehash it.
    """
    keep = size // block_size
    return hashes[: keep * HASH_LEN]


def file_root(hashes: bytes, size: int) -> bytes:
    """Root hash of a file: XXH3-128 over its size and its concatenated block hashes."""
    h = xxhash.xxh3_128()
    h.update(size.to_bytes(8, "big"))
    h.update(hashes)
    return h.digest()
