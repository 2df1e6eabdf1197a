"""Listings: bounded parts, per-part and whole-listing verification, the spool at 100,000 entries."""

import time

import pytest

from daemon import wire
from daemon.digest import volume_digest
from daemon.store.source_index import Entry
from daemon.listing import PART_BYTES, parts
from daemon.store.listing_spool import ListingError, ListingSpool


def _rows(n):
    out = []
    for i in range(n):
        p = f"d{i // 1000:03d}/f{i:06d}-{'x' * (i % 40)}.txt"
        out.append([p, "f", i * 7, 0o644, 1_700_000_000_000_000_000 + i, f"{i:032x}"])
    out.sort(key=lambda r: r[0].encode())
    return out


def _entries(rows):
    return [Entry(r[0], "f", r[2], r[4], 0, r[3], None, b"", bytes.fromhex(r[5])) for r in rows]


def _events(rows, nonce="n1", epoch="e1", seq0=10):
    evs = []
    for i, f in enumerate(parts(rows, nonce)):
        ev = wire.Event("listing", "vol", seq0 + i, epoch, 1.0, f)
        evs.append(wire.decode(wire.encode(ev), b"vol"))  # every part passes the real decoder
    return evs


def test_100k_entries_verified_and_streamed(tmp_path):
    rows = _rows(100_000)
    t0 = time.monotonic()
    evs = _events(rows)
    assert len(evs) > 100
    for ev in evs:
        assert len(wire.encode(ev)) < wire.MAX_HEADER // 2  # room to spare under the header limit
    sp = ListingSpool(tmp_path / "spool.sqlite")
    done = None
    for ev in evs:
        done = sp.add(ev)
    assert done is not None and done.digest.count == 100_000
    root, _, _ = volume_digest(_entries(rows))
    assert evs[-1]["root"] == root.hex()  # the listing's root is the checkpoint digest
    back = list(sp.rows("vol"))
    assert [r.path for r in back] == [r[0] for r in rows]
    assert time.monotonic() - t0 < 60


def test_empty_listing_is_one_verified_part(tmp_path):
    evs = _events([])
    assert len(evs) == 1 and evs[0]["count"] == 0
    assert ListingSpool(tmp_path / "s").add(evs[0]) is not None


@pytest.mark.parametrize("damage", ["drop_middle", "swap", "bad_phash", "bad_count", "bad_root", "other_nonce", "seq_gap", "no_first"])
def test_incomplete_or_forged_listing_never_completes(tmp_path, damage):
    rows = _rows(3000)
    evs = _events(rows)
    assert len(evs) >= 3
    if damage == "drop_middle":
        del evs[1]
    elif damage == "swap":
        evs[1], evs[2] = evs[2], evs[1]
    elif damage == "bad_phash":
        evs[1] = evs[1].with_fields(phash="0" * 32)
    elif damage == "bad_count":
        evs[-1] = evs[-1].with_fields(count=evs[-1]["count"] - 1)
    elif damage == "bad_root":
        evs[-1] = evs[-1].with_fields(root="0" * 32)
    elif damage == "other_nonce":
        evs[1] = evs[1].with_fields(nonce="n2")
    elif damage == "seq_gap":
        evs[2] = wire.Event("listing", "vol", evs[2].seq + 1, "e1", 1.0, evs[2].fields)
    elif damage == "no_first":
        del evs[0]
    sp = ListingSpool(tmp_path / "spool.sqlite")
    results, errors = [], 0
    for ev in evs:
        try:
            results.append(sp.add(ev))
        except ListingError:
            errors += 1
    assert errors >= 1
    assert all(r is None for r in results)
    assert sp.receiving("vol") is None or sp.receiving("vol").next_part < len(_events(rows))


def test_rows_out_of_order_rejected(tmp_path):
    rows = _rows(10)
    rows[3], rows[4] = rows[4], rows[3]
    with pytest.raises(ValueError):
        list(parts(rows, "n"))


def test_parts_bounded():
    for f in parts(_rows(20_000), "n"):
        assert len(wire.encode(wire.Event("listing", "vol", 1, "e", 1.0, f))) < PART_BYTES + 1024
