"""Path safety for the mirror: every path an event names must stay inside ``<root>/<volume>``.

:func:`resolve` takes a relative path that already passed the wire's shape check (no absolute
path, no ``..``, no NUL) and walks it from the volume root with ``lstat``. Any *parent* component
that is a symlink is refused (``symlink_escape``): a legitimate stream never names a path through a
symlink, because the source reports real paths. The final component is never followed either: the
applier opens it with ``O_NOFOLLOW`` and replaces a symlink instead of writing through it. The
result is the absolute path to use plus whether each parent exists.
"""

from __future__ import annotations

import os
import stat

from ..errors import RejectedEvent
from ..wire import check_relpath


def resolve(vol_root: str, rel: str) -> str:
    """Absolute path of ``rel`` under ``vol_root``, refusing any route through a symlink."""
    check_relpath(rel)
    parts = rel.split("/")
    cur = vol_root
    for comp in parts[:-1]:
        cur = os.path.join(cur, comp)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            # the rest of the parents do not exist yet: nothing to traverse, nothing to escape
            return os.path.join(vol_root, rel)
        except NotADirectoryError:
            return os.path.join(vol_root, rel)
        if stat.S_ISLNK(st.st_mode):
            raise RejectedEvent("symlink_escape", f"path {rel!r} goes through symlink {os.path.relpath(cur, vol_root)!r}")
    full = os.path.join(vol_root, rel)
    # belt and braces: the joined path must be lexically inside the root
    if os.path.commonpath([vol_root, os.path.normpath(full)]) != vol_root:
        raise RejectedEvent("unsafe_path", f"path {rel!r} leaves the mirror root")
    return full
