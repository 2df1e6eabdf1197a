"""Fault-suite machinery: a busy volume, a workload that remembers what it removed, a sampler that
watches the mirror for files that vanish although the source still has them, a metrics poller that
survives agent restarts, and the per-case report (build/fault-report.json).

Every case follows the same shape (:class:`FaultCase`):

1. populate the source volume(s): >= 3,000 small files (1-6 KiB) in subdirectories, a handful of
   1-8 MiB files, a few symlinks and an empty directory;
2. start the source and the mirror, the sampler (mirror tree listing every ~0.25 s) and the metrics
   poller; wait for the initial sync (unless the case injects its fault during it);
3. start the workload (~25 ops/s: create, append, overwrite, rename, delete, occasionally a directory
   rename) — it records, before each removal, which path it removed and when;
4. the test injects its fault between :meth:`FaultCase.fault_begin` and :meth:`FaultCase.fault_end`;
5. :meth:`FaultCase.finish`: let the workload run a little longer, stop it, wait for convergence
   (tests/harness.py ``tree``: content, mode, mtime, symlinks), read the mirror's counters (summed
   over every mirror process of the case), write the report entry, then assert — with everything
   needed to debug a failure in the message.

A *transient disappearance* is a path the sampler saw on the mirror, then not, while the source
still had it and the workload had not deleted or renamed it (or an ancestor directory) before that
moment. The mirror must never do that, whatever the fault, so it is checked in every phase.
"""

from __future__ import annotations

import asyncio
import calendar
import fcntl
import json
import os
import random
import shutil
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..harness import REPO, Agent, Setup, diff, tree, wait_for

KiB = 1024
MiB = 1024 * 1024
REPORT = REPO / "build" / "fault-report.json"
CONVERGE_TIMEOUT = 180.0
SYNC_TIMEOUT = 300.0

# Fast verification so that a drifted mirror shows up (as checkpoint mismatches and repair requests)
# within a case, not an hour later.
SOURCE_FAST = {"checkpoint_interval": 5.0, "announce_interval": 2.0}


