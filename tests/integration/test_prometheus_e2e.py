"""End to end with a real Prometheus (Debian package): dashboard queries return data, alerts fire.

One test, bounded in time (a global budget caps every wait), on loopback only: its own Kafka broker
(so it can stop it), a source agent with two volumes, and two mirror sites: site 0 mirrors ``vol1``
(repair off, RPO target 5 s, test-build stall switch), site 1 mirrors ``deep`` under a long mirror
root. A Prometheus server scrapes all three every second with a copy of
deploy/prometheus/volmirror-alerts.yml whose `for:` durations and time thresholds are shortened. It
checks that a healthy system fires nothing and `volmirror status` exits 0, that every panel query of
grafana/volmirror.json returns a series, then injects one fault after another and measures the time
from each fault to each alert firing (printed, and recorded as test properties). Every rule must
fire for the volume (or agent) the fault was injected into; alerts that did not fire are collected
and reported together at the end.

The quarantine case needs a path the source can hold but the mirror cannot: the ``deep`` volume's
source root is short (under /tmp), the relative path is ~4000 bytes (20 directories of 200-character
names), and site 1's root is ~150 bytes long, so root + path exceeds PATH_MAX (4096) on the mirror
only (ENAMETOOLONG → quarantine).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from daemon.config import KafkaConfig
from daemon.kafka import send_raw

from ..harness import REPO, Broker, Setup, free_port, wait_converged, wait_for, write_config

pytestmark = pytest.mark.kafka

RULES = REPO / "deploy/prometheus/volmirror-alerts.yml"
DASHBOARD = REPO / "grafana/volmirror.json"
# the production thresholds, shortened so the test runs in about two minutes
FAST_EXPR = {
    "MirrorStalled": [("[5m]", "[5s]")],
    "VerificationStale": [("> 600", "> 8"), ("offset 10m", "offset 10s")],
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
    def __init__(self, tmp: Path, targets: dict[str, list[int]]) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            pytest.fail("prometheus is not installed: `make test` installs Debian's prometheus package")
        self.port = free_port()
        rules = tmp / "rules.yml"
        fast_rules(rules)
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}]}
                               for job, ports in targets.items()],
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

    def firing_for(self, name: str, labels: dict[str, str]) -> bool:
        return any(all(a.get(k) == v for k, v in labels.items()) for a in self.firing().get(name, []))

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


def long_dir(base: Path, total: int) -> Path:
    """A directory under ``base`` whose absolute path is about ``total`` bytes long."""
    p = base
    while len(str(p)) < total - 60:
        p = p / ("r" * 50)
    p = p / ("r" * max(1, total - len(str(p)) - 1))
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_dashboard_and_alerts_against_real_prometheus(tmp_path, kafka_own, topic, record_property):
    t_start = time.monotonic()
    budget = 230.0  # seconds for the whole test: every wait is capped by what is left of it
    bootstrap = kafka_own.bootstrap
    fast = {"checkpoint_interval": 2.0, "announce_interval": 1.0}
    s = Setup(tmp_path, bootstrap, topic, source_extra=fast)
    v = s.src["vol1"]
    (v / "a.bin").write_bytes(os.urandom(600_000))
    (v / "doc.txt").write_text("case file\n" * 500)
    (v / "batch").mkdir()
    for i in range(12):  # removed at once later: a mass deletion (guard_min_files = 10 at this mirror)
        (v / "batch" / f"f{i}.txt").write_text(f"file {i}\n")
    # the second volume: a short source root, so the source can hold a ~4000-byte relative path
    deep_src = Path(tempfile.mkdtemp(prefix="vmq", dir="/tmp"))
    (deep_src / "hello.txt").write_text("hello")
    write_config(s.source_config, bootstrap, topic, metrics_port=s.source_port, source={
        "state_dir": str(tmp_path / "state-src"), "heartbeat_interval": 1.0, **fast,
        "volumes": [{"name": "vol1", "path": str(v)}, {"name": "deep", "path": str(deep_src)}]})
    stall = tmp_path / "stall"
    s.source.start()
    m = s.add_mirror(repair=False, rpo_seconds=5.0, volumes=["vol1"], guard_min_files=10, guard_fraction=0.0)
    m.seams = ["--stall-file", str(stall)]
    m.start()
    deep_root = long_dir(tmp_path, 150)
    m2 = s.add_mirror(rpo_seconds=5.0, volumes=["deep"], root=str(deep_root))
    s.mirror_roots[1] = deep_root
    m2.start()
    prom = None
    timings: dict[str, float] = {}
    missed: dict[str, str] = {}

    def left(cap: float) -> float:
        return max(1.0, min(cap, budget - (time.monotonic() - t_start)))

    def measure(fault_at: float, alerts: list[tuple[str, dict[str, str]]], timeout: float = 60) -> None:
        for name, labels in alerts:
            try:
                wait_for(lambda: prom.firing_for(name, labels), left(timeout), f"alert {name} firing for {labels}", 0.25)
                timings.setdefault(name, round(time.monotonic() - fault_at, 1))
            except AssertionError as e:
                dead = [f"{a.kind} on port {a.port} exited {a.proc.returncode}:\n{a.log_tail(8)}"
                        for a in (s.source, m, m2) if a.proc is not None and a.proc.poll() is not None]
                missed[name] = f"{e}; firing now: {sorted(prom.firing())}" + ("".join("\n  " + d for d in dead))

    try:
        wait_converged(v, s.mirror_path("vol1", 0), agents=[s.source, m, m2])
        wait_converged(deep_src, s.mirror_path("deep", 1), agents=[s.source, m, m2])
        prom = Prom(tmp_path, {"volmirror-source": [s.source_port], "volmirror-mirror": [m.port, m2.port]})

        # healthy: protected at some site, nothing fires, `volmirror status` exits 0 at both sites
        for vol in ("vol1", "deep"):
            wait_for(lambda: prom.query(f'max by (volume) (volmirror_volume_protected{{volume="{vol}"}}) == 1'), 60,
                     f"{vol} protected in Prometheus")
        (v / "more.txt").write_text("traffic so rates are non-zero")
        time.sleep(8)
        assert prom.firing() == {}, f"a healthy system must not fire alerts: {prom.firing()}"
        for site in (m, m2):
            r = site.cli("status")
            assert r.returncode == 0, f"status of a protected site must exit 0:\n{r.stdout}{r.stderr}"

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

        vol1 = {"volume": "vol1"}
        # 1. hostile record written straight into the topic
        t = time.monotonic()
        asyncio.run(send_raw(KafkaConfig(bootstrap_servers=(bootstrap,), topic=topic), topic, [(b"vol1", b"not an event")]))
        measure(t, [("RejectedEvents", vol1)])

        # 2. corruption on the mirror with repair off: the scrubber finds content drift, nobody repairs it
        p = s.mirror_path() / "a.bin"
        st = os.stat(p)
        with open(p, "r+b") as f:
            f.seek(1234)
            f.write(b"\x00\xff")
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        t = time.monotonic()
        measure(t, [("ReplicaDrift", vol1), ("VolumeUnprotected", vol1)])

        # 3. a file someone put into the mirror root: only a verified listing may delete it
        (s.mirror_path() / "intruder.txt").write_text("not from the source")
        t = time.monotonic()

        def deleted_by_listing() -> bool:
            if m.metric("volmirror_mirror_deleted_files_total", volume="vol1", reason="listing") > 0:
                return True
            m.cli("verify", "--volume", "vol1", "--repair", "--timeout", "15", timeout=120)
            return m.metric("volmirror_mirror_deleted_files_total", volume="vol1", reason="listing") > 0

        try:
            wait_for(deleted_by_listing, left(90), "the intruder deleted by a listing (verify --repair)", 1.0)
        except AssertionError as e:
            missed["MirrorDeletedByListing"] = str(e)
        else:
            assert not (s.mirror_path() / "intruder.txt").exists()
            measure(t, [("MirrorDeletedByListing", vol1)])

        # 3b. a mass deletion: 12 files removed at once (the guard's threshold here is 10)
        t = time.monotonic()
        shutil.rmtree(v / "batch")
        measure(t, [("MassChangeDetected", vol1)])

        # 4. mirror stopped: the lag alert keeps counting from the last applied event
        t = time.monotonic()
        m.stop()
        measure(t, [("AgentDown", {"instance": f"127.0.0.1:{m.port}"}), ("ReplicationLagHigh", vol1)])
        m.start()
        t = time.monotonic()
        wait_for(lambda: not prom.firing_for("ReplicationLagHigh", vol1), left(60), "ReplicationLagHigh resolved", 0.25)
        timings["ReplicationLagHigh resolved after restart"] = round(time.monotonic() - t, 1)

        # 5. mirror up but unable to apply (test seam: every apply fails like a full disk)
        stall.touch()
        t = time.monotonic()
        (v / "pending.txt").write_text("waits in Kafka")
        measure(t, [("MirrorStalled", vol1), ("MirrorLocalErrors", {"instance": f"127.0.0.1:{m.port}", "kind": "disk"})])
        stall.unlink()
        # checkpoints were not applied while stalled: wait until they match again, so step 8 measures its own fault
        wait_for(lambda: not prom.firing_for("VerificationStale", vol1), left(60), "VerificationStale resolved after the stall", 0.25)

        # 6. a file name the source cannot replicate (not UTF-8)
        with open(os.fsencode(deep_src) + b"/bad-\xff-name.txt", "wb") as f:
            f.write(b"stays on the source")
        t = time.monotonic()
        measure(t, [("SourceUnprotectedPaths", {"volume": "deep"})], timeout=45)

        # 7. a path the source holds but site 1 cannot: root + path > PATH_MAX there → quarantined
        d = deep_src
        for i in range(20):
            d = d / (chr(ord("a") + i) * 200)
        d.mkdir(parents=True)
        (d / "f.txt").write_text("too deep for the mirror")
        rel = os.path.relpath(d / "f.txt", deep_src)
        assert len(str(deep_src)) + 1 + len(rel) < 4096 <= len(str(deep_root / "deep")) + 1 + len(rel)
        t = time.monotonic()
        measure(t, [("MirrorQuarantine", {"volume": "deep", "instance": f"127.0.0.1:{m2.port}"})], timeout=45)
        if "MirrorQuarantine" not in missed:
            r = m2.cli("status")
            assert r.returncode == 1 and "deep: not protected" in r.stdout and "quarantined" in r.stdout, r.stdout + r.stderr
        # what the alert says must hold: the quarantined records were skipped and the stream moves on
        (deep_src / "after.txt").write_text("applied after the quarantined path")
        try:
            wait_for(lambda: (s.mirror_path("deep", 1) / "after.txt").exists(), left(30), "deep/after.txt on site 1 after the quarantine")
        except AssertionError as e:
            errs = [r["msg"][:160] for r in m2.log_records() if r.get("level") == "error" and "quarantined" not in r.get("msg", "")][-3:]
            missed["MirrorQuarantine: the stream moves on"] = f"{e}; site 1 is stuck behind the unapplicable records: {errs}"

        # 8. source agent stopped: no heartbeats, no checkpoints
        t = time.monotonic()
        s.source.stop()
        measure(t, [("SourceHeartbeatMissing", vol1), ("VerificationStale", vol1)], timeout=90)

        # 9. Kafka gone
        t = time.monotonic()
        kafka_own.stop()
        measure(t, [("KafkaDisconnected", {"job": "volmirror-mirror"})], timeout=90)
    finally:
        print(f"\nfault → firing (e2e, shortened rule durations), test took {time.monotonic() - t_start:.0f} s:")
        for k, val in timings.items():
            print(f"  {k}: {val} s")
            record_property(k, val)
        for k, why in missed.items():
            print(f"  {k}: DID NOT FIRE: {why}")
        if prom is not None:
            prom.stop()
        s.stop_all()
        shutil.rmtree(deep_src, ignore_errors=True)
    rules = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert not missed, "alerts that did not fire, or what they say did not hold:\n" + "\n".join(f"{k}: {w}" for k, w in missed.items())
    assert rules <= set(timings), f"rules this test never fired: {rules - set(timings)}"
