"""End to end with a real Prometheus (Debian package): dashboard queries return data, alerts fire.

One test, bounded in time, on loopback only: its own Kafka broker (so it can stop it), a source and a
mirror agent (repair off, RPO target 5 s, test-build stall switch), and a Prometheus server scraping
both every second with a copy of deploy/prometheus/volmirror-alerts.yml whose `for:` durations and
time thresholds are shortened. It checks that a healthy system fires nothing, that every panel query
of grafana/volmirror.json returns a series, then injects one fault after another and measures the
time from each fault to each alert firing (printed, and recorded as test properties).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from daemon.config import KafkaConfig
from daemon.kafka import send_raw

from ..harness import REPO, Broker, Setup, free_port, wait_converged, wait_for

pytestmark = pytest.mark.kafka

RULES = REPO / "deploy/prometheus/volmirror-alerts.yml"
DASHBOARD = REPO / "grafana/volmirror.json"
# the production thresholds, shortened so the test runs in about two minutes
FAST_EXPR = {
    "MirrorStalled": [("[5m]", "[5s]")],
    "VerificationStale": [("> 600", "> 8")],
    "SourceHeartbeatMissing": [("> 60", "> 4")],
    "RejectedEvents": [("[10m]", "[1m]")],
}


def fast_rules(dst: Path) -> None:
    doc = yaml.safe_load(RULES.read_text())
    for g in doc["groups"]:
        for r in g["rules"]:
            r["for"] = "2s"
            for old, new in FAST_EXPR.get(r["alert"], []):
                assert old in r["expr"], f"{r['alert']}: expected {old!r} in its expression (thresholds changed?)"
                r["expr"] = r["expr"].replace(old, new)
    dst.write_text(yaml.safe_dump(doc))


class Prom:
    def __init__(self, tmp: Path, targets: dict[str, int]) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            pytest.fail("prometheus is not installed: `make test` installs Debian's prometheus package")
        self.port = free_port()
        rules = tmp / "rules.yml"
        fast_rules(rules)
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]} for job, port in targets.items()],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(cfg))
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=self.log, stderr=self.log,
        )
        wait_for(lambda: self._get("/-/ready", raw=True), 60, "prometheus ready")

    def _get(self, path: str, raw: bool = False):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            body = r.read()
        return body if raw else json.loads(body)

    def query(self, expr: str) -> list:
        return self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))["data"]["result"]

    def firing(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for a in self._get("/api/v1/alerts")["data"]["alerts"]:
            if a["state"] == "firing":
                out.setdefault(a["labels"]["alertname"], []).append(a["labels"])
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def panel_queries(dash: dict) -> list[tuple[str, str]]:
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    return out


def substitute(expr: str, volume: str) -> str:
    expr = expr.replace("$__rate_interval", "30s").replace("${__rate_interval}", "30s")
    expr = expr.replace("$__interval", "5s").replace("${__interval}", "5s").replace("$__range", "5m")
    return re.sub(r"\$\{?volume(:\w+)?\}?", volume, expr)


@pytest.fixture
def kafka_own():
    try:
        broker = Broker(prefix="volmirror-e2e-kafka-")
    except RuntimeError as e:
        pytest.fail(f"cannot start Kafka for the e2e test: {e}")
    yield broker
    broker.stop()


def test_dashboard_and_alerts_against_real_prometheus(tmp_path, kafka_own, topic, record_property):
    bootstrap = kafka_own.bootstrap
    s = Setup(tmp_path, bootstrap, topic, source_extra={"checkpoint_interval": 2.0, "announce_interval": 1.0})
    v = s.src["vol1"]
    (v / "a.bin").write_bytes(os.urandom(600_000))
    (v / "doc.txt").write_text("case file\n" * 500)
    stall = tmp_path / "stall"
    s.source.start()
    m = s.add_mirror(repair=False, rpo_seconds=5.0)
    m.env["VOLMIRROR_TEST_STALL_FILE"] = str(stall)
    m.start()
    prom = None
    timings: dict[str, float] = {}
    try:
        wait_converged(v, s.mirror_path(), agents=[s.source, m])
        prom = Prom(tmp_path, {"volmirror-source": s.source_port, "volmirror-mirror": m.port})

        # healthy: protected, and nothing fires
        wait_for(lambda: prom.query('volmirror_volume_protected{volume="vol1"} == 1'), 60, "vol1 protected in Prometheus")
        (v / "more.txt").write_text("traffic so rates are non-zero")
        time.sleep(8)
        assert prom.firing() == {}, f"a healthy system must not fire alerts: {prom.firing()}"

        # every dashboard panel query returns at least one series
        dash = json.loads(DASHBOARD.read_text())
        empty = []
        queries = panel_queries(dash)
        assert len(queries) >= 10, f"dashboard has only {len(queries)} queries"
        for title, expr in queries:
            q = substitute(expr, "vol1")
            if not prom.query(q):
                empty.append(f"{title}: {q}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        def measure(fault_at: float, names: list[str], timeout: float = 60) -> None:
            for n in names:
                wait_for(lambda: n in prom.firing(), timeout, f"alert {n} firing", 0.25)
                timings.setdefault(n, round(time.monotonic() - fault_at, 1))

        # 1. hostile record written straight into the topic
        t = time.monotonic()
        asyncio.run(send_raw(KafkaConfig(bootstrap_servers=(bootstrap,), topic=topic), topic, [(b"vol1", b"not an event")]))
        measure(t, ["RejectedEvents"])

        # 2. corruption on the mirror with repair off
        p = s.mirror_path() / "a.bin"
        st = os.stat(p)
        with open(p, "r+b") as f:
            f.seek(1234)
            f.write(b"\x00\xff")
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        t = time.monotonic()
        measure(t, ["ReplicaDrift", "VolumeUnprotected"])

        # 3. mirror stopped: the lag alert keeps counting from the last applied event
        t = time.monotonic()
        m.stop()
        measure(t, ["AgentDown", "ReplicationLagHigh"])
        m.start()
        t = time.monotonic()
        wait_for(lambda: "ReplicationLagHigh" not in prom.firing(), 60, "ReplicationLagHigh resolved", 0.25)
        timings["ReplicationLagHigh resolved after restart"] = round(time.monotonic() - t, 1)

        # 4. mirror up but unable to apply (test build: every apply fails like a full disk)
        stall.touch()
        t = time.monotonic()
        (v / "pending.txt").write_text("waits in Kafka")
        measure(t, ["MirrorStalled"])
        stall.unlink()

        # 5. source agent stopped
        t = time.monotonic()
        s.source.stop()
        measure(t, ["SourceHeartbeatMissing", "VerificationStale"], timeout=90)

        # 6. Kafka gone
        t = time.monotonic()
        kafka_own.stop()
        measure(t, ["KafkaDisconnected"], timeout=90)
    finally:
        print("\nfault → firing (e2e, shortened rule durations):")
        for k, val in timings.items():
            print(f"  {k}: {val} s")
            record_property(k, val)
        if prom is not None:
            prom.stop()
        s.stop_all()
    expected = {"RejectedEvents", "ReplicaDrift", "VolumeUnprotected", "AgentDown", "ReplicationLagHigh", "MirrorStalled",
                "SourceHeartbeatMissing", "VerificationStale", "KafkaDisconnected"}
    assert expected <= set(timings)
    assert expected == {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
