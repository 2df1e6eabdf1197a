"""Fixtures of the fault suite (``make test-faults``; not part of ``make test``).

The suite is long (every case builds a 3,000-file volume, runs a workload through a fault and waits
for convergence), so it is only collected when asked for: ``pytest tests/faults`` (any argument
naming ``tests/faults`` or a file in it) or ``VOLMIRROR_FAULTS=1``. A plain ``pytest tests`` leaves it
out.

Single-broker cases use the session broker of tests/conftest.py; the cluster cases share a 3-node
cluster per module (:func:`cluster3`); every case writes its entry into build/fault-report.json.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..harness import Broker
from .faultlib import FaultCase, log

HERE = Path(__file__).resolve().parent


def _asked_for(config: pytest.Config) -> bool:
    if os.environ.get("VOLMIRROR_FAULTS") == "1":
        return True
    for a in config.args:
        p = Path(str(a).split("::", 1)[0])
        try:
            p = p.resolve()
        except OSError:
            continue
        if p == HERE or HERE in p.parents:
            return True
    return False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: long fault-injection case (make test-faults)")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name.startswith("test_") and not _asked_for(config):
        return True
    return None


@pytest.fixture(scope="session", autouse=True)
def _must_be_root():
    if os.geteuid() != 0:
        pytest.fail("the fault suite mounts tmpfs file systems and uses chattr: run it as root")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.fault_call_report = rep  # type: ignore[attr-defined]


@pytest.fixture
def fault_case(request: pytest.FixtureRequest, tmp_path: Path, kafka_bootstrap: str, topic: str):
    """Factory: ``fault_case(name, **options)`` → a :class:`FaultCase` on the session broker, closed at teardown."""
    made: list[FaultCase] = []

    def make(name: str, *, bootstrap: str | None = None, **kw) -> FaultCase:
        c = FaultCase(name=name, tmp=tmp_path, bootstrap=bootstrap or kafka_bootstrap, topic=topic, **kw)
        made.append(c)
        return c

    yield make
    rep = getattr(request.node, "fault_call_report", None)
    error = None
    if rep is not None and rep.failed:
        error = str(rep.longrepr)[-3000:]
    for c in made:
        c.close(error)


@pytest.fixture(scope="module")
def cluster3():
    """A 3-node KRaft cluster on loopback (replication factor 3, min.insync.replicas 2), once per module."""
    log("starting a 3-node Kafka cluster")
    try:
        b = Broker(prefix="volmirror-faults-3node-", nodes=3)
    except RuntimeError as e:
        pytest.fail(f"cannot start the 3-broker cluster: {e}")
    try:
        yield b
    finally:
        b.stop()
        import shutil

        shutil.rmtree(b.data, ignore_errors=True)
