"""Initial-sync progress: the line people see on a terminal and in the journal."""

from daemon.source.progress import fmt_bytes, fmt_eta, line
from daemon.source.volume import Progress


def test_progress_line():
    p = {"files_done": 10, "files_total": 40, "bytes_done": 256 * 2**20, "bytes_total": 1024 * 2**20,
         "rate_bytes_per_s": 64 * 2**20, "eta_seconds": 12.0}
    assert line("perkara", p) == "perkara: 10/40 files, 256.0 MiB/1.0 GiB (25%), 64.0 MiB/s, ETA 00:12"


def test_formatting_helpers():
    assert fmt_bytes(512) == "512 B" and fmt_bytes(1536) == "1.5 KiB"
    assert fmt_eta(None) == "--:--" and fmt_eta(3725) == "1:02:05"


def test_progress_accumulates_across_scans():
    pr = Progress()
    pr.begin(2, 100)
    pr.bytes_done = 50
    pr.begin(1, 100)  # a later scan while still syncing adds to the totals
    snap = pr.snapshot()
    assert (snap["files_total"], snap["bytes_total"], snap["bytes_done"], snap["active"]) == (3, 200, 50, True)
