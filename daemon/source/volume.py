"""One volume's source pipeline: coalesced dirty paths → read/diff → publish → index commit.

A single task per volume owns the volume's index rows, so a volume's events are produced in one
order. Watcher events and scan results only *mark* paths dirty (with a debounce and a maximum
delay); renames are queued in arrival order and published before the next batch, without data.

A batch is: examine each due path against the index, send what changed (blocks, zero-blocks, size,
manifest, directory and symlink ops), await every ack, then commit the index. If any send fails the
index is rolled back, the blocks that may have reached the mirror are marked unknown in the index
(so they are sent again even if the file changes back), and the paths are retried with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..blocks import HASH_LEN, file_root, zero_hash
from ..digest import listing_row, volume_digest
from ..config import VolumeConfig
from ..errors import FileChangedError, PermanentError, PublishError, TransientError
from ..index import DIR, FILE, SYMLINK, Entry, SourceIndex
from ..metrics import SourceMetrics
from .publisher import Publisher
from .reader import ReadResult, Stat, lstat, read_file

log = logging.getLogger("volmirror.source")

LISTING_ROWS = 2000
BATCH_PATHS = 256
BATCH_BYTES = 64 * 1024 * 1024
UNKNOWN_HASH = b"\xff" * HASH_LEN


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


@dataclass
class _Batch:
    futures: list[asyncio.Future] = field(default_factory=list)
    paths: list[tuple[str, bool]] = field(default_factory=list)
    sent_blocks: dict[str, set[int]] = field(default_factory=dict)
    payload_bytes: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    blocks: dict[str, int] = field(default_factory=lambda: {"changed": 0, "unchanged": 0, "zero": 0})
    files_done: int = 0
    bytes_read: int = 0


class VolumeWorker:
    def __init__(
        self,
        vol: VolumeConfig,
        index: SourceIndex,
        publisher: Publisher,
        metrics: SourceMetrics,
        *,
        debounce: float = 0.05,
        max_delay: float = 1.0,
        checkpoint_interval: float = 60.0,
    ) -> None:
        self.vol = vol
        self.name = vol.name
        self.root = str(vol.path)
        self.index = index
        self.pub = publisher
        self.m = metrics
        self.debounce = debounce
        self.max_delay = max_delay
        self.dirty: dict[str, tuple[float, float, bool]] = {}  # path → (due, first_seen, force)
        self.renames: deque[tuple[str | None, str | None, bool]] = deque()
        self._wake = asyncio.Event()
        self.progress = Progress()
        self.last_published = 0.0
        self.failures = 0
        self.scanning = False
        self.checkpoint_interval = checkpoint_interval
        self.next_checkpoint = time.monotonic() + min(5.0, checkpoint_interval)
        self.checkpoint_id = 0
        self.control: deque[tuple[str, str | None]] = deque()  # ("checkpoint"|"listing", nonce)
        self.resyncs: dict[str, bytes | None] = {}  # path → the mirror's block hashes (None: send all)
        self._bad_names: set[str] = set()

    # -- inputs ---------------------------------------------------------------------------------
    def notify(self, kind: str, src: str | None, dst: str | None, is_dir: bool) -> None:
        """Watcher callback (runs on the loop)."""
        if kind == "moved":
            self.renames.append((src, dst, is_dir))
            self._wake.set()
        elif src:
            self.mark(src, force=True)

    def mark(self, path: str, *, force: bool, delay: float | None = None) -> None:
        """Mark a path for examination: after the debounce (never later than ``max_delay`` after
        the first unprocessed mark), or after an explicit ``delay`` (retries, backoff)."""
        if not path:
            return
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            if path not in self._bad_names:
                self._bad_names.add(path)
                self.m.errors.labels(self.name, "bad_name").inc()
                log.error("file name is not valid UTF-8; not replicated", extra={"volume": self.name, "path": repr(path)})
            return
        if self.vol.is_excluded(path) and self.index.get(self.name, path) is None:
            return
        now = time.monotonic()
        old = self.dirty.get(path)
        first = old[1] if old else now
        if delay is None:
            due = min(now + self.debounce, first + self.max_delay)
        else:
            due = now + delay
        self.dirty[path] = (due, first, force or (old[2] if old else False))
        self.m.pending_files.labels(self.name).set(len(self.dirty))
        self._wake.set()

    def request(self, kind: str, nonce: str | None = None) -> None:
        """Control request from a mirror: a checkpoint now, or a listing of the index."""
        self.control.append((kind, nonce))
        self._wake.set()

    def resync(self, path: str, mirror_hashes: bytes | None) -> None:
        """A mirror found ``path`` drifted: send what differs from ``mirror_hashes`` (all if None)."""
        self.resyncs[path] = mirror_hashes
        self.mark(path, force=True, delay=0)

    def queue_rename(self, src: str, dst: str, is_dir: bool) -> None:
        self.renames.append((src, dst, is_dir))
        self._wake.set()

    # -- main loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            while self.renames:
                src, dst, is_dir = self.renames[0]
                await self._rename(src, dst, is_dir)
                self.renames.popleft()
            now = time.monotonic()
            if self.control or now >= self.next_checkpoint:
                await self._control_work()
            due = sorted(p for p, (t, _, _) in self.dirty.items() if t <= now)
            if due:
                await self._process(due)
                continue
            self._wake.clear()
            if self.progress.active and not self.dirty and not self.scanning:
                self._finish_progress()
            timeout = min(min((t for t, _, _ in self.dirty.values()), default=now + 3600), self.next_checkpoint) - now
            try:
                await asyncio.wait_for(self._wake.wait(), max(timeout, 0.001))
            except asyncio.TimeoutError:
                pass

    async def _control_work(self) -> None:
        """Checkpoints and listings, made between batches: the index then matches the stream."""
        now = time.monotonic()
        work = list(self.control)
        self.control.clear()
        if now >= self.next_checkpoint:
            self.next_checkpoint = now + self.checkpoint_interval
            work.append(("checkpoint", None))
        b = _Batch()
        try:
            for kind, nonce in work:
                entries = list(self.index.iter_volume(self.name))
                if kind == "checkpoint":
                    root, files, nbytes = volume_digest(entries)
                    self.checkpoint_id += 1
                    f = {"id": self.checkpoint_id, "files": files, "bytes": nbytes, "root": root.hex()}
                    if nonce:
                        f["nonce"] = nonce
                    await self._send(b, "checkpoint", f)
                elif kind == "listing" and nonce:
                    rows = [listing_row(e) for e in entries]
                    parts = [rows[i : i + LISTING_ROWS] for i in range(0, len(rows), LISTING_ROWS)] or [[]]
                    for i, part in enumerate(parts):
                        b.futures.append(await self.pub.send(self.name, "listing", {"nonce": nonce, "part": i, "last": i == len(parts) - 1, "entries": part}, seq=False))
                    log.info("sent a listing of %s (%d entries) to a mirror", self.name, len(rows), extra={"volume": self.name, "event": "listing"})
            await self._flush(b)
        except (TransientError, asyncio.TimeoutError, OSError) as e:
            self.m.kafka_connected.set(0)
            log.warning("checkpoint/listing not sent: %s", e, extra={"volume": self.name})
            self.next_checkpoint = time.monotonic() + 5.0

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

    async def _process(self, due: list[str]) -> None:
        batch = _Batch()
        self.index.begin()
        try:
            for path in due:
                entry = self.dirty.pop(path, None)
                if entry is None:
                    continue
                force = entry[2]
                batch.paths.append((path, force))
                try:
                    await self._examine(path, force, batch)
                except PublishError:
                    raise
                except FileChangedError:
                    self.m.torn_reads.labels(self.name).inc()
                    log.debug("file changed while reading; re-queued", extra={"volume": self.name, "path": path})
                    self.mark(path, force=True, delay=max(self.debounce, 0.2))
                except PermanentError as e:
                    self.m.errors.labels(self.name, "read").inc()
                    log.error("%s", e, extra={"volume": self.name, "path": path})
                    self.mark(path, force=True, delay=30.0)
                except TransientError as e:
                    self.m.errors.labels(self.name, "read").inc()
                    log.warning("%s; retrying", e, extra={"volume": self.name, "path": path})
                    self.mark(path, force=True, delay=2.0)
                if len(batch.paths) >= BATCH_PATHS or batch.payload_bytes >= BATCH_BYTES:
                    await self._flush(batch)
                    batch = _Batch()
                    self.index.begin()
            await self._flush(batch)
        except (TransientError, asyncio.TimeoutError, OSError) as e:
            await self._failed(batch, e)
        except BaseException:
            self.index.rollback()
            raise
        self.m.pending_files.labels(self.name).set(len(self.dirty))

    async def _flush(self, b: _Batch) -> None:
        t0 = time.monotonic()
        if b.futures:
            results = await asyncio.gather(*b.futures, return_exceptions=True)
            errs = [r for r in results if isinstance(r, BaseException)]
            if errs:
                raise PublishError(f"Kafka did not acknowledge {len(errs)} of {len(results)} records: {errs[0]!r}")
            self.m.publish_latency.labels(self.name).observe(time.monotonic() - t0)
        self.index.commit()
        self.failures = 0
        self.m.kafka_connected.set(1)
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

    async def _failed(self, b: _Batch, err: BaseException) -> None:
        self.index.rollback()
        self.m.kafka_connected.set(0)
        self.m.errors.labels(self.name, "publish").inc()
        self.failures += 1
        backoff = min(2.0 ** self.failures, 30.0)
        log.error("publishing failed (%s); %d path(s) retried in %.0f s", err, len(b.paths), backoff, extra={"volume": self.name})
        # Records may have reached the mirror although the batch failed: forget the hashes of
        # every block we tried to send, so they are sent again whatever the file holds next.
        if b.sent_blocks:
            self.index.begin()
            for path, idxs in b.sent_blocks.items():
                self._forget_blocks(path, idxs)
            self.index.commit()
        for path, _force in b.paths:
            self.mark(path, force=True, delay=backoff)
        await asyncio.sleep(backoff)

    def _forget_blocks(self, path: str, idxs: set[int]) -> None:
        e = self.index.get(self.name, path)
        if e is None or e.kind != FILE:
            return
        h = bytearray(e.hashes)
        for i in idxs:
            if (i + 1) * HASH_LEN <= len(h):
                h[i * HASH_LEN : (i + 1) * HASH_LEN] = UNKNOWN_HASH
        self.index.put(self.name, Entry(e.path, e.kind, e.size, e.mtime_ns, e.ino, e.mode, e.target, bytes(h), e.root))

    # -- one path -------------------------------------------------------------------------------
    async def _send(self, b: _Batch, op: str, fields: dict[str, Any], payload: bytes = b"") -> None:
        b.futures.append(await self.pub.send(self.name, op, fields, payload))
        b.ops[op] = b.ops.get(op, 0) + 1

    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    async def _remove(self, b: _Batch, path: str, e: Entry) -> None:
        if e.kind == DIR:
            await self._send(b, "rmtree", {"path": path})
            self.index.delete_tree(self.name, path)
        else:
            await self._send(b, "delete", {"path": path})
            self.index.delete(self.name, path)

    async def _examine(self, path: str, force: bool, b: _Batch) -> None:
        st = None if self.vol.is_excluded(path) else lstat(self._abs(path))
        e = self.index.get(self.name, path)
        resync = path in self.resyncs
        mirror_hashes = self.resyncs.pop(path, None)
        if st is None or st.kind == "o":
            if e is not None:
                await self._remove(b, path, e)
            elif resync:
                await self._send(b, "delete", {"path": path})
            return
        if resync and st.kind == DIR and e is not None and e.kind == DIR:
            await self._send(b, "mkdir", {"path": path, "mode": st.mode})
            self.index.put(self.name, Entry(path, DIR, 0, st.mtime_ns, st.ino, st.mode))
            return
        if resync and st.kind == SYMLINK:
            e = None  # resend the link as it is now
        if e is not None and e.kind != st.kind:
            await self._remove(b, path, e)
            e = None
        if st.kind == DIR:
            if e is None or e.mode != st.mode or e.ino != st.ino:
                await self._send(b, "mkdir", {"path": path, "mode": st.mode})
                self.index.put(self.name, Entry(path, DIR, 0, st.mtime_ns, st.ino, st.mode))
            if e is None:
                self._mark_children(path)
        elif st.kind == SYMLINK:
            try:
                target = os.readlink(self._abs(path))
            except FileNotFoundError:
                raise FileChangedError(path) from None
            if e is None or e.target != target:
                await self._send(b, "symlink", {"path": path, "target": target})
                self.index.put(self.name, Entry(path, SYMLINK, 0, st.mtime_ns, st.ino, 0, target))
        else:
            await self._file(path, st, e, force, b, resync=resync, mirror_hashes=mirror_hashes)

    def _mark_children(self, path: str) -> None:
        try:
            names = os.listdir(self._abs(path))
        except OSError:
            return
        for n in names:
            self.mark(f"{path}/{n}", force=True, delay=0)

    async def _file(
        self, path: str, st: Stat, e: Entry | None, force: bool, b: _Batch, *, resync: bool = False, mirror_hashes: bytes | None = None
    ) -> None:
        if not force and e is not None and (e.size, e.mtime_ns, e.ino, e.mode) == (st.size, st.mtime_ns, st.ino, st.mode):
            return
        bs = self.vol.block_size
        known = e.hashes if e is not None else None
        if resync:
            # answer a mirror: diff against what *it* has, and always end with a manifest
            known = mirror_hashes
            e = None
        res = ReadResult(before=st)
        gen = read_file(self._abs(path), bs, known, res)
        sent = b.sent_blocks.setdefault(path, set())
        size_changed = e is None or e.size != st.size
        first = True
        blocks_changed = False
        try:
            while True:
                seg = await asyncio.to_thread(next, gen, None)
                if seg is None:
                    break
                if first and size_changed:
                    await self._send(b, "truncate", {"path": path, "size": st.size, "bs": bs})
                first = False
                for blk, data in seg.changed:
                    fields = {"path": path, "off": blk.offset, "len": blk.length, "hash": blk.hash.hex(), "size": st.size, "zero": blk.zero, "bs": bs}
                    await self._send(b, "block", fields, data)
                    sent.add(blk.index)
                    if blk.zero:
                        b.blocks["zero"] += 1
                    else:
                        b.blocks["changed"] += 1
                        b.payload_bytes += blk.length
                    blocks_changed = True
                b.blocks["unchanged"] += seg.unchanged
        except FileChangedError:
            if sent:
                self._forget_blocks(path, sent)
            if resync:
                self.resyncs[path] = mirror_hashes  # answer the mirror on the retry
            raise
        finally:
            gen.close()
        b.files_done += 1
        b.bytes_read += res.bytes_read
        hashes = bytes(res.hashes)
        if (
            e is not None
            and not blocks_changed
            and not size_changed
            and (e.mode, e.mtime_ns, e.ino) == (st.mode, st.mtime_ns, st.ino)
            and e.hashes == hashes
        ):
            return
        root = file_root(hashes, st.size)
        mf = {"path": path, "size": st.size, "mode": st.mode, "mtime_ns": st.mtime_ns, "root": root.hex(), "bs": bs}
        if resync:
            mf["repair"] = True
            log.info("resent %s to a mirror (%d block(s))", path, len(sent), extra={"volume": self.name, "path": path, "event": "resync"})
        await self._send(b, "manifest", mf)
        self.index.put(self.name, Entry(path, FILE, st.size, st.mtime_ns, st.ino, st.mode, None, hashes, root))

    # -- renames --------------------------------------------------------------------------------
    async def _rename(self, src: str | None, dst: str | None, is_dir: bool) -> None:
        if src is not None and self.vol.is_excluded(src):
            src = None
        if dst is not None and self.vol.is_excluded(dst):
            if src is not None:
                self.mark(src, force=True, delay=0)
            return
        if not src:
            if dst:
                self.mark(dst, force=True, delay=0)
            return
        if not dst:
            self.mark(src, force=True, delay=0)
            return
        e = self.index.get(self.name, src)
        if e is None:
            # unknown source (new file, or already moved with its parent directory)
            self.mark(dst, force=False, delay=0)
            return
        # pending marks under src follow the rename
        for p in [p for p in self.dirty if p == src or p.startswith(src + "/")]:
            self.dirty[dst + p[len(src) :]] = self.dirty.pop(p)
        b = _Batch()
        self.index.begin()
        try:
            await self._send(b, "rename", {"path": src, "dst": dst})
            self.index.rename(self.name, src, dst)
            await self._flush(b)
        except (TransientError, asyncio.TimeoutError, OSError) as err:
            self.index.rollback()
            self.m.kafka_connected.set(0)
            log.error("publishing rename failed (%s); falling back to rescanning both paths", err, extra={"volume": self.name, "path": src})
            self.mark(src, force=True, delay=2.0)
            self.mark(dst, force=True, delay=2.0)
            return
        except BaseException:
            self.index.rollback()
            raise
        self.mark(dst, force=False, delay=0)
        self.mark(src, force=False, delay=0)  # if something new appeared at src meanwhile


__all__ = ["VolumeWorker", "Progress", "zero_hash"]
