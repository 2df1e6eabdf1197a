"""Proving the mirror: index upkeep, manifest and checkpoint checks, listing reconciliation.

Owned by the apply actor (:mod:`daemon.mirror.consumer`) and run on its thread, so it never races
the applier.

* **Index upkeep** (:meth:`Verifier.applied`): every applied op updates the mirror index; a block
  records its hash, a manifest compares the root over the recorded hashes with the source's root —
  a mismatch is content drift found at apply time.
* **Checkpoints** (:meth:`Verifier.checkpoint`): at the checkpoint's point in the stream the mirror
  computes the digest of its index and compares it with the source's. Equal → "identical as of T"
  (``volmirror_last_verified_timestamp_seconds``). Unequal → it asks the source for a listing.
* **Listings** (:meth:`Verifier.listing`): the source's index at one point of the stream, received
  in sequenced, verified parts (:mod:`daemon.store.listing_spool`). Only a *complete, verified* listing
  that this mirror asked for is compared, path by path, with the mirror's index **and disk**
  (:mod:`daemon.mirror.repair` decides): files already on disk are hashed and adopted when they
  are the source's (an index that was lost or behind is rebuilt without transfers), only differing
  blocks are fetched, and a path is deleted only because the listing proves the source lacks it
  (``volmirror_mirror_deleted_files_total{reason="listing"}``).
* **Scrub results** (:meth:`Verifier.scrubbed`, from :mod:`daemon.mirror.scrubber`): a drifted
  file is re-fetched, metadata fixed from the index; a file the index does not know is recorded as
  ``extra`` drift and answered with a listing request — never deleted on the scrubber's word.
"""

from __future__ import annotations

import logging
import os
import stat
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..blocks import HASH_LEN, block_count, file_root
from ..digest import volume_digest
from ..store.source_index import Entry
from ..listing import Row
from ..wire import Event
from . import repair as R
from ..errors import RejectedEvent
from .applier import Applier, ApplyError
from .drift import Drift
from ..store.mirror_index import UNKNOWN, MirrorIndex
from .scrubber import disk_hashes, disk_kind
from ..store.listing_spool import ListingError, ListingSpool

log = logging.getLogger("volmirror.mirror.verify")

REREQUEST_AFTER = 30.0
LISTING_EVERY = 300.0  # a persistent mismatch (repair off) asks for a listing at most this often
LISTING_RETRY = 60.0  # an extra path found by the scrubber asks again after this long
NONCE_TTL = 3600.0  # a listing we asked for is acted on if it arrives within this time


@dataclass
class CheckpointResult:
    vol: str
    id: int
    ts: float
    match: bool
    nonce: str | None = None
    listing_nonce: str | None = None


