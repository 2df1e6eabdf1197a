"""The mirror's apply actor and verifier without a broker: records in, disk and index out.

Every test here is about the one rule: the mirror never deletes or damages data the source still
has, and never says it is protected when it is not."""

import errno
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from daemon import wire
from daemon.blocks import block_hash, file_root
from daemon.config import MirrorConfig
from daemon.digest import listing_row
from daemon.store.source_index import Entry
from daemon.kafka import Record
from daemon.listing import parts
from daemon.metrics import MirrorMetrics
from daemon.mirror import repair as R
from daemon.mirror.applier import pwrite_all
from daemon.mirror.consumer import ApplyActor

BS = 16384
VOL = "v"


class Stream:
    """Builds encoded records of one volume, with a sequence number per event."""

    def __init__(self, epoch="e1"):
        self.epoch, self.seq, self.off = epoch, 0, 0

    def rec(self, op, *, seq=None, payload=b"", epoch=None, **f):
        if seq is None:
            self.seq += 1
            seq = self.seq
        ev = wire.Event(op=op, vol=VOL, seq=seq, epoch=epoch or self.epoch, ts=1_700_000_000.0, fields=f, payload=payload)
        self.off += 1
        return Record("t", 0, self.off, wire.key_for(VOL), wire.encode(ev), 0)

    def file(self, path, data, mode=0o644, mtime_ns=1_600_000_000_000_000_000):
        hashes = block_hash(data)
        return [
            self.rec("truncate", path=path, size=len(data), bs=BS),
            self.rec("block", path=path, off=0, len=len(data), hash=hashes.hex(), size=len(data), zero=False, bs=BS, payload=data),
            self.rec("manifest", path=path, size=len(data), mode=mode, mtime_ns=mtime_ns, root=file_root(hashes, len(data)).hex(), bs=BS),
        ]

    def announce(self, host="src-host", bs=BS, seq=None):
        return self.rec("announce", seq=self.seq if seq is None else seq, host=host, src="/data", block_size=bs,
                        heartbeat_interval=5.0, checkpoint_interval=60.0)


@pytest.fixture
def env(tmp_path):
    sent = []
    mc = MirrorConfig(root=tmp_path / "root", state_dir=tmp_path / "state", group_id="g", scrub_rate_mib=0)
    mc.state_dir.mkdir()
    mc.root.mkdir()
    reg = CollectorRegistry()
    m = MirrorMetrics(reg)

    def on_volume(v):
        m.init_volume(v)
        m.init_rejections(v)
        return True

    actor = ApplyActor(mc, m, send=sent.append, mirrored=lambda v: True, on_volume=on_volume)
    yield actor, sent, reg, tmp_path / "root" / VOL
    actor.close()


def metric(reg, name, **labels):
    return reg.get_sample_value(name, labels) or 0.0


def apply(actor, recs):
    res = actor.apply_records(recs)
    assert res.error is None and res.state_error is None, res
    actor.make_durable()
    actor._snapshot()  # what ApplyActor.call does after every message
    return res


def listing_recs(st, actor, entries, nonce=None):
    nonce = nonce or actor.verifier.request_listing(VOL)
    rows = [listing_row(e) for e in sorted(entries, key=lambda e: e.path.encode())]
    return [st.rec("listing", **f) for f in parts(rows, nonce, part_bytes=512)]


def src_entry(path, data, mode=0o644, mtime_ns=1_600_000_000_000_000_000):
    h = block_hash(data)
    return Entry(path, "f", len(data), mtime_ns, 0, mode, None, h, file_root(h, len(data)))


def test_chmod_of_directory_keeps_its_files(env):
    actor, _, reg, vr = env
    st = Stream()
    recs = [st.announce(), st.rec("mkdir", path="docs", mode=0o755)]
    for i in range(50):
        recs += st.file(f"docs/f{i}.txt", b"x%d" % i)
    apply(actor, recs)
    apply(actor, [st.rec("mkdir", path="docs", mode=0o750)])  # chmod 750 docs
    assert len(os.listdir(vr / "docs")) == 50
    assert oct(os.stat(vr / "docs").st_mode & 0o777) == "0o750"
    assert len(actor.idx.paths(VOL)) == 51
    for _ in range(3):
        actor.scrubber.full_pass(VOL)
    assert len(os.listdir(vr / "docs")) == 50 and actor.drift.count(VOL) == 0


