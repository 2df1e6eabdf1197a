"""One status line for `make run` from the agents' /status JSON endpoints (standard library only).

Usage: python3 deploy/demo/statusline.py [--source 127.0.0.1:9464] [--mirror 127.0.0.1:9465]

Prints e.g. ``lag 0.4s/0 rec | applied 48.2 MiB, 53 file update(s) | 0 pending | protected: no (not
verified recently)`` and exits 0; an agent that does not answer is shown as "not reachable" (exit 1).
deploy/demo/run.sh uses it when there is no terminal to redraw ``volmirror status --watch`` on.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from typing import Any


def fetch(addr: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://{addr}/status", timeout=1.5) as r:  # noqa: S310 - local agent
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def mirror_part(st: dict[str, Any] | None, addr: str) -> str:
    if st is None:
        return f"mirror not reachable at {addr}"
    vols = (st.get("volumes") or {}).values()
    lags = [v["lag_seconds"] for v in vols if v.get("lag_seconds") is not None]
    recs = sum(int(v.get("lag_records") or 0) for v in vols)
    nbytes = sum(float(v.get("applied_bytes") or 0) for v in vols)
    files = sum(int(v.get("files_applied") or 0) for v in vols)
    lag = f"{max(lags):.1f}s" if lags else "n/a"
    prot = [v for v in vols if v.get("protected")]
    why = sorted({r for v in vols for r in (v.get("why_not_protected") or [])})
    protected = "yes" if vols and len(prot) == len(vols) else "no" + (f" ({', '.join(why)})" if why else "")
    kafka = "" if st.get("kafka_connected") else " | mirror: Kafka DISCONNECTED"
    return f"lag {lag}/{recs} rec | applied {fmt_bytes(nbytes)}, {files} file update(s) | protected: {protected}{kafka}"


def source_part(st: dict[str, Any] | None, addr: str) -> str:
    if st is None:
        return f"source not reachable at {addr}"
    vols = (st.get("volumes") or {}).values()
    pending = sum(int(v.get("pending_files") or 0) for v in vols)
    syncs = [v["sync"] for v in vols if (v.get("sync") or {}).get("active")]
    out = f"{pending} pending"
    if syncs:
        done = sum(float(s.get("bytes_done") or 0) for s in syncs)
        total = sum(float(s.get("bytes_total") or 0) for s in syncs)
        fdone = sum(int(s.get("files_done") or 0) for s in syncs)
        ftotal = sum(int(s.get("files_total") or 0) for s in syncs)
        rate = sum(float(s.get("rate_bytes_per_s") or 0) for s in syncs)
        etas = [float(s["eta_seconds"]) for s in syncs if s.get("eta_seconds") is not None]
        eta = f"ETA {max(etas):.0f} s" if etas else "ETA n/a"
        out += f", initial sync {fdone}/{ftotal} files, {fmt_bytes(done)}/{fmt_bytes(total)}, {fmt_bytes(rate)}/s, {eta}"
    if not st.get("kafka_connected"):
        out += ", source: Kafka DISCONNECTED"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="127.0.0.1:9464", metavar="HOST:PORT")
    ap.add_argument("--mirror", default="127.0.0.1:9465", metavar="HOST:PORT")
    a = ap.parse_args()
    src, mir = fetch(a.source), fetch(a.mirror)
    print(f"{mirror_part(mir, a.mirror)} | {source_part(src, a.source)}", flush=True)
    return 0 if src is not None and mir is not None else 1


if __name__ == "__main__":
    sys.exit(main())
