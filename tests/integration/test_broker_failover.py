"""Fault test: a 3-broker cluster on loopback, one broker SIGKILLed mid-stream: nothing is lost.

With acks=all, an idempotent producer, replication factor 3 and min.insync.replicas 2 (set by
deploy/kafka/kafka.sh for 3 nodes), losing one broker must neither lose nor duplicate a change: the
source retries until acknowledged, the mirror's group moves to a live coordinator and converges.
"""

from __future__ import annotations

import os
import time

import pytest

from ..harness import Broker, Setup, wait_converged, wait_for

pytestmark = pytest.mark.kafka


@pytest.fixture
def cluster():
    try:
        b = Broker(prefix="volmirror-3node-", nodes=3)
    except RuntimeError as e:
        pytest.fail(f"cannot start the 3-broker cluster: {e}")
    yield b
    b.stop()


def test_broker_killed_mid_stream_loses_nothing(tmp_path, cluster, topic):
    s = Setup(tmp_path, cluster.bootstrap, topic)
    v = s.src["vol1"]
    s.source.start()
    m = s.add_mirror().start()
    try:
        for i in range(40):
            (v / f"f{i:03d}.bin").write_bytes(os.urandom(150_000))
            if i == 15:
                wait_for(lambda: m.metric("volmirror_mirror_applied_events_total", volume="vol1", op="manifest") > 0, 30, "mirror applying")
                cluster.kill_node(2)  # SIGKILL: a crash, not a controlled shutdown
                killed_at = time.monotonic()
            time.sleep(0.05)
        (v / "f003.bin").write_bytes(b"rewritten after the crash")
        os.unlink(v / "f004.bin")
        took = wait_converged(v, s.mirror_path(), timeout=120, agents=[s.source, m])
        print(f"\nconverged {time.monotonic() - killed_at:.1f} s after a broker was SIGKILLed ({took:.1f} s after the last write)")
        assert sum(val for (n, _), val in m.metrics().items() if n == "volmirror_mirror_rejected_events_total") == 0
        # the survivors keep serving: the killed broker comes back and the stream goes on
        cluster.start_node(2)
        (v / "after-restart.txt").write_text("still flowing")
        wait_converged(v, s.mirror_path(), timeout=60, agents=[s.source, m])
    finally:
        s.stop_all()
