"""What to send for one path: look at the disk, compare with the index, publish the difference.

:meth:`Examiner.path` lstats the path and compares it with its index entry (read and written
through the :class:`~daemon.source.batch.Batch`, so it sees the batch's own changes): a file is read
block by block in a worker thread and only blocks whose hash differs are sent, then a manifest; a
directory, symlink, deletion or kind change becomes its one op. Two cases always resend:

* a mirror's repair request (``mirror_hashes``): diff against the *mirror's* hashes, end with a
  manifest marked ``repair``;
* a path *in doubt* (its last batch failed after records may have left): the attempted blocks are
  treated as unknown, and the final state (manifest, mkdir, symlink, or delete) is sent again even
  if the path went back to what the index says.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Awaitable, Callable, Iterator

from ..blocks import HASH_LEN, block_hash, file_root
from ..config import VolumeConfig
from ..errors import FileChangedError
from ..store.source_index import DIR, FILE, SYMLINK, Entry
from .batch import Batch
from .publisher import Publisher
from .reader import Pre, ReadResult, Stat, lstat, read_file, read_small_packed

log = logging.getLogger("volmirror.source")

UNKNOWN_HASH = b"\xff" * HASH_LEN


def forget(hashes: bytes, idxs: set[int]) -> bytes:
    """The hash list with the hashes of blocks ``idxs`` replaced by a value no block hashes to."""
    h = bytearray(hashes)
    for i in idxs:
        if (i + 1) * HASH_LEN <= len(h):
            h[i * HASH_LEN : (i + 1) * HASH_LEN] = UNKNOWN_HASH
    return bytes(h)


def forget_blocks(b: Batch, path: str, idxs: set[int]) -> None:
    """Record in the index (inside ``b``) that blocks of ``path`` may differ at the mirror."""
    e = b.get(path)
    if e is None or e.kind != FILE or not idxs:
        return
    b.put(Entry(e.path, e.kind, e.size, e.mtime_ns, e.ino, e.mode, e.target, forget(e.hashes, idxs), e.root))


def close_reader(gen: Iterator[Any]) -> None:
    """Close a generator stepped in worker threads. After a cancel its thread may still be inside
    ``next``: it then finishes on its own and is closed when collected (it holds one file)."""
    try:
        gen.close()  # type: ignore[attr-defined]
    except ValueError:  # "generator already executing"
        pass


class Examiner:
    def __init__(self, vol: VolumeConfig, publisher: Publisher, mark_children: Callable[[str], None],
                 between_segments: Callable[[Batch, str], Awaitable[None]] | None = None, codec: str = "none") -> None:
        """``between_segments(b, path)``: awaited between two segments of a large file being sent
        (the priority lane publishes live changes there, into the same batch); ``codec``: payload
        compression (``source.compression``, done in the read threads)."""
        self.codec = codec
        self.vol = vol
        self.name = vol.name
        self.root = str(vol.path)
        self.pub = publisher
        self.mark_children = mark_children
        self.between_segments = between_segments

    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    async def send(self, b: Batch, op: str, fields: dict[str, Any], payload: bytes = b"", z: str = "") -> None:
        """Publish one op into ``b``; ``z``: the codec ``payload`` is compressed with ("": none)."""
        if z:
            fields["z"] = z
        b.sent(op, await self.pub.send(self.name, op, fields, payload))

    async def path(self, b: Batch, path: str, *, force: bool, mirror_hashes: bytes | None = None, resync: bool = False,
                   doubt: set[int] | None = None, pre: Pre | None = None) -> Stat | None:
        """Publish what changed at ``path`` (``doubt``: the blocks in doubt, None if not in doubt;
        ``pre``: its lstat and small content from :func:`~daemon.source.reader.prefetch`, taken
        after its mark was popped). Returns the lstat what was published stands for (None: the
        path is gone or excluded); a file that changed while it was read raises FileChangedError."""
        again = resync or doubt is not None  # the mirror may hold something else: send the final state
        if self.vol.is_excluded(path):
            st = None
        else:
            st = pre.st if pre is not None else lstat(self._abs(path))
        e = b.get(path)
        if st is None or st.kind == "o":
            if e is not None:
                await self._remove(b, path, e)
            elif b.has_children(path):
                # a directory whose own mkdir was never published (its files were) is gone: its
                # files must go too, or source index and mirror keep them forever
                await self._remove(b, path, Entry(path, DIR))
            elif again:
                await self.send(b, "delete", {"path": path})
            return st  # None (gone, or excluded), or a kind that is not replicated (sockets, fifos)
        await self.parents(b, path)
        if again and st.kind in (DIR, SYMLINK) and e is not None and e.kind == st.kind:
            e = None  # resend the directory / link as it is now
        if e is not None and e.kind != st.kind:
            await self._remove(b, path, e)
            e = None
        if st.kind == DIR:
            await self._dir(b, path, st, e)
        elif st.kind == SYMLINK:
            await self._symlink(b, path, st, e)
        else:
            await self._file(b, path, st, e, force=force or doubt is not None, resync=resync, mirror_hashes=mirror_hashes, doubt=doubt,
                             pre=pre if pre is not None and pre.data is not None else None)
        return st

    async def _remove(self, b: Batch, path: str, e: Entry) -> None:
        if e.kind == DIR:
            await self.send(b, "rmtree", {"path": path})
            b.delete_tree(path)
        else:
            await self.send(b, "delete", {"path": path})
            b.delete(path)

    async def parents(self, b: Batch, path: str) -> bool:
        """Publish parent directories the index does not know yet, outermost first, before anything
        below them: otherwise the mirror creates them implicitly, and if the source then loses them
        (renamed or removed before their own turn) nothing would ever remove them at the mirror.

        False if a missing parent is no longer a directory on disk (its own examination decides)."""
        missing: list[str] = []
        parent = os.path.dirname(path)
        while parent and b.get(parent) is None:
            missing.append(parent)
            parent = os.path.dirname(parent)
        for d in reversed(missing):
            st = lstat(self._abs(d))
            if st is None or st.kind != DIR or self.vol.is_excluded(d):
                return False  # gone or changed meanwhile: its own examination decides
            b.paths.append(d)  # in doubt with the batch if it fails
            await self.send(b, "mkdir", {"path": d, "mode": st.mode})
            b.put(Entry(d, DIR, 0, st.mtime_ns, st.ino, st.mode))
            self.mark_children(d)  # what _dir does for a new directory: nothing inside is missed
        return True

    async def _dir(self, b: Batch, path: str, st: Stat, e: Entry | None) -> None:
        if e is None or e.mode != st.mode or e.ino != st.ino:
            await self.send(b, "mkdir", {"path": path, "mode": st.mode})
            b.put(Entry(path, DIR, 0, st.mtime_ns, st.ino, st.mode))
        if e is None:
            self.mark_children(path)

    async def _symlink(self, b: Batch, path: str, st: Stat, e: Entry | None) -> None:
        try:
            target = os.readlink(self._abs(path))
        except FileNotFoundError:
            raise FileChangedError(path) from None
        if e is None or e.target != target:
            await self.send(b, "symlink", {"path": path, "target": target})
            b.put(Entry(path, SYMLINK, 0, st.mtime_ns, st.ino, 0, target))

    async def _small(self, b: Batch, path: str, st: Stat, e: Entry | None, *, resend: bool, pre: Pre | None) -> None:
        """A file of at most one block: one read (``pre``: its content, already read with ``st``), and one
        ``file`` record with its content (or a manifest if only its metadata changed)."""
        if pre is not None:
            data, (payload, z) = pre.data, pre.packed
        else:
            data, (payload, z) = await asyncio.to_thread(read_small_packed, self._abs(path), st, self.codec)
        h = block_hash(data)
        hashes = h if st.size else b""
        root = file_root(hashes, st.size)
        b.files_done += 1
        b.bytes_read += len(data)
        if e is not None and not resend and e.size == st.size and e.hashes == hashes:
            if (e.mode, e.mtime_ns, e.ino) == (st.mode, st.mtime_ns, st.ino):
                return
            b.blocks["unchanged"] += 1 if st.size else 0
            await self.send(b, "manifest", {"path": path, "size": st.size, "mode": st.mode, "mtime_ns": st.mtime_ns, "root": root.hex(),
                                            "bs": self.vol.block_size})
        else:
            await self.send(b, "file", {"path": path, "size": st.size, "mode": st.mode, "mtime_ns": st.mtime_ns, "root": root.hex(),
                                        "hash": h.hex(), "bs": self.vol.block_size}, payload, z)
            if st.size:
                b.sent_block(path, 0)
                b.blocks["changed"] += 1
                b.payload_bytes += st.size
        b.put(Entry(path, FILE, st.size, st.mtime_ns, st.ino, st.mode, None, hashes, root))

    async def _file(self, b: Batch, path: str, st: Stat, e: Entry | None, *, force: bool, resync: bool,
                    mirror_hashes: bytes | None, doubt: set[int] | None, pre: Pre | None = None) -> None:
        if not force and e is not None and (e.size, e.mtime_ns, e.ino, e.mode) == (st.size, st.mtime_ns, st.ino, st.mode):
            return
        bs = self.vol.block_size
        if st.size <= bs and not resync:
            await self._small(b, path, st, e, resend=doubt is not None, pre=pre)
            return
        known = e.hashes if e is not None else None
        if resync:
            # answer a mirror: diff against what *it* has, and always end with a manifest
            known, e = mirror_hashes, None
        elif doubt is not None:
            known, e = (forget(known, doubt) if known else None), None
        res = ReadResult(before=st)
        gen = read_file(self._abs(path), bs, known, res, self.codec)
        size_changed = e is None or e.size != st.size
        blocks_changed = False
        first = True
        # pipelined: the next segment is read while this one's blocks are published
        ahead: asyncio.Future[Any] | None = asyncio.ensure_future(asyncio.to_thread(next, gen, None))
        try:
            while ahead is not None and (seg := await ahead) is not None:
                ahead = None if seg.last else asyncio.ensure_future(asyncio.to_thread(next, gen, None))
                if first and size_changed:
                    await self.send(b, "truncate", {"path": path, "size": st.size, "bs": bs})
                first = False
                for blk, payload, z in seg.changed:
                    fields = {"path": path, "off": blk.offset, "len": blk.length, "hash": blk.hash.hex(), "size": st.size, "zero": blk.zero, "bs": bs}
                    await self.send(b, "block", fields, payload, z)
                    b.sent_block(path, blk.index)
                    b.blocks["zero" if blk.zero else "changed"] += 1
                    if not blk.zero:
                        b.payload_bytes += blk.length
                    blocks_changed = True
                b.blocks["unchanged"] += seg.unchanged
                if not seg.last and self.between_segments is not None:
                    await self.between_segments(b, path)
        except FileChangedError:
            forget_blocks(b, path, b.sent_blocks.get(path, set()))
            raise
        finally:
            if ahead is not None:  # a failure or cancel while the next segment was being read
                if ahead.done():
                    if not ahead.cancelled():
                        ahead.exception()  # retrieved: it does not matter any more
                else:
                    ahead.cancel()  # its thread finishes the read on its own; close_reader copes
            close_reader(gen)
        b.files_done += 1
        b.bytes_read += res.bytes_read
        hashes = bytes(res.hashes)
        if e is not None and not blocks_changed and not size_changed and (e.mode, e.mtime_ns, e.ino) == (st.mode, st.mtime_ns, st.ino) and e.hashes == hashes:
            return
        root = file_root(hashes, st.size)
        mf = {"path": path, "size": st.size, "mode": st.mode, "mtime_ns": st.mtime_ns, "root": root.hex(), "bs": bs}
        if resync:
            mf["repair"] = True
            log.info("resent %s to a mirror (%d block(s))", path, len(b.sent_blocks.get(path, ())), extra={"volume": self.name, "path": path, "event": "resync"})
        await self.send(b, "manifest", mf)
        b.put(Entry(path, FILE, st.size, st.mtime_ns, st.ino, st.mode, None, hashes, root))
