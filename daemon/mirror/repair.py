"""Pure decisions of the mirror: what a verified listing means for one path; what a local error means.

No I/O, no metrics: given what the source's listing says, what the mirror's index says and what kind
of thing is on the mirror's disk, say what to do. The rule these functions exist to keep: a path is
deleted only when a complete, verified listing says the source does not have it *and* the mirror
has not applied anything to it since the listing's position. Everything else is kept, adopted
(the data on disk already is the source's) or fetched (only the blocks that differ).
"""

from __future__ import annotations

import errno
from typing import NamedTuple

from ..digest import entry_key
from ..listing import Row

# actions
OK = "ok"  # index and disk agree with the listing
KEEP = "keep"  # written after the listing's position: the listing is older than the mirror here
DELETE = "delete"  # not at the source as of the listing: extra (justified by the listing)
MKDIR = "mkdir"  # make the directory / fix its mode (children untouched)
SYMLINK = "symlink"  # set the symlink to the listed target
COMPARE = "compare"  # a regular file is on disk: hash it; adopt it if it is the source's, else fetch the difference
FETCH = "fetch"  # nothing usable on disk: ask the source for the file


class Decision(NamedTuple):
    action: str
    drift: str | None  # content | missing | extra | metadata | None


def listing_action(src: Row | None, mine: object | None, disk: str | None, *, touched: bool) -> Decision:
    """``mine`` is the mirror index's entry (EntryLike) or None; ``disk`` is "f", "d", "l", "o" or None."""
    if touched:
        return Decision(KEEP, None)
    if src is None:
        if mine is None and disk is None:
            return Decision(OK, None)
        return Decision(DELETE, "extra")
    if mine is not None and entry_key(mine) == entry_key(src) and disk == src.kind:  # type: ignore[arg-type]
        return Decision(OK, None)
    if src.kind == "d":
        return Decision(MKDIR, "missing" if disk is None else "metadata" if disk == "d" else "content")
    if src.kind == "l":
        return Decision(SYMLINK, "missing" if disk is None else "content")
    if disk == "f":
        return Decision(COMPARE, None)  # drift kind is known after hashing
    return Decision(FETCH, "missing" if disk is None else "content")


def compared_file(src: Row, disk_size: int, disk_root: bytes, disk_mode: int, disk_mtime_ns: int) -> Decision:
    """After hashing a regular file on disk: adopt it (fixing metadata locally) or fetch what differs."""
    if disk_size != src.size or disk_root != src.root:
        return Decision(FETCH, "content")
    if (disk_mode, disk_mtime_ns) != (src.mode, src.mtime_ns):
        return Decision(OK, "metadata")
    return Decision(OK, None)


# -- local failures while applying a record ----------------------------------------------------------
RETRY = "retry"  # can succeed later by itself (space freed, disk back): retry the record, never skip it
QUARANTINE = "quarantine"  # cannot succeed on this mirror: quarantine the path, move on
RETRY_THEN_QUARANTINE = "retry_then_quarantine"  # may be an operator fixing things: retry a few times first

RETRIES_BEFORE_QUARANTINE = 5

_NEVER = {errno.ENAMETOOLONG: "name_too_long", errno.EFBIG: "too_large", errno.ELOOP: "name_too_long"}
_MAYBE = {errno.EACCES: "permission", errno.EPERM: "permission", errno.EROFS: "permission", errno.ENOTEMPTY: "io",
          errno.EISDIR: "io", errno.ENOTDIR: "io", errno.EINVAL: "io", errno.EEXIST: "io"}
_LATER = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ENOMEM, errno.EMFILE, errno.ENFILE}


def classify(err: int | None) -> tuple[str, str]:
    """(what to do, quarantine reason) for an OSError's errno while applying one record.

    Disk full and I/O errors are retried forever (the stream must not skip a change because the
    disk was full for a minute); a name this file system cannot hold or a file larger than it allows
    is quarantined at once; permission problems are retried a few times, then quarantined."""
    if err in _NEVER:
        return QUARANTINE, _NEVER[err]
    if err in _LATER or err is None:
        return RETRY, "io"
    return RETRY_THEN_QUARANTINE, _MAYBE.get(err, "io")
