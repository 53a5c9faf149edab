"""Lineage headers and duplicate suppression, a second line of defence behind transactions.

Every output carries ``src = <topic>:<partition>:<offset>`` of the input it was made from. A stage
drops an input whose ``src`` offset is not above the highest it has already processed from that
upstream partition. On Apache Kafka transactions alone give exactly-once; this guard is there
because the embedded broker (tansu 0.6) *commits* a killed producer's open transaction when the
restarted instance re-initialises the same ``transactional.id`` (measured; Kafka aborts it), so the
replayed message would otherwise reach the next stage twice.

After a restart the high-water marks are rebuilt from the ``src`` headers of the last
``lookback`` already-processed messages of each input partition (Kafka holds them; tansu keeps no
offset-commit metadata where they could live otherwise).
"""

from __future__ import annotations

import uuid

from confluent_kafka import Consumer, KafkaError, TopicPartition

from streams.settings import KafkaSettings

SRC_HEADER = "src"


def src_of(topic: str, partition: int, offset: int) -> bytes:
    return f"{topic}:{partition}:{offset}".encode()


def parse_src(value: bytes | None) -> tuple[str, int] | None:
    """(``topic:partition``, offset) of a ``src`` header, or None when absent or malformed."""
    if not value:
        return None
    upstream, _, offset = value.decode(errors="replace").rpartition(":")
    return (upstream, int(offset)) if upstream and offset.isdigit() else None


class Deduplicator:
    """Per input partition, the highest upstream offset processed from each upstream partition.

    Parameters
    ----------
    settings : KafkaSettings
    lookback : int
        Processed messages read back per input partition after a restart (8 covers up to 8
        upstream partitions feeding one input partition, more than this pipeline's default of 1).
    """

    def __init__(self, settings: KafkaSettings, lookback: int = 8) -> None:
        self.settings = settings
        self.lookback = lookback
        self._marks: dict[tuple[str, int], dict[str, int]] = {}

    def is_duplicate(self, topic: str, partition: int, offset: int, src: bytes | None) -> bool:
        """Whether this input was already processed (by this or an earlier instance)."""
        parsed = parse_src(src)
        if parsed is None:
            return False
        marks = self._marks.get((topic, partition))
        if marks is None:
            marks = self._marks[(topic, partition)] = self._recover(topic, partition, offset)
        upstream, up_offset = parsed
        return up_offset <= marks.get(upstream, -1)

    def done(self, topic: str, partition: int, src: bytes | None) -> None:
        """Record an input whose transaction has committed."""
        parsed = parse_src(src)
        if parsed is not None:
            marks = self._marks.setdefault((topic, partition), {})
            marks[parsed[0]] = max(marks.get(parsed[0], -1), parsed[1])

    def _recover(self, topic: str, partition: int, next_offset: int) -> dict[str, int]:
        """High-water marks from the ``src`` headers of messages before ``next_offset``."""
        marks: dict[str, int] = {}
        if next_offset <= 0:
            return marks
        conf = {**self.settings.consumer(None), "group.id": f"{self.settings.app_id}.lineage-{uuid.uuid4().hex[:8]}",
                "enable.partition.eof": True}
        consumer = Consumer(conf)
        try:
            # transaction markers take offsets too: read a window twice as wide as the lookback
            consumer.assign([TopicPartition(topic, partition, max(0, next_offset - 2 * self.lookback))])
            while True:
                msg = consumer.poll(5.0)
                if msg is None or (msg.error() and msg.error().code() == KafkaError._PARTITION_EOF):
                    break
                if msg.error() or msg.offset() >= next_offset:
                    break
                parsed = parse_src(dict(msg.headers() or []).get(SRC_HEADER))
                if parsed is not None:
                    marks[parsed[0]] = max(marks.get(parsed[0], -1), parsed[1])
        finally:
            consumer.close()
        return marks
