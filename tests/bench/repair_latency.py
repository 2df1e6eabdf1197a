"""Bench: one-byte corruption on the mirror → detected → repaired, with default settings.

Usage: .venv/bin/python tests/bench/repair_latency.py [--mib 512] [--rounds 3]
Starts its own single-node Kafka on free loopback ports, a source and a mirror agent with default
scrub rate (64 MiB/s) and checkpoint settings, fills a volume with N MiB in 64 files, then per round
flips one byte (mtime preserved: bit rot) in a random file and measures detection and repair time.
Detection waits for the scrubber to reach the file, so it ranges from ~0 to volume/64 MiB/s.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.harness import Broker, Setup, wait_converged, wait_for  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    broker = Broker(prefix="vm-bench-kafka-")
    tmp = Path(tempfile.mkdtemp(prefix="vm-bench-"))
    s = Setup(tmp, broker.bootstrap, f"bench.{os.getpid()}", source_extra={"heartbeat_interval": 5.0})
    try:
        v = s.src["vol1"]
        per = args.mib * 2**20 // 64
        for i in range(64):
            (v / f"f{i:02d}.bin").write_bytes(os.urandom(per))
        s.source.start()
        m = s.add_mirror().start()
        t0 = time.monotonic()
        wait_converged(v, s.mirror_path(), timeout=600, agents=[s.source, m])
        print(f"initial sync of {args.mib} MiB: {time.monotonic() - t0:.1f} s")
        wait_for(lambda: m.metric("volmirror_scrub_last_pass_timestamp_seconds", volume="vol1") > 0, 120, "first scrub pass")
        det, rep = [], []
        for r in range(args.rounds):
            c0 = m.metric("volmirror_drift_detected_total", volume="vol1", kind="content")
            f = s.mirror_path() / f"f{random.randrange(64):02d}.bin"
            st = os.stat(f)
            with open(f, "r+b") as fh:
                off = random.randrange(per)
                fh.seek(off)
                b = fh.read(1)
                fh.seek(off)
                fh.write(bytes([b[0] ^ 0xFF]))
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
            t = time.monotonic()
            wait_for(lambda: m.metric("volmirror_drift_detected_total", volume="vol1", kind="content") > c0, 120, "detection", 0.02)
            det.append(time.monotonic() - t)
            wait_for(lambda: m.metric("volmirror_drift_files", volume="vol1") == 0, 120, "repair", 0.02)
            rep.append(time.monotonic() - t)
            print(f"round {r + 1}: {f.name} offset {off}: detected {det[-1]:.2f} s, repaired {rep[-1]:.2f} s")
        wait_converged(v, s.mirror_path(), timeout=60, agents=[s.source, m])
        print(f"volume {args.mib} MiB, scrub 64 MiB/s (default): detection median {statistics.median(det):.2f} s "
              f"(max {max(det):.2f}), repair median {statistics.median(rep):.2f} s (max {max(rep):.2f}); "
              f"expected worst case for detection ~{args.mib / 64:.1f} s (one pass)")
    finally:
        s.stop_all()
        broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
