"""Fault cases 3 and 4 on a 3-node cluster (replication factor 3, min.insync.replicas 2 — set by
deploy/kafka/kafka.sh for three nodes; the topic's replication factor is pinned to 3 in [kafka]):
a follower broker, then the volume partition's leader, SIGKILLed under load and restarted. With
acks=all and an idempotent producer neither may cost a change, a repair request or a listing."""

from __future__ import annotations

import time

import pytest

from .faultlib import log, mirror_partition, partition_leader

pytestmark = [pytest.mark.kafka, pytest.mark.faults, pytest.mark.timeout(900)]

RF3 = {"replication_factor": 3}
DOWN_SECONDS = 15


def _case(fault_case, cluster3, name):
    c = fault_case(name, bootstrap=cluster3.bootstrap, kafka_extra=RF3)
    c.start()
    c.start_workload()
    time.sleep(5)
    part = mirror_partition(c.mirror)
    leader = partition_leader(cluster3.bootstrap, c.topic, part)
    log(f"{name}: {c.topic}/{part} is led by node {leader}")
    c.extra_report["partition"] = part
    c.extra_report["leader_before"] = leader
    return c, part, leader


def test_03_one_of_three_brokers_killed(fault_case, cluster3):
    c, part, leader = _case(fault_case, cluster3, "03_one_of_three_brokers_killed")
    victim = next(n for n in (1, 2, 3) if n != leader)  # a follower of the volume's partition
    c.extra_report["killed_node"] = victim
    c.fault_begin(f"broker node {victim} (follower) SIGKILLed for {DOWN_SECONDS} s, then restarted")
    cluster3.kill_node(victim)
    time.sleep(DOWN_SECONDS)
    cluster3.start_node(victim)
    c.fault_end()
    c.finish(settle=10)


def test_04_partition_leader_killed(fault_case, cluster3):
    c, part, leader = _case(fault_case, cluster3, "04_partition_leader_killed")
    c.extra_report["killed_node"] = leader
    c.fault_begin(f"partition leader node {leader} SIGKILLed for {DOWN_SECONDS} s, then restarted")
    cluster3.kill_node(leader)
    time.sleep(DOWN_SECONDS)
    try:
        c.extra_report["leader_while_down"] = partition_leader(cluster3.bootstrap, c.topic, part)
    except AssertionError as e:
        c.notes.append(f"no leader while node {leader} was down: {e}")
    cluster3.start_node(leader)
    c.fault_end()
    c.finish(settle=10)
