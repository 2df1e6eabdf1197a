"""Pacing decisions (pure): a mirror's rate, the fastest mirror's queued work, when a backlog holds."""

from __future__ import annotations

from daemon.source.pacing import PACE_LIVE_WINDOW, PACE_MIN_RATE, PACE_SECONDS, PACE_STALE, fastest_behind, hold, report
from daemon.source.publisher import Sent

MiB = 1024 * 1024


def sent_records(n: int, size: int) -> Sent:
    s = Sent()
    for seq in range(1, n + 1):
        s.add(seq, size)
    return s


def test_the_rate_is_measured_only_while_the_mirror_is_busy():
    s = sent_records(1000, MiB)  # seqs 1..1000, 1 MiB each
    r = report(None, 0.0, "e", 100, s, "e")
    assert r.behind == 900 * MiB and r.rate is None
    r = report(r, 1.0, "e", 150, s, "e")  # 50 MiB applied in 1 s, still behind: busy all along
    assert r.rate == 50 * MiB
    r = report(r, 2.0, "e", 250, s, "e")  # 100 MiB/s measured: moving average
    assert 50 * MiB < r.rate < 100 * MiB
    caught_up = report(r, 10.0, "e", 1000, s, "e")  # nothing left: idle part of the time, not measured
    assert caught_up.behind == 0 and caught_up.rate == r.rate
    other = report(r, 11.0, "other-epoch", 5, s, "e")  # a report of another epoch: unknown, rate forgotten
    assert other.behind is None and other.rate is None


def test_the_fastest_fresh_mirror_counts():
    s = sent_records(1000, MiB)
    slow = report(None, 0.0, "e", 10, s, "e")
    fast = report(report(None, 0.0, "e", 500, s, "e"), 1.0, "e", 600, s, "e")  # 100 MiB/s
    gone = report(None, -PACE_STALE - 1, "e", 999, s, "e")  # the furthest, but stale
    b = fastest_behind([slow, fast, gone], 1.0, "e", 1000, s)
    assert b["records"] == 400 and b["bytes"] == 400 * MiB and b["seconds"] == 4.0
    assert fastest_behind([gone], 1.0, "e", 1000, s) is None
    unmeasured = fastest_behind([slow], 1.0, "e", 1000, s)
    assert unmeasured["seconds"] == round(990 * MiB / PACE_MIN_RATE, 3)


def test_a_backlog_holds_only_while_live_changes_come_and_a_mirror_is_behind():
    far = {"records": 400, "bytes": 400 * MiB, "seconds": PACE_SECONDS + 1}
    near = {"records": 2, "bytes": MiB, "seconds": PACE_SECONDS / 2}
    assert hold(far, now=100.0, last_live=99.0)
    assert not hold(near, now=100.0, last_live=99.0)
    assert not hold(None, now=100.0, last_live=99.0)
    assert not hold(far, now=100.0, last_live=100.0 - PACE_LIVE_WINDOW - 1)
