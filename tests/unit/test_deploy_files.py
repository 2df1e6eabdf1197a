"""Ops files are tested like code: example configs validate, systemd units are well-formed."""

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..harness import REPO

UNITS = {"source": REPO / "deploy/systemd/volmirror-source.service", "mirror": REPO / "deploy/systemd/volmirror-mirror.service"}


@pytest.mark.parametrize("name", ["source", "mirror"])
def test_example_config_validates(name):
    r = subprocess.run([sys.executable, "-m", "daemon", "check-config", "--config", str(REPO / f"deploy/examples/{name}.toml")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(path)
    return cp


@pytest.mark.parametrize("agent", ["source", "mirror"])
def test_unit_contract(agent):
    svc = unit(UNITS[agent])["Service"]
    assert svc["Type"] == "notify" and svc["Restart"] == "on-failure"
    start, pre = svc["ExecStart"].split(), svc["ExecStartPre"].split()
    assert start[1] == agent and pre[1] == "check-config"
    assert start[start.index("--config") + 1] == pre[pre.index("--config") + 1] == f"/etc/volmirror/{agent}.toml"
    assert "NoNewPrivileges" in svc and svc["ProtectSystem"] == "strict"
    assert f"/var/lib/volmirror/{agent}" in svc["ReadWritePaths"]


def test_mirror_unit_can_write_the_example_root():
    import tomllib

    root = tomllib.loads((REPO / "deploy/examples/mirror.toml").read_text())["mirror"]["root"]
    assert root in unit(UNITS["mirror"])["Service"]["ReadWritePaths"].split()


@pytest.mark.parametrize("agent", ["source", "mirror"])
def test_systemd_analyze_verify(agent, tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:  # not a skip: the structural checks above still ran; this is an extra check
        return
    exe = shutil.which("volmirror") or str(Path(sys.executable).parent / "volmirror")
    text = UNITS[agent].read_text().replace("/usr/local/bin/volmirror", exe)
    p = tmp_path / UNITS[agent].name
    p.write_text(text)
    r = subprocess.run([tool, "verify", str(p)], capture_output=True, text=True)
    # it exits 0 even for a bad directive, printing "<file>:<line>: ..." instead: no such line allowed
    assert r.returncode == 0 and p.name not in r.stdout + r.stderr, r.stdout + r.stderr
