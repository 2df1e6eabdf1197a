"""Ops files are tested like code: the example configs validate, the systemd units are well-formed.

No broker needed. Nothing here skips: the one check that needs a tool the machine may lack
(``systemd-analyze verify``) becomes a no-op when the tool is absent, after the structural checks ran.
"""

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ..harness import REPO

AGENTS = ("source", "mirror")
UNITS = {a: REPO / f"deploy/systemd/volmirror-{a}.service" for a in AGENTS}
EXAMPLES = {a: REPO / f"deploy/examples/{a}.toml" for a in AGENTS}
SYSCTL = REPO / "deploy/sysctl/60-volmirror-inotify.conf"
BINARY = "/usr/bin/volmirror"


def unit(path: Path) -> configparser.ConfigParser:
    """systemd unit → ConfigParser (case-preserving keys; a repeated key keeps its last value)."""
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text(), source=str(path))
    return cp


def service(agent: str) -> configparser.SectionProxy:
    return unit(UNITS[agent])["Service"]


def config_arg(argv: list[str]) -> str:
    return argv[argv.index("--config") + 1]


# -- (a) example configs ------------------------------------------------------------------------


@pytest.mark.parametrize("agent", AGENTS)
def test_example_config_passes_check_config(agent):
    r = subprocess.run([sys.executable, "-m", "daemon", "check-config", "--config", str(EXAMPLES[agent])],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ": OK;" in r.stdout


def test_example_configs_have_the_documented_shape():
    src = tomllib.loads(EXAMPLES["source"].read_text())
    mir = tomllib.loads(EXAMPLES["mirror"].read_text())
    assert {v["name"]: v["path"] for v in src["source"]["volumes"]} == {"perkara": "/srv/data/perkara", "registry": "/srv/data/registry"}
    assert mir["mirror"]["group_id"] == "drc-site-1" and mir["mirror"]["root"] == "/srv/mirror"
    assert src["kafka"]["topic"] == mir["kafka"]["topic"]
    assert src["kafka"]["bootstrap_servers"] == mir["kafka"]["bootstrap_servers"]


# -- (b) unit files -----------------------------------------------------------------------------


@pytest.mark.parametrize("agent", AGENTS)
def test_unit_contract(agent):
    cp = unit(UNITS[agent])
    assert {"Unit", "Service", "Install"} <= set(cp.sections())
    svc = cp["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["Restart"] == "on-failure" and svc["RestartSec"] == "5s"
    assert svc["KillSignal"] == "SIGTERM" and svc["TimeoutStopSec"] == "60"
    assert "network-online.target" in cp["Unit"]["After"].split() and "network-online.target" in cp["Unit"]["Wants"].split()
    assert cp["Install"]["WantedBy"] == "multi-user.target"

    start, pre = shlex.split(svc["ExecStart"]), shlex.split(svc["ExecStartPre"])
    assert start[0] == pre[0] == BINARY
    assert start[1] == agent and pre[1] == "check-config"
    assert config_arg(start) == config_arg(pre) == f"/etc/volmirror/{agent}.toml"
    assert start[start.index("--log-format") + 1] == "json"


@pytest.mark.parametrize("agent", AGENTS)
def test_unit_hardening(agent):
    svc = service(agent)
    for key, value in {
        "NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectSystem": "strict",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes", "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native", "LimitNOFILE": "65536",
    }.items():
        assert svc.get(key) == value, key
    assert svc["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert svc["StateDirectory"] == f"volmirror/{agent}"


def test_source_unit_can_read_everything_and_write_only_its_state():
    svc = service("source")
    # volumes may live under /home: it must stay readable
    assert svc["ProtectHome"] == "read-only"
    assert svc["ReadWritePaths"].split() == ["/var/lib/volmirror/source"]
    # root (no User=) keeps read access to every file through CAP_DAC_READ_SEARCH
    if "CapabilityBoundingSet" in svc:
        assert "CAP_DAC_READ_SEARCH" in svc["CapabilityBoundingSet"].split()
    state_dir = tomllib.loads(EXAMPLES["source"].read_text())["source"]["state_dir"]
    assert state_dir == "/var/lib/" + svc["StateDirectory"]


def test_mirror_unit_can_write_the_example_root_with_any_mode():
    svc = service("mirror")
    mirror = tomllib.loads(EXAMPLES["mirror"].read_text())["mirror"]
    assert mirror["root"] in svc["ReadWritePaths"].split()
    assert mirror["state_dir"] == "/var/lib/" + svc["StateDirectory"]
    # the applier chmods with the source's full mode (setuid/setgid/sticky) and writes into
    # read-only directories: nothing may take that away
    assert svc.get("RestrictSUIDSGID", "no") == "no"
    assert "CapabilityBoundingSet" not in svc and "User" not in svc


def test_sysctl_raises_inotify_limits():
    values = {}
    for line in SYSCTL.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    assert int(values["fs.inotify.max_user_watches"]) == 1048576
    assert int(values["fs.inotify.max_user_instances"]) >= 128  # the kernel default


# -- (c) systemd's own parser -------------------------------------------------------------------


@pytest.mark.parametrize("agent", AGENTS)
def test_systemd_analyze_verify(agent, tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        # Not a skip: the structural checks above already ran. Without systemd-analyze there is
        # nothing more to check, so this test passes as a no-op.
        return
    # verify fails when ExecStart's binary is missing: point it at one that exists on every host
    exe = shutil.which("true") or "/bin/true"
    text = UNITS[agent].read_text()
    assert BINARY in text
    p = tmp_path / UNITS[agent].name
    p.write_text(text.replace(BINARY, exe))
    r = subprocess.run([tool, "verify", str(p)], capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    # a bad directive does not change the exit code; systemd prints "<file>:<line>: ..." and ignores it
    assert not re.search(re.escape(str(p)) + r":\d+:", out), out
    if os.access(exe, os.X_OK):
        assert r.returncode == 0, out


@pytest.mark.parametrize("name", ["failback-source", "failback-mirror"])
def test_failback_example_configs_pass_check_config(name):
    path = REPO / f"deploy/examples/{name}.toml"
    r = subprocess.run([sys.executable, "-m", "daemon", "check-config", "--config", str(path)], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    fb_src, fb_mir = (tomllib.loads((REPO / f"deploy/examples/failback-{a}.toml").read_text()) for a in ("source", "mirror"))
    fwd = tomllib.loads(EXAMPLES["source"].read_text())
    # the reverse direction: its own topic, the original volume inside the reverse mirror's root
    assert fb_src["kafka"]["topic"] == fb_mir["kafka"]["topic"] != fwd["kafka"]["topic"]
    orig = next(v for v in fwd["source"]["volumes"] if v["name"] == "perkara")["path"]
    assert f'{fb_mir["mirror"]["root"]}/perkara' == orig
