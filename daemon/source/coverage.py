"""Pure: the paths of a volume the source cannot replicate, and why.

A file name that is not valid UTF-8 cannot travel (the mirror's decoder rejects it), and a subtree
the reconcile scan cannot read (deeper than PATH_MAX, a symlink loop, permission denied) is not
watched over. Such content is *unprotected*: it is counted per volume
(``volmirror_source_unprotected_paths``, the status JSON, every ``announce`` event) so the mirror
sites and the operator know the volume is not fully covered. Each reconcile scan replaces what the
previous one found; paths reported by the watcher between scans are added until the next scan.
"""

from __future__ import annotations

from typing import Mapping

NOT_UTF8 = "not_utf8"


def replicable_name(path: str) -> bool:
    """False when the path (decoded with surrogate escapes) is not valid UTF-8."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: str) -> str:
    """The path for a log line: bytes that are not UTF-8 shown as \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class Unprotected:
    def __init__(self) -> None:
        self._scan: dict[str, str] = {}
        self._extra: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._scan.keys() | self._extra.keys())

    def __contains__(self, path: object) -> bool:
        return path in self._scan or path in self._extra

    def add(self, path: str, reason: str) -> bool:
        """Report one path between scans; True if it was not known yet (log it then)."""
        if path in self:
            return False
        self._extra[path] = reason
        return True

    def scanned(self, found: Mapping[str, str]) -> set[str]:
        """A scan's complete findings replace the previous ones; returns the newly found paths."""
        new = set(found) - self._scan.keys() - self._extra.keys()
        self._scan = dict(found)
        self._extra.clear()
        return new

    def by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in {**self._scan, **self._extra}.values():
            out[r] = out.get(r, 0) + 1
        return out
