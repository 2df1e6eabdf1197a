"""Applying ops to a directory tree: results, replay, conflicts, and never writing outside."""

import os

import pytest

from daemon import wire
from daemon.blocks import block_hash, zero_hash
from daemon.mirror.applier import Applier

BS = 16384


def mk(op, seq=1, **f):
    payload = f.pop("payload", b"")
    return wire.Event(op=op, vol="v", seq=seq, epoch="e", ts=1.0, fields=f, payload=payload)


def blk(path, off, data, size):
    return mk("block", path=path, off=off, len=len(data), hash=block_hash(data).hex(), size=size, zero=False, bs=BS, payload=data)


@pytest.fixture
def ap(tmp_path):
    a = Applier(tmp_path / "root")
    yield a
    a.close()


def run(ap, events):
    for e in events:
        ap.apply(e)
    ap.sync()


def test_file_written_with_metadata(ap, tmp_path):
    data = b"a" * BS + b"tail"
    evs = [
        mk("mkdir", path="d", mode=0o750),
        mk("truncate", path="d/f", size=len(data), bs=BS),
        blk("d/f", 0, data[:BS], len(data)),
        blk("d/f", BS, data[BS:], len(data)),
        mk("manifest", path="d/f", size=len(data), mode=0o640, mtime_ns=1_600_000_000_123_456_789, root="0" * 32, bs=BS),
    ]
    run(ap, evs)
    p = tmp_path / "root/v/d/f"
    assert p.read_bytes() == data
    st = os.stat(p)
    assert st.st_mode & 0o7777 == 0o640 and st.st_mtime_ns == 1_600_000_000_123_456_789
    assert os.stat(tmp_path / "root/v/d").st_mode & 0o7777 == 0o750


def test_zero_block_and_extension(ap, tmp_path):
    run(ap, [blk("f", 0, b"x" * BS, 2 * BS), mk("block", path="f", off=BS, len=BS, hash=zero_hash(BS).hex(), size=2 * BS, zero=True, bs=BS),
             mk("manifest", path="f", size=2 * BS, mode=0o644, mtime_ns=0, root="0" * 32, bs=BS)])
    assert (tmp_path / "root/v/f").read_bytes() == b"x" * BS + bytes(BS)


def test_replay_gives_same_state(ap, tmp_path):
    evs = [
        mk("mkdir", path="p", mode=0o755),
        blk("p/x", 0, b"one", 3),
        mk("manifest", path="p/x", size=3, mode=0o644, mtime_ns=5, root="0" * 32, bs=BS),
        mk("delete", path="p/x"),
        mk("rmtree", path="p"),
        blk("p", 0, b"now a file", 10),
        mk("manifest", path="p", size=10, mode=0o600, mtime_ns=6, root="0" * 32, bs=BS),
        mk("symlink", path="l", target="p"),
    ]
    run(ap, evs)
    first = snapshot(tmp_path / "root")
    run(ap, evs)  # replay everything against the final state
    assert snapshot(tmp_path / "root") == first
    assert (tmp_path / "root/v/p").read_bytes() == b"now a file"
    assert os.readlink(tmp_path / "root/v/l") == "p"


def test_rename_is_idempotent(ap, tmp_path):
    run(ap, [blk("a", 0, b"data", 4), mk("rename", path="a", dst="b")])
    run(ap, [mk("rename", path="a", dst="b")])  # replayed after a crash: src gone, dst there
    assert (tmp_path / "root/v/b").read_bytes() == b"data"
    assert not (tmp_path / "root/v/a").exists()


