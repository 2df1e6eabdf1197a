"""The mirror's history: an undo journal that can take a volume back to any restore point.

A source sends a ``point`` record when the volume's stream, up to there, is a state the volume
really had (:mod:`daemon.source.points`). From a volume's first point on, every change the mirror
makes to the volume's tree is preceded by an *undo entry* that takes it back: the bytes a write
overwrites, a file's size and metadata before its first change, "this path did not exist", a removed
path moved aside instead of deleted, a rename. The entries of the changes between point *k* and
the next point form *segment k* (``<history_dir>/<vol>/seg-<k>.undo``; removed paths go to
``obj-<k>/``). Rolling the tree back to point *k* is applying segments newest to *k*, each
entry in reverse order (:mod:`daemon.mirror.restore`).

**Write-ahead.** An entry is on disk (``fdatasync``) before the change it undoes is made, so after
a crash at any moment every change on disk has its entry. An entry whose change never happened
undoes nothing: each one *sets* a state (these bytes at this offset; this size and mode; this
path absent), which the tree already has if the change did not happen. To keep it to one
``fdatasync`` per batch rather than per record, the apply actor *plans* a run of records first
(:meth:`History.plan`): content records (block, truncate, manifest, file) and creations (mkdir,
symlink on a free path) have their entries computed against the tree before the run, which is
exact because within a run paths are only written or created, never removed or moved (a removal
in a run is planned too; a record on or below a path removed earlier in the run ends the run).
Anything else (renames, removals the applier decides on by itself, a write through a path whose
kind changed) is journalled by itself, just before it happens (:meth:`History.take`,
:meth:`History.renaming`, :meth:`History.before_op`).

**Only first changes are saved.** Per segment, the journal keeps which paths were created in it
(nothing of them needs saving), which files already have their original size and metadata saved,
and which of their blocks were saved: a block is saved once per segment, before its first write,
whole (clipped to the original size). After a restart this state is read back from the segment
file (:meth:`History.open`), so a record replayed after a crash never saves data it already wrote.

Before a volume's first point nothing is journalled: there is nothing to go back to, and the
initial sync pays nothing for history.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..blocks import _zeros
from ..wire import Event

log = logging.getLogger("volmirror.mirror.history")

_FRAME = struct.Struct(">II")  # body length, crc32 of the body
MAX_ENTRY = 64 * 1024 * 1024  # a frame longer than this is a torn or corrupt tail
SEG_RE = re.compile(r"^seg-(\d{8})\.undo$")
CONTENT_OPS = ("block", "truncate", "manifest", "file")
PAGE = 4096  # what of a block is saved: only its pages that a change alters (a 4 KiB edit saves 4 KiB, not the block)


def seg_name(k: int) -> str:
    return f"seg-{k:08d}.undo"


def obj_dir(k: int) -> str:
    return f"obj-{k:08d}"


def encode_entry(hdr: dict, data: bytes = b"") -> bytes:
    body = json.dumps(hdr, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode("utf-8", "surrogateescape") + b"\0" + data
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def effective(entries: list[tuple]) -> list[tuple]:
    """Entries without those a ``void`` entry cancels (a change journalled, then not made because
    it failed) and without the void entries themselves."""
    out: list[tuple] = []
    for e in entries:
        if e[0]["t"] == "void":
            if out:
                out.pop()
        else:
            out.append(e)
    return out


def read_entries(path: Path, limit: int | None = None, *, with_end: bool = False) -> Iterator:
    """Entries ``(header, data)`` of a segment file in order, up to ``limit`` bytes (``with_end``:
    ``(header, data, offset after it)``); stops at a torn or corrupt tail (the last entry written
    before a crash: its change was never made, see the module doc)."""
    with open(path, "rb") as f:
        buf = f.read() if limit is None else f.read(limit)
    pos = 0
    while pos + _FRAME.size <= len(buf):
        n, crc = _FRAME.unpack_from(buf, pos)
        body = buf[pos + _FRAME.size : pos + _FRAME.size + n]
        if n > MAX_ENTRY or len(body) < n or zlib.crc32(body) != crc:
            return
        hdr, _, data = body.partition(b"\0")
        pos += _FRAME.size + n
        h = json.loads(hdr.decode("utf-8", "surrogateescape"))
        yield (h, data, pos) if with_end else (h, data)


@dataclass
class PathState:
    """What segment k already holds for one path."""

    absent: bool = False  # did not exist at the segment's start (created in it): nothing to save
    orig_size: int | None = None  # a file's size at the start (its "orig" entry is written)
    saved: set[int] = field(default_factory=set)  # blocks whose original bytes are saved (all their pages)
    pages: dict[int, int] = field(default_factory=dict)  # block → bitmask of its pages saved (blocks saved in part)
    dir_saved: bool = False  # a directory's mode is saved


class Segment:
    """The open segment of one volume: its file, and what it holds per path."""

    def __init__(self, vdir: Path, k: int, vol_root: str) -> None:
        self.vdir = vdir
        self.vol_root = vol_root
        self.k = k
        self.path = vdir / seg_name(k)
        self.state: dict[str, PathState] = {}
        self.fd: int | None = None
        self.pending: list[bytes] = []
        self.objs = 0
        self.size = 0  # bytes of whole entries in the file (a torn tail after a crash is cut off)
        self.tail_void = False  # the last entry is a rename that was never made (the agent stopped between)
        self._load()
        if self.tail_void:
            self.void()  # said in the file before anything is appended after it

    def _load(self) -> None:
        """The state as the file says, counting only changes that were made: a ``moved`` whose
        object is not there never happened, and neither did a ``renamed`` that is the file's last
        entry while its source still exists (the agent stopped between the two)."""
        self.state.clear()
        self.objs = 0
        self.size = 0
        self.tail_void = False
        if not self.path.exists():
            return
        entries = list(read_entries(self.path, with_end=True))
        if entries:
            self.size = entries[-1][2]
        kept = effective(entries)
        if kept and kept[-1][0]["t"] == "renamed" and os.path.lexists(self._full(kept[-1][0]["p"])):
            kept.pop()
            self.tail_void = True
        for hdr, _, _ in kept:
            if hdr["t"] == "moved" and not os.path.lexists(self.vdir / hdr["obj"]):
                self.objs = max(self.objs, int(hdr["obj"].rsplit("/", 1)[1]) + 1)
                continue
            self.replay(hdr)

    def _full(self, path: str) -> str:
        return os.path.join(self.vol_root, path)

    # -- state ------------------------------------------------------------------------------------
    def nearest(self, path: str) -> tuple[str, PathState] | None:
        """The state of ``path`` or of its nearest ancestor that has one."""
        p = path
        while True:
            s = self.state.get(p)
            if s is not None:
                return p, s
            if "/" not in p:
                return None
            p = p.rsplit("/", 1)[0]

    def created(self, path: str) -> bool:
        """True if ``path`` did not exist at the segment's start (it or an ancestor was created in
        it, and nothing in between was renamed in)."""
        n = self.nearest(path)
        return n is not None and n[1].absent

    def moved_in_below(self, path: str) -> bool:
        """True if something below ``path`` existed at the segment's start (renamed in)."""
        pre = path + "/"
        return any(k.startswith(pre) and not s.absent for k, s in self.state.items())

    def replay(self, hdr: dict) -> None:
        """Update the state as the change an entry stands for does (also when reading a file back)."""
        t, p = hdr["t"], hdr.get("p", "")
        if t == "absent":
            self.state[p] = PathState(absent=True)
        elif t == "orig":
            s = self.state.setdefault(p, PathState())
            s.orig_size = hdr["size"]
        elif t == "data":
            s = self.state.setdefault(p, PathState())
            b = hdr["b"]
            if "np" not in hdr:
                s.saved.add(b)
            else:
                mask = s.pages.get(b, 0) | (((1 << -(-hdr["n"] // PAGE)) - 1) << hdr["pg"])
                if mask == (1 << hdr["np"]) - 1:
                    s.saved.add(b)
                    s.pages.pop(b, None)
                else:
                    s.pages[b] = mask
        elif t == "dir":
            self.state.setdefault(p, PathState()).dir_saved = True
        elif t == "moved":
            self._drop(p)
            self.objs = max(self.objs, int(hdr["obj"].rsplit("/", 1)[1]) + 1)
            self.state[p] = PathState(absent=True)  # anything made at p from now on is new
        elif t == "renamed":
            self._move(p, hdr["dst"])
        elif t == "void":
            pass  # only in pending entries; _load drops what it cancels

    def _drop(self, path: str) -> None:
        pre = path + "/"
        for k in [k for k in self.state if k == path or k.startswith(pre)]:
            del self.state[k]

    def _move(self, src: str, dst: str) -> None:
        src_created = self.created(src)
        self._drop(dst)
        pre = src + "/"
        moved = {k: s for k, s in self.state.items() if k == src or k.startswith(pre)}
        for k in moved:
            del self.state[k]
        for k, s in moved.items():
            self.state[dst + k[len(src):]] = s
        if dst not in self.state:
            # what arrives at dst existed at the start unless src was created in this segment
            self.state[dst] = PathState(absent=src_created)
        if not src_created:
            # src is free now, and what is made there next must be journalled as "absent" (its
            # undo removes it before the rename's undo brings src back): src is explicitly not
            # "created in this segment", whatever its parents are
            self.state[src] = PathState(absent=False)

    # -- writing ----------------------------------------------------------------------------------
    def add(self, hdr: dict, data: bytes = b"") -> None:
        self.pending.append(encode_entry(hdr, data))
        self.replay(hdr)

    def flush(self) -> None:
        """Write the pending entries and make them durable (before the changes they undo).

        On a failure (history_dir full) nothing of them counts: the file is cut back to its last
        whole entry, the state read back from it, and the OSError raised: the changes they were
        for must not be made (the caller retries them later)."""
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending.clear()
        try:
            if self.fd is None:
                self.vdir.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                _fsync_dir(self.vdir)
                os.ftruncate(self.fd, self.size)  # a torn tail of a crash goes
            view = memoryview(data)
            off = self.size
            while view:
                n = os.pwrite(self.fd, view, off)
                if n <= 0:
                    raise OSError(errno.ENOSPC, "short write to the history journal")
                view, off = view[n:], off + n
            os.fdatasync(self.fd)
        except OSError:
            try:
                if self.fd is not None:
                    os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            self._load()
            raise
        self.size += len(data)

    def discard(self) -> None:
        """Drop entries not flushed, and count only changes made (a run cut short): the state as
        on disk."""
        self.pending.clear()
        self._load()

    def void(self) -> None:
        """The change of the last entry was not made (it failed): journal that, state as on disk."""
        self.pending.clear()
        self.add({"t": "void"})
        self.flush()
        self._load()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def next_obj(self) -> str:
        name = f"{obj_dir(self.k)}/{self.objs}"
        self.objs += 1
        return name


def _changed(old: bytes, new: bytes | memoryview | None, cut: int | None) -> int:
    """Bitmask of the pages of a block (``old``: its bytes before, within the file's original size)
    that a change alters: ``new`` written at the block's start, and everything from ``cut`` (an
    offset in the block, if the file is cut there) gone."""
    mask = 0
    n = len(new) if new is not None else 0
    if isinstance(new, memoryview):
        new = new.tobytes()  # slices of bytes compare with memcmp; a memoryview's, byte by byte (9x slower)
    for i in range(-(-len(old) // PAGE)):
        lo, hi = i * PAGE, min((i + 1) * PAGE, len(old))
        if cut is not None and cut < hi:
            mask |= 1 << i  # (part of) this page goes with the cut
        elif new is not None and lo < n and new[lo : min(hi, n)] != old[lo : min(hi, n)]:
            mask |= 1 << i
    return mask


def _fsync_tree(p: Path) -> None:
    """fsync every file and directory of a copy (and its parent), before the original goes."""
    if p.is_dir() and not p.is_symlink():
        for dirpath, _, filenames in os.walk(p):
            for n in filenames:
                f = os.path.join(dirpath, n)
                if not os.path.islink(f):
                    fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            _fsync_dir(Path(dirpath))
    elif not p.is_symlink():
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(p.parent)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class History:
    """The undo journal of every volume of one mirror (owned by the apply actor's thread)."""

    def __init__(self, root: Path, mirror_root: Path) -> None:
        self.root = root
        self.mirror_root = str(mirror_root)
        self.segs: dict[str, Segment] = {}  # volume → its open segment (volumes with a point only)
        self.planned: dict[str, str] = {}  # full path → object it is to be moved to (planned removals)
        self._lock_fd: int | None = None
        self._sizes: dict[str, dict[int, int]] = {}  # volume → sealed segment → bytes
        self.broken: list[tuple[str, int]] = []  # (volume, segment) broken since the actor last looked
        # told of every first write over a block that existed at the last point: (volume, path,
        # old bytes, new bytes) — the mass-change guard's view of rewrites (daemon.mirror.guard)
        self.on_rewrite: Callable[[str, str, bytes, bytes], None] | None = None

    # -- segments ---------------------------------------------------------------------------------
    def open(self, vol: str, k: int) -> None:
        """Journal ``vol``'s changes into segment ``k`` (the volume's latest point is k)."""
        old = self.segs.get(vol)
        if old is not None:
            if old.k == k:
                return
            old.close()
        self.segs[vol] = Segment(self.root / vol, k, os.path.join(self.mirror_root, vol))

    def active(self, vol: str) -> bool:
        return vol in self.segs

    def flush(self) -> None:
        for s in list(self.segs.values()):
            self._flush(s)

    def _flush(self, seg: Segment) -> bool:
        """Flush a segment's entries; if the journal cannot be written (history_dir full, I/O
        error), the segment is *broken* instead of the mirror stopping: its volume is journalled
        no more until its next point, and the points up to it can no longer be restored (said by
        ``points``, refused by ``restore``). False if it broke."""
        try:
            seg.flush()
            return True
        except OSError as e:
            self._break(seg, f"cannot write the history journal: {e}")
            return False

    def _break(self, seg: Segment, why: str) -> None:
        vol = seg.vdir.name
        log.error("history of %s: %s; restore points up to %d can no longer be rebuilt; replicating on, journalling again from "
                  "the next point", vol, why, seg.k, extra={"volume": vol, "event": "history_broken"})
        try:
            seg.vdir.mkdir(parents=True, exist_ok=True)
            (seg.vdir / f"seg-{seg.k:08d}.broken").touch()
        except OSError:
            pass  # the index's points say it too (ApplyActor._run)
        seg.pending.clear()
        seg.close()
        if self.segs.get(vol) is seg:
            del self.segs[vol]
        self.planned = {f: o for f, o in self.planned.items() if not f.startswith(os.path.join(self.mirror_root, vol) + "/")}
        self.broken.append((vol, seg.k))

    def unmade(self, vol: str, path: str) -> None:
        """A record whose removal was planned was not applied (a duplicate, a failure): its
        "moved" entry never happened; the state must not say the path is gone."""
        seg = self.segs.get(vol)
        full = os.path.join(self.mirror_root, vol, path)
        if self.planned.pop(full, None) is not None and seg is not None:
            seg.discard()

    def discard(self) -> None:
        """Forget planned entries not flushed, and planned removals (a run that will not be applied)."""
        for s in self.segs.values():
            s.discard()
        self.planned.clear()

    def close(self) -> None:
        for s in self.segs.values():
            s.close()
        self.unlock()

    # -- the lock that keeps a restore's copy still (daemon.mirror.restore) -----------------------
    def lock(self, shared: bool = True) -> None:
        if self._lock_fd is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- planning a run (write-ahead for many records at once) --------------------------------------
    def plan(self, vr: str, ev: Event, removed: list[str]) -> bool:
        """Add the entries that undo ``ev`` to its volume's pending entries, computed against the
        tree as it is before the run; False if ``ev`` cannot be planned in this run (it ends the
        run: it is applied after the run, journalled by itself). ``removed``: paths removed earlier
        in the run (a record on or below one of them cannot be planned)."""
        seg = self.segs.get(ev.vol)
        if seg is None:
            return True
        path = ev.path
        for r in removed:
            if path == r or path.startswith(r + "/"):
                return False
        op = ev.op
        if op in CONTENT_OPS:
            return self._plan_content(seg, vr, path, ev)
        if op == "mkdir":
            return self._plan_create(seg, vr, path, "d")
        if op == "symlink":
            return self._plan_create(seg, vr, path, "l", ev["target"])
        if op in ("delete", "rmtree"):
            full = os.path.join(vr, path)
            if not os.path.lexists(full):
                return True
            self._moving(seg, path, full, plan=True)
            removed.append(path)
            return True
        return False  # rename, and anything else: by itself

    def before_op(self, vr: str, ev: Event) -> None:
        """Journal the undo of one record just before it is applied (not planned in a run)."""
        seg = self.segs.get(ev.vol)
        if seg is None:
            return
        if ev.op in CONTENT_OPS:
            if not self._plan_content(seg, vr, ev.path, ev):
                # something other than a file at the path, or a parent that is not a directory: the
                # applier removes it first (take() journals that); what is written then is new
                pass
        elif ev.op == "mkdir":
            self._plan_create(seg, vr, ev.path, "d")
        elif ev.op == "symlink":
            self._plan_create(seg, vr, ev.path, "l", ev["target"])
        self._flush(seg)

    def _missing_from(self, seg: Segment, vr: str, path: str) -> str | None:
        """The outermost of ``path`` and its parents that does not exist (None if path's parent
        exists as a directory); raises NotADirectoryError if a parent is not a directory."""
        parts = path.split("/")
        cur = vr
        for i, comp in enumerate(parts[:-1]):
            cur = os.path.join(cur, comp)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                return "/".join(parts[: i + 1])
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(cur)
        return None

    def _existing(self, seg: Segment, vr: str, path: str) -> os.stat_result | bool:
        """What is at ``path`` before a change that writes or creates it: its lstat if it existed at
        the segment's start; True if nothing (more) is to be journalled for it (created in this
        segment, or "absent" journalled now for it or its outermost missing parent); False if a
        parent is not a directory (the applier moves that aside first)."""
        if seg.created(path):
            return True
        try:
            missing = self._missing_from(seg, vr, path)
        except NotADirectoryError:
            return False
        if missing is not None:
            if not seg.created(missing):
                seg.add({"t": "absent", "p": missing})
            return True
        try:
            return os.lstat(os.path.join(vr, path))
        except FileNotFoundError:
            seg.add({"t": "absent", "p": path})
            return True

    def _plan_content(self, seg: Segment, vr: str, path: str, ev: Event) -> bool:
        st = self._existing(seg, vr, path)
        if isinstance(st, bool):
            return st
        full = os.path.join(vr, path)
        if not stat.S_ISREG(st.st_mode):
            return False
        s = seg.state.get(path)
        if s is None or s.orig_size is None:
            seg.add({"t": "orig", "p": path, "size": st.st_size, "mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns})
            s = seg.state[path]
        orig = s.orig_size or 0
        bs = int(ev.get("bs") or 0) or 128 * 1024
        op = ev.op
        if op == "block":
            first = last = ev["off"] // bs
        elif op == "file":
            first, last = 0, max(orig - 1, 0) // bs  # its content, and a truncation to its size
        elif op in ("truncate", "manifest"):
            if ev["size"] >= orig:
                return True
            first, last = ev["size"] // bs, (orig - 1) // bs
        else:
            return True
        todo = [b for b in range(first, last + 1) if b * bs < orig and b not in s.saved]
        if todo:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                for b in todo:
                    start = b * bs
                    old = os.pread(fd, min(bs, orig - start), start)
                    if op == "block":
                        new: bytes | memoryview | None = _zeros(ev["len"]) if ev["zero"] else ev.payload
                        cut = None  # a block write leaves what lies after it
                    elif op == "file":
                        new, cut = (ev.payload if b == 0 else None), ev["size"]
                    else:
                        new, cut = None, ev["size"]
                    first_touch = b not in s.pages
                    self._save(seg, s, path, b, start, old, _changed(old, new, cut - start if cut is not None else None))
                    if b == first and first_touch and op in ("block", "file") and ev.payload and self.on_rewrite is not None:
                        self.on_rewrite(ev.vol, path, old, ev.payload)
            finally:
                os.close(fd)
        return True

    @staticmethod
    def _save(seg: Segment, s: PathState, path: str, b: int, start: int, old: bytes, changed: int) -> None:
        """Journal the original bytes of the pages of block ``b`` (at ``start``) that this change
        alters and that are not saved yet, in runs of consecutive pages."""
        np = -(-len(old) // PAGE)
        want = changed & ~s.pages.get(b, 0)
        i = 0
        while i < np:
            if not want >> i & 1:
                i += 1
                continue
            j = i
            while j < np and want >> j & 1:
                j += 1
            data = old[i * PAGE : j * PAGE]
            seg.add({"t": "data", "p": path, "b": b, "off": start + i * PAGE, "pg": i, "np": np, "n": len(data)}, data)
            i = j

    def _plan_create(self, seg: Segment, vr: str, path: str, kind: str, target: str | None = None) -> bool:
        st = self._existing(seg, vr, path)
        if isinstance(st, bool):
            return st
        full = os.path.join(vr, path)
        if kind == "d" and stat.S_ISDIR(st.st_mode):
            s = seg.state.get(path)
            if s is None or not s.dir_saved:
                seg.add({"t": "dir", "p": path, "mode": stat.S_IMODE(st.st_mode)})
            return True
        if kind == "l" and stat.S_ISLNK(st.st_mode) and os.readlink(full) == target:
            return True  # the applier leaves it as it is
        return False  # something else is there: the applier removes it first (take())

    # -- removals and renames, just before they happen ----------------------------------------------
    def _moving(self, seg: Segment, path: str, full: str, *, plan: bool) -> None:
        if seg.created(path) and not seg.moved_in_below(path):
            return  # made in this segment: the restore removes it anyway
        obj = seg.next_obj()
        seg.add({"t": "moved", "p": path, "obj": obj})
        self.planned[full] = obj

    def take(self, vol: str, full: str) -> bool:
        """The applier is about to remove ``full``: if the volume keeps history, move it into the
        current segment's objects instead (journalled first) and return True; False: remove it."""
        seg = self.segs.get(vol)
        obj = self.planned.pop(full, None)
        if seg is None:
            return False
        if obj is None:
            path = os.path.relpath(full, os.path.join(self.mirror_root, vol))
            self._moving(seg, path, full, plan=False)
            obj = self.planned.pop(full, None)
            if obj is None:
                return False  # created in this segment: plainly removed
        if not self._flush(seg):
            return False
        dst = seg.vdir / obj
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(full, dst)
        except OSError as e:
            if e.errno != errno.EXDEV:
                seg.discard()  # its object is not there: the "moved" entry counts as never made
                raise
        else:
            return True
        # history_dir on another file system: copy (under a temporary name, so that an object that
        # is there is a whole one), then the applier removes the original
        tmp = dst.with_name(dst.name + ".tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.copytree(full, tmp, symlinks=True)
            else:
                shutil.copy2(full, tmp, follow_symlinks=False)
            _fsync_tree(tmp)
            os.rename(tmp, dst)
            _fsync_dir(dst.parent)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else (os.path.lexists(tmp) and os.unlink(tmp))
            seg.discard()
            raise
        return False

    def rename_parents(self, vol: str, vr: str, dst: str) -> None:
        """Before the applier creates the missing parents of a rename's destination."""
        seg = self.segs.get(vol)
        if seg is None or seg.created(dst):
            return
        try:
            missing = self._missing_from(seg, vr, dst)
        except NotADirectoryError:
            return  # the applier moves the file in the way aside first (take), then makes the parent
        if missing is not None and not seg.created(missing):
            seg.add({"t": "absent", "p": missing})
            self._flush(seg)

    def renaming(self, vol: str, src_full: str, dst_full: str) -> bool:
        """Just before ``os.rename(src, dst)`` (dst is free: the applier moved it away first).
        True if an entry was journalled (call :meth:`rename_failed` if the rename fails)."""
        seg = self.segs.get(vol)
        if seg is None:
            return False
        vr = os.path.join(self.mirror_root, vol)
        src, dst = os.path.relpath(src_full, vr), os.path.relpath(dst_full, vr)
        if seg.created(src) and not seg.moved_in_below(src):
            # nothing of it existed at the start: the restore removes it where it lands
            journalled = not seg.created(dst)
            if journalled:
                seg.add({"t": "absent", "p": dst})
                journalled = self._flush(seg)
            seg._move(src, dst)
            return journalled
        seg.add({"t": "renamed", "p": src, "dst": dst})
        return self._flush(seg)

    def rename_failed(self, vol: str, journalled: bool) -> None:
        """The ``os.rename`` :meth:`renaming` was told of failed."""
        seg = self.segs.get(vol)
        if seg is None:
            return
        if journalled and seg.size and not seg.pending:
            self._void(seg)
        else:
            seg.discard()  # the state as the journal says

    def _void(self, seg: Segment) -> None:
        """The last journalled change failed. If even that cannot be journalled, the segment can
        no longer take the tree back exactly: it is broken (see _flush)."""
        try:
            seg.void()
        except OSError as e:
            self._break(seg, f"cannot journal that a change failed: {e}")

    def unproven(self, vol: str, path: str, why: str) -> None:
        """A change the journal cannot undo exactly: restores through this segment report the path."""
        seg = self.segs.get(vol)
        if seg is not None:
            seg.add({"t": "unproven", "p": path, "why": why})
            self._flush(seg)

    # -- sizes and pruning ------------------------------------------------------------------------
    def segment_files(self, vol: str) -> list[int]:
        d = self.root / vol
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := SEG_RE.match(n)))

    def size(self, vol: str, k: int) -> int:
        """Disk bytes of segment k (its journal and the objects moved into it); sealed segments
        (not the open one) are measured once."""
        cache = self._sizes.setdefault(vol, {})
        if k in cache:
            return cache[k]
        vdir = self.root / vol
        n = tree_bytes(vdir / seg_name(k)) + tree_bytes(vdir / obj_dir(k))
        seg = self.segs.get(vol)
        if seg is not None and k < seg.k:  # sealed: it never changes again
            cache[k] = n
        return n

    def remove(self, vol: str, segments: list[int]) -> None:
        """Delete pruned segments (their points are already gone from the index)."""
        vdir = self.root / vol
        for k in segments:
            for p in (vdir / seg_name(k), vdir / f"seg-{k:08d}.broken"):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            shutil.rmtree(vdir / obj_dir(k), ignore_errors=True)
            self._sizes.get(vol, {}).pop(k, None)

    def forget(self, vol: str) -> None:
        """Drop the volume's whole history (its points are already gone from the index): after a
        failover it describes a tree that was written outside the stream since."""
        seg = self.segs.pop(vol, None)
        if seg is not None:
            seg.close()
        shutil.rmtree(self.root / vol, ignore_errors=True)
        self._sizes.pop(vol, None)

    def orphans(self, vol: str, oldest: int) -> list[int]:
        """Segments older than the oldest point (left by a prune that stopped halfway)."""
        return [k for k in self.segment_files(vol) if k < oldest]


def prune_plan(points: list[tuple[int, float]], sizes: dict[int, int], now: float, hours: float, max_bytes: float) -> list[int]:
    """Pure: which of the oldest points (and their segments) go. ``points``: (segment, applied
    time), oldest first; the latest always stays. A point goes while it is older than ``hours``, or
    while the history is larger than ``max_bytes``; restoring point k needs segments k and later,
    so dropping point k frees segment k."""
    total = sum(sizes.values())
    out: list[int] = []
    for k, ts in points[:-1]:
        if ts >= now - hours * 3600 and total <= max_bytes:
            break
        out.append(k)
        total -= sizes.get(k, 0)
    return out


def tree_bytes(p: Path) -> int:
    """Bytes used under ``p`` (st_blocks), 0 if it does not exist."""
    total = 0
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return 0
    total += st.st_blocks * 512
    if stat.S_ISDIR(st.st_mode):
        for dirpath, dirnames, filenames in os.walk(p):
            for n in dirnames + filenames:
                try:
                    total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
                except FileNotFoundError:
                    pass
    return total
