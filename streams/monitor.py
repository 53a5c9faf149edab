"""Pipeline progress as any operator can see it on any Kafka: committed offsets against topic ends."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from streams import topics
from streams.settings import KafkaSettings


def stage_backlog(settings: KafkaSettings, stage: str, input_topic: str) -> int:
    """Messages of ``input_topic`` that ``stage``'s consumer group has not committed yet.

    Inputs written in transactions end each transaction with a control record that takes an
    offset, so a caught-up group sits one offset below the high watermark of such a partition.
    """
    consumer = Consumer({**settings.consumer(stage), "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(input_topic, timeout=10).topics[input_topic]
        parts = [TopicPartition(input_topic, p) for p in meta.partitions]
        committed = consumer.committed(parts, timeout=10)
        backlog = 0
        transactional = input_topic != topics.FRAMES
        for tp in committed:
            low, high = consumer.get_watermark_offsets(TopicPartition(input_topic, tp.partition), timeout=10)
            pos = tp.offset if tp.offset >= 0 else low
            end = high - 1 if transactional and high > pos else high
            backlog += max(0, end - pos)
        return backlog
    finally:
        consumer.close()


def read_all(settings: KafkaSettings, topic_names: list[str], timeout: float = 30.0) -> list:
    """Every committed message now in ``topic_names`` (read from the start up to the end)."""
    return list(scan(settings, topic_names, timeout))


def _reader(settings: KafkaSettings, **extra: object) -> Consumer:
    """A consumer that assigns partitions itself (no group joined, nothing committed), partition ends reported."""
    return Consumer({**settings.consumer(None), "group.id": f"{settings.app_id}.reader-{uuid.uuid4().hex[:8]}",
                     "enable.partition.eof": True, **extra})


def fetch(settings: KafkaSettings, topic: str, partition: int, offset: int, timeout: float = 30.0) -> Message | None:
    """The committed message at ``offset`` of ``topic[partition]``, or None once it is gone.

    Gone: deleted by retention, compacted away, or never there (the partition's end comes first).
    No group is joined and no offset committed.
    """
    consumer = _reader(settings, **{"auto.offset.reset": "error"})
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() in (KafkaError._PARTITION_EOF, KafkaError._AUTO_OFFSET_RESET,
                                  KafkaError.OFFSET_OUT_OF_RANGE, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    return None
                continue
            return msg if msg.offset() == offset else None
        return None
    finally:
        consumer.close()


def scan(settings: KafkaSettings, topic_names: list[str], timeout: float = 30.0) -> Iterator[Message]:
    """The committed messages now in ``topic_names``, one at a time, from the start up to the end.

    Partitions are assigned, not subscribed: no group is joined and no offset committed. Topics
    that do not exist are left out; reading stops at every partition's end or after ``timeout`` s.
    """
    consumer = _reader(settings)
    try:
        metadata = consumer.list_topics(timeout=10).topics
        parts = [TopicPartition(t, p, OFFSET_BEGINNING) for t in topic_names if t in metadata
                 for p in metadata[t].partitions]
        if not parts:
            return
        consumer.assign(parts)
        pending = {(tp.topic, tp.partition) for tp in parts}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    pending.discard((msg.topic(), msg.partition()))
                continue
            yield msg
    finally:
        consumer.close()
