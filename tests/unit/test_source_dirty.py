"""Pure bookkeeping of the source: debounce, paths in doubt, the listing gate, unprotected paths."""

from daemon.source.coverage import Unprotected, replicable_name
from daemon.source.dirty import DirtySet, InDoubt, StartupGate, backoff, listing_blocked


def test_debounce_and_max_delay():
    d = DirtySet(debounce=0.05, max_delay=1.0)
    d.mark("a", 0.0, force=False)
    assert d.due(0.04) == [] and d.due(0.05) == ["a"]
    for t in range(1, 30):  # a path written continuously is still examined within max_delay
        d.mark("a", t * 0.04, force=False)
    assert d.due(1.0) == ["a"]


def test_explicit_delay_force_and_order():
    d = DirtySet(0.05, 1.0)
    d.mark("b", 0.0, force=True, delay=5.0)
    d.mark("a", 0.0, force=False, delay=0)
    d.mark("b", 1.0, force=False, delay=0)  # force sticks until examined
    assert d.due(1.0) == ["a", "b"] and d.pop("b").force
    assert d.next_due() == 0.0 and len(d) == 1


def test_marks_follow_a_rename():
    d = DirtySet(0.05, 1.0)
    for p in ("dir/x", "dir/y/z", "dirt", "other"):
        d.mark(p, 0.0, force=False)
    d.move("dir", "new")
    assert sorted(d) == ["dirt", "new/x", "new/y/z", "other"]


def test_in_doubt_and_listing_gate():
    gate, doubt = StartupGate(), InDoubt()
    assert "scan has not completed" in listing_blocked(gate, doubt)
    gate.scan_done(["a", "b"])
    assert "2 path(s)" in listing_blocked(gate, doubt)
    gate.examined(["a", "b"])
    assert listing_blocked(gate, doubt) is None
    gate.scan_done(["c"])  # only the start-up scan counts
    assert gate.open
    doubt.add("f", {1, 2})
    doubt.add("f", {3})
    assert doubt.blocks("f") == {1, 2, 3}
    assert "failed batch" in listing_blocked(gate, doubt)
    doubt.settle(["f"])
    assert listing_blocked(gate, doubt) is None


def test_backoff():
    assert [backoff(n) for n in (1, 2, 3, 6, 20)] == [1, 2, 4, 30, 30]


def test_unprotected_counts_each_path_once_and_scans_replace():
    u = Unprotected()
    assert u.add("x\udce9", "not_utf8") and not u.add("x\udce9", "not_utf8")
    assert u.scanned({"deep/tree": "name_too_long", "x\udce9": "not_utf8"}) == {"deep/tree"}
    assert len(u) == 2 and u.by_reason() == {"name_too_long": 1, "not_utf8": 1}
    u.scanned({})
    assert len(u) == 0
    assert replicable_name("é/ok") and not replicable_name("caf\udce9")


def test_live_changes_are_a_lane_of_their_own():
    d = DirtySet(debounce=0.05, max_delay=1.0)
    for i in range(100):
        d.mark(f"backlog/{i:03d}", 0.0, force=False, delay=0)  # scan results
    d.mark("live.txt", 0.0, force=True)  # a watcher event: debounced
    assert d.live_due(0.01) == []  # not due before its debounce
    assert d.live_due(0.06) == ["live.txt"]
    assert len(d.due(0.06)) == 101
    d.mark("backlog/000", 0.1, force=True)  # a watcher event on a backlog path makes it live
    assert d.live_due(0.2) == ["backlog/000", "live.txt"]
    d.move("backlog", "moved")
    assert d.live_due(0.2) == ["live.txt", "moved/000"]
    d.pop("live.txt")
    d.mark("moved/000", 0.3, force=True, delay=5)  # a retry with backoff is not live
    assert d.live_due(10) == []
