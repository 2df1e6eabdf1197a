"""Turns (volume, op, fields) into sequenced, encoded records on the producer.

The one place where an event gets its sequence number, epoch and source timestamp, so the order of
``send`` calls is the order of sequence numbers is the order in the partition (key = volume,
idempotent producer).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from typing import Any, Protocol

from .. import wire
from ..store.source_index import SeqAllocator

log = logging.getLogger("volmirror.source.publish")


class RecordSink(Protocol):
    async def send(self, topic: str, key: bytes, value: bytes) -> "asyncio.Future[Any]": ...


class Sent:
    """Bytes published per volume, by sequence number: how much lies between a mirror's position
    and the head of the stream (pacing). Only the span a mirror may still be behind is kept."""

    KEEP = 200_000  # (seq, cumulative bytes) pairs at most

    def __init__(self) -> None:
        self.total = 0
        self._seqs: list[int] = []
        self._cum: list[int] = []

    def add(self, seq: int, nbytes: int) -> None:
        self.total += nbytes
        self._seqs.append(seq)
        self._cum.append(self.total)
        if len(self._seqs) > 2 * self.KEEP:
            del self._seqs[: self.KEEP], self._cum[: self.KEEP]

    def after(self, seq: int) -> int | None:
        """Bytes published after ``seq`` (None if ``seq`` is older than what is kept)."""
        i = bisect.bisect_right(self._seqs, seq)
        if i == 0:
            return None if self._seqs and seq < self._seqs[0] - 1 else self.total
        return self.total - self._cum[i - 1]


class Publisher:
    def __init__(self, sink: RecordSink, topic: str, seqs: SeqAllocator) -> None:
        self.sink = sink
        self.topic = topic
        self.seqs = seqs
        self.sent: dict[str, Sent] = {}

    async def send(self, vol: str, op: str, fields: dict[str, Any], payload: bytes = b"", *, seq: bool = True) -> "asyncio.Future[Any]":
        """Send one event; ``seq=False`` (heartbeats, announcements) reuses the last number."""
        n = self.seqs.take(vol) if seq else self.seqs.last(vol)
        ev = wire.Event(op=op, vol=vol, seq=n, epoch=self.seqs.epoch, ts=time.time(), fields=fields, payload=payload)
        if op not in ("block", "heartbeat") and log.isEnabledFor(logging.DEBUG):
            log.debug("send %s %s%s seq %d", op, fields.get("path", ""), f" -> {fields['dst']}" if "dst" in fields else "", n,
                      extra={"volume": vol, "event": "send"})
        value = wire.encode(ev)
        fut = await self.sink.send(self.topic, wire.key_for(vol), value)
        if seq:
            self.sent.setdefault(vol, Sent()).add(n, len(value))
        return fut
