"""One partition, 1 MiB records, acks=all, idempotent: how fast can each Kafka client publish?

Issue 8 asks for a side-by-side measurement before changing clients. This runs, against one
private local broker in the same invocation and with the same random records, aiokafka (the
project's client, from the project venv) with the producer settings of daemon/kafka.py, and
confluent-kafka (librdkafka, from its own venv under build/, created on first use; not a project
dependency). Output: one line per client and setting, MiB/s and client CPU seconds.

    make bench-kafka            (or: .venv/bin/python tests/bench/kafka_clients.py [MiB [record KiB]])

The agents' records are one block each: 128 KiB by default (block_size), up to 1 MiB.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.harness import Broker  # noqa: E402

MIB = 1 << 20
CK_VENV = ROOT / "build" / "ck-venv"
CK_VERSION = "confluent-kafka>=2.6,<3"

CK_SCRIPT = r"""
import os, sys, time
from confluent_kafka import Producer, version, libversion
from confluent_kafka.admin import AdminClient, NewTopic
boot, n, comp, inflight, rec = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
t = f"ck-{comp}-{inflight}"
adm = AdminClient({"bootstrap.servers": boot})
[f.result() for f in adm.create_topics([NewTopic(t, 1, 1, config={"max.message.bytes": str(4 << 20)})]).values()]
p = Producer({"bootstrap.servers": boot, "acks": "all", "enable.idempotence": True, "compression.type": comp,
              "message.max.bytes": 4 << 20, "batch.size": (4 << 20) - (64 << 10), "linger.ms": 5,
              "max.in.flight.requests.per.connection": inflight, "queue.buffering.max.kbytes": 65536})
pool = os.urandom(64 << 20)  # 64 MiB of distinct records, sent in turn: no batch repeats one (zstd would find it)
data = [pool[o : o + rec] for o in range(0, len(pool), rec)]
count = n * (1 << 20) // rec
acked = [0]
def cb(err, msg):
    if err is None:
        acked[0] += 1
p.produce(t, value=b"warm-up", key=b"v", on_delivery=cb); p.flush(30); acked[0] = 0
c0 = os.times(); t0 = time.perf_counter()
for i in range(count):
    while True:
        try:
            p.produce(t, value=data[i % len(data)], key=b"v", on_delivery=cb)
            break
        except BufferError:
            p.poll(0.01)
    p.poll(0)
p.flush(120)
el = time.perf_counter() - t0; c1 = os.times()
cpu = c1.user - c0.user + c1.system - c0.system
import confluent_kafka
print(f"confluent-kafka {confluent_kafka.__version__} (librdkafka {libversion()[0]}) compression={comp} in-flight={inflight}: "
      f"{n / el:.0f} MiB/s, client cpu {cpu:.1f} s, acked {acked[0]}/{count}", flush=True)
"""


async def aiokafka_run(boot: str, n: int, comp: str | None, batch: int, rec: int) -> str:
    import aiokafka
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    t = f"aio-{comp}-{batch}"
    adm = AIOKafkaAdminClient(bootstrap_servers=boot)
    await adm.start()
    try:
        await adm.create_topics([NewTopic(t, 1, 1, topic_configs={"max.message.bytes": str(4 * MIB)})])
    finally:
        await adm.close()
    p = AIOKafkaProducer(bootstrap_servers=boot, acks="all", enable_idempotence=True, compression_type=comp,
                         max_request_size=4 * MIB, max_batch_size=batch, linger_ms=5)
    await p.start()
    try:
        await (await p.send(t, value=b"warm-up", key=b"v"))
        pool = os.urandom(64 * MIB)  # distinct records in turn: no batch repeats one (zstd would find it)
        data = [pool[o : o + rec] for o in range(0, len(pool), rec)]
        c0, t0 = os.times(), time.perf_counter()
        futs = [await p.send(t, value=data[i % len(data)], key=b"v") for i in range(n * MIB // rec)]
        await asyncio.gather(*futs)
        el, c1 = time.perf_counter() - t0, os.times()
    finally:
        await p.stop()
    cpu = c1.user - c0.user + c1.system - c0.system
    return (f"aiokafka {aiokafka.__version__} compression={comp or 'none'} max_batch_size={batch // 1024} KiB: "
            f"{n / el:.0f} MiB/s, client cpu {cpu:.1f} s")


def ck_python() -> Path:
    py = CK_VENV / "bin" / "python"
    if not py.exists() or subprocess.run([str(py), "-c", "import confluent_kafka"], capture_output=True).returncode:
        venv.create(CK_VENV, with_pip=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", CK_VERSION], check=True)
    return py


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    rec = int(sys.argv[2]) * 1024 if len(sys.argv) > 2 else MIB
    py = ck_python()
    out = ROOT / "build" / f"bench-kafka-{rec // 1024}k.txt"  # make bench puts these into docs/benchmarks.md
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    br = Broker()
    try:
        say(f"{time.strftime('%Y-%m-%d %H:%M %Z')}: {n} MiB in records of {rec // 1024} KiB (random), one partition, "
            "acks=all, idempotent, one local broker")
        for comp in (None, "zstd"):
            for batch in (MIB, 4 * MIB - 64 * 1024):
                say(asyncio.run(aiokafka_run(br.bootstrap, n, comp, batch, rec)))
        for comp in ("none", "zstd"):
            for inflight in (1, 5):
                r = subprocess.run([str(py), "-c", CK_SCRIPT, br.bootstrap, str(n), comp, str(inflight), str(rec)],
                                   check=True, capture_output=True, text=True)
                say(r.stdout.strip())
        out.write_text("\n".join(lines) + "\n")
    finally:
        br.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
