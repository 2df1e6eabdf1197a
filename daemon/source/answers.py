"""Checkpoints and listings of one volume: the committed index, read off the loop, sent in order.

Both read the volume's index through a separate read-only connection in a worker thread (one WAL
snapshot: the last committed state), so they neither block the event loop nor see or disturb the
volume's open write transaction. The caller runs them between batches, when the committed index is
exactly what Kafka acknowledged.

* :func:`checkpoint_fields` streams the index through :class:`daemon.listing.Digest` (the volume
  digest, computed without holding the entries).
* :func:`send_listing` streams rows from the index cursor through :func:`daemon.listing.parts` and
  sends each part as a *sequenced* ``listing`` event; the caller awaits nothing else in between,
  so the parts get contiguous sequence numbers. Never the whole listing in memory.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..digest import listing_row
from ..store.source_index import SourceIndex
from ..listing import Digest, parts
from .batch import Batch
from .examine import close_reader
from .publisher import Publisher


def _digest(index: SourceIndex, volume: str) -> Digest:
    d = Digest()
    with index.reader() as r:
        for e in r.iter_volume(volume):
            d.add(e)  # type: ignore[arg-type]  # an Entry has every field a Row has
    return d


async def checkpoint_fields(index: SourceIndex, volume: str, ident: int, nonce: str | None) -> dict[str, Any]:
    d = await asyncio.to_thread(_digest, index, volume)
    f: dict[str, Any] = {"id": ident, "files": d.files, "bytes": d.bytes, "root": d.hexdigest()}
    if nonce:
        f["nonce"] = nonce
    return f


async def send_listing(index: SourceIndex, pub: Publisher, volume: str, nonce: str, b: Batch) -> int:
    """Send the volume's listing part by part (futures collected in ``b``); returns the row count."""
    reader = await asyncio.to_thread(index.reader)
    rows = 0
    try:
        gen = parts((listing_row(e) for e in reader.iter_volume(volume)), nonce)
        try:
            while (fields := await asyncio.to_thread(next, gen, None)) is not None:
                b.sent("listing", await pub.send(volume, "listing", fields))
                rows += len(fields["entries"])
        finally:
            close_reader(gen)
    finally:
        await asyncio.to_thread(reader.close)
    return rows
