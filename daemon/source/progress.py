"""Initial-sync progress for people: a live line on a terminal, periodic log lines otherwise.

The numbers come from each worker's :class:`Progress` (also exported as the
``volmirror_source_initial_sync_*`` metrics). Under systemd stderr is the journal, not a terminal,
so it logs one plain line every 30 s instead of redrawing a bar.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, TextIO

log = logging.getLogger("volmirror.source")


@dataclass
class Progress:
    """Initial-sync / large-rescan progress for one volume."""

    files_total: int = 0
    bytes_total: int = 0
    files_done: int = 0
    bytes_done: int = 0
    started: float = 0.0
    active: bool = False

    def begin(self, files: int, nbytes: int) -> None:
        if not self.active:
            self.files_total = self.bytes_total = self.files_done = self.bytes_done = 0
            self.started = time.monotonic()
            self.active = True
        self.files_total += files
        self.bytes_total += nbytes

    def snapshot(self) -> dict[str, Any]:
        el = max(time.monotonic() - self.started, 1e-6) if self.active else 0.0
        rate = self.bytes_done / el if el else 0.0
        left = max(self.bytes_total - self.bytes_done, 0)
        return {
            "active": self.active,
            "files_done": self.files_done,
            "files_total": self.files_total,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "rate_bytes_per_s": rate,
            "eta_seconds": (left / rate) if rate > 0 else None,
        }


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_eta(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def line(name: str, p: Mapping[str, Any]) -> str:
    pct = 100.0 * p["bytes_done"] / p["bytes_total"] if p["bytes_total"] else 100.0
    return (
        f"{name}: {p['files_done']}/{p['files_total']} files, {fmt_bytes(p['bytes_done'])}/{fmt_bytes(p['bytes_total'])}"
        f" ({pct:.0f}%), {fmt_bytes(p['rate_bytes_per_s'])}/s, ETA {fmt_eta(p['eta_seconds'])}"
    )


class ProgressReporter:
    def __init__(self, workers: Mapping[str, Any], stream: TextIO, *, log_every: float = 30.0) -> None:
        self.workers = workers
        self.stream = stream
        self.tty = stream.isatty()
        self.log_every = log_every

    async def run(self) -> None:
        shown = False
        since_log = 0.0
        while True:
            await asyncio.sleep(1.0)
            active = [(n, w.progress.snapshot()) for n, w in self.workers.items() if w.progress.active]
            if self.tty:
                if active:
                    self.stream.write("\r\x1b[K" + " | ".join(line(n, p) for n, p in active))
                    self.stream.flush()
                    shown = True
                elif shown:
                    self.stream.write("\r\x1b[K")
                    self.stream.flush()
                    shown = False
            elif active:
                since_log += 1.0
                if since_log >= self.log_every:
                    since_log = 0.0
                    for n, p in active:
                        log.info("initial sync %s", line(n, p), extra={"volume": n, "event": "sync_progress"})
