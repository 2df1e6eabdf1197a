"""Torn-read detection at the disk edge, and the pure reconcile planner."""

import os

import pytest

from daemon.errors import FileChangedError
from daemon.store.source_index import DIR, FILE, Entry
from daemon.source import reader
from daemon.source.reader import ReadResult, Stat, lstat, read_file
from daemon.source.scanner import plan, walk

BS = 16384


def test_read_reports_changed_blocks_only(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"a" * BS + b"b" * BS + bytes(BS))
    res = ReadResult(before=lstat(str(p)))
    segs = list(read_file(str(p), BS, None, res))
    changed = [(b.index, b.zero) for s in segs for b, _, _ in s.changed]
    assert changed == [(0, False), (1, False), (2, True)]
    known = bytes(res.hashes)
    with open(p, "r+b") as f:
        f.seek(BS + 1)
        f.write(b"X")
    res2 = ReadResult(before=lstat(str(p)))
    segs = list(read_file(str(p), BS, known, res2))
    assert [b.index for s in segs for b, _, _ in s.changed] == [1]
    assert sum(s.unchanged for s in segs) == 2


def test_torn_read_is_detected(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "SEGMENT_BYTES", BS)
    monkeypatch.setattr(reader, "WINDOW_BYTES", BS)
    p = tmp_path / "f"
    p.write_bytes(os.urandom(4 * BS))
    res = ReadResult(before=lstat(str(p)))
    gen = read_file(str(p), BS, None, res)
    next(gen)  # first segment read and checked
    with open(p, "r+b") as f:  # the file changes while we are reading it
        f.seek(3 * BS)
        f.write(b"changed!")
    with pytest.raises(FileChangedError):
        list(gen)


def test_file_replaced_before_open(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 10)
    before = lstat(str(p))
    p.unlink()
    p.write_bytes(b"y" * 10)
    with pytest.raises(FileChangedError):
        list(read_file(str(p), BS, None, ReadResult(before=before)))


def st(kind, ino, size=0, mtime=0, mode=0o644):
    return Stat(kind, size, mtime, mtime, ino, mode)


def test_plan_new_changed_vanished():
    disk = {"a": st("f", 1, 10, 5), "b": st("f", 2, 10, 5), "d": st("d", 3, mode=0o755)}
    idx = {"a": Entry("a", FILE, 10, 5, 1, 0o644), "b": Entry("b", FILE, 11, 5, 2, 0o644), "gone": Entry("gone", FILE, 1, 1, 99, 0o644)}
    p = plan(disk, {}, idx)
    assert p.renames == []
    assert p.dirty == ["b", "d", "gone"]


def test_plan_detects_offline_renames():
    disk = {"new": st("f", 7, 100, 9), "D2": st("d", 8, mode=0o755), "D2/x": st("f", 9, 5, 1)}
    idx = {
        "old": Entry("old", FILE, 100, 9, 7, 0o644),
        "D1": Entry("D1", DIR, 0, 0, 8, 0o755),
        "D1/x": Entry("D1/x", FILE, 5, 1, 9, 0o644),
    }
    p = plan(disk, {}, idx)
    assert sorted(p.renames) == [("D1", "D2"), ("old", "new")]
    assert p.dirty == []  # nothing left to send: the renames cover it
    assert p.new_bytes == 0


def test_plan_rename_with_changed_content_is_not_a_rename():
    disk = {"new": st("f", 7, 200, 10)}
    idx = {"old": Entry("old", FILE, 100, 9, 7, 0o644)}
    p = plan(disk, {}, idx)
    assert p.renames == [] and sorted(p.dirty) == ["new", "old"]


def test_walk_respects_excludes(tmp_path):
    (tmp_path / "keep").write_text("x")
    (tmp_path / "skip.swp").write_text("x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "big").write_text("x")
    os.symlink("keep", tmp_path / "link")
    w = walk(str(tmp_path), lambda rel: rel.endswith(".swp") or rel == ".cache" or rel.startswith(".cache/"))
    assert sorted(w.disk) == ["keep", "link"]
    assert w.targets == {"link": "keep"}
    assert w.unprotected == {}


@pytest.mark.parametrize("size", [5 * BS, 7 * BS + 123, 9 * BS - 1])
def test_windowed_read_matches_the_pure_split(tmp_path, monkeypatch, size):
    """The two halves of each window are read in two threads: the hashes, the changed blocks and
    their payloads are exactly what the pure block split of the whole content gives, new or not."""
    from daemon.blocks import split

    monkeypatch.setattr(reader, "WINDOW_BYTES", 3 * BS)  # odd block count: uneven halves, several windows
    content = bytearray(os.urandom(size))
    content[2 * BS : 3 * BS] = bytes(BS)  # a zero block
    p = tmp_path / "f"
    p.write_bytes(content)
    want = [(b, bytes(d)) for b, d in split(bytes(content), BS)]
    res = ReadResult(before=lstat(str(p)))
    got = [c for s in read_file(str(p), BS, None, res) for c in s.changed]
    assert bytes(res.hashes) == b"".join(b.hash for b, _ in want)
    assert [(b, d, z) for b, d, z in got] == [(b, b"" if b.zero else d, "") for b, d in want]
    assert res.bytes_read == size and res.zero_changed == 1
    known = bytes(res.hashes)
    for off in (0, 4 * BS + 7, size - 1):  # first block, one in a second half, the last
        content[off] ^= 0xFF
    p.write_bytes(content)
    res2 = ReadResult(before=lstat(str(p)))
    segs = list(read_file(str(p), BS, known, res2))
    changed = [(b.index, d) for s in segs for b, d, _ in s.changed]
    want_idx = sorted({0, (4 * BS + 7) // BS, (size - 1) // BS})
    assert [i for i, _ in changed] == want_idx
    assert all(d == bytes(content[i * BS : (i + 1) * BS]) for i, d in changed)
    assert sum(s.unchanged for s in segs) + len(changed) == -(-size // BS)


def test_a_file_that_shrinks_during_the_read_is_torn(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "SEGMENT_BYTES", BS)
    monkeypatch.setattr(reader, "WINDOW_BYTES", 2 * BS)
    p = tmp_path / "f"
    p.write_bytes(os.urandom(8 * BS))
    gen = read_file(str(p), BS, None, ReadResult(before=lstat(str(p))))
    next(gen)
    os.truncate(p, 3 * BS)
    with pytest.raises(FileChangedError):
        list(gen)
