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
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

from ..blocks import Block, block_hash, differs, is_zero
from ..codec import Packer, pack
from ..errors import FileChangedError, VolmirrorError, os_error

SEGMENT_BYTES = 8 * 1024 * 1024  # read, checked and sent per thread hop; live changes may go between two
PREFETCH_BYTES = 16 * 1024 * 1024  # content read ahead per :func:`prefetch` call
WINDOW_BYTES = 8 * 1024 * 1024  # of a large file read and hashed at once, half of it in _HELPER

_HELPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="volmirror-read")


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
    """Changed blocks found so far: (block, payload, codec); the payload (compressed when codec is
    not "", see :mod:`daemon.codec`) is kept only for changed non-zero blocks."""

    changed: list[tuple[Block, bytes, str]] = field(default_factory=list)
    unchanged: int = 0
    last: bool = False


@dataclass
class ReadResult:
    before: Stat
    hashes: bytearray = field(default_factory=bytearray)
    zero_changed: int = 0
    bytes_read: int = 0


def read_file(path: str, block_size: int, known: bytes | None, result: ReadResult, codec: str = "none") -> Iterator[Segment]:
    """Yield segments of changed blocks; fills ``result.hashes`` with every block's hash.

    ``known`` is the concatenated hash list from the index (None: everything is new). Raises
    FileChangedError on a torn read; OS errors are wrapped with the path. Changed blocks are
    compressed with ``codec`` where that pays (:class:`~daemon.codec.Packer`).

    The file is read in windows of :data:`WINDOW_BYTES`; the two halves of a window are read and
    hashed at once, one in the calling thread and one in :data:`_HELPER` (``pread`` and XXH3 on
    blocks above 64 KiB release the GIL), so a large file is read at close to twice one thread's
    rate. Only the changed blocks are copied out. No mmap: a file truncated under a mapping kills
    the process with SIGBUS.
    """
    before = result.before
    fd = _open_checked(path, before)
    try:
        size = before.size
        window = max(block_size, WINDOW_BYTES // block_size * block_size)
        half = (window // block_size + 1) // 2 * block_size
        # reused across windows (fresh memory costs page faults); unused when every block is new
        bufs = (bytearray(min(half, size)), bytearray(min(half, size))) if known is not None else (bytearray(), bytearray())
        packers = (Packer(codec), Packer(codec))
        seg = Segment()
        seg_bytes = 0
        off = 0
        while off < size:
            end = min(size, off + window)
            # split at a block boundary; a window of one block is read here alone
            mid = off + ((end - off) // block_size + 1) // 2 * block_size
            second = _HELPER.submit(_span, path, fd, mid, end, block_size, known, bufs[1], packers[1]) if mid < end else None
            try:
                parts = [_span(path, fd, off, min(mid, end), block_size, known, bufs[0], packers[0])]
            except BaseException:
                if second is not None:
                    futures.wait([second])  # the fd stays open until the helper is done with it
                raise
            if second is not None:
                parts.append(second.result())
            for hashes, changed_blocks, unchanged in parts:
                result.hashes += hashes
                seg.unchanged += unchanged
                for ch in changed_blocks:
                    seg.changed.append(ch)
                    blk = ch[0]
                    if blk.zero:
                        result.zero_changed += 1
                    else:
                        seg_bytes += blk.length
            result.bytes_read += end - off
            off = end
            if seg_bytes >= SEGMENT_BYTES and off < size:
                _check(path, before)
                yield seg
                seg, seg_bytes = Segment(), 0
        _check(path, before)
        seg.last = True
        yield seg
    except OSError as e:
        raise os_error("read", path, e) from None
    finally:
        os.close(fd)


def _span(path: str, fd: int, start: int, end: int, block_size: int, known: bytes | None,
          buf: bytearray, packer: Packer) -> tuple[bytes, list[tuple[Block, bytes, str]], int]:
    """Read bytes ``[start, end)`` of ``fd`` (``start`` on a block boundary) into ``buf`` and hash its blocks:
    (their hashes, the changed blocks with their packed payload (empty for a zero block) and its
    codec, the number unchanged). A read that ends early means the file shrank: FileChangedError."""
    hashes = bytearray()
    changed_blocks: list[tuple[Block, bytes, str]] = []
    unchanged = 0
    idx = start // block_size

    def add_changed(data: bytes, h: bytes) -> None:
        zero = is_zero(data)
        changed_blocks.append((Block(idx, idx * block_size, len(data), h, zero), *((b"", "") if zero else packer.pack(data))))

    if known is None:  # every block is sent: read each into its own bytes (one copy, not two)
        for off in range(start, end, block_size):
            data = _pread_all(path, fd, min(block_size, end - off), off)
            h = block_hash(data)
            hashes += h
            add_changed(data, h)
            idx += 1
        return bytes(hashes), changed_blocks, unchanged
    n = end - start
    mv = memoryview(buf)[:n]
    got = 0
    while got < n:
        k = os.preadv(fd, [mv[got:]], start + got)
        if k == 0:
            raise FileChangedError(path)  # it shrank under us
        got += k
    for a in range(0, n, block_size):
        chunk = mv[a : a + block_size]
        h = block_hash(chunk)
        hashes += h
        if differs(known, idx, h):
            add_changed(bytes(chunk), h)
        else:
            unchanged += 1
        idx += 1
    mv.release()
    return bytes(hashes), changed_blocks, unchanged


def _pread_all(path: str, fd: int, n: int, off: int) -> bytes:
    data = os.pread(fd, n, off)
    while len(data) < n:  # a short read before the end (rare: network file systems) is topped up
        more = os.pread(fd, n - len(data), off + len(data))
        if not more:
            raise FileChangedError(path)  # it shrank under us
        data += more
    return data


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
    most one block, its whole content read and checked like :func:`read_small` (None: not read)
    and that content packed for sending."""

    st: Stat | None
    data: bytes | None = None
    packed: tuple[bytes, str] = (b"", "")  # data as it is sent: (payload, codec), see daemon.codec


def read_small_packed(path: str, before: Stat, codec: str) -> tuple[bytes, tuple[bytes, str]]:
    """:func:`read_small`, and its content packed for sending (in the same thread)."""
    data = read_small(path, before)
    return data, pack(data, codec)


def prefetch(root: str, paths: list[str], block_size: int, budget: int = PREFETCH_BYTES, codec: str = "none") -> dict[str, Pre]:
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
        pre = Pre(st)
        if st is not None and st.kind == "f" and st.size <= block_size and st.size <= budget:
            try:
                pre.data = read_small(full, st)
                pre.packed = pack(pre.data, codec)  # each file tried: one directory mixes kinds of content
                budget -= len(pre.data)
            except VolmirrorError:
                pre.data = None
        out[rel] = pre
    return out
