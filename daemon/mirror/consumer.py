"""The apply actor: the one owner of the mirror's state.

:class:`ApplyActor` owns the mirror index, the applier, the verifier, the scrubber, the listing
spool, the drift registry and the quarantine, and runs every operation on them on **one** worker
thread, in the order the event loop sends them (:meth:`ApplyActor.call`). The event loop never
touches that state: it sends messages (apply these records, make them durable, scrub this much,
verify that volume) and reads :attr:`ApplyActor.snap`, a snapshot refreshed after every message.

Per record, in offset order: decode (schema, shape, hash, sizes against ``mirror.max_file_size``) →
source identity check (block size and host may not change without ``mirror.accept_new_source``) →
duplicate check by (epoch, seq) → far-future seq check → apply → index upkeep. Outcomes:

* a hostile or malformed record is rejected: counted, logged, skipped;
* a local failure is classified (:func:`daemon.mirror.repair.classify`): retried (disk full, I/O
  error: the batch stops at that record and the loop rewinds to it) or, if it can never succeed here
  (name too long for this root, file too large, permission after retries), *quarantined*: the path
  is recorded with its offset, counted, logged, shown in ``status`` and
  ``volmirror_mirror_quarantined_paths``, and the stream moves on;
* a state_dir failure (index write) rolls the index back to the last durable point and tells the
  loop to re-read from the offsets of that point (:class:`daemon.errors.StateError`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import VOLUME_NAME_RE, MirrorConfig
from ..errors import DurabilityError, RejectedEvent, StateError
from ..kafka import Record
from ..wire import Event, decode
from . import repair as R
from .applier import Applier, ApplyError
from .drift import Drift
from .guard import Burst, Guard, looks_encrypted
from .history import History, prune_plan
from ..store.holds import HOLD_FILE, SUPERSEDED_FILE, load_json, save_json
from ..store.mirror_index import MirrorIndex
from .scrubber import Scrubber
from ..store.listing_spool import ListingSpool
from .verifier import Verifier

log = logging.getLogger("volmirror.mirror")

FUTURE_SEQ = 1_000_000  # a seq this far past the stream's announced position is forged or corrupt
PLANNABLE = frozenset(("block", "truncate", "manifest", "file", "mkdir", "symlink", "delete", "rmtree"))  # History.plan
UNKNOWN_VOLUME = "_unknown"


class ResumeRefused(Exception):
    """``volmirror resume`` of a volume that must not resume yet (a failover without failback)."""


class GuardPause(Exception):
    """The volume is paused by the mass-change guard: its partition stops at this record."""


@dataclass
class BatchResult:
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    rewind: dict[tuple[str, int], int] = field(default_factory=dict)
    applied: int = 0
    error: str | None = None
    paused: str | None = None  # a volume the guard holds: its partition waits at its record (rewind)
    state_error: str | None = None  # index write failed: re-read from the last durable offsets


@dataclass
class Announcement:
    host: str
    src: str
    block_size: int
    heartbeat_interval: float
    checkpoint_interval: float
    seen: float
    unprotected: int = 0
    point_interval: float = 0.0  # the source's (0: no restore points, or a source from before they existed)


@dataclass
class Faults:
    """Test seams (never set in production): lose one op of one path; fail every apply (of one
    volume, with ``stall_volume``) while a file exists; fail every durability point while a file
    exists (``sync_file``, as a failed fsync would)."""

    drop: tuple[str, str] | None = None
    stall_file: str | None = None
    stall_volume: str | None = None
    sync_file: str | None = None

    def apply_fails(self, vol: str) -> bool:
        return self.stall_file is not None and os.path.exists(self.stall_file) and self.stall_volume in (None, vol)

    def sync_fails(self) -> bool:
        return self.sync_file is not None and os.path.exists(self.sync_file)


@dataclass(frozen=True)
class VolumeSnap:
    epoch: str
    seq: int
    last_ts: float
    partition: int
    drift: int
    quarantined: int
    conflict: str | None
    last_verified: float | None
    mass_change: str | None = None  # the burst going on (mass-change guard)
    paused: str | None = None  # why applying is held (guard = "pause")


class ApplyActor:
    def __init__(self, mc: MirrorConfig, metrics: Any, *, send: Callable[[dict], None], mirrored: Callable[[str], bool],
                 on_volume: Callable[[str], bool], faults: Faults | None = None) -> None:
        self.mc = mc
        self.m = metrics
        self.mirrored = mirrored
        self.on_volume = on_volume  # first sight of a volume (creates its metric series; thread-safe)
        self.faults = faults or Faults()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="volmirror-apply")
        self._counters: dict[tuple[str, str | None], Any] = {}  # metric children by (volume, op)
        self.idx = MirrorIndex(mc.state_dir / "mirror.sqlite")
        self.history = History(mc.history_path, mc.root)
        for vol, k in self.idx.latest_segments().items():
            self.history.open(vol, k)
            self.history.remove(vol, self.history.orphans(vol, self.idx.points(vol)[0].segment))
        self.applier = Applier(mc.root, undo=self.history)
        self._initial_checked: set[str] = set()  # volumes _initial_point has looked at
        self.guard = Guard(window=mc.guard_window_s, min_files=mc.guard_min_files, fraction=mc.guard_fraction)
        if mc.guard != "off":
            self.history.on_rewrite = self._rewrite
        self._guard_file = mc.state_dir / HOLD_FILE
        self.paused: dict[str, dict] = load_json(self._guard_file)  # volume → why and since when (kept across restarts)
        for v in self.paused:
            if v != "*" and self.mirrored(v):
                self.m.guard_paused.labels(v).set(1)
        self._superseded_file = mc.state_dir / SUPERSEDED_FILE
        self.superseded: dict[str, dict[str, int]] = load_json(self._superseded_file, hold_all=False)  # volume → "topic:partition" → offset
        self.bursts: dict[str, Burst] = {}  # volumes with a burst going on (alert or pause)
        self._files: dict[str, tuple[float, int]] = {}  # volume → (when counted, files in its index)
        self.drift = Drift(metrics)
        self.spool = ListingSpool(mc.state_dir / "listing-spool.sqlite")
        self.verifier = Verifier(self.idx, self.applier, metrics, self.drift, self.spool, repair=mc.repair, send=send,
                                 is_quarantined=self.idx.is_quarantined)
        self.scrubber = Scrubber(self.verifier)
        self.announced: dict[str, Announcement] = {}
        self.conflicts: dict[str, str] = {}  # volume → why its announce was refused
        self.anchor: dict[str, tuple[str, int]] = {}  # volume → (epoch, seq) of the newest heartbeat/announce
        self.gap_partitions: set[int] = set()  # a jump in seq is expected once (stream gap)
        self._gaps_used: set[int] = set()  # ... taken since the last durable point (reset gives them back)
        self._retries: dict[tuple[str, int, int], int] = {}
        self.undurable_bytes = 0
        self._decoded: dict[int, Event | RejectedEvent] = {}  # records decoded ahead by _plan
        self._planned: set[int] = set()  # records of the batch whose undo is journalled
        self._plan_end = 0  # the first record after the last planned run
        self.snap: dict[str, VolumeSnap] = {}
        for vol in self.idx.volumes:
            on_volume(vol)
        self._snapshot()

    # -- messages from the event loop ----------------------------------------------------------
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._run, fn, args)
        finally:
            pass

    def _run(self, fn: Callable[..., Any], args: tuple) -> Any:
        self.history.lock()  # shared: a restore's copy takes it exclusively (daemon.mirror.restore)
        try:
            return fn(*args)
        finally:
            self.history.unlock()
            while self.history.broken:
                vol, k = self.history.broken.pop()
                self.m.local_errors.labels("history").inc()
                try:
                    self.idx.break_points(vol, k)
                except sqlite3.Error:
                    pass  # the .broken file says it too
            self._snapshot()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.applier.close()
        self.history.close()
        self.idx.close()
        self.spool.close()

    def _snapshot(self) -> None:
        snap = {}
        vols = set(self.idx.volumes) | set(self.drift.paths) | set(self.idx.quarantine) | set(self.conflicts) | set(self.announced) | \
            set(self.paused) - {"*"}
        for v in vols:
            p = self.idx.volumes.get(v)
            snap[v] = VolumeSnap(p.epoch if p else "", p.seq if p else -1, p.last_ts if p else 0.0, p.partition if p else -1,
                                 self.drift.count(v), len(self.idx.quarantine.get(v, {})), self.conflicts.get(v),
                                 self.verifier.last_verified.get(v), self.bursts[v].describe() if v in self.bursts else None,
                                 _held_why(self.paused.get(v) or self.paused.get("*")))
        self.snap = snap

    # -- applying ---------------------------------------------------------------------------------
    def apply_records(self, recs: list[Record]) -> BatchResult:
        """Decode, check, dedupe and apply, in offset order; stops a partition at a retryable failure."""
        try:
            return self._apply_records(recs)
        finally:
            self._decoded.clear()
            self._planned.clear()
            self._plan_end = 0
            if self.history.planned:
                self.history.discard()  # removals planned but not made (the batch stopped): not counted

    def _decode(self, recs: list[Record], i: int) -> Event:
        ev = self._decoded.pop(i, None)
        if ev is None:
            ev = decode(recs[i].value, recs[i].key, max_file_size=self.mc.max_file_size)
        if isinstance(ev, RejectedEvent):
            raise ev
        return ev

    def _plan(self, recs: list[Record], i: int, ev: Event) -> bool:
        """True if the undo entries of record ``i`` are journalled already, as part of a run
        planned at once (daemon.mirror.history: one fdatasync for the run, before any of it is
        applied). A record not in a run is journalled by the applier itself, just before it."""
        if i in self._planned:
            return True
        if ev.vol in self.paused or "*" in self.paused or (self.superseded and self._superseded_record(ev.vol, recs[i])):
            return False  # held (its partition stops here) or skipped: nothing is journalled
        self._initial_point(ev)
        if i < self._plan_end or ev.op not in PLANNABLE or not self.history.active(ev.vol):
            return False
        removed: list[str] = []
        j = i
        while j < len(recs):
            e: Event | RejectedEvent | None = ev if j == i else self._decoded.get(j)
            if e is None:
                try:
                    e = decode(recs[j].value, recs[j].key, max_file_size=self.mc.max_file_size)
                except RejectedEvent as err:
                    e = err
                self._decoded[j] = e
            if isinstance(e, RejectedEvent) or e.op == "heartbeat" or not self.mirrored(e.vol) or \
                    (e.op in PLANNABLE and self.idx.is_duplicate(e.vol, e.epoch, e.seq)):
                j += 1  # changes nothing on disk
                continue
            if e.op not in PLANNABLE or e.vol in self.paused or "*" in self.paused or \
                    (self.superseded and self._superseded_record(e.vol, recs[j])):
                break
            self._initial_point(e)
            if self.history.active(e.vol):
                try:
                    vr = self.applier.vol_root(e.vol)
                    if not self.history.plan(vr, e, removed):
                        break
                except (OSError, ValueError):
                    break  # applied by itself: its own journalling meets the error and reports it
                self._planned.add(j)
            elif removed:
                break  # keep it simple: a volume without history ends a run that removes
            j += 1
        self._plan_end = max(j, i + 1)
        self.history.flush()  # a journal that cannot be written breaks the segment (History._flush), never stops the mirror
        if not self.history.active(ev.vol):
            self._planned.clear()
        return i in self._planned

    def _apply_records(self, recs: list[Record]) -> BatchResult:
        res = BatchResult()
        failed: set[tuple[str, int]] = set()
        for i, r in enumerate(recs):
            tp = (r.topic, r.partition)
            if tp in failed:
                continue
            try:
                ev = self._decode(recs, i)
            except RejectedEvent as e:
                self.reject(r, None, e)
                res.next_offsets[tp] = r.offset + 1
                continue
            planned = False
            try:
                planned = self._plan(recs, i, ev)
                self._apply_event(r, ev, planned)
            except GuardPause:
                res.paused = ev.vol
                res.rewind[tp] = r.offset
                failed.add(tp)
                continue
            except RejectedEvent as e:
                self.reject(r, ev, e)
            except ApplyError as e:
                if not self._quarantine_or_retry(r, ev, e):
                    self.m.apply_errors.labels(ev.vol).inc()
                    res.error = f"{e} (volume {ev.vol}, partition {r.partition}, offset {r.offset})"
                    res.rewind[tp] = r.offset
                    failed.add(tp)
                    continue
            except (sqlite3.Error, StateError) as e:
                self.idx.reset()
                durability = isinstance(e, DurabilityError)
                self.m.local_errors.labels("disk" if durability else "state_dir").inc()
                what = "applied data could not be made durable" if durability else "mirror index write failed"
                res.state_error = f"{what} at volume {ev.vol}, partition {r.partition}, offset {r.offset}: {e}"
                return res
            except Exception as e:  # noqa: BLE001 - a bug met by one record must not stall the stream forever
                log.exception("internal error applying %s %s (partition %d, offset %d)", ev.op, ev.path, r.partition, r.offset,
                              extra={"volume": ev.vol, "path": ev.path})
                if not self._quarantine_or_retry(r, ev, ApplyError(f"internal error: {e!r}", errno.EINVAL, ev.path)):
                    res.error = f"internal error: {e!r} (volume {ev.vol}, partition {r.partition}, offset {r.offset})"
                    res.rewind[tp] = r.offset
                    failed.add(tp)
                    continue
            finally:
                if planned and ev.op in ("delete", "rmtree"):
                    self.history.unmade(ev.vol, ev.path)  # not removed after all (skipped, failed): not counted as gone
            res.next_offsets[tp] = r.offset + 1
            res.applied += 1
        return res

    def _quarantine_or_retry(self, r: Record, ev: Event, e: ApplyError) -> bool:
        """True if the record was quarantined (the stream moves on), False to retry it later."""
        what, reason = R.classify(e.errno)
        key = (r.topic, r.partition, r.offset)
        if what == R.RETRY_THEN_QUARANTINE:
            n = self._retries[key] = self._retries.get(key, 0) + 1
            if n < R.RETRIES_BEFORE_QUARANTINE:
                return False
        elif what == R.RETRY:
            self.m.local_errors.labels("disk").inc()
            return False
        self._retries.pop(key, None)
        path = ev.path or e.path or ""
        if self.idx.quarantine_add(ev.vol, path, reason, r.partition, r.offset, time.time(), str(e)):
            self.m.quarantine_events.labels(ev.vol, reason).inc()
        self.m.quarantined.labels(ev.vol).set(len(self.idx.quarantine.get(ev.vol, {})))
        log.error("quarantined %s (%s): %s; the stream moves on, this path is NOT protected until a later change applies",
                  path, reason, e, extra={"volume": ev.vol, "path": path, "partition": r.partition, "offset": r.offset,
                                          "reason": reason, "event": "quarantined"})
        prog = self.idx.progress(ev.vol)
        prog.epoch, prog.seq = ev.epoch, ev.seq
        return True

    def _apply_event(self, r: Record, ev: Event, planned: bool = False) -> None:
        vol = ev.vol
        f = self.faults
        if f.apply_fails(vol):
            raise ApplyError(f"TEST SEAM: injected apply failure ({f.stall_file} exists)")
        if ev.op == "announce":
            self._announce(vol, ev)
            return
        if not self.mirrored(vol):
            return
        self.on_volume(vol)
        if vol in self.paused or "*" in self.paused:
            self.m.guard_paused.labels(vol).set(1)  # also a hold read back from guard-paused.json after a restart
            raise GuardPause(vol)
        if self.superseded and self._superseded_record(vol, r):
            self.m.superseded.labels(vol).inc()
            return
        prog = self.idx.progress(vol)
        prog.partition = r.partition
        if ev.op == "heartbeat":
            self._anchor(ev)
            self._seen(ev, prog)
            self.m.applied_events.labels(vol, "heartbeat").inc()
            return
        if self.idx.is_duplicate(vol, ev.epoch, ev.seq):
            return
        self._check_identity(ev)
        if prog.epoch == ev.epoch:
            a_epoch, a_seq = self.anchor.get(vol, ("", -1))
            base = max(prog.seq, a_seq if a_epoch == ev.epoch else -1)
            if ev.seq > base + FUTURE_SEQ:
                if r.partition in self.gap_partitions:
                    self.gap_partitions.discard(r.partition)
                    self._gaps_used.add(r.partition)
                else:
                    raise RejectedEvent("future_seq", f"seq {ev.seq} is {ev.seq - base} past the stream position {base} of epoch {ev.epoch}")
        elif prog.epoch:
            log.warning("volume %s: source epoch changed %s -> %s (source state was reset)", vol, prog.epoch, ev.epoch, extra={"volume": vol})
        if ev.op == "checkpoint":
            prog.epoch, prog.seq = ev.epoch, ev.seq
            self._seen(ev, prog)
            res = self.verifier.checkpoint(ev)
            pt = self.idx.point_verified(vol, ev.seq, ev.epoch, res.match, ev["root"])
            if pt is not None and not res.match:
                log.error("restore point %d of %s does not match the source's checkpoint right after it: it is not a proven "
                          "copy", pt.segment, vol, extra={"volume": vol, "event": "point_mismatch"})
            return
        if ev.op == "point":
            self._point(ev, prog)
            return
        if ev.op == "listing":
            prog.epoch, prog.seq = ev.epoch, ev.seq
            self.verifier.listing(ev)
            return
        if f.drop and f.drop == (ev.op, ev.path):
            log.warning("TEST SEAM: dropping %s %s", ev.op, ev.path, extra={"volume": vol, "path": ev.path})
            prog.epoch, prog.seq = ev.epoch, ev.seq
            return
        if self.mc.guard != "off" and ev.op in ("delete", "rmtree", "rename"):
            now = time.monotonic()
            if ev.op == "rename":
                self.guard.renamed(vol, now)
            else:
                self.guard.deleted(vol, self.idx.files_below(vol, ev.path), now)
        if self.mc.guard != "off":
            self._guard_check(vol)  # before the change: a burst is held before this record when guard = "pause"
        if ev.op != "block" and log.isEnabledFor(logging.DEBUG):
            log.debug("apply %s %s%s seq %d", ev.op, ev.path, f" -> {ev['dst']}" if ev.op == "rename" else "", ev.seq,
                      extra={"volume": vol, "event": "apply"})
        if ev.op == "rename":
            # durability barrier: everything before the rename is made durable and recorded, then
            # the rename itself, so a replay never re-runs a rename after later ops. A failure here
            # is not the rename's: what came before it is not durable (back to the last durable point)
            try:
                self.make_durable()
            except ApplyError as e:
                raise DurabilityError(f"cannot make the changes before a rename durable: {e}") from None
            n = self.applier.apply(ev)
            self.verifier.applied(ev)
            self._cleared(ev)
            try:
                self.applier.sync()
            except ApplyError as e:
                raise DurabilityError(f"cannot make a rename durable: {e}") from None
            prog.epoch, prog.seq = ev.epoch, ev.seq
            self._seen(ev, prog)
            self.idx.checkpoint()
        else:
            n = self.applier.apply(ev, planned=planned)
            self.verifier.applied(ev)
            self._cleared(ev)
            prog.epoch, prog.seq = ev.epoch, ev.seq
            self._seen(ev, prog)
        if ev.op in ("delete", "rmtree"):
            self.m.deleted_files.labels(vol, "stream").inc()
        self.undurable_bytes += n
        op = "zero" if ev.op == "block" and ev["zero"] else ev.op
        self._counter(vol, op).inc()
        if n:
            self._counter(vol, None).inc(n)

    def _counter(self, vol: str, op: str | None) -> Any:
        """The applied-events (per op) or applied-bytes (op None) child: labels() once, not per record."""
        c = self._counters.get((vol, op))
        if c is None:
            c = self._counters[(vol, op)] = self.m.applied_events.labels(vol, op) if op else self.m.applied_bytes.labels(vol)
        return c

    def _cleared(self, ev: Event) -> None:
        """A record for a quarantined path applied after all: it is no longer quarantined."""
        tree = ev.op in ("delete", "rmtree", "rename")
        gone = self.idx.quarantine_clear(ev.vol, ev.path, tree=tree)
        if ev.op == "rename":
            gone += self.idx.quarantine_clear(ev.vol, ev["dst"], tree=True)
        if gone:
            self.m.quarantined.labels(ev.vol).set(len(self.idx.quarantine.get(ev.vol, {})))
            log.info("no longer quarantined: %s", ", ".join(gone[:5]), extra={"volume": ev.vol, "path": gone[0]})

    def _anchor(self, ev: Event) -> None:
        a = self.anchor.get(ev.vol)
        if a is None or a[0] != ev.epoch or ev.seq > a[1]:
            self.anchor[ev.vol] = (ev.epoch, ev.seq)

    def _announce(self, vol: str, ev: Event) -> None:
        ident = {"host": ev["host"], "block_size": ev["block_size"]}
        key = f"source:{vol}"
        raw = self.idx.get_meta(key)
        known = json.loads(raw) if raw else None
        if known is not None and known != ident:
            if vol not in self.mc.accept_new_source:
                why = (f"announce of {vol} from host {ev['host']!r} with block size {ev['block_size']} conflicts with the known "
                       f"source (host {known['host']!r}, block size {known['block_size']}); if the volume really moved, add "
                       f"{vol!r} to mirror.accept_new_source and restart")
                self.conflicts[vol] = why
                raise RejectedEvent("conflict", why)
            log.warning("volume %s: accepted a new source identity %s (was %s) by mirror.accept_new_source", vol, ident, known,
                        extra={"volume": vol})
        if known != ident:
            self.idx.begin()
            self.idx.set_meta(key, json.dumps(ident, sort_keys=True))
        self.conflicts.pop(vol, None)
        self.announced[vol] = Announcement(ev["host"], ev["src"], ev["block_size"], float(ev["heartbeat_interval"]),
                                           float(ev["checkpoint_interval"]), time.time(), int(ev.get("unprotected") or 0),
                                           float(ev.get("point_interval") or 0.0))
        self._anchor(ev)
        self.on_volume(vol)
        if self.mirrored(vol):
            self.verifier.announced(ev)
            self.m.unprotected_paths.labels(vol).set(int(ev.get("unprotected") or 0))

    def _check_identity(self, ev: Event) -> None:
        if ev.vol in self.conflicts:
            raise RejectedEvent("conflict", self.conflicts[ev.vol])
        bs = ev.get("bs")
        ann = self.announced.get(ev.vol)
        if bs is not None and ann is not None and bs != ann.block_size:
            raise RejectedEvent("conflict", f"{ev.op} with block size {bs}, the volume's announced block size is {ann.block_size}")

    def _seen(self, ev: Event, prog: Any) -> None:
        if ev.ts > prog.last_ts:
            prog.last_ts = ev.ts
            self.m.last_event_ts.labels(ev.vol).set(ev.ts)

    def reject(self, r: Record, ev: Event | None, e: RejectedEvent) -> None:
        vol = ev.vol if ev is not None else _safe_key(r.key)
        if vol == UNKNOWN_VOLUME or not self.on_volume(vol):
            vol = UNKNOWN_VOLUME  # bounded label set: a flood of forged volume names shares one series
        self.m.rejected.labels(vol, e.reason).inc()
        log.warning(
            "rejected event: %s",
            e,
            extra={"volume": vol, "path": ev.path if ev is not None else None, "partition": r.partition, "offset": r.offset,
                   "reason": e.reason, "event": "rejected", "op": ev.op if ev is not None else None},
        )

    def _initial_point(self, ev: Event) -> None:
        """Before this mirror first changes a volume whose tree holds data it never wrote (a mirror
        put on an existing copy; the original site's tree during failback; the DR copy resumed after
        a failover): record a point of the tree as found (state ``found``, source_id 0) and open its
        history segment, so whatever the stream or a listing then changes or removes stays
        restorable. Only for a volume this mirror's index knows nothing of (not a restart in the
        middle of an initial sync) and whose source sends restore points (their pruning bounds the
        history)."""
        vol = ev.vol
        if vol in self._initial_checked or ev.op in ("heartbeat", "announce") or not self.mirrored(vol) or \
                vol in self.paused or "*" in self.paused:
            return
        ann = self.announced.get(vol)
        if ann is None:
            return  # looked at again with the next record, once the volume was announced
        if ann.point_interval <= 0 or self.history.active(vol) or self.idx.points(vol) or self.idx.volume_has_entries(vol):
            self._initial_checked.add(vol)
            return
        try:
            with os.scandir(os.path.join(self.mc.root, vol)) as it:
                if next(it, None) is None:
                    self._initial_checked.add(vol)
                    return
        except (FileNotFoundError, NotADirectoryError):
            self._initial_checked.add(vol)
            return
        now = time.time()
        k = self.idx.add_point(vol, 0, "", 0, now, now, state="found")  # epoch "": never a checkpoint's predecessor
        try:
            self.make_durable()
        except ApplyError as e:
            raise DurabilityError(f"cannot record the restore point of {vol}'s existing tree: {e}") from None
        self._initial_checked.add(vol)  # only now: a failed attempt (rolled back) is made again
        try:
            self.history.open(vol, k)
        except OSError as e:
            self.idx.break_points(vol, k)
            log.error("volume %s: cannot open the history for its existing tree (%s): restore point %d is marked broken", vol, e, k,
                      extra={"volume": vol, "event": "history_error"})
            return
        self.m.points.labels(vol).inc()
        log.warning("volume %s: its tree in %s holds data this mirror did not write; restore point %d keeps it restorable "
                    "before anything of the stream changes it", vol, self.mc.root, k, extra={"volume": vol, "event": "initial_point"})

    def _point(self, ev: Event, prog: Any) -> None:
        """A restore point: everything before it is made durable with the point recorded, then
        the history opens the segment that journals what comes after it."""
        vol = ev.vol
        prog.epoch, prog.seq = ev.epoch, ev.seq
        self._seen(ev, prog)
        now = time.time()
        k = self.idx.add_point(vol, ev["id"], ev.epoch, ev.seq, ev.ts, now)
        pts = self.idx.points(vol)
        gone = prune_plan([(p.segment, p.applied_ts) for p in pts], {p.segment: self.history.size(vol, p.segment) for p in pts}, now,
                          self.mc.history_hours, self.mc.history_max_gib * 2**30) if vol not in self.bursts else []  # a burst: keep every point before it
        if gone:
            self.idx.drop_points(vol, max(gone) + 1)
        try:
            self.make_durable()
        except ApplyError as e:
            raise DurabilityError(f"cannot make the changes before a restore point durable: {e}") from None
        self.history.open(vol, k)
        if gone:
            self.history.remove(vol, gone)  # after the commit: a crash in between leaves orphans, removed at start-up
            self.m.history_pruned.labels(vol).inc(len(gone))
            log.info("history of %s: pruned %d restore point(s) up to %d (history_hours %g, history_max_gib %g)", vol, len(gone),
                     max(gone), self.mc.history_hours, self.mc.history_max_gib, extra={"volume": vol, "event": "history_pruned"})
        self.m.history_bytes.labels(vol).set(sum(self.history.size(vol, p.segment) for p in pts if p.segment not in gone))
        self.m.points.labels(vol).inc()
        self.m.last_point.labels(vol).set(ev.ts)
        log.debug("restore point %d of %s (source point %d, seq %d)", k, vol, ev["id"], ev.seq, extra={"volume": vol, "event": "point"})

    # -- the mass-change guard (daemon.mirror.guard) -------------------------------------------------
    def _rewrite(self, vol: str, path: str, old: bytes, new: bytes) -> None:
        if looks_encrypted(old, new):
            self.guard.rewrite(vol, path, time.monotonic())

    def _volume_files(self, vol: str) -> int:
        now = time.monotonic()
        got = self._files.get(vol)
        if got is None or now - got[0] > 60:
            got = self._files[vol] = (now, self.idx.count(vol)[0])
        return got[1]

    def _guard_check(self, vol: str) -> None:
        burst = self.guard.check(vol, time.monotonic(), self._volume_files(vol))
        if burst is None:
            if vol in self.bursts and vol not in self.paused:
                del self.bursts[vol]
                self.m.mass_change.labels(vol).set(0)
                log.warning("volume %s: the mass change is over (nothing unusual in the last %.0f s)", vol, self.guard.window,
                            extra={"volume": vol, "event": "mass_change_over"})
            return
        if vol not in self.bursts:
            self.bursts[vol] = burst
            self.m.mass_change.labels(vol).set(1)
            self.m.mass_changes.labels(vol, burst.kind).inc()
            pause = self.mc.guard == "pause"
            log.error("volume %s: MASS CHANGE: %s; %s. Restore points before it: `volmirror points --volume %s`", vol, burst.describe(),
                      "applying is PAUSED (history kept); `volmirror resume --volume " + vol + "` continues" if pause else
                      "replicating on (mirror.guard = \"alert\"); its history is not pruned while it lasts", vol,
                      extra={"volume": vol, "event": "mass_change", "kind": burst.kind, "count": burst.count})
            if pause:
                self.paused[vol] = {"why": burst.describe(), "kind": burst.kind, "since": time.time()}
                self._save_paused()
                self.m.guard_paused.labels(vol).set(1)
        if vol in self.paused:
            raise GuardPause(vol)

    def _save_paused(self) -> bool:
        try:
            save_json(self._guard_file, self.paused)
        except OSError as e:
            log.error("cannot write %s (%s): the guard's pauses hold until this agent stops, not across a restart", self._guard_file, e,
                      extra={"event": "state_error"})
            return False
        return True

    def _save_superseded(self) -> None:
        try:
            save_json(self._superseded_file, self.superseded)
        except OSError as e:
            log.error("cannot write %s (%s): after a restart, records sent before failback may be applied again (a listing then "
                      "repairs the volume)", self._superseded_file, e, extra={"event": "state_error"})

    def _superseded_record(self, vol: str, r: Record) -> bool:
        """A record the source sent before a failback of ``vol`` (superseded by it): skipped."""
        upto = self.superseded.get(vol)
        return bool(upto) and r.offset < upto.get(f"{r.topic}:{r.partition}", -1)

    def resume(self, vol: str, failback_done: bool = False, skip_before: dict[tuple[str, int], int] | None = None) -> dict | None:
        """``volmirror resume``: apply the volume again (its guard window starts afresh). A volume
        rolled back in place (``volmirror restore`` into the mirror's tree: a failover) resumes only
        with ``failback_done``: the stream would otherwise overwrite what was written into it while
        it served. Its history and points are dropped then: they were journalled on a tree that has
        been written outside the stream since, and the index is rebuilt by a listing."""
        was = self.paused.get(vol)
        if was is None:
            return None
        if was.get("kind") == "failover":
            if not failback_done:
                raise ResumeRefused(f"volume {vol!r} was rolled back in place for a failover ({was.get('why')}); resuming now would "
                                    "apply the source's stream over what was written into it since. Fail back first (docs/restore.md), "
                                    f"then `volmirror resume --volume {vol} --failback-done`")
            self.idx.drop_points(vol, 1 << 62)
            self.make_durable()  # the points leave the index before their journal leaves the disk
            self.history.forget(vol)
            self.m.history_bytes.labels(vol).set(0)
            # what the source sent before failback is superseded by it: never applied now
            self.superseded[vol] = {f"{t}:{p}": off for (t, p), off in (skip_before or {}).items()}
        self.paused.pop(vol, None)
        if not self._save_paused():
            self.paused[vol] = was
            self.superseded.pop(vol, None)
            raise ResumeRefused(f"cannot write {self._guard_file}: the volume stays held (it would be held again after a restart)")
        if was.get("kind") == "failover":
            self._save_superseded()
        self.guard.vols.pop(vol, None)
        self.bursts.pop(vol, None)
        self.m.guard_paused.labels(vol).set(0)
        self.m.mass_change.labels(vol).set(0)
        log.warning("volume %s: resumed by the operator after a mass change (%s)", vol, was.get("why"), extra={"volume": vol, "event": "resumed"})
        return was

    # -- durability ---------------------------------------------------------------------------------
    def make_durable(self) -> None:
        """fsync what was applied, then write the index and progress in one transaction.

        Raises ApplyError (fsync failed: retry) or StateError (index not written: everything since
        the last durable point was rolled back; re-read from that point)."""
        if self.faults.sync_fails():
            raise ApplyError(f"TEST SEAM: injected sync failure ({self.faults.sync_file} exists)", errno.EIO)
        self.applier.sync()
        try:
            self.idx.checkpoint()
        except StateError:
            self.m.local_errors.labels("state_dir").inc()
            raise
        self.undurable_bytes = 0
        self._gaps_used.clear()

    def reset(self) -> None:
        """Back to the last durable point (the loop re-reads from its offsets)."""
        self.idx.reset()
        self.applier.clear_failure()
        self.gap_partitions |= self._gaps_used  # the record after the gap will be read again
        self._gaps_used.clear()
        for vol in list(self.spool.active):
            self.spool.discard(vol)
        self.undurable_bytes = 0

    # -- scrubbing and verify -----------------------------------------------------------------------
    def scrub_step(self, vol: str, budget: int) -> int:
        try:
            return self.scrubber.step(vol, budget)
        except (ApplyError, RejectedEvent, OSError) as e:
            # a local repair failed (disk full, unremovable path): drift stays recorded; next pass retries
            self.m.local_errors.labels("disk").inc()
            log.warning("scrub of %s: local repair failed: %s", vol, e, extra={"volume": vol})
            self.scrubber.passes.pop(vol, None)
            return budget

    def full_pass(self, vol: str) -> None:
        self.scrubber.full_pass(vol)


def _held_why(hold: dict | None) -> str | None:
    """What ``status`` says about a held volume."""
    if not hold:
        return None
    if hold.get("kind") == "failover":
        return str(hold.get("why"))
    return f"paused by the mass-change guard ({hold.get('why')})"


def _safe_key(key: bytes | None) -> str:
    try:
        k = (key or b"").decode("utf-8")
    except UnicodeDecodeError:
        return UNKNOWN_VOLUME
    return k if VOLUME_NAME_RE.fullmatch(k) and len(k) <= 128 else UNKNOWN_VOLUME
