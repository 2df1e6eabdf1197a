"""The reconcile walk survives what it cannot read, and the plan does not delete what it skipped."""

import os

from daemon.store.source_index import FILE, Entry
from daemon.source.scanner import plan, walk


def _deep(root, depth, name="d" * 200):
    """A directory chain deeper than PATH_MAX (built with relative mkdir: each step is short)."""
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("unreachable by path")
    finally:
        os.close(fd)


def test_walk_skips_and_reports_a_tree_deeper_than_path_max(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    _deep(str(tmp_path), 25)  # 25 * 201 bytes > 4096
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "b.txt").write_text("b")
    w = walk(str(tmp_path), lambda rel: False)
    assert "a.txt" in w.disk and "z/b.txt" in w.disk  # the rest of the volume is still scanned
    assert list(w.unprotected.values()) == ["name_too_long"]
    (bad,) = w.unprotected
    assert len(os.path.join(str(tmp_path), bad)) > 4000


def test_walk_reports_names_that_are_not_utf8(tmp_path):
    os.mkdir(os.path.join(os.fsencode(tmp_path), b"dir\xff"))
    open(os.path.join(os.fsencode(tmp_path), b"dir\xff", b"inside"), "w").close()
    open(os.path.join(os.fsencode(tmp_path), b"f\xe9"), "w").close()
    (tmp_path / "ok").write_text("x")
    w = walk(str(tmp_path), lambda rel: False)
    assert sorted(w.disk) == ["ok"]
    assert sorted(w.unprotected.values()) == ["not_utf8", "not_utf8"]  # the directory counts once


def test_walk_survives_an_unreadable_directory(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "x").write_text("x")
    (tmp_path / "open").mkdir()
    real = os.scandir

    def scandir(p):
        if str(p).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(p))
        return real(p)

    monkeypatch.setattr(os, "scandir", scandir)
    w = walk(str(tmp_path), lambda rel: False)
    assert w.unprotected == {"locked": "permission"} and "open" in w.disk


def test_plan_keeps_index_entries_below_unreadable_paths():
    idx = {p: Entry(p, FILE, 1, 1, i + 1, 0o644) for i, p in enumerate(["locked/x", "locked/y/z", "gone"])}
    p = plan({}, {}, idx, unreadable={"locked"})
    assert p.dirty == ["gone"]  # not readable is not deleted