def utc(t: float) -> str:
    """ISO UTC with milliseconds, like the agents' JSON log ``ts``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# volume contents


@dataclass
class VolumeSpec:
    small_files: int = 3000
    dirs: int = 30
    big_mib: tuple[int, ...] = (1, 2, 3, 5, 8)
    big_dir: tuple[str, int] | None = None  # (name, files): this many of the small files in one directory
    seed: int = 1


def populate(root: Path, spec: VolumeSpec) -> dict[str, int]:
    """Create the volume's initial contents; returns counts and bytes."""
    rng = random.Random(spec.seed)
    nbytes = 0
    n = 0
    remaining = spec.small_files
    if spec.big_dir:
        name, count = spec.big_dir
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            data = os.urandom(rng.randint(1 * KiB, 6 * KiB))
            (d / f"doc{i:05d}.dat").write_bytes(data)
            nbytes += len(data)
            n += 1
        remaining -= count
    per_dir = max(1, -(-remaining // spec.dirs))
    i = 0
    while i < remaining:
        d = root / f"d{(i // per_dir):02d}" / ("sub" if (i // per_dir) % 3 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        data = os.urandom(rng.randint(1 * KiB, 6 * KiB))
        (d / f"f{i:05d}.txt").write_bytes(data)
        nbytes += len(data)
        n += 1
        i += 1
    big = root / "big"
    big.mkdir(exist_ok=True)
    for j, mib in enumerate(spec.big_mib):
        with open(big / f"image{j}.bin", "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MiB))
        nbytes += mib * MiB
        n += 1
    (root / "links").mkdir(exist_ok=True)
    os.symlink("../big/image0.bin", root / "links" / "to-image0")
    os.symlink("/nonexistent/dangling/target", root / "links" / "dangling")
    (root / "empty-dir").mkdir(exist_ok=True)
    return {"files": n, "bytes": nbytes}


def volume_bytes(root: Path) -> int:
    total = 0
    for dp, _dns, fns in os.walk(root):
        for fn in fns:
            try:
                st = os.lstat(os.path.join(dp, fn))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def list_tree(root: Path) -> set[str]:
    """Relative paths of everything under root (files, dirs, symlinks); tolerant of concurrent change."""
    out: set[str] = set()
    base = str(root)
    cut = len(base) + 1
    stack = [base]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                out.add(e.path[cut:])
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                except OSError:
                    pass
    return out


# ------------------------------------------------------------------------------------------------
# workload


class Workload(threading.Thread):
    """Keeps changing a volume at ``rate`` ops/s and records every path it removes (before removing it)."""

    def __init__(self, root: Path, rate: float = 25.0, seed: int = 7, tag: str = "w") -> None:
        super().__init__(daemon=True, name=f"workload-{root.name}")
        self.root = root
        self.rate = rate
        self.rng = random.Random(seed)
        self.tag = tag
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.gone: dict[str, float] = {}  # relative path -> monotonic time it was deleted/renamed away (first time)
        self.ops: dict[str, int] = {}
        self.errors: list[str] = []
        self.bytes_written = 0
        self.counter = 0
        self.files: list[str] = []
        self.own_dirs: list[str] = []
        skip = ("big/", "links/")
        for p in sorted(list_tree(root)):
            full = root / p
            if full.is_file() and not full.is_symlink() and not p.startswith(skip):
                self.files.append(p)
        self.dirs = sorted({os.path.dirname(p) for p in self.files if os.path.dirname(p)})
        self.started_at: float | None = None
        self.stopped_at: float | None = None

    # records
    def _gone(self, rel: str) -> None:
        with self.lock:
            self.gone.setdefault(rel, time.monotonic())

    def touched_before(self, rel: str, t: float) -> bool:
        """True if the workload removed rel or one of its ancestors at or before time t (+ slack)."""
        with self.lock:
            p = rel
            while p:
                g = self.gone.get(p)
                if g is not None and g <= t + 0.05:
                    return True
                p = os.path.dirname(p)
        return False

    def _count(self, op: str) -> None:
        self.ops[op] = self.ops.get(op, 0) + 1

    def _new_name(self, d: str) -> str:
        self.counter += 1
        return os.path.join(d, f"{self.tag}{self.counter:06d}.txt") if d else f"{self.tag}{self.counter:06d}.txt"

    def step(self) -> None:
        r = self.rng.random()
        rng = self.rng
        if not self.files or r < 0.28:
            d = rng.choice(self.dirs + self.own_dirs) if (self.dirs or self.own_dirs) else ""
            rel = self._new_name(d)
            data = os.urandom(rng.randint(512, 6 * KiB))
            (self.root / rel).write_bytes(data)
            self.files.append(rel)
            self.bytes_written += len(data)
            self._count("create")
        elif r < 0.48:
            rel = rng.choice(self.files)
            data = os.urandom(rng.randint(64, 2 * KiB))
            with open(self.root / rel, "ab") as f:
                f.write(data)
            self.bytes_written += len(data)
            self._count("append")
        elif r < 0.68:
            rel = rng.choice(self.files)
            data = os.urandom(rng.randint(512, 6 * KiB))
            with open(self.root / rel, "wb") as f:
                f.write(data)
            self.bytes_written += len(data)
            if rng.random() < 0.2:
                os.chmod(self.root / rel, rng.choice((0o600, 0o640, 0o644)))
            self._count("overwrite")
        elif r < 0.83:
            i = rng.randrange(len(self.files))
            rel = self.files[i]
            d = rng.choice(self.dirs + self.own_dirs)
            dst = self._new_name(d)
            self._gone(rel)
            os.rename(self.root / rel, self.root / dst)
            self.files[i] = dst
            self._count("rename")
        elif r < 0.98:
            i = rng.randrange(len(self.files))
            rel = self.files.pop(i)
            self._gone(rel)
            os.unlink(self.root / rel)
            self._count("delete")
        else:
            # directory life cycle, only on the workload's own directories
            if len(self.own_dirs) < 3 or rng.random() < 0.3:
                self.counter += 1
                d = f"wdir-{self.tag}{self.counter:06d}"
                (self.root / d).mkdir()
                for _ in range(5):
                    rel = self._new_name(d)
                    data = os.urandom(rng.randint(512, 4 * KiB))
                    (self.root / rel).write_bytes(data)
                    self.files.append(rel)
                    self.bytes_written += len(data)
                self.own_dirs.append(d)
                self._count("mkdir")
            else:
                d = rng.choice(self.own_dirs)
                self.counter += 1
                nd = f"wdir-{self.tag}{self.counter:06d}"
                self._gone(d)
                os.rename(self.root / d, self.root / nd)
                self.own_dirs[self.own_dirs.index(d)] = nd
                self.files = [nd + f[len(d):] if f.startswith(d + "/") else f for f in self.files]
                self._count("rename_dir")

    def run(self) -> None:
        self.started_at = time.monotonic()
        interval = 1.0 / self.rate
        nxt = time.monotonic()
        while not self.stop_ev.is_set():
            try:
                self.step()
            except OSError as e:
                if len(self.errors) < 50:
                    self.errors.append(f"{type(e).__name__}: {e}")
            nxt += interval
            delay = nxt - time.monotonic()
            if delay > 0:
                self.stop_ev.wait(delay)
            else:
                nxt = time.monotonic()
        self.stopped_at = time.monotonic()

    def stop(self) -> None:
        self.stop_ev.set()
        self.join(30)

    def summary(self) -> dict[str, Any]:
        return {"ops": dict(sorted(self.ops.items())), "ops_total": sum(self.ops.values()), "bytes_written": self.bytes_written,
                "errors": self.errors[:5], "removed_paths": len(self.gone)}


# ------------------------------------------------------------------------------------------------
# sampler


@dataclass
class Disappearance:
    path: str
    t: float  # monotonic, when first seen missing
    phase: str
    back_at: float | None = None  # when it was seen again (None: not seen again while sampling)
    wall: float = 0.0  # time.time() of the sample, to match the agents' log timestamps


class Sampler(threading.Thread):
    """Lists the mirror's copy of a volume repeatedly; records paths that vanish while the source has them."""

    def __init__(self, mirror_vol: Path, source_vol: Path, phase: Callable[[], str], interval: float = 0.25) -> None:
        super().__init__(daemon=True, name=f"sampler-{mirror_vol.name}")
        self.mirror_vol = mirror_vol
        self.source_vol = source_vol
        self.phase = phase
        self.interval = interval
        self.stop_ev = threading.Event()
        self.events: list[Disappearance] = []
        self.samples = 0
        self.ignore: set[str] = set()
        self.max_seen = 0

    def run(self) -> None:
        prev: set[str] | None = None
        open_: dict[str, Disappearance] = {}
        while not self.stop_ev.is_set():
            if not self.mirror_vol.is_dir():
                self.stop_ev.wait(self.interval)
                continue
            cur = list_tree(self.mirror_vol)
            now = time.monotonic()
            self.samples += 1
            self.max_seen = max(self.max_seen, len(cur))
            for p in list(open_):
                if p in cur:
                    open_.pop(p).back_at = now
            if prev is not None:
                for p in prev - cur:
                    if p in self.ignore or p in open_:
                        continue
                    if not os.path.lexists(self.source_vol / p):
                        continue  # the source does not have it (any more): a legitimate delete/rename
                    d = Disappearance(p, now, self.phase(), wall=time.time())
                    self.events.append(d)
                    open_[p] = d
            prev = cur
            self.stop_ev.wait(self.interval)

    def stop(self) -> None:
        self.stop_ev.set()
        self.join(30)


# ------------------------------------------------------------------------------------------------
# metrics across restarts


class MetricsPoller(threading.Thread):
    """Polls an agent's /metrics every ``interval`` s; counters are summed over the agent's processes.

    A SIGKILLed process loses at most the increments of its last ``interval``; every process that is
    stopped normally gets a final poll via :meth:`poll_now`.
    """

    def __init__(self, agent: Agent, interval: float = 0.5) -> None:
        super().__init__(daemon=True, name=f"metrics-{agent.kind}")
        self.agent = agent
        self.interval = interval
        self.stop_ev = threading.Event()
        self.by_pid: dict[int, dict[tuple[str, tuple], float]] = {}
        self.lock = threading.Lock()

    def poll_now(self) -> None:
        proc = self.agent.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            m = self.agent.metrics()
        except Exception:  # noqa: BLE001 - starting, stopping, killed
            return
        with self.lock:
            self.by_pid[proc.pid] = m

    def run(self) -> None:
        while not self.stop_ev.is_set():
            self.poll_now()
            self.stop_ev.wait(self.interval)

    def stop(self) -> None:
        self.stop_ev.set()
        self.join(10)
        self.poll_now()

    def total(self, name: str, **labels: str) -> float:
        with self.lock:
            s = 0.0
            for m in self.by_pid.values():
                for (n, lab), v in m.items():
                    if n == name and all(dict(lab).get(k) == val for k, val in labels.items()):
                        s += v
            return s

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        with self.lock:
            for m in self.by_pid.values():
                for (n, lab), v in m.items():
                    if n == name:
                        k = dict(lab).get(label, "")
                        out[k] = out.get(k, 0.0) + v
        return {k: v for k, v in sorted(out.items()) if v}

    def processes(self) -> int:
        return len(self.by_pid)


# ------------------------------------------------------------------------------------------------
# report


def record_report(entry: dict[str, Any]) -> None:
    """Merge one case's entry (by name) into build/fault-report.json."""
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    lock = REPORT.with_suffix(".lock")
    with open(lock, "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        try:
            data = json.loads(REPORT.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
                raise ValueError
        except (OSError, ValueError):
            data = {"cases": []}
        entry = {**entry, "run_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        cases = [c for c in data["cases"] if c.get("name") != entry["name"]]
        cases.append(entry)
        cases.sort(key=lambda c: c.get("name", ""))
        data["cases"] = cases
        data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        tmp = REPORT.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, REPORT)


# ------------------------------------------------------------------------------------------------
# tmpfs


class Tmpfs:
    """A small tmpfs mounted at ``path`` (root only); always unmounted by :meth:`close`."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"cannot mount a tmpfs at {path} (the fault suite runs as root): {r.stderr.strip()}")
        self.mounted = True

    def fill(self, name: str = ".filler") -> int:
        """Fill the file system to the last block; returns bytes written."""
        written = 0
        fd = os.open(self.path / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (b"\0" * MiB, b"\0" * 4096):
                while True:
                    try:
                        n = os.write(fd, chunk)
                    except OSError:
                        break
                    written += n
                    if n < len(chunk):
                        break
        finally:
            os.close(fd)
        return written

    def free(self, name: str = ".filler") -> None:
        (self.path / name).unlink()

    def usage(self) -> tuple[int, int]:
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize

    def close(self) -> None:
        if self.mounted:
            for _ in range(20):
                r = subprocess.run(["umount", str(self.path)], capture_output=True, text=True)
                if r.returncode == 0:
                    break
                time.sleep(0.5)
            else:
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
            self.mounted = False


# ------------------------------------------------------------------------------------------------
# the case


def _kafka_extra(cfg: Path, extra: dict[str, Any]) -> None:
    text = cfg.read_text()
    add = "".join(f"\n{k} = {json.dumps(v)}" for k, v in extra.items())
    cfg.write_text(text.replace("partitions = 3", "partitions = 3" + add, 1))


@dataclass
class Expect:
    """What the fault legitimately needs: repair requests of these types, listing deletions."""

    repair_types: tuple[str, ...] = ()  # () = none at all
    listing_deletions: bool = False
    mismatches: bool = False  # checkpoint mismatches (drift found) are legitimate


@dataclass
class FaultCase:
    name: str
    tmp: Path
    bootstrap: str
    topic: str
    volumes: tuple[str, ...] = ("vol1",)
    spec: VolumeSpec = field(default_factory=VolumeSpec)
    expect: Expect = field(default_factory=Expect)
    source_extra: dict[str, Any] = field(default_factory=dict)
    mirror_extra: dict[str, Any] = field(default_factory=dict)
    kafka_extra: dict[str, Any] = field(default_factory=dict)
    mirror_root: Path | None = None  # default tmp/mirror0
    mirror_state: Path | None = None
    source_state: Path | None = None
    rate: float = 25.0
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.finished = False
        self._phase = "setup"
        self.fault_t: list[tuple[str, float, float | None]] = []  # (label, begin, end)
        self.fault_end_t: float | None = None
        self.sync_seconds: float | None = None
        self.extra_report: dict[str, Any] = {}
        self.ignore_paths: set[str] = set()  # mirror paths the final comparison leaves out (strays planted by the test)
        self.cleanups: list[Callable[[], None]] = []
        s = Setup(self.tmp, self.bootstrap, self.topic, volumes=self.volumes, source_extra={**SOURCE_FAST, **self.source_extra})
        self.setup = s
        if self.source_state is not None:
            s.source_config.write_text(s.source_config.read_text().replace(f'state_dir = "{self.tmp / "state-src"}"',
                                                                           f'state_dir = "{self.source_state}"'))
        else:
            self.source_state = self.tmp / "state-src"
        self.mirror = s.add_mirror(**self.mirror_extra)
        cfg = self.mirror.config
        text = cfg.read_text()
        if self.mirror_root is not None:
            text = text.replace(f'root = "{self.tmp / "mirror0"}"', f'root = "{self.mirror_root}"')
            s.mirror_roots[0] = self.mirror_root
        else:
            self.mirror_root = s.mirror_roots[0]
        if self.mirror_state is not None:
            text = text.replace(f'state_dir = "{self.tmp / "state-mirror0"}"', f'state_dir = "{self.mirror_state}"')
        else:
            self.mirror_state = self.tmp / "state-mirror0"
        cfg.write_text(text)
        if self.kafka_extra:
            _kafka_extra(s.source_config, self.kafka_extra)
            _kafka_extra(cfg, self.kafka_extra)
        self.source = s.source
        self.workloads: dict[str, Workload] = {}
        self.samplers: dict[str, Sampler] = {}
        self.mpoll = MetricsPoller(self.mirror)
        self.spoll = MetricsPoller(self.source)
        self.populated: dict[str, dict[str, int]] = {}

    # -- phases ----------------------------------------------------------------------------------
    def phase(self) -> str:
        return self._phase

    def rel_t(self, t: float) -> float:
        return round(t - self.t0, 2)

    def src(self, vol: str = "vol1") -> Path:
        return self.setup.src[vol]

    def dst(self, vol: str = "vol1") -> Path:
        return self.mirror_root / vol

    def populate(self) -> None:
        for i, v in enumerate(self.volumes):
            spec = VolumeSpec(**{**self.spec.__dict__, "seed": self.spec.seed + i})
            self.populated[v] = populate(self.src(v), spec)
        log(f"{self.name}: populated {self.populated}")

    def start(self, *, wait_sync: bool = True) -> None:
        """Populate, start both agents, sampler and pollers; wait for the initial sync."""
        self.populate()
        self._phase = "initial_sync"
        self.source.start()
        self.mirror.start()
        for v in self.volumes:
            sm = Sampler(self.dst(v), self.src(v), self.phase)
            self.samplers[v] = sm
            sm.start()
        self.mpoll.start()
        self.spoll.start()
        if wait_sync:
            self.wait_initial_sync()

    def wait_initial_sync(self) -> None:
        t = time.monotonic()
        for v in self.volumes:
            self.converge(v, SYNC_TIMEOUT, "initial sync")
        self.sync_seconds = round(time.monotonic() - t, 1)
        log(f"{self.name}: initial sync done in {self.sync_seconds} s")
        self._phase = "steady"

    def start_workload(self) -> None:
        for i, v in enumerate(self.volumes):
            w = Workload(self.src(v), rate=self.rate / len(self.volumes), seed=100 + i, tag=f"w{i}x")
            self.workloads[v] = w
            w.start()
        if self._phase == "setup":
            self._phase = "steady"

    def fault_begin(self, label: str) -> None:
        log(f"{self.name}: fault on: {label}")
        self._phase = f"fault:{label}"
        self.fault_t.append((label, time.monotonic(), None))

    def fault_end(self) -> None:
        label, b, _ = self.fault_t[-1]
        now = time.monotonic()
        self.fault_t[-1] = (label, b, now)
        self.fault_end_t = now
        self._phase = "after_fault"
        log(f"{self.name}: fault off: {label} ({now - b:.1f} s)")

    def converge(self, vol: str, timeout: float, what: str) -> float:
        """Poll until the mirror equals the source (ignoring planted strays); returns seconds."""
        t = time.monotonic()
        last = ""
        while time.monotonic() - t < timeout:
            a, b = tree(self.src(vol)), self._mirror_tree(vol)
            if a == b:
                return time.monotonic() - t
            last = diff(a, b)
            for ag in (self.source, self.mirror):
                if ag.proc is not None and ag.proc.poll() is not None:
                    raise AssertionError(f"{self.name}: {ag.kind} agent died during {what}:\n{ag.log_tail(40)}")
            time.sleep(0.5)
        raise AssertionError(f"{self.name}: {vol} did not converge within {timeout:.0f} s ({what}):\n{last}\n"
                             f"--- mirror log tail:\n{self.mirror.log_tail(25)}")

    def _mirror_tree(self, vol: str) -> dict[str, tuple]:
        t = tree(self.dst(vol))
        for p in self.ignore_paths:
            for k in [k for k in t if k == p or k.startswith(p + "/")]:
                del t[k]
        return t

    # -- end -------------------------------------------------------------------------------------
    def finish(self, *, settle: float = 5.0, converge_timeout: float = CONVERGE_TIMEOUT, extra_checks: list[str] | None = None,
               checks: Callable[[dict[str, Any]], list[str]] | None = None) -> None:
        """Stop the workload after ``settle`` s, wait for convergence, record the report entry, assert.

        ``extra_checks``: failures the test already found; ``checks(entry)``: called with the report
        entry (may add keys to it) after convergence, returns further failures."""
        if self.fault_end_t is None:
            self.fault_end_t = time.monotonic()
        if settle:
            time.sleep(settle)
        for w in self.workloads.values():
            w.stop()
        self._phase = "converging"
        wl_stop = time.monotonic()
        converged: dict[str, float | None] = {}
        failures: list[str] = list(extra_checks or [])
        lost: dict[str, list[str]] = {}
        differ: dict[str, list[str]] = {}
        deadline = time.monotonic() + converge_timeout
        for v in self.volumes:
            try:
                self.converge(v, max(1.0, deadline - time.monotonic()), "final convergence")
                converged[v] = time.monotonic()
            except AssertionError as e:
                converged[v] = None
                failures.append(str(e)[:3000])
            a, b = tree(self.src(v)), self._mirror_tree(v)
            lost[v] = sorted(p for p in a if p not in b)
            differ[v] = sorted(p for p in a if p in b and a[p] != b[p])
        # let the samplers see the converged tree once more, then stop everything that polls
        time.sleep(1.0)
        for sm in self.samplers.values():
            sm.stop()
        self.mpoll.stop()
        self.spoll.stop()
        mirror_alive = self.mirror.proc is not None and self.mirror.proc.poll() is None
        source_alive = self.source.proc is not None and self.source.proc.poll() is None

        # transient disappearances
        transient: list[dict[str, Any]] = []
        for v, sm in self.samplers.items():
            w = self.workloads.get(v)
            for d in sm.events:
                if w is not None and w.touched_before(d.path, d.t):
                    continue
                transient.append({"volume": v, "path": d.path, "t": self.rel_t(d.t), "utc": utc(d.wall), "phase": d.phase,
                                  "back_after_s": round(d.back_at - d.t, 2) if d.back_at else None})
        repair = self.mpoll.by_label("volmirror_repair_requests_total", "type")
        repair_total = int(sum(repair.values()))
        mismatches = int(self.mpoll.total("volmirror_checkpoints_total", result="mismatch"))
        matches = int(self.mpoll.total("volmirror_checkpoints_total", result="match"))
        listing_del = int(self.mpoll.total("volmirror_mirror_deleted_files_total", reason="listing"))
        stream_del = int(self.mpoll.total("volmirror_mirror_deleted_files_total", reason="stream"))
        mlog = self.mirror.log_records()
        log_requests = sum(1 for r in mlog if r.get("event") == "repair_request")
        drift_log = [f"{r.get('kind')}: {r.get('path')}" for r in mlog if str(r.get("msg", "")).startswith("drift (")]
        mismatch_log = [r.get("msg", "")[:200] for r in mlog if "does not match" in str(r.get("msg", ""))]
        all_conv = all(converged.values())
        conv_s = round(max(c for c in converged.values()) - self.fault_end_t, 1) if all_conv else None
        n_lost = sum(len(x) for x in lost.values())
        n_differ = sum(len(x) for x in differ.values())
        entry: dict[str, Any] = {
            "name": self.name,
            "recovered": bool(all_conv and n_lost == 0 and mirror_alive),
            "converge_seconds_after_fault": conv_s,
            "converge_seconds_after_workload_stop": round(max(c for c in converged.values()) - wl_stop, 1) if all_conv else None,
            "files_lost": n_lost,
            "files_differing": n_differ,
            "transient_disappearances": len(transient),
            "repair_requests": repair_total,
            "repair_requests_by_type": repair,
            "repair_requests_in_log": log_requests,
            "checkpoint_mismatches": mismatches,
            "checkpoint_matches": matches,
            "listing_deletions": listing_del,
            "stream_deletions": stream_del,
            "rejected_events": self.mpoll.by_label("volmirror_mirror_rejected_events_total", "reason"),
            "apply_errors": int(self.mpoll.total("volmirror_mirror_apply_errors_total")),
            "local_errors": self.mpoll.by_label("volmirror_mirror_local_errors_total", "kind"),
            "quarantined": self.mpoll.by_label("volmirror_mirror_quarantined_total", "reason"),
            "stream_gaps": int(self.mpoll.total("volmirror_mirror_stream_gaps_total")),
            "mirror_applied_bytes": int(self.mpoll.total("volmirror_mirror_applied_bytes_total")),
            "mirror_processes": self.mpoll.processes(),
            "source_processes": self.spoll.processes(),
            "mirror_alive_at_end": mirror_alive,
            "source_alive_at_end": source_alive,
            "initial_sync_seconds": self.sync_seconds,
            "case_start_utc": utc(self.t0_wall),
            "faults": [{"label": lbl, "at": self.rel_t(b), "utc": utc(self.t0_wall + b - self.t0), "seconds": round(e - b, 1) if e else None}
                       for lbl, b, e in self.fault_t],
            "volumes": {v: {**self.populated.get(v, {}), "final_entries": len(tree(self.src(v)))} for v in self.volumes},
            "workload": {v: w.summary() for v, w in self.workloads.items()},
            "sampler": {v: {"samples": sm.samples, "max_entries_seen": sm.max_seen} for v, sm in self.samplers.items()},
            "case_seconds": round(time.monotonic() - self.t0, 1),
            "transient_examples": transient[:25],
            "lost_examples": {v: x[:25] for v, x in lost.items() if x},
            "differing_examples": {v: x[:10] for v, x in differ.items() if x},
            "drift_logged": len(drift_log),
            "drift_examples": drift_log[:20],
            "mismatch_examples": mismatch_log[:5],
            "notes": self.notes,
            **self.extra_report,
        }
        if checks is not None:
            try:
                failures += checks(entry)
            except Exception as e:  # noqa: BLE001 - a broken check is a failure, not a missing report
                failures.append(f"case check raised {type(e).__name__}: {e}")
        # ---- verdicts
        if not mirror_alive:
            failures.append(f"the mirror agent is not running at the end (exit {self.mirror.proc.returncode if self.mirror.proc else None})")
        if transient:
            ex = "\n".join(f"  {d['volume']}/{d['path']} missing at t={d['t']} s ({d['utc']}, {d['phase']}), back after {d['back_after_s']} s"
                           for d in transient[:25])
            moments = [d["utc"] for d in transient[:3]]
            ctx = _log_context(mlog, moments)
            sctx = _log_context(self.source.log_records(), moments, window=5.0)
            entry["mirror_log_around_disappearances"] = ctx
            entry["source_log_around_disappearances"] = sctx
            failures.append(f"{len(transient)} transient disappearance(s) (mirror lost a path the source still had):\n{ex}\n"
                            "  mirror log within 2 s of the first ones:\n" + "\n".join(f"    {x}" for x in ctx[:20]) +
                            "\n  source log within 5 s of the first ones:\n" + "\n".join(f"    {x}" for x in sctx[:20]))
        if n_lost:
            failures.append(f"{n_lost} file(s) lost on the mirror at the end: {json.dumps({v: x[:15] for v, x in lost.items() if x})}")
        if self.expect.repair_types:
            bad = {t: n for t, n in repair.items() if t not in self.expect.repair_types}
            if bad:
                failures.append(f"unexpected repair request types {bad} (allowed: {self.expect.repair_types})")
        elif repair_total or log_requests:
            failures.append(f"{max(repair_total, log_requests)} repair request(s) {repair} although this fault needs none")
        if mismatches and not self.expect.mismatches:
            failures.append(f"{mismatches} checkpoint mismatch(es) although this fault should leave no drift")
        if listing_del and not self.expect.listing_deletions:
            failures.append(f"{listing_del} deletion(s) from a listing although this fault needs none")
        entry["passed"] = not failures
        entry["failures"] = [f[:2000] for f in failures]
        record_report(entry)
        self.finished = True
        summary = {k: entry[k] for k in ("recovered", "converge_seconds_after_fault", "files_lost", "transient_disappearances",
                                         "repair_requests", "checkpoint_mismatches", "listing_deletions", "case_seconds")}
        log(f"{self.name}: {json.dumps(summary)}")
        if failures:
            errs = [r for r in mlog if r.get("level") in ("error", "warning")][-15:]
            errtxt = "\n".join(f"  {r.get('level')}: {r.get('msg', '')[:300]}" for r in errs)
            raise AssertionError(f"fault case {self.name} FAILED:\n- " + "\n- ".join(failures) +
                                 f"\nmetrics: {json.dumps(summary)}\nrepair by type: {repair}; rejected: {entry['rejected_events']}; "
                                 f"local errors: {entry['local_errors']}\ndrift the mirror logged ({len(drift_log)}): {drift_log[:10]}\n"
                                 f"last mirror warnings/errors:\n{errtxt}")

    def close(self, error: str | None = None) -> None:
        if not getattr(self, "finished", False):
            # the test stopped before finish(): still leave an entry in the report
            for p in (self.mpoll, self.spoll):
                p.poll_now()
            entry = {
                "name": self.name, "recovered": False, "passed": False, "aborted": True,
                "converge_seconds_after_fault": None, "files_lost": None,
                "transient_disappearances": sum(len(sm.events) for sm in self.samplers.values()),
                "repair_requests": int(self.mpoll.total("volmirror_repair_requests_total")),
                "checkpoint_mismatches": int(self.mpoll.total("volmirror_checkpoints_total", result="mismatch")),
                "listing_deletions": int(self.mpoll.total("volmirror_mirror_deleted_files_total", reason="listing")),
                "phase_at_abort": self._phase, "initial_sync_seconds": self.sync_seconds,
                "case_seconds": round(time.monotonic() - self.t0, 1),
                "transient_examples": [{"path": d.path, "t": self.rel_t(d.t), "phase": d.phase}
                                       for sm in self.samplers.values() for d in sm.events][:25],
                "failures": [(error or "the test stopped before the end of the case (see the pytest output)")[:3000]],
                "notes": self.notes,
            }
            try:
                record_report(entry)
            except Exception as e:  # noqa: BLE001
                log(f"{self.name}: could not record the report entry: {e!r}")
        for w in self.workloads.values():
            w.stop_ev.set()
        for sm in self.samplers.values():
            sm.stop_ev.set()
        self.mpoll.stop_ev.set()
        self.spoll.stop_ev.set()
        self.setup.stop_all()
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                log(f"{self.name}: cleanup failed: {e!r}")


_NOISE = ("Unable connect", "NodeNotReady", "metadata", "coordinator", "Coordinator", "fetch messages", "produce response")


def _log_context(records: list[dict], moments: list[str], window: float = 2.0) -> list[str]:
    """Non-debug mirror log lines (Kafka client noise left out) within ``window`` s of the given UTC moments."""
    out: list[str] = []
    spans = []
    for m in moments:
        t = calendar.timegm(time.strptime(m[:19], "%Y-%m-%dT%H:%M:%S")) + int(m[20:23]) / 1000
        spans.append((utc(t - window), utc(t + window)))
    for r in records:
        ts = str(r.get("ts", ""))
        if r.get("level") == "debug" or any(n in str(r.get("msg", "")) for n in _NOISE):
            continue
        if any(a <= ts <= b for a, b in spans):
            out.append(f"{ts} {r.get('level')} {str(r.get('msg', ''))[:200]}")
    return out[:40]


def restart(agent: Agent, *, kill: bool = True) -> None:
    if kill:
        agent.kill()
    else:
        agent.stop()
    agent.start()


def mirror_partition(mirror: Agent, vol: str = "vol1", timeout: float = 60) -> int:
    def part():
        p = mirror.status()["volumes"].get(vol, {}).get("partition")
        return p if p is not None and p >= 0 else None

    p = wait_for(lambda: part() is not None, timeout, f"the mirror to know {vol}'s partition")
    return part()  # type: ignore[return-value]


def read_epoch(state_dir: Path) -> str:
    return json.loads((state_dir / "sequence.json").read_text())["epoch"]


def wait_metric(agent: Agent, pred: Callable[[float], bool], name: str, timeout: float = 60, **labels: str) -> float:
    wait_for(lambda: pred(agent.metric(name, **labels)), timeout, f"{agent.kind} metric {name}{labels}")
    return agent.metric(name, **labels)


def kafka_admin_call(bootstrap: str, fn: Callable[[Any], Any]) -> Any:
    """Run ``await fn(admin)`` with a fresh aiokafka admin client."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def go():
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap.split(","), request_timeout_ms=15000)
        await admin.start()
        try:
            return await fn(admin)
        finally:
            await admin.close()

    return asyncio.run(go())


def partition_leader(bootstrap: str, topic: str, partition: int) -> int:
    async def fn(admin):
        for t in await admin.describe_topics([topic]):
            if t["topic"] == topic:
                for p in t["partitions"]:
                    if p["partition"] == partition:
                        return p["leader"]
        return None

    leader = None
    for _ in range(30):
        try:
            leader = kafka_admin_call(bootstrap, fn)
        except Exception:  # noqa: BLE001
            leader = None
        if leader is not None and leader >= 0:
            return leader
        time.sleep(1)
    raise AssertionError(f"no leader found for {topic}/{partition}")


def rmtree_force(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)
