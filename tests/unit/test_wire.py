"""Wire format: round trip and rejection of malformed or hostile bytes."""

import json
import os
import struct

import pytest

from daemon import listing, wire
from daemon.blocks import block_hash, file_root, zero_hash
from daemon.errors import RejectedEvent


def ev(op, **fields):
    payload = fields.pop("payload", b"")
    return wire.Event(op=op, vol="vol1", seq=7, epoch="e1", ts=1700000000.5, fields=fields, payload=payload)


GOOD = [
    ev("block", path="a/b.txt", off=0, len=5, hash=block_hash(b"hello").hex(), size=5, zero=False, bs=16384, payload=b"hello"),
    ev("block", path="z", off=16384, len=16384, hash=zero_hash(16384).hex(), size=32768, zero=True, bs=16384),
    ev("truncate", path="a/b.txt", size=0, bs=16384),
    ev("manifest", path="a/b.txt", size=5, mode=0o644, mtime_ns=1, root="0" * 32, bs=16384),
    ev("manifest", path="r", size=0, mode=0o600, mtime_ns=2, root="1" * 32, bs=131072, repair=True),
    ev("delete", path="x"),
    ev("file", path="small.txt", size=5, mode=0o640, mtime_ns=3, root=file_root(block_hash(b"hello"), 5).hex(),
       hash=block_hash(b"hello").hex(), bs=16384, payload=b"hello"),
    ev("file", path="empty", size=0, mode=0o600, mtime_ns=4, root=file_root(b"", 0).hex(), hash=block_hash(b"").hex(), bs=16384),
    ev("mkdir", path="d/e", mode=0o755),
    ev("rmtree", path="d"),
    ev("rename", path="a", dst="b/c"),
    ev("symlink", path="l", target="../../anything/goes"),
    ev("heartbeat"),
    ev("checkpoint", id=3, files=10, bytes=100, root="f" * 32),
    ev("checkpoint", id=4, files=0, bytes=0, root="e" * 32, nonce="n1"),
    ev("listing", **next(listing.parts([["a", "f", 5, 420, 1, "0" * 32], ["d", "d", 0, 493, 0, ""], ["l", "l", 0, 0, 0, "t"]], "n1"))),
    ev("announce", host="h", src="/srv/x", block_size=131072, heartbeat_interval=5.0, checkpoint_interval=60.0),
]


@pytest.mark.parametrize("e", GOOD, ids=lambda e: e.op)
def test_round_trip(e):
    raw = wire.encode(e)
    assert raw[:2] == b"VM" and raw[2] == wire.SCHEMA_VERSION
    back = wire.decode(raw, wire.key_for(e.vol))
    assert back == e


def raw_with(header: dict, payload: bytes = b"", version: int = 1, magic: bytes = b"VM") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack(">2sBI", magic, version, len(h)) + h + payload


BASE = {"v": 1, "op": "delete", "vol": "vol1", "seq": 1, "epoch": "e", "ts": 1.0, "path": "ok"}


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"", "malformed"),
        (b"garbage bytes that are not an event", "malformed"),
        (b"\x00" * 3, "malformed"),
        (raw_with(BASE, magic=b"XX"), "malformed"),
        (raw_with(BASE, version=9), "bad_schema"),
        (struct.pack(">2sBI", b"VM", 1, 10**6) + b"{}", "malformed"),
        (struct.pack(">2sBI", b"VM", 1, 3) + b"\xff\xfe\xfd", "malformed"),
        (raw_with([1, 2]), "bad_schema"),
        (raw_with({**BASE, "op": "format_disk"}), "bad_schema"),
        (raw_with({**BASE, "seq": -1}), "bad_schema"),
        (raw_with({**BASE, "seq": True}), "bad_schema"),
        (raw_with({**BASE, "vol": "../etc"}), "bad_schema"),
        (raw_with({**BASE, "path": "/etc/passwd"}), "unsafe_path"),
        (raw_with({**BASE, "path": "../../etc/passwd"}), "unsafe_path"),
        (raw_with({**BASE, "path": "a/../../b"}), "unsafe_path"),
        (raw_with({**BASE, "path": "a/./b"}), "unsafe_path"),
        (raw_with({**BASE, "path": "a//b"}), "unsafe_path"),
        (raw_with({**BASE, "path": "a\u0000b"}), "unsafe_path"),
        (raw_with({**BASE, "path": ""}), "unsafe_path"),
        (raw_with({**BASE, "op": "rename", "dst": "../x"}), "unsafe_path"),
        (raw_with({**BASE, "extra": 1}), "bad_schema"),
        (raw_with({**BASE, "op": "mkdir", "mode": 0o1777777}), "bad_schema"),
        (raw_with(BASE, payload=b"unexpected"), "bad_schema"),
    ],
)
def test_rejects_malformed(raw, reason):
    with pytest.raises(RejectedEvent) as ei:
        wire.decode(raw, b"vol1")
    assert ei.value.reason == reason


