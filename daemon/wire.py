"""Events as frozen dataclasses ⇄ Kafka record values.

Record layout (schema version 1)::

    b"VM" | u8 schema version | u32 big-endian header length N | N bytes UTF-8 JSON header | payload

The JSON header holds the event's fields; only ``block`` and ``file`` events carry a payload (the
block's or small file's bytes, compressed when the header has ``z``, see :mod:`daemon.codec`; an
all-zero block travels with ``zero: true`` and no payload). The record key is the volume name,
so all events of one volume land, in order, in one partition.

:func:`decode` trusts nothing: every field is type-checked, paths are checked for shape (relative
POSIX, no ``..``, no NUL, no empty or ``.`` components, valid UTF-8, at most 255 bytes per component),
every number is bounded (see the ``MAX_*`` constants: nothing that would make ``pwrite``/``ftruncate``
fail forever, overflow a signed 64-bit SQLite integer or be NaN/infinite gets through), and any problem
raises :class:`~daemon.errors.RejectedEvent` with a bounded reason label. Checking that a path stays inside
the mirror root on disk is the jail's job (``daemon.mirror.jail``); checking a payload against its
hash happens here, before anything can be written.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field, replace
from typing import Any

from . import codec
from .blocks import HASH_LEN, block_hash, file_root, zero_hash
from .config import MAX_BLOCK, MIN_BLOCK, VOLUME_NAME_RE
from .errors import RejectedEvent

MAGIC = b"VM"
SCHEMA_VERSION = 1
_HDR = struct.Struct(">2sBI")
MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 1024 * 1024
MAX_PATH = 4096  # bytes of a relative path
NAME_MAX = 255  # bytes of one path component (Linux NAME_MAX)
MAX_LINK = 4095  # bytes of a symlink target (PATH_MAX - 1: symlink(2) refuses longer ones)
MAX_VOL = 255  # bytes of a volume name: it is a directory name under the mirror root
DEFAULT_MAX_FILE_SIZE = 1 << 44  # 16 TiB; the mirror's limit comes from mirror.max_file_size
MAX_I64 = (1 << 63) - 1  # counters and sequence numbers: signed 64-bit (SQLite INTEGER)
MIN_I64 = -(1 << 63)
MAX_TS = float(1 << 33)  # source wall clock, seconds: up to year 2242
MAX_INTERVAL = 86400.0  # announce heartbeat/checkpoint intervals, seconds
MAX_HOST = 255  # bytes of an announced host name
MAX_SRC = 4096  # bytes of an announced source path
EPOCH_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")  # epochs and checkpoint nonces (fullmatch)

# op → fields it must carry (beyond the common ones) with their JSON types.
_INT = int
_STR = str
OPS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "block": {"path": _STR, "off": _INT, "len": _INT, "hash": _STR, "size": _INT, "zero": bool, "bs": _INT},
    "truncate": {"path": _STR, "size": _INT, "bs": _INT},
    "manifest": {"path": _STR, "size": _INT, "mode": _INT, "mtime_ns": _INT, "root": _STR, "bs": _INT},
    # a whole file of at most one block in one record: truncate + block + manifest at once (small
    # files are most files: one record instead of three, and never half-applied)
    "file": {"path": _STR, "size": _INT, "mode": _INT, "mtime_ns": _INT, "root": _STR, "hash": _STR, "bs": _INT},
    "delete": {"path": _STR},
    "mkdir": {"path": _STR, "mode": _INT},
    "rmtree": {"path": _STR},
    "rename": {"path": _STR, "dst": _STR},
    "symlink": {"path": _STR, "target": _STR},
    "heartbeat": {},
    # A restore point: every file of the volume was read, and nothing changed, between the
    # previous record and this one (see daemon/source/points.py); the mirror can roll back to it
    "point": {"id": _INT},
    # Verification and coverage: a volume digest at a point in the stream, the source's index as a
    # listing (answer to a mirror whose checkpoint disagreed), and a volume announcement.
    "checkpoint": {"id": _INT, "files": _INT, "bytes": _INT, "root": _STR},
    # listing parts are sequenced like every other event; see daemon.listing for the protocol
    "listing": {"nonce": _STR, "part": _INT, "last": bool, "entries": list, "phash": _STR},
    "announce": {"host": _STR, "src": _STR, "block_size": _INT, "heartbeat_interval": (int, float), "checkpoint_interval": (int, float)},
}
OPTIONAL: dict[str, dict[str, type | tuple[type, ...]]] = {
    # ``z``: the payload is compressed with that codec (daemon.codec); decode returns it decompressed
    "block": {"z": _STR},
    "file": {"z": _STR},
    "manifest": {"repair": bool},
    "checkpoint": {"nonce": _STR},
    "listing": {"count": _INT, "root": _STR},  # required on the last part
    "announce": {"unprotected": _INT, "point_interval": (int, float)},  # paths the source cannot replicate (e.g. names not UTF-8)
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


def _utf8(s: str) -> bytes | None:
    """UTF-8 bytes of ``s``, or None when it holds lone surrogates (a name that was not UTF-8)."""
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        return None


def check_relpath(path: Any, what: str = "path") -> str:
    """Validate the *shape* of a relative POSIX path; return it unchanged or raise RejectedEvent.

    Besides shape: the path must be valid Unicode without lone surrogates (a name that was not valid
    UTF-8 at the source arrives surrogate-escaped, and the mirror's index cannot store it), at most
    MAX_PATH bytes, each component at most NAME_MAX bytes.
    """
    if not isinstance(path, str):
        raise RejectedEvent("bad_schema", f"{what} must be a string")
    if not path:
        raise RejectedEvent("unsafe_path", f"{what} is empty")
    raw = _utf8(path)
    if raw is None:
        raise RejectedEvent("unsafe_path", f"{what} is not valid UTF-8 (lone surrogates): {path!r}")
    if len(raw) > MAX_PATH:
        raise RejectedEvent("unsafe_path", f"{what} longer than {MAX_PATH} bytes")
    if b"\x00" in raw:
        raise RejectedEvent("unsafe_path", f"{what} contains NUL")
    if raw.startswith(b"/"):
        raise RejectedEvent("unsafe_path", f"{what} is absolute: {path!r}")
    for comp in raw.split(b"/"):
        if comp in (b"", b".", b".."):
            raise RejectedEvent("unsafe_path", f"{what} has a {comp.decode() or 'empty'!r} component: {path!r}")
        if len(comp) > NAME_MAX:
            raise RejectedEvent("unsafe_path", f"{what} has a component longer than {NAME_MAX} bytes")
    return path


def encode(ev: Event) -> bytes:
    hdr: dict[str, Any] = {"v": SCHEMA_VERSION, "op": ev.op, "vol": ev.vol, "seq": ev.seq, "epoch": ev.epoch, "ts": ev.ts}
    hdr.update(ev.fields)
    raw = json.dumps(hdr, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")
    return _HDR.pack(MAGIC, SCHEMA_VERSION, len(raw)) + raw + ev.payload


def key_for(vol: str) -> bytes:
    return vol.encode("utf-8")


def decode(value: bytes | None, key: bytes | None = None, *, max_file_size: int = DEFAULT_MAX_FILE_SIZE) -> Event:
    """Parse and validate one record value; raises RejectedEvent (never anything else).

    ``max_file_size`` bounds every file size, offset and length (larger: ``too_large``), so no
    record can ask the mirror for a write or truncate its file system refuses forever.
    """
    try:
        return _decode(value, key, max_file_size)
    except RejectedEvent:
        raise
    except Exception as e:  # anything unexpected in hostile bytes is still just a rejection
        raise RejectedEvent("malformed", f"undecodable record: {type(e).__name__}: {e}") from None


def _reject_constant(name: str) -> Any:
    raise RejectedEvent("bad_schema", f"non-finite number {name} in header")


_JSON = json.JSONDecoder(parse_constant=_reject_constant)  # one decoder, not one per record
_HEX_RE = re.compile(r"[0-9a-f]*")
_BASE = frozenset({"v", "op", "vol", "seq", "epoch", "ts"})
_KNOWN: dict[str, frozenset[str]] = {}


def _known(op: str) -> frozenset[str]:
    k = _KNOWN.get(op)
    if k is None:
        k = _KNOWN[op] = _BASE | set(OPS[op]) | set(OPTIONAL.get(op, {}))
    return k


def _hex(h: str) -> bool:
    """``h`` is a hash in lowercase hex."""
    return len(h) == 2 * HASH_LEN and _HEX_RE.fullmatch(h) is not None


def _typed(v: Any, typ: type | tuple[type, ...]) -> bool:
    """isinstance, except that a JSON boolean is never a number."""
    if isinstance(v, bool):
        return typ is bool or (isinstance(typ, tuple) and bool in typ)
    return isinstance(v, typ)


def _int_range(op: str, f: dict[str, Any], name: str, lo: int, hi: int) -> None:
    if name in f and not (lo <= f[name] <= hi):
        raise RejectedEvent("bad_schema", f"{op}: field {name!r} out of range [{lo}, {hi}]")


def _block_size_ok(bs: int) -> bool:
    return MIN_BLOCK <= bs <= MAX_BLOCK and bs & (bs - 1) == 0


def _text(op: str, name: str, v: str, max_bytes: int) -> None:
    raw = _utf8(v)
    if not v or raw is None or len(raw) > max_bytes or "\x00" in v:
        raise RejectedEvent("bad_schema", f"{op}: {name} must be 1..{max_bytes} bytes of UTF-8 without NUL")


def _decode(value: bytes | None, key: bytes | None, max_file_size: int) -> Event:
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
        hdr = _JSON.decode(value[_HDR.size : _HDR.size + hlen].decode("utf-8", "surrogateescape"))
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
    if not isinstance(vol, str) or not VOLUME_NAME_RE.fullmatch(vol) or len(vol) > MAX_VOL or vol in (".", ".."):
        raise RejectedEvent("bad_schema", f"bad volume name {vol!r}")
    if key is not None and bytes(key) != key_for(vol):
        raise RejectedEvent("key_mismatch", f"record key does not match volume {vol!r}")
    seq, epoch, ts = hdr.get("seq"), hdr.get("epoch"), hdr.get("ts")
    if not _typed(seq, int) or not (0 <= seq <= MAX_I64):
        raise RejectedEvent("bad_schema", "seq must be an integer in [0, 2**63)")
    if not isinstance(epoch, str) or not EPOCH_RE.fullmatch(epoch):
        raise RejectedEvent("bad_schema", "epoch must be 1..64 characters of [0-9A-Za-z_-]")
    # NaN fails every comparison, so it is rejected along with infinities and huge values
    if not _typed(ts, (int, float)) or not (0 <= ts <= MAX_TS) or not math.isfinite(ts):
        raise RejectedEvent("bad_schema", f"ts must be a finite number in [0, {MAX_TS:.0f}]")
    fields: dict[str, Any] = {}
    spec = OPS[op]
    for name, typ in spec.items():
        val = hdr.get(name)
        if not _typed(val, typ):
            raise RejectedEvent("bad_schema", f"{op}: field {name!r} missing or wrong type")
        fields[name] = val
    for name, typ in OPTIONAL.get(op, {}).items():
        if name in hdr:
            val = hdr[name]
            if not _typed(val, typ):
                raise RejectedEvent("bad_schema", f"{op}: field {name!r} wrong type")
            fields[name] = val
    if not _known(op).issuperset(hdr):
        extra = set(hdr) - _known(op)
        raise RejectedEvent("bad_schema", f"{op}: unexpected fields {sorted(extra)}")
    if "path" in fields:
        check_relpath(fields["path"])
    if op == "rename":
        check_relpath(fields["dst"], "dst")
    if op == "symlink":
        t = fields["target"]
        raw = _utf8(t)
        if not t or raw is None or b"\x00" in raw or len(raw) > MAX_LINK:
            raise RejectedEvent("unsafe_path", f"symlink target empty, longer than {MAX_LINK} bytes, not valid UTF-8 or contains NUL")
    # numbers: signed 64-bit at most (SQLite), sizes within what the mirror's file system can hold
    for name in ("off", "len", "size", "id", "files", "bytes"):
        _int_range(op, fields, name, 0, MAX_I64)
    if "part" in fields and fields["part"] < 0:
        raise RejectedEvent("bad_schema", f"{op}: field 'part' is negative")
    _int_range(op, fields, "mode", 0, 0o7777)
    _int_range(op, fields, "mtime_ns", MIN_I64, MAX_I64)  # negative: files dated before 1970
    if "size" in fields and fields["size"] > max_file_size:
        raise RejectedEvent("too_large", f"{op}: size {fields['size']} exceeds the mirror's max_file_size {max_file_size}")
    for name in ("hash", "root"):
        if name in fields:
            if not _hex(fields[name]):
                raise RejectedEvent("bad_schema", f"{op}: {name} must be {2 * HASH_LEN} lowercase hex digits")
    if "bs" in fields and not _block_size_ok(fields["bs"]):
        raise RejectedEvent("bad_schema", f"{op}: bs must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}")
    if op == "checkpoint" and "nonce" in fields and not EPOCH_RE.fullmatch(fields["nonce"]):
        raise RejectedEvent("bad_schema", "checkpoint: nonce must be 1..64 characters of [0-9A-Za-z_-]")
    if op == "announce":
        _check_announce(fields)
    if op == "listing":
        _check_listing(fields)
    if op == "block":
        payload = _check_block(fields, payload)
    elif op == "file":
        payload = _check_file(fields, payload)
    elif payload:
        raise RejectedEvent("bad_schema", f"{op}: unexpected payload")
    return Event(op=op, vol=vol, seq=seq, epoch=epoch, ts=float(ts), fields=fields, payload=payload)


MAX_LISTING_ROWS = 4096  # per part; a part is ~24 KiB of JSON, far fewer rows


def _check_listing(f: dict[str, Any]) -> None:
    if not EPOCH_RE.fullmatch(f["nonce"]):
        raise RejectedEvent("bad_schema", "listing: nonce must be 1..64 characters of [0-9A-Za-z_-]")
    if not 0 <= f["part"] <= MAX_I64:
        raise RejectedEvent("bad_schema", "listing: part out of range")
    if not _hex(f["phash"]):
        raise RejectedEvent("bad_schema", "listing: phash must be lowercase hex")
    if f["last"] != ("count" in f and "root" in f):
        raise RejectedEvent("bad_schema", "listing: count and root come with the last part, and only with it")
    if "count" in f and not 0 <= f["count"] <= MAX_I64:
        raise RejectedEvent("bad_schema", "listing: count out of range")
    rows = f["entries"]
    if len(rows) > MAX_LISTING_ROWS:
        raise RejectedEvent("bad_schema", f"listing: more than {MAX_LISTING_ROWS} rows in one part")
    for r in rows:
        if not (isinstance(r, list) and len(r) == 6 and r[1] in ("f", "d", "l")):
            raise RejectedEvent("bad_schema", "listing: malformed entry")
        check_relpath(r[0])
        if not all(_typed(x, int) for x in r[2:5]) or not isinstance(r[5], str):
            raise RejectedEvent("bad_schema", "listing: malformed entry")
        if not (0 <= r[2] <= MAX_I64 and 0 <= r[3] <= 0o7777 and MIN_I64 <= r[4] <= MAX_I64):
            raise RejectedEvent("bad_schema", "listing: number out of range")
        if r[1] == "f" and not _hex(r[5]):
            raise RejectedEvent("bad_schema", "listing: malformed root")


def _check_announce(f: dict[str, Any]) -> None:
    _text("announce", "host", f["host"], MAX_HOST)
    _text("announce", "src", f["src"], MAX_SRC)
    if "unprotected" in f and not 0 <= f["unprotected"] <= MAX_I64:
        raise RejectedEvent("bad_schema", "announce: unprotected out of range")
    if not _block_size_ok(f["block_size"]):
        raise RejectedEvent("bad_schema", f"announce: block_size must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}")
    for name in ("heartbeat_interval", "checkpoint_interval"):
        v = f[name]
        if not (0 < v <= MAX_INTERVAL) or not math.isfinite(v):
            raise RejectedEvent("bad_schema", f"announce: {name} must be a finite number in (0, {MAX_INTERVAL:.0f}]")


def _unpack(op: str, f: dict[str, Any], payload: bytes, length: int) -> bytes:
    """The payload decompressed if the record says it is compressed (``z``, removed from ``f``):
    into at most ``length`` bytes, whatever the record holds."""
    z = f.pop("z", None)
    if z is None:
        return payload
    if z not in codec.CODECS:
        raise RejectedEvent("bad_schema", f"{op}: unknown codec {z!r}")
    try:
        return codec.unpack(payload, z, length)
    except ValueError as e:
        raise RejectedEvent("malformed", f"{op}: payload does not decompress to its length: {e}") from None


def _check_file(f: dict[str, Any], payload: bytes) -> bytes:
    size = f["size"]
    if size > f["bs"] or size > MAX_PAYLOAD:
        raise RejectedEvent("too_large", f"file: size {size} is more than one block")
    payload = _unpack("file", f, payload, size)
    if len(payload) != size:
        raise RejectedEvent("bad_schema", f"file: payload is {len(payload)} bytes, header says {size}")
    h = block_hash(payload)  # of b"" for an empty file, which has no blocks
    if h.hex() != f["hash"]:
        raise RejectedEvent("hash_mismatch", "file: payload does not match its hash")
    if file_root(h if size else b"", size).hex() != f["root"]:
        raise RejectedEvent("hash_mismatch", "file: root is not the root of its hash")
    return payload


def _check_block(f: dict[str, Any], payload: bytes) -> bytes:
    length, off, size = f["len"], f["off"], f["size"]
    if length == 0 or length > MAX_PAYLOAD or length > f["bs"]:
        raise RejectedEvent("too_large", f"block length {length} out of range")
    if off % f["bs"]:
        raise RejectedEvent("bad_schema", "block offset is not a multiple of the block size")
    if off + length > size:
        raise RejectedEvent("bad_schema", "block extends past the file size")
    if f["zero"]:
        if payload or "z" in f:
            raise RejectedEvent("bad_schema", "zero block carries a payload")
        if zero_hash(length).hex() != f["hash"]:
            raise RejectedEvent("hash_mismatch", "zero block hash is not the hash of zeros")
        return payload
    payload = _unpack("block", f, payload, length)
    if len(payload) != length:
        raise RejectedEvent("bad_schema", f"payload is {len(payload)} bytes, header says {length}")
    if block_hash(payload).hex() != f["hash"]:
        raise RejectedEvent("hash_mismatch", "block payload does not match its hash")
    return payload