def test_directory_published_after_its_first_files_keeps_them(env):
    # cp -r: the watcher can report files inside a new directory before the directory itself
    actor, _, reg, vr = env
    st = Stream()
    recs = [st.announce()]
    for i in range(20):
        recs += st.file(f"new/f{i}.txt", b"%d" % i)
    recs.append(st.rec("mkdir", path="new", mode=0o755))
    apply(actor, recs)
    assert len(os.listdir(vr / "new")) == 20
    assert len(actor.idx.paths(VOL)) == 21  # the index still knows every file below it


def test_small_file_in_one_record_is_applied_indexed_and_verifies(env):
    actor, sent, reg, vr = env
    st = Stream()
    data = b"a small case file"
    h = block_hash(data)
    recs = [st.announce(), st.rec("mkdir", path="d", mode=0o755),
            st.rec("file", path="d/s.txt", size=len(data), mode=0o640, mtime_ns=1_600_000_000_000_000_000,
                   root=file_root(h, len(data)).hex(), hash=h.hex(), bs=BS, payload=data),
            st.rec("file", path="d/empty", size=0, mode=0o600, mtime_ns=5, root=file_root(b"", 0).hex(), hash=block_hash(b"").hex(), bs=BS)]
    apply(actor, recs)
    assert (vr / "d" / "s.txt").read_bytes() == data and (vr / "d" / "empty").read_bytes() == b""
    assert oct(os.stat(vr / "d" / "s.txt").st_mode & 0o777) == "0o640"
    assert os.stat(vr / "d" / "s.txt").st_mtime_ns == 1_600_000_000_000_000_000
    e = actor.idx.lookup(VOL, "d/s.txt")
    assert (e.size, bytes(e.hashes), bytes(e.root)) == (len(data), h, file_root(h, len(data)))
    # the same file as the source indexes it: the checkpoint digest matches, the scrubber is silent
    src = [Entry("d", "d", mode=0o755), src_entry("d/s.txt", data, mode=0o640), Entry("d/empty", "f", 0, 5, 0, 0o600, None, b"", file_root(b"", 0))]
    from daemon.digest import volume_digest
    root, files, nbytes = volume_digest(src)
    apply(actor, [st.rec("checkpoint", id=1, files=files, bytes=nbytes, root=root.hex())])
    assert metric(reg, "volmirror_checkpoints_total", volume=VOL, result="match") == 1
    actor.scrubber.full_pass(VOL)
    assert actor.drift.count(VOL) == 0
    # an overwrite with a shorter content truncates
    d2 = b"short"
    h2 = block_hash(d2)
    apply(actor, [st.rec("file", path="d/s.txt", size=5, mode=0o640, mtime_ns=7, root=file_root(h2, 5).hex(), hash=h2.hex(), bs=BS, payload=d2)])
    assert (vr / "d" / "s.txt").read_bytes() == d2


def test_scrubber_never_deletes_what_the_index_lacks(env):
    actor, sent, reg, vr = env
    st = Stream()
    apply(actor, [st.announce(), *st.file("a.txt", b"aaa")])
    (vr / "stray.txt").write_text("not in the index (index lost or behind)")
    actor.scrubber.full_pass(VOL)
    assert (vr / "stray.txt").exists()
    assert actor.drift.kind(VOL, "stray.txt") == "extra"
    assert any(r["type"] == "listing" for r in sent)  # it asks the source instead


def test_scrubber_does_not_report_a_directory_made_for_files_that_came_before_it(env):
    # a file renamed into a directory whose mkdir is still on its way: the applier makes the
    # directory; it is not "extra" (no listing request), but an empty unknown directory is
    actor, sent, reg, vr = env
    st = Stream()
    apply(actor, [st.announce(), *st.file("a.txt", b"aaa"), st.rec("rename", path="a.txt", dst="later/x/a.txt")])
    assert (vr / "later" / "x" / "a.txt").exists()
    (vr / "empty").mkdir()
    actor.scrubber.full_pass(VOL)
    assert actor.drift.kind(VOL, "later") is None and actor.drift.kind(VOL, "later/x") is None
    assert actor.drift.kind(VOL, "empty") == "extra"
    apply(actor, [st.rec("mkdir", path="later", mode=0o755), st.rec("mkdir", path="later/x", mode=0o700)])
    actor.scrubber.full_pass(VOL)
    assert actor.drift.kind(VOL, "later") is None and oct(os.stat(vr / "later" / "x").st_mode & 0o777) == "0o700"


