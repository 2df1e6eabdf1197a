"""The source's durable state: sequence reservations, per-volume index, read connection, batches."""

from __future__ import annotations

import errno
import json
import sqlite3

import pytest

from daemon.errors import PublishError, StateError
from daemon.store.source_index import Entry, SeqAllocator, SourceIndex
from daemon.source.batch import Batch


class FlakySeqs(SeqAllocator):
    """A real allocator whose state file cannot be written while ``broken`` (a full disk)."""

    RANGE = 3
    broken = False

    def _write(self, reserved):
        if self.broken:
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._write(reserved)


def test_failed_reservation_hands_out_nothing_and_is_retried(tmp_path):
    path = tmp_path / "sequence.json"
    s = FlakySeqs(path)
    assert [s.take("v") for _ in range(3)] == [1, 2, 3]  # reserved up to 4 (exclusive)
    s.broken = True
    for _ in range(2):  # every take past the durable mark fails, none hands out a number
        with pytest.raises(StateError, match="sequence.json.*No space left"):
            s.take("v")
    assert s.last("v") == 3 and s.ok is False
    assert json.loads(path.read_text())["reserved"] == {"v": 4}
    # a restart now continues at the durable mark: nothing above 3 was ever used
    assert FlakySeqs(path).next == {"v": 4}
    s.broken = False
    assert s.take("v") == 4 and s.ok is True
    assert json.loads(path.read_text())["reserved"] == {"v": 7}


def test_allocator_starts_even_if_state_dir_is_full(tmp_path):
    class Broken(FlakySeqs):
        broken = True

    s = Broken(tmp_path / "sequence.json")  # no crash at start-up: the first take retries the save
    with pytest.raises(StateError):
        s.take("v")
    s.broken = False
    assert s.take("v") == 1
    assert json.loads((tmp_path / "sequence.json").read_text())["epoch"] == s.epoch


def _e(path, size=1):
    return Entry(path, "f", size, 1, 1, 0o644, None, b"\0" * 16, b"\1" * 16)


def test_reader_sees_only_committed_rows_and_does_not_block_the_writer(tmp_path):
    idx = SourceIndex(tmp_path / "index-v.sqlite")
    idx.begin()
    idx.put("v", _e("a"))
    idx.commit()
    idx.begin()
    idx.put("v", _e("b"))  # open write transaction
    with idx.reader() as r:
        it = r.iter_volume("v")
        assert next(it).path == "a"
        idx.put("v", _e("c"))  # the writer goes on while a read is open
        assert list(it) == []
    idx.commit()
    with idx.reader() as r:
        assert [e.path for e in r.iter_volume("v", chunk=1)] == ["a", "b", "c"]
    idx.close()


def test_reader_orders_paths_by_utf8_bytes(tmp_path):
    idx = SourceIndex(tmp_path / "i.sqlite")
    idx.begin()
    for p in ("z", "é", "a/b", "a0", "a", "\u4e2d"):
        idx.put("v", _e(p))
    idx.commit()
    with idx.reader() as r:
        got = [e.path for e in r.iter_volume("v")]
    assert got == sorted(got, key=lambda p: p.encode())
    idx.close()


class FullIndex(SourceIndex):
    full = False

    def commit(self):
        if self.full and self.in_transaction:
            raise sqlite3.OperationalError("database or disk is full")
        super().commit()


async def test_batch_commits_after_acks_and_rolls_back_on_failures(tmp_path):
    import asyncio

    idx = FullIndex(tmp_path / "index-v.sqlite")
    loop = asyncio.get_running_loop()

    ok = loop.create_future()
    ok.set_result(None)
    b = Batch(idx, "v")
    b.put(_e("a"))
    b.sent("manifest", ok)
    await b.settle()
    assert idx.get("v", "a") is not None and not idx.in_transaction

    bad = loop.create_future()
    bad.set_exception(ConnectionError("no ack"))
    b = Batch(idx, "v")
    b.put(_e("b"))
    b.sent("manifest", bad)
    with pytest.raises(PublishError):
        await b.settle()
    assert idx.get("v", "b") is None and not idx.in_transaction

    idx.full = True
    b = Batch(idx, "v")
    b.put(_e("c"))
    b.sent("manifest", ok)
    with pytest.raises(StateError, match=r"index-v\.sqlite.*full"):
        await b.settle()
    idx.full = False
    assert idx.get("v", "c") is None and not idx.in_transaction
    idx.close()


def test_a_rename_onto_a_directory_with_rows_merges_like_the_mirror(tmp_path):
    """A directory's new content examined (and published) before its rename event: the rename
    must not drop those rows (the mirror merges; a listing would then delete live files)."""
    from daemon.store.source_index import DIR, FILE, Entry, SourceIndex

    idx = SourceIndex(tmp_path / "i.sqlite")
    idx.begin()
    for path, kind in [("old", DIR), ("old/a", FILE), ("old/b", FILE), ("new", DIR), ("new/b", FILE), ("new/c", FILE)]:
        idx.put("v", Entry(path, kind, 1 if kind == FILE else 0, 2, 3, 0o644))
    idx.rename("v", "old", "new")
    idx.commit()
    assert sorted(idx.children("v", "new")) == ["new/a", "new/b", "new/c"]
    assert idx.get("v", "old") is None and idx.get("v", "old/a") is None and idx.get("v", "new") is not None
