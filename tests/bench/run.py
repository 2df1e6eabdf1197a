"""`make bench`: volmirror against its baselines, in one invocation, on the same data (issue 8, item 1).

    python tests/bench/run.py [--only NAME[,NAME]] [--scale quick|full] [--rounds N] [--out FILE] [--budget S]

A plain script, not a pytest module. Loopback only: it starts its own single-node Kafka with
tests.harness.Broker (free ports) once per run and stops it at the end, whatever happens. A global
budget (SIGALRM) ends the run; agents, lsyncd and Kafka are stopped in `finally` blocks. All data
lives under one tempfile.mkdtemp directory, removed at the end.

Scenarios (full scale; `--scale quick` divides file counts by 10 and big-file bytes by 8, and runs
the latency workloads for 15 s instead of 60 s):
  initial     1 GiB file + 10,000 files of 4-128 KiB into an empty mirror, vs `rsync -a` into an
              empty dir and a read-everything floor (`cat` of every file); page cache warm
  bigfile     one 4 GiB file, cold, MiB/s, vs `rsync -a` and `cat` (cold)
  smallfiles  50,000 files of 1-8 KiB in 500 directories, cold, files/s, vs `rsync -a` (cold)
  scale       200,000 files of 0-300 B in 20,000 directories: cold sync vs `rsync -a`; then warm
              restart of the source with one edit made while it was down; peak RSS of both agents
  delta       160 random 4 KiB writes in a mirrored 1 GiB file, clock from the last write to a
              byte-identical mirror file, vs `rsync -a --no-whole-file --inplace` of the same edit
              onto a copy of the previous version
  latency     50 new small files/s for 60 s; per write, time until the mirror holds it
              byte-identical; p50/p99/max, vs lsyncd (default.rsync, delay = 1) measured the same way
  mixed       the latency workload while the `initial` tree is being synced; p99 of the new writes

Every volmirror run records CPU seconds (utime+stime, /proc/PID/stat) and peak RSS (VmHWM,
/proc/PID/status) of each agent, read just before it is stopped. The results go to a Markdown file
(default docs/benchmarks.md for a full run of every scenario, build/benchmarks-<scale>.md otherwise)
and, raw, to build/bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import xxhash  # noqa: E402

from tests import harness  # noqa: E402
from tests.harness import Agent, Broker, Setup  # noqa: E402

KiB, MiB, GiB = 2**10, 2**20, 2**30
ORDER = ("initial", "bigfile", "smallfiles", "scale", "delta", "latency", "mixed")
DISK_FACTOR = 3.0  # source copy + mirror copy + Kafka's copy of the stream must fit at once

FULL = {
    "initial": {"big": 1 * GiB, "files": 10_000, "dirs": 100, "min": 4 * KiB, "max": 128 * KiB},
    "bigfile": {"big": 4 * GiB},
    "smallfiles": {"files": 50_000, "dirs": 500, "min": 1 * KiB, "max": 8 * KiB},
    "scale": {"files": 200_000, "dirs": 20_000, "min": 0, "max": 300},
    "delta": {"big": 1 * GiB, "writes": 160},
    "latency": {"rate": 50, "seconds": 60, "min": 1 * KiB, "max": 4 * KiB},
}
FLOORS = {
    "initial": "≤ 1.5× rsync",
    "bigfile": "≥ 150 MiB/s",
    "smallfiles": "≥ 2,000 files/s and ≤ 2× rsync",
    "scale_cold": "≤ 3× rsync",
    "scale_warm": "≤ 30 s",
    "scale_rss": "≤ 250 MiB per agent",
    "delta": "≤ 0.33× rsync",
    "latency": "p99 ≤ 250 ms",
    "mixed": "p99 ≤ 1 s",
}


def params(scale: str) -> dict[str, dict]:
    p = json.loads(json.dumps(FULL))
    if scale == "quick":
        for sc in p.values():
            if "files" in sc:
                sc["files"] //= 10
                sc["dirs"] = max(1, sc["dirs"] // 10)
            if "big" in sc:
                sc["big"] //= 8
        p["latency"]["seconds"] = 15
    return p


# ------------------------------------------------------------------------------------------ run control
class Abort(BaseException):
    """Global budget exhausted or the run was told to stop (SIGTERM). BaseException: not a scenario failure."""


class Timeout(Exception):
    pass


BUDGET = {"s": 0}


def _on_alarm(signum, frame):  # noqa: ARG001
    raise Abort(f"global time budget of {BUDGET['s']} s exhausted")


def _on_term(signum, frame):  # noqa: ARG001
    raise Abort(f"stopped by signal {signum}")


def say(msg: str) -> None:
    print(f"bench {time.strftime('%H:%M:%S')}: {msg}", flush=True)


def sync_timeout(files: int, nbytes: int) -> float:
    """Generous bound for one volmirror sync: 100 files/s and 10 MiB/s at least, plus start-up; capped."""
    return min(3600.0, 120.0 + files / 100 + nbytes / (10 * MiB))


class Ctx:
    def __init__(self, args: argparse.Namespace, tmp: Path, bootstrap: str) -> None:
        self.args = args
        self.p = params(args.scale)
        self.tmp = tmp
        self.bootstrap = bootstrap
        self.rng = random.Random(args.seed)
        self.procs: list[Any] = []  # every Agent / lsyncd Popen started: stopped again in main's finally
        self.topics: list[str] = []
        self.drop_ok: bool | None = None
        self.drop_err = ""
        self.last_rec: dict = {}  # the last volmirror run's record, also when it failed
        self.partial: dict | None = None  # the running scenario's results so far (kept if the run is aborted)
        self.logs = REPO / "build" / "bench-logs"
        self.broker_data = ""  # the broker's data directory: finds its JVM for its CPU seconds

    def rounds(self, long: bool = False) -> int:
        if long and not self.args.long_rounds:  # scale and bigfile: one round unless asked
            return 1
        return self.args.rounds

    def topic(self, name: str) -> str:
        t = f"bench.{name}.{os.getpid()}.{len(self.topics)}"
        self.topics.append(t)
        return t

    def setup(self, base: Path, name: str) -> Setup:
        base.mkdir(parents=True, exist_ok=True)
        # the production heartbeat (5 s), not the tests' 1 s
        s = Setup(base, self.bootstrap, self.topic(name), source_extra={"heartbeat_interval": 5.0})
        s.source.log_level = "info"  # production default (harness default is debug)
        return s

    def mirror(self, s: Setup) -> Agent:
        m = s.add_mirror()
        m.log_level = "info"
        return m

    def start(self, a: Agent, wait_ready: bool = True) -> Agent:
        self.procs.append(a)
        return a.start(wait_ready=wait_ready)

    def keep_logs(self, s: Setup, tag: str) -> None:
        """Copy the agents' logs of a failed run to build/bench-logs/ (the temp dir is removed)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        for a in [s.source, *s.mirrors]:
            try:
                shutil.copy(a.log_path, self.logs / f"{tag}-{a.log_path.name}")
            except OSError:
                pass

    def drop_caches(self) -> bool:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            if self.drop_ok is None:
                self.drop_ok = True
            return True
        except OSError as e:
            self.drop_ok = False
            self.drop_err = str(e)
            return False


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    """Free the disk the stream used (Kafka removes the files ~60 s later). Failures only logged."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def go() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            doomed = [t for t in topics if t in existing]
            if doomed:
                await admin.delete_topics(doomed, timeout_ms=30000)
        finally:
            await admin.close()

    try:
        asyncio.run(asyncio.wait_for(go(), 60))
    except Exception as e:  # noqa: BLE001
        say(f"could not delete topics {topics}: {e!r}")


# ------------------------------------------------------------------------------------------ measuring
def machine_cpu(broker_data: str) -> tuple[list[int], float]:
    """The machine's CPU counters (/proc/stat, in ticks) and the broker's CPU seconds so far."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    broker = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if broker_data and broker_data.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                broker += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    return ticks, broker