def test_wiped_index_is_rebuilt_from_disk_without_transfers_or_deletions(env, tmp_path):
    actor, sent, reg, vr = env
    st = Stream()
    files = {f"d{i % 10}/f{i}.bin": os.urandom(100 + i) for i in range(300)}
    recs = [st.announce()]
    for p, data in files.items():
        recs += st.file(p, data)
    apply(actor, recs)
    actor.close()
    for f in (tmp_path / "state").iterdir():
        f.unlink()
    mc = actor.mc
    reg2 = CollectorRegistry()
    m2 = MirrorMetrics(reg2)
    actor2 = ApplyActor(mc, m2, send=sent.append, mirrored=lambda v: True, on_volume=lambda v: (m2.init_volume(v), True)[1])
    try:
        sent.clear()
        st2 = Stream()
        apply(actor2, [st2.announce()])
        actor2.scrubber.full_pass(VOL)  # everything on disk is "extra" to an empty index: nothing deleted
        assert sum(len(f) for _, _, f in os.walk(vr)) == 300
        entries = [src_entry(p, d) for p, d in files.items()] + [Entry(f"d{i}", "d", mode=0o755) for i in range(10)]
        for i in range(10):
            os.chmod(vr / f"d{i}", 0o755)
        sent.clear()
        apply(actor2, listing_recs(st2, actor2, entries))
        assert sum(len(f) for _, _, f in os.walk(vr)) == 300
        assert [r for r in sent if r["type"] == "resync_file"] == []  # adopted from disk: nothing fetched
        assert len(actor2.idx.paths(VOL)) == 310
        assert metric(reg2, "volmirror_mirror_deleted_files_total", volume=VOL, reason="listing") == 0
        assert actor2.drift.count(VOL) == 0
    finally:
        actor2.close()


def test_complete_listing_deletes_only_what_the_source_lacks(env):
    actor, sent, reg, vr = env
    st = Stream()
    apply(actor, [st.announce(), *st.file("keep.txt", b"k"), *st.file("gone/x.txt", b"g"), *st.file("gone/y.txt", b"h")])
    apply(actor, listing_recs(st, actor, [src_entry("keep.txt", b"k")]))
    assert (vr / "keep.txt").exists() and not (vr / "gone").exists()
    assert metric(reg, "volmirror_mirror_deleted_files_total", volume=VOL, reason="listing") == 2


def test_listing_without_a_directory_row_keeps_the_files_it_lists_below_it(env):
    # cp -r: the source published files of copied/m00 before (or without) the directory itself
    actor, sent, reg, vr = env
    st = Stream()
    files = {f"copied/m00/f{i}": b"%d" % i for i in range(30)}
    recs = [st.announce()]
    for p, d in files.items():
        recs += st.file(p, d)
    apply(actor, recs)
    apply(actor, listing_recs(st, actor, [src_entry(p, d) for p, d in files.items()]))  # no row for copied/ or copied/m00
    assert len(os.listdir(vr / "copied" / "m00")) == 30
    assert metric(reg, "volmirror_mirror_deleted_files_total", volume=VOL, reason="listing") == 0


def test_incomplete_forged_or_unrequested_listing_deletes_nothing(env):
    actor, sent, reg, vr = env
    st = Stream()
    recs = [st.announce()]
    for i in range(40):
        recs += st.file(f"f{i:02d}", b"%d" % i)
    apply(actor, recs)
    full = listing_recs(st, actor, [])  # empty listing, but one we asked for...
    forged = [st.rec("listing", **next(iter(parts([], "not-asked"))))]  # ...and one nobody asked for
    apply(actor, forged)
    assert len(os.listdir(vr)) == 40
    entries = [src_entry(f"f{i:02d}", b"%d" % i) for i in range(40)]
    partial = listing_recs(st, actor, entries)
    assert len(partial) > 2
    apply(actor, partial[:-2] + partial[-1:])  # a part lost on the way
    assert len(os.listdir(vr)) == 40
    assert metric(reg, "volmirror_mirror_listings_total", volume=VOL, result="discarded") >= 1
    # a replay of a complete listing (same epoch/seq) is a duplicate and is never re-run
    replay = [Record(r.topic, r.partition, r.offset, r.key, r.value, 0) for r in full]
    apply(actor, replay)
    assert len(os.listdir(vr)) == 40
    assert metric(reg, "volmirror_mirror_deleted_files_total", volume=VOL, reason="listing") == 0


