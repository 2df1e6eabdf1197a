"""``volmirror seed``: start a source's index from a tree the mirror is believed to hold already.

Failback (docs/restore.md) runs replication backwards: a source agent on the DR copy that was served
during the failover, a mirror agent on the original site's tree. That tree is mostly the same data;
sending all of it again would be the full copy failback must avoid. So before the reverse source
starts for the first time, ``seed`` hashes the DR tree into its new, empty index, as if it had
already been published. The source then sends nothing for those files, and its first checkpoint
disagrees with the original site's mirror (whose index is empty). The mirror asks for a listing,
hashes each file it has, keeps what matches, fetches only the blocks that differ, and removes
what the listing does not have, the same repair path that heals drift. When ``mirror.history`` is on,
the original site's own data is journalled first, so what failback overwrites stays restorable.

A seeded index is only a claim. The checkpoint, listing and per-block hashes prove it wrong or right
file by file. A wrong claim costs a repair, never a loss.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..blocks import block_hash, file_root
from ..config import SourceConfig, VolumeConfig
from ..errors import EXIT_CONFIG, VolmirrorError
from ..store.agent_lock import AgentLock
from ..store.source_index import DIR, FILE, SYMLINK, Entry, volume_index
from .reader import Stat, lstat
from .scanner import walk


class SeedError(VolmirrorError):
    exit_code = EXIT_CONFIG


def file_entry(full: str, rel: str, st: Stat, block_size: int) -> Entry | None:
    """The index entry of a regular file read whole, or None if it changed while it was read."""
    hashes = bytearray()
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        while True:
            b = os.read(fd, block_size)
            if not b:
                break
            hashes += block_hash(b)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        after = lstat(full)
    except VolmirrorError:
        return None
    if after is None or not st.same_content_view(after):
        return None  # it changed while it was read: not seeded, the source sends it as usual
    return Entry(rel, FILE, st.size, st.mtime_ns, st.ino, st.mode, None, bytes(hashes), file_root(bytes(hashes), st.size))


def seed(sc: SourceConfig, vol: VolumeConfig) -> dict[str, Any]:
    t0 = time.monotonic()
    lock = AgentLock(sc.state_dir, "source").acquire(f"volmirror seed --volume {vol.name}")
    try:
        idx = volume_index(sc.state_dir, vol.name)
        try:
            have = sum(1 for _ in idx.iter_volume(vol.name))
            if have:
                raise SeedError(f"the source index of {vol.name!r} in {sc.state_dir} already lists {have} entries: seed starts a new "
                                "index only (a failback's reverse source, with its own state_dir)")
            root = str(vol.path)
            if not os.path.isdir(root):
                raise SeedError(f"volume {vol.name!r}: {root} is not a directory")
            w = walk(root, vol.is_excluded)
            files = nbytes = skipped = 0
            idx.begin()
            for rel, st in sorted(w.disk.items()):
                full = os.path.join(root, rel)
                if st.kind == DIR:
                    idx.put(vol.name, Entry(rel, DIR, 0, st.mtime_ns, st.ino, st.mode))
                elif st.kind == SYMLINK and rel in w.targets:
                    idx.put(vol.name, Entry(rel, SYMLINK, 0, st.mtime_ns, st.ino, 0, w.targets[rel]))
                elif st.kind == FILE:
                    e = file_entry(full, rel, st, vol.block_size)
                    if e is None:
                        skipped += 1
                        continue
                    idx.put(vol.name, e)
                    files += 1
                    nbytes += st.size
            idx.set_meta(f"seeded:{vol.name}", f"{time.time():.3f}")
            idx.commit()
        finally:
            idx.close()
    finally:
        lock.release()
    return {"volume": vol.name, "root": root, "files": files, "bytes": nbytes, "changed_while_read": skipped,
            "unreadable": dict(sorted(w.unprotected.items())[:100]), "seconds": round(time.monotonic() - t0, 3)}
