"""Test harness: real agents as subprocesses, config files, tree comparison, metric scraping.

Nothing here mocks Kafka: agents talk to the broker the session started (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A single-node Kafka started with deploy/kafka/kafka.sh on free loopback ports."""

    SCRIPT = REPO / "deploy" / "kafka" / "kafka.sh"

    def __init__(self, prefix: str = "volmirror-test-kafka-", nodes: int = 1) -> None:
        import tempfile

        self.nodes = nodes
        for attempt in range(3):
            self.data = tempfile.mkdtemp(prefix=prefix)
            self.port, cport = (free_port(), free_port()) if nodes == 1 else (free_port_range(nodes), free_port_range(nodes))
            self.bootstrap = ",".join(f"127.0.0.1:{self.port + i}" for i in range(nodes))
            r = subprocess.run(["bash", str(self.SCRIPT), "start", "--data", self.data, "--port", str(self.port), "--controller-port",
                                str(cport), "--nodes", str(nodes)], capture_output=True, text=True)
            if r.returncode == 0:
                return
            logs = self._logs()
            self.stop()
            # a port found free can be taken before the broker binds it (another process's connection): new ports
            if "Address already in use" not in r.stdout + r.stderr + logs:
                break
        raise RuntimeError(f"could not start Kafka (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")

    def _logs(self) -> str:
        out = []
        for p in Path(self.data).rglob("*.log"):
            try:
                out.append(p.read_text(errors="replace")[-20000:])
            except OSError:
                pass
        return "\n".join(out)

    def kill_node(self, n: int) -> None:
        subprocess.run(["bash", str(self.SCRIPT), "kill-node", str(n), "--data", self.data], capture_output=True, check=True)

    def start_node(self, n: int) -> None:
        subprocess.run(["bash", str(self.SCRIPT), "start-node", str(n), "--data", self.data], capture_output=True, check=True)

    def stop(self) -> None:
        """Stop every node and remove the data directory (its logs, up to a few GiB after a
        benchmark; 145 of them had filled the disk before this), unless VOLMIRROR_KEEP_KAFKA_DATA
        is set."""
        subprocess.run(["bash", str(self.SCRIPT), "stop", "--data", self.data], capture_output=True)
        if not os.environ.get("VOLMIRROR_KEEP_KAFKA_DATA"):
            shutil.rmtree(self.data, ignore_errors=True)