def test_far_future_seq_rejected_and_later_events_still_apply(env):
    actor, sent, reg, vr = env
    st = Stream()
    apply(actor, [st.announce(), *st.file("a", b"1")])
    apply(actor, [st.rec("delete", path="a", seq=2**62)])
    assert (vr / "a").exists()
    assert metric(reg, "volmirror_mirror_rejected_events_total", volume=VOL, reason="future_seq") == 1
    apply(actor, st.file("b", b"2"))
    assert (vr / "b").read_bytes() == b"2"


def test_announce_cannot_change_block_size_or_host(env):
    actor, sent, reg, vr = env
    st = Stream()
    apply(actor, [st.announce(), *st.file("a", b"1")])
    apply(actor, [st.announce(bs=1 << 20)])
    apply(actor, [st.announce(host="evil")])
    assert metric(reg, "volmirror_mirror_rejected_events_total", volume=VOL, reason="conflict") == 2
    assert actor.snap[VOL].conflict
    assert actor.announced[VOL].block_size == BS


def test_name_too_long_is_quarantined_and_stream_moves_on(env, tmp_path):
    actor, sent, reg, vr = env
    st = Stream()
    deep = "/".join(["d" * 250] * 16)  # 4086 bytes: valid at the source, > PATH_MAX under the mirror root
    res = actor.apply_records([st.announce(), *st.file(deep + "/" + "f" * 70, b"x"), *st.file("ok.txt", b"fine")])
    assert res.error is None
    actor.make_durable()
    actor._snapshot()
    assert (vr / "ok.txt").read_bytes() == b"fine"
    assert actor.snap[VOL].quarantined >= 1
    assert metric(reg, "volmirror_mirror_quarantined_total", volume=VOL, reason="name_too_long") >= 1
    # a second file below the same deep tree: the jail's walk of existing parents fails the same way
    res = actor.apply_records(st.file(deep + "/" + "s" * 70, b"z"))
    assert res.error is None, res.error
    assert actor.idx.is_quarantined(VOL, deep + "/" + "s" * 70)
    # a directory that fits, then a file below it that does not: the parent walk fails the same way
    fits = "/".join(["e" * 240] * 16)  # 3855 bytes: the directory fits under the root
    res = actor.apply_records([st.rec("mkdir", path=fits, mode=0o755), *st.file(fits + "/" + "g" * 230, b"y"), *st.file("ok2.txt", b"2")])
    assert res.error is None, res.error
    actor.make_durable()
    actor._snapshot()
    assert (vr / "ok2.txt").read_bytes() == b"2"
    assert actor.idx.is_quarantined(VOL, fits + "/" + "g" * 230)


def test_disk_full_is_retried_never_skipped(env, monkeypatch):
    actor, sent, reg, vr = env
    st = Stream()
    apply(actor, [st.announce()])
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    recs = st.file("a", b"data")
    res = actor.apply_records(recs)
    assert res.error and res.rewind == {("t", 0): recs[1].offset}
    monkeypatch.setattr(os, "pwrite", real)
    apply(actor, recs)  # the loop re-reads from the failed record
    assert (vr / "a").read_bytes() == b"data" and actor.snap[VOL].quarantined == 0


def test_state_dir_failure_rolls_back_progress_with_the_index(env):
    actor, sent, reg, vr = env
    st = Stream()
    apply(actor, [st.announce(), *st.file("a", b"1")])
    seq_before = actor.idx.volumes[VOL].seq
    actor.apply_records(st.file("b", b"2"))
    real = actor.idx.db
    class Broken:
        def __getattr__(self, n):
            return getattr(real, n)
        def execute(self, sql, *a):
            if sql.startswith("COMMIT"):
                import sqlite3
                raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, *a)
    actor.idx.db = Broken()
    with pytest.raises(Exception):
        actor.make_durable()
    actor.idx.db = real
    assert actor.idx.volumes[VOL].seq == seq_before  # progress never ahead of the index
    assert actor.idx.lookup(VOL, "b") is None


