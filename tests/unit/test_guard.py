"""The mass-change guard's decision: bursts of rewrites, deletions or renames, and nothing else."""

import os

from daemon.mirror.guard import Guard, incompressible, looks_encrypted


def test_encrypted_rewrite_is_told_from_normal_edits():
    text = (b"the quick brown fox jumps over the lazy dog\n" * 200)[:4096]
    assert looks_encrypted(text, os.urandom(4096))
    assert not looks_encrypted(text, text.replace(b"fox", b"cat"))  # an edit
    assert not looks_encrypted(os.urandom(4096), os.urandom(4096))  # a jpeg replaced by another
    assert not looks_encrypted(b"", os.urandom(4096))  # a new file
    assert not incompressible(os.urandom(100))  # too short to say


def test_a_burst_of_rewrites_trips_at_the_threshold_and_expires():
    g = Guard(window=60, min_files=100, fraction=0.05)
    for i in range(99):
        g.rewrite("v", f"f{i}", now=1000.0 + i * 0.1)
    assert g.check("v", 1010.0, files_in_volume=2000) is None
    g.rewrite("v", "f0", now=1010.0)  # the same file again: counted once
    assert g.check("v", 1010.0, files_in_volume=2000) is None
    g.rewrite("v", "f99", now=1010.0)
    b = g.check("v", 1010.0, files_in_volume=2000)
    assert b is not None and b.kind == "rewrites" and b.count == 100 and b.threshold == 100
    assert "rewritten" in b.describe()
    assert g.check("v", 1080.0, files_in_volume=2000) is None  # out of the window
    assert g.check("other", 1010.0, files_in_volume=10) is None


def test_the_threshold_grows_with_the_volume():
    g = Guard(window=60, min_files=100, fraction=0.05)
    g.deleted("v", 150, now=0.0)
    assert g.check("v", 1.0, files_in_volume=10_000) is None  # 5 % of 10,000 = 500
    g.deleted("v", 400, now=2.0)
    assert g.check("v", 3.0, files_in_volume=10_000).kind == "deletes"


def test_renames_count_too():
    g = Guard(window=10, min_files=3, fraction=0.0)
    for t in range(3):
        g.renamed("v", now=float(t))
    assert g.check("v", 3.0, files_in_volume=0).kind == "renames"
