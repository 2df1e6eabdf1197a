"""The volume worker without a broker: a fake record sink that acks, holds or fails records.

Each worker owns its index file; batches commit only their own rows after their own acks; a failed
batch (Kafka or state_dir) is rolled back, reported and retried; listings are sequenced, verified
parts and wait for the start-up scan and for paths in doubt.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from daemon import wire
from daemon.config import VolumeConfig
from daemon.store.source_index import SeqAllocator, SourceIndex, volume_index
from daemon.metrics import SourceMetrics
from daemon.store.listing_spool import ListingSpool
from daemon.source.publisher import Publisher
from daemon.source.volume import VolumeWorker


class Sink:
    """Records every event; acks at once, or holds / fails the acks of chosen volumes."""

    def __init__(self) -> None:
        self.events: list[wire.Event] = []
        self.sizes: list[int] = []  # bytes of each event's record, as it went on the wire
        self.fail: set[str] = set()
        self.hold: set[str] = set()
        self.held: list[tuple[str, asyncio.Future]] = []

    async def send(self, topic: str, key: bytes, value: bytes) -> asyncio.Future:
        ev = wire.decode(value, key)  # everything the source sends passes the real decoder
        self.events.append(ev)
        self.sizes.append(len(value))
        fut = asyncio.get_running_loop().create_future()
        if ev.vol in self.hold:
            self.held.append((ev.vol, fut))
        elif ev.vol in self.fail:
            fut.set_exception(ConnectionError("broker gone"))
        else:
            fut.set_result(None)
        return fut

    def release(self, vol: str, *, ok: bool) -> None:
        for v, fut in [h for h in self.held if h[0] == vol]:
            fut.set_result(None) if ok else fut.set_exception(ConnectionError("no ack"))
        self.held = [h for h in self.held if h[0] != vol]

    def files(self, vol: str, path: str | None = None) -> list[wire.Event]:
        """Events that publish a whole file: a manifest, or a small file's single ``file`` record."""
        return self.ops(vol, "manifest", path) + self.ops(vol, "file", path)

    def wire_bytes(self, vol: str, path: str) -> int:
        return sum(n for e, n in zip(self.events, self.sizes) if e.vol == vol and e.path == path)

    def ops(self, vol: str, op: str | None = None, path: str | None = None) -> list[wire.Event]:
        return [e for e in self.events if e.vol == vol and (op is None or e.op == op) and (path is None or e.path == path)]


class Env:
    def __init__(self, tmp: Path, **open_kw) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.sink = Sink()
        self.seqs = SeqAllocator(self.state / "sequence.json")
        self.pub = Publisher(self.sink, "t", self.seqs)
        self.reg = CollectorRegistry()
        self.m = SourceMetrics(self.reg)
        self.workers: dict[str, VolumeWorker] = {}
        self.tasks: list[asyncio.Task] = []

    def worker(self, name: str, **kw) -> VolumeWorker:
        root = self.tmp / "src" / name
        root.mkdir(parents=True, exist_ok=True)
        self.m.init_volume(name)
        w = VolumeWorker(VolumeConfig(name, root, 16384), self.state, self.pub, self.m, debounce=0.01, max_delay=0.05,
                         checkpoint_interval=3600, **kw)
        self.workers[name] = w
        self.tasks.append(asyncio.create_task(w.run()))
        return w

    def metric(self, name: str, **labels) -> float:
        return self.reg.get_sample_value(name, labels) or 0.0

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.workers.values():
            w.close()


def committed(state: Path, vol: str) -> dict[str, object]:
    """What another process would see: the committed rows of the volume's own index file."""
    db = sqlite3.connect(f"file:{state / f'index-{vol}.sqlite'}?mode=ro", uri=True)
    try:
        return {r[0]: r[1] for r in db.execute("SELECT path, kind FROM entries WHERE volume=?", (vol,))}
    finally:
        db.close()


