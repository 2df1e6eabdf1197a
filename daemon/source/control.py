"""The source's side of the control topic: requests from mirrors, validated, handed to workers.

Mirrors never connect to the source host; they write small JSON requests to ``<topic>.control``
(key = volume) and the source answers on the event stream, so every site sees the answer in order:

* ``{"type": "checkpoint", "vol": V, "nonce": N}`` — publish a checkpoint of V now (``verify``).
* ``{"type": "listing", "vol": V, "nonce": N}`` — publish V's index as listing events (after a
  checkpoint disagreed), so the mirror can name the paths that differ.
* ``{"type": "resync_file", "vol": V, "path": P, "hashes": H | null}`` — P drifted on a mirror; H
  is the mirror's block hashes (hex), so only blocks that differ are sent, then a manifest.

Anything malformed, or for a volume this source does not own, is counted and ignored.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from ..errors import RejectedEvent
from ..wire import check_relpath

log = logging.getLogger("volmirror.source.control")

MAX_HASHES_HEX = 2 * 16 * 8 * 1024 * 1024  # 8 Mi blocks: a 1 TiB file at 128 KiB


def parse_request(value: bytes | None) -> dict[str, Any]:
    """Validate one control record; raises RejectedEvent."""
    try:
        req = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError):
        raise RejectedEvent("malformed", "control record is not JSON") from None
    if not isinstance(req, dict):
        raise RejectedEvent("bad_schema", "control record is not an object")
    typ, vol = req.get("type"), req.get("vol")
    if typ not in ("checkpoint", "listing", "resync_file") or not isinstance(vol, str):
        raise RejectedEvent("bad_schema", f"unknown control request {typ!r}")
    if typ in ("checkpoint", "listing"):
        nonce = req.get("nonce")
        if typ == "listing" and not isinstance(nonce, str):
            raise RejectedEvent("bad_schema", "listing request needs a nonce")
        if nonce is not None and (not isinstance(nonce, str) or not 1 <= len(nonce) <= 64):
            raise RejectedEvent("bad_schema", "bad nonce")
    else:
        check_relpath(req.get("path"))
        h = req.get("hashes")
        if h is not None:
            if not isinstance(h, str) or len(h) % 32 or len(h) > MAX_HASHES_HEX:
                raise RejectedEvent("bad_schema", "hashes must be hex, 32 digits per block")
            try:
                req["hashes"] = bytes.fromhex(h)
            except ValueError:
                raise RejectedEvent("bad_schema", "hashes must be hex") from None
    return req


def dispatch(req: Mapping[str, Any], workers: Mapping[str, Any]) -> bool:
    """Hand a valid request to the volume's worker; False if this source does not own the volume."""
    w = workers.get(req["vol"])
    if w is None:
        return False
    if req["type"] == "resync_file":
        w.resync(req["path"], req.get("hashes"))
    else:
        w.request(req["type"], req.get("nonce"))
    log.info("control request %s for %s from site %s", req["type"], req.get("path") or req["vol"], req.get("site"),
             extra={"volume": req["vol"], "path": req.get("path"), "event": "control"})
    return True
