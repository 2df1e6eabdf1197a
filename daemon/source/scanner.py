"""Reconcile scan: walk a volume, compare with the index, say what needs looking at.

This is the safety net for dropped inotify events and for changes made while the agent was down.
:func:`walk` is the disk part (run in a thread); :func:`plan` is pure: given the disk listing and the
index entries it returns the paths to re-examine and the renames to publish (a path that vanished
and a new path with the same inode, kind, size and mtime are a rename, so no data is resent).

The walk never dies on one bad entry: a subtree it cannot read (deeper than PATH_MAX, a symlink
loop, permission denied, an I/O error) or a name that is not UTF-8 is skipped and reported in
:attr:`Walk.unprotected` with a short reason, and :func:`plan` leaves the index entries below it
alone (not readable is not deleted).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping

from ..store.source_index import DIR, FILE, SYMLINK, Entry
from .coverage import NOT_UTF8, replicable_name
from .reader import Stat

_REASONS = {errno.ENAMETOOLONG: "name_too_long", errno.ELOOP: "symlink_loop", errno.EACCES: "permission", errno.EPERM: "permission"}


def reason(err: OSError) -> str:
    """Short, bounded label for why an entry cannot be read."""
    return _REASONS.get(err.errno or 0, "io")


@dataclass
class Walk:
    disk: dict[str, Stat] = field(default_factory=dict)  # relative POSIX path → Stat
    targets: dict[str, str] = field(default_factory=dict)  # symlink path → target
    unprotected: dict[str, str] = field(default_factory=dict)  # path → reason it cannot be replicated


def walk(root: str, excluded: Callable[[str], bool]) -> Walk:
    """Every replicable entry under root, symlink targets, and what could not be read.

    Excluded paths are not listed (an excluded directory is not descended into); sockets, fifos and
    devices are skipped. Entries that vanish during the walk are simply absent.
    """
    w = Walk()
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = os.path.join(root, rel_dir) if rel_dir else root
        try:
            it = os.scandir(abs_dir)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            w.unprotected[rel_dir or "."] = reason(e)
            continue
        with it:
            _entries(w, it, rel_dir, excluded, stack)
    return w


def _entries(w: Walk, it: "os._ScandirIterator[str]", rel_dir: str, excluded: Callable[[str], bool], stack: list[str]) -> None:
    while True:
        try:
            de = next(it)
        except StopIteration:
            return
        except OSError as e:  # reading the directory itself failed midway
            w.unprotected[rel_dir or "."] = reason(e)
            return
        rel = f"{rel_dir}/{de.name}" if rel_dir else de.name
        if not replicable_name(rel):
            w.unprotected[rel] = NOT_UTF8
            continue
        if excluded(rel):
            continue
        try:
            st = Stat.of(de.stat(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            w.unprotected[rel] = reason(e)
            continue
        if st.kind == "o":
            continue
        w.disk[rel] = st
        if st.kind == "d":
            stack.append(rel)
        elif st.kind == "l":
            try:
                w.targets[rel] = os.readlink(de.path)
            except OSError:
                pass


@dataclass
class Plan:
    renames: list[tuple[str, str]] = field(default_factory=list)
    dirty: list[str] = field(default_factory=list)
    new_files: int = 0
    new_bytes: int = 0


def differs(st: Stat, e: Entry, target: str | None = None) -> bool:
    if st.kind != e.kind:
        return True
    if st.kind == FILE:
        return (st.size, st.mtime_ns, st.ino, st.mode) != (e.size, e.mtime_ns, e.ino, e.mode)
    if st.kind == DIR:
        return st.mode != e.mode
    return target is not None and target != e.target


def _below(path: str, tops: Collection[str]) -> bool:
    """True if path or one of its parent directories is in ``tops``."""
    if not tops:
        return False
    if "." in tops:
        return True
    while True:
        if path in tops:
            return True
        if "/" not in path:
            return False
        path = path.rsplit("/", 1)[0]


def plan(disk: Mapping[str, Stat], targets: Mapping[str, str], index: Mapping[str, Entry], unreadable: Collection[str] = ()) -> Plan:
    """What to re-examine and which renames to publish; index entries at or below an ``unreadable``
    path (the walk could not look there) are left as they are."""
    p = Plan()
    vanished = [path for path in index if path not in disk and not _below(path, unreadable)]
    new = sorted(path for path in disk if path not in index)
    # rename candidates: a vanished entry whose inode reappears under a new name
    by_ino: dict[tuple[int, str], str] = {}
    for path in vanished:
        e = index[path]
        if e.kind in (FILE, DIR) and e.ino:
            by_ino[(e.ino, e.kind)] = path
    moved_src: set[str] = set()
    moved_dst: list[tuple[str, str]] = []
    for path in new:
        # inside an already renamed directory: the rename moved its index entries too
        if any(path.startswith(d + "/") for _, d in moved_dst):
            continue
        st = disk[path]
        src = by_ino.get((st.ino, st.kind))
        if src is None or any(src.startswith(s + "/") or src == s for s in moved_src):
            continue
        e = index[src]
        if st.kind == FILE and (e.size, e.mtime_ns) != (st.size, st.mtime_ns):
            continue
        p.renames.append((src, path))
        moved_src.add(src)
        moved_dst.append((src, path))

    def remap(path: str) -> str | None:
        """Index path after the planned renames, or None if it moved away."""
        for s, d in moved_dst:
            if path == s or path.startswith(s + "/"):
                return None
        return path

    for path in vanished:
        if remap(path) is not None:
            p.dirty.append(path)
    for path, st in disk.items():
        e = index.get(path)
        if e is None:
            for s, d in moved_dst:
                if path == d or path.startswith(d + "/"):
                    e = index.get(s + path[len(d) :])
                    break
        if e is None or differs(st, e, targets.get(path)):
            p.dirty.append(path)
            if st.kind == FILE and (e is None or e.kind != FILE or e.size != st.size or e.mtime_ns != st.mtime_ns):
                p.new_files += 1
                p.new_bytes += st.size
    p.dirty.sort()
    return p


__all__ = ["Plan", "Walk", "plan", "walk", "differs", "reason", "SYMLINK"]
