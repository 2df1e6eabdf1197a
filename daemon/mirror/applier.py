"""Operations → the mirror's filesystem, with an fsync policy.

Each op *sets the state* of one path (bytes at an offset, a size, metadata, existence, kind), so
replaying a run of ops in order reaches the same final state. Where the disk disagrees with what the
op needs (a directory where a file is to be written, a symlink where a file is), the op wins: the
stream is the truth. ``rename`` is the one op that moves state between paths; the agent makes it a
durability barrier so it is never replayed after later ops (see docs/design.md).

Writes never follow symlinks (parents are checked by the jail, the final component is opened with
``O_NOFOLLOW`` or replaced). What was written is made durable by :meth:`Applier.sync`, which the
agent calls before it records progress and commits offsets: one ``syncfs(2)`` per file system touched
(volume roots), which flushes every written file and directory in one journal commit, instead of one
``fsync`` per file (a journal commit each: the limit of small-file throughput). Where ``syncfs`` is
not available, every touched file and directory is fsynced as before. Every 16 MiB applied, a
*write-behind* starts the same syncfs on a helper thread, so the disk writes while the next records
are applied and a durability point waits for little; it is only a hint (see :meth:`Applier.write_behind`).

A new file in an existing directory is created with one ``open(O_CREAT|O_EXCL)``; anything else at
the path (or a missing parent) takes the general route that looks first.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ..blocks import _zeros
from ..errors import RejectedEvent, TransientError, os_error
from ..wire import Event
from .jail import resolve

if TYPE_CHECKING:
    from .history import History

MAX_OPEN = 64
WRITE_BEHIND_BYTES = 16 * 1024 * 1024  # applied bytes between two background writebacks (write_behind)


def _load_syncfs():  # type: ignore[no-untyped-def]
    try:
        f = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int]
    f.restype = ctypes.c_int
    return f


_SYNCFS = _load_syncfs()
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class ApplyError(TransientError):
    """A local I/O failure while applying (disk full, permissions, name too long).

    ``errno`` tells the agent what to do (:func:`daemon.mirror.repair.classify`): retry the record
    later, or quarantine its path and move on. ``path`` is relative to the mirror root."""

    def __init__(self, message: str, errno_: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno_
        self.path = path


def pwrite_all(fd: int, data: bytes | memoryview, off: int) -> None:
    """``os.pwrite`` until every byte is written; a write that makes no progress is ENOSPC."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write: no bytes written")
        view = view[n:]
        off += n


