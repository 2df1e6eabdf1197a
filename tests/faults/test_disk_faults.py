"""Fault cases 6, 7, 9: a full file system under the mirror's root, the mirror's state_dir and the
source's state_dir (each on its own small tmpfs, filled to the last byte and inode, then freed).
Local failures are retried from the failed record (or the last durable point), never skipped, so
none of these may need a repair request, and the mirror may never delete what it already has."""

from __future__ import annotations

import time

import pytest

from .faultlib import Tmpfs, log

pytestmark = [pytest.mark.kafka, pytest.mark.faults, pytest.mark.timeout(900)]

FULL_SECONDS = 20


def _full(c, fs: Tmpfs, what: str) -> None:
    c.fault_begin(f"{what} full for {FULL_SECONDS} s, then freed")
    n = fs.fill()
    used, size = fs.usage()
    log(f"{c.name}: filled {what} with {n} bytes ({used}/{size} used)")
    c.extra_report["fs"] = {"size": size, "filler_bytes": n}
    time.sleep(FULL_SECONDS)
    fs.free()
    c.fault_end()


def test_06_mirror_disk_full_then_freed(fault_case, tmp_path):
    c = fault_case("06_mirror_disk_full_then_freed", mirror_root=tmp_path / "mirror-fs" / "root")
    fs = Tmpfs(tmp_path / "mirror-fs", "64m")
    c.cleanups.append(fs.close)
    c.start()
    c.start_workload()
    time.sleep(5)
    _full(c, fs, "the mirror root's file system")
    c.finish(settle=10)


def test_07_mirror_state_dir_full_then_freed(fault_case, tmp_path):
    c = fault_case("07_mirror_state_dir_full_then_freed", mirror_state=tmp_path / "mstate-fs" / "state")
    fs = Tmpfs(tmp_path / "mstate-fs", "24m")
    c.cleanups.append(fs.close)
    c.start()
    c.start_workload()
    time.sleep(5)
    _full(c, fs, "the mirror's state_dir")
    c.finish(settle=10)


def test_09_source_state_dir_full_then_freed(fault_case, tmp_path):
    c = fault_case("09_source_state_dir_full_then_freed", source_state=tmp_path / "sstate-fs" / "state")
    fs = Tmpfs(tmp_path / "sstate-fs", "24m")
    c.cleanups.append(fs.close)
    c.start()
    c.start_workload()
    time.sleep(5)
    _full(c, fs, "the source's state_dir")
    c.finish(settle=10)
