"""The scrubber: re-reads the mirror's files from disk at a bounded rate and compares them with the index.

Catches bit rot, and edits, deletions and additions made on the mirror host. It only *reports*
(:meth:`daemon.mirror.verifier.Verifier.scrubbed`): a file on disk that the index does not know is
drift of kind ``extra``, never a reason to delete it — the index may be the one that is wrong (lost,
behind). Only a complete, verified listing from the source can justify removing it.

Owned by the apply actor; runs on its thread.
"""

from __future__ import annotations

import os
import stat
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from ..blocks import HASH_LEN, block_hash, file_root
from ..store.source_index import Entry
from ..store.mirror_index import UNKNOWN

if TYPE_CHECKING:
    from .verifier import Verifier


def disk_kind(p: str) -> str | None:
    try:
        m = os.lstat(p).st_mode
    except OSError:
        return None
    return "f" if stat.S_ISREG(m) else "d" if stat.S_ISDIR(m) else "l" if stat.S_ISLNK(m) else "o"


def disk_hashes(path: str, block_size: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    out = bytearray()
    try:
        while True:
            b = os.read(fd, block_size)
            if not b:
                break
            out += block_hash(b)
    except OSError:
        return None
    finally:
        os.close(fd)
    return bytes(out)


def _ancestors(path: str) -> Iterator[str]:
    i = path.rfind("/")
    while i > 0:
        path = path[:i]
        yield path
        i = path.rfind("/")


@dataclass
class _Pass:
    paths: deque = field(default_factory=deque)
    started: float = 0.0
    cur: Entry | None = None
    cur_gen: int = 0
    fd: int = -1
    off: int = 0
    hashes: bytearray = field(default_factory=bytearray)
    bad: str | None = None  # content problem (takes precedence)
    meta: str | None = None  # metadata problem


class Scrubber:
    """Re-reads mirror files against the index, a bounded number of bytes per step."""

    CHUNK = 4 * 1024 * 1024

    def __init__(self, verifier: "Verifier") -> None:
        self.v = verifier
        self.passes: dict[str, _Pass] = {}
        self.last_pass: dict[str, float] = {}
        self.bytes_read = 0

    def step(self, vol: str, budget: int) -> int:
        """Scrub up to ``budget`` bytes of volume ``vol``; returns bytes read (0 = pass finished)."""
        p = self.passes.get(vol)
        if p is None:
            p = self.passes[vol] = _Pass(started=time.time())
            p.paths.extend(self.v.idx.paths(vol))
        used = 0
        while used < budget or budget <= 0:
            if p.cur is None:
                if not p.paths:
                    self._finish(vol, p)
                    return used
                path = p.paths.popleft()
                e = self.v.idx.lookup(vol, path)
                if e is None:
                    continue
                used += self._start(vol, p, e) + 4096  # a stat's worth, so tiny files are bounded too
                continue
            used += self._read(vol, p, min(self.CHUNK, budget - used) if budget > 0 else self.CHUNK)
        return used

    def full_pass(self, vol: str) -> None:
        """A whole pass now, at full speed (for `verify`)."""
        self.passes.pop(vol, None)
        while True:
            self.step(vol, 0)
            if vol not in self.passes:
                return

    def _start(self, vol: str, p: _Pass, e: Entry) -> int:
        if (vol, e.path) in self.v.idx.writing:
            return 0  # between two versions until its manifest arrives: checked on a later pass
        full = os.path.join(self.v.ap.vol_root(vol), e.path)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            self.v.scrubbed(vol, e, "missing: not on the mirror's disk", None)
            return 0
        except OSError as err:
            self.v.scrubbed(vol, e, f"missing: cannot stat ({err.strerror})", None)
            return 0
        kind = "f" if stat.S_ISREG(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "o"
        if kind != e.kind:
            self.v.scrubbed(vol, e, f"content: is a {kind!r} on disk, index says {e.kind!r}", None)
            return 0
        if kind == "d":
            if stat.S_IMODE(st.st_mode) != e.mode:
                self.v.scrubbed(vol, e, f"metadata: mode {stat.S_IMODE(st.st_mode):o}, expected {e.mode:o}", None)
            return 0
        if kind == "l":
            t = os.readlink(full)
            if t != e.target:
                self.v.scrubbed(vol, e, f"content: symlink target {t!r}, expected {e.target!r}", None)
            return 0
        p.bad = f"content: size {st.st_size}, expected {e.size}" if st.st_size != e.size else None
        p.meta = None
        if stat.S_IMODE(st.st_mode) != e.mode or st.st_mtime_ns != e.mtime_ns:
            p.meta = f"metadata: mode {stat.S_IMODE(st.st_mode):o}/mtime {st.st_mtime_ns}, expected {e.mode:o}/{e.mtime_ns}"
        try:
            p.fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            self.v.scrubbed(vol, e, f"content: cannot open ({err.strerror})", None)
            return 0
        p.cur, p.cur_gen, p.off, p.hashes = e, self.v.idx.gen.get((vol, e.path), 0), 0, bytearray()
        return 0

    def _read(self, vol: str, p: _Pass, limit: int) -> int:
        e = p.cur
        if self.v.idx.gen.get((vol, e.path), 0) != p.cur_gen:
            self._close(p)  # written since we started: it will be checked on the next pass
            return 0
        bs = self.v.block_size.get(vol) or 131072
        n = 0
        try:
            while n < max(limit, bs):
                b = os.pread(p.fd, bs, p.off)
                if not b:
                    self._done(vol, p)
                    return n
                h = block_hash(b)
                i = p.off // bs
                known = e.hashes[i * HASH_LEN : (i + 1) * HASH_LEN]
                if p.bad is None and known not in (h, UNKNOWN, b""):
                    p.bad = f"content: block {i} (offset {p.off}) differs from what was applied"
                p.hashes += h
                p.off += len(b)
                n += len(b)
        except OSError as err:
            p.bad = f"content: read error ({err.strerror})"
            self._done(vol, p)
        self.bytes_read += n
        self.v.m.scrub_bytes.labels(vol).inc(n)
        return n

    def _done(self, vol: str, p: _Pass) -> None:
        e = p.cur
        self._close(p)
        if p.bad is None and e is not None:
            # a file that was never announced in full (UNKNOWN hashes) counts as content drift
            if len(p.hashes) == len(e.hashes) and bytes(e.root) and file_root(bytes(p.hashes), e.size) != bytes(e.root):
                p.bad = "content: root of the data on disk differs from the manifest"
        if e is not None:
            self.v.scrubbed(vol, e, p.bad or p.meta, bytes(p.hashes))

    def _close(self, p: _Pass) -> None:
        if p.fd >= 0:
            os.close(p.fd)
        p.fd, p.cur = -1, None

    def _finish(self, vol: str, p: _Pass) -> None:
        # extra files: on disk but not in the index
        vr = self.v.ap.vol_root(vol)
        known = set(self.v.idx.paths(vol))
        # directories the applier made for files that arrived before their own mkdir (which is on
        # its way, or the checkpoint digest, which covers directories, shows it missing): not extra
        holders = {a for p in known for a in _ancestors(p)}
        stack = [""]
        while stack:
            rel = stack.pop()
            try:
                it = os.scandir(os.path.join(vr, rel) if rel else vr)
            except OSError:
                continue
            with it:
                for de in it:
                    r = f"{rel}/{de.name}" if rel else de.name
                    if r not in known and r in holders and de.is_dir(follow_symlinks=False):
                        stack.append(r)
                    elif r not in known:
                        self.v.scrubbed(vol, Entry(r, "?"), "extra: on the mirror's disk but not in the mirror's index", None)
                    elif de.is_dir(follow_symlinks=False):
                        stack.append(r)
        del self.passes[vol]
        self.last_pass[vol] = time.time()
        self.v.m.scrub_last_pass.labels(vol).set(self.last_pass[vol])
