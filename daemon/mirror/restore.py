"""``volmirror points`` and ``volmirror restore``: a volume as it was at a restore point.

A restore copies the volume's tree from the mirror into ``--to`` and applies the history's undo
entries (:mod:`daemon.mirror.history`) of every segment from the newest back to the chosen point,
each segment's entries in reverse order. Every entry *sets* a state, so entries of changes that
were journalled but never made (the agent was killed between the two) change nothing.

It runs while the mirror agent runs: it holds the history lock exclusively while it copies and
undoes, and the agent's apply actor takes the same lock (shared) for every message, so the copy is
of a tree between two batches. It also runs after the agent was killed: the tree is then wherever
the kill left it, and the undo entries of the last segment take it back to the latest point.

When the point was verified (the source's checkpoint right after it matched the mirror's index),
the restored tree's own digest (every file hashed) is compared with the checkpoint's: a restore
that says "verified" was checked byte for byte against what the source had.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..blocks import file_root
from ..config import VOLUME_NAME_RE, MirrorConfig
from ..digest import volume_digest
from ..errors import VolmirrorError
from ..store.agent_lock import AgentLock
from ..store.holds import HOLD_FILE, UnreadableState, read_json, save_json
from ..store.mirror_index import Point, read_points
from ..store.source_index import Entry
from .history import History, effective, read_entries, seg_name
from .scrubber import disk_hashes

EXIT_UNPROVEN = 1


class RestoreError(VolmirrorError):
    """A restore that cannot be done as asked (usage: exit 2)."""

    exit_code = 2


def _db(mc: MirrorConfig) -> sqlite3.Connection:
    path = mc.state_dir / "mirror.sqlite"
    if not path.exists():
        raise RestoreError(f"no mirror index at {path}: has this mirror ever run? (mirror.state_dir)")
    return sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, isolation_level=None)


def _source_block_size(db: sqlite3.Connection, vol: str) -> int | None:
    row = db.execute("SELECT value FROM meta WHERE key=?", (f"source:{vol}",)).fetchone()
    if not row:
        return None
    try:
        return int(json.loads(row[0])["block_size"])
    except (ValueError, KeyError, TypeError):
        return None


def list_points(mc: MirrorConfig, vol: str) -> tuple[list[Point], dict[int, bool]]:
    """The volume's points (oldest first) and, per segment, whether it can be restored now."""
    if not VOLUME_NAME_RE.match(vol) or vol in (".", ".."):
        raise RestoreError(f"--volume: {vol!r} is not a volume name ([A-Za-z0-9._-]+)")
    db = _db(mc)
    try:
        pts = read_points(db, vol)
        if not pts and not db.execute("SELECT 1 FROM progress WHERE volume=?", (vol,)).fetchone():
            raise RestoreError(f"volume {vol!r} is not known to this mirror (no progress in {mc.state_dir})")
    finally:
        db.close()
    vdir = mc.history_path / vol
    broken = {int(n.split("-")[1].split(".")[0]) for n in _names(vdir) if n.endswith(".broken")}
    ok: dict[int, bool] = {}
    broken |= {p.segment for p in pts if p.state == "broken"}
    bad_from = max(broken) if broken else 0  # a point at or before a broken segment cannot be rebuilt
    for p in pts:
        ok[p.segment] = p.segment > bad_from
    return pts, ok


def _names(d: Path) -> list[str]:
    try:
        return os.listdir(d)
    except FileNotFoundError:
        return []


def point_json(p: Point, restorable: bool) -> dict[str, Any]:
    return {"id": p.segment, "source_id": p.source_id, "time": p.src_ts, "applied": p.applied_ts, "epoch": p.epoch, "seq": p.seq,
            "state": p.state, "restorable": restorable}


