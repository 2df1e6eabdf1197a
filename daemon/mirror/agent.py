"""The mirror agent: consume, validate, apply, make durable, commit offsets; verify and repair.

Data path: Kafka record → :func:`daemon.wire.decode` (schema, shape, hash) → duplicate check by
(epoch, seq) → :mod:`jail` → :class:`Applier` → :class:`Verifier` (index upkeep, manifest and
checkpoint checks) → durability point (fsync files and directories, index + progress in one SQLite
transaction) → offset commit. Auto-commit is off; an offset is committed only after the changes of
every record before it are durable. A rejected record is counted in
``volmirror_mirror_rejected_events_total{volume,reason}``, logged, skipped; the agent goes on. A local
I/O failure (disk full) is not skipped: the partition is rewound to the failed record and retried.

All work on the mirror's files (applying, scrubbing, verifying) runs on worker threads under one
lock, so the scrubber never races the applier. Repair requests are queued by the verifier and sent
on ``<topic>.control`` by the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from prometheus_client import CollectorRegistry

from ..config import VOLUME_NAME_RE, Config, ConfigError
from ..errors import RejectedEvent
from ..kafka import Consumer, Producer, Record, ensure_topics
from ..metrics import HttpServer, MirrorMetrics
from ..runtime import StopSignal, periodic, retry_transient, sd_notify, supervise, write_snapshot
from ..wire import Event, decode, key_for
from .applier import Applier, ApplyError
from .mindex import MirrorIndex
from .verifier import Scrubber, Verifier

log = logging.getLogger("volmirror.mirror")

DURABLE_BYTES = 64 * 1024 * 1024
UNKNOWN_VOLUME = "_unknown"
MAX_VOLUME_LABELS = 256
VERIFY_WAIT = 60.0


@dataclass
class BatchResult:
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    rewind: dict[tuple[str, int], int] = field(default_factory=dict)
    applied: int = 0
    error: str | None = None


@dataclass
class Announcement:
    host: str
    src: str
    block_size: int
    heartbeat_interval: float
    checkpoint_interval: float
    seen: float


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
        self.announced: dict[str, Announcement] = {}
        self.kafka_ok = False
        self.lock = threading.Lock()
        self.outbox: deque[dict] = deque()
        self._undurable_bytes = 0
        self._last_durable = time.monotonic()
        self._pending_commit: dict[tuple[str, int], int] = {}
        self._failures = 0
        self._scrub_tokens = 0.0
        self._scrub_at = time.monotonic()
        self._scrub_rr = 0
        self._verifying = 0
        # test builds only: drop events of this op for this path, to simulate a lost change
        self._drop = tuple(os.environ.get("VOLMIRROR_TEST_DROP", "").split(":", 1)) if os.environ.get("VOLMIRROR_TEST_DROP") else None
        # test builds only: while this file exists, every apply fails like a full disk would
        self._stall_file = os.environ.get("VOLMIRROR_TEST_STALL_FILE") or None

    def mirrored(self, vol: str) -> bool:
        return not self.mc.volumes or vol in self.mc.volumes

    async def run(self) -> None:
        mc, kc = self.mc, self.cfg.kafka
        self.stop.install()
        for key, d in (("mirror.root", mc.root), ("mirror.state_dir", mc.state_dir)):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(key, f"cannot create {d}: {e.strerror}") from None
        self.idx = MirrorIndex(mc.state_dir / "mirror.sqlite")
        self.applier = Applier(mc.root)
        self.verifier = Verifier(self.idx, self.applier, self.m, repair=mc.repair, send=self.outbox.append)
        self.scrubber = Scrubber(self.verifier)
        for v in self.idx.volumes:
            self._init_volume(v)
        host, port = self.cfg.metrics.host_port
        http = HttpServer(host, port, self.registry, self.status, routes={"/verify": self.http_verify})
        try:
            await http.start()
        except OSError as e:
            raise ConfigError("metrics.listen", f"cannot listen on {self.cfg.metrics.listen}: {e.strerror}") from None
        self.consumer = Consumer(kc, mc.group_id, [kc.topic], on_assign=self._on_assign)
        self.producer = Producer(kc)
        try:
            await retry_transient("creating Kafka topics", lambda: ensure_topics(kc, [kc.topic, kc.control_topic]), self.stop.event)
            await retry_transient("connecting the consumer", self.consumer.start, self.stop.event)
            await retry_transient("connecting the producer", self.producer.start, self.stop.event)
            self._set_kafka(True)
            self.ready = True
            sd_notify("READY=1")
            log.info("mirror agent ready: topic %s, group %s, root %s", kc.topic, mc.group_id, mc.root, extra={"topic": kc.topic, "group": mc.group_id})
            await self._supervise()
        finally:
            try:
                await asyncio.to_thread(self._locked, self._make_durable)
                await self._commit()
            except Exception as e:  # noqa: BLE001 - shutting down; replay covers it
                log.warning("final commit failed: %s", e)
            await self.consumer.stop()
            await self.producer.stop()
            self.applier.close()
            self.idx.close()
            await http.stop()
            write_snapshot(mc.state_dir, self.status())

    def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.lock:
            return fn(*args)

    def _init_volume(self, vol: str) -> None:
        """Create a volume's series at zero; a volume not mirrored here only gets `protected` = 0."""
        if vol in self.known_volumes or len(self.known_volumes) >= MAX_VOLUME_LABELS:
            return
        self.known_volumes.add(vol)
        self.m.protected.labels(vol).set(0)
        if self.mirrored(vol):
            self.m.init_volume(vol)
            self.m.init_rejections(vol)
            self.m.rpo_target.labels(vol).set(self.mc.rpo_seconds)

    async def _supervise(self) -> None:
        await supervise(
            self.stop,
            self._consume(),
            periodic(1.0, self._update_lag, name="lag"),
            periodic(5.0, self._probe, name="probe"),
            periodic(5.0, lambda: write_snapshot(self.mc.state_dir, self.status()), name="snapshot"),
        )


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
                res = await asyncio.to_thread(self._locked, self._apply_records, recs)
                for tp, off in res.next_offsets.items():
                    self.position[tp] = off
                    self._pending_commit[tp] = off
                if res.error:
                    self._failures += 1
                    backoff = min(2.0 ** self._failures, 30.0)
                    log.error("apply failed: %s; retrying in %.0f s", res.error, backoff)
                    await asyncio.to_thread(self._locked, self._make_durable)
                    await self._commit()
                    for (t, p), off in res.rewind.items():
                        self.consumer.seek(t, p, off)
                    await asyncio.sleep(backoff)
                    continue
                self._failures = 0
            if self._pending_commit and (
                time.monotonic() - self._last_durable >= self.mc.commit_interval_ms / 1000 or self._undurable_bytes >= DURABLE_BYTES
            ):
                await asyncio.to_thread(self._locked, self._make_durable)
                await self._commit()
            await self._send_requests()
            if not recs:
                await self._scrub()

    def _apply_records(self, recs: list[Record]) -> BatchResult:
        """Runs in a worker thread under the lock: decode, filter, dedupe and apply, in offset order."""
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
        vol = ev.vol
        if self._stall_file and os.path.exists(self._stall_file):
            raise ApplyError(f"TEST BUILD: injected apply failure ({self._stall_file} exists)")
        if ev.op == "announce":
            self.announced[vol] = Announcement(ev["host"], ev["src"], ev["block_size"], float(ev["heartbeat_interval"]),
                                               float(ev["checkpoint_interval"]), time.time())
            self._init_volume(vol)
            if self.mirrored(vol):
                self.verifier.announced(ev)
            return
        if not self.mirrored(vol):
            return
        self._init_volume(vol)
        self.partition_of[vol] = r.partition
        prog = self.idx.progress(vol)
        prog.partition = r.partition
        if ev.op == "heartbeat":
            self._seen(ev, prog)
            self.m.applied_events.labels(vol, "heartbeat").inc()
            return
        if ev.op == "listing":
            self.verifier.listing(ev)
            return
        if self.idx.is_duplicate(vol, ev.epoch, ev.seq):
            return
        if prog.epoch and prog.epoch != ev.epoch:
            log.warning("volume %s: source epoch changed %s -> %s (source state was reset)", vol, prog.epoch, ev.epoch, extra={"volume": vol})
        if ev.op == "checkpoint":
            prog.epoch, prog.seq = ev.epoch, ev.seq
            self._seen(ev, prog)
            self.verifier.checkpoint(ev)
            return
        if self._drop and self._drop == (ev.op, ev.path):
            log.warning("TEST BUILD: dropping %s %s", ev.op, ev.path, extra={"volume": vol, "path": ev.path})
            prog.epoch, prog.seq = ev.epoch, ev.seq
            return
        if ev.op == "rename":
            # durability barrier: everything before the rename is made durable and recorded, then
            # the rename itself, so a replay never re-runs a rename after later ops
            self._make_durable()
            n = self.applier.apply(ev)
            self.verifier.applied(ev)
            self.applier.sync()
            prog.epoch, prog.seq = ev.epoch, ev.seq
            self._seen(ev, prog)
            self.idx.checkpoint()
        else:
            n = self.applier.apply(ev)
            self.verifier.applied(ev)
            prog.epoch, prog.seq = ev.epoch, ev.seq
            self._seen(ev, prog)
        self._undurable_bytes += n
        op = "zero" if ev.op == "block" and ev["zero"] else ev.op
        self.m.applied_events.labels(vol, op).inc()
        if n:
            self.m.applied_bytes.labels(vol).inc(n)

    def _seen(self, ev: Event, prog: Any) -> None:
        if ev.ts > prog.last_ts:
            prog.last_ts = ev.ts
            self.m.last_event_ts.labels(ev.vol).set(ev.ts)

    def _reject(self, r: Record, ev: Event | None, e: RejectedEvent) -> None:
        vol = ev.vol if ev is not None else _safe_key(r.key)
        if vol not in self.known_volumes:
            self._init_volume(vol) if vol != UNKNOWN_VOLUME else None
            if vol not in self.known_volumes:
                vol = UNKNOWN_VOLUME
        self.m.rejected.labels(vol, e.reason).inc()
        log.warning(
            "rejected event: %s",
            e,
            extra={"volume": vol, "path": ev.path if ev is not None else None, "partition": r.partition, "offset": r.offset,
                   "reason": e.reason, "event": "rejected", "op": ev.op if ev is not None else None},
        )

    def _make_durable(self) -> None:
        self.applier.sync()
        self.idx.checkpoint()
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

    # -- repair requests and scrubbing ------------------------------------------------------------
    async def _send_requests(self) -> None:
        if not self.outbox:
            return
        topic = self.cfg.kafka.control_topic
        futs = []
        while self.outbox:
            req = {**self.outbox.popleft(), "site": self.mc.group_id, "ts": time.time()}
            try:
                futs.append(await self.producer.send(topic, key_for(req["vol"]), json.dumps(req).encode()))
                self.m.repair_requests.labels(req["vol"], req["type"]).inc()
                log.info("asked the source for %s of %s", req["type"], req.get("path") or "the volume",
                         extra={"volume": req["vol"], "path": req.get("path"), "event": "repair_request"})
            except Exception as e:  # noqa: BLE001 - the verifier asks again later
                log.warning("cannot send control request: %s", e)
        if futs:
            await asyncio.gather(*futs, return_exceptions=True)

    async def _scrub(self) -> None:
        rate = self.mc.scrub_rate_mib * 1024 * 1024
        now = time.monotonic()
        self._scrub_tokens = min(self._scrub_tokens + rate * (now - self._scrub_at), max(rate, 1.0))
        self._scrub_at = now
        vols = sorted(v for v in self.known_volumes if self.mirrored(v) and v in self.idx.volumes)
        if rate <= 0 or not vols or self._scrub_tokens < 64 * 1024 or self._verifying:
            return
        vol = vols[self._scrub_rr % len(vols)]
        self._scrub_rr += 1
        budget = int(min(self._scrub_tokens, 8 * 1024 * 1024))
        used = await asyncio.to_thread(self._locked, self.scrubber.step, vol, budget)
        self._scrub_tokens -= used

    # -- verify (the `volmirror verify` command talks to this) --------------------------------------
    async def http_verify(self, q: dict[str, str]) -> tuple[int, dict[str, Any]]:
        vol = q.get("volume")
        repair = q.get("repair") in ("1", "true", "yes")
        try:
            wait = min(max(float(q.get("timeout", VERIFY_WAIT)), 1.0), 3600.0)
        except ValueError:
            return 400, {"error": "timeout must be a number of seconds"}
        vols = [vol] if vol else sorted(v for v in (set(self.idx.volumes) | set(self.announced)) if self.mirrored(v))
        if vol and (not VOLUME_NAME_RE.match(vol) or vol not in (set(self.idx.volumes) | set(self.announced))):
            return 404, {"error": f"volume {vol!r} is not known to this mirror"}
        if vol and not self.mirrored(vol):
            return 400, {"error": f"volume {vol!r} is not mirrored at this site"}
        if not vols:
            return 503, {"error": "no volumes received yet"}
        try:
            return 200, await self.verify(vols, repair=repair, wait=wait)
        except TimeoutError as e:
            return 504, {"error": str(e)}

    async def verify(self, vols: list[str], *, repair: bool, wait: float = VERIFY_WAIT) -> dict[str, Any]:
        v = self.verifier
        self._verifying += 1
        saved = v.repair
        v.repair = repair
        found: dict[str, dict[str, str]] = {x: {} for x in vols}
        v.recorder = found
        out: dict[str, Any] = {"volumes": {}, "repair": repair, "site": self.mc.group_id}
        try:
            for vol in vols:
                nonce = uuid.uuid4().hex
                self.outbox.append({"type": "checkpoint", "vol": vol, "nonce": nonce})
                await self._send_requests()
                res = await self._wait(lambda: v.results.get(nonce), f"a checkpoint of {vol} from the source (is the source agent running?)", wait)
                listing_ok = True
                if not res.match:
                    listing_ok = bool(await self._wait(lambda: res.listing_nonce in v.listing_done if res.listing_nonce else True,
                                                       f"the listing of {vol} from the source", wait))
                await asyncio.to_thread(self._locked, self.scrubber.full_pass, vol)
                drift = found.get(vol, {})
                out["volumes"][vol] = {
                    "identical": res.match and not drift and v.drift_count(vol) == 0,
                    "checkpoint": {"id": res.id, "source_time": res.ts, "match": res.match},
                    "drift": [{"path": p, "kind": k} for p, k in sorted(drift.items())],
                    "drift_files_now": v.drift_count(vol),
                    "listing_compared": listing_ok,
                }
        finally:
            v.repair = saved
            v.recorder = None
            self._verifying -= 1
        out["identical"] = all(x["identical"] for x in out["volumes"].values())
        return out

    async def _wait(self, pred: Callable[[], Any], what: str, timeout: float = VERIFY_WAIT) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = pred()
            if r:
                return r
            await asyncio.sleep(0.1)
        raise TimeoutError(f"no answer within {timeout:.0f} s: waited for {what}")

    # -- assignment, lag, probe, coverage -------------------------------------------------------
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
                        "retention while this mirror was away; checkpoints will disagree and a listing will repair it",
                        tp[1], committed, start, extra={"partition": tp[1], "event": "stream_gap"},
                    )
                elif committed is None and start > 0:
                    log.warning(
                        "partition %d: new mirror starts at offset %d, after the log start; files unchanged since "
                        "then arrive through checkpoint repair", tp[1], start, extra={"partition": tp[1]},
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
        for vol in list(self.known_volumes):
            prog = self.idx.volumes.get(vol)
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
            self.m.protected.labels(vol).set(1 if self.coverage(vol, now)["protected"] else 0)

    def coverage(self, vol: str, now: float | None = None) -> dict[str, Any]:
        now = now or time.time()
        ann = self.announced.get(vol)
        prog = self.idx.volumes.get(vol) if hasattr(self, "idx") else None
        hb = ann.heartbeat_interval if ann else 5.0
        cp = ann.checkpoint_interval if ann else 60.0
        lag = (now - prog.last_ts) if prog and prog.last_ts else None
        verified = self.verifier.last_verified.get(vol) if hasattr(self, "verifier") else None
        drift = self.verifier.drift_count(vol) if hasattr(self, "verifier") else 0
        reasons = []
        if not self.mirrored(vol):
            reasons.append("not mirrored at this site")
        if lag is None or lag > max(3 * hb, 10.0):
            reasons.append("no fresh heartbeat")
        if lag is None or lag > self.mc.rpo_seconds:
            reasons.append(f"lag above RPO target {self.mc.rpo_seconds:g}s")
        if verified is None or now - verified > 3 * cp + 10:
            reasons.append("not verified recently")
        if drift:
            reasons.append(f"{drift} drifted path(s)")
        return {"protected": not reasons, "why_not": reasons, "lag_seconds": lag, "last_verified": verified, "drift_files": drift}

    def status(self) -> dict[str, Any]:
        vols = {}
        now = time.time()
        names = set(self.known_volumes) | set(self.announced)
        for vol in sorted(names):
            prog = self.idx.volumes.get(vol) if hasattr(self, "idx") else None
            ann = self.announced.get(vol)
            cov = self.coverage(vol, now)
            vols[vol] = {
                "mirrored": self.mirrored(vol) and prog is not None,
                "announced_by": {"host": ann.host, "path": ann.src, "block_size": ann.block_size} if ann else None,
                "partition": prog.partition if prog else None,
                "applied_seq": prog.seq if prog else None,
                "epoch": prog.epoch if prog else None,
                "last_event_ts": (prog.last_ts or None) if prog else None,
                "lag_seconds": cov["lag_seconds"],
                "lag_records": _gauge(self.m.lag_records, vol),
                "applied_bytes": _gauge(self.m.applied_bytes, vol),
                "files_applied": _gauge(self.m.applied_events, vol, "manifest"),
                "last_verified": cov["last_verified"],
                "drift_files": cov["drift_files"],
                "protected": cov["protected"],
                "why_not_protected": cov["why_not"],
            }
        return {
            "agent": "mirror",
            "ready": self.ready,
            "started": self.started,
            "group_id": self.mc.group_id,
            "root": str(self.mc.root),
            "topic": self.cfg.kafka.topic,
            "kafka_connected": self.kafka_ok,
            "rpo_seconds": self.mc.rpo_seconds,
            "volumes": vols,
        }


def _gauge(metric: Any, *labels: str) -> float | None:
    try:
        return metric.labels(*labels)._value.get()
    except Exception:  # noqa: BLE001
        return None


def _safe_key(key: bytes | None) -> str:
    try:
        k = (key or b"").decode("utf-8")
    except UnicodeDecodeError:
        return UNKNOWN_VOLUME
    return k if VOLUME_NAME_RE.match(k) and len(k) <= 128 else UNKNOWN_VOLUME

