"""Turns (volume, op, fields) into sequenced, encoded records on the producer.

The one place where an event gets its sequence number, epoch and source timestamp, so the order of
``send`` calls is the order of sequence numbers is the order in the partition (key = volume,
idempotent producer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from .. import wire
from ..store.source_index import SeqAllocator

log = logging.getLogger("volmirror.source.publish")


class RecordSink(Protocol):
    async def send(self, topic: str, key: bytes, value: bytes) -> "asyncio.Future[Any]": ...


class Publisher:
    def __init__(self, sink: RecordSink, topic: str, seqs: SeqAllocator) -> None:
        self.sink = sink
        self.topic = topic
        self.seqs = seqs

    async def send(self, vol: str, op: str, fields: dict[str, Any], payload: bytes = b"", *, seq: bool = True) -> "asyncio.Future[Any]":
        """Send one event; ``seq=False`` (heartbeats, announcements) reuses the last number."""
        n = self.seqs.take(vol) if seq else self.seqs.last(vol)
        ev = wire.Event(op=op, vol=vol, seq=n, epoch=self.seqs.epoch, ts=time.time(), fields=fields, payload=payload)
        if op not in ("block", "heartbeat") and log.isEnabledFor(logging.DEBUG):
            log.debug("send %s %s%s seq %d", op, fields.get("path", ""), f" -> {fields['dst']}" if "dst" in fields else "", n,
                      extra={"volume": vol, "event": "send"})
        return await self.sink.send(self.topic, wire.key_for(vol), wire.encode(ev))
