"""watchdog (inotify) → asyncio bridge for one volume.

watchdog delivers events on its own thread; they are handed to the loop with
``loop.call_soon_threadsafe`` and nothing else is touched from that thread. Events are *hints*:
the volume worker re-reads the path and compares it with the index, so a lost event costs latency
until the next reconcile scan, never correctness (watchdog drops inotify queue overflows silently).

If the inotify watch limit is hit (ENOSPC) the watcher reports it, the volume falls back to periodic
scans, and ``volmirror_source_watch_active{volume}`` shows 0.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Callable

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

log = logging.getLogger("volmirror.source.watcher")

# (kind, rel_src, rel_dst, is_dir); kind is "changed" or "moved"
Notify = Callable[[str, str, str | None, bool], None]

_IGNORED = {"opened", "closed_no_write"}  # our own reads would otherwise feed back as events
# ... and they are not even asked for: without a filter watchdog subscribes to IN_OPEN and
# IN_CLOSE_NOWRITE, so every file the agent reads costs two inotify events parsed on watchdog's
# threads (a fifth of the source's CPU during an initial sync)
_WANTED = [FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, DirModifiedEvent, FileAttribEvent, DirAttribEvent,
           FileMovedEvent, DirMovedEvent, FileDeletedEvent, DirDeletedEvent, FileClosedEvent]


class _Handler(FileSystemEventHandler):
    def __init__(self, root: str, loop: asyncio.AbstractEventLoop, notify: Notify) -> None:
        self.root = root
        self.loop = loop
        self.notify = notify

    def _rel(self, p: str | bytes) -> str | None:
        p = os.fsdecode(p)
        if p == self.root:
            return ""
        if not p.startswith(self.root + os.sep):
            return None
        return p[len(self.root) + 1 :]

    def on_any_event(self, event: FileSystemEvent) -> None:
        et = event.event_type
        if et in _IGNORED:
            return
        src = self._rel(event.src_path)
        if et == "moved":
            dst = self._rel(event.dest_path)
            if src is None and dst is None:
                return
            self._post("moved", src, dst, event.is_directory)
        elif src is not None:
            self._post("changed", src, None, event.is_directory)

    def _post(self, kind: str, src: str | None, dst: str | None, is_dir: bool) -> None:
        try:
            self.loop.call_soon_threadsafe(self.notify, kind, src, dst, is_dir)
        except RuntimeError:  # loop closed during shutdown
            pass


class VolumeWatcher:
    """Recursive watch of one volume root. ``start`` returns False if watching is impossible."""

    def __init__(self, name: str, root: str, notify: Notify) -> None:
        self.name = name
        self.root = os.path.abspath(root)
        self.notify = notify
        self._observer: Observer | None = None
        self.error: str | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> bool:
        obs = Observer()
        try:
            obs.schedule(_Handler(self.root, loop, self.notify), self.root, recursive=True, event_filter=_WANTED)
            obs.start()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                self.error = (
                    "inotify watch limit reached (raise fs.inotify.max_user_watches); "
                    "falling back to periodic reconcile scans only"
                )
            else:
                self.error = f"cannot watch {self.root}: {e.strerror or e}; falling back to periodic scans"
            log.error(self.error, extra={"volume": self.name})
            try:
                obs.stop()
            except Exception:
                pass
            return False
        self._observer = obs
        return True

    def stop(self) -> None:
        obs, self._observer = self._observer, None
        if obs is not None:
            obs.stop()
            obs.join(timeout=5)

    @property
    def alive(self) -> bool:
        return self._observer is not None and self._observer.is_alive()
