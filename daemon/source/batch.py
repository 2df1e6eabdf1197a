"""One batch of a volume: the events it sent, their acks, and the index transaction recording them.

A :class:`Batch` opens its own transaction on the volume's index when it is made, is the only way
the volume pipeline writes the index, and ends exactly once: :meth:`Batch.commit` after every
record was acknowledged by Kafka, or :meth:`Batch.rollback`. SQLite failures (disk full, I/O
error in ``state_dir``) become :class:`~daemon.errors.StateError` naming the index file, and a
failed commit rolls back, so the index only ever holds what Kafka acknowledged. The batch also
keeps what the caller needs after a failure (the paths attempted, the blocks that may have left)
and the counters published as metrics after a success.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

from ..errors import PublishError, StateError
from ..store.source_index import Entry, SourceIndex

BATCH_PATHS = 256
BATCH_BYTES = 64 * 1024 * 1024


class Batch:
    def __init__(self, index: SourceIndex | None, volume: str) -> None:
        """``index`` None: a batch that writes nothing (checkpoints, listings)."""
        self.index = index
        self.volume = volume
        self.futures: list[asyncio.Future[Any]] = []
        self.paths: list[str] = []  # attempted, in order
        self.sent_blocks: dict[str, set[int]] = {}
        self.payload_bytes = 0
        self.ops: dict[str, int] = {}
        self.blocks = {"changed": 0, "unchanged": 0, "zero": 0}
        self.files_done = 0
        self.bytes_read = 0
        self.started = time.monotonic()
        self.open = False
        if index is not None:
            self._write(index.begin)
            self.open = True

    # -- sends ------------------------------------------------------------------------------------
    def sent(self, op: str, fut: "asyncio.Future[Any]") -> None:
        self.futures.append(fut)
        self.ops[op] = self.ops.get(op, 0) + 1

    def sent_block(self, path: str, index: int) -> None:
        self.sent_blocks.setdefault(path, set()).add(index)

    @property
    def full(self) -> bool:
        return len(self.paths) >= BATCH_PATHS or self.payload_bytes >= BATCH_BYTES

    async def acks(self) -> None:
        """Wait for every record; PublishError if any was not acknowledged."""
        if not self.futures:
            return
        results = await asyncio.gather(*self.futures, return_exceptions=True)
        errs = [r for r in results if isinstance(r, BaseException)]
        if errs:
            raise PublishError(f"Kafka did not acknowledge {len(errs)} of {len(results)} records: {errs[0]!r}")

    # -- index writes -------------------------------------------------------------------------------
    def get(self, path: str) -> Entry | None:
        """The entry as this batch sees it (its own uncommitted changes included)."""
        return self._write(self._index().get, self.volume, path)

    def has_children(self, path: str) -> bool:
        """True if the index holds entries below ``path`` (as this batch sees it)."""
        return bool(self._write(self._index().children, self.volume, path))

    def put(self, e: Entry) -> None:
        self._write(self._index().put, self.volume, e)

    def delete(self, path: str) -> None:
        self._write(self._index().delete, self.volume, path)

    def delete_tree(self, path: str) -> None:
        self._write(self._index().delete_tree, self.volume, path)

    def rename(self, src: str, dst: str) -> None:
        self._write(self._index().rename, self.volume, src, dst)

    # -- the end ----------------------------------------------------------------------------------
    def commit(self) -> None:
        """Make the index changes durable; on failure roll back and raise StateError."""
        if not self.open:
            return
        idx = self._index()
        try:
            idx.commit()
        except sqlite3.Error as e:
            self.rollback()
            raise StateError(f"cannot commit index {idx.path}: {e}") from None
        self.open = False

    def rollback(self) -> None:
        if not self.open:
            return
        self.open = False
        try:
            self._index().rollback()
        except sqlite3.Error:
            pass  # SQLite already rolled back (e.g. after SQLITE_FULL), or the file is gone

    async def settle(self) -> float:
        """Acks, then commit; returns the seconds the acks took. Rolls back on any failure."""
        try:
            t0 = time.monotonic()
            await self.acks()
            took = time.monotonic() - t0
            self.commit()
            return took
        except BaseException:
            self.rollback()
            raise

    def _index(self) -> SourceIndex:
        if self.index is None:
            raise ValueError("this batch has no index")
        return self.index

    def _write(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except sqlite3.Error as e:
            path = self.index.path if self.index is not None else "?"
            raise StateError(f"index {path}: {e}") from None
