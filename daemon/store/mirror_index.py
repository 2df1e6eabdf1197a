"""The mirror's own index: what it has applied, per path, and the progress that goes with it.

Same schema as the source's index (``daemon.store.source_index``), in ``state_dir/mirror.sqlite``, plus a
``progress`` table (per volume: epoch, seq, last source timestamp, partition). Files being written
are kept in a small write-back cache (a block event updates one hash in memory, not a SQLite blob);
the cache and the progress are written in one transaction at each durability point, so the index
and the progress can never disagree after a crash.

Everything here runs on the mirror's apply thread; only the in-memory progress is read elsewhere.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..blocks import HASH_LEN
from ..errors import StateError
from .source_index import Entry, SourceIndex

UNKNOWN = b"\0" * HASH_LEN

_PROGRESS = """
CREATE TABLE IF NOT EXISTS progress (
    volume    TEXT PRIMARY KEY,
    epoch     TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    last_ts   REAL NOT NULL,
    partition INTEGER NOT NULL DEFAULT -1
);
CREATE TABLE IF NOT EXISTS quarantine (
    volume    TEXT NOT NULL,
    path      TEXT NOT NULL,
    reason    TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset"  INTEGER NOT NULL,
    ts        REAL NOT NULL,
    detail    TEXT NOT NULL,
    PRIMARY KEY (volume, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS points (
    volume     TEXT NOT NULL,
    segment    INTEGER NOT NULL,  -- the history segment that starts here (daemon.mirror.history)
    source_id  INTEGER NOT NULL,
    epoch      TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    src_ts     REAL NOT NULL,     -- the source's clock when it sent the point
    applied_ts REAL NOT NULL,
    state      TEXT NOT NULL,     -- unverified | verified | mismatch (a checkpoint right after it)
    root       TEXT,              -- the checkpoint's volume digest when verified
    PRIMARY KEY (volume, segment)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Point:
    volume: str
    segment: int
    source_id: int
    epoch: str
    seq: int
    src_ts: float
    applied_ts: float
    state: str
    root: str | None


POINT_COLS = "volume, segment, source_id, epoch, seq, src_ts, applied_ts, state, root"


def read_points(db: sqlite3.Connection, vol: str) -> list[Point]:
    """A volume's restore points, oldest first (from any connection to the mirror index)."""
    try:
        rows = db.execute(f"SELECT {POINT_COLS} FROM points WHERE volume=? ORDER BY segment", (vol,)).fetchall()
    except sqlite3.OperationalError:  # an index written before restore points existed
        return []
    return [Point(*r) for r in rows]


@dataclass
class VolumeProgress:
    epoch: str = ""
    seq: int = -1
    last_ts: float = 0.0
    partition: int = -1


@dataclass
class FileRec:
    """A mutable file entry while the mirror writes it."""

    path: str
    size: int = 0
    mode: int = 0o600
    mtime_ns: int = 0
    hashes: bytearray = field(default_factory=bytearray)
    root: bytes = b""

    def entry(self) -> Entry:
        return Entry(self.path, "f", self.size, self.mtime_ns, 0, self.mode, None, bytes(self.hashes), self.root)


class MirrorIndex(SourceIndex):
    def __init__(self, db_path: Path) -> None:
        super().__init__(db_path)
        self.db_path = db_path
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_PROGRESS)
        self.lock = threading.Lock()
        self.volumes: dict[str, VolumeProgress] = {}
        self._load_progress()
        self._cache: dict[tuple[str, str], FileRec] = {}
        self.gen: dict[tuple[str, str], int] = {}  # bumped on every change, for the scrubber
        # files with blocks applied and no manifest yet: on disk they are legitimately between two
        # versions (a batch cut by a failure is re-sent), so the scrubber leaves them alone
        self.writing: set[tuple[str, str]] = set()

    # -- progress -------------------------------------------------------------------------------
    def progress(self, vol: str) -> VolumeProgress:
        p = self.volumes.get(vol)
        if p is None:
            p = self.volumes[vol] = VolumeProgress()
        return p

    def is_duplicate(self, vol: str, epoch: str, seq: int) -> bool:
        p = self.volumes.get(vol)
        return p is not None and p.epoch == epoch and seq <= p.seq

    def _load_progress(self) -> None:
        self.quarantine: dict[str, dict[str, tuple]] = {}
        for vol, path, reason, part, off, ts, detail in self.db.execute('SELECT volume, path, reason, partition, "offset", ts, detail FROM quarantine'):
            self.quarantine.setdefault(vol, {})[path] = (reason, part, off, ts, detail)
        self.volumes.clear()
        for vol, epoch, seq, ts, part in self.db.execute("SELECT volume, epoch, seq, last_ts, partition FROM progress"):
            self.volumes[vol] = VolumeProgress(epoch, seq, ts, part)

    def checkpoint(self) -> None:
        """Write cached files and progress in one transaction (call after fsync).

        On failure (state_dir full) everything goes back to the last durable point — the open
        transaction, the cached files and the in-memory progress — and StateError is raised: the
        caller must re-read the stream from the offsets of that point. Progress is never saved
        ahead of the index."""
        with self.lock:
            try:
                self.begin()
                for (vol, _), rec in self._cache.items():
                    self.put(vol, rec.entry())
                rows = [(k, v.epoch, v.seq, v.last_ts, v.partition) for k, v in self.volumes.items() if v.epoch]
                self.db.executemany("INSERT OR REPLACE INTO progress (volume, epoch, seq, last_ts, partition) VALUES (?,?,?,?,?)", rows)
                self.commit()
            except sqlite3.Error as e:
                self.reset()
                raise StateError(f"cannot write the mirror index {self.db_path}: {e}") from None
            self._cache.clear()

    def reset(self) -> None:
        """Back to the last committed state (after a failed write): drop the open transaction, the
        cached files and in-memory progress."""
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        self._in_tx = False
        self._cache.clear()
        self._load_progress()

    # -- restore points ---------------------------------------------------------------------------
    def latest_segments(self) -> dict[str, int]:
        """Volume → the segment of its latest restore point."""
        return {v: k for v, k in self.db.execute("SELECT volume, max(segment) FROM points GROUP BY volume")}

    def volume_has_entries(self, vol: str) -> bool:
        return self.db.execute("SELECT 1 FROM entries WHERE volume=? LIMIT 1", (vol,)).fetchone() is not None or \
            any(v == vol for v, _ in self._cache)

    def add_point(self, vol: str, source_id: int, epoch: str, seq: int, src_ts: float, applied_ts: float, state: str = "unverified") -> int:
        """Record a restore point in the open transaction (committed by the next checkpoint()); its segment."""
        self.begin()
        row = self.db.execute("SELECT max(segment) FROM points WHERE volume=?", (vol,)).fetchone()
        k = (row[0] or 0) + 1
        self.db.execute(f"INSERT INTO points ({POINT_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                        (vol, k, source_id, epoch, seq, src_ts, applied_ts, state, None))
        return k

    def points(self, vol: str) -> list[Point]:
        return read_points(self.db, vol)

    def point_verified(self, vol: str, seq: int, epoch: str, match: bool, root: str) -> Point | None:
        """A checkpoint came right after the point at (epoch, seq - 1): record whether it matched."""
        row = self.db.execute("SELECT segment FROM points WHERE volume=? AND epoch=? AND seq=?", (vol, epoch, seq - 1)).fetchone()
        if row is None:
            return None
        self.begin()
        self.db.execute("UPDATE points SET state=?, root=? WHERE volume=? AND segment=?",
                        ("verified" if match else "mismatch", root if match else None, vol, row[0]))
        return next((p for p in self.points(vol) if p.segment == row[0]), None)

    def break_points(self, vol: str, upto: int) -> None:
        """Points up to segment ``upto`` can no longer be rebuilt (their history is incomplete)."""
        self.begin()
        self.db.execute("UPDATE points SET state='broken' WHERE volume=? AND segment<=?", (vol, upto))

    def drop_points(self, vol: str, below: int) -> None:
        """Forget points whose segments were pruned (segment < below)."""
        self.begin()
        self.db.execute("DELETE FROM points WHERE volume=? AND segment<?", (vol, below))

    def files_below(self, vol: str, path: str) -> int:
        """Files recorded at or below ``path`` (what a removal of it takes away)."""
        row = self.db.execute("SELECT count(*) FROM entries WHERE volume=? AND kind='f' AND (path=? OR (path>=? AND path<?))",
                              (vol, path, path + "/", path + "0")).fetchone()
        return int(row[0])  # files still only in the write-back cache are not counted: a guard's estimate

    # -- quarantine: paths whose records this mirror cannot apply ----------------------------------
    def quarantine_add(self, vol: str, path: str, reason: str, partition: int, offset: int, ts: float, detail: str) -> bool:
        new = path not in self.quarantine.get(vol, {})
        self.quarantine.setdefault(vol, {})[path] = (reason, partition, offset, ts, detail)
        self.begin()
        self.db.execute('INSERT OR REPLACE INTO quarantine (volume, path, reason, partition, "offset", ts, detail) VALUES (?,?,?,?,?,?,?)',
                        (vol, path, reason, partition, offset, ts, detail))
        return new

    def quarantine_clear(self, vol: str, path: str, *, tree: bool = False) -> list[str]:
        q = self.quarantine.get(vol)
        if not q:
            return []
        pre = path + "/"
        gone = [p for p in q if p == path or (tree and p.startswith(pre))]
        if gone:
            self.begin()
            for p in gone:
                del q[p]
                self.db.execute("DELETE FROM quarantine WHERE volume=? AND path=?", (vol, p))
        return gone

    def is_quarantined(self, vol: str, path: str) -> bool:
        q = self.quarantine.get(vol)
        if not q:
            return False
        if path in q:
            return True
        i = path.rfind("/")
        while i > 0:  # below a quarantined directory
            if path[:i] in q:
                return True
            i = path.rfind("/", 0, i)
        return False

    # -- entries --------------------------------------------------------------------------------
    def touch(self, vol: str, path: str) -> None:
        k = (vol, path)
        self.gen[k] = self.gen.get(k, 0) + 1

    def file(self, vol: str, path: str) -> FileRec:
        """The cached, mutable record of a file (created if missing or of another kind)."""
        k = (vol, path)
        rec = self._cache.get(k)
        if rec is None:
            e = self.get(vol, path)
            if e is not None and e.kind == "f":
                rec = FileRec(path, e.size, e.mode, e.mtime_ns, bytearray(e.hashes), e.root)
            else:
                if e is not None:
                    self.begin()
                    self.delete_tree(vol, path)
                rec = FileRec(path)
            self._cache[k] = rec
        return rec

    def lookup(self, vol: str, path: str) -> Entry | None:
        rec = self._cache.get((vol, path))
        return rec.entry() if rec is not None else self.get(vol, path)

    def set_entry(self, vol: str, e: Entry) -> None:
        """Record a directory or symlink at ``e.path``.

        A ``mkdir`` never drops rows below its path: for an existing directory (a ``chmod``, an
        inode change) it changes metadata only, and a directory published after its first files
        (``cp -r``: the files' events can come first) has rows below it that are real. Rows below
        are dropped only when a symlink replaces a directory (the applier removes that tree)."""
        keep_below = e.kind == "d"  # whatever was (or was not) there before, rows below stay
        self._drop_cached(vol, e.path, tree=not keep_below)
        self.begin()
        if not keep_below:
            self.delete_tree(vol, e.path)
        self.put(vol, e)
        self.touch(vol, e.path)

    def remove(self, vol: str, path: str) -> None:
        self._drop_cached(vol, path, tree=True)
        self.begin()
        self.delete_tree(vol, path)
        self.touch(vol, path)

    def move(self, vol: str, src: str, dst: str, *, merge: bool = False) -> None:
        """Move ``src`` (and its tree) to ``dst``. With ``merge`` (the applier merged a directory
        into an existing one) rows of ``dst`` that ``src`` has no counterpart for stay."""
        self._flush_cached(vol, src, tree=True)
        if merge:
            self._flush_cached(vol, dst, tree=True)
            self.begin()
            lo, hi = src + "/", src + "0"
            moving = [r[0] for r in self.db.execute("SELECT path FROM entries WHERE volume=? AND path>=? AND path<?", (vol, lo, hi))]
            for p in moving:
                self.delete(vol, dst + p[len(src):])
            self.delete(vol, src)
            self.db.execute("UPDATE entries SET path = ? || substr(path, ?) WHERE volume=? AND path>=? AND path<?",
                            (dst, len(src) + 1, vol, lo, hi))
        else:
            self._drop_cached(vol, dst, tree=True)
            self.begin()
            self.rename(vol, src, dst)
        self.touch(vol, src)
        self.touch(vol, dst)

    def entries(self, vol: str) -> Iterator[Entry]:
        """Every entry of a volume, cache included (flushes the cache into the open transaction)."""
        self._flush_cached(vol, None, tree=True)
        return self.iter_volume(vol)

    def paths(self, vol: str) -> list[str]:
        """Every path of a volume (cache included), in path order."""
        self._flush_cached(vol, None, tree=True)
        return [r[0] for r in self.db.execute("SELECT path FROM entries WHERE volume=? ORDER BY path", (vol,))]

    def paths_below(self, vol: str, path: str) -> bool:
        """True if any entry (cached or stored) lies below ``path``."""
        pre = path + "/"
        if any(k[0] == vol and k[1].startswith(pre) for k in self._cache):
            return True
        return self.db.execute("SELECT 1 FROM entries WHERE volume=? AND path>=? AND path<? LIMIT 1",
                               (vol, pre, path + "0")).fetchone() is not None

    def _matching(self, vol: str, path: str | None, tree: bool) -> list[tuple[str, str]]:
        if path is None:
            return [k for k in self._cache if k[0] == vol]
        pre = path + "/"
        return [k for k in self._cache if k[0] == vol and (k[1] == path or (tree and k[1].startswith(pre)))]

    def _flush_cached(self, vol: str, path: str | None, tree: bool) -> None:
        keys = self._matching(vol, path, tree)
        if keys:
            self.begin()
            for k in keys:
                self.put(vol, self._cache.pop(k).entry())

    def _drop_cached(self, vol: str, path: str, tree: bool = False) -> None:
        for k in self._matching(vol, path, tree):
            del self._cache[k]
