"""The mirror's persisted progress per volume (SQLite in ``state_dir``).

For each volume: the source epoch and the highest sequence number applied *durably*, the source
timestamp of the newest applied event or heartbeat, and the partition it arrives on. Progress is
written only at durability points (after the touched files and directories were fsynced), in the
same step that precedes the Kafka offset commit. On replay after a crash, events whose sequence
number is not above the stored one (same epoch) are skipped, so no operation is applied twice
across a durability point.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import PermanentError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    volume    TEXT PRIMARY KEY,
    epoch     TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    last_ts   REAL NOT NULL,
    partition INTEGER NOT NULL DEFAULT -1
);
"""


@dataclass
class VolumeProgress:
    epoch: str = ""
    seq: int = -1
    last_ts: float = 0.0
    partition: int = -1


class MirrorState:
    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(db_path), isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise PermanentError(f"cannot open mirror state {db_path}: {e}") from None
        self.lock = threading.Lock()
        self.volumes: dict[str, VolumeProgress] = {}
        for vol, epoch, seq, ts, part in self.db.execute("SELECT volume, epoch, seq, last_ts, partition FROM volumes"):
            self.volumes[vol] = VolumeProgress(epoch, seq, ts, part)
        self._durable = {k: VolumeProgress(**vars(v)) for k, v in self.volumes.items()}

    def get(self, vol: str) -> VolumeProgress:
        p = self.volumes.get(vol)
        if p is None:
            p = self.volumes[vol] = VolumeProgress()
        return p

    def is_duplicate(self, vol: str, epoch: str, seq: int) -> bool:
        p = self.volumes.get(vol)
        return p is not None and p.epoch == epoch and seq <= p.seq

    def commit(self) -> None:
        """Persist the in-memory progress (call only after the data it describes is durable)."""
        with self.lock:
            rows = [(k, v.epoch, v.seq, v.last_ts, v.partition) for k, v in self.volumes.items() if v.epoch]
            if not rows:
                return
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO volumes (volume, epoch, seq, last_ts, partition) VALUES (?,?,?,?,?)", rows)
            self.db.execute("COMMIT")
            self._durable = {k: VolumeProgress(**vars(v)) for k, v in self.volumes.items()}

    def close(self) -> None:
        self.db.close()