def test_a_failed_sync_at_a_rename_barrier_goes_back_to_the_last_durable_point(env, monkeypatch):
    """A rename first makes everything before it durable. If that fails (EIO: the kernel reports it
    once), the records before it are what is not durable, not the rename: the batch must stop with a
    state error (the loop re-reads from its last durable offsets), never blame, retry past or
    quarantine the rename, and no later durability point may succeed until the actor was reset."""
    import daemon.mirror.applier as A

    actor, sent, reg, vr = env
    st = Stream()
    apply(actor, [st.announce(), *st.file("a", b"1")])
    seq_before = actor.idx.volumes[VOL].seq
    recs = [*st.file("b", b"2"), st.rec("rename", path="b", dst="c")]
    real_sync = actor.applier._sync
    failures = [1]

    def sync_once_failing():
        if failures[0]:
            failures[0] -= 1
            raise A.ApplyError("syncfs of root failed: Input/output error", errno.EIO)
        real_sync()

    monkeypatch.setattr(actor.applier, "_sync", sync_once_failing)
    res = actor.apply_records(recs)
    assert res.state_error and "durable" in res.state_error and res.error is None and not res.rewind
    assert actor.snap[VOL].quarantined == 0 and metric(reg, "volmirror_mirror_local_errors_total", kind="disk") == 1
    with pytest.raises(A.ApplyError):
        actor.make_durable()  # sticky: the one report of the error was taken
    assert actor.idx.volumes[VOL].seq == seq_before
    actor.reset()  # what the agent does, before it re-reads from its last durable offsets
    apply(actor, recs)
    assert (vr / "c").read_bytes() == b"2" and not (vr / "b").exists()
    assert actor.idx.lookup(VOL, "c") is not None and actor.idx.lookup(VOL, "b") is None


def test_a_failed_sync_after_a_rename_is_a_durability_failure_too(env, monkeypatch):
    import daemon.mirror.applier as A

    actor, sent, reg, vr = env
    st = Stream()
    apply(actor, [st.announce(), *st.file("b", b"2")])
    real_sync, calls = actor.applier._sync, []

    def second_fails():
        calls.append(1)
        if len(calls) == 2:  # the barrier's sync passes, the rename's own fails
            raise A.ApplyError("syncfs of root failed: Input/output error", errno.EIO)
        real_sync()

    monkeypatch.setattr(actor.applier, "_sync", second_fails)
    recs = [st.rec("rename", path="b", dst="c")]
    res = actor.apply_records(recs)
    assert res.state_error and res.error is None and not res.rewind and actor.snap[VOL].quarantined == 0
    actor.reset()
    apply(actor, recs)  # replayed: the rename finds its destination in place
    assert (vr / "c").read_bytes() == b"2" and actor.idx.lookup(VOL, "c") is not None


def test_a_stream_gap_taken_before_a_failure_is_given_back_by_reset(env):
    """The first record after a stream gap may jump far ahead once. If the batch holding it is
    rolled back before it was durable, the re-read must accept it again, not reject it as forged."""
    from daemon.mirror.consumer import FUTURE_SEQ

    actor, sent, reg, vr = env
    st = Stream()
    apply(actor, [st.announce(), *st.file("a", b"1")])
    st.seq += FUTURE_SEQ + 10
    recs = st.file("b", b"2")
    actor.gap_partitions.add(0)
    res = actor.apply_records(recs)
    assert res.error is None and metric(reg, "volmirror_mirror_rejected_events_total", volume=VOL, reason="future_seq") == 0
    actor.reset()  # e.g. the durability point after it failed
    apply(actor, recs)
    assert metric(reg, "volmirror_mirror_rejected_events_total", volume=VOL, reason="future_seq") == 0
    assert (vr / "b").read_bytes() == b"2"