def test_symlink_final_component_is_replaced_not_followed(ap, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    run(ap, [mk("symlink", path="evil", target=str(outside)), blk("evil", 0, b"pwned", 5)])
    assert outside.read_bytes() == b"precious"
    assert (tmp_path / "root/v/evil").read_bytes() == b"pwned"
    assert not os.path.islink(tmp_path / "root/v/evil")


def snapshot(root):
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            if os.path.islink(p):
                out[p] = ("l", os.readlink(p))
            elif os.path.isdir(p):
                out[p] = ("d", st.st_mode)
            else:
                out[p] = ("f", st.st_mode, st.st_mtime_ns, open(p, "rb").read())
    return out


def test_file_removed_behind_an_open_descriptor_is_recreated(ap, tmp_path):
    ap.apply(blk("f", 0, b"first", 5))  # descriptor stays cached until sync()
    (tmp_path / "root/v/f").unlink()  # someone deletes it on the mirror host
    ap.apply(blk("f", 0, b"again", 5))
    ap.sync()
    assert (tmp_path / "root/v/f").read_bytes() == b"again"


def test_rename_onto_a_non_empty_directory_merges_never_deletes(ap, tmp_path):
    # a source whose index is behind the stream (crash after send) renames onto a directory the
    # stream already filled: nothing that was at dst may disappear
    run(ap, [mk("mkdir", path="old", mode=0o755), blk("old/a", 0, b"A", 1), blk("old/same", 0, b"S1", 2),
             mk("mkdir", path="new", mode=0o755), blk("new/b", 0, b"B", 1), blk("new/same", 0, b"S2", 2)])
    run(ap, [mk("rename", path="old", dst="new")])
    root = tmp_path / "root" / "v"
    assert not (root / "old").exists()
    assert sorted(os.listdir(root / "new")) == ["a", "b", "same"]
    assert (root / "new" / "same").read_bytes() == b"S1"  # the renamed entry wins a name clash


def _files(n):
    evs = []
    for i in range(n):
        data = b"%d" % i
        evs += [mk("truncate", path=f"d/f{i}", size=len(data), bs=BS), blk(f"d/f{i}", 0, data, len(data))]
    return evs


def test_sync_is_one_syncfs_per_file_system_not_one_fsync_per_file(tmp_path, monkeypatch):
    import daemon.mirror.applier as A

    calls, fsyncs = [], []
    monkeypatch.setattr(A, "_SYNCFS", lambda fd: calls.append(os.fstat(fd).st_dev) or 0)
    monkeypatch.setattr(A.os, "fsync", lambda fd: fsyncs.append(fd))
    a = Applier(tmp_path / "root", syncfs=True)
    try:
        run(a, _files(A.MAX_OPEN * 3))  # descriptors evicted on the way: no fsync for them either
        a.apply(mk("mkdir", path="other", mode=0o755))
        a.sync()
    finally:
        a.close()
    assert len(calls) == 2 and not fsyncs  # one per sync(), not per file
    assert len(os.listdir(tmp_path / "root" / "v" / "d")) == A.MAX_OPEN * 3


def test_a_failing_syncfs_is_an_apply_error(tmp_path, monkeypatch):
    import ctypes

    import daemon.mirror.applier as A

    def failing(fd):
        ctypes.set_errno(5)
        return -1

    monkeypatch.setattr(A, "_SYNCFS", failing)
    a = Applier(tmp_path / "root", syncfs=True)
    try:
        for e in _files(3):
            a.apply(e)
        with pytest.raises(A.ApplyError, match="syncfs") as ei:
            a.sync()
        assert ei.value.errno == 5
    finally:
        a.close()


def _big_file(n_blocks):
    data = os.urandom(BS)
    size = BS * n_blocks
    return [mk("truncate", path="big", size=size, bs=BS)] + [blk("big", i * BS, data, size) for i in range(n_blocks)]


def test_write_behind_starts_a_background_syncfs_and_sync_still_syncs(tmp_path, monkeypatch):
    """Every WRITE_BEHIND_BYTES applied, a syncfs runs on a helper thread; the durability point
    (sync) still makes its own, after waiting for the helper."""
    import threading

    import daemon.mirror.applier as A

    calls = []
    monkeypatch.setattr(A, "_SYNCFS", lambda fd: calls.append(threading.current_thread().name) or 0)
    monkeypatch.setattr(A, "WRITE_BEHIND_BYTES", 4 * BS)
    a = Applier(tmp_path / "root", syncfs=True)
    try:
        for e in _big_file(9):  # 9 blocks: write-behinds after the 4th and the 8th
            a.apply(e)
            if a._behind is not None:
                a._behind.result()  # let each finish, so none is skipped as still running
        behind = [c for c in calls if c.startswith("volmirror-write-behind")]
        assert len(behind) == 2 and len(calls) == 2
        a.sync()
        assert len(calls) == 3 and not calls[-1].startswith("volmirror-write-behind")
    finally:
        a.close()
    assert (tmp_path / "root" / "v" / "big").stat().st_size == 9 * BS


def test_an_error_met_by_the_write_behind_is_raised_by_the_next_sync_and_stays_until_cleared(tmp_path, monkeypatch):
    """syncfs reports a writeback error once per descriptor: if the helper thread saw it, the
    durability point must fail although its own syncfs succeeds, and so must every later one
    until the caller went back to its last durable point (a second sync would find nothing to
    report and let data that never reached the disk be recorded as durable)."""
    import ctypes
    import threading

    import daemon.mirror.applier as A

    helper_calls = []

    def syncfs(fd):
        if threading.current_thread().name.startswith("volmirror-write-behind"):
            helper_calls.append(fd)
            ctypes.set_errno(5)
            return -1
        return 0

    monkeypatch.setattr(A, "_SYNCFS", syncfs)
    monkeypatch.setattr(A, "WRITE_BEHIND_BYTES", 2 * BS)
    a = Applier(tmp_path / "root", syncfs=True)
    try:
        for e in _big_file(8):  # write-behinds due after blocks 2, 4, 6, 8: only the first runs
            a.apply(e)
            if a._behind is not None:
                a._behind.exception()  # wait for it: a later one must not replace a failed one
        assert len(helper_calls) == 1
        for _ in range(2):
            with pytest.raises(A.ApplyError, match="write-behind") as ei:
                a.sync()
            assert ei.value.errno == 5
        a.clear_failure()  # the agent re-reads from its last durable point and applies it again
        monkeypatch.setattr(A, "WRITE_BEHIND_BYTES", 1 << 40)
        for e in _big_file(3):
            a.apply(e)
        a.sync()
    finally:
        a.close()


def test_a_failed_syncfs_of_the_durability_point_is_sticky_too(tmp_path, monkeypatch):
    import ctypes

    import daemon.mirror.applier as A

    fail = [True]

    def syncfs(fd):
        if fail[0]:
            fail[0] = False  # reported once, as the kernel does
            ctypes.set_errno(5)
            return -1
        return 0

    monkeypatch.setattr(A, "_SYNCFS", syncfs)
    a = Applier(tmp_path / "root", syncfs=True)
    try:
        for e in _files(3):
            a.apply(e)
        for _ in range(2):
            with pytest.raises(A.ApplyError, match="syncfs"):
                a.sync()
        a.clear_failure()
        a.sync()
    finally:
        a.close()


def test_the_durability_point_waits_for_a_running_write_behind(tmp_path, monkeypatch):
    import threading

    import daemon.mirror.applier as A

    release, order = threading.Event(), []

    def syncfs(fd):
        if threading.current_thread().name.startswith("volmirror-write-behind"):
            release.wait(10)
            order.append("behind")
        else:
            order.append("point")
        return 0

    monkeypatch.setattr(A, "_SYNCFS", syncfs)
    monkeypatch.setattr(A, "WRITE_BEHIND_BYTES", 2 * BS)
    a = Applier(tmp_path / "root", syncfs=True)
    try:
        for e in _big_file(2):
            a.apply(e)
        assert a._behind is not None and not a._behind.done()
        t = threading.Thread(target=a.sync)
        t.start()
        t.join(0.3)
        assert t.is_alive() and order == []  # the point waits for the helper
        release.set()
        t.join(10)
        assert order == ["behind", "point"]
    finally:
        release.set()
        a.close()


def test_a_volume_root_now_on_another_file_system_fails_the_durability_point(tmp_path, monkeypatch):
    """A file system mounted on a volume root after it was first held: a syncfs through the held
    descriptor would flush the old one, so the point fails (the agent rewinds) and the root is
    held again when next used."""
    import daemon.mirror.applier as A

    synced = []
    monkeypatch.setattr(A, "_SYNCFS", lambda fd: synced.append(fd) or 0)
    a = Applier(tmp_path / "root", syncfs=True)
    try:
        a.apply(mk("mkdir", path="d", mode=0o755))
        a.sync()
        real = A.Applier._dev_now
        monkeypatch.setattr(A.Applier, "_dev_now", staticmethod(lambda vr: 4242))
        a.apply(mk("mkdir", path="e", mode=0o755))
        with pytest.raises(A.ApplyError, match="not on the file system"):
            a.sync()
        assert len(synced) == 1
        monkeypatch.setattr(A.Applier, "_dev_now", staticmethod(real))
        a.clear_failure()
        a.apply(mk("mkdir", path="e", mode=0o755))  # held again
        a.sync()
        assert len(synced) == 2
    finally:
        a.close()


def test_the_volume_root_is_held_open_so_syncfs_sees_errors_of_background_writeback(tmp_path, monkeypatch):
    """One descriptor per file system, opened when the volume root is first used and kept: a
    descriptor opened at each sync would not be told of a writeback error that happened before."""
    import daemon.mirror.applier as A

    fds, opened = [], []
    real_open = os.open

    def spy_open(path, flags, *rest, **kw):
        if flags & os.O_DIRECTORY:
            opened.append(os.path.basename(path))
        return real_open(path, flags, *rest, **kw)

    monkeypatch.setattr(A, "_SYNCFS", lambda fd: fds.append(fd) or 0)
    monkeypatch.setattr(A.os, "open", spy_open)
    a = Applier(tmp_path / "root", syncfs=True)
    try:
        for i in range(3):
            a.apply(mk("mkdir", path=f"d{i}", mode=0o755))
            a.sync()
        # a second volume on the same file system: still one descriptor, one syncfs
        a.apply(wire.Event(op="mkdir", vol="w", seq=1, epoch="e", ts=1.0, fields={"path": "x", "mode": 0o755}, payload=b""))
        a.sync()
    finally:
        a.close()
    assert len(fds) == 4 and len(set(fds)) == 1
    assert opened == ["v", "w"]  # each root opened once, not at each sync


def test_without_syncfs_a_failed_fsync_of_an_evicted_descriptor_is_sticky(tmp_path, monkeypatch):
    """Without syncfs a descriptor evicted from the cache is fsynced and closed: if that fsync
    fails, the error cannot be seen again through it, so every sync fails until cleared."""
    import daemon.mirror.applier as A

    real, failures = os.fsync, [1]

    def fsync(fd):
        if failures[0]:
            failures[0] -= 1
            raise OSError(5, "Input/output error")
        return real(fd)

    a = Applier(tmp_path / "root", syncfs=False)
    try:
        evs = _files(A.MAX_OPEN + 1)
        for e in evs[:-2]:
            a.apply(e)
        monkeypatch.setattr(A.os, "fsync", fsync)
        with pytest.raises(A.ApplyError, match="fsync"):
            for e in evs[-2:]:
                a.apply(e)  # the 65th file evicts the first descriptor
        with pytest.raises(A.ApplyError, match="fsync"):
            a.sync()  # fsync works again, but what the failed one covered is not durable
        a.clear_failure()
        a.sync()
    finally:
        a.close()


def test_without_syncfs_every_file_is_fsynced(tmp_path, monkeypatch):
    import daemon.mirror.applier as A

    real, fsyncs = os.fsync, []
    monkeypatch.setattr(A.os, "fsync", lambda fd: fsyncs.append(fd) or real(fd))
    a = Applier(tmp_path / "root", syncfs=False)
    try:
        run(a, _files(10))
    finally:
        a.close()
    assert len(fsyncs) >= 10


def small(path, data, mode=0o640, mtime_ns=5_000_000_000):
    from daemon.blocks import file_root

    h = block_hash(data)
    return mk("file", path=path, size=len(data), mode=mode, mtime_ns=mtime_ns, hash=h.hex(),
              root=file_root(h if data else b"", len(data)).hex(), bs=BS, payload=data)


def test_a_whole_file_replaces_whatever_holds_its_path_or_a_parent(ap, tmp_path):
    """The one-syscall create path of a small file falls back to the general one when something is
    there: a longer file (truncated), a fifo, a directory's place taken by a file, a missing parent."""
    vr = tmp_path / "root" / "v"
    vr.mkdir(parents=True)
    (vr / "longer").write_bytes(b"x" * 5000)
    os.mkfifo(vr / "fifo")
    (vr / "notadir").write_bytes(b"file where a directory must be")
    run(ap, [small("new", b"n" * 10), small("longer", b"short"), small("fifo", b"was a fifo"),
             small("notadir/inner", b"inner"), small("a/b/c/deep", b"deep"), small("empty", b"")])
    assert (vr / "new").read_bytes() == b"n" * 10
    assert (vr / "longer").read_bytes() == b"short"
    assert (vr / "fifo").read_bytes() == b"was a fifo"
    assert (vr / "notadir" / "inner").read_bytes() == b"inner"
    assert (vr / "a/b/c/deep").read_bytes() == b"deep"
    assert (vr / "empty").read_bytes() == b"" and (vr / "new").stat().st_mode & 0o7777 == 0o640
    assert (vr / "new").stat().st_mtime_ns == 5_000_000_000
