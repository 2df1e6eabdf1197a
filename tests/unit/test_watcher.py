"""The watcher: which inotify events reach the source (real inotify on a temp dir, no broker)."""

import asyncio
import os

from daemon.source import watcher as W
from daemon.source.watcher import VolumeWatcher


async def _events(root, action, settle=0.4):
    got = []
    w = VolumeWatcher("v", str(root), lambda kind, src, dst, is_dir: got.append((kind, src, dst)))
    assert w.start(asyncio.get_running_loop())
    try:
        await asyncio.sleep(0.2)
        action()
        await asyncio.sleep(settle)
    finally:
        w.stop()
    return got


async def test_metadata_changes_content_changes_and_moves_are_reported(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"x")

    def act():
        os.chmod(tmp_path / "f", 0o600)
        os.utime(tmp_path / "d", ns=(1, 1))
        (tmp_path / "d" / "g").write_bytes(b"y")
        os.rename(tmp_path / "f", tmp_path / "d" / "f2")

    got = await _events(tmp_path, act)
    assert ("changed", "f", None) in got  # chmod (IN_ATTRIB)
    assert ("changed", "d", None) in got  # utime of a directory
    assert ("changed", "d/g", None) in got
    assert ("moved", "f", "d/f2") in got


async def test_reading_files_raises_no_events(tmp_path, monkeypatch):
    # the agent reads every file it publishes: those reads must not come back as work, and must
    # not even be asked of inotify (two events per file read, parsed on watchdog's threads)
    raw = []
    orig = W._Handler.on_any_event
    monkeypatch.setattr(W._Handler, "on_any_event", lambda self, ev: raw.append(ev.event_type) or orig(self, ev))
    for i in range(50):
        (tmp_path / f"f{i}").write_bytes(b"data")

    def act():
        for i in range(50):
            with open(tmp_path / f"f{i}", "rb") as f:
                f.read()
        os.listdir(tmp_path)

    assert await _events(tmp_path, act) == []
    assert raw == []