def parse_time(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise RestoreError(f"--at: {s!r} is neither unix seconds nor an ISO 8601 time") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # local time, as a person on call would type it
    return dt.timestamp()


def choose(pts: list[Point], ok: dict[int, bool], *, at: float | None, point: int | None) -> Point:
    usable = [p for p in pts if ok.get(p.segment)]
    if point is not None:
        p = next((p for p in pts if p.segment == point), None)
        if p is None:
            raise RestoreError(f"--point: no restore point {point} (see `volmirror points`)")
        if not ok.get(p.segment):
            raise RestoreError(f"--point: restore point {point} can no longer be rebuilt (its history is incomplete)")
        return p
    if not usable:
        raise RestoreError("no restore point to restore: the source has not sent one yet (it does once the volume is quiet)")
    if at is None:
        good = [p for p in usable if p.state != "mismatch"]
        return (good or usable)[-1]
    before = [p for p in usable if p.src_ts <= at]
    if not before:
        raise RestoreError(f"--at: no restore point at or before {_fmt(at)}; the oldest is {usable[0].segment} at {_fmt(usable[0].src_ts)}")
    return before[-1]


def _fmt(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


def restore(mc: MirrorConfig, vol: str, to: Path, *, at: float | None = None, point: int | None = None,
            in_place: bool = False) -> dict[str, Any]:
    vr = mc.root / vol
    if to.resolve() in (vr.resolve(), mc.root.resolve()):
        if not in_place:
            raise RestoreError(f"--to: {to} is the mirror's own tree. Rolling it back in place cannot be undone (the points after the "
                               "one you choose are gone, and the volume is held until failback): add --in-place if that is what you "
                               "want, or give a new directory")
        return restore_in_place(mc, vol, at=at, point=point)
    if in_place:
        raise RestoreError(f"--in-place: --to must be the mirror's tree of the volume ({vr}), not {to}")
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise RestoreError(f"--to: {to} exists and is not an empty directory (a restore never writes over anything)")
    if to.resolve() == vr.resolve() or vr.resolve() in to.resolve().parents:
        raise RestoreError(f"--to: {to} is inside the mirrored volume {vr}")
    t0 = time.monotonic()
    hist = History(mc.history_path, mc.root)
    hist.lock(shared=False)
    try:
        pts, p = _pick(mc, vol, at, point)
        unproven: dict[str, str] = {}
        made = not to.exists()
        try:
            undone = rebuild(vr, mc.history_path / vol, p.segment, pts[-1].segment, to, unproven)
        except OSError as e:
            _clear(to, made)
            raise RestoreError(f"restore into {to} failed, nothing kept there: {e}") from None
        _caveats(mc, vol, p, unproven, failover_hold(mc, vol))
    finally:
        hist.unlock()
        hist.close()
    return _report(mc, vol, to, p, undone, unproven, t0)


def _pick(mc: MirrorConfig, vol: str, at: float | None, point: int | None) -> tuple[list[Point], Point]:
    """The volume's points and the one asked for (under the history lock)."""
    pts, ok = list_points(mc, vol)
    p = choose(pts, ok, at=at, point=point)
    if not (mc.root / vol).is_dir():
        raise RestoreError(f"the mirror has no tree for volume {vol!r} at {mc.root / vol}")
    return pts, p


def _caveats(mc: MirrorConfig, vol: str, p: Point, unproven: dict[str, str], held: dict | None) -> None:
    """``held``: the volume's hold before this restore."""
    if p.state == "mismatch":
        unproven[""] = ("the source's checkpoint right after this point did not match the mirror: the mirror was not "
                        "identical to the source at this point")
    if held and held.get("kind") == "failover":
        unproven.setdefault("", f"the volume was rolled back in place at {_fmt(held.get('since', 0))} (failover): if anything wrote "
                                "into it since, the tree these points are rebuilt from is no longer the one they were journalled on")


def _report(mc: MirrorConfig, vol: str, to: Path, p: Point, undone: int, unproven: dict[str, str], t0: float) -> dict[str, Any]:
    files, nbytes = _count(to)
    out: dict[str, Any] = {"volume": vol, "to": str(to), "point": point_json(p, True), "files": files, "bytes": nbytes,
                           "undone_entries": undone, "unproven": sorted(unproven), "unproven_why": unproven}
    if p.root:
        db = _db(mc)
        try:
            bs = _source_block_size(db, vol)
        finally:
            db.close()
        if bs:
            got = tree_digest(to, bs)
            out["digest_checked"] = True
            out["verified"] = got == p.root
            if got != p.root:
                unproven.setdefault("", f"the restored tree's digest {got} differs from the source's checkpoint {p.root}")
                out["unproven"] = sorted(unproven)
        else:
            out["digest_checked"] = False
            out["verified"] = False
    else:
        out["digest_checked"] = False
        out["verified"] = False
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out


# -- in place (failover) ---------------------------------------------------------------------------
def failover_hold(mc: MirrorConfig, vol: str) -> dict | None:
    try:
        h = read_json(mc.state_dir / HOLD_FILE).get(vol)
    except UnreadableState:
        return None
    return h if isinstance(h, dict) else None


def _hold(mc: MirrorConfig, vol: str, why: dict) -> None:
    """Add ``vol`` to the agent's held volumes, durably, before the tree is touched."""
    path = mc.state_dir / HOLD_FILE
    try:
        d = read_json(path)
    except UnreadableState as e:
        raise RestoreError(f"{e}; fix or remove it first") from None
    d[vol] = why
    save_json(path, d)


def restore_in_place(mc: MirrorConfig, vol: str, *, at: float | None = None, point: int | None = None) -> dict[str, Any]:
    """Roll the mirror's own tree of ``vol`` back to a point, with the mirror agent stopped.

    The volume is held first (the agent, when started again, applies nothing to it, and neither
    stream nor repair touches it, until ``volmirror resume --volume V --failback-done``): the tree is
    now the DR copy being served, not a mirror. The undone segments and the points after the chosen
    one are gone (there is no redo); earlier points stay restorable as long as nothing was written
    into the tree. The volume's index entries are forgotten: when replication resumes, a listing
    compares every file with the source and fetches only what differs."""
    vr = mc.root / vol
    t0 = time.monotonic()
    lock = AgentLock(mc.state_dir, "mirror").acquire(f"volmirror restore --to {vr} (in place)")
    try:
        hist = History(mc.history_path, mc.root)
        hist.lock(shared=False)
        try:
            pts, p = _pick(mc, vol, at, point)
            held = failover_hold(mc, vol) or {}
            _hold(mc, vol, {"why": f"rolled back in place to restore point {p.segment} ({_fmt(p.src_ts)}) by volmirror restore; the "
                                   "tree is the failed-over copy, not a mirror, until failback (docs/restore.md)",
                            "kind": "failover", "since": held.get("since") if held.get("kind") == "failover" else time.time(),
                            "point": p.segment})
            unproven: dict[str, str] = {}
            last = pts[-1].segment
            undone = undo_segments(vr, mc.history_path / vol, p.segment, last, unproven)
            os.sync()  # the rolled-back tree is on disk before the journal that rolled it back goes
            _forget_after(mc, vol, p.segment)
            hist.remove(vol, [k for k in hist.segment_files(vol) if k >= p.segment])
            _caveats(mc, vol, p, unproven, held)
        finally:
            hist.unlock()
            hist.close()
        out = _report(mc, vol, vr, p, undone, unproven, t0)
        out["in_place"] = True
        return out
    finally:
        lock.release()


def _forget_after(mc: MirrorConfig, vol: str, k: int) -> None:
    """The index after an in-place rollback to segment ``k``: no points after it (their segments
    were undone), and no entries for the volume (the tree is no longer what they describe)."""
    db = sqlite3.connect(str(mc.state_dir / "mirror.sqlite"), isolation_level=None, timeout=30)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM points WHERE volume=? AND segment>?", (vol, k))
        db.execute("DELETE FROM entries WHERE volume=?", (vol,))
        db.execute("COMMIT")
    finally:
        db.close()


# -- copying and undoing -------------------------------------------------------------------------
def rebuild(vr: Path, vdir: Path, first: int, last: int, to: Path, unproven: dict[str, str]) -> int:
    """Copy the volume tree ``vr`` into ``to`` and undo segments ``last`` down to ``first`` of the
    history ``vdir`` on the copy: ``to`` is then the volume at the point that opened segment
    ``first``. Paths that could not be put back exactly go into ``unproven``; returns the number
    of entries undone."""
    to.mkdir(parents=True, exist_ok=True)
    _copy_tree(vr, to)
    return undo_segments(to, vdir, first, last, unproven)


def undo_segments(to: Path, vdir: Path, first: int, last: int, unproven: dict[str, str]) -> int:
    """Undo segments ``last`` down to ``first`` of the history ``vdir`` on the tree ``to`` (a copy of
    the volume, or the volume itself for an in-place restore); returns the entries undone. Every
    entry sets a state, so doing it again after an interruption gives the same tree."""
    undone = 0
    for k in range(last, first - 1, -1):
        seg = vdir / seg_name(k)
        if not seg.exists():
            continue  # nothing changed in that segment
        for hdr, data in reversed(effective(list(read_entries(seg)))):
            try:
                _undo(to, vdir, hdr, data, unproven)
            except OSError as e:
                unproven.setdefault(hdr.get("p", ""), f"cannot undo {hdr['t']}: {e}")
            undone += 1
    return undone


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a tree: regular files (content, mode, mtime), directories (mode), symlinks."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        out = dst if rel == "." else dst / rel
        for n in list(dirnames):
            s = os.path.join(dirpath, n)
            st = os.lstat(s)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(s), out / n)
                dirnames.remove(n)
            else:
                (out / n).mkdir()
        for n in filenames:
            _copy_one(os.path.join(dirpath, n), out / n)
    # directory modes last (a read-only directory would refuse what goes into it)
    for dirpath, dirnames, _ in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        for n in dirnames:
            st = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISDIR(st.st_mode):  # not a symlink to a directory: chmod would follow it
                os.chmod(dst / rel / n if rel != "." else dst / n, stat.S_IMODE(st.st_mode))


def _copy_one(s: str, d: Path) -> None:
    st = os.lstat(s)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(s), d)
    elif stat.S_ISREG(st.st_mode):
        shutil.copyfile(s, d, follow_symlinks=False)
        os.chmod(d, stat.S_IMODE(st.st_mode))
        os.utime(d, ns=(st.st_mtime_ns, st.st_mtime_ns))
    elif stat.S_ISDIR(st.st_mode):
        d.mkdir()
        _copy_tree(Path(s), d)
        os.chmod(d, stat.S_IMODE(st.st_mode))


