"""Events as frozen dataclasses ⇄ Kafka record values.

Record layout (schema version 1)::

    b"VM" | u8 schema version | u32 big-endian header length N | N bytes UTF-8 JSON header | payload

The JSON header holds the event's fields; only ``block`` events carry a payload (the block's bytes;
an all-zero block travels with ``zero: true`` and no payload). The record key is the volume name,
so all events of one volume land, in order, in one partition.

:func:`decode` trusts nothing: every field is type-checked, paths are checked for shape (relative
POSIX, no ``..``, no NUL, no empty or ``.`` components), sizes are bounded, and any problem raises
:class:`~daemon.errors.RejectedEvent` with a bounded reason label. Checking that a path stays inside
the mirror root on disk is the jail's job (``daemon.mirror.jail``); checking a payload against its
hash happens here, before anything can be written.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace
from typing import Any

from .blocks import HASH_LEN, block_hash, zero_hash
from .config import VOLUME_NAME_RE
from .errors import RejectedEvent

MAGIC = b"VM"
SCHEMA_VERSION = 1
_HDR = struct.Struct(">2sBI")
MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 1024 * 1024
MAX_PATH = 4096

# op → fields it must carry (beyond the common ones) with their JSON types.
_INT = int
_STR = str
OPS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "block": {"path": _STR, "off": _INT, "len": _INT, "hash": _STR, "size": _INT, "zero": bool, "bs": _INT},
    "truncate": {"path": _STR, "size": _INT, "bs": _INT},
    "manifest": {"path": _STR, "size": _INT, "mode": _INT, "mtime_ns": _INT, "root": _STR, "bs": _INT},
    "delete": {"path": _STR},
    "mkdir": {"path": _STR, "mode": _INT},
    "rmtree": {"path": _STR},
    "rename": {"path": _STR, "dst": _STR},
    "symlink": {"path": _STR, "target": _STR},
    "heartbeat": {},
    # Verification and coverage: a volume digest at a point in the stream, the source's index as a
    # listing (answer to a mirror whose checkpoint disagreed), and a volume announcement.
    "checkpoint": {"id": _INT, "files": _INT, "bytes": _INT, "root": _STR},
    "listing": {"nonce": _STR, "part": _INT, "last": bool, "entries": list},
    "announce": {"host": _STR, "src": _STR, "block_size": _INT, "heartbeat_interval": (int, float), "checkpoint_interval": (int, float)},
}
OPTIONAL: dict[str, dict[str, type | tuple[type, ...]]] = {
    "manifest": {"repair": bool},
    "checkpoint": {"nonce": _STR},
}


@dataclass(frozen=True)
class Event:
    """One replicated operation (or heartbeat) of one volume.

    ``seq`` is the per-volume sequence number (strictly increasing within an ``epoch``; the epoch
    is a random id of the source's state, so a source that lost its state is recognised); ``ts`` is
    the source's wall-clock time in seconds when the event was made.
    """

    op: str
    vol: str
    seq: int
    epoch: str
    ts: float
    fields: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    @property
    def path(self) -> str:
        return self.fields.get("path", "")

    def with_fields(self, **kw: Any) -> "Event":
        return replace(self, fields={**self.fields, **kw})


def check_relpath(path: Any, what: str = "path") -> str:
    """Validate the *shape* of a relative POSIX path; return it unchanged or raise RejectedEvent."""
    if not isinstance(path, str):
        raise RejectedEvent("bad_schema", f"{what} must be a string")
    if not path or len(path.encode("utf-8", "surrogatepass")) > MAX_PATH:
        raise RejectedEvent("unsafe_path", f"{what} empty or too long")
    if "\x00" in path:
        raise RejectedEvent("unsafe_path", f"{what} contains NUL")
    if path.startswith("/"):
        raise RejectedEvent("unsafe_path", f"{what} is absolute: {path!r}")
    for comp in path.split("/"):
        if comp in ("", ".", ".."):
            raise RejectedEvent("unsafe_path", f"{what} has a {comp or 'empty'!r} component: {path!r}")
    return path


def encode(ev: Event) -> bytes:
    hdr: dict[str, Any] = {"v": SCHEMA_VERSION, "op": ev.op, "vol": ev.vol, "seq": ev.seq, "epoch": ev.epoch, "ts": ev.ts}
    hdr.update(ev.fields)
    raw = json.dumps(hdr, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")
    return _HDR.pack(MAGIC, SCHEMA_VERSION, len(raw)) + raw + ev.payload


def key_for(vol: str) -> bytes:
    return vol.encode("utf-8")


def decode(value: bytes | None, key: bytes | None = None) -> Event:
    """Parse and validate one record value; raises RejectedEvent (never anything else)."""
    try:
        return _decode(value, key)
    except RejectedEvent:
        raise
    except Exception as e:  # anything unexpected in hostile bytes is still just a rejection
        raise RejectedEvent("malformed", f"undecodable record: {type(e).__name__}: {e}") from None


def _decode(value: bytes | None, key: bytes | None) -> Event:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise RejectedEvent("malformed", "record has no value")
    value = bytes(value)
    if len(value) < _HDR.size:
        raise RejectedEvent("malformed", f"record too short ({len(value)} bytes)")
    magic, version, hlen = _HDR.unpack_from(value)
    if magic != MAGIC:
        raise RejectedEvent("malformed", "bad magic")
    if version != SCHEMA_VERSION:
        raise RejectedEvent("bad_schema", f"unsupported schema version {version}")
    if hlen > MAX_HEADER or _HDR.size + hlen > len(value):
        raise RejectedEvent("malformed", "header length out of range")
    try:
        # surrogateescape: file names that are not valid UTF-8 travel as their raw bytes
        hdr = json.loads(value[_HDR.size : _HDR.size + hlen].decode("utf-8", "surrogateescape"))
    except (UnicodeDecodeError, ValueError):
        raise RejectedEvent("malformed", "header is not UTF-8 JSON") from None
    payload = value[_HDR.size + hlen :]
    if not isinstance(hdr, dict):
        raise RejectedEvent("bad_schema", "header is not an object")
    if hdr.get("v") != SCHEMA_VERSION:
        raise RejectedEvent("bad_schema", "header schema version mismatch")
    op = hdr.get("op")
    if op not in OPS:
        raise RejectedEvent("bad_schema", f"unknown op {op!r}")
    vol = hdr.get("vol")
    if not isinstance(vol, str) or not VOLUME_NAME_RE.match(vol) or vol in (".", ".."):
        raise RejectedEvent("bad_schema", f"bad volume name {vol!r}")
    if key is not None and bytes(key) != key_for(vol):
        raise RejectedEvent("key_mismatch", f"record key does not match volume {vol!r}")
    seq, epoch, ts = hdr.get("seq"), hdr.get("epoch"), hdr.get("ts")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise RejectedEvent("bad_schema", "seq must be a non-negative integer")
    if not isinstance(epoch, str) or not (1 <= len(epoch) <= 64):
        raise RejectedEvent("bad_schema", "epoch must be a short string")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or ts < 0:
        raise RejectedEvent("bad_schema", "ts must be a non-negative number")
    fields: dict[str, Any] = {}
    spec = OPS[op]
    for name, typ in spec.items():
        val = hdr.get(name)
        if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
            raise RejectedEvent("bad_schema", f"{op}: field {name!r} missing or wrong type")
        fields[name] = val
    for name, typ in OPTIONAL.get(op, {}).items():
        if name in hdr:
            val = hdr[name]
            if not isinstance(val, typ):
                raise RejectedEvent("bad_schema", f"{op}: field {name!r} wrong type")
            fields[name] = val
    known = {"v", "op", "vol", "seq", "epoch", "ts"} | set(spec) | set(OPTIONAL.get(op, {}))
    extra = set(hdr) - known
    if extra:
        raise RejectedEvent("bad_schema", f"{op}: unexpected fields {sorted(extra)}")
    if "path" in fields:
        check_relpath(fields["path"])
    if op == "rename":
        check_relpath(fields["dst"], "dst")
    if op == "symlink":
        t = fields["target"]
        if not t or "\x00" in t or len(t) > MAX_PATH:
            raise RejectedEvent("unsafe_path", "symlink target empty, too long or contains NUL")
    for name in ("off", "len", "size", "mode", "mtime_ns", "id", "files", "bytes", "block_size", "part"):
        if name in fields and fields[name] < 0:
            raise RejectedEvent("bad_schema", f"{op}: field {name!r} is negative")
    if "mode" in fields and fields["mode"] > 0o7777:
        raise RejectedEvent("bad_schema", f"{op}: mode out of range")
    for name in ("hash", "root"):
        if name in fields:
            h = fields[name]
            if len(h) != 2 * HASH_LEN or not all(c in "0123456789abcdef" for c in h):
                raise RejectedEvent("bad_schema", f"{op}: {name} must be {2 * HASH_LEN} lowercase hex digits")
    if "bs" in fields and not (1024 <= fields["bs"] <= MAX_PAYLOAD and fields["bs"] & (fields["bs"] - 1) == 0):
        raise RejectedEvent("bad_schema", f"{op}: bs must be a power of two up to {MAX_PAYLOAD}")
    if op == "listing":
        _check_listing(fields["entries"])
    if op == "block":
        _check_block(fields, payload)
    elif payload:
        raise RejectedEvent("bad_schema", f"{op}: unexpected payload")
    return Event(op=op, vol=vol, seq=seq, epoch=epoch, ts=float(ts), fields=fields, payload=payload)


def _check_listing(rows: list) -> None:
    for r in rows:
        if not (isinstance(r, list) and len(r) == 6 and r[1] in ("f", "d", "l")):
            raise RejectedEvent("bad_schema", "listing: malformed entry")
        check_relpath(r[0])
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in r[2:5]) or not isinstance(r[5], str):
            raise RejectedEvent("bad_schema", "listing: malformed entry")
        if r[1] == "f" and (len(r[5]) != 2 * HASH_LEN or not all(c in "0123456789abcdef" for c in r[5])):
            raise RejectedEvent("bad_schema", "listing: malformed root")


def _check_block(f: dict[str, Any], payload: bytes) -> None:
    length, off, size = f["len"], f["off"], f["size"]
    if length == 0 or length > MAX_PAYLOAD or length > f["bs"]:
        raise RejectedEvent("too_large", f"block length {length} out of range")
    if off % f["bs"]:
        raise RejectedEvent("bad_schema", "block offset is not a multiple of the block size")
    if off + length > size:
        raise RejectedEvent("bad_schema", "block extends past the file size")
    if f["zero"]:
        if payload:
            raise RejectedEvent("bad_schema", "zero block carries a payload")
        if zero_hash(length).hex() != f["hash"]:
            raise RejectedEvent("hash_mismatch", "zero block hash is not the hash of zeros")
        return
    if len(payload) != length:
        raise RejectedEvent("bad_schema", f"payload is {len(payload)} bytes, header says {length}")
    if block_hash(payload).hex() != f["hash"]:
        raise RejectedEvent("hash_mismatch", "block payload does not match its hash")
