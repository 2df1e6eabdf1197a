"""Proving the mirror: index upkeep, manifest and checkpoint checks, listings, scrubbing, drift.

Runs on the mirror's apply thread (under the agent's apply lock), so it never races the applier.

* **Index upkeep** (:meth:`Verifier.applied`): every applied op updates the mirror index; a block
  records its hash, a manifest compares the root over the recorded hashes with the source's root —
  a mismatch is content drift found at apply time.
* **Checkpoints** (:meth:`Verifier.checkpoint`): at the checkpoint's point in the stream the mirror
  computes the digest of its index and compares it with the source's. Equal → "identical as of T"
  (``volmirror_last_verified_timestamp_seconds``). Unequal → it asks the source for a listing.
* **Listings** (:meth:`Verifier.listing`): the source's index at one point of the stream; compared
  path by path with the mirror index, they name the paths that drifted (and the extra ones).
* **Scrubbing** (:class:`Scrubber`): re-reads mirror files from disk at a bounded rate and compares
  them with the index: catches bit rot, and edits, deletions and additions made on the mirror host.
* **Drift and repair**: each drifted path is counted by kind, logged with its path, and (with
  ``repair`` on) repaired: metadata, directories, symlinks and extra files locally from what the index
  or listing says; file content by asking the source, through the control topic, for the blocks
  that differ from the mirror's (the request carries the mirror's block hashes).
"""

from __future__ import annotations

import logging
import os
import stat
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..blocks import HASH_LEN, block_count, block_hash, file_root
from ..digest import entry_key, volume_digest
from ..index import Entry
from ..wire import Event
from .applier import Applier
from .mindex import UNKNOWN, MirrorIndex

log = logging.getLogger("volmirror.mirror.verify")

KINDS = ("content", "missing", "extra", "metadata")
REREQUEST_AFTER = 30.0
LISTING_EVERY = 300.0  # a persistent mismatch (repair off) asks for a listing at most this often


@dataclass
class CheckpointResult:
    vol: str
    id: int
    ts: float
    match: bool
    nonce: str | None = None
    listing_nonce: str | None = None


