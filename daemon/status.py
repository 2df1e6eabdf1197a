"""``volmirror status``: ask the running agent for its JSON status and print it for people.

The agent serves its status at ``http://<metrics.listen>/status``. If it does not answer, the last
snapshot the agent wrote into its state directory is shown, marked stale, and the exit code is 1.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from .config import Config
from .errors import EXIT_FAILURE, EXIT_OK
from .source.progress import fmt_bytes


def fetch(cfg: Config, timeout: float = 3.0) -> dict[str, Any]:
    host, port = cfg.metrics.host_port
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    url = f"http://{host}:{port}/status"
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - local agent endpoint
        return json.loads(r.read())


def _snapshot(cfg: Config) -> dict[str, Any] | None:
    for sec in (cfg.mirror, cfg.source):
        if sec is None:
            continue
        try:
            return json.loads((sec.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            continue
    return None


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    d = time.time() - ts
    return f"{d:.1f}s ago" if d < 120 else f"{d / 60:.0f}m ago" if d < 7200 else f"{d / 3600:.1f}h ago"


def render(st: dict[str, Any]) -> str:
    lines = []
    conn = "connected" if st.get("kafka_connected") else "DISCONNECTED"
    if st.get("agent") == "mirror":
        lines.append(f"mirror agent, group {st.get('group_id')}, root {st.get('root')}, Kafka {conn}")
        lines.append(
            f"{'VOLUME':<20} {'MIRRORED':>8} {'PROTECTED':>9} {'LAG(s)':>8} {'LAG(rec)':>9} {'APPLIED':>11} {'LAST EVENT':>12} {'VERIFIED':>12} {'DRIFT':>6}"
        )
        unprotected = []
        for name, v in sorted(st.get("volumes", {}).items()):
            lag = v.get("lag_seconds")
            recs = v.get("lag_records")
            lines.append(
                f"{name:<20} {'yes' if v.get('mirrored') else 'NO':>8} {'yes' if v.get('protected') else 'NO':>9} "
                f"{'-' if lag is None else f'{lag:.1f}':>8} {'-' if recs is None else int(recs)!s:>9} "
                f"{fmt_bytes(v.get('applied_bytes') or 0):>11} {_ago(v.get('last_event_ts')):>12} {_ago(v.get('last_verified')):>12} "
                f"{v.get('drift_files', 0)!s:>6}"
            )
            if not v.get("protected"):
                unprotected.append(f"  {name}: not protected: {', '.join(v.get('why_not_protected') or ['unknown'])}")
        lines += unprotected
    else:
        lines.append(f"source agent on {st.get('host')}, topic {st.get('topic')}, Kafka {conn}")
        lines.append(f"{'VOLUME':<20} {'PENDING':>8} {'LAST SEQ':>9} {'LAST PUBLISHED':>15}  SYNC")
        for name, v in sorted(st.get("volumes", {}).items()):
            sync = v.get("sync") or {}
            s = "done"
            if sync.get("active"):
                s = f"{sync['files_done']}/{sync['files_total']} files"
            lines.append(f"{name:<20} {v.get('pending_files')!s:>8} {v.get('last_seq')!s:>9} {_ago(v.get('last_published')):>15}  {s}")
    return "\n".join(lines)


def one_line(st: dict[str, Any]) -> str:
    vols = st.get("volumes", {})
    if st.get("agent") == "mirror":
        lags = [v["lag_seconds"] for v in vols.values() if v.get("lag_seconds") is not None]
        recs = sum(int(v.get("lag_records") or 0) for v in vols.values())
        nbytes = sum(v.get("applied_bytes") or 0 for v in vols.values())
        files = sum(int(v.get("files_applied") or 0) for v in vols.values())
        lag = f"{max(lags):.1f}s" if lags else "n/a"
        return f"mirror: lag {lag} / {recs} rec, applied {fmt_bytes(nbytes)} in {files} file update(s)"
    pend = sum(int(v.get("pending_files") or 0) for v in vols.values())
    syncs = [v["sync"] for v in vols.values() if (v.get("sync") or {}).get("active")]
    if syncs:
        done = sum(x["bytes_done"] for x in syncs)
        total = sum(x["bytes_total"] for x in syncs)
        return f"source: initial sync {fmt_bytes(done)}/{fmt_bytes(total)}, {pend} pending"
    return f"source: {pend} file(s) pending"


def run_status(cfg: Config, *, as_json: bool, watch: bool, extra: Config | None = None) -> int:
    if watch:
        return _watch([c for c in (extra, cfg) if c is not None])
    try:
        st = fetch(cfg)
        stale = False
    except (OSError, urllib.error.URLError, ValueError) as e:
        snap = _snapshot(cfg)
        print(f"volmirror: agent not reachable at {cfg.metrics.listen} ({e})", file=sys.stderr)
        if snap is None:
            return EXIT_FAILURE
        st, stale = snap, True
    if as_json:
        print(json.dumps({**st, "stale": stale}, indent=2, sort_keys=True))
    else:
        if stale:
            print(f"STALE: last snapshot written {_ago(st.get('written_at'))}")
        print(render(st))
    return EXIT_FAILURE if stale else EXIT_OK


def _watch(cfgs: list[Config]) -> int:
    try:
        while True:
            parts = []
            for cfg in cfgs:
                try:
                    parts.append(one_line(fetch(cfg, timeout=1.0)))
                except (OSError, urllib.error.URLError, ValueError):
                    parts.append(f"agent at {cfg.metrics.listen} not reachable")
            text = time.strftime("%H:%M:%S ") + " | ".join(parts)
            sys.stdout.write("\r\x1b[K" + text)
            sys.stdout.flush()
            time.sleep(1.0)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return EXIT_OK
