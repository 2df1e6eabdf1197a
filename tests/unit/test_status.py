"""`volmirror status` tells the truth: exit 1 and the reasons when a volume is not protected.

The verdict and rendering functions are pure over the agents' status JSON (shape: MirrorAgent.status()
and SourceAgent.status()); run_status is exercised against a fake /status HTTP server.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from daemon import status
from daemon.config import load
from daemon.errors import EXIT_FAILURE, EXIT_OK


def mvol(**kw) -> dict:
    """One volume of a mirror's /status, healthy unless overridden."""
    v = {
        "mirrored": True, "announced_by": {"host": "src1", "path": "/srv/data/v", "block_size": 131072}, "partition": 0,
        "applied_seq": 10, "epoch": "e1", "last_event_ts": time.time() - 1, "lag_seconds": 0.4, "lag_records": 0.0,
        "applied_bytes": 1024.0, "files_applied": 3.0, "last_verified": time.time() - 30, "drift_files": 0,
        "quarantined": 0, "unprotected_paths": 0, "protected": True, "why_not_protected": [],
    }
    v.update(kw)
    return v


def mirror(**vols) -> dict:
    return {"agent": "mirror", "ready": True, "group_id": "drc1", "root": "/srv/mirror", "topic": "t",
            "kafka_connected": True, "rpo_seconds": 60.0, "volumes": vols}


def source(**vols) -> dict:
    return {"agent": "source", "host": "src1", "topic": "t", "kafka_connected": True, "volumes": vols}


def svol(**kw) -> dict:
    v = {"path": "/srv/data/v", "block_size": 131072, "pending_files": 0, "last_seq": 10, "last_published": time.time(), "sync": None}
    v.update(kw)
    return v


# -- verdicts and exit codes (pure) -------------------------------------------------------------------

def test_all_protected_exits_0():
    st = mirror(a=mvol(), b=mvol())
    assert status.problems(st) == []
    assert status.exit_code(st) == EXIT_OK


@pytest.mark.parametrize("override, reason", [
    ({"protected": False, "drift_files": 3, "why_not_protected": ["3 drifted path(s)"]}, "3 drifted path(s)"),
    ({"protected": False, "quarantined": 2, "why_not_protected": ["2 quarantined path(s)"]}, "2 quarantined path(s)"),
    ({"protected": False, "why_not_protected": ["no fresh heartbeat", "lag above RPO target 60s"]}, "no fresh heartbeat"),
    ({"protected": False, "why_not_protected": ["not verified recently"]}, "not verified recently"),
])
def test_one_unprotected_volume_exits_1_and_says_why(override, reason):
    st = mirror(good=mvol(), bad=mvol(**override))
    probs = status.problems(st)
    assert len(probs) == 1 and probs[0].startswith("bad: not protected: ") and reason in probs[0]
    assert status.exit_code(st) == EXIT_FAILURE


def test_counts_are_facts_even_when_the_agent_forgot_the_reason():
    # an older agent: says protected, but reports quarantined and unreplicable paths
    st = mirror(v=mvol(quarantined=2, unprotected_paths=1))
    (x,) = status.verdicts(st)
    assert not x.protected
    assert x.reasons == ("2 quarantined path(s)", "1 path(s) the source cannot replicate")
    assert status.exit_code(st) == EXIT_FAILURE
    # the agent's own wording is not repeated
    st = mirror(v=mvol(protected=False, quarantined=2, why_not_protected=["2 quarantined path(s)"]))
    assert status.verdicts(st)[0].reasons == ("2 quarantined path(s)",)


def test_missing_new_fields_count_as_zero():
    v = mvol()
    del v["quarantined"], v["unprotected_paths"]
    assert status.exit_code(mirror(v=v)) == EXIT_OK


def test_unprotected_without_reason_is_still_unprotected():
    st = mirror(v=mvol(protected=False, why_not_protected=[]))
    assert status.exit_code(st) == EXIT_FAILURE
    assert "without a reason" in status.problems(st)[0]


def test_volume_another_site_mirrors_is_listed_but_not_counted():
    st = mirror(mine=mvol(), other=mvol(mirrored=False, protected=False, why_not_protected=["not mirrored at this site"]))
    assert status.exit_code(st, site_volumes=("mine",)) == EXIT_OK
    text = status.render(st, ("mine",))
    assert "other: not protected (another site's responsibility" in text
    # without the filter, this site is responsible for every volume
    assert status.exit_code(st) == EXIT_FAILURE


def test_mirror_with_no_volume_is_not_ok():
    st = mirror()
    assert status.exit_code(st) == EXIT_FAILURE
    assert "no volume to protect" in status.problems(st)[0]


def test_stale_snapshot_exits_1():
    assert status.exit_code(mirror(v=mvol()), stale=True) == EXIT_FAILURE


