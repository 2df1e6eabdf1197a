"""The mirror agent: Kafka in, the apply actor in the middle, offsets and control requests out.

This module owns the Kafka side and the agent's public face: the consumer loop, offset commits,
repair requests on ``<topic>.control``, the ``/status`` and ``/verify`` endpoints and the protection
verdict per volume. Everything that touches the mirror's disk or index belongs to the apply actor
(:mod:`daemon.mirror.consumer`); this module talks to it with messages and reads its snapshot.

Offsets: auto-commit is off; an offset is committed only after the changes of every record before
it are durable. A retryable local failure (disk full) rewinds the partition to the failed record and
retries with backoff; a state_dir failure rewinds every partition to the last durable offsets (the
index was rolled back to that point) and retries with backoff — nothing is skipped, nothing crashes.
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
from pathlib import Path
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry

from ..config import VOLUME_NAME_RE, Config, ConfigError
from ..errors import StateError
from ..kafka import Consumer, Producer, Record, ensure_topics
from ..metrics import HttpServer, MirrorMetrics
from ..runtime import StopSignal, periodic, retry_transient, sd_notify, supervise, write_snapshot
from ..store.agent_lock import AgentLock
from ..wire import key_for
from .applier import ApplyError
from .consumer import ApplyActor, Faults, ResumeRefused

log = logging.getLogger("volmirror.mirror")

DURABLE_BYTES = 64 * 1024 * 1024
POSITION_INTERVAL = 0.25  # seconds between position reports to the sources (while a volume moves)


def _ignore_result(fut: "asyncio.Future[Any]") -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: no "exception was never retrieved" warning
MAX_VOLUME_LABELS = 256
VERIFY_WAIT = 60.0


class MirrorAgent:
    def __init__(self, cfg: Config, registry: CollectorRegistry | None = None, *, faults: Faults | None = None) -> None:
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
        self._labels_lock = threading.Lock()
        self.faults = faults
        self._reported: dict[str, tuple[str, int]] = {}  # volume → last position reported to the sources
        self.outbox: deque[dict] = deque()  # control requests queued by the actor (thread-safe appends)
        self._last_durable = time.monotonic()
        self._pending_commit: dict[tuple[str, int], int] = {}
        self._ahead: asyncio.Future[list[Record] | None] | None = None  # the next fetch, made while the actor applies
        self._durable: dict[tuple[str, int], int] = {}  # next offset per partition as of the last durable point
        self._failures = 0
        self._scrub_tokens = 0.0
        self._scrub_at = time.monotonic()
        self._scrub_rr = 0
        self._verifying = 0

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
        self._lock = AgentLock(mc.state_dir, "mirror").acquire("mirror agent")
        _warn_history_elsewhere(mc.history_path, mc.root)
        self.actor = ApplyActor(mc, self.m, send=self.outbox.append, mirrored=self.mirrored, on_volume=self._init_volume, faults=self.faults)
        host, port = self.cfg.metrics.host_port
        http = HttpServer(host, port, self.registry, self.status, routes={"/verify": self.http_verify, "/resume": self.http_resume})
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
                await self._durable_commit()
            except Exception as e:  # noqa: BLE001 - shutting down; replay covers it
                log.warning("final commit failed: %s", e)
            await self.consumer.stop()
            await self.producer.stop()
            await http.stop()
            write_snapshot(mc.state_dir, self.status())
            self.actor.close()
            self._lock.release()

    @property
    def announced(self) -> dict[str, Any]:
        return self.actor.announced if hasattr(self, "actor") else {}

    def _init_volume(self, vol: str) -> bool:
        """Create a volume's series at zero (a volume not mirrored here only gets `protected` = 0).
        False when the label budget is spent: the caller uses a shared label instead."""
        with self._labels_lock:
            if vol in self.known_volumes:
                return True
            if len(self.known_volumes) >= MAX_VOLUME_LABELS:
                return False
            self.known_volumes.add(vol)
        self.m.protected.labels(vol).set(0)
        if self.mirrored(vol):
            self.m.init_volume(vol)
            self.m.init_rejections(vol)
            self.m.rpo_target.labels(vol).set(self.mc.rpo_seconds)
        return True

    async def _supervise(self) -> None:
        await supervise(
            self.stop,
            self._consume(),
            periodic(1.0, self._update_lag, name="lag"),
            periodic(POSITION_INTERVAL, self._report_positions, name="positions"),
            periodic(5.0, self._probe, name="probe"),
            periodic(5.0, lambda: write_snapshot(self.mc.state_dir, self.status()), name="snapshot"),
        )


    # -- consume loop ---------------------------------------------------------------------------
    async def _consume(self) -> None:
        """Fetch, apply, make durable, commit. The next fetch runs while the actor applies the
        previous one (fetching and parsing on the event loop, applying on the actor's thread);
        when an apply fails, what was fetched ahead is dropped and its partitions are sought
        back to it, before the positions are rewound."""
        try:
            while True:
                if self._ahead is not None:
                    recs, self._ahead = await self._ahead, None
                else:
                    recs = await self._fetch()
                if recs is None:
                    continue
                if recs:
                    self._ahead = asyncio.ensure_future(self._fetch())
                    res = await self.actor.call(self.actor.apply_records, recs)
                    if await self._applied(res, recs):
                        continue
                if self._pending_commit and (
                    time.monotonic() - self._last_durable >= self.mc.commit_interval_ms / 1000
                    or self.actor.undurable_bytes >= DURABLE_BYTES
                ):
                    await self._durable_commit()
                await self._send_requests()
                if not recs:
                    await self._scrub()
        finally:
            if self._ahead is not None:
                self._ahead.cancel()
                self._ahead = None

    async def _fetch(self) -> list[Record] | None:
        """The next records (None after a failed fetch, once the pause is over)."""
        try:
            return await self.consumer.getmany(timeout_ms=200)
        except Exception as e:  # noqa: BLE001 - transient broker trouble: keep the loop alive
            self._set_kafka(False)
            log.warning("fetch failed: %s", e)
            await asyncio.sleep(1.0)
            return None

    async def _drop_ahead(self, only: set[tuple[str, int]] | None = None) -> None:
        """Drop the fetch made ahead, before positions are rewound (a failed apply or durability
        point): each partition it read is sought back to its first record, so nothing of it is
        skipped and nothing of it is applied before what comes earlier in the stream (the rewind
        that follows may go further back). ``only``: drop just these partitions' records (the ones
        whose apply failed) and keep the rest for the next round, if the fetch is complete: a
        partition that keeps failing must not hold back the others, whose records would otherwise
        be fetched ahead and dropped again and again."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        if not ahead.done():
            ahead.cancel()
        try:
            recs = await ahead
        except asyncio.CancelledError:
            if not ahead.cancelled():
                raise  # we are being cancelled ourselves
            return
        first: dict[tuple[str, int], int] = {}
        keep: list[Record] = []
        for r in recs or ():
            if only is not None and (r.topic, r.partition) not in only:
                keep.append(r)
            else:
                first.setdefault((r.topic, r.partition), r.offset)
        for (t, p), off in first.items():
            self.consumer.seek(t, p, off)
        if keep:
            done: asyncio.Future[list[Record] | None] = asyncio.get_running_loop().create_future()
            done.set_result(keep)
            self._ahead = done

    async def _applied(self, res: Any, recs: list[Record]) -> bool:
        """Take an apply's result; True if it failed (handled: positions rewound, paused)."""
        if res.state_error:
            await self._state_failed(res.state_error, ((r.topic, r.partition) for r in recs))
            return True
        for tp, off in res.next_offsets.items():
            self.position[tp] = off
            self._pending_commit[tp] = off
        if res.error or res.paused:
            if res.error:
                backoff = self._backoff()
                log.error("apply failed: %s; retrying in %.0f s", res.error, backoff)
            else:
                backoff = 1.0  # held by the mass-change guard (logged once, when it paused): look again in a second
            if not await self._durable_commit([(r.topic, r.partition) for r in recs]):
                return True  # rewound to the last durable point, the failed batch's partitions included
            await self._drop_ahead(only=set(res.rewind))
            for (t, p), off in res.rewind.items():
                self.consumer.seek(t, p, off)
                self.position[(t, p)] = off
            await asyncio.sleep(backoff)
            return True
        self._failures = 0
        return False

    def _backoff(self) -> float:
        self._failures += 1
        return min(2.0 ** self._failures, 30.0)

    async def _durable_commit(self, read: Iterable[tuple[str, int]] = ()) -> bool:
        """Make everything applied durable, then commit the offsets. False if it could not (handled:
        back to the last durable point; ``read`` as for :meth:`_state_failed`)."""
        t0 = time.monotonic()
        try:
            await self.actor.call(self.actor.make_durable)
        except ApplyError as e:
            self.m.local_errors.labels("disk").inc()
            await self._state_failed(f"fsync failed: {e}", read)
            return False
        except StateError as e:
            await self._state_failed(str(e), read)
            return False
        self._last_durable = time.monotonic()
        self.m.durable_seconds.observe(self._last_durable - t0)
        self._durable.update(self._pending_commit)
        await self._commit()
        return True

    async def _state_failed(self, why: str, read: Iterable[tuple[str, int]] = ()) -> None:
        """The index (or an fsync) could not be written: back to the last durable point and retry.
        ``read``: partitions of the batch that failed (one seen for the first time is not in
        ``position`` yet, and must go back too)."""
        # first, before any await: if the agent is stopped while this runs, its final commit must
        # not commit offsets of batches that were never made durable
        self._pending_commit.clear()
        await self._drop_ahead()
        await self.actor.call(self.actor.reset)
        backoff = self._backoff()
        log.error("cannot make applied changes durable (%s); re-reading from the last durable offsets in %.0f s", why, backoff,
                  extra={"event": "state_error"})
        for tp in list(self.position) + [tp for tp in dict.fromkeys(read) if tp not in self.position]:
            off = self._durable.get(tp)
            if off is None:
                try:
                    off = await self.consumer.committed(*tp)
                except Exception:  # noqa: BLE001
                    off = None
            if off is None:
                begin = await self.consumer.beginning_offsets([tp])
                off = begin.get(tp, 0)
            self.consumer.seek(tp[0], tp[1], off)
            self.position[tp] = off
        await asyncio.sleep(backoff)

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

    async def _report_positions(self) -> None:
        """Tell the sources how far this site has applied each volume (only when it moved): they
        pace an initial sync to the fastest site, so live changes do not queue behind it."""
        topic = self.cfg.kafka.control_topic
        for vol, s in self.actor.snap.items():
            if not s.epoch or s.seq < 0 or not self.mirrored(vol) or self._reported.get(vol) == (s.epoch, s.seq):
                continue
            req = {"type": "position", "vol": vol, "epoch": s.epoch, "seq": s.seq, "site": self.mc.group_id, "ts": time.time()}
            try:
                fut = await self.producer.send(topic, key_for(vol), json.dumps(req).encode())
                fut.add_done_callback(_ignore_result)  # best effort: the ack is not waited for, a failure not logged
                self._reported[vol] = (s.epoch, s.seq)
            except Exception as e:  # noqa: BLE001 - without reports the source simply does not pace
                log.debug("cannot send position report: %s", e)

    async def _scrub(self) -> None:
        rate = self.mc.scrub_rate_mib * 1024 * 1024
        now = time.monotonic()
        self._scrub_tokens = min(self._scrub_tokens + rate * (now - self._scrub_at), max(rate, 1.0))
        self._scrub_at = now
        snap = self.actor.snap
        # a held volume is left alone: paused by the guard, or rolled back and serving as the failed-over copy
        vols = sorted(v for v in self.known_volumes if self.mirrored(v) and v in snap and snap[v].epoch and not snap[v].paused)
        if rate <= 0 or not vols or self._scrub_tokens < 64 * 1024 or self._verifying or not self._caught_up():
            return
        vol = vols[self._scrub_rr % len(vols)]
        self._scrub_rr += 1
        budget = int(min(self._scrub_tokens, 8 * 1024 * 1024))
        used = await self.actor.call(self.actor.scrub_step, vol, budget)
        self._scrub_tokens -= used

    def _caught_up(self) -> bool:
        """True when every assigned partition is read up to its high watermark: the scrubber then
        compares the disk with an index that includes everything already in the stream (after a
        crash, files written but not yet replayed would otherwise look "extra")."""
        topic = self.cfg.kafka.topic
        for tp in self.consumer.assignment():
            pos = self.position.get(tp)
            hw = self.consumer.highwater(topic, tp[1]) if tp[0] == topic else None
            if pos is None or (hw is not None and pos < hw):
                return False
        return True

    # -- verify (the `volmirror verify` command talks to this) --------------------------------------
    async def http_verify(self, q: dict[str, str]) -> tuple[int, dict[str, Any]]:
        vol = q.get("volume")
        repair = q.get("repair") in ("1", "true", "yes")
        try:
            wait = min(max(float(q.get("timeout", VERIFY_WAIT)), 1.0), 3600.0)
        except ValueError:
            return 400, {"error": "timeout must be a number of seconds"}
        known = set(self.actor.snap) | set(self.announced)
        vols = [vol] if vol else sorted(v for v in known if self.mirrored(v))
        if vol and (not VOLUME_NAME_RE.match(vol) or vol not in known):
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
        actor = self.actor
        v = actor.verifier

        def begin() -> dict[str, dict[str, str]]:
            v.repair = repair  # overlapping calls: the latest wins while any runs; config restored after the last
            if actor.drift.recorder is None:
                actor.drift.recorder = {}
            return actor.drift.recorder

        def end() -> None:
            if self._verifying == 0:
                v.repair = self.mc.repair
                actor.drift.recorder = None

        self._verifying += 1
        found = await actor.call(begin)
        for x in vols:
            found.pop(x, None)
        out: dict[str, Any] = {"volumes": {}, "repair": repair, "site": self.mc.group_id}
        try:
            for vol in vols:
                nonce = uuid.uuid4().hex
                self.outbox.append({"type": "checkpoint", "vol": vol, "nonce": nonce})
                await self._send_requests()
                res = await self._wait(lambda: v.results.get(nonce), f"a checkpoint of {vol} from the source (no answer on the "
                                       "event stream: is the source agent running and connected?)", wait)
                listing_ok = True
                if res.listing_nonce:
                    listing_ok = bool(await self._wait(lambda: res.listing_nonce in v.listing_done,
                                                       f"the listing of {vol}: the source answered the checkpoint (id {res.id}) but its "
                                                       "listing was not received and compared in time (the source defers listings "
                                                       "while it is still scanning)", wait))
                await actor.call(actor.full_pass, vol)
                drift = dict(found.get(vol, {}))
                now = actor.snap.get(vol)
                out["volumes"][vol] = {
                    "identical": res.match and not drift and (now.drift if now else 0) == 0,
                    "checkpoint": {"id": res.id, "source_time": res.ts, "match": res.match},
                    "drift": [{"path": p, "kind": k} for p, k in sorted(drift.items())],
                    "drift_files_now": now.drift if now else 0,
                    "listing_compared": listing_ok,
                }
        finally:
            self._verifying -= 1
            await actor.call(end)
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

    async def http_resume(self, q: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """``volmirror resume``: apply a volume the mass-change guard paused, or (with failback_done)
        one rolled back in place for a failover."""
        vol = q.get("volume", "")
        if not VOLUME_NAME_RE.match(vol):
            return 400, {"error": "give ?volume=NAME"}
        failback = q.get("failback_done") in ("1", "true", "yes")
        skip: dict[tuple[str, int], int] = {}
        try:
            if failback:
                # everything in the topic now was sent before failback made the source equal to this tree
                parts = [tp for tp in self.consumer.assignment() if tp[0] == self.cfg.kafka.topic]
                if not parts:
                    return 503, {"error": "no partition of the topic is assigned to this mirror yet; try again in a few seconds"}
                skip = await self.consumer.end_offsets(parts)
            was = await self.actor.call(self.actor.resume, vol, failback, skip)
        except ResumeRefused as e:
            return 409, {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - the volume stays held; the operator sees why
            log.error("resume of %s failed: %s", vol, e, extra={"volume": vol})
            return 500, {"error": f"resume failed, the volume stays held: {e}"}
        if was is None:
            return 404, {"error": f"volume {vol!r} is not held (neither paused by the guard nor rolled back in place)"}
        return 200, {"resumed": vol, "was": was}

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
                    self.actor.gap_partitions.add(tp[1])  # the first seq after the gap may jump far
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
        snap = self.actor.snap
        for vol in list(self.known_volumes):
            prog = snap.get(vol)
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
        """Whether ``vol`` is protected here, and every reason it is not."""
        now = now or time.time()
        ann = self.announced.get(vol)
        prog = self.actor.snap.get(vol) if hasattr(self, "actor") else None
        hb = ann.heartbeat_interval if ann else 5.0
        cp = ann.checkpoint_interval if ann else 60.0
        lag = (now - prog.last_ts) if prog and prog.last_ts else None
        verified = prog.last_verified if prog else None
        drift = prog.drift if prog else 0
        quarantined = prog.quarantined if prog else 0
        unprotected = ann.unprotected if ann else 0
        reasons = []
        if not self.mirrored(vol):
            reasons.append("not mirrored at this site")
        if prog is not None and prog.conflict:
            reasons.append("source identity conflict (see log; mirror.accept_new_source)")
        if lag is None or lag > max(3 * hb, 10.0):
            reasons.append("no fresh heartbeat")
        if lag is None or lag > self.mc.rpo_seconds:
            reasons.append(f"lag above RPO target {self.mc.rpo_seconds:g}s")
        if verified is None or now - verified > 3 * cp + 10:
            reasons.append("not verified recently")
        if drift:
            reasons.append(f"{drift} drifted path(s)")
        if quarantined:
            reasons.append(f"{quarantined} quarantined path(s)")
        if unprotected:
            reasons.append(f"{unprotected} path(s) the source cannot replicate")
        if prog is not None and prog.paused:
            reasons.append(f"applying held: {prog.paused}; `volmirror resume` continues (docs/restore.md)")
        return {"protected": not reasons, "why_not": reasons, "lag_seconds": lag, "last_verified": verified, "drift_files": drift,
                "quarantined": quarantined, "unprotected_paths": unprotected}

    def status(self) -> dict[str, Any]:
        vols = {}
        now = time.time()
        snap = self.actor.snap if hasattr(self, "actor") else {}
        names = set(self.known_volumes) | set(self.announced)
        for vol in sorted(names):
            prog = snap.get(vol)
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
                "files_applied": (_gauge(self.m.applied_events, vol, "manifest") or 0) + (_gauge(self.m.applied_events, vol, "file") or 0),
                "last_verified": cov["last_verified"],
                "drift_files": cov["drift_files"],
                "quarantined": cov["quarantined"],
                "unprotected_paths": cov["unprotected_paths"],
                "protected": cov["protected"],
                "why_not_protected": cov["why_not"],
                "mass_change": prog.mass_change if prog else None,
                "guard_paused": bool(prog and prog.paused),  # held: by the guard, or rolled back in place (failover)
                "held": prog.paused if prog else None,
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


def _warn_history_elsewhere(history: Path, root: Path) -> None:
    """A history on another file system than the mirror root copies every removed path instead
    of moving it (slower, and twice the space for a mass deletion): say so once, at start-up."""
    try:
        history.mkdir(parents=True, exist_ok=True)
        if os.stat(history).st_dev != os.stat(root).st_dev:
            log.warning("mirror.history_dir %s is not on the file system of mirror.root %s: removed paths are copied into the "
                        "history instead of moved (slower; a mass deletion needs its size again there)", history, root,
                        extra={"event": "history_elsewhere"})
    except OSError as e:
        log.warning("cannot compare the file systems of %s and %s: %s", history, root, e)


def _gauge(metric: Any, *labels: str) -> float | None:
    try:
        return metric.labels(*labels)._value.get()
    except Exception:  # noqa: BLE001
        return None
