"""Restore points: when a volume's stream may say "the mirror can roll back to here".

A ``point`` record tells the mirrors that every record before it, taken together, is a state the
volume really had at one moment: every file changed since the previous point was read after its
last change, and nothing in the volume changed while those reads went on. A mirror that rolls back
to a point (``volmirror restore``) therefore gives back files that belong together, such as a
database and its journal, never one from before a transaction and the other from after it.

The source knows this when, all at once:

* nothing is waiting: no dirty path (due or not), no queued rename, no path in doubt, the start-up
  scan done, no reconcile scan running, and the watcher alive (a volume watched only by scans has
  no points: a change between two scans would go unseen);
* the watcher reported no change for ``quiet`` seconds: a write made while the files were read has
  queued its inotify event by then (the kernel queues it inside the write), and the event would
  have marked its path dirty;
* every path examined since the previous point still has the lstat it was read with (size,
  mtime, ctime, inode, mode): the exact check for the files that were read;
* something was published since the previous point, and ``interval`` seconds have passed since it.

:class:`PointTracker` holds that state; :meth:`PointTracker.due` is the pure decision. The worker
(:mod:`daemon.source.volume`) calls it between batches and does the lstat check and the send.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .reader import Stat


@dataclass
class PointTracker:
    interval: float  # seconds between two points (0: never)
    quiet: float  # seconds without a change event before a point
    last_point: float = float("-inf")  # monotonic time of the last point sent
    last_event: float = float("-inf")  # monotonic time of the last change event from the watcher, or of the last read
    changed: bool = False  # something was published since the last point
    read: dict[str, Stat | None] = field(default_factory=dict)  # examined since the last point → lstat it was read with
    next_id: int = field(default_factory=lambda: time.time_ns() // 1_000_000)  # grows across restarts too

    def event(self, now: float) -> None:
        self.last_event = now

    def examined(self, path: str, st: Stat | None, now: float) -> None:
        """``path`` was examined (read, if a file) as ``st``, ending at ``now``: a write made while
        it was read must have had ``quiet`` seconds to arrive as an event too."""
        self.read[path] = st
        self.last_event = max(self.last_event, now)

    def published(self) -> None:
        self.changed = True

    def due_at(self) -> float | None:
        """When a point could be due (monotonic), if anything is waiting for one."""
        if self.interval <= 0 or not self.changed:
            return None
        return max(self.last_point + self.interval, self.last_event + self.quiet)

    def due(self, now: float, *, idle: bool, watching: bool) -> bool:
        at = self.due_at()
        return at is not None and idle and watching and now >= at

    def stale(self, lstat: Callable[[str], Stat | None]) -> list[str]:
        """Paths examined since the last point whose lstat changed since they were read."""
        out = []
        for path, st in self.read.items():
            try:
                now = lstat(path)
            except Exception:  # noqa: BLE001 - unreadable now: not provably the state it was read in
                out.append(path)
                continue
            if now != st:
                out.append(path)
        return out

    def sent(self, now: float) -> int:
        """A point was sent: returns its id and starts the next interval."""
        ident = self.next_id
        self.next_id += 1
        self.last_point = now
        self.changed = False
        self.read.clear()
        return ident