class Applier:
    def __init__(self, root: Path, *, syncfs: bool = True, undo: "History | None" = None) -> None:
        self.root = str(root)
        self.undo = undo  # the history's undo journal: every change is journalled before it is made
        self._vol = ""  # the volume of the op being applied
        self.syncfs = syncfs and _SYNCFS is not None
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._dirs: set[str] = set()
        self._touched: set[str] = set()  # volume roots written below since the last sync (syncfs mode)
        self._made_roots: set[str] = set()
        self._root_dev: dict[str, int] = {}  # volume root → its file system (syncfs mode)
        self._dev_fd: dict[int, int] = {}  # file system → a volume root held open for syncfs
        self._pool: ThreadPoolExecutor | None = None  # write-behind helper, started on first use
        self._behind: Future[None] | None = None
        self._since_behind = 0  # bytes applied since the last write-behind or sync
        self._failed: ApplyError | None = None  # a sync failed: raised again until clear_failure()
        self.merged = False  # the last rename merged into an existing directory
        self.noop = False  # the last rename found no source and an existing destination

    # -- public ---------------------------------------------------------------------------------
    def vol_root(self, vol: str) -> str:
        r = os.path.join(self.root, vol)
        if r not in self._made_roots:
            try:
                os.makedirs(r, exist_ok=True)
            except OSError as e:
                raise ApplyError(f"cannot create volume root {r}: {e.strerror}", e.errno, vol) from None
            if self.syncfs:
                self._hold_root(r)
            self._made_roots.add(r)
        return r

    def _hold_root(self, r: str) -> None:
        """Open the volume root once and keep it open for syncfs. syncfs reports a writeback error
        once per descriptor (Linux 5.8+: the descriptor samples the file system's error sequence
        when opened); a descriptor opened at each sync would not be told of an error that another
        syncfs caller on the same file system (another process, or our own write-behind) saw
        first. One descriptor held from before our writes is told of every error since."""
        try:
            fd = os.open(r, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ApplyError(f"cannot open volume root {r} to sync it: {e.strerror}", e.errno) from None
        dev = os.fstat(fd).st_dev
        self._root_dev[r] = dev
        if dev in self._dev_fd:
            os.close(fd)  # one held descriptor per file system
        else:
            self._dev_fd[dev] = fd

    def apply(self, ev: Event, *, planned: bool = False) -> int:
        """Apply one op; returns block bytes written. Raises RejectedEvent or ApplyError.
        ``planned``: its undo entries are already journalled (History.plan), else they are now."""
        vr = self.vol_root(ev.vol)
        self._touched.add(vr)
        self._vol = ev.vol
        try:
            full = resolve(vr, ev.path)  # lstat of parents: ENAMETOOLONG, EACCES surface here too
            if self.undo is not None and not planned:
                self.undo.before_op(vr, ev)
            n = getattr(self, "_op_" + ev.op)(vr, full, ev)
        except OSError as e:
            rel = os.path.join(ev.vol, ev.path)
            raise ApplyError(str(os_error(ev.op, rel, e)), e.errno, ev.path) from None
        if self.syncfs:
            self._since_behind += n
            if self._since_behind >= WRITE_BEHIND_BYTES:
                self.write_behind()
        return n

    def sync(self) -> None:
        """Make everything applied so far durable; close the file descriptors.

        A failure is *sticky*: the kernel reports a writeback error only once, so every later
        call raises it again until :meth:`clear_failure` (after the caller went back to its last
        durable point and will apply everything since again); otherwise a second sync, finding
        nothing to report, would let data that never reached the disk be recorded as durable."""
        if self._failed is not None:
            raise self._failed
        try:
            self._sync()
        except ApplyError as e:
            self._failed = e
            raise

    def clear_failure(self) -> None:
        """The caller is back at its last durable point (everything since will be applied again)."""
        self._failed = None

    def _sync(self) -> None:
        if self.syncfs:
            self._sync_fs()
            return
        try:
            for path, fd in list(self._fds.items()):
                os.fsync(fd)
                os.close(fd)
                del self._fds[path]
            for d in sorted(self._dirs, key=len, reverse=True):
                try:
                    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:
                    continue  # gone or replaced since (ENOENT, ENOTDIR, ELOOP); its parent is in the set too
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            self._dirs.clear()
        except OSError as e:
            raise ApplyError(f"fsync failed: {e.strerror}", e.errno) from None

    def _sync_fs(self) -> None:
        for fd in self._fds.values():
            os.close(fd)  # written data stays in the page cache: syncfs flushes it
        self._fds.clear()
        self._dirs.clear()
        self._wait_behind()  # raises what the write-behind met: it may have taken the error's only report
        for vr, fd in self._sync_fds().items():
            if _SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise ApplyError(f"syncfs of {vr} failed: {os.strerror(err)}", err)
        self._touched.clear()
        self._since_behind = 0

    def _sync_fds(self, *, check: bool = True) -> dict[str, int]:
        """One held descriptor per file system touched since the last sync (volume root → fd).

        A volume root that is no longer on the file system its descriptor was opened on (a file
        system mounted there since, or the root removed) raises ApplyError: a syncfs of the old
        one would not make what was written durable. The root is held again when next used."""
        out: dict[str, int] = {}
        seen: set[int] = set()
        for vr in sorted(self._touched):
            dev = self._root_dev[vr]
            if check and (now := self._dev_now(vr)) != dev:
                self._made_roots.discard(vr)
                self._touched.discard(vr)
                del self._root_dev[vr]
                raise ApplyError(f"volume root {vr} is not on the file system it was synced on (device {dev}, now: {now}): "
                                 "written data cannot be made durable there", errno.EIO)
            if dev not in seen:
                seen.add(dev)
                out[vr] = self._dev_fd[dev]
        return out

    @staticmethod
    def _dev_now(vr: str) -> int | str:
        try:
            return os.stat(vr).st_dev
        except OSError as e:
            return e.strerror or "stat failed"

    def write_behind(self) -> None:
        """Start writing back what was applied so far, on a helper thread (a ``syncfs`` of the
        file systems touched), unless one is still running: the disk works while the next records
        are applied, and the next :meth:`sync` has little left to wait for. A hint only: nothing
        is recorded as durable because of it, and an error it meets is raised by the next
        :meth:`sync` (syncfs reports a writeback error once per descriptor: the helper may be the
        one that sees it)."""
        if not self.syncfs or not self._touched or (self._behind is not None and not self._behind.done()):
            return
        if self._behind is not None and self._behind.exception() is not None:
            return  # keep the error for sync()
        self._since_behind = 0
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="volmirror-write-behind")
        self._behind = self._pool.submit(self._behind_run, self._sync_fds(check=False))

    @staticmethod
    def _behind_run(fds: dict[str, int]) -> None:
        for vr, fd in fds.items():
            if _SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise ApplyError(f"syncfs of {vr} failed (write-behind): {os.strerror(err)}", err)

    def _wait_behind(self) -> None:
        fut, self._behind = self._behind, None
        if fut is not None:
            fut.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for fd in [*self._fds.values(), *self._dev_fd.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._dev_fd.clear()
        self._root_dev.clear()
        self._made_roots.clear()

    # -- helpers --------------------------------------------------------------------------------
    def _touch_dir(self, full: str) -> None:
        self._dirs.add(os.path.dirname(full))

    def _release(self, full: str) -> None:
        """fsync and close open descriptors at or below ``full`` (before it is moved or removed)."""
        pre = full + "/"
        for p in [p for p in self._fds if p == full or p.startswith(pre)]:
            fd = self._fds.pop(p)
            try:
                if not self.syncfs:
                    self._fsync(fd, p)
            finally:
                os.close(fd)

    def _ensure_parent(self, vr: str, full: str) -> None:
        parent = os.path.dirname(full)
        if parent == vr or os.path.isdir(parent) and not os.path.islink(parent):
            return
        rel = os.path.relpath(parent, vr)
        cur = vr
        for comp in rel.split("/"):
            cur = os.path.join(cur, comp)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                os.mkdir(cur, 0o755)
                self._touch_dir(cur)
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            # a file or symlink where the stream needs a directory: the stream wins
            self._remove(cur)
            os.mkdir(cur, 0o755)
            self._touch_dir(cur)

    def _remove(self, full: str) -> bool:
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return False
        self._release(full)
        if self.undo is not None and self.undo.take(self._vol, full):
            self._touch_dir(full)  # moved into the history, not deleted
            return True
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(full)
        else:
            os.unlink(full)
        self._touch_dir(full)
        return True

    def _fd(self, vr: str, full: str) -> int:
        return self._open(vr, full)[0]

    def _open(self, vr: str, full: str) -> tuple[int, bool]:
        """A descriptor for writing the regular file ``full`` (created if missing, replacing anything
        else at the path), and True if it was created empty just now."""
        fd = self._fds.get(full)
        if fd is None:
            # the common case of an initial sync: a new file in an existing directory, one syscall
            try:
                fd = os.open(full, _OPEN_FLAGS | os.O_EXCL, 0o600)
            except (FileExistsError, FileNotFoundError, NotADirectoryError):
                fd = None  # something is there, or a parent is missing or not a directory: below
            else:
                self._touch_dir(full)
                self._keep(full, fd)
                return fd, True
        return self._fd_general(vr, full, fd), False

    def _fd_general(self, vr: str, full: str, fd: int | None) -> int:
        if fd is not None:
            # the path may have been removed or replaced behind our back (someone on the mirror
            # host, or a repair): never write through a descriptor that is no longer that path
            try:
                same = os.lstat(full).st_ino == os.fstat(fd).st_ino
            except OSError:
                same = False
            if same:
                self._fds.move_to_end(full)
                return fd
            del self._fds[full]
            os.close(fd)
        try:
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode):
                self._remove(full)
        except (FileNotFoundError, NotADirectoryError):  # a parent is missing, or a file holds its place
            self._ensure_parent(vr, full)
            self._touch_dir(full)
        fd = os.open(full, _OPEN_FLAGS, 0o600)
        self._keep(full, fd)
        return fd

    def _keep(self, full: str, fd: int) -> None:
        self._fds[full] = fd
        if len(self._fds) > MAX_OPEN:
            old, ofd = self._fds.popitem(last=False)
            try:
                if not self.syncfs:
                    self._fsync(ofd, old)
            finally:
                os.close(ofd)

    def _fsync(self, fd: int, path: str) -> None:
        """fsync before a descriptor is closed (mode without syncfs); a failure is sticky like a
        failed sync: the error is reported once, and the descriptor is gone after this."""
        try:
            os.fsync(fd)
        except OSError as e:
            self._failed = ApplyError(f"fsync of {path} failed: {e.strerror}", e.errno)
            raise self._failed from None

    # -- ops ------------------------------------------------------------------------------------
    def _op_block(self, vr: str, full: str, ev: Event) -> int:
        fd = self._fd(vr, full)
        n = ev["len"]
        if ev["zero"]:
            if os.fstat(fd).st_size > ev["off"]:  # beyond EOF the size op leaves zeros anyway
                pwrite_all(fd, _zeros(n), ev["off"])
            return 0
        pwrite_all(fd, ev.payload, ev["off"])
        return n

    def _op_truncate(self, vr: str, full: str, ev: Event) -> int:
        os.ftruncate(self._fd(vr, full), ev["size"])
        return 0

    def _op_manifest(self, vr: str, full: str, ev: Event) -> int:
        fd = self._fd(vr, full)
        if os.fstat(fd).st_size != ev["size"]:
            os.ftruncate(fd, ev["size"])
        os.fchmod(fd, ev["mode"])
        os.utime(fd, ns=(ev["mtime_ns"], ev["mtime_ns"]))
        return 0

    def _op_file(self, vr: str, full: str, ev: Event) -> int:
        """A whole small file: content, size and metadata in one op."""
        fd, new = self._open(vr, full)
        n = ev["size"]
        if n:
            pwrite_all(fd, ev.payload, 0)
        if not new and os.fstat(fd).st_size != n:
            os.ftruncate(fd, n)
        os.fchmod(fd, ev["mode"])
        os.utime(fd, ns=(ev["mtime_ns"], ev["mtime_ns"]))
        return n

    def _op_delete(self, vr: str, full: str, ev: Event) -> int:
        self._remove(full)
        return 0

    _op_rmtree = _op_delete

    def _op_mkdir(self, vr: str, full: str, ev: Event) -> int:
        try:
            st = os.lstat(full)
            if not stat.S_ISDIR(st.st_mode):
                self._remove(full)
                raise FileNotFoundError
        except FileNotFoundError:
            self._ensure_parent(vr, full)
            os.mkdir(full, 0o700)
            self._touch_dir(full)
        os.chmod(full, ev["mode"])
        return 0

    def _op_symlink(self, vr: str, full: str, ev: Event) -> int:
        try:
            if os.readlink(full) == ev["target"]:
                return 0
        except (FileNotFoundError, OSError):
            pass
        self._remove(full)
        self._ensure_parent(vr, full)
        os.symlink(ev["target"], full)
        self._touch_dir(full)
        return 0

    def _op_rename(self, vr: str, full: str, ev: Event) -> int:
        self.merged = False  # read by the index upkeep: a merge keeps dst's other entries
        self.noop = False  # nothing to move: the index must not drop what dst holds
        dst = resolve(vr, ev["dst"])
        try:
            sst = os.lstat(full)
        except FileNotFoundError:
            if os.path.lexists(dst):
                self.noop = True  # already renamed (replay after a crash), or never had src
                return 0
            raise RejectedEvent("conflict", f"rename {ev.path} -> {ev['dst']}: source missing on the mirror") from None
        if dst == full or dst.startswith(full + "/"):
            raise RejectedEvent("conflict", f"rename {ev.path} -> {ev['dst']}: destination inside source")
        self._release(full)
        if self.undo is not None:
            self.undo.rename_parents(ev.vol, vr, ev["dst"])
        self._ensure_parent(vr, dst)
        try:
            dstat = os.lstat(dst)
            history = self.undo is not None and self.undo.active(ev.vol)
            if stat.S_ISDIR(dstat.st_mode) and stat.S_ISDIR(sst.st_mode) and not (history and not os.listdir(dst)):
                # A live rename onto a non-empty directory cannot happen at the source (ENOTEMPTY):
                # this one comes from a source whose index is behind the stream (it crashed after
                # sending, and its start-up scan matched a reused inode). Merge instead of deleting
                # what the stream already put at dst; the source re-examines dst's entries next.
                self._release(dst)
                if self.undo is not None:
                    self.undo.unproven(ev.vol, ev["dst"], "directories merged by a rename: not journalled entry by entry")
                self._merge(full, dst)
                self.merged = True
                self._touch_dir(full)
                self._touch_dir(dst)
                return 0
            if stat.S_ISDIR(dstat.st_mode) != stat.S_ISDIR(sst.st_mode) or history:
                self._remove(dst)  # with history: moved aside (an empty directory too), not replaced by the rename
            else:
                self._release(dst)
        except FileNotFoundError:
            pass
        try:
            self._rename(full, dst)
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            self._remove(dst)
            self._rename(full, dst)
        self._touch_dir(full)
        self._touch_dir(dst)
        return 0

    def _rename(self, src: str, dst: str) -> None:
        """``os.rename``, journalled first when the volume keeps history."""
        journalled = self.undo is not None and self.undo.renaming(self._vol, src, dst)
        try:
            os.rename(src, dst)
        except OSError:
            if self.undo is not None:
                self.undo.rename_failed(self._vol, journalled)
            raise

    def _merge(self, src: str, dst: str) -> None:
        """Move every entry of directory ``src`` into directory ``dst`` (src's entry wins on a name
        clash, directories merge recursively), then remove the empty ``src``."""
        for name in os.listdir(src):
            s, d = os.path.join(src, name), os.path.join(dst, name)
            try:
                dst_st = os.lstat(d)
            except FileNotFoundError:
                os.rename(s, d)
                continue
            if stat.S_ISDIR(dst_st.st_mode) and stat.S_ISDIR(os.lstat(s).st_mode):
                self._merge(s, d)
                continue
            self._remove(d)
            os.rename(s, d)
        os.rmdir(src)

    def _op_heartbeat(self, vr: str, full: str, ev: Event) -> int:  # pragma: no cover - not routed here
        return 0
