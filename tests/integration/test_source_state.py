"""The source owns its state, on the real broker: a full state_dir (a real tmpfs) is reported and
recovered from without losing a change; what cannot be replicated is skipped, counted and announced,
and never stops the other volumes."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ..harness import tree, wait_converged, wait_for

pytestmark = pytest.mark.kafka
FILES = 3000


def make_files(root: Path, n: int, prefix: str = "f", size: int = 200) -> None:
    for i in range(n):
        d = root / f"{prefix}{i // 500:02d}"
        d.mkdir(exist_ok=True)
        (d / f"{prefix}{i:05d}.txt").write_bytes(os.urandom(size + i % 97))


def fill(dirpath: Path) -> Path:
    """Fill the file system of dirpath completely with one file; returns it."""
    p = dirpath / "filler"
    chunk = b"\0" * (64 * 1024)
    with open(p, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    small = b"\0" * 512
    with open(p, "ab", buffering=0) as f:  # the last partial pages too
        try:
            while True:
                f.write(small)
        except OSError:
            pass
    return p


@pytest.fixture
def tmpfs_state(tmp_path):
    state = tmp_path / "state-src"  # the harness's source state_dir
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(state)], check=True)
    stops: list = []
    try:
        yield state, stops
    finally:
        for stop in stops:
            stop()  # agents first: they hold files open in the mount
        r = subprocess.run(["umount", str(state)], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(state)], check=False)


def test_full_state_dir_is_reported_and_recovered(setup_factory, tmpfs_state, record_property):
    state, stops = tmpfs_state
    s = setup_factory(source_extra={"checkpoint_interval": 5.0, "announce_interval": 1.0})
    stops.append(s.stop_all)
    v = s.src["vol1"]
    make_files(v, FILES)
    t0 = time.monotonic()
    s.source.start()
    m = s.add_mirror(scrub_rate_mib=0).start()
    agents = [s.source, m]
    wait_converged(v, s.mirror_path(), timeout=180, agents=agents)
    record_property("initial_sync_seconds", round(time.monotonic() - t0, 1))
    assert (state / "index-vol1.sqlite").exists() and not (state / "index.sqlite").exists()
    pid = s.source.proc.pid
    assert s.source.metric("volmirror_source_state_ok", volume="vol1") == 1

    filler = fill(state)
    t_full = time.monotonic()
    # changes while state_dir is full: new files, modified files, deleted files, a rename
    make_files(v, FILES, prefix="n", size=300)
    for i in range(0, 500, 5):
        (v / "f00" / f"f{i:05d}.txt").write_bytes(b"modified while the disk was full %d" % i)
    for i in range(500, 600):
        (v / "f01" / f"f{i:05d}.txt").unlink()
    os.rename(v / "f02", v / "f02-renamed")

    wait_for(lambda: s.source.metric("volmirror_source_state_ok", volume="vol1") == 0, 60, "state_ok 0 while state_dir is full")
    wait_for(lambda: s.source.metric("volmirror_source_errors_total", volume="vol1", kind="state") >= 2, 60, "state errors counted (retried)")
    st = s.source.status()["volumes"]["vol1"]
    assert st["state_ok"] is False and str(state) in st["state_error"]
    assert s.source.status()["state_ok"] is False
    logs = [r for r in s.source.log_records() if r.get("event") == "state_error"]
    assert logs and all(r.get("path") == str(state) for r in logs)
    assert any("index-vol1.sqlite" in r.get("msg", "") and "full" in r.get("msg", "") for r in logs)
    full_for = time.monotonic() - t_full
    time.sleep(max(0.0, 8.0 - full_for))  # a few retries while full: none may crash the agent
    assert s.source.proc.poll() is None and s.source.proc.pid == pid

    filler.unlink()
    t_free = time.monotonic()
    took = wait_converged(v, s.mirror_path(), timeout=180, agents=agents)
    wait_for(lambda: s.source.metric("volmirror_source_state_ok", volume="vol1") == 1, 30, "state_ok back to 1")
    wait_for(lambda: s.source.status()["volumes"]["vol1"]["in_doubt_paths"] == 0, 60, "no path left in doubt")
    assert s.source.status()["volumes"]["vol1"]["state_error"] is None
    assert s.source.proc.pid == pid  # recovered in place, no restart
    record_property("recovery_after_space_returned_seconds", round(time.monotonic() - t_free, 1))
    print(f"\nfull state_dir: {len(logs)} state error log line(s); converged {took:.1f} s after space returned")

    # the recovered index is complete: a restarted source finds nothing to resend
    s.source.stop()
    def files_applied() -> float:
        return sum(m.metric("volmirror_mirror_applied_events_total", volume="vol1", op=op) for op in ("manifest", "file"))

    def settled() -> bool:
        # records the source sent before it stopped (paths in doubt are re-sent in full after the
        # failed batches) may still be on their way to the mirror: count only what comes after them
        a = files_applied()
        time.sleep(1.0)
        return files_applied() == a and m.metric("volmirror_mirror_consumer_lag_records", volume="vol1") == 0

    wait_for(settled, 60, "the mirror applied everything the source published before it stopped")
    ev0 = files_applied()
    s.source.start()
    (v / "after-restart.txt").write_text("one more")
    wait_converged(v, s.mirror_path(), timeout=60, agents=agents)
    resent = files_applied() - ev0
    assert resent <= 5, f"{resent} manifests re-sent after a clean restart"


def _deep_tree(root: Path, depth: int = 25) -> str:
    """A chain of 200-byte directory names deeper than PATH_MAX; returns the top name."""
    name = "d" * 200
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("below PATH_MAX")
    finally:
        os.close(fd)
    return name


def _replicable(root: Path, deep: str) -> dict:
    """harness.tree of everything but the deep tree (os.walk cannot lstat it) and the bad name."""
    out: dict = {}
    if not root.exists():
        return out
    for child in root.iterdir():
        if child.name == deep or "\udcff" in child.name:
            continue
        assert child.is_dir(), child  # make_files only makes directories at the top
        out[child.name] = ("d", child.stat().st_mode & 0o7777)
        out.update({f"{child.name}/{k}": v for k, v in tree(child).items()})
    return out


def test_unreplicable_paths_are_skipped_counted_and_announced(setup_factory, tmp_path):
    s = setup_factory(volumes=("vol1", "vol2"), source_extra={"announce_interval": 1.0, "checkpoint_interval": 5.0})
    v1, v2 = s.src["vol1"], s.src["vol2"]
    make_files(v1, FILES)
    make_files(v2, 50)
    deep = _deep_tree(v1)
    with open(os.path.join(os.fsencode(v1), b"bad\xffname.txt"), "wb") as f:
        f.write(b"a name that is not UTF-8")
    s.source.start()
    m = s.add_mirror(scrub_rate_mib=0).start()
    agents = [s.source, m]
    wait_converged(v2, s.mirror_path("vol2"), timeout=120, agents=agents)  # the other volume is not held up
    deadline = time.monotonic() + 180
    while _replicable(v1, deep) != _replicable(s.mirror_path("vol1"), deep):
        assert time.monotonic() < deadline, "vol1 did not converge"
        assert s.source.proc.poll() is None
        time.sleep(0.5)

    wait_for(lambda: s.source.metric("volmirror_source_unprotected_paths", volume="vol1") == 2, 30, "2 unprotected paths at the source")
    assert s.source.metric("volmirror_source_unprotected_paths", volume="vol2") == 0
    st = s.source.status()["volumes"]
    assert st["vol1"]["unprotected_paths"] == 2 and st["vol2"]["unprotected_paths"] == 0
    assert st["vol1"]["unprotected_by_reason"] == {"name_too_long": 1, "not_utf8": 1}
    wait_for(lambda: m.metric("volmirror_mirror_unprotected_paths", volume="vol1") == 2, 30, "the mirror learns it from announce")
    assert not list(s.mirror_path("vol1").glob("bad*"))
    recs = [r for r in s.source.log_records() if r.get("level") in ("ERROR", "error") and "cannot replicate" in r.get("msg", "")]
    assert any(r.get("path", "").startswith(deep) for r in recs)

    # removing the bad name clears it at the next scan (here: a restart, whose start-up scan counts anew)
    os.unlink(os.path.join(os.fsencode(v1), b"bad\xffname.txt"))
    shutil.rmtree(v1 / deep, ignore_errors=True)
    s.source.stop()
    s.source.start()
    wait_for(lambda: s.source.metric("volmirror_source_unprotected_paths", volume="vol1") == 0, 60, "unprotected back to 0")
