"""The mirror agent: consume, validate, apply, make durable, then commit offsets.

Data path: Kafka record → :func:`daemon.wire.decode` (schema, shape, hash) → duplicate check by
(epoch, seq) → :mod:`jail` → :class:`Applier` → durability point (fsync files and directories,
persist progress) → offset commit. Auto-commit is off; an offset is committed only after the
changes of every record before it are durable. A rejected record is counted in
``volmirror_mirror_rejected_events_total{volume,reason}``, logged, skipped; the agent goes on. A local
I/O failure (disk full) is not skipped: the partition is rewound to the failed record and retried
with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from ..config import Config, ConfigError
from ..errors import RejectedEvent
from ..kafka import Consumer, Record, ensure_topics
from ..metrics import HttpServer, MirrorMetrics
from ..runtime import StopSignal, periodic, retry_transient, sd_notify, write_snapshot
from ..wire import Event, decode
from .applier import Applier, ApplyError
from .state import MirrorState

log = logging.getLogger("volmirror.mirror")

DURABLE_BYTES = 64 * 1024 * 1024
UNKNOWN_VOLUME = "_unknown"


@dataclass
class BatchResult:
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    rewind: dict[tuple[str, int], int] = field(default_factory=dict)
    applied: int = 0
    error: str | None = None


class MirrorAgent:
    def __init__(self, cfg: Config, registry: CollectorRegistry | None = None) -> None:
        self.cfg = cfg
        self.mc = cfg.require_mirror()
        self.registry = registry or CollectorRegistry()
        self.m = MirrorMetrics(self.registry)
        self.stop = StopSignal()
        self.started = time.time()
        self.ready = False
        self.partition_of: dict[str, int] = {}
        self.position: dict[tuple[str, int], int] = {}
        self.highwater: dict[tuple[str, int], int] = {}
        self.known_volumes: set[str] = set()
        self.kafka_ok = False
        self._undurable_bytes = 0
        self._last_durable = time.monotonic()
        self._pending_commit: dict[tuple[str, int], int] = {}
        self._failures = 0

    async def run(self) -> None:
        mc, kc = self.mc, self.cfg.kafka
        self.stop.install()
        for key, d in (("mirror.root", mc.root), ("mirror.state_dir", mc.state_dir)):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(key, f"cannot create {d}: {e.strerror}") from None
        self.state = MirrorState(mc.state_dir / "mirror.sqlite")
        self.applier = Applier(mc.root)
        for v in self.state.volumes:
            self._init_volume(v)
        host, port = self.cfg.metrics.host_port
        http = HttpServer(host, port, self.registry, self.status)
        try:
            await http.start()
        except OSError as e:
            raise ConfigError("metrics.listen", f"cannot listen on {self.cfg.metrics.listen}: {e.strerror}") from None
        self.consumer = Consumer(kc, mc.group_id, [kc.topic], on_assign=self._on_assign)
        try:
            await retry_transient("creating Kafka topics", lambda: ensure_topics(kc, [kc.topic, kc.control_topic]), self.stop.event)
            await retry_transient("connecting the consumer", self.consumer.start, self.stop.event)
            self.kafka_ok = True
            self.m.kafka_connected.set(1)
            self.ready = True
            sd_notify("READY=1")
            log.info("mirror agent ready: topic %s, group %s, root %s", kc.topic, mc.group_id, mc.root, extra={"topic": kc.topic, "group": mc.group_id})
            await self._supervise()
        finally:
            try:
                await asyncio.to_thread(self._make_durable)
                await self._commit()
            except Exception as e:  # noqa: BLE001 - shutting down; replay covers it
                log.warning("final commit failed: %s", e)
            await self.consumer.stop()
            self.applier.close()
            self.state.close()
            await http.stop()
            write_snapshot(mc.state_dir, self.status())

    def _init_volume(self, vol: str) -> None:
        if vol not in self.known_volumes:
            self.known_volumes.add(vol)
            self.m.init_volume(vol)
            self.m.init_rejections(vol)

    async def _supervise(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._consume(), name="consume")
                tg.create_task(periodic(1.0, self._update_lag, name="lag"))
                tg.create_task(periodic(5.0, self._probe, name="probe"))
                tg.create_task(periodic(5.0, lambda: write_snapshot(self.mc.state_dir, self.status()), name="snapshot"))
                tg.create_task(self._stopper())
        except* _Stop:
            pass

    async def _stopper(self) -> None:
        await self.stop.wait()
        raise _Stop

    # -- consume loop ---------------------------------------------------------------------------
    async def _consume(self) -> None:
        while True:
            try:
                recs = await self.consumer.getmany(timeout_ms=200)
            except Exception as e:  # noqa: BLE001 - transient broker trouble: keep the loop alive
                self._set_kafka(False)
                log.warning("fetch failed: %s", e)
                await asyncio.sleep(1.0)
                continue
            if recs:
                res = await asyncio.to_thread(self._apply_records, recs)
                for tp, off in res.next_offsets.items():
                    self.position[tp] = off
                    self._pending_commit[tp] = off
                if res.error:
                    self._failures += 1
                    backoff = min(2.0 ** self._failures, 30.0)
                    log.error("apply failed: %s; retrying in %.0f s", res.error, backoff)
                    await asyncio.to_thread(self._make_durable)
                    await self._commit()
                    for (t, p), off in res.rewind.items():
                        self.consumer.seek(t, p, off)
                    await asyncio.sleep(backoff)
                    continue
                self._failures = 0
            if self._pending_commit and (
                time.monotonic() - self._last_durable >= self.mc.commit_interval_ms / 1000 or self._undurable_bytes >= DURABLE_BYTES
            ):
                await asyncio.to_thread(self._make_durable)
                await self._commit()

    def _apply_records(self, recs: list[Record]) -> BatchResult:
        """Runs in a worker thread: decode, filter, dedupe and apply a batch, in offset order."""
        res = BatchResult()
        failed: set[tuple[str, int]] = set()
        for r in recs:
            tp = (r.topic, r.partition)
            if tp in failed:
                continue
            try:
                ev = decode(r.value, r.key)
            except RejectedEvent as e:
                self._reject(r, None, e)
                res.next_offsets[tp] = r.offset + 1
                continue
            try:
                self._apply_event(r, ev)
            except RejectedEvent as e:
                self._reject(r, ev, e)
            except ApplyError as e:
                self.m.apply_errors.labels(ev.vol).inc()
                res.error = f"{e} (volume {ev.vol}, partition {r.partition}, offset {r.offset})"
                res.rewind[tp] = r.offset
                failed.add(tp)
                continue
            res.next_offsets[tp] = r.offset + 1
            res.applied += 1
        return res

    def _apply_event(self, r: Record, ev: Event) -> None:
        if self.mc.volumes and ev.vol not in self.mc.volumes:
            return
        self._init_volume(ev.vol)
        self.partition_of[ev.vol] = r.partition
        prog = self.state.get(ev.vol)
        prog.partition = r.partition
        if ev.op in ("heartbeat", "announce", "checkpoint"):
            self._seen(ev, prog)
            self.m.applied_events.labels(ev.vol, ev.op).inc() if ev.op == "heartbeat" else None
            return
        if self.state.is_duplicate(ev.vol, ev.epoch, ev.seq):
            return
        if prog.epoch and prog.epoch != ev.epoch:
            log.warning("volume %s: source epoch changed %s -> %s (source state was reset)", ev.vol, prog.epoch, ev.epoch, extra={"volume": ev.vol})
        if ev.op == "rename":
            # durability barrier: everything before the rename is made durable and recorded, then
            # the rename itself, so a replay never re-runs a rename after later ops
            self._make_durable()
            n = self.applier.apply(ev)
            self.applier.sync()
            prog.epoch, prog.seq = ev.epoch, ev.seq
            self._seen(ev, prog)
            self.state.commit()
        else:
            n = self.applier.apply(ev)
            prog.epoch, prog.seq = ev.epoch, ev.seq
            self._seen(ev, prog)
        self._undurable_bytes += n
        op = "zero" if ev.op == "block" and ev["zero"] else ev.op
        self.m.applied_events.labels(ev.vol, op).inc()
        if n:
            self.m.applied_bytes.labels(ev.vol).inc(n)

    def _seen(self, ev: Event, prog: Any) -> None:
        if ev.ts > prog.last_ts:
            prog.last_ts = ev.ts
            self.m.last_event_ts.labels(ev.vol).set(ev.ts)

    def _reject(self, r: Record, ev: Event | None, e: RejectedEvent) -> None:
        vol = ev.vol if ev is not None else _safe_key(r.key)
        self._init_volume(vol) if vol != UNKNOWN_VOLUME else None
        self.m.rejected.labels(vol, e.reason).inc()
        log.warning(
            "rejected event: %s",
            e,
            extra={"volume": vol, "path": ev.path if ev is not None else None, "partition": r.partition, "offset": r.offset,
                   "reason": e.reason, "event": "rejected", "op": ev.op if ev is not None else None},
        )

    def _make_durable(self) -> None:
        self.applier.sync()
        self.state.commit()
        self._undurable_bytes = 0
        self._last_durable = time.monotonic()

    async def _commit(self) -> None:
        if not self._pending_commit:
            return
        offsets, self._pending_commit = self._pending_commit, {}
        try:
            await self.consumer.commit(offsets)
            self.m.last_commit.set(time.time())
        except Exception as e:  # noqa: BLE001 - replay after a failed commit is harmless (dedupe)
            log.warning("offset commit failed (records will be re-read and skipped): %s", e)

    # -- assignment, lag, probe -----------------------------------------------------------------
    async def _on_assign(self, consumer: Consumer, parts: list[tuple[str, int]]) -> None:
        if not parts:
            return
        try:
            begin = await consumer.beginning_offsets(parts)
            for tp in parts:
                committed = await consumer.committed(*tp)
                start = begin.get(tp, 0)
                if committed is not None and committed < start:
                    self.m.stream_gap.labels(str(tp[1])).inc()
                    log.error(
                        "partition %d: committed offset %d is older than the log start %d: events were lost to "
                        "retention while this mirror was away; a full resync of its volumes is needed",
                        tp[1], committed, start, extra={"partition": tp[1], "event": "stream_gap"},
                    )
                elif committed is None and start > 0:
                    log.warning(
                        "partition %d: new mirror starts at offset %d, after the log start; files unchanged since "
                        "then reach this mirror only through a resync", tp[1], start, extra={"partition": tp[1]},
                    )
        except Exception as e:  # noqa: BLE001
            log.warning("could not check offsets on assignment: %s", e)

    def _set_kafka(self, ok: bool) -> None:
        self.kafka_ok = ok
        self.m.kafka_connected.set(1 if ok else 0)

    async def _probe(self) -> None:
        parts = self.consumer.assignment()
        if not parts:
            return
        try:
            ends = await asyncio.wait_for(self.consumer.end_offsets(parts), 10)
        except Exception as e:  # noqa: BLE001
            self._set_kafka(False)
            log.debug("probe failed: %s", e)
            return
        self._set_kafka(True)
        self.highwater.update(ends)
        for tp in parts:
            if tp not in self.position:
                try:
                    self.position[tp] = await self.consumer.position(*tp)
                except Exception:  # noqa: BLE001
                    pass

    def _update_lag(self) -> None:
        now = time.time()
        topic = self.cfg.kafka.topic
        for vol in self.known_volumes:
            prog = self.state.volumes.get(vol)
            if prog is not None and prog.last_ts > 0:
                self.m.lag_seconds.labels(vol).set(max(0.0, now - prog.last_ts))
            part = self.partition_of.get(vol, prog.partition if prog else -1)
            if part >= 0:
                tp = (topic, part)
                hw = self.consumer.highwater(topic, part) if self.ready else None
                hw = max(hw or 0, self.highwater.get(tp, 0))
                pos = self.position.get(tp)
                if pos is not None:
                    self.m.lag_records.labels(vol).set(max(0, hw - pos))

    def status(self) -> dict[str, Any]:
        vols = {}
        now = time.time()
        for vol in sorted(self.known_volumes):
            prog = self.state.volumes.get(vol) if hasattr(self, "state") else None
            vols[vol] = {
                "partition": prog.partition if prog else None,
                "applied_seq": prog.seq if prog else None,
                "epoch": prog.epoch if prog else None,
                "last_event_ts": (prog.last_ts or None) if prog else None,
                "lag_seconds": (now - prog.last_ts) if prog and prog.last_ts else None,
                "lag_records": _gauge(self.m.lag_records, vol),
                "applied_bytes": _gauge(self.m.applied_bytes, vol),
                "files_applied": _gauge(self.m.applied_events, vol, "manifest"),
                "mirrored": not self.mc.volumes or vol in self.mc.volumes,
            }
        return {
            "agent": "mirror",
            "ready": self.ready,
            "started": self.started,
            "group_id": self.mc.group_id,
            "root": str(self.mc.root),
            "topic": self.cfg.kafka.topic,
            "kafka_connected": self.kafka_ok,
            "volumes": vols,
        }


def _gauge(metric: Any, *labels: str) -> float | None:
    try:
        return metric.labels(*labels)._value.get()
    except Exception:  # noqa: BLE001
        return None


def _safe_key(key: bytes | None) -> str:
    from ..config import VOLUME_NAME_RE

    try:
        k = (key or b"").decode("utf-8")
    except UnicodeDecodeError:
        return UNKNOWN_VOLUME
    return k if VOLUME_NAME_RE.match(k) and len(k) <= 128 else UNKNOWN_VOLUME


class _Stop(Exception):
    pass
