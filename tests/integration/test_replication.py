"""End to end on the real broker: source agent → Kafka → mirror agent(s). None of these skip."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from daemon import wire
from daemon.blocks import block_hash
from daemon.config import KafkaConfig
from daemon.kafka import send_raw

from ..harness import tree, wait_for, wait_converged

pytestmark = pytest.mark.kafka
MiB = 1024 * 1024


def test_every_operation_converges(setup_factory):
    s = setup_factory()
    v = s.src["vol1"]
    (v / "existing.txt").write_text("present before the agent started\n")
    s.source.start()
    m = s.add_mirror().start()
    agents = [s.source, m]
    wait_converged(v, s.mirror_path(), agents=agents)
    # the mirror reports its applied position on the control topic; the source sees it (pacing)
    pos = wait_for(lambda: s.source.status()["volumes"]["vol1"].get("fastest_mirror_behind"), timeout=15,
                   what="the mirror's position report at the source")
    assert pos["records"] >= 0 and pos["bytes"] >= 0

    # create / modify / extend / truncate
    (v / "new.bin").write_bytes(os.urandom(300_000))
    (v / "existing.txt").write_text("modified\n")
    wait_converged(v, s.mirror_path(), agents=agents)
    with open(v / "new.bin", "ab") as f:
        f.write(os.urandom(200_000))
    os.truncate(v / "existing.txt", 3)
    wait_converged(v, s.mirror_path(), agents=agents)
    os.truncate(v / "new.bin", 1000)
    (v / "empty").write_bytes(b"")
    (v / "sparse").write_bytes(b"")
    os.truncate(v / "sparse", 5 * 131072)  # all-zero blocks
    wait_converged(v, s.mirror_path(), agents=agents)

    # directories: mkdir (empty and nested), rename a directory, delete a tree
    (v / "d1" / "d2" / "d3").mkdir(parents=True)
    (v / "d1" / "d2" / "f").write_text("deep")
    (v / "emptydir").mkdir()
    wait_converged(v, s.mirror_path(), agents=agents)
    os.rename(v / "d1", v / "moved")
    wait_converged(v, s.mirror_path(), agents=agents)
    import shutil

    shutil.rmtree(v / "moved")
    wait_converged(v, s.mirror_path(), agents=agents)

    # rename / move of files, symlinks, mode bits, mtime, delete
    os.makedirs(v / "sub")
    os.rename(v / "new.bin", v / "sub" / "renamed.bin")
    os.symlink("sub/renamed.bin", v / "link")
    os.symlink("/absolute/target/that/does/not/exist", v / "dangling")
    os.chmod(v / "existing.txt", 0o600)
    os.chmod(v / "sub", 0o750)
    os.utime(v / "empty", ns=(1_500_000_000_000_000_000, 1_500_000_000_123_456_789))
    wait_converged(v, s.mirror_path(), agents=agents)
    os.unlink(v / "link")
    os.symlink("existing.txt", v / "link")  # retarget
    os.unlink(v / "sparse")
    wait_converged(v, s.mirror_path(), agents=agents)
    assert os.readlink(s.mirror_path() / "dangling") == "/absolute/target/that/does/not/exist"
    assert os.stat(s.mirror_path() / "empty").st_mtime_ns == 1_500_000_000_123_456_789
    assert m.metric("volmirror_mirror_rejected_events_total", volume="vol1", reason="malformed") == 0


def test_scattered_writes_publish_only_changed_blocks(setup_factory, record_property):
    s = setup_factory()
    v = s.src["vol1"]
    big = v / "big.img"
    with open(big, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(MiB))
    s.source.start()
    m = s.add_mirror().start()
    wait_converged(v, s.mirror_path(), timeout=120, agents=[s.source, m])
    wait_for(lambda: s.source.status()["volumes"]["vol1"]["pending_files"] == 0, 30, "source idle")
    changed0 = s.source.metric("volmirror_source_blocks_total", volume="vol1", result="changed")
    bytes0 = s.source.metric("volmirror_source_published_bytes_total", volume="vol1")
    assert changed0 == 512  # 64 MiB / 128 KiB

    # 10 scattered 4 KiB writes, each in a different 128 KiB block
    offsets = [i * 6 * MiB + 12345 for i in range(10)]
    t0 = time.monotonic()
    with open(big, "r+b") as f:
        for off in offsets:
            f.seek(off)
            f.write(os.urandom(4096))
    took = wait_converged(v, s.mirror_path(), timeout=60, agents=[s.source, m])
    record_property("edit_64mib_to_mirror_seconds", round(took, 3))
    print(f"\n64 MiB file, 10 scattered 4 KiB writes → mirror converged in {took:.3f} s (from end of writes)")
    wait_for(lambda: s.source.metric("volmirror_source_blocks_total", volume="vol1", result="changed") >= changed0 + 10, 10, "block metrics")
    time.sleep(0.5)
    assert s.source.metric("volmirror_source_blocks_total", volume="vol1", result="changed") - changed0 == 10
    assert s.source.metric("volmirror_source_published_bytes_total", volume="vol1") - bytes0 == 10 * 131072
    assert time.monotonic() - t0 < 60


def test_rename_publishes_no_block_data(setup_factory):
    s = setup_factory()
    v = s.src["vol1"]
    (v / "dir").mkdir()
    (v / "dir" / "a.bin").write_bytes(os.urandom(3 * MiB))
    (v / "b.bin").write_bytes(os.urandom(2 * MiB))
    s.source.start()
    m = s.add_mirror().start()
    wait_converged(v, s.mirror_path(), agents=[s.source, m])
    wait_for(lambda: s.source.status()["volumes"]["vol1"]["pending_files"] == 0, 30, "source idle")
    b0 = s.source.metric("volmirror_source_published_bytes_total", volume="vol1")
    c0 = s.source.metric("volmirror_source_blocks_total", volume="vol1", result="changed")
    r0 = m.metric("volmirror_mirror_applied_events_total", volume="vol1", op="rename")
    os.rename(v / "b.bin", v / "c.bin")
    os.rename(v / "dir", v / "dir2")
    wait_converged(v, s.mirror_path(), agents=[s.source, m])
    wait_for(lambda: m.metric("volmirror_mirror_applied_events_total", volume="vol1", op="rename") >= r0 + 2, 10, "renames applied")
    time.sleep(1.0)
    assert s.source.metric("volmirror_source_published_bytes_total", volume="vol1") == b0
    assert s.source.metric("volmirror_source_blocks_total", volume="vol1", result="changed") == c0


def test_source_restart_catches_up_offline_changes(setup_factory):
    s = setup_factory()
    v = s.src["vol1"]
    for i in range(20):
        (v / f"f{i}.txt").write_text(f"file {i}\n" * 100)
    (v / "keepdir").mkdir()
    (v / "rmdir").mkdir()
    (v / "rmdir" / "x").write_text("x")
    s.source.start()
    m = s.add_mirror().start()
    wait_converged(v, s.mirror_path(), agents=[s.source, m])
    assert s.source.stop() == 0
    # while the source is down: change, delete, create, rename, remove a tree
    (v / "f0.txt").write_text("changed offline\n")
    os.unlink(v / "f1.txt")
    (v / "f2.txt").write_bytes(b"")
    (v / "brand-new.txt").write_text("new\n")
    os.rename(v / "f3.txt", v / "keepdir" / "f3-moved.txt")
    import shutil

    shutil.rmtree(v / "rmdir")
    s.source.start()
    wait_converged(v, s.mirror_path(), agents=[s.source, m])


def test_mirror_sigkill_mid_stream_converges(setup_factory):
    s = setup_factory()
    v = s.src["vol1"]
    s.source.start()
    m = s.add_mirror().start()
    # a steady stream of changes, killing the mirror in the middle of it
    for i in range(40):
        (v / f"f{i:03d}.bin").write_bytes(os.urandom(200_000))
        if i == 15:
            wait_for(lambda: m.metric("volmirror_mirror_applied_events_total", volume="vol1", op="block") > 0, 30, "mirror applying")
            m.kill()
        time.sleep(0.02)
    for i in range(0, 40, 3):
        os.rename(v / f"f{i:03d}.bin", v / f"r{i:03d}.bin")
    m.start()
    wait_converged(v, s.mirror_path(), timeout=60, agents=[s.source, m])
    errors = [r for r in m.log_records() if r.get("level") == "error" and r.get("logger", "").startswith("volmirror")]
    assert errors == [], errors
    assert sum(v for (n, _), v in m.metrics().items() if n == "volmirror_mirror_rejected_events_total") == 0


def test_two_sites_converge_from_one_source(setup_factory):
    s = setup_factory()
    v = s.src["vol1"]
    (v / "a").write_bytes(os.urandom(500_000))
    s.source.start()
    m1 = s.add_mirror(group="drc-site-1").start()
    m2 = s.add_mirror(group="drc-site-2").start()
    (v / "b").write_text("after both started")
    os.makedirs(v / "x" / "y")
    wait_converged(v, s.mirror_path(i=0), agents=[s.source, m1])
    wait_converged(v, s.mirror_path(i=1), agents=[s.source, m2])


def test_hostile_records_are_rejected_and_counted(setup_factory, tmp_path, kafka_bootstrap, topic):
    s = setup_factory()
    s.source.start()
    m = s.add_mirror().start()
    (s.src["vol1"] / "good-before").write_text("ok")
    wait_converged(s.src["vol1"], s.mirror_path(), agents=[s.source, m])
    outside = tmp_path / "outside"
    outside.mkdir()
    before_outside = tree(tmp_path / "outside")

    def ev(op, seq, payload=b"", **f):
        return wire.encode(wire.Event(op=op, vol="vol1", seq=seq, epoch="attacker", ts=time.time(), fields=f, payload=payload))

    def raw(header: bytes) -> bytes:
        import struct

        return struct.pack(">2sBI", b"VM", 1, len(header)) + header

    data = b"pwned"
    h = block_hash(data).hex()
    hostile = [
        raw(b'{"v":1,"op":"delete","vol":"vol1","seq":1,"epoch":"x","ts":1,"path":"/etc/passwd"}'),
        raw(b'{"v":1,"op":"block","vol":"vol1","seq":2,"epoch":"x","ts":1,"path":"../../escape","off":0,"len":5,"hash":"' + h.encode() + b'","size":5,"zero":false,"bs":131072}') + data,
        ev("symlink", 3, path="esc", target=str(outside)),
        ev("block", 4, data, path="esc/owned.txt", off=0, len=5, hash=h, size=5, zero=False, bs=131072),
        ev("block", 5, b"PWNED", path="wrong-hash", off=0, len=5, hash=h, size=5, zero=False, bs=131072),
        b"\x00\x01garbage that is no event at all",
        b"",
    ]
    kc = KafkaConfig(bootstrap_servers=(kafka_bootstrap,), topic=topic)
    r0 = {r: m.metric("volmirror_mirror_rejected_events_total", volume="vol1", reason=r) for r in ("unsafe_path", "symlink_escape", "hash_mismatch", "malformed")}
    asyncio.run(send_raw(kc, topic, [(b"vol1", v) for v in hostile]))
    # the next good event (from the real source) is still applied
    (s.src["vol1"] / "good-after").write_text("still replicating")
    wait_for(lambda: (s.mirror_path() / "good-after").exists(), 30, "good event after hostile ones")

    def counted():
        got = {r: m.metric("volmirror_mirror_rejected_events_total", volume="vol1", reason=r) - r0[r] for r in r0}
        return got if got == {"unsafe_path": 2, "symlink_escape": 1, "hash_mismatch": 1, "malformed": 0} else None

    # garbage/empty records have no volume in them → counted under the key's volume
    wait_for(lambda: counted() or m.metric("volmirror_mirror_rejected_events_total", volume="vol1", reason="malformed") - r0["malformed"] == 2 and
             m.metric("volmirror_mirror_rejected_events_total", volume="vol1", reason="hash_mismatch") - r0["hash_mismatch"] == 1, 20, "rejections counted")
    assert m.metric("volmirror_mirror_rejected_events_total", volume="vol1", reason="unsafe_path") - r0["unsafe_path"] == 2
    assert m.metric("volmirror_mirror_rejected_events_total", volume="vol1", reason="symlink_escape") - r0["symlink_escape"] == 1
    assert m.metric("volmirror_mirror_rejected_events_total", volume="vol1", reason="hash_mismatch") - r0["hash_mismatch"] == 1
    assert m.metric("volmirror_mirror_rejected_events_total", volume="vol1", reason="malformed") - r0["malformed"] == 2
    assert tree(tmp_path / "outside") == before_outside
    assert not (tmp_path / "escape").exists() and not (s.mirror_roots[0] / "escape").exists()
    assert not (s.mirror_path() / "wrong-hash").exists()
    assert os.path.exists("/etc/passwd")
    assert m.proc.poll() is None  # never a crash


def test_topic_that_cannot_be_created_stops_with_a_clear_message(setup_factory):
    s = setup_factory()
    text = s.source_config.read_text().replace("partitions = 3", "partitions = 3\nreplication_factor = 3")
    s.source_config.write_text(text)
    s.source.start(wait_ready=False)
    rc = s.source.proc.wait(60)
    assert rc == 1
    msg = s.source.log_path.read_text()
    assert "cannot create topic" in msg and "replication_factor=3" in msg and "1 broker" in msg


def test_source_sigkill_mid_stream_loses_nothing(setup_factory):
    s = setup_factory()
    v = s.src["vol1"]
    s.source.start()
    m = s.add_mirror().start()
    for i in range(30):
        (v / f"f{i:03d}.bin").write_bytes(os.urandom(300_000))
        if i == 12:
            wait_for(lambda: s.source.metric("volmirror_source_published_bytes_total", volume="vol1") > 0, 30, "source publishing")
            s.source.kill()  # crash between reads, sends and index commits
    with open(v / "f000.bin", "r+b") as f:  # and a change while it is down
        f.write(b"edited while the source was dead")
    s.source.start()
    wait_converged(v, s.mirror_path(), timeout=60, agents=[s.source, m])


def test_batches_fit_a_topic_created_with_a_smaller_record_limit(setup_factory, kafka_bootstrap, topic):
    """The source sizes its producer batches to the smallest max.message.bytes of its topics: on a
    topic an operator created with 1.2 MiB (the least volmirror accepts is 1 MiB + 64 KiB), several
    1 MiB blocks must not be packed into one batch the broker refuses."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    async def create() -> None:
        adm = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await adm.start()
        try:
            await adm.create_topics([NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": str(1200 * 1024)})])
        finally:
            await adm.close()

    asyncio.run(create())
    s = setup_factory()
    v = s.src["vol1"]
    (v / "big.bin").write_bytes(os.urandom(24 * MiB))  # incompressible: batches are as large as their records
    s.source.start()
    m = s.add_mirror().start()
    wait_converged(v, s.mirror_path(), timeout=90, agents=[s.source, m])
    assert "MessageSizeTooLarge" not in s.source.log_tail(200)


def test_a_failed_apply_skips_nothing_fetched_ahead_for_another_partition(setup_factory, tmp_path):
    """The mirror fetches the next records while it applies. Every apply of volume alpha fails (as
    on a full disk) while volume beta, on another partition, keeps going: each failure drops what
    was fetched ahead, and beta's records in it must be read again, not skipped (the failure only
    rewinds alpha's partition). A skip would leave beta short until a checkpoint disagreed and a
    repair refilled it: both are counted, and must stay at zero."""
    from aiokafka.partitioner import DefaultPartitioner

    part = DefaultPartitioner()
    assert part(b"alpha", [0, 1, 2], [0, 1, 2]) != part(b"beta", [0, 1, 2], [0, 1, 2])  # two partitions of the 3
    s = setup_factory(volumes=("alpha", "beta"))
    stall = tmp_path / "stall"
    stall.touch()
    m = s.add_mirror()
    m.seams = ["--stall-file", str(stall), "--stall-volume", "alpha"]
    m.start()
    s.source.start()
    a, b = s.src["alpha"], s.src["beta"]
    for i in range(2000):
        (a / f"f{i:04d}").write_bytes(os.urandom(1500))
        (b / f"f{i:04d}").write_bytes(os.urandom(1500))
    wait_converged(b, s.mirror_path("beta"), timeout=90, agents=[s.source, m])  # while alpha fails
    assert m.metric("volmirror_mirror_apply_errors_total", volume="alpha") >= 2
    assert not s.mirror_path("alpha").exists() or len(list(s.mirror_path("alpha").iterdir())) < 2000
    stall.unlink()
    wait_converged(a, s.mirror_path("alpha"), timeout=90, agents=[s.source, m])
    wait_converged(b, s.mirror_path("beta"), timeout=30, agents=[s.source, m])
    counted = m.metrics()
    repairs = sum(v for (n, _), v in counted.items() if n == "volmirror_repair_requests_total")
    mismatches = sum(v for (n, lb), v in counted.items() if n == "volmirror_checkpoints_total" and ("result", "mismatch") in lb)
    assert repairs == 0 and mismatches == 0, f"{repairs} repair request(s), {mismatches} checkpoint mismatch(es)"


def test_a_failed_durability_point_after_a_failed_apply_skips_nothing_of_a_new_partition(setup_factory, tmp_path):
    """Both volumes are published before the mirror starts, so its first fetch after joining holds
    both partitions. Every apply of alpha fails, and so does every durability point after it (a
    failed fsync): the loop goes back to the last durable point, and alpha's partition, read for
    the first time, must go back too, not only the partitions already known. A skip would leave
    alpha short until a checkpoint disagreed and a repair refilled it: both are counted."""
    from aiokafka.partitioner import DefaultPartitioner

    part = DefaultPartitioner()
    assert part(b"alpha", [0, 1, 2], [0, 1, 2]) != part(b"beta", [0, 1, 2], [0, 1, 2])
    s = setup_factory(volumes=("alpha", "beta"))
    s.source.start()
    a, b = s.src["alpha"], s.src["beta"]
    for i in range(2000):
        (a / f"f{i:04d}").write_bytes(os.urandom(1500))
        (b / f"f{i:04d}").write_bytes(os.urandom(1500))
    for v in ("alpha", "beta"):
        wait_for(lambda v=v: s.source.status()["volumes"][v]["pending_files"] == 0, 60, f"source idle ({v})")
    stall, nosync = tmp_path / "stall", tmp_path / "nosync"
    stall.touch()
    nosync.touch()
    m = s.add_mirror()
    m.seams = ["--stall-file", str(stall), "--stall-volume", "alpha", "--fail-sync-file", str(nosync)]
    m.start()
    wait_for(lambda: m.metric("volmirror_mirror_apply_errors_total", volume="alpha") >= 2, 60, "alpha's applies failing")
    wait_for(lambda: m.metric("volmirror_mirror_local_errors_total", kind="disk") >= 2, 60, "durability points failing")
    nosync.unlink()
    wait_converged(b, s.mirror_path("beta"), timeout=90, agents=[s.source, m])
    stall.unlink()
    wait_converged(a, s.mirror_path("alpha"), timeout=90, agents=[s.source, m])
    counted = m.metrics()
    repairs = sum(v for (n, _), v in counted.items() if n == "volmirror_repair_requests_total")
    mismatches = sum(v for (n, lb), v in counted.items() if n == "volmirror_checkpoints_total" and ("result", "mismatch") in lb)
    assert repairs == 0 and mismatches == 0, f"{repairs} repair request(s), {mismatches} checkpoint mismatch(es)"
