"""The only module that imports aiokafka: topic setup, the producer and the consumer.

The rest of the daemon sees three small things: :func:`ensure_topics`, :class:`Producer` (``send``
returns a delivery future; ordering per key is kept because the producer is idempotent with
``acks=all``) and :class:`Consumer` (``getmany`` returns plain :class:`Record` tuples, ``commit``
takes explicit offsets, auto-commit is always off). Kafka errors are translated into the daemon's
own error classes here.

Record size: a block (up to 1 MiB) plus its header must fit in one record, so the topic is created
with ``max.message.bytes`` = :data:`MAX_RECORD`, and the producer and consumer limits match it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import aiokafka.util
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, KafkaTimeoutError

from .config import KafkaConfig
from .errors import PermanentError, PublishError, TransientError

log = logging.getLogger("volmirror.kafka")

MAX_RECORD = 4 * 1024 * 1024  # > 1 MiB block + JSON header, with room to spare
MIN_TOPIC_RECORD = 1024 * 1024 + 64 * 1024  # the least max.message.bytes a topic may have: one 1 MiB block
_TOPIC_EXISTS = 36

if aiokafka.util.NO_EXTENSIONS:  # TRAPS.md: pure-Python CRC32C runs at a few MB/s
    log.warning("aiokafka C extensions are not available; Kafka throughput will be poor")


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


def _common(kc: KafkaConfig) -> dict[str, Any]:
    opts = dict(kc.client_options)
    opts.setdefault("client_id", "volmirror")
    return {"bootstrap_servers": list(kc.bootstrap_servers), "request_timeout_ms": kc.request_timeout_ms, **opts}


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def ensure_topics(kc: KafkaConfig, topics: Iterable[str], *, timeout: float = 60.0) -> int:
    """Create the topics that are missing (partitions, replication, retention from config); returns
    the smallest ``max.message.bytes`` of the topics (:data:`MAX_RECORD` for those it created or
    could not describe), which bounds the producer's batches (:func:`batch_bytes`).

    Raises TransientError if the cluster cannot be reached in ``timeout`` and PermanentError if it
    refuses to create a topic (with the broker's reason), so the agent can stop with a clear message.
    """
    wanted = list(topics)
    admin = AIOKafkaAdminClient(**{k: v for k, v in _common(kc).items()})
    try:
        try:
            await asyncio.wait_for(admin.start(), timeout)
            existing = set(await asyncio.wait_for(admin.list_topics(), timeout))
        except (KafkaError, OSError, asyncio.TimeoutError) as e:
            raise TransientError(f"cannot reach Kafka at {','.join(kc.bootstrap_servers)}: {_describe(e)}") from None
        missing = [t for t in wanted if t not in existing]
        if missing:
            cluster = await admin.describe_cluster()
            brokers = len(cluster.get("brokers", [])) or 1
            rf = kc.replication_factor or min(3, brokers)
            if rf > brokers:
                raise PermanentError(
                    f"cannot create topic(s) {missing}: kafka.replication_factor={rf} but the cluster has {brokers} broker(s)"
                )
            new = []
            for t in missing:
                is_control = t.endswith(".control")
                cfg = {"max.message.bytes": str(MAX_RECORD), "retention.ms": str(kc.retention_ms)}
                new.append(NewTopic(t, 1 if is_control else kc.partitions, rf, topic_configs=cfg))
            try:
                resp = await admin.create_topics(new)
            except KafkaError as e:
                raise PermanentError(f"cannot create topic(s) {missing}: {_describe(e)}") from None
            for name, code, *rest in resp.topic_errors:
                if code not in (0, _TOPIC_EXISTS):
                    msg = rest[0] if rest and rest[0] else f"error code {code}"
                    raise PermanentError(f"cannot create topic {name!r}: {msg}")
            log.info("created topic(s) %s (replication factor %d)", missing, rf, extra={"topic": ",".join(missing)})
        return await _check_topic_limits(admin, [t for t in wanted if t in existing])
    finally:
        await admin.close()


def batch_bytes(max_message_bytes: int) -> int:
    """The producer batch size for topics taking records of up to ``max_message_bytes``: as large
    as they allow (aiokafka keeps one request in flight per broker, so a request carries several
    1 MiB blocks), with 64 KiB of room for batch and record headers."""
    return max(1024 * 1024, min(max_message_bytes, MAX_RECORD) - 64 * 1024)


async def _check_topic_limits(admin: AIOKafkaAdminClient, topics: list[str]) -> int:
    """An existing topic whose max.message.bytes is too small for a 1 MiB block is a setup error.
    Returns the smallest max.message.bytes found (MAX_RECORD if none)."""
    smallest = MAX_RECORD
    if not topics:
        return smallest
    try:
        resp = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    except KafkaError as e:  # not fatal: the producer will report oversized records anyway
        log.warning("could not check topic configs: %s; producer batches of 1 MiB", _describe(e))
        return MIN_TOPIC_RECORD
    for r in resp:
        for _code, _msg, _rtype, name, entries in r.resources:
            for entry in entries:
                if entry[0] == "max.message.bytes" and entry[1] is not None:
                    if int(entry[1]) < MIN_TOPIC_RECORD:
                        raise PermanentError(
                            f"topic {name!r} has max.message.bytes={entry[1]}; volmirror needs at least "
                            f"{MIN_TOPIC_RECORD} for 1 MiB blocks (set it to {MAX_RECORD})"
                        )
                    smallest = min(smallest, int(entry[1]))
    return smallest


class Producer:
    """Idempotent, acks=all, compressed producer. ``send`` returns a future resolved on ack."""

    def __init__(self, kc: KafkaConfig, *, max_batch: int = 1024 * 1024) -> None:
        """``max_batch``: bytes per producer batch (:func:`batch_bytes` of the topics' limit)."""
        self.kc = kc
        comp = None if kc.compression == "none" else kc.compression
        self._p = AIOKafkaProducer(
            **_common(kc),
            acks="all",
            enable_idempotence=True,
            compression_type=comp,
            max_request_size=MAX_RECORD,
            max_batch_size=max_batch,
            linger_ms=5,
        )
        self._started = False

    async def start(self) -> None:
        try:
            await self._p.start()
        except (KafkaError, OSError) as e:
            await self._p.stop()
            raise TransientError(f"cannot connect producer to Kafka: {_describe(e)}") from None
        self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._p.stop()

    async def __aenter__(self) -> "Producer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def send(self, topic: str, key: bytes, value: bytes) -> "asyncio.Future[Any]":
        """Enqueue one record; the returned future resolves when the broker acknowledged it."""
        try:
            return await self._p.send(topic, value=value, key=key)
        except KafkaTimeoutError as e:
            raise PublishError(f"Kafka send queue full: {_describe(e)}") from None
        except KafkaError as e:
            raise PublishError(f"Kafka send failed: {_describe(e)}") from None

    async def flush(self) -> None:
        await self._p.flush()


def translate(e: BaseException) -> TransientError:
    return TransientError(f"Kafka error: {_describe(e)}")


class Consumer:
    """Group consumer with auto-commit off; positions are committed explicitly after durability."""

    def __init__(self, kc: KafkaConfig, group_id: str, topics: list[str], *, on_assign: Any = None, offset_reset: str = "earliest") -> None:
        self.kc = kc
        self.topics = topics
        self._on_assign = on_assign
        self._c = AIOKafkaConsumer(
            **_common(kc),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=offset_reset,
            max_partition_fetch_bytes=MAX_RECORD * 2,
            fetch_max_bytes=64 * 1024 * 1024,
            isolation_level="read_uncommitted",
        )
        self._started = False

    async def start(self) -> None:
        try:
            await self._c.start()
        except (KafkaError, OSError) as e:
            await self._c.stop()
            raise TransientError(f"cannot connect consumer to Kafka: {_describe(e)}") from None
        self._started = True
        listener = _Listener(self, self._on_assign) if self._on_assign else None
        self._c.subscribe(self.topics, listener=listener)

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._c.stop()

    async def __aenter__(self) -> "Consumer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def getmany(self, timeout_ms: int, max_records: int = 2000) -> list[Record]:
        try:
            data = await self._c.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as e:
            raise translate(e) from None
        out: list[Record] = []
        for tp, msgs in data.items():
            for m in msgs:
                out.append(Record(tp.topic, tp.partition, m.offset, m.key, m.value, m.timestamp))
        out.sort(key=lambda r: (r.topic, r.partition, r.offset))
        return out

    async def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit ``next offset to read`` per (topic, partition)."""
        if not offsets:
            return
        try:
            await self._c.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        except KafkaError as e:
            raise translate(e) from None

    def assignment(self) -> list[tuple[str, int]]:
        return [(tp.topic, tp.partition) for tp in self._c.assignment()]

    def highwater(self, topic: str, partition: int) -> int | None:
        tp = TopicPartition(topic, partition)
        if tp not in self._c.assignment():
            return None
        return self._c.highwater(tp)

    async def position(self, topic: str, partition: int) -> int:
        return await self._c.position(TopicPartition(topic, partition))

    async def end_offsets(self, parts: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        try:
            res = await self._c.end_offsets([TopicPartition(t, p) for t, p in parts])
        except KafkaError as e:
            raise translate(e) from None
        return {(tp.topic, tp.partition): o for tp, o in res.items()}

    async def beginning_offsets(self, parts: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        try:
            res = await self._c.beginning_offsets([TopicPartition(t, p) for t, p in parts])
        except KafkaError as e:
            raise translate(e) from None
        return {(tp.topic, tp.partition): o for tp, o in res.items()}

    async def committed(self, topic: str, partition: int) -> int | None:
        try:
            return await self._c.committed(TopicPartition(topic, partition))
        except KafkaError as e:
            raise translate(e) from None

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self._c.seek(TopicPartition(topic, partition), offset)


class _Listener(ConsumerRebalanceListener):
    """Adapts aiokafka's rebalance listener to a plain coroutine ``on_assign(consumer, parts)``."""

    def __init__(self, consumer: Consumer, on_assign: Any) -> None:
        self.consumer = consumer
        self.on_assign = on_assign

    async def on_partitions_revoked(self, revoked: Any) -> None:
        return None

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.on_assign(self.consumer, [(tp.topic, tp.partition) for tp in assigned])


async def send_raw(kc: KafkaConfig, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    """Write raw records (tests, tools). Uses the same settings as the agents' producer."""
    p = Producer(kc)
    await p.start()
    try:
        futs = [await p._p.send(topic, value=v, key=k) for k, v in records]
        await asyncio.gather(*futs)
    finally:
        await p.stop()


__all__ = [
    "Consumer",
    "MAX_RECORD",
    "Producer",
    "batch_bytes",
    "Record",
    "ensure_topics",
    "send_raw",
]
