"""The drift registry: which paths of which volume differ from the source right now, and why.

Owned by the apply actor (:mod:`daemon.mirror.consumer`), like the rest of the mirror's state. A
path enters when a check finds it different (kind ``content``, ``missing``, ``extra``,
``metadata``) and leaves only when a later check or a stream op proves it equal again. Nothing
here deletes or repairs anything: a drifted path keeps the volume "not protected" until then.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("volmirror.mirror.drift")

KINDS = ("content", "missing", "extra", "metadata")


class Drift:
    def __init__(self, metrics: Any) -> None:
        self.m = metrics
        self.paths: dict[str, dict[str, str]] = {}  # volume → path → kind
        self.recorder: dict[str, dict[str, str]] | None = None  # drift found while `verify` runs

    def found(self, vol: str, path: str, kind: str, detail: str) -> bool:
        """Record drift; True if it is new (or of a new kind) for this path."""
        if self.recorder is not None:
            self.recorder.setdefault(vol, {})[path] = kind
        d = self.paths.setdefault(vol, {})
        new = d.get(path) != kind
        d[path] = kind
        if new:
            self.m.drift_detected.labels(vol, kind).inc()
            log.warning("drift (%s) %s: %s", kind, path, detail, extra={"volume": vol, "path": path, "kind": kind, "event": "drift"})
        self.m.drift_files.labels(vol).set(len(d))
        return new

    def resolved(self, vol: str, path: str, *, tree: bool = False) -> list[str]:
        """Forget drift at ``path`` (and below it with ``tree``): a later op or check proved it equal."""
        d = self.paths.get(vol)
        if not d:
            return []
        pre = path + "/"
        gone = [p for p in d if p == path or (tree and p.startswith(pre))]
        for p in gone:
            del d[p]
            self.m.repairs.labels(vol).inc()
            log.info("drift resolved: %s", p, extra={"volume": vol, "path": p, "event": "repaired"})
        if gone:
            self.m.drift_files.labels(vol).set(len(d))
        return gone

    def kind(self, vol: str, path: str) -> str | None:
        return self.paths.get(vol, {}).get(path)

    def count(self, vol: str) -> int:
        return len(self.paths.get(vol, {}))

    def counts(self) -> dict[str, int]:
        return {v: len(d) for v, d in self.paths.items()}
