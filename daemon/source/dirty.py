"""Pure: which paths of a volume are waiting to be examined, and which are in doubt.

:class:`DirtySet` is the debounce: watcher events and scan results *mark* a path; it becomes due a
debounce after the mark, but never later than ``max_delay`` after its first unprocessed mark, or
after an explicit delay (retries, backoff). :class:`InDoubt` remembers the paths of failed batches:
their records may have reached Kafka (and the mirror) although the index was rolled back, so the
blocks that were attempted must be sent again whatever the file holds next, and a listing must
wait until each of them has been published again. :class:`StartupGate` holds listings back until
the volume's start-up reconcile scan has been completed and its findings examined.

No I/O, no clock: callers pass ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator


@dataclass(frozen=True, slots=True)  # hundreds of thousands at once during a scan
class Mark:
    due: float
    first: float  # time of the first unprocessed mark
    force: bool  # re-read the content even if size/mtime/inode/mode match the index


class DirtySet:
    def __init__(self, debounce: float, max_delay: float) -> None:
        self.debounce = debounce
        self.max_delay = max_delay
        self._marks: dict[str, Mark] = {}
        self._live: set[str] = set()  # marked by the watcher (debounced): a live change, not a backlog

    def __len__(self) -> int:
        return len(self._marks)

    def __contains__(self, path: object) -> bool:
        return path in self._marks

    def __iter__(self) -> Iterator[str]:
        return iter(self._marks)

    def mark(self, path: str, now: float, *, force: bool, delay: float | None = None) -> None:
        """Due after the debounce (capped at ``max_delay`` after the first mark), or after ``delay``."""
        old = self._marks.get(path)
        first = old.first if old else now
        due = min(now + self.debounce, first + self.max_delay) if delay is None else now + delay
        self._marks[path] = Mark(due, first, force or (old.force if old else False))
        if delay is None:
            self._live.add(path)
        else:
            self._live.discard(path)

    def due(self, now: float) -> list[str]:
        """The paths due at ``now``, in path order."""
        return sorted(p for p, m in self._marks.items() if m.due <= now)

    def is_live(self, path: str) -> bool:
        return path in self._live

    def live_due(self, now: float) -> list[str]:
        """The live changes due at ``now`` (watcher marks, not scan results, children of new
        directories or retries), in path order: they overtake a backlog (priority lane)."""
        return sorted(p for p in self._live if self._marks[p].due <= now)

    def next_due(self) -> float | None:
        return min((m.due for m in self._marks.values()), default=None)

    def pop(self, path: str) -> Mark | None:
        self._live.discard(path)
        return self._marks.pop(path, None)

    def move(self, src: str, dst: str) -> None:
        """Pending marks at or below ``src`` follow a rename to ``dst``."""
        for p in [p for p in self._marks if p == src or p.startswith(src + "/")]:
            q = dst + p[len(src) :]
            self._marks[q] = self._marks.pop(p)
            if p in self._live:
                self._live.discard(p)
                self._live.add(q)


class InDoubt:
    """Paths whose last attempt failed after records may have left: path → attempted block indexes."""

    def __init__(self) -> None:
        self._paths: dict[str, set[int]] = {}

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, path: object) -> bool:
        return path in self._paths

    def add(self, path: str, blocks: Iterable[int] = ()) -> None:
        self._paths.setdefault(path, set()).update(blocks)

    def blocks(self, path: str) -> set[int]:
        return self._paths.get(path, set())

    def move(self, src: str, dst: str) -> list[str]:
        """Doubt at or below ``src`` follows a rename to ``dst`` (the mirror renames what it holds
        too); returns the new paths in doubt."""
        moved = []
        for p in [p for p in self._paths if p == src or p.startswith(src + "/")]:
            q = dst + p[len(src) :]
            self._paths.setdefault(q, set()).update(self._paths.pop(p))
            moved.append(q)
        return moved

    def settle(self, paths: Iterable[str]) -> None:
        """These paths were published again and the index committed: no longer in doubt."""
        for p in paths:
            self._paths.pop(p, None)


class StartupGate:
    """Open once the start-up scan completed and every path it found was examined once."""

    def __init__(self) -> None:
        self.scanned = False
        self._left: set[str] = set()

    def scan_done(self, paths: Iterable[str]) -> None:
        if not self.scanned:
            self.scanned = True
            self._left = set(paths)

    def examined(self, paths: Iterable[str]) -> None:
        if self._left:
            self._left.difference_update(paths)

    @property
    def left(self) -> int:
        return len(self._left)

    @property
    def open(self) -> bool:
        return self.scanned and not self._left


def listing_blocked(gate: StartupGate, doubt: InDoubt) -> str | None:
    """Why a listing must wait now (None: it may be sent). A mirror deletes what a complete
    listing lacks, so a listing is only sent when the index holds everything the stream told."""
    if not gate.scanned:
        return "the start-up reconcile scan has not completed"
    if not gate.open:
        return f"{gate.left} path(s) found by the start-up scan are not examined yet"
    if doubt:
        return f"{len(doubt)} path(s) of a failed batch are not published again yet"
    return None


def backoff(failures: int, cap: float = 30.0) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure: 1, 2, 4, ... capped."""
    return min(2.0 ** max(failures - 1, 0), cap)
