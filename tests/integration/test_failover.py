"""Failover and failback on the real broker (docs/restore.md, the on-call procedure, step by step).

The source site is lost after writing a little the mirror never got. At the DR site the mirror agent
is stopped and the mirror's own tree rolled back in place to the latest restore point; the agent,
started again, holds the volume (refuses the stream) while users write into the DR copy. Failback
runs replication backwards with ``volmirror seed``: only what differs travels, the original site's
files that the DR copy still has never disappear while it runs, and what failback overwrote at the
original site stays restorable there. Then forward replication resumes. None of these skip."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from ..harness import Agent, free_port, wait_converged, wait_for, write_config
from .test_restore import FAST, assert_same_tree, newest_restorable, points, read_tree, restore, vm

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

SMALL = 3000  # files of 1-8 KiB in 60 directories
BIG = 4  # files of 8 MiB
MIB = 1024 * 1024


def write_volume(v: Path, rng: random.Random) -> None:
    for i in range(SMALL):
        p = v / f"d{i % 60:02d}" / f"f{i:04d}.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(rng.randbytes(rng.randint(1024, 8192)))
    (v / "big").mkdir()
    for j in range(BIG):
        (v / "big" / f"b{j}.img").write_bytes(rng.randbytes(8 * MIB))


def serve(dr: Path, rng: random.Random) -> int:
    """What users write into the DR copy during the failover; returns the bytes they wrote."""
    n = 0
    for j in range(BIG):  # one 4 KiB write inside each large file
        with open(dr / "big" / f"b{j}.img", "r+b") as f:
            f.seek(rng.randrange(0, 8 * MIB // 4096) * 4096)
            f.write(rng.randbytes(4096))
        n += 4096
    files = sorted(p for p in dr.rglob("f*.bin"))
    rng.shuffle(files)
    for p in files[:30]:  # rewritten
        data = rng.randbytes(rng.randint(1024, 8192))
        p.write_bytes(data)
        n += len(data)
    for p in files[30:40]:  # deleted
        p.unlink()
    (dr / "new").mkdir()
    for i in range(25):  # created
        data = rng.randbytes(rng.randint(1024, 8192))
        (dr / "new" / f"n{i:02d}.bin").write_bytes(data)
        n += len(data)
    return n


class Sampler:
    """While failback runs: every 0.2 s, 300 random paths that both sites had when it began and the
    DR copy still has must exist at the original site (failback must never remove them, even briefly)."""

    def __init__(self, dst: Path, paths: list[str]) -> None:
        self.dst, self.paths = dst, paths
        self.missing: list[tuple[float, str]] = []
        self.looks = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(1)
        while not self._stop.is_set():
            for rel in rng.sample(self.paths, min(300, len(self.paths))):
                if not os.path.lexists(self.dst / rel):
                    self.missing.append((time.time(), rel))
            self.looks += 1
            self._stop.wait(0.2)

    def __enter__(self) -> "Sampler":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def test_failover_in_place_then_failback_sends_only_what_differs(setup_factory, tmp_path, kafka_bootstrap, topic, record_property):
    rng = random.Random(20261124)
    s = setup_factory(source_extra=FAST)
    v, m = s.src["vol1"], s.add_mirror(guard="pause")
    dr = s.mirror_path()
    write_volume(v, rng)
    s.source.start()
    m.start()
    wait_converged(v, dr, timeout=240, agents=[s.source, m])
    replicated = read_tree(v)
    # the source started after the files were written: each point it makes is of this whole tree
    wait_for(lambda: (p := newest_restorable(points(m))) and p["state"] == "verified", 90, "a verified restore point of the replicated tree")

    # -- the disaster: a mass deletion at the source; the guard holds the mirror before the record
    # that crosses its threshold, the rest of the burst waits in the topic; then the source site is
    # lost, after writing a little more that was never replicated
    time.sleep(1.0)
    t_burst = time.time()
    victims = sorted(k for k in replicated if k.endswith(".bin") and k.startswith("d"))[:400]
    for rel in victims:
        (v / rel).unlink()
    wait_for(lambda: m.status()["volumes"]["vol1"]["guard_paused"], 60, "the guard to pause the mirror")
    wait_for(lambda: s.source.status()["volumes"]["vol1"]["pending_files"] == 0,
             30, "the source to publish the whole burst")
    time.sleep(1.0)
    s.source.kill()
    (v / "d00" / "late-1.txt").write_bytes(b"written at the source after its last replication\n")
    with open(v / "big" / "b0.img", "r+b") as f:
        f.write(b"L" * 4096)  # a late change to a block
    at_disaster = read_tree(v)
    deleted_bytes = sum(len(replicated[k]) for k in victims)

    # -- failover: in place, only on purpose and only with the agent stopped
    rc, rep, out = restore(m, dr, "--at", repr(t_burst))
    assert rc == 2 and "--in-place" in out, f"the mirror's own tree without --in-place must be refused: {out}"
    rc, rep, out = restore(m, dr, "--at", repr(t_burst), "--in-place")
    assert rc == 2 and "in use" in out, f"an in-place restore must refuse to run beside the mirror agent: {out}"
    m.stop()
    rc, rep, out = restore(m, dr, "--at", repr(t_burst), "--in-place")
    assert rc == 0, out
    assert rep["in_place"] is True and rep["unproven"] == [] and rep["verified"] is True, rep
    assert_same_tree(replicated, dr, "the DR copy rolled back in place to before the burst")
    m.start()  # it holds the volume: the failed-over copy is not a mirror until failback is done
    vol = m.status()["volumes"]["vol1"]
    assert not vol["protected"] and vol["guard_paused"] and any("held" in w for w in vol["why_not_protected"]), vol
    wait_for(lambda: m.metric("volmirror_mirror_guard_paused", volume="vol1") == 1, 30, "the held volume's gauge")
    assert m.metric("volmirror_volume_protected", volume="vol1") == 0
    r = m.cli("resume", "--volume", "vol1")
    assert r.returncode == 2 and "failback" in r.stderr, f"resume without --failback-done: exit {r.returncode}\n{r.stderr}"
    hist = tmp_path / "state-mirror0" / "history" / "vol1"
    journal = sorted((p.name, p.stat().st_size) for p in hist.glob("seg-*"))
    written = serve(dr, rng)
    served = read_tree(dr)
    time.sleep(3)  # the held agent writes nothing into it: not the rest of the burst waiting in the topic, no scrub or repair
    assert_same_tree(served, dr, "the DR copy while it is served")
    assert sorted((p.name, p.stat().st_size) for p in hist.glob("seg-*")) == journal, "the held volume was journalled"

    # -- failback: replication backwards, from a seeded index
    topic2 = f"{topic}.failback"
    rs_port, rm_port = free_port(), free_port()
    rsrc = Agent("source", write_config(tmp_path / "failback-source.toml", kafka_bootstrap, topic2, metrics_port=rs_port, source={
        "state_dir": str(tmp_path / "state-failback-source"), "volumes": [{"name": "vol1", "path": str(dr)}], "heartbeat_interval": 1.0,
        **FAST}), rs_port, tmp_path / "failback-source.log")
    rmir = Agent("mirror", write_config(tmp_path / "failback-mirror.toml", kafka_bootstrap, topic2, metrics_port=rm_port, mirror={
        "root": str(v.parent), "state_dir": str(tmp_path / "state-failback-mirror"), "group_id": f"failback-{topic}"}),
        rm_port, tmp_path / "failback-mirror.log")
    rc, rep, out = vm(rsrc, "seed", "--volume", "vol1", "--json")
    assert rc == 0 and rep is not None, out
    total_files = sum(isinstance(x, bytes) for x in served.values())
    total_bytes = sum(len(x) for x in served.values() if isinstance(x, bytes))
    assert (rep["files"], rep["bytes"], rep["changed_while_read"]) == (total_files, total_bytes, 0), rep
    rc, _, out = vm(rsrc, "seed", "--volume", "vol1")
    assert rc == 2 and "already lists" in out, out

    both = sorted(k for k, x in served.items() if isinstance(x, bytes) and isinstance(at_disaster.get(k), bytes))
    try:
        with Sampler(v, both) as sampler:
            rmir.start()
            rsrc.start()
            took = wait_converged(dr, v, timeout=240, agents=[rsrc, rmir])
        sent = rsrc.metric("volmirror_source_published_bytes_total", volume="vol1")
        repairs = sum(val for (name, labels), val in rmir.metrics().items() if name == "volmirror_repair_requests_total")
        record_property("failback", {"seconds": round(took, 1), "sent_bytes": sent, "written_bytes": written, "volume_bytes": total_bytes,
                                     "restored_bytes": deleted_bytes, "repair_requests": repairs, "samples": sampler.looks})
        print(f"\nfailback: {took:.1f} s; sent {sent / MIB:.2f} MiB of block data for {written / MIB:.2f} MiB written during the "
              f"failover and {deleted_bytes / MIB:.2f} MiB the burst deleted at the source; volume {total_bytes / MIB:.1f} MiB; "
              f"{repairs:.0f} repair requests; {sampler.looks} samples, {len(sampler.missing)} missing")
        assert sampler.looks >= 5 and not sampler.missing, f"files both sites had vanished from the original site: {sampler.missing[:10]}"
        # only what differs travels: whole 128 KiB blocks around each change, the files written during
        # the failover, the files the burst deleted at the source; nothing like the volume's 45 MiB
        assert 0 < sent <= written + deleted_bytes + (BIG + 1) * 128 * 1024, f"failback sent {sent} bytes"
        assert sent < total_bytes / 10
        assert 30 <= repairs <= 600, f"about one repair request per differing file expected, got {repairs}"

        # what failback overwrote at the original site stays restorable there (the point of its tree as found)
        pts = points(rmir)
        assert pts and pts[0]["source_id"] == 0 and pts[0]["state"] == "found", pts
        rc, rep, out = restore(rmir, tmp_path / "original-before-failback", "--point", str(pts[0]["id"]))
        assert rc == 0, out
        assert_same_tree(at_disaster, tmp_path / "original-before-failback", "the original site before failback, restored")
    finally:
        rsrc.stop()
        rmir.stop()

    # -- forward again: resume the DR mirror (what the source sent before failback, the rest of the
    # burst, is superseded and never applied), then the original source
    r = m.cli("resume", "--volume", "vol1", "--failback-done")
    assert r.returncode == 0, r.stderr
    keep = sorted(k for k, x in served.items() if isinstance(x, bytes))
    with Sampler(dr, keep) as sampler:
        s.source.start()
        (v / "after-failback.txt").write_bytes(b"replicated forward again\n")
        wait_converged(v, dr, timeout=120, agents=[s.source, m])
        wait_for(lambda: m.status()["volumes"]["vol1"]["protected"], 120, "the DR copy protected again")
    assert not sampler.missing, f"files the source has vanished from the DR copy after resume: {sampler.missing[:10]}"
    skipped = m.metric("volmirror_mirror_superseded_records_total", volume="vol1")
    print(f"forward again: {skipped:.0f} records of the burst skipped; {sampler.looks} samples, 0 missing")
    assert skipped > 0, "the rest of the burst was not in the topic: the test did not test skipping it"
