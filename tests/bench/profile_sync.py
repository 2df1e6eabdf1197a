"""Profile one initial sync: NF small files (4-16 KiB) + a BIG MiB file, source and mirror as real agents
on a private broker; prints time to converge, CPU seconds and peak RSS of each agent, and rsync -a of the
same tree. SPY=1 records py-spy profiles (--gil, raw) to /tmp/spy-{source,mirror}.txt (py-spy: pip
install py-spy into the venv; not a project dependency).

    NF=10000 BIG=0 SPY=1 .venv/bin/python tests/bench/profile_sync.py
"""
import os, sys, time, random, subprocess, signal
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from pathlib import Path
from tests.harness import Broker, Setup
from tests.bench.run import wait_tree
import tempfile
NF = int(os.environ.get("NF", "5000")); BIG = int(os.environ.get("BIG", "256"))
SPY = os.environ.get("SPY")
tmp = Path(tempfile.mkdtemp(prefix="prof-"))
b = Broker(**({"prefix": os.environ["BROKER_DIR"] + "/kafka-"} if os.environ.get("BROKER_DIR") else {}))  # BROKER_DIR: the broker's log elsewhere (e.g. tmpfs) to see what it costs the mirror's syncfs
try:
    s = Setup(tmp, b.bootstrap, "prof.t")
    v = s.src["vol1"]
    rng = random.Random(1)
    for i in range(NF):
        d = v / f"d{i // 100}"; d.mkdir(exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(rng.randint(4096, 16384)))
    if BIG:
        with open(v / "big", "wb") as f:
            for _ in range(BIG): f.write(os.urandom(1 << 20))
    m = s.add_mirror(); m.log_level = "info"; s.source.log_level = "info"
    m.start()
    def stat():
        f = open("/proc/stat").readline().split()[1:]
        return [int(x) for x in f]
    def java_cpu():
        tot = 0
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and b"kafka" in open(f"/proc/{pid}/cmdline", "rb").read():
                    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                    tot += int(f[11]) + int(f[12])
            except OSError:
                pass
        return tot / os.sysconf("SC_CLK_TCK")
    st0, j0 = stat(), java_cpu()
    t0 = time.monotonic()
    s.source.start(wait_ready=False)
    spies = []
    if os.environ.get("STRACE"):  # STRACE=1: syscall counts and times of the mirror to /tmp/strace-mirror.txt
        spies.append(subprocess.Popen(["strace", "-c", "-f", "-o", "/tmp/strace-mirror.txt", "-p", str(m.proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    if SPY:
        time.sleep(1.0)
        for a in (s.source, m):
            spies.append(subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "-p", str(a.proc.pid), "-o", f"/tmp/spy-{a.kind}.txt", "-f", "raw", "-r", "50", "--nonblocking"] + (["--gil"] if SPY != "all" else []), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    # the benchmark's poller (listing every poll, content once at the end): hashing both trees
    # every 0.1 s, as wait_converged does, takes a core away from the agents
    wait_tree(v, s.mirror_path(), time.perf_counter() - (time.monotonic() - t0), 900, None, (BIG << 20) or (1 << 20))
    el = time.monotonic() - t0
    def cpu(pid):
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return f"{int(f[11]) / os.sysconf('SC_CLK_TCK'):.1f}u+{int(f[12]) / os.sysconf('SC_CLK_TCK'):.1f}s"
    def hwm(pid):
        return next(l for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM")).split()[1]
    st1, j1 = stat(), java_cpu()
    d = [b - a for a, b in zip(st0, st1)]
    hz = os.sysconf("SC_CLK_TCK")
    print(f"machine over the run: user {d[0]/hz:.1f} sys {d[2]/hz:.1f} idle {d[3]/hz:.1f} iowait {d[4]/hz:.1f} irq+softirq {(d[5]+d[6])/hz:.1f} s; broker cpu {j1 - j0:.1f} s")
    mm = m.metrics()
    dn, ds = (sum(v for (n, _), v in mm.items() if n == f"volmirror_mirror_durable_point_seconds_{k}") for k in ("count", "sum"))
    print(f"mirror durability points: {dn:.0f}, {ds:.1f} s in all")
    print(f"NF={NF} BIG={BIG}MiB: converged in {el:.1f}s; source cpu {cpu(s.source.proc.pid)} rss {hwm(s.source.proc.pid)}kB; mirror cpu {cpu(m.proc.pid)} rss {hwm(m.proc.pid)}kB", flush=True)
    import json
    for l in open(tmp/"source.log"):
        j = json.loads(l)
        if "sync of volume" in l or "reconcile scan" in l or j.get("level") in ("WARNING", "ERROR"): print("SRC", j["ts"], j.get("level"), j["msg"])
    print("t0 wall", time.strftime("%H:%M:%S", time.gmtime(time.time()-el)))
    for sp in spies: sp.send_signal(signal.SIGINT)
    for sp in spies: sp.wait(30)
    t = time.monotonic(); subprocess.run(["rsync", "-a", f"{v}/", f"{tmp}/rs/"]); print(f"rsync {time.monotonic()-t:.1f}s")
    s.stop_all()
finally:
    b.stop()
    subprocess.run(["rm", "-rf", str(tmp)])
