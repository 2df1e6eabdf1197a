"""The source's persisted index: what the mirror has been told about every path (SQLite).

One row per path per volume: kind (file, dir, symlink), size, mtime_ns, inode, mode, symlink target,
and for files the concatenated XXH3-128 block hashes plus the root over them. The source compares a
fresh read with this index to decide what to publish, and changes it **only after Kafka has
acknowledged** the events that describe the change: mutations are made inside an open transaction
(:meth:`SourceIndex.begin`) and committed by the agent once the acks are in, or rolled back if a send
failed, so a crash can make the source resend but never forget a change.

Sequence numbers live apart (:class:`SeqAllocator`): they are reserved durably in ranges *before*
use, so a restarted source never reuses a number a mirror may already have seen.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import PermanentError

FILE, DIR, SYMLINK = "f", "d", "l"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    volume   TEXT NOT NULL,
    path     TEXT NOT NULL,
    kind     TEXT NOT NULL,
    size     INTEGER NOT NULL DEFAULT 0,
    mtime_ns INTEGER NOT NULL DEFAULT 0,
    ino      INTEGER NOT NULL DEFAULT 0,
    mode     INTEGER NOT NULL DEFAULT 0,
    target   TEXT,
    hashes   BLOB,
    root     BLOB,
    PRIMARY KEY (volume, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Entry:
    path: str
    kind: str
    size: int = 0
    mtime_ns: int = 0
    ino: int = 0
    mode: int = 0
    target: str | None = None
    hashes: bytes = b""
    root: bytes = b""


def _prefix_bounds(path: str) -> tuple[str, str]:
    """Range [lo, hi) of strings that start with ``path + '/'`` ('0' sorts right after '/')."""
    return path + "/", path + "0"


class SourceIndex:
    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(db_path), isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise PermanentError(f"cannot open index {db_path}: {e}") from None
        self._in_tx = False

    def close(self) -> None:
        if self._in_tx:
            self.rollback()
        self.db.close()

    # -- transactions -------------------------------------------------------------------------
    def begin(self) -> None:
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True

    def commit(self) -> None:
        if self._in_tx:
            self.db.execute("COMMIT")
            self._in_tx = False

    def rollback(self) -> None:
        if self._in_tx:
            self.db.execute("ROLLBACK")
            self._in_tx = False

    # -- reads --------------------------------------------------------------------------------
    def get(self, volume: str, path: str) -> Entry | None:
        row = self.db.execute(
            "SELECT path, kind, size, mtime_ns, ino, mode, target, hashes, root FROM entries WHERE volume=? AND path=?",
            (volume, path),
        ).fetchone()
        return _entry(row) if row else None

    def iter_volume(self, volume: str) -> Iterator[Entry]:
        cur = self.db.execute(
            "SELECT path, kind, size, mtime_ns, ino, mode, target, hashes, root FROM entries WHERE volume=? ORDER BY path",
            (volume,),
        )
        for row in cur:
            yield _entry(row)

    def children(self, volume: str, path: str) -> list[str]:
        lo, hi = _prefix_bounds(path)
        return [r[0] for r in self.db.execute("SELECT path FROM entries WHERE volume=? AND path>=? AND path<?", (volume, lo, hi))]

    def count(self, volume: str) -> tuple[int, int]:
        row = self.db.execute("SELECT count(*), coalesce(sum(size),0) FROM entries WHERE volume=? AND kind='f'", (volume,)).fetchone()
        return int(row[0]), int(row[1])

    # -- writes (inside begin()/commit()) -------------------------------------------------------
    def put(self, volume: str, e: Entry) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO entries (volume, path, kind, size, mtime_ns, ino, mode, target, hashes, root)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)",
            (volume, e.path, e.kind, e.size, e.mtime_ns, e.ino, e.mode, e.target, e.hashes, e.root),
        )

    def delete(self, volume: str, path: str) -> None:
        self.db.execute("DELETE FROM entries WHERE volume=? AND path=?", (volume, path))

    def delete_tree(self, volume: str, path: str) -> None:
        lo, hi = _prefix_bounds(path)
        self.db.execute("DELETE FROM entries WHERE volume=? AND (path=? OR (path>=? AND path<?))", (volume, path, lo, hi))

    def rename(self, volume: str, src: str, dst: str) -> None:
        """Move ``src`` and everything below it to ``dst`` (which is replaced)."""
        self.delete_tree(volume, dst)
        lo, hi = _prefix_bounds(src)
        self.db.execute("UPDATE entries SET path=? WHERE volume=? AND path=?", (dst, volume, src))
        self.db.execute(
            "UPDATE entries SET path = ? || substr(path, ?) WHERE volume=? AND path>=? AND path<?",
            (dst, len(src) + 1, volume, lo, hi),
        )

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def _entry(row: tuple) -> Entry:
    return Entry(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7] or b"", row[8] or b"")


class SeqAllocator:
    """Per-volume sequence numbers with durable range reservation, plus the source's epoch.

    The state file holds ``{"epoch": ..., "reserved": {volume: n}}``: every number handed out is
    below the reserved mark, and the mark is fsynced before a number past the old mark is used. A
    restart continues from the mark, skipping at most one range; a lost state file makes a new epoch.
    """

    RANGE = 100_000

    def __init__(self, path: Path) -> None:
        self.path = path
        state: dict = {}
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            raise PermanentError(f"cannot read sequence state {path}: {e}") from None
        self.epoch: str = state.get("epoch") or secrets.token_hex(8)
        self.reserved: dict[str, int] = {k: int(v) for k, v in state.get("reserved", {}).items()}
        self.next: dict[str, int] = dict(self.reserved)
        if not state:
            self._save()

    def last(self, volume: str) -> int:
        """The most recent number handed out for this volume (or the restart mark minus one)."""
        return self.next.get(volume, 1) - 1

    def take(self, volume: str) -> int:
        n = self.next.get(volume, 1)
        if n >= self.reserved.get(volume, 0):
            self.reserved[volume] = n + self.RANGE
            self._save()
        self.next[volume] = n + 1
        return n

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        data = json.dumps({"epoch": self.epoch, "reserved": self.reserved}).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise PermanentError(f"cannot persist sequence state {self.path}: {e.strerror}") from None
