"""Lineage headers and duplicate suppression, a second line of defence behind transactions.

Every output carries ``src = <topic>:<partition>:<offset>`` of the input it was made from. A stage
drops an input whose ``src`` offset is not above the highest it has already processed from that
upstream partition. On Apache Kafka transactions alone give exactly-once; this guard is there
because the embedded broker (tansu 0.6) *commits* a killed producer's open transaction when the
restarted instance re-initialises the same ``transactional.id`` (measured; Kafka aborts it), so the
replayed message would otherwise reach the next stage twice.

After a restart the high-water marks are rebuilt from the ``src`` headers of the last
``lookback`` already-processed messages of each input partition (Kafka holds them; tansu keeps no
offset-commit metadata where they could live otherwise). The same tansu behaviour can leave the
outputs of an input on the stage's own output topic while its offset was never committed; the
stage would then make them again. So the guard also reads the tail of its output topics and
drops an input whose outputs are already there: the last stage's topic (alerts) has no
downstream stage to drop the copy.
"""

from __future__ import annotations

import uuid

from confluent_kafka import Consumer, TopicPartition

from streams.settings import KafkaSettings

SRC_HEADER = "src"


def src_of(topic: str, partition: int, offset: int) -> bytes:
    """The ``src`` header value of the message at ``topic:partition:offset``."""
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

    def __init__(self, settings: KafkaSettings, lookback: int = 8, outputs: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.lookback = lookback
        self.outputs = outputs
        self._marks: dict[tuple[str, int], dict[str, int]] = {}
        self._made: dict[tuple[str, int], int] = {}  # input partition -> highest offset with outputs

    def is_duplicate(self, topic: str, partition: int, offset: int, src: bytes | None) -> bool:
        """Whether this input was already processed (by this or an earlier instance)."""
        marks = self._marks.get((topic, partition))
        if marks is None:
            marks = self._marks[(topic, partition)] = self._recover(topic, partition, offset)
            self._made[(topic, partition)] = self._recover_made(topic, partition)
        if offset <= self._made[(topic, partition)]:
            return True
        parsed = parse_src(src)
        return parsed is not None and parsed[1] <= marks.get(parsed[0], -1)

    def done(self, topic: str, partition: int, offset: int, src: bytes | None) -> None:
        """Record an input whose transaction has committed."""
        key = (topic, partition)
        self._made[key] = max(self._made.get(key, -1), offset)
        parsed = parse_src(src)
        if parsed is not None:
            marks = self._marks.setdefault(key, {})
            marks[parsed[0]] = max(marks.get(parsed[0], -1), parsed[1])

    def _consumer(self) -> Consumer:
        return Consumer({**self.settings.consumer(None), "enable.partition.eof": True,
                         "group.id": f"{self.settings.app_id}.lineage-{uuid.uuid4().hex[:8]}"})

    def _srcs(self, consumer: Consumer, tp: TopicPartition, end: int | None = None):
        """``src`` headers (parsed) of the messages of ``tp`` from its offset to ``end`` (or EOF)."""
        consumer.assign([tp])
        while True:
            msg = consumer.poll(5.0)
            offset = msg.offset() if msg is not None else None
            if msg is None or msg.error() or offset is None or (end is not None and offset >= end):
                return
            value = dict(msg.headers() or []).get(SRC_HEADER)
            parsed = parse_src(value.encode() if isinstance(value, str) else value)
            if parsed is not None:
                yield parsed

    def _recover(self, topic: str, partition: int, next_offset: int) -> dict[str, int]:
        """High-water marks from the ``src`` headers of messages before ``next_offset``."""
        marks: dict[str, int] = {}
        if next_offset <= 0:
            return marks
        consumer = self._consumer()
        try:
            # transaction markers take offsets too: read a window twice as wide as the lookback
            start = TopicPartition(topic, partition, max(0, next_offset - 2 * self.lookback))
            for upstream, up_offset in self._srcs(consumer, start, next_offset):
                marks[upstream] = max(marks.get(upstream, -1), up_offset)
        finally:
            consumer.close()
        return marks

    def _recover_made(self, topic: str, partition: int) -> int:
        """Highest offset of an input partition whose outputs are already on an output topic.

        Highest offset of input partition (topic, partition) whose outputs are on the tail of
        an output topic (-1 when none): all outputs of an input commit together, and in order.
        """
        made, me = -1, f"{topic}:{partition}"
        if not self.outputs:
            return made
        consumer = self._consumer()
        try:
            for out in self.outputs:
                meta = consumer.list_topics(out, timeout=10).topics.get(out)
                for p in (meta.partitions if meta is not None and meta.error is None else {}):
                    high = consumer.get_watermark_offsets(TopicPartition(out, p), timeout=10)[1]
                    if high <= 0:
                        continue
                    tail = TopicPartition(out, p, max(0, high - 2 * self.lookback))
                    made = max([made, *(o for up, o in self._srcs(consumer, tail) if up == me)])
        finally:
            consumer.close()
        return made