def block_hdr(**kw):
    h = {"v": 1, "op": "block", "vol": "vol1", "seq": 1, "epoch": "e", "ts": 1.0, "path": "f", "off": 0, "len": 5,
         "hash": block_hash(b"hello").hex(), "size": 5, "zero": False, "bs": 16384}
    h.update(kw)
    return h


def test_block_hash_mismatch_rejected():
    with pytest.raises(RejectedEvent) as ei:
        wire.decode(raw_with(block_hdr(), b"HELLO"), b"vol1")
    assert ei.value.reason == "hash_mismatch"


def test_zero_block_with_wrong_hash_rejected():
    with pytest.raises(RejectedEvent) as ei:
        wire.decode(raw_with(block_hdr(zero=True, hash="0" * 32)), b"vol1")
    assert ei.value.reason == "hash_mismatch"


def test_block_payload_length_mismatch():
    with pytest.raises(RejectedEvent) as ei:
        wire.decode(raw_with(block_hdr(len=6, size=6), b"hello"), b"vol1")
    assert ei.value.reason == "bad_schema"


def test_block_past_file_size():
    with pytest.raises(RejectedEvent) as ei:
        wire.decode(raw_with(block_hdr(size=4), b"hello"), b"vol1")
    assert ei.value.reason == "bad_schema"


def test_key_must_match_volume():
    raw = wire.encode(GOOD[4])
    with pytest.raises(RejectedEvent) as ei:
        wire.decode(raw, b"other")
    assert ei.value.reason == "key_mismatch"


def test_none_value():
    with pytest.raises(RejectedEvent):
        wire.decode(None)


def test_non_utf8_file_name_rejected():
    # a name that is not valid UTF-8 arrives surrogate-escaped; the mirror's index cannot store it
    name = os.fsdecode(b"caf\xe9-latin1.txt")
    with pytest.raises(RejectedEvent) as ei:
        wire.decode(wire.encode(ev("delete", path=name)), b"vol1")
    assert ei.value.reason == "unsafe_path"


@pytest.mark.parametrize("entries", [[["../x", "f", 1, 1, 1, "0" * 32]], [["a", "x", 0, 0, 0, ""]], [["a", "f", 1, 1, 1, "zz"]], [["a", "f", -1, 1, 1, "0" * 32]], ["a"]])
def test_bad_listing_rejected(entries):
    raw = wire.encode(ev("listing", nonce="n", part=0, last=True, entries=entries, phash="0" * 32, count=1, root="0" * 32))
    with pytest.raises(RejectedEvent):
        wire.decode(raw, b"vol1")


def test_block_offset_must_align():
    with pytest.raises(RejectedEvent):
        wire.decode(raw_with(block_hdr(off=3, size=8)), b"vol1")


def _file_ev(data=b"hello", **over):
    f = {"path": "s", "size": len(data), "mode": 0o644, "mtime_ns": 1, "root": file_root(block_hash(data) if data else b"", len(data)).hex(),
         "hash": block_hash(data).hex(), "bs": 16384, "payload": data}
    f.update(over)
    return ev("file", **f)


@pytest.mark.parametrize("over, reason", [
    ({"payload": b"HELLO"}, "hash_mismatch"),  # content does not match its hash
    ({"root": "0" * 32}, "hash_mismatch"),  # root is not the root of (hash, size)
    ({"payload": b"hell"}, "bad_schema"),  # payload shorter than the size
    ({"big": True}, "too_large"),  # more than one block
])
def test_file_record_is_checked_whole(over, reason):
    e = _file_ev(**over) if "big" not in over else _file_ev(b"x" * 16385)
    with pytest.raises(RejectedEvent) as ei:
        wire.decode(wire.encode(e), b"vol1")
    assert ei.value.reason == reason
