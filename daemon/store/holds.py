"""The mirror's held volumes and failback offsets, kept across restarts in its state_dir.

``guard-paused.json`` maps a volume to why applying it is held: paused by the mass-change guard, or
rolled back in place for a failover (written by ``volmirror restore --in-place`` before it touches
the tree, read by the agent at start-up). ``failback-superseded.json`` maps a volume to the
offsets below which its records were sent before a failback (``resume --failback-done``).
Both are small JSON objects, replaced atomically and durably.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("volmirror.mirror")

HOLD_FILE = "guard-paused.json"
SUPERSEDED_FILE = "failback-superseded.json"


class UnreadableState(Exception):
    """A state file exists but cannot be read as a JSON object."""


def read_json(path: Path) -> dict:
    """The JSON object in ``path`` ({} if there is no file); raises UnreadableState."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UnreadableState(f"cannot read {path} ({e})") from None
    if not isinstance(d, dict):
        raise UnreadableState(f"cannot read {path} (not a JSON object)")
    return d


def load_json(path: Path, *, hold_all: bool = True) -> dict:
    """``read_json``, for the agent: an unreadable file is logged and, with ``hold_all`` (the held
    volumes), holds every volume, better than applying a burst the operator paused; else {}."""
    try:
        return read_json(path)
    except UnreadableState as e:
        if not hold_all:
            log.error("%s: ignored", e)
            return {}
        log.error("%s: every volume stays paused until it is fixed or removed", e)
        return {"*": {"why": f"unreadable {path}"}}


def save_json(path: Path, d: dict) -> None:
    """Atomically, durably (a pause must survive a crash: after one, the burst is not seen again)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(d, f, sort_keys=True, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(str(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
