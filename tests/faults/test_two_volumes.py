"""Fault case 12: two busy volumes and a broker that fails between their commits.

A dedicated single-node broker (so the session broker other cases use is never touched) is SIGKILLed
twice for a few seconds while both volumes change: every in-flight batch of either volume fails or
is left unacknowledged, on the source and at the mirror's offset commit. Nothing may be lost in
either volume, and no repair may be needed: unacknowledged batches are re-sent, uncommitted offsets
re-read and deduplicated."""

from __future__ import annotations

import shutil
import time

import pytest

from ..harness import Broker
from .faultlib import VolumeSpec, log

pytestmark = [pytest.mark.kafka, pytest.mark.faults, pytest.mark.timeout(900)]

DOWN_SECONDS = 8


@pytest.fixture
def own_broker():
    log("starting a dedicated single-node broker")
    try:
        b = Broker(prefix="volmirror-faults-1node-")
    except RuntimeError as e:
        pytest.fail(f"cannot start a broker: {e}")
    try:
        yield b
    finally:
        b.stop()
        shutil.rmtree(b.data, ignore_errors=True)


def test_12_two_volumes_broker_failing_between_commits(fault_case, own_broker):
    c = fault_case("12_two_volumes_broker_failing", bootstrap=own_broker.bootstrap, volumes=("vol1", "vol2"),
                   spec=VolumeSpec(small_files=3000, big_mib=(1, 2, 4)), rate=40.0)
    c.start()
    c.start_workload()
    time.sleep(5)
    for i in range(2):
        c.fault_begin(f"the only broker SIGKILLed for {DOWN_SECONDS} s ({i + 1}/2), both volumes busy")
        own_broker.kill_node(1)
        time.sleep(DOWN_SECONDS)
        own_broker.start_node(1)
        c.fault_end()
        time.sleep(8)
    c.finish(settle=5)
