"""The source's persisted index: what the mirror has been told about every path (SQLite).

One row per path per volume: kind (file, dir, symlink), size, mtime_ns, inode, mode, symlink target,
and for files the concatenated XXH3-128 block hashes plus the root over them. The source compares a
fresh read with this index to decide what to publish, and changes it **only after Kafka has
acknowledged** the events that describe the change: mutations are made inside an open transaction
(:meth:`SourceIndex.begin`) and committed by the agent once the acks are in, or rolled back if a send
failed, so a crash can make the source resend but never forget a change.

Each source volume owns its own index file (:func:`volume_index`: ``state_dir/index-<volume>.sqlite``,
rows imported once from a pre-split ``state_dir/index.sqlite``), so one volume's transaction never
commits another's rows. Long reads (checkpoints, listings, reconcile scans) go through a separate
read-only connection (:class:`IndexReader`) in a worker thread: in WAL mode it sees the last
committed state and does not disturb the volume's open write transaction.

Sequence numbers live apart (:class:`SeqAllocator`): they are reserved durably in ranges *before*
use, so a restarted source never reuses a number a mirror may already have seen.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from ..errors import PermanentError, StateError

log = logging.getLogger("volmirror.index")

FILE, DIR, SYMLINK = "f", "d", "l"

_COLUMNS = "path, kind, size, mtime_ns, ino, mode, target, hashes, root"
LEGACY_NAME = "index.sqlite"
READ_CHUNK = 1000  # rows fetched per step by IndexReader

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


@dataclass(frozen=True, slots=True)  # hundreds of thousands at once during a scan
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
        self.path = db_path
        self._in_tx = False

    def close(self) -> None:
        if self._in_tx:
            self.rollback()
        self.db.close()

    @property
    def in_transaction(self) -> bool:
        return self._in_tx

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
        """Undo the open transaction; tolerant of SQLite having rolled it back already (SQLITE_FULL)."""
        if self._in_tx:
            try:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
            finally:
                self._in_tx = False

    # -- one-time import from the single pre-split index ----------------------------------------
    def import_volume(self, legacy: Path, volume: str) -> int | None:
        """Copy ``volume``'s rows from an older shared index file, once (remembered in ``meta``).

        Returns the number of rows copied, or None if the import was done before. Raises
        sqlite3.Error (the caller reports it; nothing is half-imported: one transaction)."""
        if self.get_meta("imported") is not None:
            return None
        n = 0
        if legacy.exists() and legacy.resolve() != self.path.resolve():
            self.db.execute("ATTACH DATABASE ? AS legacy", (str(legacy),))
            try:
                self.begin()
                cur = self.db.execute(
                    f"INSERT OR IGNORE INTO entries (volume, {_COLUMNS}) SELECT volume, {_COLUMNS} FROM legacy.entries WHERE volume=?",
                    (volume,),
                )
                n = cur.rowcount
                self.set_meta("imported", str(legacy))
                self.commit()
            except BaseException:
                self.rollback()
                raise
            finally:
                self.db.execute("DETACH DATABASE legacy")
        else:
            self.begin()
            self.set_meta("imported", "")
            self.commit()
        return n

    def reader(self) -> "IndexReader":
        """A fresh read-only connection to this index (use it in one thread at a time)."""
        return IndexReader(self.path)

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
        """Move ``src`` and everything below it to ``dst``. Rows already below ``dst`` that no
        moved row replaces are kept, as the mirror merges a rename onto a non-empty directory:
        when a directory's new content was examined (and published) before its rename event, the
        rows must stay, or a later listing would have the mirror delete files the source has."""
        lo, hi = _prefix_bounds(src)
        self.db.execute(
            "DELETE FROM entries WHERE volume=? AND path IN (SELECT ? || substr(path, ?) FROM entries WHERE volume=? AND path>=? AND path<?)",
            (volume, dst, len(src) + 1, volume, lo, hi),
        )
        if self.db.execute("SELECT 1 FROM entries WHERE volume=? AND path=?", (volume, src)).fetchone():
            self.db.execute("DELETE FROM entries WHERE volume=? AND path=?", (volume, dst))
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


class IndexReader:
    """A read-only connection to an index file, for long reads in a worker thread.

    Every read runs in its own read transaction (one WAL snapshot: the last committed state), fetched
    in chunks of :data:`READ_CHUNK` rows, so a listing of millions of entries is never in memory and
    the writer's open transaction is neither seen nor blocked."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path
        try:
            self.db = sqlite3.connect(f"file:{quote(str(db_path))}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StateError(f"cannot open index {db_path} for reading: {e}") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "IndexReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def iter_volume(self, volume: str, chunk: int = READ_CHUNK) -> Iterator[Entry]:
        """Every entry of the volume in path order (bytewise UTF-8), from one snapshot."""
        try:
            self.db.execute("BEGIN")
            try:
                cur = self.db.execute(f"SELECT {_COLUMNS} FROM entries WHERE volume=? ORDER BY path", (volume,))
                while rows := cur.fetchmany(chunk):
                    for r in rows:
                        yield _entry(r)
            finally:
                try:
                    if self.db.in_transaction:
                        self.db.execute("COMMIT")
                except sqlite3.Error:
                    pass  # closed under an abandoned read: nothing to keep
        except sqlite3.Error as e:
            raise StateError(f"cannot read index {self.path}: {e}") from None


def volume_index(state_dir: Path, volume: str) -> SourceIndex:
    """Open (create) the index of one source volume: ``state_dir/index-<volume>.sqlite``.

    On first open, the volume's rows are imported from ``state_dir/index.sqlite`` (the single index
    of older versions) so an upgraded source does not resend everything. Failures are StateError."""
    path = state_dir / f"index-{volume}.sqlite"
    try:
        idx = SourceIndex(path)
    except PermanentError as e:
        raise StateError(str(e)) from None
    try:
        n = idx.import_volume(state_dir / LEGACY_NAME, volume)
    except sqlite3.Error as e:
        idx.close()
        raise StateError(f"cannot import volume {volume} into {path}: {e}") from None
    if n:
        log.info("imported %d index entries of %s from %s", n, volume, state_dir / LEGACY_NAME, extra={"volume": volume})
    return idx


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
        self.ok = True  # False while the last attempt to persist the state failed
        if not state:
            try:
                self._save(self.reserved)
            except StateError as e:  # nothing is handed out before a save succeeds: take() retries
                log.error("%s", e, extra={"path": str(path)})

    def last(self, volume: str) -> int:
        """The most recent number handed out for this volume (or the restart mark minus one)."""
        return self.next.get(volume, 1) - 1

    def take(self, volume: str) -> int:
        """The next number of ``volume``. Past the reserved mark, a new range is persisted first; if
        that fails, StateError is raised, nothing is handed out and the next call tries again."""
        n = self.next.get(volume, 1)
        if n >= self.reserved.get(volume, 0):
            reserved = {**self.reserved, volume: n + self.RANGE}
            self._save(reserved)
            self.reserved = reserved
        self.next[volume] = n + 1
        return n

    def _save(self, reserved: dict[str, int]) -> None:
        try:
            self._write(reserved)
        except OSError as e:
            self.ok = False
            raise StateError(f"cannot persist sequence state {self.path}: {e.strerror or e}") from None
        self.ok = True

    def _write(self, reserved: dict[str, int]) -> None:
        tmp = self.path.with_suffix(".tmp")
        data = json.dumps({"epoch": self.epoch, "reserved": reserved}).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