class Verifier:
    def __init__(self, index: MirrorIndex, applier: Applier, metrics: Any, drift: Drift, spool: ListingSpool, *, repair: bool,
                 send: Callable[[dict], None], is_quarantined: Callable[[str, str], bool] = lambda v, p: False) -> None:
        self.idx = index
        self.ap = applier
        self.m = metrics
        self.drift = drift
        self.spool = spool
        self.repair = repair
        self.send = send  # queue a control request (called on the apply thread; sent by the agent)
        self.quarantined = is_quarantined
        self.requested: dict[tuple[str, str], float] = {}
        self.last_verified: dict[str, float] = {}
        self.results: dict[str, CheckpointResult] = {}  # by nonce, for `verify`
        self.listing_done: set[str] = set()
        self.block_size: dict[str, int] = {}
        self.asked: dict[str, float] = {}
        self.adopted = 0  # files adopted from disk by the last listing compared  # listing nonces this mirror asked for → monotonic time
        self._listing_asked: dict[str, float] = {}

    # -- drift shortcuts ------------------------------------------------------------------------
    def found(self, vol: str, path: str, kind: str, detail: str) -> bool:
        return self.drift.found(vol, path, kind, detail)

    def resolved(self, vol: str, path: str, *, tree: bool = False) -> None:
        for p in self.drift.resolved(vol, path, tree=tree):
            self.requested.pop((vol, p), None)

    def drift_count(self, vol: str) -> int:
        return self.drift.count(vol)

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
            idx.writing.add((vol, path))
        elif op == "truncate":
            self.block_size[vol] = ev["bs"]
            rec = idx.file(vol, path)
            rec.size = ev["size"]
            self._fit(vol, rec)
            idx.touch(vol, path)
            idx.writing.add((vol, path))
        elif op == "manifest":
            self.block_size[vol] = ev.get("bs") or self.block_size.get(vol) or 131072
            rec = idx.file(vol, path)
            rec.size, rec.mode, rec.mtime_ns = ev["size"], ev["mode"], ev["mtime_ns"]
            self._fit(vol, rec)
            rec.root = file_root(bytes(rec.hashes), rec.size)
            idx.touch(vol, path)
            idx.writing.discard((vol, path))
            if rec.root.hex() != ev["root"]:
                self.found(vol, path, "content", "manifest root differs from the blocks applied (a change was lost)")
                self.request_file(vol, path, bytes(rec.hashes))
            else:
                self.resolved(vol, path)
        elif op == "file":
            self.block_size[vol] = ev["bs"]
            rec = idx.file(vol, path)
            rec.size, rec.mode, rec.mtime_ns = ev["size"], ev["mode"], ev["mtime_ns"]
            rec.hashes[:] = bytes.fromhex(ev["hash"]) if ev["size"] else b""
            rec.root = file_root(bytes(rec.hashes), rec.size)  # == ev["root"]: wire.decode checked it
            idx.touch(vol, path)
            idx.writing.discard((vol, path))
            self.resolved(vol, path)
        elif op in ("delete", "rmtree"):
            idx.remove(vol, path)
            _forget_writing(idx.writing, vol, path)
            self.resolved(vol, path, tree=True)
            self._prune_implicit(vol, path)
        elif op == "mkdir":
            idx.set_entry(vol, Entry(path, "d", mode=ev["mode"]))
            self.resolved(vol, path)
        elif op == "symlink":
            idx.set_entry(vol, Entry(path, "l", target=ev["target"]))
            self.resolved(vol, path)
        elif op == "rename":
            # src gone from disk and dst there: a replay of a rename already done on disk (crash
            # between the rename and its index write: move the rows), or a rename whose source
            # this mirror never had (nothing to move: dst's rows stay)
            if not self.ap.noop or idx.lookup(vol, path) is not None or idx.paths_below(vol, path):
                idx.move(vol, path, ev["dst"], merge=self.ap.merged)
            moved = _forget_writing(idx.writing, vol, path)
            _forget_writing(idx.writing, vol, ev["dst"])
            idx.writing.update((vol, ev["dst"] + p[len(path):]) for p in moved)
            self._prune_implicit(vol, path)
            self.resolved(vol, path, tree=True)
            self.resolved(vol, ev["dst"], tree=True)

    def _prune_implicit(self, vol: str, path: str) -> None:
        """Remove parents of ``path`` that the applier created implicitly (never in the index: the
        source published files before their directory) once they are empty — they hold no data, and
        the source never sends anything that would remove them."""
        vr = self.ap.vol_root(vol)
        parent = os.path.dirname(path)
        while parent and self.idx.lookup(vol, parent) is None and not self.idx.paths_below(vol, parent):
            try:
                os.rmdir(os.path.join(vr, parent))
            except OSError:
                return  # not empty on disk, or gone: leave it
            parent = os.path.dirname(parent)

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
        if not self.repair or self.quarantined(vol, path):
            return
        k = (vol, path)
        now = time.monotonic()
        if now - self.requested.get(k, -1e9) < REREQUEST_AFTER:
            return
        self.requested[k] = now
        self.send({"type": "resync_file", "vol": vol, "path": path, "hashes": hashes.hex() if hashes is not None else None})

    def request_listing(self, vol: str) -> str:
        nonce = uuid.uuid4().hex
        now = time.monotonic()
        self.asked = {n: t for n, t in self.asked.items() if now - t < NONCE_TTL}
        self.asked[nonce] = now
        self._listing_asked[vol] = now
        self.send({"type": "listing", "vol": vol, "nonce": nonce})
        return nonce

    def maybe_request_listing(self, vol: str, every: float) -> str | None:
        if time.monotonic() - self._listing_asked.get(vol, -1e9) < every:
            return None
        return self.request_listing(vol)

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
            # the index equals the source's: what the scrubber called "extra" is not in the index
            # either, so it still shows; a listing is the only thing that clears it
            log.debug("checkpoint %d of %s matches (%d files, %d bytes)", ev["id"], vol, files, nbytes, extra={"volume": vol, "event": "checkpoint"})
        else:
            log.warning(
                "checkpoint %d of %s does not match: source %d files/%d bytes, mirror index %d files/%d bytes",
                ev["id"], vol, ev["files"], ev["bytes"], files, nbytes, extra={"volume": vol, "event": "checkpoint_mismatch"},
            )
        if not match or any(k == "extra" for k in self.drift.paths.get(vol, {}).values()):
            every = REREQUEST_AFTER if self.repair else LISTING_EVERY
            res.listing_nonce = self.request_listing(vol) if res.nonce else self.maybe_request_listing(vol, every)
        if res.nonce:
            self.results[res.nonce] = res
        return res

    # -- listings -------------------------------------------------------------------------------
    def listing(self, ev: Event, *, repair: bool | None = None) -> dict[str, str] | None:
        """Take one listing part (already deduplicated by (epoch, seq)); compare once complete."""
        vol = ev.vol
        try:
            done = self.spool.add(ev)
        except ListingError as e:
            self.m.listings.labels(vol, "discarded").inc()
            log.warning("listing of %s discarded, nothing compared: %s", vol, e, extra={"volume": vol, "event": "listing_discarded"})
            return None
        if done is None:
            return None
        try:
            if done.nonce not in self.asked:
                # valid, but not an answer to us (another site's, or replayed after our restart):
                # acting on it would be safe, but nothing asked for it — keep the rule simple
                log.info("listing %s of %s is not one this mirror asked for; ignored", done.nonce, vol, extra={"volume": vol})
                return None
            del self.asked[done.nonce]
            self.listing_done.add(done.nonce)
            self.m.listings.labels(vol, "compared").inc()
            return self.reconcile(vol, self.spool.rows(vol), repair=self.repair if repair is None else repair)
        finally:
            self.spool.discard(vol)

    def reconcile(self, vol: str, rows: Iterator[Row], *, repair: bool) -> dict[str, str]:
        """Bring the mirror to a complete, verified listing (rows in path order). Returns drift found.

        Pass 1 walks the listing: each path is checked against the index and the disk. Pass 2
        walks the index and the disk for paths the listing does not have: those are the only
        deletions, and each is justified by this listing."""
        out: dict[str, str] = {}
        vr = self.ap.vol_root(vol)
        self.adopted = 0
        for src in rows:
            if self.quarantined(vol, src.path):
                continue
            mine = self.idx.lookup(vol, src.path)
            full = os.path.join(vr, src.path)
            d = R.listing_action(src, mine, disk_kind(full), touched=False)
            hashes = None
            if d.action == R.COMPARE:
                d, hashes = self._compare(vol, src, full)
            if d.drift:
                out[src.path] = d.drift
                self.found(vol, src.path, d.drift, "differs from the source's listing")
            if not repair:
                continue
            try:
                self._repair_listed(vol, src, mine, full, d, hashes)
            except (ApplyError, RejectedEvent, OSError) as e:
                log.warning("cannot repair %s from the listing: %s", src.path, e, extra={"volume": vol, "path": src.path})
        extra = list(self._unlisted(vol, vr))
        for path in extra:
            out[path] = "extra"
            self.found(vol, path, "extra", "not in the source's complete listing")
            if not repair:
                continue
            n = _count_files(os.path.join(vr, path))
            try:
                self._local(Event("rmtree", vol, 0, "", 0.0, {"path": path}))
            except (ApplyError, RejectedEvent, OSError) as e:
                log.warning("cannot delete %s (not in the source's listing): %s", path, e, extra={"volume": vol, "path": path})
                continue
            self.m.deleted_files.labels(vol, "listing").inc(n)
            log.warning("deleted %s (%d file(s)): the source's complete listing does not have it", path, n,
                        extra={"volume": vol, "path": path, "event": "deleted", "reason": "listing"})
            self.resolved(vol, path, tree=True)
        log.info("listing of %s compared: %d path(s) differ, %d file(s) on disk adopted into the index without transfer",
                 vol, len(out), self.adopted, extra={"volume": vol, "event": "listing_compared"})
        return out

    def _repair_listed(self, vol: str, src: Row, mine: Entry | None, full: str, d: R.Decision, hashes: bytes | None) -> None:
        if hashes is not None and d.action == R.OK:
            self._adopt(vol, src, hashes)  # the data on disk is the source's: no transfer
        elif d.action == R.MKDIR:
            self._local(Event("mkdir", vol, 0, "", 0.0, {"path": src.path, "mode": src.mode}))
        elif d.action == R.SYMLINK:
            self._local(Event("symlink", vol, 0, "", 0.0, {"path": src.path, "target": src.target}))
        elif d.action == R.FETCH:
            bs = self.block_size.get(vol) or 131072
            self.request_file(vol, src.path, disk_hashes(full, bs) if disk_kind(full) == "f" else None)
        elif d.action == R.OK and mine is not None:
            self.resolved(vol, src.path)

    def _unlisted(self, vol: str, vr: str) -> Iterator[str]:
        """Paths in the index or on disk that the spooled listing lacks (topmost only)."""
        seen: set[str] = set()
        for path in self.idx.paths(vol):
            if not self.spool.has(vol, path) and not _under(path, seen) and not self.spool.has_below(vol, path):
                seen.add(path)
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
                    if r in seen or _under(r, seen):
                        continue
                    listed = self.spool.has(vol, r)
                    is_dir = de.is_dir(follow_symlinks=False)
                    if not listed and not (is_dir and self.spool.has_below(vol, r)):
                        seen.add(r)
                    elif is_dir:
                        # listed, or a directory the source has not published itself yet while it
                        # did publish files below it (an implicit parent): never delete it
                        stack.append(r)
        return iter(sorted(p for p in seen if not self.quarantined(vol, p)))

    def _compare(self, vol: str, src: Row, full: str) -> tuple[R.Decision, bytes | None]:
        """A regular file is on disk where the listing has a file: hash it (adopt it, or fetch what differs)."""
        try:
            st = os.lstat(full)
        except OSError:
            return R.Decision(R.FETCH, "missing"), None
        hashes = disk_hashes(full, self.block_size.get(vol) or 131072)
        if hashes is None:
            return R.Decision(R.FETCH, "content"), None
        d = R.compared_file(src, st.st_size, file_root(hashes, st.st_size), stat.S_IMODE(st.st_mode), st.st_mtime_ns)
        return d, hashes

    def _adopt(self, vol: str, src: Row, hashes: bytes) -> None:
        """Record a file already on disk as the source's (same size and root); fix mode/mtime locally."""
        bs = self.block_size.get(vol) or 131072
        self.ap.apply(Event("manifest", vol, 0, "", 0.0, {"path": src.path, "size": src.size, "mode": src.mode,
                                                          "mtime_ns": src.mtime_ns, "root": src.root.hex(), "bs": bs}))
        rec = self.idx.file(vol, src.path)
        rec.size, rec.mode, rec.mtime_ns, rec.hashes, rec.root = src.size, src.mode, src.mtime_ns, bytearray(hashes), src.root
        self.idx.touch(vol, src.path)
        self.resolved(vol, src.path)
        self.adopted += 1

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
        if kind == "extra":
            # the index does not know it: the index may be lost or behind, so only the source's
            # complete listing may say whether it goes (never deleted on the scrubber's word)
            if self.repair:
                self.maybe_request_listing(vol, LISTING_RETRY)
            return
        if not self.repair:
            return
        if kind == "metadata" and e.kind == "f":
            self._local(Event("manifest", vol, 0, "", 0.0, {"path": e.path, "size": e.size, "mode": e.mode, "mtime_ns": e.mtime_ns, "root": bytes(e.root).hex()}))
        elif e.kind == "d":
            self._local(Event("mkdir", vol, 0, "", 0.0, {"path": e.path, "mode": e.mode}))
        elif e.kind == "l":
            self._local(Event("symlink", vol, 0, "", 0.0, {"path": e.path, "target": e.target}))
        else:
            self.request_file(vol, e.path, disk)


def _forget_writing(writing: set[tuple[str, str]], vol: str, path: str) -> list[str]:
    pre = path + "/"
    gone = [k for k in writing if k[0] == vol and (k[1] == path or k[1].startswith(pre))]
    for k in gone:
        writing.discard(k)
    return [k[1] for k in gone]


def _under(path: str, tops: set[str]) -> bool:
    i = path.rfind("/")
    while i > 0:
        if path[:i] in tops:
            return True
        i = path.rfind("/", 0, i)
    return False


def _count_files(full: str) -> int:
    try:
        st = os.lstat(full)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return 1
    n = 0
    for _, dirs, files in os.walk(full):
        n += len(files) + sum(1 for d in dirs if os.path.islink(os.path.join(_, d)))
    return n
