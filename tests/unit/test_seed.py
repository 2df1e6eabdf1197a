"""``volmirror seed`` and the agent lock: a seeded index is exactly what the source would have
written after publishing the tree (its start-up scan finds nothing to send, and each file's hashes
are the reader's), it is refused on an index in use or already filled, and one agent per state_dir."""

from __future__ import annotations

import os

import pytest

from daemon.blocks import block_hash, file_root
from daemon.config import SourceConfig, VolumeConfig
from daemon.source.scanner import plan, walk
from daemon.source.seed import SeedError, seed
from daemon.store.agent_lock import AgentLock, AgentRunning
from daemon.store.source_index import volume_index

BS = 16384


def make_tree(root):
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "big.bin").write_bytes(os.urandom(3 * BS + 100))
    (root / "a" / "small.txt").write_bytes(b"hello")
    (root / "empty").write_bytes(b"")
    (root / "zeros").write_bytes(bytes(2 * BS))
    os.symlink("a/small.txt", root / "link")
    (root / "x.swp").write_bytes(b"excluded")
    os.mkfifo(root / "fifo")


def test_a_seeded_index_leaves_the_start_up_scan_nothing_to_send(tmp_path):
    root = tmp_path / "vol"
    root.mkdir()
    make_tree(root)
    vol = VolumeConfig("v", root, BS, exclude=("*.swp",))
    sc = SourceConfig(state_dir=tmp_path / "state", volumes=(vol,))
    out = seed(sc, vol)
    assert (out["files"], out["bytes"], out["changed_while_read"]) == (4, 3 * BS + 100 + 5 + 2 * BS, 0), out
    idx = volume_index(sc.state_dir, "v")
    try:
        entries = {e.path: e for e in idx.iter_volume("v")}
    finally:
        idx.close()
    assert sorted(entries) == ["a", "a/b", "a/b/big.bin", "a/small.txt", "empty", "link", "zeros"]
    w = walk(str(root), vol.is_excluded)
    p = plan(w.disk, w.targets, entries)
    assert p.dirty == [] and p.renames == []
    data = (root / "a" / "b" / "big.bin").read_bytes()
    hashes = b"".join(block_hash(data[i : i + BS]) for i in range(0, len(data), BS))
    e = entries["a/b/big.bin"]
    assert (e.hashes, e.root) == (hashes, file_root(hashes, len(data)))
    assert entries["link"].target == "a/small.txt"
    # once filled, an index is never seeded again
    with pytest.raises(SeedError, match="already lists 7 entries"):
        seed(sc, vol)


def test_seed_refuses_while_the_source_agent_holds_its_state_dir(tmp_path):
    root = tmp_path / "vol"
    root.mkdir()
    vol = VolumeConfig("v", root, BS)
    sc = SourceConfig(state_dir=tmp_path / "state", volumes=(vol,))
    held = AgentLock(sc.state_dir, "source").acquire("source agent")
    try:
        with pytest.raises(AgentRunning, match="in use"):
            seed(sc, vol)
        with pytest.raises(AgentRunning, match=f"pid {os.getpid()}: source agent"):
            AgentLock(sc.state_dir, "source").acquire("a second source agent")
        AgentLock(sc.state_dir, "mirror").acquire("the mirror agent may share the directory").release()
    finally:
        held.release()
    AgentLock(sc.state_dir, "source").acquire("after the release").release()
