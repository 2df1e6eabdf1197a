"""The source agent: supervision of watchers, volume workers, scans, heartbeats and metrics.

Start-up order: state directory and sequence state → metrics server → topics (created if missing)
→ producer → watchers → ``READY=1`` → per volume: its worker opens the volume's own index, then the
initial reconcile scan runs. Everything long-running is a task in one ``TaskGroup``; SIGTERM/SIGINT
cancel it, the producer is flushed and stopped, the indexes closed. Nothing is fire-and-forget, and
one volume's failure never stops another: a worker or scan that raises is logged, counted
(``volmirror_source_errors_total{kind="internal"|"scan"}``) and restarted after a backoff.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry

from ..config import Config, ConfigError, VolumeConfig
from ..store.agent_lock import AgentLock
from ..store.source_index import SeqAllocator
from ..errors import RejectedEvent, VolmirrorError
from ..kafka import MAX_RECORD, Consumer, Producer, batch_bytes, ensure_topics
from ..metrics import HttpServer, SourceMetrics
from ..runtime import StopSignal, periodic, retry_transient, sd_notify, supervise, write_snapshot
from .control import dispatch, parse_request
from .dirty import backoff
from .progress import ProgressReporter
from .publisher import Publisher
from .scanner import plan, walk
from .volume import VolumeWorker
from .watcher import VolumeWatcher

log = logging.getLogger("volmirror.source")


class SourceAgent:
    def __init__(self, cfg: Config, registry: CollectorRegistry | None = None) -> None:
        self.cfg = cfg
        self.sc = cfg.require_source()
        self.registry = registry or CollectorRegistry()
        self.m = SourceMetrics(self.registry)
        self.stop = StopSignal()
        self.workers: dict[str, VolumeWorker] = {}
        self.watchers: dict[str, VolumeWatcher] = {}
        self.last_scan: dict[str, float] = {}
        self.started = time.time()
        self.ready = False

    def _check_volumes(self) -> None:
        for i, v in enumerate(self.sc.volumes):
            if not v.path.is_dir():
                raise ConfigError(f"source.volumes[{i}].path", f"{v.path} does not exist or is not a directory")

    async def run(self) -> None:
        self._check_volumes()
        self.stop.install()
        sc, kc = self.sc, self.cfg.kafka
        try:
            sc.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("source.state_dir", f"cannot create {sc.state_dir}: {e.strerror}") from None
        self._lock = AgentLock(sc.state_dir, "source").acquire("source agent")
        self.seqs = SeqAllocator(sc.state_dir / "sequence.json")
        host, port = self.cfg.metrics.host_port
        http = HttpServer(host, port, self.registry, self.status)
        try:
            await http.start()
        except OSError as e:
            raise ConfigError("metrics.listen", f"cannot listen on {self.cfg.metrics.listen}: {e.strerror}") from None
        limit = MAX_RECORD

        async def topics() -> None:
            nonlocal limit
            limit = await ensure_topics(kc, [kc.topic, kc.control_topic])

        await retry_transient("creating Kafka topics", topics, self.stop.event)
        producer = Producer(kc, max_batch=batch_bytes(limit))
        try:
            await retry_transient("connecting the producer", producer.start, self.stop.event)
            self.m.kafka_connected.set(1)
            self.pub = Publisher(producer, kc.topic, self.seqs)
            loop = asyncio.get_running_loop()
            for v in sc.volumes:
                self.m.init_volume(v.name)
                w = VolumeWorker(
                    v, sc.state_dir, self.pub, self.m,
                    debounce=sc.debounce_ms / 1000, max_delay=sc.max_delay_ms / 1000, checkpoint_interval=sc.checkpoint_interval,
                    compression=sc.compression, point_interval=sc.point_interval, point_quiet=sc.point_quiet_ms / 1000,
                )
                self.workers[v.name] = w
                watcher = VolumeWatcher(v.name, str(v.path), w.notify)
                w.watching = lambda watcher=watcher: watcher.alive  # type: ignore[misc]
                ok = watcher.start(loop)
                self.m.watch_ok.labels(v.name).set(1 if ok else 0)
                self.watchers[v.name] = watcher
            # one group per (host, topic): a group shared with sources of other topics rebalances
            # whenever one of them stops (or waits out a killed one), and a request a mirror writes
            # meanwhile is skipped ("latest" before the first commit); the mirror asks again later
            self.control = Consumer(kc, f"volmirror-source.{sc.host}.{kc.topic}", [kc.control_topic], offset_reset="latest")
            await retry_transient("connecting the control consumer", self.control.start, self.stop.event)
            self.ready = True
            sd_notify("READY=1")
            log.info("source agent ready: %d volume(s), topic %s", len(sc.volumes), kc.topic, extra={"topic": kc.topic})
            await self._supervise()
        finally:
            if hasattr(self, "control"):
                await self.control.stop()
            for w in self.watchers.values():
                w.stop()
            await producer.stop()
            for w in self.workers.values():
                w.close()
            await http.stop()
            write_snapshot(sc.state_dir, self.status())
            self._lock.release()

    async def _supervise(self) -> None:
        sc = self.sc
        per_volume = []
        for v in sc.volumes:
            per_volume += [self._restarting(v.name, "worker", self.workers[v.name].run), self._reconcile_loop(v)]
        await supervise(
            self.stop,
            *per_volume,
            periodic(sc.heartbeat_interval, self._heartbeat, name="heartbeat"),
            periodic(sc.announce_interval, self._announce, name="announce"),
            self._control_loop(),
            periodic(5.0, lambda: write_snapshot(sc.state_dir, self.status()), name="snapshot"),
            ProgressReporter(self.workers, sys.stderr).run(),
        )

    async def _restarting(self, name: str, what: str, fn: Any) -> None:
        """Run one volume's task; if it raises, log, count and restart it after a backoff."""
        failures = 0
        while True:
            t0 = time.monotonic()
            try:
                await fn()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                failures = 1 if time.monotonic() - t0 > 300 else failures + 1
                delay = backoff(failures, 60.0)
                self.m.errors.labels(name, "internal").inc()
                log.exception("%s of volume %s failed; restarting it in %.0f s", what, name, delay, extra={"volume": name})
                await asyncio.sleep(delay)

    # -- scans ----------------------------------------------------------------------------------
    async def _reconcile_loop(self, v: VolumeConfig) -> None:
        failures = 0
        while True:
            try:
                await self.reconcile(v)
                failures = 0
                pause = self.sc.reconcile_interval if self.watchers[v.name].alive else min(self.sc.reconcile_interval, 10.0)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a failed scan is retried; other volumes go on
                failures += 1
                pause = backoff(failures, 60.0)
                self.m.errors.labels(v.name, "scan").inc()
                log.error("reconcile scan of %s failed: %s; retrying in %.0f s", v.name, e, pause,
                          extra={"volume": v.name, "event": "scan"}, exc_info=not isinstance(e, VolmirrorError))
            await asyncio.sleep(pause)

    async def reconcile(self, v: VolumeConfig) -> None:
        w = self.workers[v.name]
        await w.opened.wait()
        w.scanning = True
        t0 = time.monotonic()
        try:
            found = await asyncio.to_thread(walk, str(v.path), v.is_excluded)
            known = await asyncio.to_thread(w.read_index)
            p = await asyncio.to_thread(plan, found.disk, found.targets, known, found.unprotected.keys())
            w.scan_found(p.renames, p.dirty, found.unprotected)
            if p.new_files:
                w.progress.begin(p.new_files, p.new_bytes)
                self.m.sync_files_total.labels(v.name).set(w.progress.files_total)
                self.m.sync_bytes_total.labels(v.name).set(w.progress.bytes_total)
            el = time.monotonic() - t0
            self.m.scan_duration.labels(v.name).set(el)
            self.m.last_scan.labels(v.name).set(time.time())
            self.last_scan[v.name] = time.time()
            log.info(
                "reconcile scan of %s: %d entries, %d to examine, %d rename(s), %d unprotected, %.2f s",
                v.name, len(found.disk), len(p.dirty), len(p.renames), len(found.unprotected), el, extra={"volume": v.name, "event": "scan"},
            )
        finally:
            w.scanning = False

    # -- control requests and announcements ------------------------------------------------------
    async def _control_loop(self) -> None:
        while True:
            try:
                recs = await self.control.getmany(timeout_ms=500, max_records=200)
            except Exception as e:  # noqa: BLE001 - keep serving; the mirror asks again
                log.warning("control topic fetch failed: %s", e)
                await asyncio.sleep(2.0)
                continue
            for r in recs:
                try:
                    req = parse_request(r.value)
                except RejectedEvent as e:
                    self.m.errors.labels("_control", "bad_request").inc()
                    log.warning("ignored control record at offset %d: %s", r.offset, e, extra={"partition": r.partition, "offset": r.offset})
                    continue
                dispatch(req, self.workers)
            if recs:
                last = {}
                for r in recs:
                    last[(r.topic, r.partition)] = r.offset + 1
                try:
                    await self.control.commit(last)
                except Exception as e:  # noqa: BLE001
                    log.debug("control commit failed: %s", e)

    async def _announce(self) -> None:
        sc = self.sc
        futs = []
        for v in sc.volumes:
            fields = {"host": sc.host, "src": str(v.path), "block_size": v.block_size,
                      "heartbeat_interval": sc.heartbeat_interval, "checkpoint_interval": sc.checkpoint_interval,
                      "point_interval": sc.point_interval}
            w = self.workers.get(v.name)
            if w is not None:
                fields["unprotected"] = len(w.unprotected)
            futs.append(await self.pub.send(v.name, "announce", fields, seq=False))
        await asyncio.wait_for(asyncio.gather(*futs), 30)

    # -- heartbeats -----------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        futs = []
        try:
            for v in self.sc.volumes:
                futs.append((v.name, await self.pub.send(v.name, "heartbeat", {}, seq=False)))
            done = await asyncio.wait_for(asyncio.gather(*(f for _, f in futs), return_exceptions=True), 30)
        except (asyncio.TimeoutError, Exception) as e:  # noqa: BLE001 - a heartbeat failure is a metric, not a crash
            self.m.kafka_connected.set(0)
            log.warning("heartbeat failed: %s", e)
            return
        ok = True
        now = time.time()
        for (name, _), r in zip(futs, done):
            if isinstance(r, BaseException):
                ok = False
            else:
                self.m.last_heartbeat.labels(name).set(now)
        self.m.kafka_connected.set(1 if ok else 0)

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        vols = {}
        for v in self.sc.volumes:
            w = self.workers.get(v.name)
            vols[v.name] = {
                "path": str(v.path),
                "block_size": v.block_size,
                "pending_files": None,
                "last_published": None,
                "sync": None,
                **(w.status() if w else {}),
                "last_seq": self.seqs.last(v.name) if hasattr(self, "seqs") else None,
                "last_scan": self.last_scan.get(v.name),
                "watch_active": self.watchers[v.name].alive if v.name in self.watchers else False,
            }
        return {
            "agent": "source",
            "state_dir": str(self.sc.state_dir),
            "state_ok": all(x.get("state_ok", True) for x in vols.values()) and (self.seqs.ok if hasattr(self, "seqs") else True),
            "host": self.sc.host,
            "ready": self.ready,
            "started": self.started,
            "kafka_connected": bool(self.m.kafka_connected._value.get()),
            "topic": self.cfg.kafka.topic,
            "volumes": vols,
        }