def machine_delta(before: tuple[list[int], float], after: tuple[list[int], float]) -> dict:
    """CPU seconds of the whole machine between two machine_cpu() readings: busy (user, nice,
    system, irq, softirq, steal), idle, iowait, and the broker's share of busy."""
    hz = os.sysconf("SC_CLK_TCK")
    d = [(b - a) / hz for a, b in zip(before[0], after[0])]
    d += [0.0] * (8 - len(d))
    return {"busy_s": round(d[0] + d[1] + d[2] + d[5] + d[6] + d[7], 1), "idle_s": round(d[3], 1), "iowait_s": round(d[4], 1),
            "broker_s": round(after[1] - before[1], 1)}


def usage(a: Agent) -> dict:
    """CPU seconds (utime+stime) and peak RSS (VmHWM) of a running agent; read before stopping it."""
    pid = a.proc.pid if a.proc else None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        st = Path(f"/proc/{pid}/status").read_text()
        hwm = int(re.search(r"VmHWM:\s+(\d+) kB", st).group(1)) / 1024
        rss = int(re.search(r"VmRSS:\s+(\d+) kB", st).group(1)) / 1024
        return {"cpu_s": round(cpu, 2), "rss_peak_mib": round(hwm, 1), "rss_mib": round(rss, 1)}
    except (OSError, AttributeError, IndexError, ValueError) as e:
        return {"error": f"{a.kind} pid {pid}: {e}"}


def stop_timed(a: Agent) -> dict:
    """SIGTERM (SIGKILL after 30 s, harness.Agent.stop): seconds taken and exit code."""
    t = time.perf_counter()
    rc = a.stop()
    return {"stop_s": round(time.perf_counter() - t, 2), "exit": rc}


def stop_agents(ctx: Ctx, s: Setup, rec: dict | None) -> None:
    """Read CPU/RSS of each live agent into rec['agents'][kind], then stop it (time and exit code too)."""
    for a in [s.source, *s.mirrors]:
        if a.proc is not None and a.proc.poll() is None:
            u = usage(a)
            u.update(stop_timed(a))
            if rec is not None:
                rec.setdefault("agents", {})[a.kind] = u


def alive(*agents: Agent) -> Callable[[], None]:
    def check() -> None:
        for a in agents:
            if a.proc is not None and a.proc.poll() is not None:
                raise RuntimeError(f"{a.kind} agent exited with {a.proc.returncode}; log tail:\n{a.log_tail(15)}")
    return check


_buf = bytearray(8 * MiB)


def xxh(p: Path) -> str:
    h = xxhash.xxh3_128()
    mv = memoryview(_buf)
    with open(p, "rb", buffering=0) as f:
        while n := f.readinto(mv):
            h.update(mv[:n])
    return h.hexdigest()


def timed(cmd: list[str] | str, timeout: float, shell: bool = False) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, shell=shell, timeout=timeout)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{cmd if isinstance(cmd, str) else shlex.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-500:]}")
    return dt, r.stdout


def listing(root: Path, exclude: str | None = None) -> bytes:
    """Sorted listing of a tree (type, path, size, mtime to the ns, mode; dirs: mode only), made by
    find and sort in C: cheap to poll and holds no GIL."""
    r = str(root)
    prune = f"\\( -path {shlex.quote(r + '/' + exclude)} -prune \\) -o " if exclude else ""
    cmd = (f"find {shlex.quote(r)} -mindepth 1 {prune}"
           "\\( -type d -printf 'd %P %m\\n' \\) -o \\( -type f -printf 'f %P %s %T@ %m\\n' \\) -o \\( -type l -printf 'l %P %l\\n' \\)"
           " 2>/dev/null | LC_ALL=C sort")
    return subprocess.run(cmd, shell=True, capture_output=True).stdout


