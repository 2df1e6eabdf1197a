"""``volmirror status``: ask the running agent for its JSON status, print it for people, and say in
the exit code whether every volume is protected.

The agent serves its status at ``http://<metrics.listen>/status``. If it does not answer, the last
snapshot the agent wrote into its state directory is shown, marked stale, and the exit code is 1.

Exit codes: 0 every volume this agent is responsible for is protected; 1 at least one is not (each
is named with its reasons: drift, quarantined paths, paths the source cannot replicate, lag,
verification), no volume is known yet, or the agent is not reachable; 2 bad config (from the CLI).
A mirror site whose ``[mirror] volumes`` excludes a volume lists it as not mirrored here, but that
does not fail the exit code: another site is responsible for it (the VolumeUnprotected alert looks
at every site). The verdict functions (:func:`verdicts`, :func:`exit_code`) are pure, over the
status JSON, so they are tested without an agent.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from .config import Config
from .errors import EXIT_FAILURE, EXIT_OK
from .source.progress import fmt_bytes


@dataclass(frozen=True)
class Verdict:
    """Whether one volume is protected, and why not; ``counts`` is False for a volume another site mirrors."""

    volume: str
    protected: bool
    reasons: tuple[str, ...]
    counts: bool = True


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


def _int(v: dict[str, Any], key: str) -> int:
    try:
        return int(v.get(key) or 0)
    except (TypeError, ValueError):
        return 0


def _mirror_verdict(name: str, v: dict[str, Any], site_volumes: tuple[str, ...]) -> Verdict:
    reasons = list(v.get("why_not_protected") or [])
    # the counts are facts in their own right: an agent that forgot a reason must not look protected
    for key, word, text in (("drift_files", "drift", "drifted path(s)"), ("quarantined", "quarantin", "quarantined path(s)"),
                            ("unprotected_paths", "cannot replicate", "path(s) the source cannot replicate")):
        n = _int(v, key)
        if n and not any(word in r for r in reasons):
            reasons.append(f"{n} {text}")
    if not v.get("protected") and not reasons:
        reasons.append("the agent reports it unprotected without a reason")
    counts = not site_volumes or name in site_volumes
    if not counts and not any("not mirrored" in r for r in reasons):
        reasons.insert(0, "not mirrored at this site")
    return Verdict(name, not reasons, tuple(reasons), counts)


def _source_verdict(name: str, v: dict[str, Any]) -> Verdict:
    n = _int(v, "unprotected_paths")
    reasons = (f"{n} path(s) cannot be replicated (see the log: e.g. names that are not UTF-8)",) if n else ()
    return Verdict(name, not reasons, reasons)


def verdicts(st: dict[str, Any], site_volumes: tuple[str, ...] = ()) -> list[Verdict]:
    """One verdict per volume in the status JSON, sorted by name. ``site_volumes``: the mirror's
    ``[mirror] volumes`` filter (empty: this site mirrors every volume)."""
    vols = st.get("volumes") or {}
    if st.get("agent") == "mirror":
        return [_mirror_verdict(n, v, site_volumes) for n, v in sorted(vols.items())]
    return [_source_verdict(n, v) for n, v in sorted(vols.items())]


def problems(st: dict[str, Any], site_volumes: tuple[str, ...] = ()) -> list[str]:
    """One line per reason the exit code is not 0 (empty: every volume this agent answers for is protected)."""
    vs = verdicts(st, site_volumes)
    out = [f"{x.volume}: not protected: {', '.join(x.reasons)}" for x in vs if x.counts and not x.protected]
    if st.get("agent") == "mirror" and not any(x.counts for x in vs):
        out.append("no volume to protect: nothing announced or received at this site yet")
    return out


def exit_code(st: dict[str, Any], *, stale: bool = False, site_volumes: tuple[str, ...] = ()) -> int:
    return EXIT_FAILURE if stale or problems(st, site_volumes) else EXIT_OK


def render(st: dict[str, Any], site_volumes: tuple[str, ...] = ()) -> str:
    lines = []
    conn = "connected" if st.get("kafka_connected") else "DISCONNECTED"
    verdict = {x.volume: x for x in verdicts(st, site_volumes)}
    if st.get("agent") == "mirror":
        lines.append(f"mirror agent, group {st.get('group_id')}, root {st.get('root')}, Kafka {conn}")
        lines.append(
            f"{'VOLUME':<20} {'MIRRORED':>8} {'PROTECTED':>9} {'LAG(s)':>8} {'LAG(rec)':>9} {'APPLIED':>11} {'LAST EVENT':>12} "
            f"{'VERIFIED':>12} {'DRIFT':>6} {'QUARANT':>7}"
        )
        for name, v in sorted(st.get("volumes", {}).items()):
            lag = v.get("lag_seconds")
            recs = v.get("lag_records")
            lines.append(
                f"{name:<20} {'yes' if v.get('mirrored') else 'NO':>8} {'yes' if verdict[name].protected else 'NO':>9} "
                f"{'-' if lag is None else f'{lag:.1f}':>8} {'-' if recs is None else int(recs)!s:>9} "
                f"{fmt_bytes(v.get('applied_bytes') or 0):>11} {_ago(v.get('last_event_ts')):>12} {_ago(v.get('last_verified')):>12} "
                f"{_int(v, 'drift_files')!s:>6} {_int(v, 'quarantined')!s:>7}"
            )
    else:
        lines.append(f"source agent on {st.get('host')}, topic {st.get('topic')}, Kafka {conn}")
        lines.append(f"{'VOLUME':<20} {'PENDING':>8} {'LAST SEQ':>9} {'LAST PUBLISHED':>15}  SYNC")
        for name, v in sorted(st.get("volumes", {}).items()):
            sync = v.get("sync") or {}
            s = "done"
            if sync.get("active"):
                s = sync_text(sync)
            lines.append(f"{name:<20} {v.get('pending_files')!s:>8} {v.get('last_seq')!s:>9} {_ago(v.get('last_published')):>15}  {s}")
    for x in verdict.values():
        if not x.protected:
            note = "" if x.counts else " (another site's responsibility: not counted in the exit code)"
            lines.append(f"  {x.volume}: not protected{note}: {', '.join(x.reasons)}")
    if st.get("agent") == "mirror" and not any(x.counts for x in verdict.values()):
        lines.append("  no volume to protect: nothing announced or received at this site yet")
    return "\n".join(lines)


def sync_text(sync: dict[str, Any]) -> str:
    """'1,234/10,000 files, 12.0 MiB/97.7 MiB, 8.9 MiB/s, ETA 12 s' from a progress snapshot."""
    eta = sync.get("eta_seconds")
    eta_s = "ETA n/a" if eta is None else f"ETA {eta:.0f} s" if eta < 120 else f"ETA {eta / 60:.0f} min" if eta < 7200 else f"ETA {eta / 3600:.1f} h"
    return (f"{sync['files_done']:,}/{sync['files_total']:,} files, {fmt_bytes(sync['bytes_done'])}/{fmt_bytes(sync['bytes_total'])}, "
            f"{fmt_bytes(sync.get('rate_bytes_per_s') or 0)}/s, {eta_s}")


def _vol_part(name: str, v: dict[str, Any], x: Verdict) -> str:
    lag = v.get("lag_seconds")
    prot = "yes" if x.protected else f"NO ({x.reasons[0]})"
    return f"{name}: protected {prot}, drift {_int(v, 'drift_files')}, lag {'n/a' if lag is None else f'{lag:.1f}s'}"


def one_line(st: dict[str, Any], site_volumes: tuple[str, ...] = ()) -> str:
    vols = st.get("volumes", {})
    if st.get("agent") == "mirror":
        lags = [v["lag_seconds"] for v in vols.values() if v.get("lag_seconds") is not None]
        recs = sum(int(v.get("lag_records") or 0) for v in vols.values())
        nbytes = sum(v.get("applied_bytes") or 0 for v in vols.values())
        files = sum(int(v.get("files_applied") or 0) for v in vols.values())
        lag = f"{max(lags):.1f}s" if lags else "n/a"
        head = f"mirror: lag {lag} / {recs} rec, applied {fmt_bytes(nbytes)} in {files} file update(s)"
        per = [_vol_part(x.volume, vols[x.volume], x) for x in verdicts(st, site_volumes)]
        return "; ".join([head, *per]) if per else head + "; no volumes yet"
    pend = sum(int(v.get("pending_files") or 0) for v in vols.values())
    syncs = [v["sync"] for v in vols.values() if (v.get("sync") or {}).get("active")]
    bad = [f"{x.volume}: {x.reasons[0]}" for x in verdicts(st) if not x.protected]
    tail = "".join(f"; {b}" for b in bad)
    if syncs:
        tot = {k: sum(x[k] or 0 for x in syncs) for k in ("files_done", "files_total", "bytes_done", "bytes_total", "rate_bytes_per_s")}
        tot["eta_seconds"] = max((x["eta_seconds"] for x in syncs if x.get("eta_seconds") is not None), default=None)
        return f"source: initial sync {sync_text(tot)}, {pend} pending{tail}"
    return f"source: {pend} file(s) pending{tail}"


def _site_volumes(cfg: Config) -> tuple[str, ...]:
    return tuple(cfg.mirror.volumes) if cfg.mirror is not None else ()


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
    sv = _site_volumes(cfg)
    if as_json:
        print(json.dumps({**st, "stale": stale}, indent=2, sort_keys=True))
        for p in problems(st, sv):  # the text view has them under its table
            print(f"volmirror: {p}", file=sys.stderr)
    else:
        if stale:
            print(f"STALE: last snapshot written {_ago(st.get('written_at'))}")
        print(render(st, sv))
    return exit_code(st, stale=stale, site_volumes=sv)


def _watch(cfgs: list[Config]) -> int:
    try:
        while True:
            parts = []
            for cfg in cfgs:
                try:
                    parts.append(one_line(fetch(cfg, timeout=1.0), _site_volumes(cfg)))
                except (OSError, urllib.error.URLError, ValueError):
                    parts.append(f"agent at {cfg.metrics.listen} not reachable")
            text = time.strftime("%H:%M:%S ") + " | ".join(parts)
            sys.stdout.write("\r\x1b[K" + text)
            sys.stdout.flush()
            time.sleep(1.0)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return EXIT_OK
