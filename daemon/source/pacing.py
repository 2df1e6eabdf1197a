"""Pure: should a backlog wait for the mirrors? (No I/O, no clock: callers pass ``now``.)

Every mirror site reports how far it has applied a volume's stream (a ``position`` record on the
control topic, see :mod:`daemon.source.control`). Records published while the fastest mirror is
far behind only queue in the partition, in front of any live change published after them. So,
while live changes are coming, a backlog (initial sync, rescan) waits while the fastest mirror
with a fresh report has more than :data:`PACE_SECONDS` of work queued, measured in bytes
(:class:`~daemon.source.publisher.Sent`) over the rate at which that mirror applies them. Nobody
writing, no report, or a stale one: nothing waits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

PACE_SECONDS = 0.5  # a backlog waits while the fastest mirror has more work queued than this ...
PACE_LIVE_WINDOW = 10.0  # ... and a live change came within this many seconds
PACE_STALE = 5.0  # a report older than this counts for nothing (the site is gone or idle)
PACE_MIN_RATE = 16 * 1024 * 1024  # bytes/s assumed of a mirror whose apply rate is not measured yet
RATE_WEIGHT = 0.3  # of a new measurement in the rate's moving average


class SentBytes(Protocol):
    def after(self, seq: int) -> int | None: ...


@dataclass(frozen=True, slots=True)
class MirrorReport:
    t: float  # when it arrived (monotonic)
    epoch: str
    seq: int  # applied up to here
    behind: int | None  # bytes published after seq when it arrived (None: unknown)
    rate: float | None  # bytes/s the site applies when busy (moving average; None: not measured yet)


def report(old: MirrorReport | None, now: float, epoch: str, seq: int, sent: SentBytes | None, our_epoch: str) -> MirrorReport:
    """A site's new report. Its apply rate is measured between two reports that both found it
    behind (so it was busy all along, and the rate is what it can do, not what it was given)."""
    behind = sent.after(seq) if sent is not None and epoch == our_epoch else None
    rate = old.rate if old is not None and old.epoch == epoch else None
    if old is not None and old.behind and behind and seq > old.seq and now > old.t and sent is not None:
        done = (sent.after(old.seq) or 0) - behind
        if done > 0:
            r = done / (now - old.t)
            rate = r if rate is None else (1 - RATE_WEIGHT) * rate + RATE_WEIGHT * r
    return MirrorReport(now, epoch, seq, behind, rate)


def fastest_behind(reports: list[MirrorReport], now: float, our_epoch: str, last_seq: int,
                   sent: SentBytes | None) -> dict[str, float] | None:
    """The fastest site with a fresh report of this epoch: records and bytes it has still to apply
    and the seconds that takes at its rate (None: no fresh report)."""
    fresh = [r for r in reports if now - r.t < PACE_STALE and r.epoch == our_epoch]
    if not fresh:
        return None
    best = max(fresh, key=lambda r: r.seq)
    nbytes = (sent.after(best.seq) if sent is not None else 0) or 0
    return {"records": last_seq - best.seq, "bytes": nbytes,
            "seconds": round(nbytes / max(best.rate or 0.0, PACE_MIN_RATE), 3), "rate_bytes_per_s": round(best.rate or 0.0)}


def hold(behind: dict[str, float] | None, now: float, last_live: float) -> bool:
    """True if a backlog should wait now."""
    if now - last_live > PACE_LIVE_WINDOW:
        return False  # nobody is writing: nothing to keep fast, the backlog goes at full speed
    return behind is not None and behind["seconds"] > PACE_SECONDS