def content_tree(root: Path) -> dict[str, tuple]:
    """Like harness.tree, with a streamed XXH3-128 per file (for files too big to read into memory)."""
    out: dict[str, tuple] = {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = Path(dp) / n
            st = p.lstat()
            rel = os.path.relpath(p, root)
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d", st.st_mode & 0o7777)
            else:
                out[rel] = ("f", st.st_size, st.st_mode & 0o7777, st.st_mtime_ns, xxh(p))
    return out


def verify(src: Path, dst: Path, max_file: int) -> str | None:
    """None if dst is identical to src (harness tree compare: metadata and content), else a diff."""
    if max_file <= 1100 * MiB:
        a, b = harness.tree(src), harness.tree(dst)
    else:
        a, b = content_tree(src), content_tree(dst)
    return None if a == b else harness.diff(a, b)


def wait_tree(src: Path, dst: Path, t0: float, timeout: float, check: Callable[[], None] | None, max_file: int,
              want: bytes | None = None, on_equal: Callable[[], None] | None = None) -> dict:
    """Poll until dst mirrors src: listing equal (every poll), then content verified (not timed).
    Returns {'s': seconds from t0 to the poll that saw the final tree, 'poll_s': the poll interval}."""
    want = want if want is not None else listing(src)
    interval = 0.05
    while True:
        a = time.perf_counter()
        got = listing(dst)
        b = time.perf_counter()
        if got == want:
            if on_equal:
                on_equal()  # before the content check, which is not timed
            d = verify(src, dst, max_file)
            if d is None:
                return {"s": b - t0, "poll_s": round(interval, 3), "verify_s": round(time.perf_counter() - b, 2)}
            say(f"listing equal but content differs, polling on:\n{d[:800]}")
        if check:
            check()
        if time.perf_counter() - t0 > timeout:
            raise Timeout(f"mirror not identical after {timeout:.0f} s (timeout derived from the data size)")
        interval = max(0.05, 3 * (b - a))  # the poller uses at most ~1/4 of one core
        time.sleep(interval)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# ------------------------------------------------------------------------------------------ data
def random_file(p: Path, size: int) -> None:
    with open(p, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


def gen_files(root: Path, files: int, dirs: int, lo: int, hi: int, rng: random.Random) -> int:
    """`files` files of random size in [lo, hi] with random (incompressible) content spread over
    `dirs` directories; returns the bytes written."""
    root.mkdir(parents=True, exist_ok=True)
    ds = []
    for d in range(dirs):
        p = root / f"d{d:05d}"
        p.mkdir()
        ds.append(p)
    total = 0
    for i in range(files):
        n = rng.randint(lo, hi)
        with open(ds[i % dirs] / f"f{i:06d}.bin", "wb") as f:
            f.write(os.urandom(n))
        total += n
    return total


def need_disk(ctx: Ctx, nbytes: int, what: str) -> None:
    free = shutil.disk_usage(ctx.tmp).free
    if free < DISK_FACTOR * nbytes:
        raise RuntimeError(f"not enough disk for {what}: {free / GiB:.1f} GiB free under {ctx.tmp}, "
                           f"need {DISK_FACTOR:g}× {nbytes / GiB:.2f} GiB (source + mirror + Kafka log)")


class Data:
    """A generated source tree that rounds move into their fresh volume (rename: instant, keeps mtimes)."""

    def __init__(self, path: Path, files: int, nbytes: int, max_file: int) -> None:
        self.path, self.files, self.bytes, self.max_file = path, files, nbytes, max_file
        self.want = listing(path)

    def lend(self, vol: Path) -> None:
        vol.rmdir()  # the empty directory Setup made
        os.rename(self.path, vol)

    def back(self, vol: Path) -> None:
        if vol.exists() and not self.path.exists():
            os.rename(vol, self.path)


def data_initial(ctx: Ctx) -> Data:
    p = ctx.p["initial"]
    d = ctx.tmp / "data-initial"
    if not hasattr(ctx, "_initial"):
        est = p["big"] + p["files"] * (p["min"] + p["max"]) // 2
        need_disk(ctx, est, "the initial tree")
        say(f"generating the initial tree: {p['big'] / MiB:.0f} MiB file + {p['files']} files of "
            f"{p['min'] // KiB}-{p['max'] // KiB} KiB in {p['dirs']} dirs ...")
        n = gen_files(d, p["files"], p["dirs"], p["min"], p["max"], ctx.rng)
        random_file(d / "big.img", p["big"])
        os.sync()
        ctx._initial = Data(d, p["files"] + 1, n + p["big"], p["big"])
    return ctx._initial


# ------------------------------------------------------------------------------------------ cold sync runs
def volmirror_sync(ctx: Ctx, name: str, r: int, data: Data, cold: bool) -> dict:
    """One volmirror initial sync of `data` into an empty mirror: the mirror agent is running, the
    clock starts when the source agent is started and stops at the poll that sees an identical tree."""
    base = ctx.tmp / name / f"vm{r}"
    s = ctx.setup(base, name)
    m = ctx.mirror(s)
    vol = s.src["vol1"]
    rec: dict = {}
    try:
        data.lend(vol)
        ctx.start(m)
        if cold:
            rec["cold"] = ctx.drop_caches()
        cpu0 = machine_cpu(ctx.broker_data)
        t0 = time.perf_counter()
        ctx.start(s.source, wait_ready=False)
        rec.update(wait_tree(vol, s.mirror_path(), t0, sync_timeout(data.files, data.bytes), alive(s.source, m),
                             data.max_file, data.want, on_equal=lambda: rec.update(machine=machine_delta(cpu0, machine_cpu(ctx.broker_data)))))
        return rec
    except Exception:
        ctx.keep_logs(s, f"{name}-r{r}")
        raise
    finally:
        stop_agents(ctx, s, rec)
        ctx.last_rec = rec
        data.back(vol)
        shutil.rmtree(base, ignore_errors=True)
        delete_topics(ctx.bootstrap, [s.topic, s.topic + ".control"])


def rsync_copy(ctx: Ctx, name: str, r: int, data: Data, cold: bool) -> float:
    dst = ctx.tmp / name / f"rsync{r}"
    dst.mkdir(parents=True)
    try:
        if cold:
            ctx.drop_caches()
        t, _ = timed(["rsync", "-a", f"{data.path}/", f"{dst}/"], timeout=sync_timeout(data.files, data.bytes))
        if listing(dst) != data.want:
            raise RuntimeError("rsync's copy differs from the source")
        return t
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def read_all(ctx: Ctx, data: Data, cold: bool) -> float:
    if cold:
        ctx.drop_caches()
    t, _ = timed(f"find {shlex.quote(str(data.path))} -type f -print0 | xargs -0 cat > /dev/null", timeout=3600, shell=True)
    return t


def warm(data: Data) -> None:
    subprocess.run(f"find {shlex.quote(str(data.path))} -type f -print0 | xargs -0 cat > /dev/null", shell=True)


def sync_rounds(ctx: Ctx, name: str, data: Data, rounds: int, cold: bool, floor: bool) -> dict:
    """Rounds of volmirror sync, rsync -a and (optionally) the read-everything floor, same data."""
    res: dict = {"rounds": rounds, "cold": cold, "files": data.files, "bytes": data.bytes, "vm": [], "rsync_s": [], "read_s": [], "errors": []}
    ctx.partial = res
    for r in range(rounds):
        if not res["errors"]:  # a volmirror failure (timeout) is not repeated every round
            say(f"{name} round {r + 1}/{rounds}: volmirror ...")
            if not cold:
                warm(data)
            try:
                rec = volmirror_sync(ctx, name, r, data, cold)
                res["vm"].append(rec)
                say(f"{name}: volmirror {rec['s']:.2f} s, agents {rec.get('agents')}")
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"volmirror: {e}".splitlines()[0][:300])
                res["vm_failed"] = ctx.last_rec  # agents' CPU / RSS when it was given up
                say(f"{name}: volmirror FAILED: {e}")
        say(f"{name} round {r + 1}/{rounds}: rsync -a ...")
        if not cold:
            warm(data)
        res["rsync_s"].append(rsync_copy(ctx, name, r, data, cold))
        if floor:
            if not cold:
                warm(data)
            res["read_s"].append(read_all(ctx, data, cold))
        say(f"{name}: rsync {res['rsync_s'][-1]:.2f} s" + (f", read {res['read_s'][-1]:.2f} s" if floor else ""))
    return res


def sc_initial(ctx: Ctx) -> dict:
    data = data_initial(ctx)
    return sync_rounds(ctx, "initial", data, ctx.rounds(), cold=False, floor=True)


def sc_bigfile(ctx: Ctx) -> dict:
    p = ctx.p["bigfile"]
    need_disk(ctx, p["big"], "bigfile")
    d = ctx.tmp / "data-bigfile"
    d.mkdir()
    say(f"bigfile: generating {p['big'] / GiB:.2f} GiB ...")
    random_file(d / "big.img", p["big"])
    os.sync()
    data = Data(d, 1, p["big"], p["big"])
    try:
        return {**sync_rounds(ctx, "bigfile", data, ctx.rounds(long=True), cold=True, floor=True), "long": not ctx.args.long_rounds}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def sc_smallfiles(ctx: Ctx) -> dict:
    p = ctx.p["smallfiles"]
    need_disk(ctx, p["files"] * 8 * KiB, "smallfiles")  # 4 KiB blocks: every file uses 4 or 8 KiB
    d = ctx.tmp / "data-smallfiles"
    say(f"smallfiles: generating {p['files']} files in {p['dirs']} dirs ...")
    n = gen_files(d, p["files"], p["dirs"], p["min"], p["max"], ctx.rng)
    os.sync()
    data = Data(d, p["files"], n, p["max"])
    try:
        return {**sync_rounds(ctx, "smallfiles", data, ctx.rounds(), cold=True, floor=False), "dirs": p["dirs"]}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def sc_scale(ctx: Ctx) -> dict:
    p = ctx.p["scale"]
    need_disk(ctx, p["files"] * 4 * KiB + p["dirs"] * 4 * KiB, "scale")
    d = ctx.tmp / "data-scale"
    say(f"scale: generating {p['files']} files in {p['dirs']} dirs ...")
    n = gen_files(d, p["files"], p["dirs"], p["min"], p["max"], ctx.rng)
    os.sync()
    data = Data(d, p["files"], n, p["max"])
    rounds = ctx.rounds(long=True)
    res: dict = {"rounds": rounds, "cold": True, "files": data.files, "dirs": p["dirs"], "bytes": data.bytes, "vm": [], "rsync_s": [],
                 "errors": [], "long": not ctx.args.long_rounds}
    ctx.partial = res
    try:
        for r in range(rounds):
            if not res["errors"]:
                say(f"scale round {r + 1}/{rounds}: volmirror cold sync, then warm restart ...")
                try:
                    rec = scale_round(ctx, r, data)
                    res["vm"].append(rec)
                    say(f"scale: {rec}")
                except Exception as e:  # noqa: BLE001
                    res["errors"].append(f"volmirror: {e}".splitlines()[0][:300])
                    res["vm_failed"] = ctx.last_rec
                    say(f"scale: volmirror FAILED: {e}")
            say(f"scale round {r + 1}/{rounds}: rsync -a ...")
            res["rsync_s"].append(rsync_copy(ctx, "scale", r, data, cold=True))
            say(f"scale: rsync {res['rsync_s'][-1]:.2f} s")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return res


def scale_round(ctx: Ctx, r: int, data: Data) -> dict:
    base = ctx.tmp / "scale" / f"vm{r}"
    s = ctx.setup(base, "scale")
    m = ctx.mirror(s)
    vol = s.src["vol1"]
    rec: dict = {}
    edited: tuple[Path, bytes, int] | None = None
    try:
        data.lend(vol)
        ctx.start(m)
        rec["cold"] = ctx.drop_caches()
        cpu0 = machine_cpu(ctx.broker_data)
        t0 = time.perf_counter()
        ctx.start(s.source, wait_ready=False)
        rec.update(wait_tree(vol, s.mirror_path(), t0, sync_timeout(data.files, data.bytes), alive(s.source, m),
                             data.max_file, data.want, on_equal=lambda: rec.update(machine=machine_delta(cpu0, machine_cpu(ctx.broker_data)))))
        say(f"scale: cold sync {rec['s']:.1f} s; stopping the source, editing one file, restarting it ...")
        # warm restart: stop the source, edit one file while it is down, start it again
        rec["source_cold"] = usage(s.source)
        rec["source_cold"].update(stop_timed(s.source))
        files = sorted((vol / "d00000").iterdir())
        f = ctx.rng.choice(files)
        st = f.stat()
        new = os.urandom(200)
        edited = (f, f.read_bytes(), st.st_mtime_ns)
        with open(f, "wb") as fh:
            fh.write(new)
        mf = s.mirror_path() / f.relative_to(vol)
        t0 = time.perf_counter()
        ctx.start(s.source, wait_ready=False)
        check = alive(s.source, m)
        limit = max(120.0, data.files / 500)
        while True:
            try:
                if mf.read_bytes() == new:
                    rec["warm_s"] = time.perf_counter() - t0
                    break
            except FileNotFoundError:
                pass
            check()
            if time.perf_counter() - t0 > limit:
                raise Timeout(f"warm restart: the edit was not on the mirror after {limit:.0f} s")
            time.sleep(0.02)
        rec["warm_converged"] = wait_tree(vol, s.mirror_path(), time.perf_counter(), 300, check, data.max_file)["s"]
        return rec
    except Exception:
        ctx.keep_logs(s, f"scale-r{r}")
        raise
    finally:
        stop_agents(ctx, s, rec)
        if "source_cold" in rec:  # the first source process is gone: its figures were read before it stopped
            rec.setdefault("agents", {})["source_warm"] = rec["agents"].pop("source", {})
            rec["agents"]["source"] = rec.pop("source_cold")
        ctx.last_rec = rec
        if edited:  # restore the file, so every round and rsync see the same data
            f, old, mtime = edited
            f.write_bytes(old)
            os.utime(f, ns=(mtime, mtime))
        data.back(vol)
        shutil.rmtree(base, ignore_errors=True)
        delete_topics(ctx.bootstrap, [s.topic, s.topic + ".control"])


# ------------------------------------------------------------------------------------------ delta
def wait_second_rollover(p: Path) -> None:
    """rsync's quick check compares size and mtime to the second: a same-size edit within the same
    second as the previous version would be skipped. Edit in a later second."""
    m = os.stat(p).st_mtime
    while time.time() < int(m) + 1.02:
        time.sleep(0.02)


def sc_delta(ctx: Ctx) -> dict:
    p = ctx.p["delta"]
    need_disk(ctx, p["big"] * 4 // 3, "delta")
    rounds = ctx.rounds()
    res: dict = {"rounds": rounds, "bytes": p["big"], "writes": p["writes"], "vm": [], "rsync_s": [], "rsync_sent": [], "errors": []}
    ctx.partial = res
    base = ctx.tmp / "delta"
    s = ctx.setup(base, "delta")
    m = ctx.mirror(s)
    vol = s.src["vol1"]
    big = vol / "big.img"
    say(f"delta: generating {p['big'] / MiB:.0f} MiB and mirroring it ...")
    random_file(big, p["big"])
    rs = base / "rsync-dst"
    rs.mkdir()
    rec_agents: dict = {}
    try:
        ctx.start(m)
        ctx.start(s.source)
        check = alive(s.source, m)
        res["initial_s"] = wait_tree(vol, s.mirror_path(), time.perf_counter(), sync_timeout(1, p["big"]), check, p["big"])["s"]
        # the rounds start from a settled mirror: its first restore point comes after the initial sync
        # and makes it durable (without this wait, round 1 paid for flushing the initial GiB)
        settle = time.monotonic() + 60  # (without restore points, source.point_interval = 0: no wait beyond this)
        while m.metric("volmirror_mirror_points_total", volume="vol1") < 1 and time.monotonic() < settle:
            time.sleep(0.2)
        shutil.copy2(big, rs / "big.img")  # rsync's destination holds the previous version
        os.sync()  # setup's dirty GiB written now: the mirror's syncfs would otherwise flush it inside round 1
        mfile = s.mirror_path() / "big.img"
        nblk = p["big"] // (4 * KiB)
        fd_m = None
        for r in range(rounds):
            harness.wait_for(lambda: not s.source.status()["volumes"]["vol1"].get("pending_files"), 60, "source idle")
            time.sleep(1.0)
            wait_second_rollover(big)
            offs = [ctx.rng.randrange(nblk) * 4 * KiB for _ in range(p["writes"])]
            fd = os.open(big, os.O_RDWR)
            try:
                for off in offs:
                    os.pwrite(fd, os.urandom(4 * KiB), off)
            finally:
                os.close(fd)
            t_end = time.perf_counter()  # the clock runs from the last write
            fd = os.open(big, os.O_RDONLY)
            try:
                want = [(off, os.pread(fd, 4 * KiB, off)) for off in sorted(set(offs))]
            finally:
                os.close(fd)
            lat = None
            try:
                while True:  # the written regions first (cheap), then the whole file, once
                    fd_m = os.open(mfile, os.O_RDONLY)
                    try:
                        ok = all(os.pread(fd_m, 4 * KiB, off) == data for off, data in want)
                    finally:
                        os.close(fd_m)
                    now = time.perf_counter()
                    if ok and lat is None:
                        lat = now - t_end
                        if xxh(mfile) == xxh(big):
                            break
                        say("delta: written regions match but the file differs; polling the whole file")
                        lat = None
                    check()
                    if now - t_end > 120:
                        raise Timeout("mirror file not identical 120 s after the writes")
                    time.sleep(0.005)
                res["vm"].append({"s": lat})
                say(f"delta round {r + 1}/{rounds}: volmirror {lat:.3f} s")
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"volmirror: {e}".splitlines()[0][:300])
                say(f"delta: volmirror FAILED: {e}")
                break
            t, out = timed(["rsync", "-a", "--no-whole-file", "--inplace", "--stats", str(big), str(rs / "big.img")], timeout=600)
            if xxh(rs / "big.img") != xxh(big):
                raise RuntimeError("rsync left its copy stale (quick check skipped the edit?)")
            res["rsync_s"].append(t)
            sent = re.search(r"Total bytes sent: ([\d,.]+)", out)
            res["rsync_sent"].append(int(re.sub(r"[^\d]", "", sent.group(1))) if sent else None)
            say(f"delta round {r + 1}/{rounds}: rsync {t:.3f} s")
        return res
    except Exception:
        ctx.keep_logs(s, "delta")
        raise
    finally:
        stop_agents(ctx, s, rec_agents)
        res["agents"] = rec_agents.get("agents", {})
        shutil.rmtree(base, ignore_errors=True)
        delete_topics(ctx.bootstrap, [s.topic, s.topic + ".control"])


# ------------------------------------------------------------------------------------------ latency
def workload(ctx: Ctx, src: Path, dst: Path, seconds: float, drain: float, check: Callable[[], None]) -> dict:
    """`rate` new small files per second written into src for `seconds`; per write, seconds from its
    close() until dst holds it byte-identical (polled every 5 ms: a listing of dst, then the pending
    files present are read and compared). Writes not there `drain` s after the last write count as lost."""
    p = ctx.p["latency"]
    rate = p["rate"]
    n = int(rate * seconds)
    sizes = [ctx.rng.randint(p["min"], p["max"]) for _ in range(n)]
    lock = threading.Lock()
    pending: dict[int, tuple[str, bytes, float]] = {}
    issued = [0.0] * n
    lat: list[float | None] = [None] * n
    stop = threading.Event()
    err: list[BaseException] = []

    def writer() -> None:
        try:
            start = time.perf_counter() + 0.1
            for i in range(n):
                wait = start + i / rate - time.perf_counter()
                if wait > 0 and stop.wait(wait):
                    return
                data = os.urandom(sizes[i])
                name = f"w{i:05d}.dat"
                with open(src / name, "wb") as f:
                    f.write(data)
                t = time.perf_counter()
                issued[i] = t
                with lock:
                    pending[i] = (name, data, t)
        except BaseException as e:  # noqa: BLE001
            err.append(e)

    th = threading.Thread(target=writer, name="bench-writer", daemon=True)
    t_start = time.perf_counter()
    th.start()
    try:
        last_write = None
        while True:
            a = time.perf_counter()
            with lock:
                items = list(pending.items())
            try:
                present = set(os.listdir(dst)) if items else set()
            except FileNotFoundError:
                present = set()
            for i, (name, data, t) in items:
                if name not in present:
                    continue
                try:
                    with open(dst / name, "rb") as f:
                        same = f.read() == data
                except FileNotFoundError:
                    same = False
                if same:
                    lat[i] = time.perf_counter() - t
                    with lock:
                        del pending[i]
            if err:
                raise RuntimeError(f"writer failed: {err[0]!r}")
            if not th.is_alive():
                last_write = last_write or time.perf_counter()
                with lock:
                    if not pending:
                        break
                if time.perf_counter() - last_write > drain:
                    break
            check()
            # 5 ms, or longer if a big backlog of pending writes makes a pass costly (<= ~1/4 of a core)
            time.sleep(max(0.005, 3 * (time.perf_counter() - a)))
    finally:
        stop.set()
        th.join(5)
    got = [x for x in lat if x is not None]
    lost = n - len(got)
    full = got + [math.inf] * lost
    return {"writes": n, "lost": lost, "drain_s": drain, "lat": got, "issued": [x - t_start for x in issued],
            "lat_all": lat, "t_start": t_start,
            "p50": pct(full, 50) if full else None, "p99": pct(full, 99) if full else None, "max": max(full) if full else None}


def lsyncd_run(ctx: Ctx, base: Path, seconds: float) -> dict:
    src, dst = base / "lsrc", base / "ldst"
    (src / "live").mkdir(parents=True)
    dst.mkdir()
    log, cfg = base / "lsyncd.log", base / "lsyncd.lua"
    cfg.write_text(
        "settings { nodaemon = true, insist = false }\n"
        f'sync {{ default.rsync, source = "{src}", target = "{dst}", delay = 1 }}\n'
    )
    with open(log, "wb") as lf:
        p = subprocess.Popen(["lsyncd", str(cfg)], stdout=lf, stderr=lf, start_new_session=True)
    ctx.procs.append(p)

    def check() -> None:
        if p.poll() is not None:
            raise RuntimeError(f"lsyncd exited with {p.returncode}: {log.read_text(errors='replace')[-500:]}")

    try:
        harness.wait_for(lambda: (check() or True) and re.search(r"Startup of .* finished", log.read_text(errors="replace")),
                         60, "lsyncd startup")
        harness.wait_for(lambda: (dst / "live").is_dir(), 30, "lsyncd startup copy")
        return workload(ctx, src / "live", dst / "live", seconds, 60, check)
    finally:
        stop_popen(p)


def stop_popen(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        except ProcessLookupError:
            pass


def sc_latency(ctx: Ctx) -> dict:
    seconds = ctx.p["latency"]["seconds"]
    base = ctx.tmp / "latency"
    s = ctx.setup(base, "latency")
    m = ctx.mirror(s)
    vol = s.src["vol1"]
    (vol / "live").mkdir()
    res: dict = {"rate": ctx.p["latency"]["rate"], "seconds": seconds, "errors": []}
    ctx.partial = res
    rec: dict = {}
    try:
        ctx.start(s.source)
        ctx.start(m)
        check = alive(s.source, m)
        harness.wait_for(lambda: (s.mirror_path() / "live").is_dir(), 60, "mirror holds the empty volume")
        say(f"latency: volmirror, {res['rate']} writes/s for {seconds} s ...")
        w = workload(ctx, vol / "live", s.mirror_path() / "live", seconds, 30, check)
        res["vm"] = {k: v for k, v in w.items() if k not in ("lat_all", "issued", "t_start")}
        say(f"latency: volmirror p50 {w['p50']:.3f} p99 {w['p99']:.3f} max {w['max']:.3f} lost {w['lost']}")
        wait_tree(vol, s.mirror_path(), time.perf_counter(), 60, check, 8 * KiB)
    except Exception as e:  # noqa: BLE001
        ctx.keep_logs(s, "latency")
        res["errors"].append(f"volmirror: {e}".splitlines()[0][:300])
        say(f"latency: volmirror FAILED: {e}")
    finally:
        stop_agents(ctx, s, rec)
        res["agents"] = rec.get("agents", {})
        delete_topics(ctx.bootstrap, [s.topic, s.topic + ".control"])
    if shutil.which("lsyncd") is None:
        res["errors"].append("lsyncd: not installed (make bench installs it)")
        return res
    say(f"latency: lsyncd (delay = 1), {res['rate']} writes/s for {seconds} s ...")
    try:
        w = lsyncd_run(ctx, base, seconds)
        res["lsyncd"] = {k: v for k, v in w.items() if k not in ("lat_all", "issued", "t_start")}
        say(f"latency: lsyncd p50 {w['p50']:.3f} p99 {w['p99']:.3f} max {w['max']:.3f} lost {w['lost']}")
    except Exception as e:  # noqa: BLE001
        res["errors"].append(f"lsyncd: {e}".splitlines()[0][:300])
        say(f"latency: lsyncd FAILED: {e}")
    return res


def sc_mixed(ctx: Ctx) -> dict:
    data = data_initial(ctx)
    seconds = ctx.p["latency"]["seconds"]
    base = ctx.tmp / "mixed"
    s = ctx.setup(base, "mixed")
    m = ctx.mirror(s)
    vol = s.src["vol1"]
    res: dict = {"rate": ctx.p["latency"]["rate"], "seconds": seconds, "files": data.files, "bytes": data.bytes, "errors": []}
    ctx.partial = res
    rec: dict = {}
    done: dict[str, float] = {}
    stop = threading.Event()
    try:
        warm(data)
        data.lend(vol)
        (vol / "live").mkdir()
        ctx.start(m)
        t0 = time.perf_counter()
        ctx.start(s.source, wait_ready=True)
        check = alive(s.source, m)
        res["source_ready_s"] = time.perf_counter() - t0

        def backlog_watch() -> None:  # when did the mirror hold the whole initial tree? (find+sort: no GIL)
            while not stop.is_set():
                if listing(s.mirror_path(), exclude="live") == data.want:
                    done["t"] = time.perf_counter()
                    return
                stop.wait(1.0)

        watcher = threading.Thread(target=backlog_watch, name="bench-backlog", daemon=True)
        watcher.start()
        say(f"mixed: {res['rate']} writes/s for {seconds} s while the initial tree ({data.bytes / MiB:.0f} MiB) syncs ...")
        w = workload(ctx, vol / "live", s.mirror_path() / "live", seconds, sync_timeout(data.files, data.bytes), check)
        res["vm"] = {k: v for k, v in w.items() if k not in ("lat_all", "issued", "t_start")}
        wt = wait_tree(vol, s.mirror_path(), t0, sync_timeout(data.files, data.bytes), check, data.max_file)
        res["initial_s"] = wt["s"]
        stop.set()
        watcher.join(10)
        t_done = done.get("t")
        res["backlog_done_s"] = (t_done - t0) if t_done else None
        # writes issued while the backlog was still being synced (all of them if it outlasted the workload)
        cut = (t_done - w["t_start"]) if t_done else math.inf
        during = [x if x is not None else math.inf for x, t in zip(w["lat_all"], w["issued"]) if t < cut]
        res["during_backlog"] = {"writes": len(during), "p50": pct(during, 50) if during else None,
                                 "p99": pct(during, 99) if during else None, "max": max(during) if during else None}
        say(f"mixed: p99 {w['p99']:.3f} s over {w['writes']} writes ({len(during)} during the backlog, p99 "
            f"{res['during_backlog']['p99']}); initial tree synced after {res['backlog_done_s']} s")
    except Exception as e:  # noqa: BLE001
        ctx.keep_logs(s, "mixed")
        res["errors"].append(f"volmirror: {e}".splitlines()[0][:300])
        say(f"mixed: volmirror FAILED: {e}")
    finally:
        stop.set()
        stop_agents(ctx, s, rec)
        res["agents"] = rec.get("agents", {})
        shutil.rmtree(vol / "live", ignore_errors=True)
        data.back(vol)
        shutil.rmtree(base, ignore_errors=True)
        delete_topics(ctx.bootstrap, [s.topic, s.topic + ".control"])
    return res


SCENARIOS: dict[str, Callable[[Ctx], dict]] = {
    "initial": sc_initial, "bigfile": sc_bigfile, "smallfiles": sc_smallfiles, "scale": sc_scale,
    "delta": sc_delta, "latency": sc_latency, "mixed": sc_mixed,
}


# ------------------------------------------------------------------------------------------ report
def f_s(x: float | None) -> str:
    if x is None:
        return "–"
    if math.isinf(x):
        return "∞ (lost)"
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def f_ms(x: float | None) -> str:
    if x is None:
        return "–"
    return "∞ (lost)" if math.isinf(x) else f"{x * 1000:.0f} ms"


def verdict(ok: bool | None, why: str = "") -> str:
    if ok is None:
        return "FAIL" + (f": {why}" if why else "")
    return "PASS" if ok else "FAIL" + (f": {why}" if why else "")


def agent_rows(runs: list[dict]) -> list[str]:
    """CPU seconds (median over runs) and peak RSS (max over runs) per agent process."""
    kinds: dict[str, dict[str, list]] = {}
    for r in runs:
        for kind, u in (r or {}).items():
            if "cpu_s" in u:
                k = kinds.setdefault(kind, {"cpu": [], "rss": []})
                k["cpu"].append(u["cpu_s"])
                k["rss"].append(u["rss_peak_mib"])
    label = {"source": "source", "mirror": "mirror", "source_warm": "source (warm restart process)"}
    return [f"| {label.get(k, k)} | {med(v['cpu']):.1f} | {max(v['rss']):.0f} MiB |" for k, v in kinds.items()]


def agents_table(runs: list[dict], failed: dict | None = None) -> list[str]:
    out = []
    rows = agent_rows(runs)
    if rows:
        out += ["| agent process | CPU seconds (utime+stime, median) | peak RSS (VmHWM, max) |", "|---|---|---|", *rows]
    else:
        out.append("Agent CPU / RSS: not measured (no volmirror run completed).")
    if failed and failed.get("agents"):
        out += ["", "The failed volmirror run, read when it was given up: " + ", ".join(
            f"{k} {u['cpu_s']:.1f} CPU s, peak RSS {u['rss_peak_mib']:.0f} MiB" for k, u in failed["agents"].items() if "cpu_s" in u) + "."]
    return out


def machine_line(runs: list[dict]) -> list[str]:
    """The whole machine's CPU over the timed syncs (medians): what the floor's budget is spent on."""
    ms = [(r["machine"], r["s"]) for r in runs if r.get("machine") and r.get("s")]
    if not ms:
        return []
    n = os.cpu_count() or 1
    m = {k: med([x[k] for x, _ in ms]) for k in ("busy_s", "idle_s", "iowait_s", "broker_s")}
    return ["", f"Whole machine over the timed sync (medians of {len(ms)}): {m['busy_s']:.1f} CPU s busy of "
                f"{n} × {med([t for _, t in ms]):.1f} s, of which the broker {m['broker_s']:.1f}; idle {m['idle_s']:.1f}, "
                f"iowait {m['iowait_s']:.1f} (`/proc/stat`; busy = user, nice, system, irq, softirq, steal)."]


def first_err(res: dict, who: str = "volmirror") -> str:
    for e in res.get("errors", []):
        if e.startswith(who):
            return e.split(": ", 1)[1]
    return ""


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def per(amount: float, t: float | None, unit: str) -> str:
    return "–" if not t else f"{amount / t:,.0f} {unit}"


def f_r(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def summarize(name: str, res: dict) -> tuple[list[str], list[dict]]:
    """Markdown lines and floor rows for one scenario's results."""
    H = ["| measure | volmirror | baseline | ratio (volmirror / baseline) | floor | result |", "|---|---|---|---|---|---|"]
    floors: list[dict] = []
    L: list[str] = []

    def floor(measure: str, vm: str, base: str, rat: str, fl: str, ok: bool | None, why: str = "") -> None:
        floors.append({"scenario": name, "measure": measure, "floor": fl, "pass": bool(ok), "why": "" if ok else why})
        L.append(f"| {measure} | {vm} | {base} | {rat} | {fl} | {verdict(ok, why)} |")

    if "error" in res:
        L.append(f"FAIL: {res['error']}")
        floors.append({"scenario": name, "measure": "scenario", "floor": "", "pass": False, "why": res["error"]})
        return L, floors
    err = first_err(res)
    if name in ("initial", "bigfile", "smallfiles"):
        vm = med([r["s"] for r in res["vm"]])
        rs = med(res["rsync_s"])
        rd = med(res["read_s"]) if res.get("read_s") else None
        mib = res["bytes"] / MiB
        done = len(res["vm"])
        L += [f"Rounds: {res['rounds']} (medians" + (f"; volmirror completed {done}" if done != res["rounds"] else "")
              + ("; a long scenario: one round unless --long-rounds" if res.get("long") else "") + ")"
              + f"; {res['files']:,} file{'s' if res['files'] != 1 else ''}" + (f" in {res['dirs']:,} directories" if "dirs" in res else "")
              + f", {mib:,.0f} MiB; "
              + ("cold: page cache dropped before every run." if res["cold"] else "warm: the tree was read once before every run."), ""]
        L += H
        why = err or "no volmirror run completed"
        if name == "initial":
            r = ratio(vm, rs)
            floor("time to identical tree", f"{f_s(vm)} ({mib / vm:.0f} MiB/s)" if vm else "–",
                  f"rsync -a: {f_s(rs)} ({per(mib, rs, 'MiB/s')})", f_r(r), FLOORS["initial"], r is not None and r <= 1.5,
                  why if r is None else f"{r:.2f}× rsync")
            L.append(f"| read-everything floor | {f_s(vm)} | cat of every file: {f_s(rd)} | {f_r(ratio(vm, rd))} | – | – |")
        elif name == "bigfile":
            rate = mib / vm if vm else None
            floor("throughput", f"{rate:.0f} MiB/s ({f_s(vm)})" if rate else "–", f"rsync -a: {per(mib, rs, 'MiB/s')} ({f_s(rs)})",
                  f_r(ratio(vm, rs)) + " of the time", FLOORS["bigfile"], rate is not None and rate >= 150,
                  why if rate is None else f"{rate:.0f} MiB/s")
            L.append(f"| read floor | {f'{rate:.0f} MiB/s' if rate else '–'} | cat: {per(mib, rd, 'MiB/s')} ({f_s(rd)}) | "
                     f"{f_r(ratio(vm, rd))} of the time | – | – |")
        else:
            fps = res["files"] / vm if vm else None
            r = ratio(vm, rs)
            ok = fps is not None and fps >= 2000 and r is not None and r <= 2
            floor("files/s (time)", f"{fps:,.0f} files/s ({f_s(vm)})" if fps else "–",
                  f"rsync -a: {per(res['files'], rs, 'files/s')} ({f_s(rs)})", f_r(r), FLOORS["smallfiles"], ok,
                  why if fps is None else ("" if ok else f"{fps:,.0f} files/s, {r:.2f}× rsync"))
        L += ["", *agents_table([r.get("agents") for r in res["vm"]], res.get("vm_failed")), *machine_line(res["vm"])]
        if res["vm"]:
            L.append("")
            L.append(f"Poll interval at the end of the volmirror runs: {polls(res)} "
                     "(the figure is the first poll that saw the identical tree).")
    elif name == "scale":
        vm = med([r["s"] for r in res["vm"]])
        rs = med(res["rsync_s"])
        warm_ = med([r["warm_s"] for r in res["vm"] if "warm_s" in r])
        L += [f"Rounds: {res['rounds']}" + (" (a long scenario: one round unless --long-rounds)" if res.get("long") else "")
              + f"; {res['files']:,} files in {res['dirs']:,} directories, {res['bytes'] / MiB:.1f} MiB; cold.", ""]
        L += H
        why = err or "no volmirror run completed"
        r = ratio(vm, rs)
        floor("cold sync", f"{f_s(vm)} ({res['files'] / vm:,.0f} files/s)" if vm else "–",
              f"rsync -a: {f_s(rs)} ({per(res['files'], rs, 'files/s')})", f_r(r), FLOORS["scale_cold"], r is not None and r <= 3,
              why if r is None else f"{r:.1f}× rsync")
        floor("warm restart, one edit made while the source was down: time to mirror", f_s(warm_), "–", "–", FLOORS["scale_warm"],
              warm_ is not None and warm_ <= 30, first_err(res) or "not measured" if warm_ is None else f_s(warm_))
        rss = {}
        for rr in res["vm"]:
            for k, u in rr.get("agents", {}).items():
                if "rss_peak_mib" in u:
                    rss[k] = max(rss.get(k, 0), u["rss_peak_mib"])
        worst = max(rss.values()) if rss else None
        floor("peak RSS", ", ".join(f"{k} {v:.0f} MiB" for k, v in rss.items()) or "–", "–", "–", FLOORS["scale_rss"],
              worst is not None and worst <= 250 and len(rss) >= 3,
              why if worst is None else f"{worst:.0f} MiB" if worst > 250 else "not every agent process was measured")
        L += ["", *agents_table([x.get("agents") for x in res["vm"]], res.get("vm_failed")), *machine_line(res["vm"])]
        if res["vm"]:
            L += ["", "The source's cold figures are from the first source process (read just before it was stopped for the "
                  "restart); the warm-restart process is listed separately. The mirror ran throughout. Poll interval at the end "
                  f"of the cold sync: {polls(res)}."]
    elif name == "delta":
        vm = med([r["s"] for r in res["vm"]])
        rs = med(res["rsync_s"])
        n = len(res["vm"])
        L += [f"Rounds: {n} (medians); {res['writes']} random 4 KiB writes (4 KiB-aligned) per round in a "
              f"{res['bytes'] / MiB:.0f} MiB file; page cache warm.", ""]
        L += H
        r = ratio(vm, rs)
        floor("last write → byte-identical copy", f"{f_s(vm)} (max {f_s(max(x['s'] for x in res['vm']))})" if vm else "–",
              f"rsync -a --no-whole-file --inplace: {f_s(rs)}", f_r(r), FLOORS["delta"], r is not None and r <= 0.33,
              (err or "no volmirror round completed") if r is None else f"{r:.2f}× rsync")
        sent = [x for x in res.get("rsync_sent", []) if x]
        if sent:
            L += ["", f"rsync sent {med(sent) / MiB:.2f} MiB per round (median, `--stats`)."]
        L += ["", *agents_table([res.get("agents")])]
        L += ["", "The volmirror figure runs from the end of the last `pwrite` until the written regions read back identical "
              "from the mirror file (polled every 5 ms); each round then checks the whole file (XXH3-128) before counting it. "
              "rsync's figure is the command alone, started when the edit is known."]
    elif name in ("latency", "mixed"):
        v = res.get("vm")
        L += [f"{res['rate']} new files of 1–4 KiB per second for {res['seconds']} s; per write, time from its close() "
              "until the mirror holds it byte-identical (polled every 5 ms or, with many writes pending, less often).", ""]
        L += H
        why = err or "not measured"
        if name == "latency":
            b = res.get("lsyncd")
            bwhy = first_err(res, "lsyncd")

            def cell(w: dict | None, k: str) -> str:
                return f_ms(w[k]) if w else "–"

            for k in ("p50", "max"):
                L.append(f"| {k} | {cell(v, k)} | lsyncd: {cell(b, k) if b else 'FAIL: ' + bwhy} | "
                         f"{f_r(ratio(v and v[k], b and b[k]))} | – | – |")
            floor("p99", cell(v, "p99"), f"lsyncd: {cell(b, 'p99') if b else 'FAIL: ' + bwhy}", f_r(ratio(v and v["p99"], b and b["p99"])),
                  FLOORS["latency"], v is not None and v["p99"] <= 0.25, why if v is None else f"{v['p99'] * 1000:.0f} ms")
            L += ["", f"Writes: volmirror {v['writes'] if v else '–'} ({v['lost'] if v else '–'} not mirrored within "
                  f"{v['drain_s'] if v else '–'} s), lsyncd {b['writes'] if b else '–'} ({b['lost'] if b else '–'} lost). "
                  "lsyncd (default.rsync, `delay = 1`) ran after the volmirror agents had stopped, on its own directories."]
            L += ["", *agents_table([res.get("agents")])]
        else:
            d = res.get("during_backlog") or {}
            use = d if d.get("writes") else v
            floor("p99 of the new writes (made while the initial sync ran)", f_ms(use["p99"]) if use else "–",
                  "–", "–", FLOORS["mixed"], use is not None and use["p99"] <= 1.0,
                  why if use is None else f"{use['p99'] * 1000:.0f} ms" if not math.isinf(use["p99"]) else "writes lost")
            if v:
                L.append(f"| p50 / max of the new writes | {f_ms(use['p50'])} / {f_ms(use['max'])} | – | – | – | – |")
                L.append(f"| p99 of all {v['writes']} writes | {f_ms(v['p99'])} | – | – | – | – |")
            bd = res.get("backlog_done_s")
            L += ["", f"Initial tree: {res['files']:,} files, {res['bytes'] / MiB:,.0f} MiB (the `initial` data). The source agent was "
                  f"ready {res.get('source_ready_s', 0):.1f} s after its start, when the writes began; the mirror held the whole "
                  f"initial tree {f_s(bd) if bd else '(not seen)'} after the start, the tree with the new files "
                  f"{f_s(res.get('initial_s'))} after it. {d.get('writes', 0)} of {v['writes'] if v else '–'} writes "
                  "were made while the initial tree was still incomplete on the mirror"
                  + ("; the floor uses those." if d.get("writes") else "; none were, so the floor uses all writes.")]
            L += ["", *agents_table([res.get("agents")])]
    for e in res.get("errors", []):
        L += ["", f"FAIL: {e}"]
    if res.get("aborted"):
        floors.append({"scenario": name, "measure": "scenario completed", "floor": "", "pass": False, "why": res["aborted"]})
        L += ["", f"FAIL: {res['aborted']} (figures above are from the part that ran)"]
    return L, floors


def iter_agents(res: dict):
    runs = res.get("vm") if isinstance(res.get("vm"), list) else [res]
    for r in runs:
        for k, u in (r.get("agents") or {}).items():
            yield k, u


def polls(res: dict) -> str:
    return ", ".join(f"{r['poll_s']:.2f} s" for r in res["vm"])


def clean(o: Any) -> Any:
    """JSON without Infinity: lost writes are recorded as the string 'inf'."""
    if isinstance(o, float) and (math.isinf(o) or math.isnan(o)):
        return str(o)
    if isinstance(o, dict):
        return {str(k): clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean(v) for v in o]
    return o


def machine(tmp: Path) -> dict:
    mem = next(int(x.split()[1]) for x in open("/proc/meminfo") if x.startswith("MemTotal:")) / 2**20
    kafka = re.search(r"<kafka.version>(.*)</kafka.version>", (REPO / "deploy/kafka/pom.xml").read_text()).group(1)
    rsync_v = re.search(r"version\s+(\S+)", subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout)
    lsyncd_v = None
    if shutil.which("lsyncd"):
        lsyncd_v = subprocess.run(["lsyncd", "--version"], capture_output=True, text=True).stdout.strip().replace("Version: ", "")
    fs = " ".join(subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(tmp)], capture_output=True, text=True).stdout.split())
    if not fs:
        fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp)], capture_output=True, text=True).stdout.strip()
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "?")
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gib": round(mem, 1), "kernel": platform.release(), "fs": fs,
            "tmp": str(tmp), "python": platform.python_version(), "kafka": kafka, "rsync": rsync_v.group(1) if rsync_v else "?",
            "lsyncd": lsyncd_v, "load_start": os.getloadavg()}