def free_port_range(n: int) -> int:
    """The first of n consecutive free loopback ports, below the kernel's ephemeral range (where
    no outgoing connection can take one between this check and the broker's bind)."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = max(low - n - 1, 12000)
    for _ in range(200):
        base = random.randrange(10000, top)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", base + i))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def wait_for(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - keep polling, report the last one
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


class Agent:
    """One `volmirror source|mirror` process with its own config and log file."""

    def __init__(self, kind: str, config: Path, metrics_port: int, log_path: Path) -> None:
        self.kind = kind
        self.config = config
        self.port = metrics_port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.seams: list[str] = []  # e.g. ["--drop", "delete:x"]: run through tests/seams.py (mirror only)
        self.log_level = "debug"  # benchmarks run at the production default, info

    def start(self, wait_ready: bool = True) -> "Agent":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("NOTIFY_SOCKET", None)
        logf = open(self.log_path, "ab")
        entry = ["-m", "tests.seams", *self.seams, "--"] if self.seams else ["-m", "daemon"]
        self.proc = subprocess.Popen(
            [sys.executable, *entry, self.kind, "--config", str(self.config), "--log-format", "json", "--log-level", self.log_level],
            cwd=REPO, env=env, stdout=logf, stderr=logf, start_new_session=True,
        )
        logf.close()
        if wait_ready:
            wait_for(lambda: self.status().get("ready"), 60, f"{self.kind} agent ready (log: {self.log_path})")
        return self

    def status(self) -> dict:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.kind} agent exited with {self.proc.returncode}; log:\n{self.log_tail()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status", timeout=2) as r:
            return json.loads(r.read())

    def metrics(self) -> dict[tuple[str, tuple], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
            text = r.read().decode()
        out: dict[tuple[str, tuple], float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run `volmirror <args> --config <this agent's config>`."""
        return subprocess.run([sys.executable, "-m", "daemon", *args, "--config", str(self.config)], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def log_records(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


def write_config(path: Path, bootstrap: str, topic: str, *, source: dict | None = None, mirror: dict | None = None, metrics_port: int) -> Path:
    lines = ["[kafka]", f"bootstrap_servers = [{', '.join(json.dumps(s) for s in bootstrap.split(','))}]", f'topic = "{topic}"', "partitions = 3", ""]
    if source:
        lines += ["[source]", f'state_dir = "{source["state_dir"]}"']
        for k in ("heartbeat_interval", "reconcile_interval", "debounce_ms", "checkpoint_interval", "announce_interval", "point_interval",
                  "point_quiet_ms"):
            if k in source:
                lines.append(f"{k} = {source[k]}")
        for v in source["volumes"]:
            lines += ["", "[[source.volumes]]", f'name = "{v["name"]}"', f'path = "{v["path"]}"']
            for k, val in v.items():
                if k not in ("name", "path"):
                    lines.append(f"{k} = {json.dumps(val)}")
        lines.append("")
    if mirror:
        lines += ["[mirror]", f'root = "{mirror["root"]}"', f'state_dir = "{mirror["state_dir"]}"', f'group_id = "{mirror["group_id"]}"']
        for k, val in mirror.items():
            if k not in ("root", "state_dir", "group_id"):
                lines.append(f"{k} = {json.dumps(val)}")
        lines.append("")
    lines += ["[metrics]", f'listen = "127.0.0.1:{metrics_port}"', ""]
    path.write_text("\n".join(lines))
    return path


class Setup:
    """A source volume, one or more mirror sites, and their agents, all under tmp_path."""

    def __init__(self, tmp: Path, bootstrap: str, topic: str, *, volumes: tuple[str, ...] = ("vol1",), block_size: int | None = None,
                 source_extra: dict | None = None, exclude: list[str] | None = None, volume_extra: dict | None = None) -> None:
        self.tmp = tmp
        self.bootstrap = bootstrap
        self.topic = topic
        self.src: dict[str, Path] = {}
        vols = []
        for v in volumes:
            p = tmp / "src" / v
            p.mkdir(parents=True)
            self.src[v] = p
            vol = {"name": v, "path": str(p)}
            if block_size:
                vol["block_size"] = block_size
            if exclude:
                vol["exclude"] = exclude
            vol.update(volume_extra or {})
            vols.append(vol)
        self.source_port = free_port()
        src_cfg = {"state_dir": str(tmp / "state-src"), "volumes": vols, "heartbeat_interval": 1.0, **(source_extra or {})}
        self.source_config = write_config(tmp / "source.toml", bootstrap, topic, source=src_cfg, metrics_port=self.source_port)
        self.source = Agent("source", self.source_config, self.source_port, tmp / "source.log")
        self.mirrors: list[Agent] = []
        self.mirror_roots: list[Path] = []

    def add_mirror(self, group: str | None = None, **extra: object) -> Agent:
        i = len(self.mirrors)
        port = free_port()
        root = self.tmp / f"mirror{i}"
        cfg = write_config(
            self.tmp / f"mirror{i}.toml", self.bootstrap, self.topic,
            mirror={"root": str(root), "state_dir": str(self.tmp / f"state-mirror{i}"), "group_id": group or f"site-{i}-{self.topic}", **extra},
            metrics_port=port,
        )
        a = Agent("mirror", cfg, port, self.tmp / f"mirror{i}.log")
        self.mirrors.append(a)
        self.mirror_roots.append(root)
        return a

    def mirror_path(self, vol: str = "vol1", i: int = 0) -> Path:
        return self.mirror_roots[i] / vol

    def stop_all(self) -> None:
        for a in [self.source, *self.mirrors]:
            a.stop()


def tree(root: Path) -> dict[str, tuple]:
    """Comparable view of a tree: file content/size/mode/mtime, dir mode, symlink target."""
    out: dict[str, tuple] = {}
    if not root.exists():
        return out
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = os.path.join(dp, n)
            rel = os.path.relpath(p, root)
            try:
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    out[rel] = ("l", os.readlink(p))
                elif stat.S_ISDIR(st.st_mode):
                    out[rel] = ("d", stat.S_IMODE(st.st_mode))
                elif stat.S_ISREG(st.st_mode):
                    with open(p, "rb") as f:
                        data = f.read()
                    out[rel] = ("f", st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, hash(data), len(data))
            except (FileNotFoundError, NotADirectoryError):
                out[rel] = ("vanished during walk",)  # tree is changing: never equal, poll again
    return out


def diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    lines = [f"{k}: src={a.get(k)} mirror={b.get(k)}" for k in keys if a.get(k) != b.get(k)]
    return "\n".join(lines[:20]) + (f"\n... {len(lines) - 20} more" if len(lines) > 20 else "")


def wait_converged(src: Path, dst: Path, timeout: float = 30.0, agents: list[Agent] | None = None) -> float:
    """Wait until dst mirrors src exactly; returns seconds taken. Fails with a diff."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout:
        a, b = tree(src), tree(dst)
        if a == b:
            return time.monotonic() - t0
        last = diff(a, b)
        for ag in agents or []:
            if ag.proc is not None and ag.proc.poll() is not None:
                raise AssertionError(f"{ag.kind} agent died:\n{ag.log_tail()}")
        time.sleep(0.1)
    logs = "\n".join(f"--- {ag.kind} log:\n{ag.log_tail(30)}" for ag in agents or [])
    raise AssertionError(f"mirror did not converge in {timeout}s:\n{last}\n{logs}")
