"""What restore points cost, measured with real agents on a private broker (issue 9's figures):

1. the history's disk overhead of the latency workload (50 new small files per second, as in
   `run.py`'s latency scenario) for SECONDS seconds, extrapolated to a day;
2. the time to restore a 1 GiB volume (GIB) to the point taken before an hour of that workload
   (FILES = 50 × 3600 new files, written as fast as the source takes them), with the mirror running.

    SECONDS=60 FILES=180000 GIB=1 .venv/bin/python tests/bench/restore_cost.py

Prints the figures; nothing is written to the repository.
"""
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.harness import Broker, Setup, wait_converged, wait_for  # noqa: E402

SECONDS = float(os.environ.get("SECONDS_", os.environ.get("SECONDS", "60")))
FILES = int(os.environ.get("FILES", "180000"))
GIB = float(os.environ.get("GIB", "1"))


def history_bytes(d: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in d.rglob("*") if p.is_file())


def points(m) -> list:
    r = m.cli("points", "--volume", "vol1", "--json")
    return json.loads(r.stdout)["points"] if r.returncode == 0 else []


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="restore-cost-"))
    b = Broker()
    try:
        s = Setup(tmp, b.bootstrap, "rc.t")
        v = s.src["vol1"]
        n_big = max(1, int(GIB * 16))
        for i in range(n_big):
            with open(v / f"big{i:03d}.bin", "wb") as f:
                for _ in range(64):
                    f.write(os.urandom(1 << 20))
        (v / "live").mkdir()  # the workloads write into directories that exist at the point, as a live volume's would
        for i in range(FILES // 1000 + 1):
            (v / "hour" / f"d{i:03d}").mkdir(parents=True)
        m = s.add_mirror()
        m.log_level = s.source.log_level = "info"
        m.start()
        s.source.start()
        wait_converged(v, s.mirror_path(), timeout=600, agents=[s.source, m])
        p0 = wait_for(lambda: points(m), 60, "a restore point after the initial sync")[-1]
        hist = tmp / "state-mirror0" / "history" / "vol1"
        h0 = history_bytes(hist) if hist.exists() else 0

        # 1. the latency workload: 50 new small files per second
        t0 = time.time()
        n = 0
        while time.time() - t0 < SECONDS:
            (v / "live" / f"w{n:07d}.bin").write_bytes(os.urandom(random.randint(1024, 8192)))
            n += 1
            time.sleep(max(0.0, t0 + n / 50 - time.time()))
        wait_converged(v, s.mirror_path(), timeout=120, agents=[s.source, m])
        wait_for(lambda: points(m)[-1]["id"] > p0["id"], 60, "a point after the workload")
        h1 = history_bytes(hist)
        per_s = (h1 - h0) / SECONDS
        print(f"latency workload: {n} new files in {SECONDS:.0f} s; history grew {h1 - h0:,} bytes ({(h1 - h0) / n:.0f} per file); "
              f"a day: {per_s * 86400 / 2**20:,.0f} MiB", flush=True)

        # 2. an hour of it (as fast as the source takes it), then a restore to the point before it
        t1 = time.time()
        for i in range(FILES):
            d = v / "hour" / f"d{i // 1000:03d}"
            (d / f"f{i:07d}.bin").write_bytes(os.urandom(random.randint(1024, 8192)))
        wait_converged(v, s.mirror_path(), timeout=1800, agents=[s.source, m])
        wait_for(lambda: points(m)[-1]["time"] > t1, 120, "a point after the hour's files")
        h2 = history_bytes(hist)
        print(f"{FILES} more new files in {time.time() - t1:.0f} s; history now {h2:,} bytes", flush=True)
        dest = tmp / "restored"
        t = time.monotonic()
        r = m.cli("restore", "--volume", "vol1", "--to", str(dest), "--point", str(p0["id"]), "--json", timeout=3600)
        el = time.monotonic() - t
        rep = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {"error": r.stderr}
        print(f"restore of point {p0['id']} ({rep.get('files')} files, {rep.get('bytes', 0) / 2**30:.2f} GiB, "
              f"{rep.get('undone_entries')} entries undone): exit {r.returncode} in {el:.1f} s (report: {rep.get('seconds')} s), "
              f"unproven {rep.get('unproven')}", flush=True)
        s.stop_all()
    finally:
        b.stop()
        subprocess.run(["rm", "-rf", str(tmp)])


if __name__ == "__main__":
    main()
