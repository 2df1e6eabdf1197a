"""One volume's source pipeline: the task that turns dirty paths into acknowledged batches.

A :class:`VolumeWorker` is the single owner of its volume's state: its own index file (opened in
:meth:`VolumeWorker.run`), its dirty paths, its paths in doubt, and the order of its sequenced
events. Watcher events and scan results only *mark* paths (:mod:`daemon.source.dirty`); renames
are queued in arrival order and published first, without data. A batch (:mod:`daemon.source.batch`)
examines due paths (:mod:`daemon.source.examine`), awaits every ack, then commits its index
transaction. If anything fails — Kafka, or writing ``state_dir`` (disk full) — the batch is rolled
back, its paths are put *in doubt* (their records may have reached the mirror) and marked again
with backoff; the failure is counted, logged and shown in the status, never fatal.

Between batches the worker answers control requests (:mod:`daemon.source.answers`): checkpoints,
and listings — but a listing waits while the start-up scan has not been completed or a path is in
doubt, because a mirror deletes what a complete listing lacks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from ..config import VolumeConfig
from ..errors import FileChangedError, PermanentError, PublishError, StateError, TransientError, VolmirrorError
from ..store.source_index import SourceIndex, volume_index
from ..metrics import SourceMetrics
from .answers import checkpoint_fields, send_listing
from .batch import Batch
from .coverage import NOT_UTF8, Unprotected, printable, replicable_name
from .dirty import DirtySet, InDoubt, StartupGate, backoff, listing_blocked
from .examine import Examiner, forget_blocks
from . import pacing
from .hooks import run_hook
from .points import PointTracker
from .progress import Progress
from .publisher import Publisher
from .reader import Pre, Stat, lstat, prefetch

log = logging.getLogger("volmirror.source")

OpenIndex = Callable[[Path, str], SourceIndex]
CONTROL_RETRY = 5.0  # seconds before a failed checkpoint/listing is tried again
STATE_BACKOFF = 10.0  # cap of the retry delay while state_dir cannot be written (space may return any time)
KAFKA_BACKOFF = 30.0
PREFETCH_PATHS = 64  # due paths popped, lstat'ed and (small files) read per thread hop
PACE_SLICE = 2.0  # longest single wait before one more group goes anyway (renames, checkpoints run)


class VolumeWorker:
    def __init__(
        self,
        vol: VolumeConfig,
        state_dir: Path,
        publisher: Publisher,
        metrics: SourceMetrics,
        *,
        debounce: float = 0.05,
        max_delay: float = 1.0,
        checkpoint_interval: float = 60.0,
        open_index: OpenIndex = volume_index,
        compression: str = "none",
        point_interval: float = 0.0,
        point_quiet: float = 0.1,
    ) -> None:
        self.vol = vol
        self.name = vol.name
        self.state_dir = state_dir
        self.pub = publisher
        self.m = metrics
        self.open_index = open_index
        self.index: SourceIndex | None = None
        self.opened = asyncio.Event()
        self.dirty = DirtySet(debounce, max_delay)
        self.doubt = InDoubt()
        self.gate = StartupGate()
        self.unprotected = Unprotected()
        self.examiner = Examiner(vol, publisher, self._mark_children, self._serve_live, codec=compression)
        self._serving_live = False
        self.mirrors: dict[str, pacing.MirrorReport] = {}  # site → its last position report (pacing)
        self._last_live = -1e9  # when the last live change was marked (monotonic)
        self._examining_live = False  # the path being examined was a live change
        self.renames: deque[tuple[str | None, str | None, bool]] = deque()
        self.checkpoints: deque[str | None] = deque()
        self.listings: deque[str] = deque()
        self._deferred: set[str] = set()  # listing nonces already reported as deferred
        self.resyncs: dict[str, bytes | None] = {}  # path → the mirror's block hashes (None: send all)
        self._wake = asyncio.Event()
        self.progress = Progress()
        self.last_published = 0.0
        self.failures = 0
        self.state_error: str | None = None
        self.scanning = False
        self.checkpoint_interval = checkpoint_interval
        self.next_checkpoint = time.monotonic() + min(5.0, checkpoint_interval)
        self.next_control = 0.0
        self.checkpoint_id = 0
        self._b: Batch | None = None  # the batch _process has open
        self.points = PointTracker(point_interval, point_quiet)
        self._hooked: float | None = None  # monotonic time the pre-command succeeded, while its point is awaited
        self.watching: Callable[[], bool] = lambda: False  # the agent sets it: True while inotify watches the volume

    # -- inputs ---------------------------------------------------------------------------------
    def notify(self, kind: str, src: str | None, dst: str | None, is_dir: bool) -> None:
        """Watcher callback (runs on the loop)."""
        self.points.event(time.monotonic())
        if kind == "moved":
            self.queue_rename(src, dst, is_dir)
        elif src:
            self.mark(src, force=True)

    def mark(self, path: str, *, force: bool, delay: float | None = None) -> bool:
        """Mark a path for examination (see :class:`DirtySet`); False if it is not replicable."""
        if not path:
            return False
        if not replicable_name(path):
            self._unreplicable(path, NOT_UTF8)
            return False
        if self.vol.is_excluded(path) and (self.index is None or self.index.get(self.name, path) is None):
            return False
        now = time.monotonic()
        self.dirty.mark(path, now, force=force, delay=delay)
        if delay is None:
            self._last_live = now
        self.m.pending_files.labels(self.name).set(len(self.dirty))
        self._wake.set()
        return True

    def request(self, kind: str, nonce: str | None = None) -> None:
        """Control request from a mirror: a checkpoint now, or a listing of the index."""
        if kind == "listing" and nonce:
            if nonce not in self.listings:
                self.listings.append(nonce)
        elif kind == "checkpoint":
            self.checkpoints.append(nonce)
        self._wake.set()

    def resync(self, path: str, mirror_hashes: bytes | None) -> None:
        """A mirror found ``path`` drifted: send what differs from ``mirror_hashes`` (all if None)."""
        self.resyncs[path] = mirror_hashes
        self.mark(path, force=True, delay=0)

    def queue_rename(self, src: str | None, dst: str | None, is_dir: bool) -> None:
        self.renames.append((src, dst, is_dir))
        self._wake.set()

    def scan_found(self, renames: list[tuple[str, str]], dirty: list[str], unprotected: dict[str, str]) -> None:
        """A reconcile scan's findings: queue them, and record what cannot be replicated."""
        for src, dst in renames:
            self.queue_rename(src, dst, False)
        marked = [p for p in dirty if self.mark(p, force=False, delay=0)]
        self.gate.scan_done(marked + [p for r in renames for p in r])
        for path in self.unprotected.scanned(unprotected):
            shown = printable(path)
            log.error("cannot replicate %s (%s): not protected", shown, unprotected[path], extra={"volume": self.name, "path": shown})
        self.m.unprotected.labels(self.name).set(len(self.unprotected))

    def _unreplicable(self, path: str, why: str) -> None:
        if self.unprotected.add(path, why):
            self.m.errors.labels(self.name, "bad_name" if why == NOT_UTF8 else "scan").inc()
            self.m.unprotected.labels(self.name).set(len(self.unprotected))
            shown = printable(path)
            log.error("cannot replicate %s (%s): not protected", shown, why, extra={"volume": self.name, "path": shown})

    # -- state ----------------------------------------------------------------------------------
    async def open(self) -> SourceIndex:
        """Open the volume's index, retrying with backoff while state_dir cannot be written."""
        failures = 0
        while self.index is None:
            try:
                self.index = await asyncio.to_thread(self.open_index, self.state_dir, self.name)
            except (StateError, PermanentError) as e:
                failures += 1
                delay = backoff(failures, STATE_BACKOFF)
                self._state_failed(e, delay)
                await asyncio.sleep(delay)
        self._state_ok()
        self.opened.set()
        return self.index

    def close(self) -> None:
        if self.index is not None:
            self.index.close()
            self.index = None

    def read_index(self) -> dict[str, Any]:
        """Every committed entry (path → Entry), from a read-only connection: call in a thread."""
        with self._open_index().reader() as r:
            return {e.path: e for e in r.iter_volume(self.name)}

    def _state_failed(self, err: BaseException, delay: float) -> None:
        self.state_error = str(err)
        self.m.state_ok.labels(self.name).set(0)
        self.m.errors.labels(self.name, "state").inc()
        log.error("state_dir not writable: %s; retrying in %.0f s", err, delay,
                  extra={"volume": self.name, "path": str(self.state_dir), "event": "state_error"})

    def _state_ok(self) -> None:
        if self.state_error is not None:
            log.info("state_dir writable again (%s)", self.state_dir, extra={"volume": self.name, "path": str(self.state_dir), "event": "state_ok"})
        self.state_error = None
        self.m.state_ok.labels(self.name).set(1)

    def status(self) -> dict[str, Any]:
        return {
            "pending_files": len(self.dirty),
            "in_doubt_paths": len(self.doubt),
            "unprotected_paths": len(self.unprotected),
            "unprotected_by_reason": self.unprotected.by_reason(),
            "state_ok": self.state_error is None,
            "state_error": self.state_error,
            "startup_scan_done": self.gate.scanned,
            "listings_waiting": len(self.listings),
            "last_published": self.last_published or None,
            "sync": self.progress.snapshot(),
            "fastest_mirror_behind": self.mirror_behind(),
        }

    # -- main loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.open()
        try:
            while True:
                await self.step()
        finally:
            if self._hooked is not None:  # stopped or failed between a pre-command and its point: never leave a freeze on
                log.warning("volume %s: stopping between point_pre_command and its point: running the post-command", self.name,
                            extra={"volume": self.name})
                await self._hook("post", None)

    async def step(self) -> None:
        while self.renames:
            src, dst, is_dir = self.renames.popleft()
            if not await self._rename(src, dst, is_dir):
                self._renames_to_marks()
        now = time.monotonic()
        if now >= self.next_control and (self.checkpoints or now >= self.next_checkpoint):
            if listing_blocked(self.gate, self.doubt) is None:
                await self._checkpoint()
            else:
                # the index is behind the stream (start-up scan not done, or a failed batch's
                # records may have reached the mirror): a digest now would report drift that is not
                # there; check again in a second
                self.next_checkpoint = now + 1.0
        if self.listings and time.monotonic() >= self.next_control and self._listing_may_go():
            await self._listing()
        due = self.dirty.due(time.monotonic())
        if due:
            await self._process(due)
            return
        self._wake.clear()
        if self.progress.active and not self.dirty and not self.scanning:
            self._finish_progress()
        if await self._point():
            return
        await self._sleep()

    async def _sleep(self) -> None:
        now = time.monotonic()
        until = min(self.dirty.next_due() or now + 3600, self.next_checkpoint, self.points.due_at() or now + 3600)
        if self._hooked is not None:
            until = min(until, self._hooked + self.vol.point_hook_timeout + 0.01)
        if self.listings:
            until = min(until, max(self.next_control, now + 1.0))
        try:
            await asyncio.wait_for(self._wake.wait(), max(until - now, 0.001))
        except asyncio.TimeoutError:
            pass

    # -- batches --------------------------------------------------------------------------------
    def _batch(self) -> Batch:
        return Batch(self._open_index(), self.name)

    async def _process(self, due: list[str]) -> None:
        due = [p for p in due if self.dirty.is_live(p)] + [p for p in due if not self.dirty.is_live(p)]  # live changes first
        self._b = None
        try:
            self._b = self._batch()
            for i in range(0, len(due), PREFETCH_PATHS):
                if not self.dirty.is_live(due[i]):
                    await self._before_backlog()
                await self._take(due[i : i + PREFETCH_PATHS])
            await self._settle(self._b)
        except asyncio.CancelledError:
            if self._b is not None:
                self._b.rollback()
                self._requeue(self._b, 0.0)
            raise
        except Exception as e:  # noqa: BLE001 - every failure of a batch is reported and retried, never fatal
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # stopping: an error raised while cancelled
                if self._b is not None:
                    self._b.rollback()
                    self._requeue(self._b, 0.0)
                raise asyncio.CancelledError from e
            await self._failed(self._b, e)
        finally:
            self._b = None
        self.m.pending_files.labels(self.name).set(len(self.dirty))

    async def _before_backlog(self) -> None:
        """Before a group of backlog paths (initial sync, rescan): the priority lane, then pacing,
        until the backlog may go. Live changes that are due overtake it (the batch so far goes now,
        the live ones in their own batch); while the fastest mirror is far behind, the backlog
        waits (at most PACE_SLICE in all), and live changes that come meanwhile go at once. Both
        again after each wait: with writes arriving all the time, a wait ended by a live change
        must not let the backlog through."""
        t0 = time.monotonic()
        while True:
            live = self.dirty.live_due(time.monotonic())
            if live:
                if self._open_batch().paths:
                    await self._next_batch()
                await self._take(live)
                await self._next_batch()
            if not self._ahead() or time.monotonic() - t0 >= PACE_SLICE:
                return
            if self._open_batch().paths:
                await self._next_batch()
            await self._pace(None, limit=PACE_SLICE - (time.monotonic() - t0))

    def _open_batch(self) -> Batch:
        if self._b is None:
            raise RuntimeError("no batch is open: _take and _next_batch run inside _process only")
        return self._b

    async def _next_batch(self) -> None:
        """Settle the open batch and open the next (on a failure ``self._b`` is the failed one)."""
        await self._settle(self._open_batch())
        self._b = self._batch()

    async def _take(self, paths: list[str]) -> None:
        """Examine a group of due paths into the open batch ``self._b``, settling each batch that
        fills. On an error ``self._b`` is the batch that failed (the caller rolls it back) and the
        paths of the group not examined yet are marked again.

        Their marks are popped first, then one thread call lstats them and reads the small files
        (:func:`~daemon.source.reader.prefetch`): a change after that read marks a path again."""
        live = {p for p in paths if self.dirty.is_live(p)}
        taken = [(p, m) for p in paths if (m := self.dirty.pop(p)) is not None]
        if not taken:
            return
        done = 0
        try:
            pre = await asyncio.to_thread(prefetch, self.examiner.root, [p for p, _ in taken if not self.vol.is_excluded(p)],
                                          self.vol.block_size, codec=self.examiner.codec)
            for path, mark in taken:
                b = self._open_batch()
                done += 1
                b.paths.append(path)
                force, p = mark.force, pre.get(path)
                again = self.dirty.pop(path)
                if again is not None:
                    # marked again since the prefetch (an event; the children of a directory this
                    # group found new): examined now, with what was read only if it is unchanged
                    force = force or again.force
                    p = p if p is not None and p.st is not None and self._unchanged_since(path, p.st) else None
                self._examining_live = path in live
                try:
                    await self._examine(b, path, force, p)
                finally:
                    self._examining_live = False
                if b.full:
                    await self._next_batch()
        except BaseException:
            for path, mark in taken[done:]:
                self.mark(path, force=mark.force, delay=0.0)
            raise

    # -- pacing: a backlog never runs far ahead of the fastest mirror ----------------------------
    def mirror_position(self, site: str, epoch: str, seq: int) -> None:
        """A mirror site's report of how far it has applied this volume's stream."""
        self.mirrors[site] = pacing.report(self.mirrors.get(site), time.monotonic(), epoch, seq, self.pub.sent.get(self.name),
                                           self.pub.seqs.epoch)

    def mirror_behind(self) -> dict[str, float] | None:
        return pacing.fastest_behind(list(self.mirrors.values()), time.monotonic(), self.pub.seqs.epoch,
                                     self.pub.seqs.last(self.name), self.pub.sent.get(self.name))

    def _ahead(self) -> bool:
        return pacing.hold(self.mirror_behind(), time.monotonic(), self._last_live)

    async def _pace(self, b: Batch | None, current: str | None = None, limit: float = PACE_SLICE) -> None:
        """Hold a backlog while the fastest mirror is far behind (at most ``limit`` seconds):
        records published now would only queue in the partition, in front of any live change. Live
        changes due meanwhile are published into ``b`` inside a file; between files the wait ends
        and the caller's lane (:meth:`_before_backlog`) serves them, then paces again."""
        if not self._ahead():
            return
        t0 = last = time.monotonic()
        paced = self.m.paced.labels(self.name)
        try:
            while self._ahead() and last - t0 < limit:
                if b is not None and current is not None:
                    await self._serve_live(b, current, pace=False)
                elif self.dirty.live_due(time.monotonic()):
                    return  # the caller's priority lane serves them, then paces again
                await asyncio.sleep(0.02)
                now = time.monotonic()
                paced.inc(now - last)  # as it goes: a long hold shows on the dashboard while it lasts
                last = now
        finally:
            paced.inc(time.monotonic() - last)

    async def _serve_live(self, b: Batch, current: str, *, pace: bool = True) -> None:
        """Priority lane inside a large file: between two of its segments, the live changes that
        are due are examined into the same batch (their records go out now, not after the rest of
        the file; the batch settles as usual)."""
        if self._serving_live:
            return
        live = [p for p in self.dirty.live_due(time.monotonic()) if p != current]
        if not live:
            if pace:
                await self._pace(b, current)
            return
        self._serving_live = True
        try:
            for path in live:
                mark = self.dirty.pop(path)
                if mark is None:
                    continue
                b.paths.append(path)
                outer, self._examining_live = self._examining_live, True
                try:
                    await self._examine(b, path, mark.force)
                finally:
                    self._examining_live = outer
        finally:
            self._serving_live = False
        if pace:
            await self._pace(b, current)

    def _unchanged_since(self, path: str, st: Stat) -> bool:
        """True if ``path`` still has the kind, size, mtime, ctime, inode and mode of ``st``."""
        try:
            return lstat(str(self.vol.path / path)) == st
        except VolmirrorError:
            return False

    async def _examine(self, b: Batch, path: str, force: bool, pre: Pre | None = None) -> None:
        resync = path in self.resyncs
        mirror_hashes = self.resyncs.pop(path, None)
        doubt = self.doubt.blocks(path) if path in self.doubt else None
        try:
            st = await self.examiner.path(b, path, force=force, resync=resync, mirror_hashes=mirror_hashes, doubt=doubt, pre=pre)
            if self.vol.is_excluded(path):
                self.points.event(time.monotonic())  # not replicated: its state is no part of a point
            else:
                self.points.examined(path, st, time.monotonic())
        except (PublishError, StateError):
            if resync:
                self.resyncs[path] = mirror_hashes
            raise
        except FileChangedError:
            self.m.torn_reads.labels(self.name).inc()
            log.debug("file changed while reading; re-queued", extra={"volume": self.name, "path": path})
            self._retry_path(b, path, resync, mirror_hashes, max(self.dirty.debounce, 0.2))
        except PermanentError as e:
            self.m.errors.labels(self.name, "read").inc()
            log.error("%s", e, extra={"volume": self.name, "path": path})
            self._retry_path(b, path, resync, mirror_hashes, 30.0)
        except TransientError as e:
            self.m.errors.labels(self.name, "read").inc()
            log.warning("%s; retrying", e, extra={"volume": self.name, "path": path})
            self._retry_path(b, path, resync, mirror_hashes, 2.0)

    def _retry_path(self, b: Batch, path: str, resync: bool, mirror_hashes: bytes | None, delay: float) -> None:
        """The examination of ``path`` stopped halfway: what it sent is in doubt; look again later."""
        if resync:
            self.resyncs[path] = mirror_hashes  # answer the mirror on the retry
        if path in b.sent_blocks:
            self.doubt.add(path, b.sent_blocks[path])
        self.mark(path, force=True, delay=delay)

    async def _settle(self, b: Batch) -> None:
        took = await b.settle()
        if b.futures:
            self.m.publish_latency.labels(self.name).observe(took)
        self.failures = 0
        self._state_ok()
        self.m.kafka_connected.set(1)
        done = [p for p in b.paths if p not in self.dirty]  # examined to the end (not re-queued)
        self.doubt.settle(done)
        self.gate.examined(b.paths)
        self.m.in_doubt.labels(self.name).set(len(self.doubt))
        self._count(b)
        if b.ops:
            self.points.published()

    def _count(self, b: Batch) -> None:
        n = self.name
        for op, k in b.ops.items():
            self.m.published_events.labels(n, op).inc(k)
        for r, k in b.blocks.items():
            self.m.blocks.labels(n, r).inc(k)
        self.m.published_bytes.labels(n).inc(b.payload_bytes)
        if b.ops:
            self.last_published = time.time()
        p = self.progress
        if p.active:
            p.files_done += b.files_done
            p.bytes_done += b.bytes_read
            self.m.sync_files_done.labels(n).set(p.files_done)
            self.m.sync_bytes_done.labels(n).set(p.bytes_done)
            snap = p.snapshot()
            self.m.sync_rate.labels(n).set(snap["rate_bytes_per_s"])
            self.m.sync_eta.labels(n).set(snap["eta_seconds"] or 0)

    async def _failed(self, b: Batch | None, err: BaseException) -> None:
        """Roll back, put the batch's paths in doubt, mark them again with backoff, report."""
        if b is not None:
            b.rollback()
        self.failures += 1
        delay = backoff(self.failures, STATE_BACKOFF if isinstance(err, StateError) else KAFKA_BACKOFF)
        if isinstance(err, StateError):
            self._state_failed(err, delay)
        elif isinstance(err, TransientError):
            self.m.kafka_connected.set(0)
            self.m.errors.labels(self.name, "publish").inc()
            log.error("publishing failed (%s); %d path(s) retried in %.0f s", err, len(b.paths) if b else 0, delay, extra={"volume": self.name})
        else:
            self.m.errors.labels(self.name, "internal").inc()
            log.error("batch failed: %r; %d path(s) retried in %.0f s", err, len(b.paths) if b else 0, delay,
                      extra={"volume": self.name}, exc_info=err)
        if b is not None:
            for path in b.paths:
                self.doubt.add(path, b.sent_blocks.get(path, ()))
            self.gate.examined(b.paths)
            self._requeue(b, delay)
            self._persist_forgotten(b)
        self.m.in_doubt.labels(self.name).set(len(self.doubt))
        await asyncio.sleep(delay)

    def _requeue(self, b: Batch, delay: float) -> None:
        for path in b.paths:
            self.mark(path, force=True, delay=delay)

    def _persist_forgotten(self, failed: Batch) -> None:
        """Best effort: record the attempted blocks as unknown in the index too, so a restart resends
        them (while running, :class:`InDoubt` does). Nothing to do if state_dir is still failing."""
        if not failed.sent_blocks or self.index is None:
            return
        b: Batch | None = None
        try:
            b = Batch(self.index, self.name)
            for path, idxs in failed.sent_blocks.items():
                forget_blocks(b, path, idxs)
            b.commit()
        except StateError:
            if b is not None:
                b.rollback()

    # -- restore points (daemon.source.points) -----------------------------------------------------
    def _idle(self) -> bool:
        """Nothing of the volume waits to be published, and nothing published is in doubt."""
        return (not self.dirty and not self.renames and not self.doubt and not self.resyncs and self.gate.scanned
                and not self.scanning)

    async def _point(self) -> bool:
        """Send a restore point if one is due; True if the worker did something (a point, a hook
        run, or a stale path marked again)."""
        now = time.monotonic()
        if self._hooked is not None and now - self._hooked > self.vol.point_hook_timeout:
            log.error("volume %s: no restore point within point_hook_timeout (%g s) of point_pre_command; running the "
                      "post-command", self.name, self.vol.point_hook_timeout, extra={"volume": self.name, "event": "point_hook_timeout"})
            self.points.last_point = now  # not before another interval
            await self._hook("post", None)
            return True
        if not self.points.due(now, idle=self._idle(), watching=self.watching()):
            return False
        if self.vol.point_pre_command and self._hooked is None:
            if not await self._hook("pre", None):
                self.points.last_point = time.monotonic()  # no point this interval: tried again at the next
                return True
            self._hooked = time.monotonic()
            self.points.event(self._hooked)  # what the command wrote is replicated before the point
            return True
        checked = self.points.last_event
        root = self.vol.path
        stale = await asyncio.to_thread(self.points.stale, lambda p: lstat(str(root / p)))
        if stale:
            self.m.points.labels(self.name, "stale").inc(len(stale))
            for p in stale:
                if not self.mark(p, force=True, delay=0):  # changed since it was read: read again first
                    self.points.read.pop(p, None)  # ... unless it is not replicated at all
            return True
        if self.points.last_event != checked or not self._idle():
            return True  # a change came while the reads were checked: a point later
        b = Batch(None, self.name)
        now = time.monotonic()
        try:
            # a pre-command's point must come within what is left of point_hook_timeout
            left = None if self._hooked is None else max(self._hooked + self.vol.point_hook_timeout - time.monotonic(), 0.1)
            await asyncio.wait_for(self._send_point(b), left)
        except Exception as e:  # noqa: BLE001 - a point is tried again when due, never fatal
            self.m.points.labels(self.name, "failed").inc()
            self.points.last_point = now  # not before another interval
            self.points.next_id += 1  # the record may still arrive: its id is never given to another point
            self._control_failed("restore point", e)
            if self._hooked is not None:
                await self._hook("post", None)
            return True
        ident = self.points.sent(now)
        self._count(b)
        self.m.points.labels(self.name, "sent").inc()
        self.m.last_point.labels(self.name).set(time.time())
        await self._hook("post", ident)  # ends the wait for the point; runs point_post_command if there is one
        return True

    async def _send_point(self, b: Batch) -> None:
        b.sent("point", await self.pub.send(self.name, "point", {"id": self.points.next_id}))
        await b.acks()

    async def _hook(self, phase: str, point: int | None) -> bool:
        """Run the volume's pre- or post-command (a post-command ends the wait for a point)."""
        if phase == "post":
            self._hooked = None
        cmd = self.vol.point_pre_command if phase == "pre" else self.vol.point_post_command
        if not cmd:
            return True
        env = {"VOLMIRROR_VOLUME": self.name, "VOLMIRROR_ROOT": str(self.vol.path), "VOLMIRROR_PHASE": phase}
        if point is not None:
            env["VOLMIRROR_POINT"] = str(point)
        r = await run_hook(cmd, env, self.vol.point_hook_timeout)
        self.m.point_hooks.labels(self.name, phase, "ok" if r.ok else "failed").inc()
        if r.ok:
            log.debug("volume %s: point_%s_command done in %.3f s", self.name, phase, r.seconds, extra={"volume": self.name})
        else:
            log.error("volume %s: point_%s_command failed (%s)%s%s", self.name, phase, r.why,
                      "; no restore point this interval" if phase == "pre" else "", f": {r.output}" if r.output else "",
                      extra={"volume": self.name, "event": f"point_{phase}_command_failed"})
        return r.ok

    # -- checkpoints and listings ----------------------------------------------------------------
    async def _checkpoint(self) -> None:
        now = time.monotonic()
        nonces = list(self.checkpoints) or [None]
        self.checkpoints.clear()
        self.next_checkpoint = now + self.checkpoint_interval
        b = Batch(None, self.name)
        try:
            for nonce in nonces:
                self.checkpoint_id += 1
                fields = await checkpoint_fields(self._open_index(), self.name, self.checkpoint_id, nonce)
                b.sent("checkpoint", await self.pub.send(self.name, "checkpoint", fields))
            await b.acks()
            self._count(b)
        except Exception as e:  # noqa: BLE001 - a checkpoint is retried, never fatal
            self.checkpoints.extend(n for n in nonces if n)
            self._control_failed("checkpoint", e)

    def _listing_may_go(self) -> bool:
        why = listing_blocked(self.gate, self.doubt)
        if why is None:
            return True
        for nonce in self.listings:
            if nonce not in self._deferred:
                self._deferred.add(nonce)
                self.m.listings.labels(self.name, "deferred").inc()
                log.info("listing %s of %s deferred: %s", nonce, self.name, why, extra={"volume": self.name, "event": "listing_deferred"})
        return False

    async def _listing(self) -> None:
        nonce = self.listings[0]
        b = Batch(None, self.name)
        try:
            rows = await send_listing(self._open_index(), self.pub, self.name, nonce, b)
            await b.acks()
        except Exception as e:  # noqa: BLE001 - the listing stays queued and is tried again
            self.m.listings.labels(self.name, "failed").inc()
            self._control_failed("listing", e)
            return
        self.listings.popleft()
        self._deferred.discard(nonce)
        self._count(b)
        self.m.listings.labels(self.name, "sent").inc()
        log.info("sent listing %s of %s (%d entries, %d part(s))", nonce, self.name, rows, len(b.futures),
                 extra={"volume": self.name, "event": "listing"})

    def _control_failed(self, what: str, e: BaseException) -> None:
        self.next_control = time.monotonic() + CONTROL_RETRY
        self.next_checkpoint = min(self.next_checkpoint, self.next_control)
        if isinstance(e, StateError):
            self._state_failed(e, CONTROL_RETRY)
            return
        if isinstance(e, TransientError):
            self.m.kafka_connected.set(0)
        log.warning("%s of %s not sent: %s; retrying in %.0f s", what, self.name, e, CONTROL_RETRY, extra={"volume": self.name})

    def _open_index(self) -> SourceIndex:
        if self.index is None:
            raise StateError(f"index of {self.name} is not open")
        return self.index

    # -- progress -------------------------------------------------------------------------------
    def _finish_progress(self) -> None:
        p = self.progress
        el = time.monotonic() - p.started
        log.info(
            "sync of volume %s complete: %d files, %.1f MiB read in %.1f s (%.1f MiB/s)",
            self.name, p.files_done, p.bytes_done / 2**20, el, p.bytes_done / 2**20 / max(el, 1e-6),
            extra={"volume": self.name, "event": "sync_complete"},
        )
        p.active = False
        self.m.sync_files_done.labels(self.name).set(p.files_done)
        self.m.sync_bytes_done.labels(self.name).set(p.bytes_done)
        self.m.sync_rate.labels(self.name).set(0)
        self.m.sync_eta.labels(self.name).set(0)

    def _mark_children(self, path: str) -> None:
        try:
            names = os.listdir(self.vol.path / path)
        except OSError:
            return
        # the contents of a directory a live change created are live changes too (a backlog
        # otherwise: a new directory's files would wait behind a whole initial sync)
        delay = None if self._examining_live else 0
        for n in names:
            self.mark(f"{path}/{n}", force=True, delay=delay)

    # -- renames --------------------------------------------------------------------------------
    def _renames_to_marks(self) -> None:
        """After a failed rename, queued renames (e.g. the per-child events of a moved directory)
        are examined as paths instead: slower, but nothing waits on a failing Kafka or state_dir."""
        delay = backoff(self.failures, STATE_BACKOFF)
        while self.renames:
            src, dst, _ = self.renames.popleft()
            for p in (src, dst):
                if p:
                    self.mark(p, force=True, delay=delay)

    async def _rename(self, src: str | None, dst: str | None, is_dir: bool) -> bool:
        """Publish one rename; False if it failed (both paths are then in doubt and marked)."""
        for p in (src, dst):
            if p is not None and not replicable_name(p):
                self._unreplicable(p, NOT_UTF8)
        src = src if src is not None and replicable_name(src) and not self.vol.is_excluded(src) else None
        if dst is not None and (not replicable_name(dst) or self.vol.is_excluded(dst)):
            if src is not None:
                self.mark(src, force=True, delay=0)
            return True
        if not src or not dst:
            if src or dst:
                self.mark(src or dst or "", force=bool(src), delay=0)
            return True
        idx = self._open_index()
        if idx.get(self.name, src) is None:
            # unknown source (new file, or already moved with its parent directory); if the index
            # holds files below it (a directory whose mkdir was never published), examining src
            # removes them
            if idx.children(self.name, src):
                self.mark(src, force=True, delay=0)
            self.mark(dst, force=False, delay=0)
            return True
        b: Batch | None = None
        try:
            b = Batch(idx, self.name)
            # the destination's parents first (a file moved into a directory made while Kafka was
            # away): never leave the mirror to create them implicitly
            if not await self.examiner.parents(b, dst):
                # dst's parent is gone again (moved or removed since): examine both paths instead
                await self._settle(b)
                self.mark(src, force=True, delay=0)
                self.mark(dst, force=True, delay=0)
                return True
            self.dirty.move(src, dst)
            for p in self.doubt.move(src, dst):
                self.mark(p, force=True, delay=0)  # still in doubt under its new name: examined again
            b.sent("rename", await self.pub.send(self.name, "rename", {"path": src, "dst": dst}))
            b.rename(src, dst)
            b.paths += [src, dst]
            await self._settle(b)
        except asyncio.CancelledError:
            if b is not None:
                b.rollback()
            self.mark(src, force=True, delay=0)
            self.mark(dst, force=True, delay=0)
            raise
        except Exception as err:  # noqa: BLE001 - fall back to examining both paths
            if b is not None:
                b.rollback()
            self.failures += 1
            delay = backoff(self.failures, STATE_BACKOFF)
            if isinstance(err, StateError):
                self._state_failed(err, delay)
            else:
                self.m.kafka_connected.set(0)
                self.m.errors.labels(self.name, "publish").inc()
                log.error("publishing rename failed (%s); re-examining both paths", err, extra={"volume": self.name, "path": src})
            for p in dict.fromkeys([*(b.paths if b is not None else []), src, dst]):  # parents it published too
                self.doubt.add(p)
                self.mark(p, force=True, delay=delay)
            self.m.in_doubt.labels(self.name).set(len(self.doubt))
            return False
        self.mark(dst, force=False, delay=0)
        self.mark(src, force=False, delay=0)  # if something new appeared at src meanwhile
        return True


__all__ = ["VolumeWorker", "Progress"]
