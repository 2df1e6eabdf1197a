"""The source's side of the control topic: requests from mirrors, validated, handed to workers.

Mirrors never connect to the source host; they write small JSON requests to ``<topic>.control``
(key = volume) and the source answers on the event stream, so every site sees the answer in order:

* ``{"type": "checkpoint", "vol": V, "nonce": N}`` — publish a checkpoint of V now (``verify``).
* ``{"type": "listing", "vol": V, "nonce": N}`` — publish V's index as listing events (after a
  checkpoint disagreed), so the mirror can name the paths that differ.
* ``{"type": "resync_file", "vol": V, "path": P, "hashes": H | null}`` — P drifted on a mirror; H
  is the mirror's block hashes (hex), so only blocks that differ are sent, then a manifest.
* ``{"type": "position", "vol": V, "epoch": E, "seq": S, "site": G}`` — how far site G has applied
  V's stream (sent every 0.5 s while it moves): the source paces a backlog to the fastest site, so
  live changes never queue behind minutes of initial sync in the partition (the priority lane).

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
    if typ not in ("checkpoint", "listing", "resync_file", "position") or not isinstance(vol, str):
        raise RejectedEvent("bad_schema", f"unknown control request {typ!r}")
    if typ == "position":
        epoch, seq, site = req.get("epoch"), req.get("seq"), req.get("site")
        if not isinstance(epoch, str) or not 1 <= len(epoch) <= 64 or isinstance(seq, bool) or not isinstance(seq, int) or seq < 0 \
                or not isinstance(site, str) or not 1 <= len(site) <= 256:
            raise RejectedEvent("bad_schema", "position needs epoch, seq >= 0 and site")
    elif typ in ("checkpoint", "listing"):
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
    if req["type"] == "position":
        w.mirror_position(req["site"], req["epoch"], req["seq"])
        return True  # twice a second per site: not logged
    if req["type"] == "resync_file":
        w.resync(req["path"], req.get("hashes"))
    else:
        w.request(req["type"], req.get("nonce"))
    log.info("control request %s for %s from site %s", req["type"], req.get("path") or req["vol"], req.get("site"),
             extra={"volume": req["vol"], "path": req.get("path"), "event": "control"})
    return True