def report(ctx_args: argparse.Namespace, mach: dict, results: dict, wall: float, notes: list[str]) -> tuple[str, list[dict]]:
    cmd = "`python tests/bench/run.py " + shlex.join(sys.argv[1:]).strip() + "`"
    if os.environ.get("MAKELEVEL"):
        cmd = f"`make bench` ({cmd})"
    L = [
        "# Benchmarks",
        "",
        "Written by `tests/bench/run.py` (`make bench`); every figure is as measured in that one run, each volmirror figure",
        "against its baseline run in the same invocation on the same data. Profiles, the Kafka client side by side",
        "(`make bench-kafka`) and what the floors that fail would need: `docs/performance.md`.",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; command: {cmd}; scale: **{ctx_args.scale}**; "
        f"whole run {wall / 60:.1f} min",
        f"- machine: {mach['nproc']} CPUs ({mach['cpu']}), {mach['mem_gib']} GiB memory, Linux {mach['kernel']}, "
        f"temp data on {mach['fs']}; load average {mach['load_start'][0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
        f"- software: Python {mach['python']}, Apache Kafka {mach['kafka']} (deploy/kafka/pom.xml; single node, KRaft, loopback), "
        f"rsync {mach['rsync']}, lsyncd {mach['lsyncd'] or 'not installed'}",
        "- volmirror: one source and one mirror agent (`python -m daemon`, production defaults, log level info), each run with a",
        "  fresh topic, state and mirror; `acks=all`; the mirror commits offsets only after fsync.",
        *[f"- {n}" for n in notes],
        "",
    ]
    if ctx_args.scale != "full":
        L += ["**Quick scale: sizes are divided (files /10, big-file bytes /8, latency workloads 15 s), so the floors,",
              "which are set for the full sizes, are indicative only.**", ""]
    all_floors: list[dict] = []
    for name in ORDER:
        if name not in results:
            continue
        try:
            lines, floors = summarize(name, results[name])
        except Exception as e:  # noqa: BLE001 - the report is always written
            lines = [f"FAIL: could not summarize the results ({type(e).__name__}: {e}); raw figures in build/bench.json"]
            floors = [{"scenario": name, "measure": "scenario", "floor": "", "pass": False, "why": f"summary failed: {e}"}]
        all_floors += floors
        r = results[name]
        stops = [f"{k} {u['stop_s']:.1f} s (exit {u['exit']})" for k, u in iter_agents(r) if u.get("stop_s", 0) > 5 or u.get("exit") not in (0, None)]
        tail = [f"Scenario wall time {r['wall_s']:.0f} s, load average {r['load'][0]:.2f} at its start, {r['load'][1]:.2f} at its end."
                if "load" in r else ""]
        if stops:
            tail.append("Slow or unclean agent stops (SIGTERM; SIGKILL after 30 s): " + ", ".join(stops) + ".")
        L += [f"## {name}", "", *lines, "", *[x for x in tail if x], ""]
    L += ["## Floors", "", "| scenario | measure | floor | result |", "|---|---|---|---|"]
    for f in all_floors:
        L.append(f"| {f['scenario']} | {f['measure']} | {f['floor']} | {verdict(f['pass'], f['why'])} |")
    L.append("")
    kafka = sorted((REPO / "build").glob("bench-kafka-*k.txt"))
    if kafka:  # the last `make bench-kafka`: the ceiling of the Kafka client, the bigfile floor's limit
        L += ["## Kafka client side by side (`make bench-kafka`, its last run)", ""]
        for f in kafka:
            L += ["```", f.read_text().strip(), "```", ""]
    return "\n".join(L), all_floors


