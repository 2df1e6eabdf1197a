"""Dashboard, alert rules, rule tests, runbooks and scrape example are tested like code.

promtool must be installed (`make test` installs Debian's prometheus package): these tests fail,
never skip, without it. Every metric name used in the dashboard and the rules must be one the agents
really export (collected from their metric classes), so renaming a metric breaks this test.
"""

import json
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import CollectorRegistry

from daemon.metrics import MirrorMetrics, SourceMetrics

from ..harness import REPO

RULES = REPO / "deploy/prometheus/volmirror-alerts.yml"
RULE_TESTS = REPO / "deploy/prometheus/tests/volmirror-alerts.test.yml"
SCRAPE = REPO / "deploy/prometheus/scrape-example.yml"
DASHBOARD = REPO / "grafana/volmirror.json"
RUNBOOKS = REPO / "docs/runbooks.md"
ALERTS = {"ReplicationLagHigh", "MirrorStalled", "ReplicaDrift", "VerificationStale", "VolumeUnprotected",
          "SourceHeartbeatMissing", "AgentDown", "RejectedEvents", "KafkaDisconnected",
          "MirrorQuarantine", "MirrorDeletedByListing", "MirrorLocalErrors", "SourceUnprotectedPaths", "MassChangeDetected"}
PROMQL_WORDS = {"sum", "max", "min", "count", "by", "on", "and", "or", "unless", "rate", "increase", "time", "group_left",
                "max_over_time", "humanizeDuration", "without", "ignoring", "avg", "bool", "offset", "clamp_min", "histogram_quantile"}


def promtool(*args):
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: `make test` installs it (Debian package prometheus)")
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=REPO)


def exported_metrics() -> dict[str, set[str]]:
    """metric sample name → label names, for everything the agents register."""
    out: dict[str, set[str]] = {"up": {"job", "instance"}}
    for cls in (SourceMetrics, MirrorMetrics):
        reg = CollectorRegistry()
        cls(reg)
        for coll in list(reg._collector_to_names):
            for fam in coll.describe():
                labels = set(getattr(coll, "_labelnames", ()))
                names = {"counter": [fam.name + "_total"], "histogram": [fam.name + s for s in ("_bucket", "_sum", "_count")]}.get(fam.type, [fam.name])
                for n in names:
                    out[n] = labels
    return out


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # drop label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # drop matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # drop ranges
    expr = re.sub(r"\boffset\s+\d+[smhdwy]+", "", expr)  # drop offsets
    expr = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhd]?", w)}


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_and_unit_test_rules():
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    r = promtool("test", "rules", str(RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_rule_tests_cover_every_alert_firing_and_silent():
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fired, silent = set(), set()
    for t in doc["tests"]:
        for a in t.get("alert_rule_test", []):
            (fired if a.get("exp_alerts") else silent).add(a["alertname"])
    assert fired == ALERTS and silent == ALERTS


def test_every_alert_is_complete_and_has_a_runbook():
    rs = rules()
    assert {r["alert"] for r in rs} == ALERTS
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", RUNBOOKS.read_text(), re.M)}
    for r in rs:
        assert r["labels"]["severity"] in ("page", "ticket"), r["alert"]
        ann = r["annotations"]
        assert ann.get("summary") and ann.get("description"), r["alert"]
        url = ann["runbook_url"]
        assert url.endswith("docs/runbooks.md#" + r["alert"].lower()), url
        assert r["alert"].lower() in anchors, f"no runbook section for {r['alert']}"


def test_rules_use_only_exported_metrics():
    known = exported_metrics()
    for r in rules():
        unknown = metric_names(r["expr"]) - set(known)
        assert not unknown, f"{r['alert']} uses metrics no agent exports: {unknown}"


def panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def test_dashboard_variables_and_queries():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 39
    vars_ = {v["name"]: v for v in dash["templating"]["list"]}
    assert vars_["datasource"]["type"] == "datasource" and vars_["datasource"]["query"] == "prometheus"
    assert vars_["volume"]["multi"] is True and vars_["volume"]["includeAll"] is True
    known = exported_metrics()
    titles = set()
    n = 0
    for p in panels(dash):
        if p["type"] == "row":
            continue
        titles.add(p["title"])
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            n += 1
            assert t["datasource"]["uid"] == "${datasource}"
            names = metric_names(t["expr"].replace("$__rate_interval", "1m"))
            assert names <= set(known), f"{p['title']}: unknown metrics {names - set(known)}"
            if any("volume" in known[m] for m in names):
                assert '$volume' in t["expr"], f"{p['title']}: query ignores the volume variable: {t['expr']}"
    assert n >= 10
    for needed in ("Replication lag", "Consumer lag (records)", "Published vs applied bytes/s", "Blocks: changed vs unchanged vs zero",
                   "Drift files", "Time since last verification", "Protected volumes", "Rejected events by reason", "Kafka connected", "Agents up"):
        assert needed in titles


def test_scrape_example():
    r = promtool("check", "config", str(SCRAPE))
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = yaml.safe_load(SCRAPE.read_text())
    assert {j["job_name"] for j in cfg["scrape_configs"]} == {"volmirror-source", "volmirror-mirror"}
    assert any(f.endswith("volmirror-alerts.yml") for f in cfg["rule_files"])


def test_every_test_design_md_names_exists():
    """docs/design.md names the test beside each invariant: a renamed or deleted test must not
    leave an invariant that nothing holds the code to."""
    text = (REPO / "docs" / "design.md").read_text()
    names = set(re.findall(r"\btest_[a-z0-9_]+", text))
    assert len(names) > 20
    defined: set[str] = set()
    for f in (REPO / "tests").rglob("test_*.py"):
        defined.add(f.stem)
        defined |= set(re.findall(r"^(?:async )?def (test_[a-z0-9_]+)", f.read_text(), re.M))
    assert not sorted(names - defined), "design.md names tests that do not exist"
