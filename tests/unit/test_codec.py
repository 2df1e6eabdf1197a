"""Per-record payload compression (daemon.codec) and its handling by the wire decoder."""

import os

import pytest

from daemon import codec, wire
from daemon.blocks import block_hash, file_root
from daemon.errors import RejectedEvent

TEXT = b"case 2026/0417: hearing adjourned to the next session\n" * 400  # compresses well
RANDOM = os.urandom(16384)  # does not


@pytest.mark.parametrize("name", codec.CODECS)
def test_round_trip_and_incompressible_data_travels_as_is(name):
    payload, z = codec.pack(TEXT, name)
    assert z == name and len(payload) < len(TEXT) // 4
    assert codec.unpack(payload, z, len(TEXT)) == TEXT
    assert codec.pack(RANDOM, name) == (RANDOM, "")
    assert codec.pack(b"x" * 100, name) == (b"x" * 100, "")  # too small to bother
    assert codec.pack(TEXT, "none") == (TEXT, "")


def test_a_packer_stops_trying_after_incompressible_data_then_tries_again():
    p = codec.Packer("zstd")
    assert p.pack(TEXT)[1] == "zstd"
    assert p.pack(RANDOM) == (RANDOM, "")
    skipped = [p.pack(TEXT)[1] for _ in range(codec.SKIP)]
    assert skipped == [""] * codec.SKIP  # sent as is, no CPU spent
    assert p.pack(TEXT)[1] == "zstd"
    with pytest.raises(ValueError):
        codec.Packer("gzip")


@pytest.mark.parametrize("name", codec.CODECS)
def test_unpack_never_inflates_past_the_declared_length(name):
    bomb, _ = codec.pack(bytes(1 << 20), name)  # 1 MiB of zeros in a few hundred bytes
    with pytest.raises(ValueError):
        codec.unpack(bomb, name, 4096)
    with pytest.raises(ValueError):  # shorter than declared
        codec.unpack(codec.pack(TEXT, name)[0], name, len(TEXT) + 1)
    with pytest.raises(ValueError):
        codec.unpack(b"not a compressed stream" * 40, name, 1000)


def block(payload, z, data=TEXT, **over):
    f = {"path": "a", "off": 0, "len": len(data), "hash": block_hash(data).hex(), "size": len(data), "zero": False,
         "bs": 1 << 20, **({"z": z} if z else {}), **over}
    return wire.encode(wire.Event(op="block", vol="vol1", seq=1, epoch="e", ts=1.0, fields=f, payload=payload))


def test_decode_returns_the_decompressed_payload_without_the_codec_field():
    payload, z = codec.pack(TEXT, "zstd")
    e = wire.decode(block(payload, z), b"vol1")
    assert e.payload == TEXT and "z" not in e.fields
    h = block_hash(TEXT)
    f = {"path": "s", "size": len(TEXT), "mode": 0o644, "mtime_ns": 1, "root": file_root(h, len(TEXT)).hex(), "hash": h.hex(),
         "bs": 1 << 20, "z": "lz4"}
    raw = wire.encode(wire.Event(op="file", vol="vol1", seq=2, epoch="e", ts=1.0, fields=f, payload=codec.pack(TEXT, "lz4")[0]))
    assert wire.decode(raw, b"vol1").payload == TEXT


@pytest.mark.parametrize("make, reason", [
    (lambda: block(codec.pack(TEXT, "zstd")[0], "gzip"), "bad_schema"),  # a codec we do not speak
    (lambda: block(b"garbage" * 100, "zstd"), "malformed"),
    (lambda: block(codec.pack(bytes(1 << 20), "zstd")[0], "zstd", data=bytes(4096)), "malformed"),  # a bomb
    (lambda: block(codec.pack(TEXT[:-1] + b"?", "zstd")[0], "zstd"), "hash_mismatch"),  # decompresses, wrong content
    (lambda: block(b"", "zstd", zero=True, data=bytes(16384)), "bad_schema"),  # a zero block has no payload to compress
    (lambda: block(codec.pack(TEXT, "zstd")[0], 7), "bad_schema"),
])
def test_hostile_compressed_records_are_rejected(make, reason):
    with pytest.raises(RejectedEvent) as ei:
        wire.decode(make(), b"vol1")
    assert ei.value.reason == reason
