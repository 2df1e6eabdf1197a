"""Session fixtures: one real Kafka broker for the whole test run.

If ``VOLMIRROR_TEST_BOOTSTRAP`` is set (``make test`` sets it after starting the broker with
deploy/kafka/kafka.sh), tests use that broker. Otherwise the first test that needs Kafka starts one
with the same script on free loopback ports and stops it at the end of the session. If no broker can
be had, those tests FAIL: a suite that skips its Kafka tests is broken, not green.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from .harness import Broker


def _reachable(bootstrap: str) -> bool:
    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    env = os.environ.get("VOLMIRROR_TEST_BOOTSTRAP")
    if env:
        if not _reachable(env):
            pytest.fail(f"VOLMIRROR_TEST_BOOTSTRAP={env} is set but no Kafka broker answers there")
        yield env
        return
    try:
        broker = Broker()
    except RuntimeError as e:
        pytest.fail(f"the test Kafka broker is required: {e}")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def topic() -> str:
    """A fresh topic per test, so tests never see each other's events."""
    return f"vmtest.{uuid.uuid4().hex[:10]}"


@pytest.fixture
def setup_factory(tmp_path: Path, kafka_bootstrap: str, topic: str):
    from .harness import Setup

    made: list[Setup] = []

    def make(**kw) -> Setup:
        s = Setup(tmp_path, kafka_bootstrap, topic, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop_all()
