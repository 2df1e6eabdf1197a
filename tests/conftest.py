"""Session fixtures: one real Kafka broker for the whole test run.

If ``VOLMIRROR_TEST_BOOTSTRAP`` is set (``make test`` sets it after starting the broker with
deploy/kafka/kafka.sh), tests use that broker. Otherwise the first test that needs Kafka starts one
with the same script on free loopback ports and stops it at the end of the session. If no broker can
be had, those tests FAIL: a suite that skips its Kafka tests is broken, not green.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from .harness import REPO, free_port

KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"


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
    data = tempfile.mkdtemp(prefix="volmirror-test-kafka-")
    port, cport = free_port(), free_port()
    r = subprocess.run(["bash", str(KAFKA_SH), "start", "--data", data, "--port", str(port), "--controller-port", str(cport)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"could not start the test Kafka broker (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", str(KAFKA_SH), "stop", "--data", data], capture_output=True)


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
