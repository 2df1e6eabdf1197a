"""Baseline (no fault) and fault cases 1, 2, 10, 11: agents SIGKILLed under load, a directory's metadata changed under 2,500
files, a 3,000-file tree copied in. None of these may cost a repair request: the stream alone must
bring the mirror back, and the mirror may never lose a file the source still has."""

from __future__ import annotations

import os
import random
import subprocess
import time

import pytest

from ..harness import wait_for
from .faultlib import KiB, VolumeSpec, log

pytestmark = [pytest.mark.kafka, pytest.mark.faults, pytest.mark.timeout(900)]


def test_00_baseline_workload_only(fault_case):
    """No fault: the same volume and workload. Whatever fails here is not caused by a fault, and the
    other cases' numbers are read against this one."""
    c = fault_case("00_baseline_workload_only")
    c.start()
    c.start_workload()
    c.fault_begin("none (baseline: workload only, 30 s)")
    time.sleep(30)
    c.fault_end()
    c.finish(settle=5)


def test_01_source_sigkill_x5(fault_case):
    c = fault_case("01_source_sigkill_x5")
    c.start()
    c.start_workload()
    time.sleep(5)
    c.fault_begin("source SIGKILL x5, restarted each time")
    rng = random.Random(1)
    for i in range(5):
        time.sleep(rng.uniform(3, 6))
        pub = sum(c.source.metric("volmirror_source_published_events_total", volume="vol1", op=op) for op in ("manifest", "file"))
        c.source.kill()
        log(f"source SIGKILLed ({i + 1}/5) after {pub:.0f} files (manifest or file records) in this run")
        time.sleep(1.0)
        c.source.start()
    c.fault_end()
    c.finish(settle=10)


def test_02_mirror_sigkill_x5_mid_apply(fault_case):
    c = fault_case("02_mirror_sigkill_x5_mid_apply")
    c.start(wait_sync=False)
    c.fault_begin("mirror SIGKILL x5: 2 during the initial sync, 3 under the workload")

    def applied() -> float:
        return sum(c.mirror.metric("volmirror_mirror_applied_events_total", volume="vol1", op=op) for op in ("manifest", "file"))

    kills = 0
    for target in (300, 300):  # manifests applied by this incarnation before the kill
        try:
            wait_for(lambda: applied() >= target, 60, f"the mirror applying {target} files of the initial sync")
        except AssertionError as e:
            c.notes.append(f"kill {kills + 1}: {e} (applied {applied():.0f}); killed anyway")
            log(c.notes[-1])
        c.mirror.kill()
        kills += 1
        log(f"mirror SIGKILLed during the initial sync ({kills}/5)")
        time.sleep(0.5)
        c.mirror.start()
    c.wait_initial_sync()
    c._phase = "fault:mirror SIGKILL under workload"
    c.start_workload()
    rng = random.Random(2)
    for _ in range(3):
        time.sleep(rng.uniform(3, 6))
        def data_records() -> float:  # blocks of large files, whole small files
            return sum(c.mirror.metric("volmirror_mirror_applied_events_total", volume="vol1", op=op) for op in ("block", "file"))

        base = data_records()
        wait_for(lambda: data_records() > base, 30, "the mirror applying data records")
        c.mirror.kill()
        kills += 1
        log(f"mirror SIGKILLed mid-apply ({kills}/5)")
        time.sleep(0.5)
        c.mirror.start()
    c.fault_end()
    c.finish(settle=10)


def test_10_chmod_and_touch_dir_of_2500_files(fault_case):
    c = fault_case("10_chmod_touch_dir_2500_files", spec=VolumeSpec(small_files=3000, big_dir=("bigdir", 2500)))
    c.start()
    c.start_workload()
    time.sleep(5)
    d = c.src() / "bigdir"
    c.fault_begin("chmod 750 + touch of a directory holding 2,500 files")
    os.chmod(d, 0o750)
    os.utime(d)
    time.sleep(10)
    os.utime(d, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    time.sleep(5)
    os.chmod(d, 0o700)
    os.utime(d)
    time.sleep(10)
    c.fault_end()
    c.finish(settle=5)


def test_11_cp_r_of_3000_files_while_running(fault_case, tmp_path):
    c = fault_case("11_cp_r_3000_files")
    tree_src = tmp_path / "to-copy" / "project"
    for i in range(3000):
        p = tree_src / f"m{i // 100:02d}" / f"n{i:05d}.dat"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(random.randint(1 * KiB, 6 * KiB)))
    c.start()
    c.start_workload()
    time.sleep(5)
    c.fault_begin("cp -r of a 3,000-file tree into the volume")
    t = time.monotonic()
    subprocess.run(["cp", "-r", str(tree_src), str(c.src() / "copied")], check=True)
    log(f"cp -r took {time.monotonic() - t:.1f} s")
    time.sleep(5)
    c.fault_end()
    c.finish(settle=5)
