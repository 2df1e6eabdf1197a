"""Reconcile scan: walk a volume, compare with the index, say what needs looking at.

This is the safety net for dropped inotify events and for changes made while the agent was down.
:func:`walk` is the disk part (run in a thread); :func:`plan` is pure: given the disk listing and the
index entries it returns the paths to re-examine and the renames to publish (a path that vanished
and a new path with the same inode, kind, size and mtime are a rename, so no data is resent).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..index import DIR, FILE, SYMLINK, Entry
from .reader import Stat


def walk(root: str, excluded: Callable[[str], bool]) -> tuple[dict[str, Stat], dict[str, str]]:
    """Every replicable entry under root (relative POSIX path → Stat), and symlink targets.

    Excluded paths are not listed (an excluded directory is not descended into); sockets, fifos and
    devices are skipped. Entries that vanish during the walk are simply absent.
    """
    out: dict[str, Stat] = {}
    targets: dict[str, str] = {}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = os.path.join(root, rel_dir) if rel_dir else root
        try:
            it = os.scandir(abs_dir)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        with it:
            for de in it:
                rel = f"{rel_dir}/{de.name}" if rel_dir else de.name
                if excluded(rel):
                    continue
                try:
                    st = Stat.of(de.stat(follow_symlinks=False))
                except FileNotFoundError:
                    continue
                if st.kind == "o":
                    continue
                out[rel] = st
                if st.kind == "d":
                    stack.append(rel)
                elif st.kind == "l":
                    try:
                        targets[rel] = os.readlink(de.path)
                    except OSError:
                        pass
    return out, targets


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


def plan(disk: Mapping[str, Stat], targets: Mapping[str, str], index: Mapping[str, Entry]) -> Plan:
    p = Plan()
    vanished = [path for path in index if path not in disk]
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


__all__ = ["Plan", "plan", "walk", "differs", "SYMLINK"]
