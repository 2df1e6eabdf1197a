"""Volume digest: pinned vectors (source and mirror must agree across versions), negative mtimes."""

import pytest

from daemon.digest import entry_key, listing_row, volume_digest
from daemon.store.source_index import Entry

ENTRIES = [
    Entry("b/file.txt", "f", 5, 1_700_000_000_123_456_789, 11, 0o644, None, b"", bytes(range(16))),
    Entry("a", "d", 0, 0, 12, 0o755),
    Entry("a/link", "l", 0, 0, 13, 0, "../b/file.txt"),
    Entry("empty", "f", 0, 0, 14, 0o600, None, b"", b"\xff" * 16),
]


def test_fixed_vector():
    # Computed once and pinned (identical to the digest before mtime_ns became signed): a change here
    # means sources and mirrors of different versions would disagree on every checkpoint.
    root, files, nbytes = volume_digest(ENTRIES)
    assert root.hex() == "e700376a4ef1cee7c78eb9b96d754d4a"
    assert (files, nbytes) == (2, 5)


def test_order_independent_and_deterministic():
    assert volume_digest(reversed(ENTRIES)) == volume_digest(ENTRIES) == volume_digest(list(ENTRIES))


@pytest.mark.parametrize(
    "mtime_ns,expected",
    [
        (-1_000_000_000, "df3f0089709bcf6198c7e0afcb13f9ee"),  # 1969-12-31T23:59:59Z
        (-(1 << 63), "b45c65292576d0c052871c2e3378d182"),  # the most negative st_mtime_ns
    ],
)
def test_negative_mtime(mtime_ns, expected):
    e = Entry("old.txt", "f", 3, mtime_ns, 1, 0o644, None, b"", b"\x01" * 16)
    root, files, nbytes = volume_digest([e])
    assert root.hex() == expected and (files, nbytes) == (1, 3)
    later = Entry("old.txt", "f", 3, mtime_ns + 1, 1, 0o644, None, b"", b"\x01" * 16)
    assert volume_digest([later])[0] != root
    assert entry_key(e)[3] == mtime_ns and listing_row(e)[4] == mtime_ns


def test_mtime_changes_digest():
    e = Entry("x", "f", 1, 0, 1, 0o644, None, b"", b"\0" * 16)
    assert volume_digest([e])[0] != volume_digest([Entry("x", "f", 1, 1, 1, 0o644, None, b"", b"\0" * 16)])[0]