async def until(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
async def env(tmp_path):
    e = Env(tmp_path)
    yield e
    await e.stop()


async def test_a_volume_commits_only_its_own_rows_after_its_own_acks(env):
    """Volume B's commit must not commit volume A's rows while A's acks are outstanding (the
    shared-transaction bug), and A's failed batch must be re-sent."""
    a, b = env.worker("a"), env.worker("b")
    await until(lambda: a.index and b.index, what="indexes open")
    assert (env.state / "index-a.sqlite").exists() and (env.state / "index-b.sqlite").exists()
    (a.vol.path / "fa").write_bytes(os.urandom(40000))
    (b.vol.path / "fb").write_bytes(os.urandom(40000))
    env.sink.hold.add("a")
    a.mark("fa", force=False)
    await until(lambda: env.sink.ops("a", "manifest", "fa"), what="a's records sent (acks held)")
    b.mark("fb", force=False)
    await until(lambda: "fb" in committed(env.state, "b"), what="b committed")
    assert "fa" not in committed(env.state, "a")  # b's commit did not take a's rows with it
    env.sink.hold.clear()
    env.sink.release("a", ok=False)  # a's records were never acknowledged
    await until(lambda: "fa" in committed(env.state, "a"), what="a retried and committed")
    assert len(env.sink.ops("a", "manifest", "fa")) == 2  # sent again, not forgotten
    assert env.metric("volmirror_source_errors_total", volume="a", kind="publish") >= 1
    assert env.metric("volmirror_source_errors_total", volume="b", kind="publish") == 0
    assert len(a.doubt) == 0


class FullDiskIndex(SourceIndex):
    """A real index whose commits fail like a full disk while ``full`` is set (injected, no env vars)."""

    full = False

    def commit(self) -> None:
        if self.full and self.in_transaction:
            raise sqlite3.OperationalError("database or disk is full")
        super().commit()


async def test_state_failure_is_reported_rolled_back_and_retried(env):
    made: list[FullDiskIndex] = []

    def open_index(state_dir: Path, vol: str) -> SourceIndex:
        idx = FullDiskIndex(state_dir / f"index-{vol}.sqlite")
        made.append(idx)
        return idx

    w = env.worker("v", open_index=open_index)
    await until(lambda: made, what="index open")
    FullDiskIndex.full = True
    try:
        for i in range(20):
            (w.vol.path / f"f{i}").write_bytes(os.urandom(1000 + i))
            w.mark(f"f{i}", force=False)
        await until(lambda: env.metric("volmirror_source_state_ok", volume="v") == 0, what="state_ok 0")
        assert env.metric("volmirror_source_errors_total", volume="v", kind="state") >= 1
        st = w.status()
        assert st["state_ok"] is False and "index-v.sqlite" in st["state_error"] and "full" in st["state_error"]
        assert committed(env.state, "v") == {}
        # acked but rolled back: every path may be at the mirror, none is lost
        await until(lambda: w.status()["in_doubt_paths"] == 20, timeout=15, what="all 20 paths in doubt")
        assert committed(env.state, "v") == {}
    finally:
        FullDiskIndex.full = False
    await until(lambda: len(committed(env.state, "v")) == 20, timeout=15, what="recovered and committed")
    await until(lambda: env.metric("volmirror_source_state_ok", volume="v") == 1, what="state_ok back to 1")
    assert w.status()["state_ok"] is True and len(w.doubt) == 0
    assert len(env.sink.files("v")) >= 40  # every file published again after the rollback


async def test_path_in_doubt_is_resent_even_if_it_went_back(env):
    """A file changes A→B, B's batch fails after sending, the file goes back to A: the mirror may
    hold B's blocks, so A's blocks and manifest are sent again although the index says A."""
    w = env.worker("v")
    await until(lambda: w.index, what="index open")
    p = w.vol.path / "f"
    a_data = os.urandom(3 * 16384)
    p.write_bytes(a_data)
    os.utime(p, ns=(1, 1_000_000_000))
    w.mark("f", force=False)
    await until(lambda: "f" in committed(env.state, "v"), what="A committed")
    env.sink.fail.add("v")
    p.write_bytes(a_data[:16384] + os.urandom(16384) + a_data[32768:])  # block 1 changes
    w.mark("f", force=False)
    await until(lambda: "f" in w.doubt, what="batch failed, f in doubt")
    assert w.doubt.blocks("f") == {1}
    p.write_bytes(a_data)
    os.utime(p, ns=(1, 1_000_000_000))  # back to exactly what the index holds
    n = len(env.sink.ops("v", "manifest", "f"))
    env.sink.fail.clear()
    await until(lambda: not w.doubt, timeout=15, what="doubt cleared")
    resent = [e for e in env.sink.ops("v", "block", "f")][-1]
    assert resent["off"] == 16384 and len(env.sink.ops("v", "manifest", "f")) > n


async def test_listing_waits_for_the_startup_scan(env, tmp_path):
    w = env.worker("v")
    await until(lambda: w.index, what="index open")
    for i in range(50):
        (w.vol.path / f"f{i:03d}").write_bytes(b"x" * i)
        w.mark(f"f{i:03d}", force=False)
    await until(lambda: len(committed(env.state, "v")) == 50, what="files committed")
    w.request("listing", "n1")
    await asyncio.sleep(0.5)
    assert env.sink.ops("v", "listing") == []  # deferred: no start-up scan yet
    assert env.metric("volmirror_source_listings_total", volume="v", result="deferred") == 1
    w.scan_found([], ["f000"], {})
    await until(lambda: env.sink.ops("v", "listing"), what="listing sent once the scan's findings were examined")
    evs = env.sink.ops("v", "listing")
    spool = ListingSpool(tmp_path / "spool.sqlite")
    done = None
    for ev in evs:
        done = spool.add(ev)  # the mirror's checks: contiguous seqs, part hashes, count, root
    assert done is not None and done.digest.count == 50
    assert [e.seq for e in evs] == list(range(evs[0].seq, evs[0].seq + len(evs)))


async def test_listing_waits_for_paths_in_doubt(env, tmp_path):
    w = env.worker("v")
    await until(lambda: w.index, what="index open")
    w.scan_found([], [], {})
    env.sink.fail.add("v")
    (w.vol.path / "new").write_bytes(b"created while Kafka fails")
    w.mark("new", force=False)
    await until(lambda: "new" in w.doubt, what="batch failed")
    w.request("listing", "n2")
    await asyncio.sleep(0.5)
    assert env.sink.ops("v", "listing") == []  # "new" may be at the mirror but not in the index
    env.sink.fail.clear()
    await until(lambda: env.sink.ops("v", "listing"), timeout=15, what="listing after the retry")
    last = env.sink.ops("v", "listing")[-1]
    assert last["last"] and last["count"] == 1 and last["entries"][-1][0] == "new"
    manifests = env.sink.files("v", "new")
    assert manifests[-1].seq < last.seq  # the retry was published before the listing


async def test_large_listing_is_streamed_in_verified_parts(env, tmp_path):
    w = env.worker("v")
    idx = await until(lambda: w.index, what="index open")
    from daemon.store.source_index import Entry

    idx.begin()
    for i in range(20000):
        idx.put("v", Entry(f"d{i % 7}/é-{i:06d}", "f", i, 10, i, 0o644, None, b"", bytes(16)))
    idx.commit()
    w.scan_found([], [], {})
    w.request("listing", "big")
    await until(lambda: any(e["last"] for e in env.sink.ops("v", "listing")), timeout=30, what="listing")
    evs = env.sink.ops("v", "listing")
    assert len(evs) > 10
    spool = ListingSpool(tmp_path / "spool.sqlite")
    res = [spool.add(ev) for ev in evs]
    assert res[-1] is not None and res[-1].digest.count == 20000


async def test_names_that_are_not_utf8_are_never_sent_and_are_counted(env):
    w = env.worker("v")
    await until(lambda: w.index, what="index open")
    bad = os.fsdecode(b"caf\xe9.txt")
    (w.vol.path / "ok.txt").write_text("fine")
    with open(os.path.join(os.fsencode(w.vol.path), b"caf\xe9.txt"), "wb") as f:
        f.write(b"latin-1 name")
    assert w.mark(bad, force=True) is False
    w.mark("ok.txt", force=False)
    await until(lambda: "ok.txt" in committed(env.state, "v"), what="ok.txt committed")
    assert not [e for e in env.sink.events if e.path == bad]
    assert env.metric("volmirror_source_unprotected_paths", volume="v") == 1
    assert w.status()["unprotected_paths"] == 1
    w.mark(bad, force=True)  # counted once
    assert len(w.unprotected) == 1
    w.scan_found([], [], {})  # a scan that no longer finds it: back to 0
    assert env.metric("volmirror_source_unprotected_paths", volume="v") == 0


async def test_legacy_shared_index_is_imported_once(tmp_path):
    state = tmp_path / "state"
    legacy = SourceIndex(state / "index.sqlite")
    from daemon.store.source_index import Entry

    legacy.begin()
    for vol in ("a", "b"):
        for i in range(3):
            legacy.put(vol, Entry(f"{vol}{i}", "f", i, 1, i, 0o644, None, b"", bytes(16)))
    legacy.commit()
    legacy.close()
    ia = volume_index(state, "a")
    assert [e.path for e in ia.iter_volume("a")] == ["a0", "a1", "a2"] and list(ia.iter_volume("b")) == []
    ia.begin()
    ia.delete("a", "a0")
    ia.commit()
    ia.close()
    ia = volume_index(state, "a")  # not imported a second time: the delete stays
    assert [e.path for e in ia.iter_volume("a")] == ["a1", "a2"]
    ia.close()
    ib = volume_index(state, "b")
    assert [e.path for e in ib.iter_volume("b")] == ["b0", "b1", "b2"]
    ib.close()


async def test_rename_into_a_directory_not_yet_published_publishes_the_directory_first(env):
    """A file moved into a directory made while Kafka was away: the mirror must get the mkdir
    before the rename, or it creates the directory implicitly (and reports it as drift)."""
    w = env.worker("v")
    await until(lambda: w.index, what="index open")
    (w.vol.path / "f").write_bytes(b"data")
    w.mark("f", force=False)
    await until(lambda: "f" in committed(env.state, "v"), what="f committed")
    (w.vol.path / "newdir").mkdir(mode=0o750)
    os.rename(w.vol.path / "f", w.vol.path / "newdir" / "f")
    w.notify("moved", "f", "newdir/f", False)  # before the directory's own event is examined
    await until(lambda: env.sink.ops("v", "rename"), what="rename sent")
    ops = [(e.op, e.path) for e in env.sink.ops("v") if e.op in ("mkdir", "rename")]
    assert ops.index(("mkdir", "newdir")) < ops.index(("rename", "f"))
    assert env.sink.ops("v", "mkdir", "newdir")[0]["mode"] == 0o750
    await until(lambda: committed(env.state, "v").get("newdir") == "d", what="newdir committed")


async def test_rename_into_a_directory_that_is_gone_again_is_examined_instead(env):
    """f moved into d1, then d1 renamed to d2, all while Kafka was away: no rename may name d1
    (the mirror would create a directory the source never reports again)."""
    w = env.worker("v")
    await until(lambda: w.index, what="index open")
    (w.vol.path / "f").write_bytes(b"data")
    w.mark("f", force=False)
    await until(lambda: "f" in committed(env.state, "v"), what="f committed")
    (w.vol.path / "d1").mkdir()
    os.rename(w.vol.path / "f", w.vol.path / "d1" / "f")
    os.rename(w.vol.path / "d1", w.vol.path / "d2")
    w.notify("moved", "f", "d1/f", False)
    w.notify("moved", "d1", "d2", True)
    await until(lambda: committed(env.state, "v").get("d2/f") == "f", what="d2/f committed")
    assert not [e for e in env.sink.events if "d1" in (e.path or "") or "d1" in str(e.fields.get("dst", ""))]
    assert env.sink.ops("v", "delete", "f")  # the source no longer has f: the stream says so
    ops = [(e.op, e.path) for e in env.sink.ops("v") if e.op in ("mkdir", "manifest", "file")]
    assert ops.index(("mkdir", "d2")) < ops.index(("file", "d2/f"))
    assert "f" not in committed(env.state, "v")


async def test_doubt_follows_a_rename(env):
    """f's batch failed after sending (its blocks may be at the mirror), f went back to what the
    index holds and was renamed to g: the mirror renames what it holds, so g is still in doubt and
    its blocks are sent again."""
    w = env.worker("v")
    await until(lambda: w.index, what="index open")
    p = w.vol.path / "f"
    a_data = os.urandom(3 * 16384)
    p.write_bytes(a_data)
    os.utime(p, ns=(1, 1_000_000_000))
    w.mark("f", force=False)
    await until(lambda: "f" in committed(env.state, "v"), what="A committed")
    env.sink.fail.add("v")
    p.write_bytes(a_data[:16384] + os.urandom(16384) + a_data[32768:])
    w.mark("f", force=False)
    await until(lambda: "f" in w.doubt, what="batch failed, f in doubt")
    p.write_bytes(a_data)
    os.utime(p, ns=(1, 1_000_000_000))
    env.sink.fail.clear()
    w.dirty.pop("f")  # the retry has not run yet: the rename comes first
    os.rename(p, w.vol.path / "g")
    w.notify("moved", "f", "g", False)
    await until(lambda: env.sink.ops("v", "rename", "f") and not w.doubt and not w.dirty, timeout=15, what="renamed, doubt cleared")
    assert "g" in committed(env.state, "v") and "f" not in committed(env.state, "v")
    resent = env.sink.ops("v", "block", "g")
    assert resent and resent[-1]["off"] == 16384 and env.sink.ops("v", "manifest", "g")


async def test_a_small_file_is_one_record_and_a_chmod_sends_no_content(env):
    w = env.worker("v")
    await until(lambda: w.index, what="index open")
    (w.vol.path / "small").write_bytes(b"x" * 1000)
    (w.vol.path / "big").write_bytes(os.urandom(16384 + 1))  # more than one block: blocks + manifest
    w.mark("small", force=False)
    w.mark("big", force=False)
    await until(lambda: {"small", "big"} <= set(committed(env.state, "v")), what="both committed")
    assert [e.op for e in env.sink.events if e.path == "small"] == ["file"]
    f = env.sink.ops("v", "file", "small")[0]
    assert f.payload == b"x" * 1000 and f["size"] == 1000
    assert [e.op for e in env.sink.events if e.path == "big"] == ["truncate", "block", "block", "manifest"]
    os.chmod(w.vol.path / "small", 0o600)
    w.mark("small", force=False)
    await until(lambda: env.sink.ops("v", "manifest", "small"), what="metadata-only manifest")
    assert len(env.sink.ops("v", "file", "small")) == 1 and env.sink.ops("v", "manifest", "small")[0]["mode"] == 0o600


async def backlog_started(env, n: int = 1500):
    """A worker with ``n`` scanned files of 2,000 bytes waiting, the first of them published."""
    w = env.worker("v")
    await until(lambda: w.index, what="index open")
    names = [f"b{i:04d}" for i in range(n)]
    for name in names:
        (w.vol.path / name).write_bytes(os.urandom(2000))
    w.scan_found([], names, {})
    await until(lambda: len(env.sink.files("v")) >= 10, what="backlog started")
    return w, names


async def test_a_live_change_overtakes_a_backlog(env):
    """Priority lane: a file written while 1,500 scanned files wait is published long before the
    last of them, not behind the whole backlog."""
    w, names = await backlog_started(env)
    (w.vol.path / "live").write_bytes(b"urgent")
    w.mark("live", force=True)  # as the watcher does
    await until(lambda: len(committed(env.state, "v")) == 1501, timeout=60, what="all committed")
    seqs = {e.path: e.seq for e in env.sink.files("v")}
    later = sum(1 for n in names if seqs[n] > seqs["live"])
    assert later > 500, f"only {later} backlog files were published after the live one"


async def test_a_scanned_new_directory_publishes_each_file_once(env, monkeypatch):
    """Marks are popped and read a group at a time (one thread hop): examining a new directory
    marks its children again, which must not make the group's files be read or sent twice."""
    import collections
    import daemon.source.reader as reader_mod

    reads: collections.Counter[str] = collections.Counter()
    real = reader_mod.read_small

    def counting(path, before):
        reads[os.path.basename(path)] += 1
        return real(path, before)

    monkeypatch.setattr(reader_mod, "read_small", counting)  # prefetch's and read_small_packed's
    w = env.worker("v")
    await until(lambda: w.index, what="index open")
    names = ["d"] + [f"d/f{i:03d}" for i in range(300)]
    (w.vol.path / "d").mkdir()
    for n in names[1:]:
        (w.vol.path / n).write_bytes(os.urandom(100 + len(n)))
    w.scan_found([], names, {})
    await until(lambda: len(committed(env.state, "v")) == 301, timeout=30, what="all committed")
    sent = [e.path for e in env.sink.files("v")]
    assert sorted(sent) == sorted(names[1:]), "a file was published more than once (or not at all)"
    assert len(reads) == 300 and set(reads.values()) == {1}, f"files read more than once: {sum(reads.values()) - len(reads)}"


async def test_a_change_after_the_group_read_is_published(env, monkeypatch):
    """A file rewritten (same size) after the group's read and before its examination goes out
    with its new content, not the content read ahead."""
    import daemon.source.volume as volume_mod

    w = env.worker("v")
    await until(lambda: w.index, what="index open")
    names = [f"f{i:02d}" for i in range(40)]
    for n in names:
        (w.vol.path / n).write_bytes(b"old" * 100)
    real = volume_mod.prefetch
    loop = asyncio.get_running_loop()

    def racing_prefetch(root, paths, bs, *a, **kw):
        out = real(root, paths, bs, *a, **kw)
        if "f30" in paths:
            time.sleep(0.01)  # a different mtime
            (w.vol.path / "f30").write_bytes(b"new" * 100)
            loop.call_soon_threadsafe(lambda: w.mark("f30", force=False))  # the watcher's event
        return out

    monkeypatch.setattr(volume_mod, "prefetch", racing_prefetch)
    w.scan_found([], names, {})
    await until(lambda: len(committed(env.state, "v")) == 40, timeout=30, what="all committed")
    await asyncio.sleep(0.3)  # a re-marked path would be examined again by now
    last = env.sink.files("v", "f30")[-1]
    assert last.payload == b"new" * 100


async def test_a_batch_failing_inside_a_group_loses_none_of_the_group(env, monkeypatch):
    """A batch fills and fails in the middle of a group: the group's paths not examined yet were
    already popped and must be marked again, not dropped."""
    import daemon.source.batch as batch_mod

    monkeypatch.setattr(batch_mod, "BATCH_PATHS", 10)
    w = env.worker("v")
    await until(lambda: w.index, what="index open")
    names = [f"f{i:03d}" for i in range(100)]
    for n in names:
        (w.vol.path / n).write_bytes(n.encode() * 10)
    env.sink.fail.add("v")
    w.scan_found([], names, {})
    await until(lambda: env.metric("volmirror_source_errors_total", volume="v", kind="publish") >= 1, what="a failed batch")
    env.sink.fail.clear()
    await until(lambda: len(committed(env.state, "v")) == 100, timeout=30, what="all 100 committed")
    assert len(w.dirty) == 0 and len(w.doubt) == 0
    for n in names:
        assert env.sink.files("v", n)[-1].payload == n.encode() * 10


async def test_a_live_change_goes_out_in_the_middle_of_a_large_file(env, monkeypatch):
    """Priority lane inside a file: a change made while a large file is being sent is published
    between two of its segments, before the file's manifest, not after the whole file."""
    import daemon.source.reader as reader_mod

    monkeypatch.setattr(reader_mod, "SEGMENT_BYTES", 1024 * 1024)
    w = env.worker("v")
    await until(lambda: w.index, what="index open")
    (w.vol.path / "big").write_bytes(os.urandom(40 * 1024 * 1024))
    (w.vol.path / "live").write_bytes(b"urgent")
    real_send = env.sink.send

    async def send(topic, key, value):
        fut = await real_send(topic, key, value)
        ev = env.sink.events[-1]
        if ev.op == "block" and ev.path == "big" and ev["off"] == 0:
            w.mark("live", force=True)  # as the watcher does, while the file is being sent
        await asyncio.sleep(0.001)  # a broker that takes its time
        return fut

    env.sink.send = send
    w.scan_found([], ["big"], {})
    await until(lambda: {"big", "live"} <= set(committed(env.state, "v")), timeout=60, what="both committed")
    live = env.sink.files("v", "live")[0].seq
    big_manifest = env.sink.ops("v", "manifest", "big")[-1].seq
    first_block = env.sink.ops("v", "block", "big")[0].seq
    assert first_block < live < big_manifest, (first_block, live, big_manifest)


async def worker_with_files(env, n: int, size: int):
    """A worker with ``n`` files of ``size`` random bytes on disk, not scanned yet."""
    w = env.worker("v")
    await until(lambda: w.index, what="index open")
    names = [f"b{i:04d}" for i in range(n)]
    for name in names:
        (w.vol.path / name).write_bytes(os.urandom(size))
    return w, names


async def test_a_backlog_is_paced_to_the_fastest_mirror_and_live_changes_still_go(env, monkeypatch):
    """With a mirror reporting it is far behind, the initial sync holds (records would only queue
    in the partition in front of live changes) while a live change is still published; when the
    mirror catches up the backlog goes on, and a mirror that stops reporting stops the pacing."""
    import daemon.source.pacing as pacing
    import daemon.source.volume as volume_mod

    monkeypatch.setattr(pacing, "PACE_STALE", 1.5)
    w, names = await worker_with_files(env, 1500, 16000)
    epoch = env.seqs.epoch
    # nobody writing: a backlog goes at full speed, however far behind the mirror is
    idle = [f"a{i:04d}" for i in range(300)]
    for n in idle:
        (w.vol.path / n).write_bytes(os.urandom(8192))
    w.mirror_position("site-a", epoch, env.seqs.last("v"))
    w.scan_found([], idle, {})
    await until(lambda: len(committed(env.state, "v")) == 300, timeout=10, what="an unpaced backlog")
    assert env.metric("volmirror_source_backlog_paced_seconds_total", volume="v") == 0
    # live changes come: the next backlog holds while the mirror is behind
    (w.vol.path / "first").write_bytes(b"a live change")
    w.mark("first", force=False)
    await until(lambda: env.sink.files("v", "first"), what="the first live change")
    start = env.seqs.last("v")
    w.mirror_position("site-a", epoch, start)  # a mirror that has applied nothing of this backlog
    w.mirror_position("site-b", "another-epoch", 10**9)  # a report of another epoch counts for nothing
    w.scan_found([], names, {})
    await asyncio.sleep(1.0)
    sent = len(env.sink.files("v")) - 301
    # unmeasured rate: PACE_MIN_RATE; the hold starts past PACE_SECONDS of it, checked per group
    window = pacing.PACE_SECONDS * pacing.PACE_MIN_RATE / 16000
    assert 0 < sent <= window + 2 * volume_mod.PREFETCH_PATHS, f"{sent} files published past a mirror that is behind"
    assert env.metric("volmirror_source_backlog_paced_seconds_total", volume="v") > 0.5
    behind = w.status()["fastest_mirror_behind"]
    assert behind["records"] >= sent and behind["bytes"] > sent * 16000 and behind["seconds"] > pacing.PACE_SECONDS
    (w.vol.path / "live").write_bytes(b"urgent")
    w.mark("live", force=True)
    w.mirror_position("site-a", epoch, start)  # still behind
    await until(lambda: env.sink.files("v", "live"), timeout=3, what="the live change, published while the backlog waits")
    assert len(env.sink.files("v")) < 1800
    for _ in range(200):  # the mirror catches up, report by report
        w.mirror_position("site-a", epoch, env.seqs.last("v"))
        if len(committed(env.state, "v")) == 1802:
            break
        await asyncio.sleep(0.05)
    assert len(committed(env.state, "v")) == 1802
    # a mirror that stops reporting (gone, or caught up and idle) does not hold anything back
    more = [f"c{i:04d}" for i in range(600)]
    for n in more:
        (w.vol.path / n).write_bytes(os.urandom(8192))
    w.mirror_position("site-a", epoch, env.seqs.last("v"))
    w.scan_found([], more, {})
    await until(lambda: len(committed(env.state, "v")) == 2402, timeout=15, what="the backlog, once the report is stale")


async def test_a_paced_backlog_stays_held_while_live_changes_keep_coming(env):
    """Writes arriving all the time (50/s) end each pacing wait: the lane publishes them, and the
    backlog must then wait again, not slip one group through per live change (which queued the
    whole small-file backlog in front of live writes: mixed p99 3.9 s)."""
    import daemon.source.pacing as pacing
    import daemon.source.volume as volume_mod

    w, names = await worker_with_files(env, 1500, 16000)
    epoch = env.seqs.epoch
    (w.vol.path / "first").write_bytes(b"a live change")
    w.mark("first", force=False)
    await until(lambda: env.sink.files("v", "first"), what="the first live change")
    start = env.seqs.last("v")
    w.scan_found([], names, {})
    live = []
    for i in range(75):  # 1.5 s of writes; the mirror reports it has applied nothing since
        name = f"live{i:02d}"
        (w.vol.path / name).write_bytes(b"urgent %d" % i)
        w.mark(name, force=False)
        live.append(name)
        w.mirror_position("site-a", epoch, start)
        await asyncio.sleep(0.02)
    await until(lambda: all(env.sink.files("v", n) for n in live[:-5]), timeout=3, what="the live changes")
    backlog = sum(1 for e in env.sink.files("v") if e.path.startswith("b"))
    window = pacing.PACE_SECONDS * pacing.PACE_MIN_RATE / 16000
    assert backlog <= window + 2 * volume_mod.PREFETCH_PATHS, f"{backlog} backlog files published past a mirror that is behind"


def test_sent_bytes_between_a_position_and_the_head():
    from daemon.source.publisher import Sent

    s = Sent()
    for seq in range(10, 20):
        s.add(seq, 100)
    assert s.after(19) == 0 and s.after(15) == 400 and s.after(9) == 1000 and s.after(3) is None
    assert s.after(25) == 0


async def test_files_in_a_new_directory_made_during_a_backlog_overtake_it(env):
    """A directory created (with its files) while an initial sync runs is a live change, and so are
    the files found in it: they must not wait behind the backlog."""
    w, names = await backlog_started(env)
    (w.vol.path / "newdir").mkdir()
    (w.vol.path / "newdir" / "f").write_bytes(b"made with its directory")
    w.mark("newdir", force=False)  # as the watcher does: the file's own event came before the watch
    await until(lambda: len(committed(env.state, "v")) == 1502, timeout=60, what="all committed")
    seqs = {e.path: e.seq for e in env.sink.files("v")}
    later = sum(1 for n in names if seqs[n] > seqs["newdir/f"])
    assert later > 500, f"only {later} backlog files were published after the new directory's file"


async def test_compressible_content_travels_compressed_and_arrives_intact(env):
    """source.compression: blocks and small files that compress are sent compressed (fewer bytes
    on the wire), incompressible ones as they are; the real decoder gives back the exact bytes."""
    w = env.worker("v", compression="zstd")
    await until(lambda: w.index, what="index open")
    text = b"registry entry 000123: land parcel, owner, boundaries\n" * 1200  # 64 KiB, compresses
    noise = os.urandom(50_000)
    (w.vol.path / "small.txt").write_bytes(text[:9000])
    (w.vol.path / "small.bin").write_bytes(noise[:9000])
    (w.vol.path / "big.txt").write_bytes(text)
    (w.vol.path / "big.bin").write_bytes(noise)
    w.scan_found([], ["small.txt", "small.bin", "big.txt", "big.bin"], {})
    await until(lambda: len(committed(env.state, "v")) == 4, timeout=30, what="all committed")
    assert env.sink.files("v", "small.txt")[-1].payload == text[:9000]
    assert env.sink.files("v", "small.bin")[-1].payload == noise[:9000]
    for name, want in (("big.txt", text), ("big.bin", noise)):
        blocks = sorted(env.sink.ops("v", "block", name), key=lambda e: e["off"])
        assert b"".join(e.payload for e in blocks) == want
    wire_bytes = {n: env.sink.wire_bytes("v", n) for n in ("small.txt", "small.bin", "big.txt", "big.bin")}
    assert wire_bytes["small.txt"] < 2000 and wire_bytes["big.txt"] < 8000, wire_bytes
    assert wire_bytes["small.bin"] > 9000 and wire_bytes["big.bin"] > 50_000, wire_bytes
