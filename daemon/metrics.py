"""Metric families on an injected registry, and the small HTTP server that exposes them.

Nothing registers globally: each agent builds a :class:`~prometheus_client.CollectorRegistry`, the
families are created against it here, and tests make a fresh registry per test. Labels are bounded
(volume, op, result, reason, kind); a file path is never a label. Label values are pre-created per
volume so series exist at zero from the first scrape.

:class:`HttpServer` serves ``/metrics`` (Prometheus text format), ``/status`` (the agent's JSON
status snapshot) and ``/healthz`` on asyncio, so it needs no thread and stops with the agent.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .errors import RejectedEvent

log = logging.getLogger("volmirror.metrics")

# *_created series double every counter on the wire and nobody graphs them.
disable_created_metrics()

OPS = ("block", "zero", "truncate", "manifest", "file", "delete", "mkdir", "rmtree", "rename", "symlink", "heartbeat")


class CommonMetrics:
    def __init__(self, registry: CollectorRegistry, agent: str) -> None:
        self.kafka_connected = Gauge(
            "volmirror_kafka_connected", "1 while the agent's last Kafka round trip succeeded, else 0", registry=registry
        )
        self.info = Gauge("volmirror_agent_info", "Static agent information", ["agent", "version"], registry=registry)
        from . import __version__

        self.info.labels(agent, __version__).set(1)


class SourceMetrics(CommonMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "source")
        self.blocks = Counter(
            "volmirror_source_blocks_total", "Blocks hashed, by result (changed|unchanged|zero)", ["volume", "result"], registry=registry
        )
        self.published_bytes = Counter(
            "volmirror_source_published_bytes_total", "Block payload bytes acknowledged by Kafka", ["volume"], registry=registry
        )
        self.published_events = Counter(
            "volmirror_source_published_events_total", "Events acknowledged by Kafka, by op", ["volume", "op"], registry=registry
        )
        self.paced = Counter(
            "volmirror_source_backlog_paced_seconds_total",
            "Seconds a backlog (initial sync, rescan) waited because the fastest mirror was too far behind (live changes never wait)",
            ["volume"], registry=registry,
        )
        self.pending_files = Gauge(
            "volmirror_source_pending_files", "Paths waiting to be hashed and published", ["volume"], registry=registry
        )
        self.scan_duration = Gauge(
            "volmirror_source_scan_duration_seconds", "Duration of the last reconcile scan", ["volume"], registry=registry
        )
        self.last_scan = Gauge(
            "volmirror_source_last_scan_timestamp_seconds", "End time of the last reconcile scan", ["volume"], registry=registry
        )
        self.torn_reads = Counter(
            "volmirror_source_torn_reads_total", "Files that changed while being read and were re-queued", ["volume"], registry=registry
        )
        self.errors = Counter(
            "volmirror_source_errors_total", "Errors while reading or publishing, by kind", ["volume", "kind"], registry=registry
        )
        self.sync_files_total = Gauge(
            "volmirror_source_initial_sync_files", "Files to send in the initial sync", ["volume"], registry=registry
        )
        self.sync_files_done = Gauge(
            "volmirror_source_initial_sync_files_done", "Files sent so far in the initial sync", ["volume"], registry=registry
        )
        self.sync_bytes_total = Gauge(
            "volmirror_source_initial_sync_bytes", "Bytes to read in the initial sync", ["volume"], registry=registry
        )
        self.sync_bytes_done = Gauge(
            "volmirror_source_initial_sync_bytes_done", "Bytes read so far in the initial sync", ["volume"], registry=registry
        )
        self.sync_rate = Gauge(
            "volmirror_source_initial_sync_bytes_per_second", "Average read rate of the running initial sync (0 when none runs)",
            ["volume"], registry=registry,
        )
        self.sync_eta = Gauge(
            "volmirror_source_initial_sync_eta_seconds", "Estimated seconds until the running initial sync is done (0 when none runs)",
            ["volume"], registry=registry,
        )
        self.watch_ok = Gauge(
            "volmirror_source_watch_active",
            "1 while the volume is watched by inotify, 0 when it fell back to periodic scans only",
            ["volume"],
            registry=registry,
        )
        self.last_heartbeat = Gauge(
            "volmirror_source_last_heartbeat_timestamp_seconds", "Time of the last acknowledged heartbeat", ["volume"], registry=registry
        )
        self.publish_latency = Histogram(
            "volmirror_source_publish_seconds",
            "Time from a batch's first send to all of its acks",
            ["volume"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.state_ok = Gauge(
            "volmirror_source_state_ok",
            "1 while the volume's state (index, sequence file in state_dir) was last written successfully, 0 while writes fail",
            ["volume"],
            registry=registry,
        )
        self.unprotected = Gauge(
            "volmirror_source_unprotected_paths",
            "Paths the source cannot replicate (names not UTF-8, subtrees it cannot read)",
            ["volume"],
            registry=registry,
        )
        self.in_doubt = Gauge(
            "volmirror_source_in_doubt_paths",
            "Paths of failed batches not yet published again (listings wait for them)",
            ["volume"],
            registry=registry,
        )
        self.listings = Counter(
            "volmirror_source_listings_total", "Listings requested by mirrors, by result (sent|deferred|failed)", ["volume", "result"], registry=registry
        )

        self.points = Counter(
            "volmirror_source_points_total",
            "Restore points of the volume: sent, or not sent because a file read since the last point changed since (stale) "
            "or the send failed",
            ["volume", "result"],
            registry=registry,
        )
        self.last_point = Gauge(
            "volmirror_source_last_point_timestamp_seconds", "Time of the last acknowledged restore point", ["volume"], registry=registry
        )
        self.point_hooks = Counter(
            "volmirror_source_point_hooks_total",
            "Runs of a volume's point_pre_command / point_post_command, by phase (pre|post) and result (ok|failed); "
            "a failed pre-command means no restore point that round",
            ["volume", "phase", "result"],
            registry=registry,
        )

    ERROR_KINDS = ("read", "publish", "state", "internal", "bad_name", "scan")

    def init_volume(self, vol: str) -> None:
        for k in self.ERROR_KINDS:
            self.errors.labels(vol, k)
        self.state_ok.labels(vol).set(1)
        self.unprotected.labels(vol)
        self.in_doubt.labels(vol)
        for r in ("sent", "deferred", "failed"):
            self.listings.labels(vol, r)
        for r in ("sent", "stale", "failed"):
            self.points.labels(vol, r)
        self.last_point.labels(vol)
        for ph in ("pre", "post"):
            for r in ("ok", "failed"):
                self.point_hooks.labels(vol, ph, r)
        for r in ("changed", "unchanged", "zero"):
            self.blocks.labels(vol, r)
        self.published_bytes.labels(vol)
        self.pending_files.labels(vol)
        self.paced.labels(vol)
        self.scan_duration.labels(vol)
        self.torn_reads.labels(vol)
        self.watch_ok.labels(vol)
        self.publish_latency.labels(vol)
        for g in (self.sync_files_total, self.sync_files_done, self.sync_bytes_total, self.sync_bytes_done, self.sync_rate, self.sync_eta):
            g.labels(vol)


class MirrorMetrics(CommonMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "mirror")
        self.lag_seconds = Gauge(
            "volmirror_replication_lag_seconds",
            "Now minus the source timestamp of the newest applied event or heartbeat",
            ["volume"],
            registry=registry,
        )
        self.lag_records = Gauge(
            "volmirror_mirror_consumer_lag_records",
            "Records in the volume's partition not yet applied (high watermark minus position)",
            ["volume"],
            registry=registry,
        )
        self.applied_bytes = Counter(
            "volmirror_mirror_applied_bytes_total", "Block bytes written to the mirror", ["volume"], registry=registry
        )
        self.applied_events = Counter(
            "volmirror_mirror_applied_events_total", "Events applied, by op", ["volume", "op"], registry=registry
        )
        self.rejected = Counter(
            "volmirror_mirror_rejected_events_total", "Events rejected and skipped, by reason", ["volume", "reason"], registry=registry
        )
        self.last_event_ts = Gauge(
            "volmirror_mirror_last_source_timestamp_seconds",
            "Source timestamp of the newest applied event or heartbeat",
            ["volume"],
            registry=registry,
        )
        self.last_commit = Gauge(
            "volmirror_mirror_last_commit_timestamp_seconds", "Time of the last durable offset commit", registry=registry
        )
        self.durable_seconds = Histogram(
            "volmirror_mirror_durable_point_seconds",
            "Time to make applied changes durable (syncfs or fsyncs, then the index commit); nothing is applied meanwhile",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )
        self.stream_gap = Counter(
            "volmirror_mirror_stream_gaps_total",
            "Times the committed offset was older than the log start (events lost to retention)",
            ["partition"],
            registry=registry,
        )
        self.apply_errors = Counter(
            "volmirror_mirror_apply_errors_total", "Events that failed to apply because of local I/O errors", ["volume"], registry=registry
        )

        # verification, drift, repair, coverage
        self.superseded = Counter(
            "volmirror_mirror_superseded_records_total",
            "Records skipped because the source sent them before a failback of the volume (resume --failback-done)", ["volume"],
            registry=registry,
        )
        self.points = Counter(
            "volmirror_mirror_points_total", "Restore points recorded (the mirror can roll the volume back to each)", ["volume"],
            registry=registry,
        )
        self.last_point = Gauge(
            "volmirror_mirror_last_point_timestamp_seconds", "Source time of the latest restore point recorded here", ["volume"],
            registry=registry,
        )
        self.mass_change = Gauge(
            "volmirror_mirror_mass_change", "1 while the volume goes through a burst of rewrites, deletions or renames no normal "
            "workload makes (ransomware, rm -rf): daemon.mirror.guard", ["volume"], registry=registry,
        )
        self.mass_changes = Counter(
            "volmirror_mirror_mass_changes_total", "Mass changes detected, by kind (rewrites|deletes|renames)", ["volume", "kind"],
            registry=registry,
        )
        self.guard_paused = Gauge(
            "volmirror_mirror_guard_paused", "1 while applying the volume is held: by the mass-change guard (mirror.guard = pause), or "
            "rolled back in place for a failover; until `volmirror resume`", ["volume"], registry=registry,
        )
        self.history_bytes = Gauge(
            "volmirror_mirror_history_bytes", "Disk used by the volume's history (undo journal and removed paths kept)", ["volume"],
            registry=registry,
        )
        self.history_pruned = Counter(
            "volmirror_mirror_history_pruned_points_total", "Restore points pruned (older than history_hours, or over history_max_gib)",
            ["volume"], registry=registry,
        )
        self.last_verified = Gauge(
            "volmirror_last_verified_timestamp_seconds",
            "Source time T of the latest checkpoint whose digest matched this mirror (identical as of T)",
            ["volume"],
            registry=registry,
        )
        self.checkpoints = Counter(
            "volmirror_checkpoints_total", "Source checkpoints compared, by result (match|mismatch)", ["volume", "result"], registry=registry
        )
        self.drift_files = Gauge("volmirror_drift_files", "Paths currently known to differ from the source", ["volume"], registry=registry)
        self.drift_detected = Counter(
            "volmirror_drift_detected_total", "Drift found, by kind (content|missing|extra|metadata)", ["volume", "kind"], registry=registry
        )
        self.repairs = Counter("volmirror_repairs_total", "Drifted paths brought back in line", ["volume"], registry=registry)
        self.repair_requests = Counter(
            "volmirror_repair_requests_total", "Requests sent to the source on the control topic, by type", ["volume", "type"], registry=registry
        )
        self.scrub_bytes = Counter("volmirror_scrub_bytes_total", "Bytes re-read from the mirror's disk by the scrubber", ["volume"], registry=registry)
        self.scrub_last_pass = Gauge(
            "volmirror_scrub_last_pass_timestamp_seconds", "End time of the last full scrub pass", ["volume"], registry=registry
        )
        self.protected = Gauge(
            "volmirror_volume_protected",
            "1 while the volume is mirrored here, heartbeats are fresh, lag is under the RPO target and the last verification is recent",
            ["volume"],
            registry=registry,
        )
        self.rpo_target = Gauge("volmirror_rpo_target_seconds", "Configured RPO target (mirror.rpo_seconds)", ["volume"], registry=registry)
        self.deleted_files = Counter(
            "volmirror_mirror_deleted_files_total",
            "Paths deleted on the mirror, by why: the source's stream said so (stream) or a complete, verified listing did (listing)",
            ["volume", "reason"],
            registry=registry,
        )
        self.quarantined = Gauge(
            "volmirror_mirror_quarantined_paths",
            "Paths whose records this mirror cannot apply (too large, name too long, permission): not protected",
            ["volume"],
            registry=registry,
        )
        self.quarantine_events = Counter(
            "volmirror_mirror_quarantined_total", "Records quarantined (skipped after classification), by reason", ["volume", "reason"], registry=registry
        )
        self.unprotected_paths = Gauge(
            "volmirror_mirror_unprotected_paths",
            "Paths the source reports it cannot replicate (e.g. file names that are not UTF-8)",
            ["volume"],
            registry=registry,
        )
        self.listings = Counter(
            "volmirror_mirror_listings_total",
            "Listings received from the source: compared (complete and verified) or discarded (incomplete, out of order, not verifying)",
            ["volume", "result"],
            registry=registry,
        )
        self.local_errors = Counter(
            "volmirror_mirror_local_errors_total",
            "Local failures (disk full, I/O error, state_dir not writable) that stopped applying until they cleared, by kind",
            ["kind"],
            registry=registry,
        )
        for k in ("disk", "state_dir"):
            self.local_errors.labels(k)

    QUARANTINE_REASONS = ("too_large", "name_too_long", "permission", "io")

    def init_volume(self, vol: str) -> None:
        self.points.labels(vol)
        self.superseded.labels(vol)
        self.last_point.labels(vol)
        self.history_bytes.labels(vol)
        self.mass_change.labels(vol)
        self.guard_paused.labels(vol)
        for k in ("rewrites", "deletes", "renames"):
            self.mass_changes.labels(vol, k)
        self.history_pruned.labels(vol)
        for r in ("stream", "listing"):
            self.deleted_files.labels(vol, r)
        self.quarantined.labels(vol)
        for r in self.QUARANTINE_REASONS:
            self.quarantine_events.labels(vol, r)
        self.unprotected_paths.labels(vol)
        for r in ("compared", "discarded"):
            self.listings.labels(vol, r)
        self.lag_seconds.labels(vol)
        self.lag_records.labels(vol)
        self.drift_files.labels(vol)
        self.protected.labels(vol)
        self.scrub_bytes.labels(vol)
        self.repairs.labels(vol)
        for r in ("match", "mismatch"):
            self.checkpoints.labels(vol, r)
        for k in ("content", "missing", "extra", "metadata"):
            self.drift_detected.labels(vol, k)
        self.applied_bytes.labels(vol)
        self.apply_errors.labels(vol)
        for op in OPS:
            self.applied_events.labels(vol, op)

    def init_rejections(self, vol: str) -> None:
        for r in RejectedEvent.REASONS:
            self.rejected.labels(vol, r)


class HttpServer:
    """``/metrics``, ``/status`` and ``/healthz`` over plain HTTP/1.0 on asyncio."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        status: Callable[[], dict[str, Any]],
        routes: dict[str, Callable[[dict[str, str]], Awaitable[tuple[int, dict[str, Any]]]]] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.registry = registry
        self.status = status
        self.routes = routes or {}
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]
        log.info("metrics listening on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> "HttpServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            if not line:
                return
            while True:  # drain headers
                h = await asyncio.wait_for(reader.readline(), 10)
                if h in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            path, _, qs = (parts[1] if len(parts) >= 2 else "/").partition("?")
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                code, ctype, body = "405 Method Not Allowed", "text/plain", b"method not allowed\n"
            elif path in self.routes:
                from urllib.parse import parse_qsl

                status, data = await self.routes[path](dict(parse_qsl(qs)))
                code = {200: "200 OK", 400: "400 Bad Request", 404: "404 Not Found", 503: "503 Service Unavailable", 504: "504 Gateway Timeout"}.get(status, f"{status} Error")
                ctype, body = "application/json", json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"
            elif path == "/metrics":
                code, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
            elif path == "/status":
                code, ctype = "200 OK", "application/json"
                body = json.dumps(self.status(), indent=2, sort_keys=True).encode() + b"\n"
            elif path in ("/healthz", "/"):
                code, ctype, body = "200 OK", "text/plain", b"ok\n"
            else:
                code, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = f"HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + (body if parts and parts[0] != "HEAD" else b""))
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, IndexError):
            pass
        except Exception:  # a broken status callback must not kill the server
            log.exception("metrics request failed")
        finally:
            writer.close()