def _clear(to: Path, made: bool) -> None:
    if made:
        _rm(to)
        return
    for n in os.listdir(to):
        _rm(to / n)


def _rm(p: Path) -> None:
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        for dirpath, dirnames, _ in os.walk(p):
            for n in dirnames:
                d = os.path.join(dirpath, n)
                try:
                    if stat.S_ISDIR(os.lstat(d).st_mode):  # never through a symlink
                        os.chmod(d, 0o700)
                except OSError:
                    pass
        shutil.rmtree(p)
    else:
        os.unlink(p)


class _Unsafe(Exception):
    """A parent of an undo entry's path is not a real directory inside --to (a symlink, a file)."""


def _inside(to: Path, rel: str, *, make: bool = False) -> Path:
    """``to / rel``, after checking that every parent component is a real directory (never a
    symlink): nothing is ever read, written or removed outside ``--to`` through a link found in the
    mirror's tree. ``make``: create missing parents. Raises _Unsafe."""
    parts = [c for c in rel.split("/") if c]
    if not parts or any(c in (".", "..") for c in parts):
        raise _Unsafe(f"not a path inside the volume: {rel!r}")
    cur = to
    for comp in parts[:-1]:
        cur = cur / comp
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            if not make:
                return to.joinpath(*parts)  # the path cannot exist: nothing to follow
            os.mkdir(cur, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise _Unsafe(f"{os.path.relpath(cur, to)} is not a directory here")
    return to.joinpath(*parts)


def _undo(to: Path, vdir: Path, hdr: dict, data: bytes, unproven: dict[str, str]) -> None:
    t, rel = hdr["t"], hdr.get("p", "")
    if t == "unproven":
        unproven.setdefault(rel, hdr.get("why", "not journalled exactly"))
        return
    try:
        p = _inside(to, rel, make=t in ("moved", "renamed"))
        d = _inside(to, hdr["dst"]) if t == "renamed" else None
    except _Unsafe as e:
        unproven.setdefault(rel, f"cannot undo {t}: {e}")
        return
    if t == "absent":
        _rm(p)
    elif t in ("data", "orig"):
        if not _is_file(p):
            unproven.setdefault(rel, "saved bytes have no file to go back into" if t == "data" else
                                "a file's original size and metadata have no file to go back onto")
            return
        fd = os.open(p, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if t == "data":
                os.pwrite(fd, data, hdr["off"])
            else:
                os.ftruncate(fd, hdr["size"])
                os.fchmod(fd, hdr["mode"])
                os.utime(fd, ns=(hdr["mtime_ns"], hdr["mtime_ns"]))
        finally:
            os.close(fd)
    elif t == "dir":
        if stat.S_ISDIR(_lmode(p)):
            os.chmod(p, hdr["mode"])
        else:
            unproven.setdefault(rel, "a directory's original mode has no directory to go back onto")
    elif t == "moved":
        obj = vdir / hdr["obj"]
        if not os.path.lexists(obj):
            return  # the removal was journalled but never made
        _rm(p)
        _copy_one(str(obj), p)
    elif t == "renamed" and d is not None:
        if os.path.lexists(p):
            return  # the rename was journalled but never made
        if not os.path.lexists(d):
            unproven.setdefault(rel, f"renamed to {hdr['dst']}, which is not there to be renamed back")
            return
        os.rename(d, p)


def _lmode(p: Path) -> int:
    try:
        return os.lstat(p).st_mode
    except FileNotFoundError:
        return 0


def _is_file(p: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(p).st_mode)
    except FileNotFoundError:
        return False


def _count(root: Path) -> tuple[int, int]:
    files = nbytes = 0
    for dirpath, _, filenames in os.walk(root):
        for n in filenames:
            st = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISREG(st.st_mode):
                files += 1
                nbytes += st.st_size
    return files, nbytes


def tree_digest(root: Path, block_size: int) -> str:
    """The volume digest (daemon.digest) of a tree on disk: every file read and hashed."""
    entries: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                entries.append(Entry(rel, "d", mode=stat.S_IMODE(st.st_mode)))
            elif stat.S_ISLNK(st.st_mode):
                entries.append(Entry(rel, "l", target=os.readlink(full)))
            elif stat.S_ISREG(st.st_mode):
                hashes = disk_hashes(full, block_size)
                if hashes is None:
                    raise OSError(f"cannot read {full} to check the restored tree")
                entries.append(Entry(rel, "f", st.st_size, st.st_mtime_ns, mode=stat.S_IMODE(st.st_mode), root=file_root(hashes, st.st_size)))
    return volume_digest(entries)[0].hex()


def run_points(mc: MirrorConfig, vol: str, *, as_json: bool) -> int:
    pts, ok = list_points(mc, vol)
    rows = [point_json(p, ok[p.segment]) for p in pts]
    if as_json:
        print(json.dumps({"volume": vol, "points": rows}, indent=2))
        return 0
    if not rows:
        print(f"{vol}: no restore points yet (the source sends one once the volume is quiet)")
        return 0
    print(f"{'id':>6}  {'source time':<29}  {'seq':>10}  {'state':<10}  restorable")
    for r in rows:
        print(f"{r['id']:>6}  {_fmt(r['time']):<29}  {r['seq']:>10}  {r['state']:<10}  {'yes' if r['restorable'] else 'no'}")
    return 0


def run_restore(mc: MirrorConfig, vol: str, to: Path, *, at: str | None, point: int | None, as_json: bool, in_place: bool = False) -> int:
    if at is not None and point is not None:
        raise RestoreError("give --at or --point, not both")
    out = restore(mc, vol, to, at=parse_time(at) if at is not None else None, point=point, in_place=in_place)
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        p = out["point"]
        print(f"restored {vol} at point {p['id']} ({_fmt(p['time'])}, seq {p['seq']}) into {out['to']}: {out['files']} files, "
              f"{out['bytes']} bytes in {out['seconds']:.1f} s" + ("; digest verified against the source's checkpoint" if out["verified"] else ""))
        for path in out["unproven"]:
            print(f"NOT PROVEN: {path or '(whole tree)'}: {out['unproven_why'][path]}")
    return EXIT_UNPROVEN if out["unproven"] else 0


__all__ = ["restore", "run_points", "run_restore", "RestoreError"]