# ------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description="volmirror benchmarks against rsync / cat / lsyncd (issue 8)")
    ap.add_argument("--only", default="", help=f"comma-separated scenarios: {','.join(ORDER)}")
    ap.add_argument("--scale", choices=("quick", "full"), default="full")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per scenario (medians); scale and bigfile run one round")
    ap.add_argument("--long-rounds", action="store_true", help="run scale and bigfile --rounds times too")
    ap.add_argument("--out", default=None, help="Markdown report (default docs/benchmarks.md for a full run of every scenario, "
                    "else build/benchmarks-<scale>.md)")
    ap.add_argument("--json", default=str(REPO / "build" / "bench.json"), help="raw results (default build/bench.json)")
    ap.add_argument("--budget", type=int, default=None, help="global time budget in seconds (default 5 h full, 45 min quick)")
    ap.add_argument("--seed", type=int, default=None, help="random seed for sizes and offsets (default: random)")
    args = ap.parse_args()
    only = [x.strip() for x in args.only.split(",") if x.strip()] or list(ORDER)
    bad = [x for x in only if x not in ORDER]
    if bad:
        ap.error(f"unknown scenario(s) {bad}; choose from {', '.join(ORDER)}")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    selected = [x for x in ORDER if x in only]
    out = Path(args.out) if args.out else (REPO / "docs" / "benchmarks.md" if args.scale == "full" and len(selected) == len(ORDER)
                                           else REPO / "build" / f"benchmarks-{args.scale}.md")
    if shutil.which("rsync") is None:
        print("rsync is missing: run `make bench` (installs it)", file=sys.stderr)
        return 2
    BUDGET["s"] = args.budget or (5 * 3600 if args.scale == "full" else 45 * 60)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGTERM, _on_term)
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vm-bench-"))
    mach = machine(tmp)
    results: dict[str, dict] = {}
    notes: list[str] = []
    broker: Broker | None = None
    ctx: Ctx | None = None
    aborted = None
    try:
        say(f"scale {args.scale}, scenarios {','.join(selected)}, rounds {args.rounds}, budget {BUDGET['s']} s, data in {tmp}")
        say("starting Kafka ...")
        broker = Broker(prefix="vm-bench-kafka-")  # bounded by kafka.sh's own start timeout
        signal.alarm(BUDGET["s"])  # armed once the broker is known, so it is always stopped
        say(f"Kafka at {broker.bootstrap}")
        ctx = Ctx(args, tmp, broker.bootstrap)
        ctx.broker_data = broker.data
        for name in selected:
            if aborted:
                results[name] = {"error": f"not run: {aborted}"}
                continue
            say(f"=== {name} ===")
            t = time.perf_counter()
            load0 = os.getloadavg()[0]
            ctx.partial = None
            try:
                results[name] = SCENARIOS[name](ctx)
            except Abort as e:
                aborted = str(e)
                if ctx.partial is not None:  # keep what was measured; the scenario is marked incomplete
                    results[name] = {**ctx.partial, "aborted": f"aborted: {e}"}
                else:
                    results[name] = {"error": f"aborted: {e}"}
                say(f"{name}: ABORTED: {e}")
            except Exception as e:  # noqa: BLE001 - record and go on with the next scenario
                results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]}
                say(f"{name}: FAILED:\n{traceback.format_exc()}")
            finally:
                if name in results:
                    results[name]["wall_s"] = round(time.perf_counter() - t, 1)
                    results[name]["load"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
                # anything a scenario left running (it should not) is stopped before the next one
                for p in ctx.procs:
                    stop_any(p)
    except Abort as e:
        aborted = str(e)
        say(f"ABORTED: {e}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if ctx:
            for p in ctx.procs:
                stop_any(p)
        if broker:
            say("stopping Kafka ...")
            broker.stop()
            shutil.rmtree(broker.data, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - t_start
    if ctx and ctx.drop_ok is False:
        notes.append(f"could not drop the page cache ({ctx.drop_err}): the 'cold' runs were NOT cold")
    elif ctx and ctx.drop_ok:
        notes.append("cold runs: `sync; echo 3 > /proc/sys/vm/drop_caches` before each (volmirror after its mirror agent started)")
    if aborted:
        notes.append(f"run aborted: {aborted}")
    md, floors = report(args, mach, results, wall, notes)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    js = Path(args.json)
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(clean({"machine": mach, "args": vars(args), "params": params(args.scale), "wall_s": wall, "notes": notes,
                                    "results": results, "floors": floors}), indent=1, default=str))
    print(md)
    nfail = sum(not f["pass"] for f in floors)
    say(f"wrote {out} and {js}; {len(floors) - nfail} of {len(floors)} floors PASS" + (f", {nfail} FAIL (exit 1)" if nfail else ""))
    return 0 if floors and all(f["pass"] for f in floors) else 1


def stop_any(p: Any) -> None:
    try:
        if isinstance(p, Agent):
            p.stop()
        else:
            stop_popen(p)
    except Exception as e:  # noqa: BLE001
        say(f"could not stop {p}: {e!r}")


if __name__ == "__main__":
    raise SystemExit(main())