def test_pwrite_all_loops_on_short_writes(tmp_path, monkeypatch):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda f, d, o: real(f, bytes(d)[:3], o))
    pwrite_all(fd, b"0123456789", 5)
    monkeypatch.setattr(os, "pwrite", lambda f, d, o: 0)
    with pytest.raises(OSError):
        pwrite_all(fd, b"x", 0)
    monkeypatch.setattr(os, "pwrite", real)
    assert os.pread(fd, 20, 0) == b"\0" * 5 + b"0123456789"
    os.close(fd)


@pytest.mark.parametrize("err,what", [(errno.ENOSPC, R.RETRY), (errno.EIO, R.RETRY), (errno.ENAMETOOLONG, R.QUARANTINE),
                                      (errno.EFBIG, R.QUARANTINE), (errno.EACCES, R.RETRY_THEN_QUARANTINE)])
def test_classify(err, what):
    assert R.classify(err)[0] == what


def test_rename_onto_a_filled_directory_merges_in_the_index_too(env):
    actor, sent, reg, vr = env
    st = Stream()
    apply(actor, [st.announce(), st.rec("mkdir", path="old", mode=0o755), *st.file("old/a", b"A"), *st.file("old/same", b"S1"),
                  st.rec("mkdir", path="new", mode=0o755), *st.file("new/b", b"B"), *st.file("new/same", b"S2")])
    apply(actor, [st.rec("rename", path="old", dst="new")])
    assert actor.idx.paths(VOL) == ["new", "new/a", "new/b", "new/same"]
    assert sorted(os.listdir(vr / "new")) == ["a", "b", "same"]
    actor.scrubber.full_pass(VOL)
    assert actor.drift.count(VOL) == 0  # index and disk agree after the merge


def test_implicit_parent_removed_once_empty_but_published_directories_stay(env):
    # a batch of files reached the mirror before their directory was published; the source then
    # saw the directory renamed away and sent deletes for the files: nothing must stay behind
    actor, sent, reg, vr = env
    st = Stream()
    apply(actor, [st.announce(), *st.file("wdir/a", b"1"), *st.file("wdir/b", b"2"),
                  st.rec("mkdir", path="kept", mode=0o755), *st.file("kept/c", b"3")])
    apply(actor, [st.rec("delete", path="wdir/a"), st.rec("delete", path="wdir/b"), st.rec("delete", path="kept/c")])
    assert not (vr / "wdir").exists()
    assert (vr / "kept").is_dir()  # a directory the source published stays, empty or not


def test_rename_of_an_unindexed_directory_onto_a_filled_one_keeps_the_index_in_step(env):
    actor, sent, reg, vr = env
    st = Stream()
    apply(actor, [st.announce(), *st.file("implicit/x", b"X"), st.rec("mkdir", path="new", mode=0o755), *st.file("new/b", b"B")])
    actor.idx.begin()
    actor.idx.delete(VOL, "implicit/x")  # the index knows nothing of implicit/ (disk still has it)
    actor.idx.commit()
    apply(actor, [st.rec("rename", path="implicit", dst="new")])
    assert sorted(os.listdir(vr / "new")) == ["b", "x"]
    assert "new/b" in actor.idx.paths(VOL)  # dst's own entries are not dropped by the merge


def test_rename_whose_source_the_mirror_never_had_keeps_the_destination_indexed(env):
    actor, sent, reg, vr = env
    st = Stream()
    apply(actor, [st.announce(), st.rec("mkdir", path="d", mode=0o755), *st.file("d/a", b"A")])
    apply(actor, [st.rec("rename", path="never-here", dst="d")])
    assert (vr / "d" / "a").exists() and "d/a" in actor.idx.paths(VOL)
    actor.scrubber.full_pass(VOL)
    assert actor.drift.count(VOL) == 0


def test_rename_replayed_after_a_crash_moves_the_index_rows(env):
    # SIGKILL between the rename on disk and its index write: the replay finds src gone, dst there
    actor, sent, reg, vr = env
    st = Stream()
    apply(actor, [st.announce(), *st.file("a.txt", b"A")])
    os.rename(vr / "a.txt", vr / "b.txt")  # what the killed run had already done on disk
    apply(actor, [st.rec("rename", path="a.txt", dst="b.txt")])
    assert actor.idx.paths(VOL) == ["b.txt"]
    actor.scrubber.full_pass(VOL)
    assert actor.drift.count(VOL) == 0