def test_source_unprotected_paths():
    assert status.exit_code(source(v=svol())) == EXIT_OK
    assert status.exit_code(source(v=svol(unprotected_paths=0))) == EXIT_OK
    st = source(v=svol(unprotected_paths=4))
    assert status.exit_code(st) == EXIT_FAILURE
    assert "v: not protected: 4 path(s) cannot be replicated" in status.problems(st)[0]
    assert "4 path(s) cannot be replicated" in status.one_line(st)


# -- rendering ----------------------------------------------------------------------------------------

def test_render_table_and_reasons():
    st = mirror(good=mvol(), bad=mvol(protected=False, drift_files=3, quarantined=1,
                                      why_not_protected=["3 drifted path(s)", "1 quarantined path(s)"]))
    text = status.render(st)
    lines = text.splitlines()
    assert "QUARANT" in lines[1] and "DRIFT" in lines[1]
    bad = next(ln for ln in lines if ln.startswith("bad "))
    assert bad.split()[2] == "NO" and bad.split()[-2:] == ["3", "1"]
    good = next(ln for ln in lines if ln.startswith("good "))
    assert good.split()[2] == "yes"
    assert "  bad: not protected: 3 drifted path(s), 1 quarantined path(s)" in lines


def test_watch_line_has_protection_first_reason_drift_and_lag_per_volume():
    st = mirror(good=mvol(lag_seconds=0.4), bad=mvol(protected=False, lag_seconds=75.0, drift_files=2,
                                                     why_not_protected=["no fresh heartbeat", "2 drifted path(s)"]))
    line = status.one_line(st)
    assert "\n" not in line
    assert line.startswith("mirror: lag 75.0s / 0 rec")
    assert "bad: protected NO (no fresh heartbeat), drift 2, lag 75.0s" in line
    assert "good: protected yes, drift 0, lag 0.4s" in line
    assert "no volumes yet" in status.one_line(mirror())


# -- run_status against a fake agent ------------------------------------------------------------------

class FakeAgent:
    def __init__(self, body: dict) -> None:
        body_bytes = json.dumps(body).encode()

        class H(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200 if self.path == "/status" else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body_bytes)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def config(tmp_path: Path, port: int, volumes: list[str] | None = None) -> Path:
    p = tmp_path / "m.toml"
    vols = f"volumes = {json.dumps(volumes)}\n" if volumes else ""
    p.write_text(f"""
[kafka]
bootstrap_servers = ["127.0.0.1:9092"]
topic = "t"
[mirror]
root = "{tmp_path}/root"
state_dir = "{tmp_path}/state"
group_id = "drc1"
{vols}
[metrics]
listen = "127.0.0.1:{port}"
""")
    return p


@pytest.mark.parametrize("as_json", [False, True])
def test_run_status_exit_codes_against_fake_agent(tmp_path, capsys, as_json):
    good = FakeAgent(mirror(v=mvol()))
    bad = FakeAgent(mirror(v=mvol(), w=mvol(protected=False, quarantined=1, why_not_protected=["1 quarantined path(s)"])))
    try:
        assert status.run_status(load(config(tmp_path, good.port)), as_json=as_json, watch=False) == EXIT_OK
        capsys.readouterr()
        assert status.run_status(load(config(tmp_path, bad.port)), as_json=as_json, watch=False) == EXIT_FAILURE
        out = capsys.readouterr()
        assert "w: not protected: 1 quarantined path(s)" in (out.err if as_json else out.out)
        # the same agent, but this site only mirrors v: w is someone else's
        assert status.run_status(load(config(tmp_path, bad.port, ["v"])), as_json=as_json, watch=False) == EXIT_OK
    finally:
        good.close()
        bad.close()


def test_run_status_unreachable_agent(tmp_path, capsys):
    from ..harness import free_port

    cfg = load(config(tmp_path, free_port()))
    assert status.run_status(cfg, as_json=False, watch=False) == EXIT_FAILURE
    assert "not reachable" in capsys.readouterr().err
    # with a snapshot: shown, marked stale, still exit 1
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "status.json").write_text(json.dumps({**mirror(v=mvol()), "written_at": time.time() - 60}))
    assert status.run_status(cfg, as_json=False, watch=False) == EXIT_FAILURE
    assert "STALE" in capsys.readouterr().out


def test_initial_sync_progress_shows_files_bytes_rate_and_eta():
    sync = {"active": True, "files_done": 1234, "files_total": 10000, "bytes_done": 12 * 2**20, "bytes_total": 100 * 2**20,
            "rate_bytes_per_s": 4 * 2**20, "eta_seconds": 22.0}
    st = source(v=svol(sync=sync))
    line = status.one_line(st)
    assert "1,234/10,000 files" in line and "12.0 MiB/100.0 MiB" in line and "4.0 MiB/s" in line and "ETA 22 s" in line
    assert "1,234/10,000 files" in status.render(st)
    assert "ETA 2 min" in status.sync_text({**sync, "eta_seconds": 130.0})
    assert "ETA n/a" in status.sync_text({**sync, "eta_seconds": None})
