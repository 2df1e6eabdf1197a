"""Pure: the mass-change guard. Is a volume going through a burst no normal workload makes?

Ransomware rewrites many existing files with content that looks random; a mistaken ``rm -rf`` or a
wiper deletes or renames many paths at once. The mirror replicates either within a second, so it
watches for them as it applies: per volume, in a sliding window of ``window`` seconds, it counts

* ``rewrites``: existing files (present at the volume's last restore point) whose content was
  overwritten with data that does not compress while the data it replaced did (the history saves
  the old bytes anyway, so both are at hand: :func:`looks_encrypted`);
* ``deletes``: paths removed (a removed tree counts its files);
* ``renames``: paths renamed.

A burst is any of the three reaching ``max(min_files, fraction × files in the volume)``. New
files, however random, never count: a workload that only adds files (logs, uploads, the latency
benchmark) cannot trigger it; neither can a few edits or deletions.

What the mirror does about a burst (alert, or pause applying the volume with its history kept) is
the apply actor's (``mirror.guard``); this module only decides.
"""

from __future__ import annotations

import zlib
from collections import deque
from dataclasses import dataclass, field

SAMPLE = 4096  # bytes of a payload looked at
INCOMPRESSIBLE = 0.97  # zlib level 1 output / input at or above this: random-looking


def incompressible(data: bytes | memoryview) -> bool:
    sample = bytes(data[:SAMPLE])
    if len(sample) < 256:
        return False  # too short to say
    return len(zlib.compress(sample, 1)) >= INCOMPRESSIBLE * len(sample)


def looks_encrypted(old: bytes | memoryview, new: bytes | memoryview) -> bool:
    """Old content that compressed, replaced by content that does not."""
    return len(old) >= 256 and not incompressible(old) and incompressible(new)


@dataclass
class Burst:
    kind: str  # rewrites | deletes | renames
    count: int
    threshold: int
    window: float
    since: float  # time of the first event of the window

    def describe(self) -> str:
        what = {"rewrites": "existing files rewritten with random-looking content", "deletes": "paths deleted",
                "renames": "paths renamed"}[self.kind]
        return f"{self.count} {what} within {self.window:.0f} s (threshold {self.threshold})"


@dataclass
class VolumeWindow:
    events: dict[str, deque] = field(default_factory=lambda: {"rewrites": deque(), "deletes": deque(), "renames": deque()})
    counts: dict[str, int] = field(default_factory=lambda: {"rewrites": 0, "deletes": 0, "renames": 0})
    seen_rewrites: set[str] = field(default_factory=set)  # paths counted as rewritten in the window


class Guard:
    def __init__(self, *, window: float = 60.0, min_files: int = 100, fraction: float = 0.05) -> None:
        self.window = window
        self.min_files = min_files
        self.fraction = fraction
        self.vols: dict[str, VolumeWindow] = {}

    def _w(self, vol: str) -> VolumeWindow:
        w = self.vols.get(vol)
        if w is None:
            w = self.vols[vol] = VolumeWindow()
        return w

    def rewrite(self, vol: str, path: str, now: float) -> None:
        w = self._w(vol)
        if path in w.seen_rewrites:
            return
        w.seen_rewrites.add(path)
        self._add(w, "rewrites", now, 1, path)

    def deleted(self, vol: str, files: int, now: float) -> None:
        self._add(self._w(vol), "deletes", now, max(files, 1))

    def renamed(self, vol: str, now: float) -> None:
        self._add(self._w(vol), "renames", now, 1)

    def _add(self, w: VolumeWindow, kind: str, now: float, n: int, path: str | None = None) -> None:
        w.events[kind].append((now, n, path))
        w.counts[kind] += n

    def _expire(self, w: VolumeWindow, now: float) -> None:
        for kind, q in w.events.items():
            while q and q[0][0] < now - self.window:
                _, n, path = q.popleft()
                w.counts[kind] -= n
                if path is not None:
                    w.seen_rewrites.discard(path)

    def threshold(self, files_in_volume: int) -> int:
        return max(self.min_files, int(self.fraction * files_in_volume))

    def check(self, vol: str, now: float, files_in_volume: int) -> Burst | None:
        """The burst going on in ``vol``, if any."""
        w = self.vols.get(vol)
        if w is None:
            return None
        self._expire(w, now)
        t = self.threshold(files_in_volume)
        for kind in ("rewrites", "deletes", "renames"):
            if w.counts[kind] >= t:
                return Burst(kind, w.counts[kind], t, self.window, w.events[kind][0][0])
        return None
