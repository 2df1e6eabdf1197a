"""Payload compression, one record at a time, done by the source in its read threads.

Kafka's own compression (``kafka.compression``) compresses whole producer batches on the event
loop, whatever they hold: on a volume of already-compressed data (PDFs, images, archives, VM disks)
that is CPU spent for nothing, on the one thread that publishes. Here each block or small file is
compressed where it was read (cramjam releases the GIL), and kept compressed only when that saves at
least 1/8 of it. A :class:`Packer` that meets incompressible data stops trying for the next
:data:`SKIP` payloads, so a large incompressible file costs one probe per :data:`SKIP` blocks.

The record carries the codec in its ``z`` field; :func:`unpack` (called by :func:`daemon.wire.decode`)
decompresses into a buffer of the declared length, so a hostile record cannot inflate past it.
No paths, Kafka or logging here.
"""

from __future__ import annotations

import cramjam

CODECS = ("zstd", "lz4")  # what may travel in a record's ``z`` field
CHOICES = ("zstd", "lz4", "none")  # ``source.compression``
MIN_SIZE = 512  # smaller payloads travel as they are
SAVE = 8  # a compressed payload is kept when it saves at least 1/SAVE of the bytes
SKIP = 16  # payloads sent as they are after one that did not compress, before trying again
ZSTD_LEVEL = 1


def pack(data: bytes, codec: str) -> tuple[bytes, str]:
    """(payload, codec) for ``data``: compressed with ``codec`` if that saves enough, else
    (``data``, "")."""
    if codec == "none" or len(data) < MIN_SIZE:
        return data, ""
    if codec == "zstd":
        out = cramjam.zstd.compress(data, level=ZSTD_LEVEL)
    elif codec == "lz4":
        out = cramjam.lz4.compress_block(data, store_size=False)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    if len(out) > len(data) - len(data) // SAVE:
        return data, ""
    return bytes(out), codec


class Packer:
    """:func:`pack` that stops trying for :data:`SKIP` payloads after one that did not compress.
    One per reader (not shared between threads)."""

    __slots__ = ("codec", "_skip")

    def __init__(self, codec: str) -> None:
        if codec not in CHOICES:
            raise ValueError(f"unknown codec {codec!r}")
        self.codec = codec
        self._skip = 0

    def pack(self, data: bytes) -> tuple[bytes, str]:
        if self.codec == "none" or len(data) < MIN_SIZE:
            return data, ""
        if self._skip:
            self._skip -= 1
            return data, ""
        out, z = pack(data, self.codec)
        if not z:
            self._skip = SKIP
        return out, z


def unpack(payload: bytes, codec: str, length: int) -> bytes:
    """The ``length`` bytes ``payload`` decompresses to; ValueError if it is not a valid
    ``codec`` stream of exactly that length (never allocates more than ``length``)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}")
    buf = bytearray(length)
    try:
        if codec == "zstd":
            n = cramjam.zstd.decompress_into(payload, buf)
        else:
            n = cramjam.lz4.decompress_block_into(payload, buf)
    except cramjam.DecompressionError as e:
        raise ValueError(f"{codec}: {e}") from None
    if n != length:
        raise ValueError(f"{codec}: {n} bytes, header says {length}")
    return bytes(buf)
