"""The source's disk edge: read a file block by block and detect a torn read.

:func:`read_file` runs in a worker thread. It stats the path, opens it without following symlinks,
checks the open file is the one stat'ed, reads every block, hashes it, and returns the changed
blocks in *segments* (bounded memory). Before each segment is handed back it stats the path again;
if size, mtime, ctime or inode moved, the read is torn and :class:`FileChangedError` is raised, so
the caller re-queues the file instead of publishing a view that never existed.
"""

from __future__ import annotations

import os
import stat as stat_mod
from dataclasses import dataclass, field
from typing import Iterator

from ..blocks import Block, block_hash, changed, is_zero
from ..errors import FileChangedError, VolmirrorError, os_error

SEGMENT_BYTES = 8 * 1024 * 1024  # read, checked and sent per thread hop; live changes may go between two
PREFETCH_BYTES = 16 * 1024 * 1024  # content read ahead per :func:`prefetch` call


@dataclass(frozen=True, slots=True)  # hundreds of thousands at once during a scan
class Stat:
    kind: str  # "f", "d", "l", or "o" (other: sockets, fifos, devices: not replicated)
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    mode: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Stat":
        m = st.st_mode
        kind = "f" if stat_mod.S_ISREG(m) else "d" if stat_mod.S_ISDIR(m) else "l" if stat_mod.S_ISLNK(m) else "o"
        return cls(kind, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, stat_mod.S_IMODE(m))

    def same_content_view(self, other: "Stat") -> bool:
        return (self.size, self.mtime_ns, self.ctime_ns, self.ino) == (other.size, other.mtime_ns, other.ctime_ns, other.ino)


def lstat(path: str) -> Stat | None:
    try:
        return Stat.of(os.lstat(path))
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except OSError as e:
        raise os_error("lstat", path, e) from None


@dataclass
class Segment:
    """Changed blocks found so far (payload kept only for changed non-zero blocks)."""

    changed: list[tuple[Block, bytes]] = field(default_factory=list)
    unchanged: int = 0
    last: bool = False


@dataclass
class ReadResult:
    before: Stat
    hashes: bytearray = field(default_factory=bytearray)
    zero_changed: int = 0
    bytes_read: int = 0


def read_file(path: str, block_size: int, known: bytes | None, result: ReadResult) -> Iterator[Segment]:
    """Yield segments of changed blocks; fills ``result.hashes`` with every block's hash.

    ``known`` is the concatenated hash list from the index (None: everything is new). Raises
    FileChangedError on a torn read; OS errors are wrapped with the path.
    """
    before = result.before
    fd = _open_checked(path, before)
    try:
        seg = Segment()
        seg_bytes = 0
        idx = 0
        while True:
            data = os.read(fd, block_size)
            if not data:
                break
            # a short read before EOF (rare: pipes/network fs) must be topped up
            while len(data) < block_size:
                more = os.read(fd, block_size - len(data))
                if not more:
                    break
                data += more
            h = block_hash(data)
            result.hashes += h
            result.bytes_read += len(data)
            blk = Block(idx, idx * block_size, len(data), h, is_zero(data))
            if not changed(blk, known):
                seg.unchanged += 1
            else:
                seg.changed.append((blk, b"" if blk.zero else data))
                if blk.zero:
                    result.zero_changed += 1
                else:
                    seg_bytes += len(data)
            idx += 1
            if seg_bytes >= SEGMENT_BYTES:
                _check(path, before)
                yield seg
                seg, seg_bytes = Segment(), 0
        if result.bytes_read != before.size:
            raise FileChangedError(path)
        _check(path, before)
        seg.last = True
        yield seg
    except OSError as e:
        raise os_error("read", path, e) from None
    finally:
        os.close(fd)


def _open_checked(path: str, before: Stat) -> int:
    """Open ``path`` for reading; FileChangedError unless it is still the stat'ed inode and size."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileChangedError(path) from None
    except OSError as e:
        if e.errno == 40:  # ELOOP: became a symlink
            raise FileChangedError(path) from None
        raise os_error("open", path, e) from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise os_error("read", path, e) from None
    if st.st_ino != before.ino or st.st_size != before.size:
        os.close(fd)
        raise FileChangedError(path)
    return fd


def read_small(path: str, before: Stat) -> bytes:
    """The whole content of a file of at most one block, checked like :func:`read_file` (same
    inode and size when opened, unchanged after the read). One call, one thread hop."""
    fd = _open_checked(path, before)
    try:
        parts = []
        n = 0
        while n <= before.size:  # one read past the end shows growth
            data = os.read(fd, before.size + 1 - n)
            if not data:
                break
            parts.append(data)
            n += len(data)
    except OSError as e:
        raise os_error("read", path, e) from None
    finally:
        os.close(fd)
    if n != before.size:
        raise FileChangedError(path)
    _check(path, before)
    return b"".join(parts)


def _check(path: str, before: Stat) -> None:
    now = lstat(path)
    if now is None or not before.same_content_view(now):
        raise FileChangedError(path)


@dataclass(slots=True)
class Pre:
    """What :func:`prefetch` saw of one path: its lstat (None: gone) and, for a regular file of at
    most one block, its whole content read and checked like :func:`read_small` (None: not read)."""

    st: Stat | None
    data: bytes | None = None


def prefetch(root: str, paths: list[str], block_size: int, budget: int = PREFETCH_BYTES) -> dict[str, Pre]:
    """lstat ``paths`` (relative to ``root``) and read the small regular files among them, in one
    call: one thread hop for a group of paths instead of two per file. Best effort: a path whose
    lstat or read failed is left out or has no data, and its examination does it again (and
    reports the error). Callers pop the paths' marks *before* this call, so a change after a read
    marks the path again."""
    out: dict[str, Pre] = {}
    for rel in paths:
        full = os.path.join(root, rel)
        try:
            st = lstat(full)
        except VolmirrorError:
            continue
        data = None
        if st is not None and st.kind == "f" and st.size <= block_size and st.size <= budget:
            try:
                data = read_small(full, st)
                budget -= len(data)
            except VolmirrorError:
                data = None
        out[rel] = Pre(st, data)
    return out
