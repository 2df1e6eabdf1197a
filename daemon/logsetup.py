"""Logging to stderr: plain text for a terminal, one JSON object per line when asked.

Fixed structured keys travel in ``extra``: volume, path, offset, partition, event (plus op, seq,
reason where relevant). The JSON formatter emits them as top-level keys; the text formatter appends
them as ``key=value``. Secrets never reach a log line: config values are not logged, and any field
whose name looks like a password or key is masked.
"""

from __future__ import annotations

import json
import logging
import sys
import time

FIELDS = ("volume", "path", "offset", "partition", "event", "op", "seq", "reason", "kind", "dst", "topic", "group")
_SECRET_MARKERS = ("password", "secret", "token", "sasl_plain")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k in FIELDS:
            v = record.__dict__.get(k)
            if v is not None:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(_mask(out), ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        s = super().format(record)
        kv = [f"{k}={record.__dict__[k]}" for k in FIELDS if record.__dict__.get(k) is not None]
        return s + (" [" + " ".join(kv) + "]" if kv else "")


def _mask(d: dict) -> dict:
    return {k: ("***" if any(m in k.lower() for m in _SECRET_MARKERS) else v) for k, v in d.items()}


class _TransientKafkaNoise(logging.Filter):
    """aiokafka logs a coordinator that is still being elected (fresh cluster, broker restart) as
    ERROR although it retries by itself; that is a warning for the people reading our logs."""

    TRANSIENT = ("GroupCoordinatorNotAvailable", "NotCoordinatorForGroup", "CoordinatorLoadInProgress")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and any(t in record.getMessage() for t in self.TRANSIENT):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def setup(fmt: str = "auto", level: str = "info") -> None:
    """Configure the root logger once; ``fmt`` is auto|text|json (auto: text on a TTY or journald)."""
    if fmt == "auto":
        fmt = "text"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_TransientKafkaNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka is chatty at INFO about every (re)connection; keep its warnings.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("watchdog").setLevel(max(logging.WARNING, root.level))