class Verifier:
    def __init__(self, index: MirrorIndex, applier: Applier, metrics: Any, *, repair: bool, send: Callable[[dict], None]) -> None:
        self.idx = index
        self.ap = applier
        self.m = metrics
        self.repair = repair
        self.send = send  # queue a control request (called on the apply thread; sent by the agent)
        self.drift: dict[str, dict[str, str]] = {}
        self.requested: dict[tuple[str, str], float] = {}
        self.last_verified: dict[str, float] = {}
        self.results: dict[str, CheckpointResult] = {}  # by nonce, for `verify`
        self.listings: dict[str, list] = {}  # nonce → rows being received
        self.listing_done: set[str] = set()
        self.block_size: dict[str, int] = {}
        self.recorder: dict[str, dict[str, str]] | None = None  # drift found while `verify` runs
        self._listing_asked: dict[str, float] = {}

    # -- drift registry -------------------------------------------------------------------------
    def found(self, vol: str, path: str, kind: str, detail: str) -> bool:
        if self.recorder is not None:
            self.recorder.setdefault(vol, {})[path] = kind
        d = self.drift.setdefault(vol, {})
        new = d.get(path) != kind
        d[path] = kind
        if new:
            self.m.drift_detected.labels(vol, kind).inc()
            log.warning("drift (%s) %s: %s", kind, path, detail, extra={"volume": vol, "path": path, "kind": kind, "event": "drift"})
        self.m.drift_files.labels(vol).set(len(d))
        return new

    def resolved(self, vol: str, path: str, *, tree: bool = False) -> None:
        d = self.drift.get(vol)
        if not d:
            return
        pre = path + "/"
        gone = [p for p in d if p == path or (tree and p.startswith(pre))]
        for p in gone:
            del d[p]
            self.requested.pop((vol, p), None)
            self.m.repairs.labels(vol).inc()
            log.info("drift resolved: %s", p, extra={"volume": vol, "path": p, "event": "repaired"})
        if gone:
            self.m.drift_files.labels(vol).set(len(d))

    def drift_count(self, vol: str) -> int:
        return len(self.drift.get(vol, {}))

    # -- index upkeep -----------------------------------------------------------------------------
    def applied(self, ev: Event) -> None:
        vol, path, op = ev.vol, ev.path, ev.op
        idx = self.idx
        if op == "block":
            rec = idx.file(vol, path)
            self.block_size[vol] = ev["bs"]
            i = ev["off"] // ev["bs"]
            need = (i + 1) * HASH_LEN
            if len(rec.hashes) < need:
                rec.hashes.extend(UNKNOWN * ((need - len(rec.hashes)) // HASH_LEN))
            rec.hashes[i * HASH_LEN : need] = bytes.fromhex(ev["hash"])
            rec.size = ev["size"]
            idx.touch(vol, path)
        elif op == "truncate":
            self.block_size[vol] = ev["bs"]
            rec = idx.file(vol, path)
            rec.size = ev["size"]
            self._fit(vol, rec)
            idx.touch(vol, path)
        elif op == "manifest":
            self.block_size[vol] = ev.get("bs") or self.block_size.get(vol) or 131072
            rec = idx.file(vol, path)
            rec.size, rec.mode, rec.mtime_ns = ev["size"], ev["mode"], ev["mtime_ns"]
            self._fit(vol, rec)
            rec.root = file_root(bytes(rec.hashes), rec.size)
            idx.touch(vol, path)
            if rec.root.hex() != ev["root"]:
                self.found(vol, path, "content", "manifest root differs from the blocks applied (a change was lost)")
                self.request_file(vol, path, bytes(rec.hashes))
            else:
                self.resolved(vol, path)
        elif op in ("delete", "rmtree"):
            idx.remove(vol, path)
            self.resolved(vol, path, tree=True)
        elif op == "mkdir":
            idx.set_entry(vol, Entry(path, "d", mode=ev["mode"]))
            self.resolved(vol, path)
        elif op == "symlink":
            idx.set_entry(vol, Entry(path, "l", target=ev["target"]))
            self.resolved(vol, path)
        elif op == "rename":
            idx.move(vol, path, ev["dst"])
            self.resolved(vol, path, tree=True)

    def _fit(self, vol: str, rec: Any) -> None:
        bs = self.block_size.get(vol) or 131072
        n = block_count(rec.size, bs) * HASH_LEN
        if len(rec.hashes) > n:
            del rec.hashes[n:]
        elif len(rec.hashes) < n:
            rec.hashes.extend(UNKNOWN * ((n - len(rec.hashes)) // HASH_LEN))

    def announced(self, ev: Event) -> None:
        self.block_size[ev.vol] = ev["block_size"]

    # -- repair requests ------------------------------------------------------------------------
    def request_file(self, vol: str, path: str, hashes: bytes | None) -> None:
        if not self.repair:
            return
        k = (vol, path)
        now = time.monotonic()
        if now - self.requested.get(k, -1e9) < REREQUEST_AFTER:
            return
        self.requested[k] = now
        self.send({"type": "resync_file", "vol": vol, "path": path, "hashes": hashes.hex() if hashes is not None else None})

    def request_listing(self, vol: str) -> str:
        nonce = uuid.uuid4().hex
        self.send({"type": "listing", "vol": vol, "nonce": nonce})
        return nonce

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint(self, ev: Event) -> CheckpointResult:
        vol = ev.vol
        root, files, nbytes = volume_digest(self.idx.entries(vol))
        match = root.hex() == ev["root"]
        res = CheckpointResult(vol, ev["id"], ev.ts, match, ev.get("nonce"))
        self.m.checkpoints.labels(vol, "match" if match else "mismatch").inc()
        if match:
            self.last_verified[vol] = ev.ts
            self.m.last_verified.labels(vol).set(ev.ts)
            log.debug("checkpoint %d of %s matches (%d files, %d bytes)", ev["id"], vol, files, nbytes, extra={"volume": vol, "event": "checkpoint"})
        else:
            log.warning(
                "checkpoint %d of %s does not match: source %d files/%d bytes, mirror %d files/%d bytes",
                ev["id"], vol, ev["files"], ev["bytes"], files, nbytes, extra={"volume": vol, "event": "checkpoint_mismatch"},
            )
            now = time.monotonic()
            every = REREQUEST_AFTER if self.repair else LISTING_EVERY
            if res.nonce or now - self._listing_asked.get(vol, -1e9) >= every:
                self._listing_asked[vol] = now
                res.listing_nonce = self.request_listing(vol)
        if res.nonce:
            self.results[res.nonce] = res
        return res

    def listing(self, ev: Event, *, repair: bool | None = None) -> dict[str, str] | None:
        """Collect a listing's parts; at the last one compare with the index. Returns drift found."""
        nonce = ev["nonce"]
        rows = self.listings.setdefault(nonce, [])
        rows.extend(ev["entries"])
        if not ev["last"]:
            return None
        del self.listings[nonce]
        self.listing_done.add(nonce)
        return self.compare_listing(ev.vol, rows, repair=self.repair if repair is None else repair)

    def compare_listing(self, vol: str, rows: list, *, repair: bool) -> dict[str, str]:
        src: dict[str, Entry] = {}
        for r in rows:
            path, kind, size, mode, mtime, x = r
            if kind == "f":
                src[path] = Entry(path, "f", size, mtime, 0, mode, None, b"", bytes.fromhex(x))
            elif kind == "d":
                src[path] = Entry(path, "d", mode=mode)
            else:
                src[path] = Entry(path, "l", target=x)
        mine = {e.path: e for e in self.idx.entries(vol)}
        out: dict[str, str] = {}
        vr = self.ap.vol_root(vol)
        for path, se in src.items():
            me = mine.get(path)
            dk = _disk_kind(os.path.join(vr, path))
            if me is not None and entry_key(me) == entry_key(se) and dk == se.kind:
                continue
            if me is None or dk is None:
                kind = "missing"
            elif me.kind != se.kind or dk != se.kind:
                kind = "content"
            elif se.kind == "d" or (se.kind == "f" and (me.size, bytes(me.root)) == (se.size, bytes(se.root))):
                kind = "metadata"
            else:
                kind = "content"
            out[path] = kind
            self.found(vol, path, kind, "differs from the source's listing")
            if repair:
                self._repair_from(vol, se, me, kind)
        for path in sorted(set(mine) - set(src)):
            if any(path.startswith(p + "/") for p in out if out[p] == "extra"):
                continue
            out[path] = "extra"
            self.found(vol, path, "extra", "not in the source's listing")
            if repair:
                self._local(Event("delete", vol, 0, "", 0.0, {"path": path}))
        return out

    def _repair_from(self, vol: str, se: Entry, me: Entry | None, kind: str) -> None:
        """Repair one path towards the source's entry ``se``."""
        if se.kind == "d":
            self._local(Event("mkdir", vol, 0, "", 0.0, {"path": se.path, "mode": se.mode}))
        elif se.kind == "l":
            self._local(Event("symlink", vol, 0, "", 0.0, {"path": se.path, "target": se.target}))
        elif kind == "metadata" and me is not None:
            self._local(Event("manifest", vol, 0, "", 0.0, {"path": se.path, "size": se.size, "mode": se.mode, "mtime_ns": se.mtime_ns, "root": bytes(se.root).hex()}))
        else:
            full = os.path.join(self.ap.vol_root(vol), se.path)
            hashes = disk_hashes(full, self.block_size.get(vol) or 131072) if _disk_kind(full) == "f" else None
            self.request_file(vol, se.path, hashes)

    def _local(self, ev: Event) -> None:
        """Apply a locally built op (repair from what the index or a listing says)."""
        self.ap.apply(ev)
        self.applied(ev)

    # -- scrub results --------------------------------------------------------------------------
    def scrubbed(self, vol: str, e: Entry, problem: str | None, disk: bytes | None) -> None:
        if problem is None:
            return
        kind, detail = problem.split(":", 1)
        self.found(vol, e.path, kind, detail.strip())
        if not self.repair:
            return
        if kind == "extra":
            self._local(Event("delete", vol, 0, "", 0.0, {"path": e.path}))
            self.resolved(vol, e.path, tree=True)
        elif kind == "metadata" and e.kind == "f":
            self._local(Event("manifest", vol, 0, "", 0.0, {"path": e.path, "size": e.size, "mode": e.mode, "mtime_ns": e.mtime_ns, "root": bytes(e.root).hex()}))
        elif e.kind == "d":
            self._local(Event("mkdir", vol, 0, "", 0.0, {"path": e.path, "mode": e.mode}))
        elif e.kind == "l":
            self._local(Event("symlink", vol, 0, "", 0.0, {"path": e.path, "target": e.target}))
        else:
            self.request_file(vol, e.path, disk)


def _disk_kind(p: str) -> str | None:
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

    def __init__(self, verifier: Verifier) -> None:
        self.v = verifier
        self.passes: dict[str, _Pass] = {}
        self.last_pass: dict[str, float] = {}
        self.bytes_read = 0

    def step(self, vol: str, budget: int) -> int:
        """Scrub up to ``budget`` bytes of volume ``vol``; returns bytes read (0 = pass finished)."""
        p = self.passes.get(vol)
        if p is None:
            p = self.passes[vol] = _Pass(started=time.time())
            p.paths.extend(sorted(e.path for e in self.v.idx.entries(vol)))
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
        known = {e.path for e in self.v.idx.entries(vol)}
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
                    if r not in known:
                        self.v.scrubbed(vol, Entry(r, "?"), "extra: on the mirror's disk but not in the source's tree", None)
                    elif de.is_dir(follow_symlinks=False):
                        stack.append(r)
        del self.passes[vol]
        self.last_pass[vol] = time.time()
        self.v.m.scrub_last_pass.labels(vol).set(self.last_pass[vol])
