"""Listings being received: spooled to disk part by part, verified before anyone may act on them.

A listing is the source's whole index at one point of the stream; at 100,000 entries it is tens of
megabytes of rows, so parts go into a scratch SQLite file (``state_dir/listing-spool.sqlite``), not
memory. Each part is checked as it arrives (same nonce and epoch, the next part number, the next
sequence number — parts are contiguous in the stream —, its ``phash``, rows strictly after the
previous row); the last part's ``count`` and ``root`` are checked against the digest of every row
received. Only then is the listing *complete*: :meth:`ListingSpool.add` returns the verified state,
and :meth:`rows` streams the rows in path order. Any failed check discards the listing: a partial or
inconsistent listing is never compared, so it can never justify a deletion.

Runs on the mirror's apply thread, like the rest of the mirror's state.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import PermanentError
from ..listing import Digest, Row, part_hash
from ..wire import Event


class ListingError(Exception):
    """A listing part that cannot belong to a complete, verified listing (the listing is dropped)."""


@dataclass
class _Receiving:
    vol: str
    nonce: str
    epoch: str
    first_seq: int
    next_seq: int
    next_part: int = 0
    digest: Digest = field(default_factory=Digest)


class ListingSpool:
    def __init__(self, path: Path) -> None:
        try:
            self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=OFF")
            self.db.execute("PRAGMA synchronous=OFF")
            self.db.execute("DROP TABLE IF EXISTS rows")
            self.db.execute(
                "CREATE TABLE rows (volume TEXT NOT NULL, path TEXT NOT NULL, kind TEXT NOT NULL, size INTEGER NOT NULL,"
                " mode INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, x TEXT NOT NULL, PRIMARY KEY (volume, path)) WITHOUT ROWID"
            )
        except sqlite3.Error as e:
            raise PermanentError(f"cannot open listing spool {path}: {e}") from None
        self.active: dict[str, _Receiving] = {}

    def close(self) -> None:
        self.db.close()

    def receiving(self, vol: str) -> _Receiving | None:
        return self.active.get(vol)

    def discard(self, vol: str) -> None:
        self.active.pop(vol, None)
        self.db.execute("DELETE FROM rows WHERE volume=?", (vol,))

    def add(self, ev: Event) -> _Receiving | None:
        """Take one part; returns the verified listing after its last part, else None.

        Raises ListingError (and discards what was received) if the part does not fit."""
        vol = ev.vol
        cur = self.active.get(vol)
        if ev["part"] == 0:
            if cur is not None:
                self.discard(vol)
            cur = self.active[vol] = _Receiving(vol, ev["nonce"], ev.epoch, ev.seq, ev.seq)
        try:
            self._check(cur, ev)
            rows = ev["entries"]
            for r in rows:
                cur.digest.add(Row.of(r))
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO rows VALUES (?,?,?,?,?,?,?)", [(vol, *r) for r in rows])
            self.db.execute("COMMIT")
        except (ListingError, ValueError, sqlite3.Error) as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self.discard(vol)
            raise ListingError(str(e)) from None
        cur.next_seq += 1
        cur.next_part += 1
        if not ev["last"]:
            return None
        if ev.get("count") != cur.digest.count or ev.get("root") != cur.digest.hexdigest():
            self.discard(vol)
            raise ListingError(
                f"listing {cur.nonce} of {vol} does not verify: {cur.digest.count} rows received, source says "
                f"{ev.get('count')}; digest {'matches' if ev.get('root') == cur.digest.hexdigest() else 'differs'}"
            )
        del self.active[vol]
        return cur

    def _check(self, cur: _Receiving | None, ev: Event) -> None:
        if cur is None:
            raise ListingError(f"listing part {ev['part']} without part 0")
        if ev["nonce"] != cur.nonce or ev.epoch != cur.epoch:
            raise ListingError("listing part of another listing or epoch interleaved")
        if ev["part"] != cur.next_part or ev.seq != cur.next_seq:
            raise ListingError(f"listing part {ev['part']} (seq {ev.seq}) where part {cur.next_part} (seq {cur.next_seq}) was due")
        if part_hash(ev["entries"]) != ev["phash"]:
            raise ListingError(f"listing part {ev['part']}: rows do not match their hash")

    def has(self, vol: str, path: str) -> bool:
        return self.db.execute("SELECT 1 FROM rows WHERE volume=? AND path=?", (vol, path)).fetchone() is not None

    def has_below(self, vol: str, path: str) -> bool:
        """True if the listing has any row below ``path`` ('0' sorts right after '/')."""
        return self.db.execute("SELECT 1 FROM rows WHERE volume=? AND path>=? AND path<? LIMIT 1",
                               (vol, path + "/", path + "0")).fetchone() is not None

    def rows(self, vol: str) -> Iterator[Row]:
        """The rows of the volume's complete listing, in path order (bytewise UTF-8)."""
        cur = self.db.execute("SELECT path, kind, size, mode, mtime_ns, x FROM rows WHERE volume=? ORDER BY path", (vol,))
        for r in cur:
            yield Row.of(list(r))
