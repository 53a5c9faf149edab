"""Lineage headers and the duplicate guard, a second line of defence behind transactions.

On Apache Kafka transactions alone give exactly-once. The embedded broker (tansu 0.6) instead
*commits* a killed producer's open transaction when the restarted instance re-initialises the same
``transactional.id`` (measured; Kafka aborts it): the outputs of the input in hand become visible
while the input's offset was never committed, so the restarted stage would make them again.

The guard works from the stage's own committed state (``docs/architecture.md``, "Exactly once"):

- **Progress records.** Every transaction of a stage also writes one record to the stage's compacted
  topic ``progress.<stage>``, on the partition of the same number as the input's and keyed
  ``<input topic>:<partition>``: the input's offset and, per upstream partition, the last
  :data:`WINDOW` upstream offsets named by the ``src`` headers of the inputs processed. Being in
  the transaction, it is committed exactly when the outputs are.
- **Recovery** at the first sight of an input partition (start-up, rebalance) reads the last
  committed record of that partition of ``progress.<stage>`` (a few records at its end, all the
  partitions assigned together in one pass): constant cost, whatever the number of partitions of
  the input or output topics. An input at or below the recorded offset was processed (its outputs
  are committed): it is dropped.
- **Lineage.** Every output carries ``src = <topic>:<partition>:<offset>`` of the input it was
  made from. An input whose ``src`` names an upstream offset already processed (one of the last
  :data:`WINDOW` of its upstream partition, or older than all of them) is a copy of a replayed
  upstream transaction: it is dropped.
- **Forged headers.** A ``src`` is trusted only if it names a topic the stage's input is made from
  (``upstream``), a partition that topic has and an offset below that partition's high watermark
  (the upstream message exists). Anything else is ignored (the message is processed as if it had
  no ``src``), counted in ``broker_lineage_rejected_total{stage,reason}`` and logged once per
  input partition and reason. As the guard matches upstream offsets exactly, a trusted but forged
  ``src`` (one naming a real upstream message) can make the stage drop the message it names, and
  :data:`WINDOW` of them on one partition the genuine messages then in flight, never the
  messages that come after.
- A progress record claiming an offset at or beyond the input partition's high watermark (the
  input topic was re-created, say) is ignored and counted the same way.
"""

from __future__ import annotations

import bisect
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from broker.errors import DecodeError, StageFailure
from streams import serde, topics
from streams.metrics import StageMetrics
from streams.settings import KafkaSettings

log = logging.getLogger(__name__)

SRC_HEADER = "src"
#: Upstream offsets remembered per upstream partition (count). A replayed upstream transaction
#: arrives right after its first copy; 64 leaves room for a replica's stale transaction committed
#: later, and keeps a progress record under ~1 KiB per upstream partition.
WINDOW = 64
#: Records read first at the end of a progress partition (count): one committed record and the
#: markers and aborted records after it. Doubled (times 8) until a record is found or the partition
#: start is reached.
TAIL = 16
#: Longest ``src`` value looked at (bytes); a longer one is malformed.
MAX_SRC_BYTES = 512
_SRC = re.compile(r"([A-Za-z0-9._-]{1,249}):(\d{1,10}):(\d{1,19})")
_MAX_OFFSET = 2**63 - 1
#: How long a read for a message beyond the reported high watermark goes on after reaching the
#: partition's end (s): a batch whose watermark was read before it became visible arrives by then.
EOF_GRACE = 0.5
#: Farthest a genuine message can lie beyond tansu's high watermark (records in one batch, count):
#: a claimed offset beyond that is rejected without reading.
MAX_BATCH = 1 << 20
#: Errors that mean a read went past the end of a partition.
_NOT_THERE = frozenset({KafkaError._PARTITION_EOF, KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE})


def src_of(topic: str, partition: int, offset: int) -> bytes:
    """The ``src`` header value of the message at ``topic:partition:offset``."""
    return f"{topic}:{partition}:{offset}".encode()


def parse_src(value: bytes | None) -> tuple[str, int, int] | None:
    """(topic, partition, offset) of a ``src`` header, or None when malformed.

    Well-formed: at most :data:`MAX_SRC_BYTES` of ASCII ``<topic>:<partition>:<offset>``, the topic
    a legal Kafka topic name, partition and offset decimal and within Kafka's ranges.
    """
    if not value or len(value) > MAX_SRC_BYTES:
        return None
    match = _SRC.fullmatch(value.decode("ascii", errors="replace"))
    if match is None:
        return None
    topic, partition, offset = match.group(1), int(match.group(2)), int(match.group(3))
    if topic in (".", "..") or partition >= 2**31 or offset > _MAX_OFFSET:
        return None
    return topic, partition, offset


@dataclass(frozen=True)
class Lineage:
    """What the guard decided about one input message.

    Attributes
    ----------
    topic, partition, offset
        The input message.
    upstream : str or None
        ``<topic>:<partition>`` of its ``src`` when trusted, else None (absent or rejected).
    upstream_offset : int
        The upstream offset of a trusted ``src`` (-1 otherwise).
    duplicate : bool
        Whether it was already processed: drop it.
    """

    topic: str
    partition: int
    offset: int
    upstream: str | None = None
    upstream_offset: int = -1
    duplicate: bool = False


@dataclass(frozen=True)
class ProgressRecord:
    """The progress record to produce in an input's transaction (topic, partition, key, value, headers)."""

    topic: str
    partition: int
    key: bytes
    value: bytes
    headers: dict[str, bytes]


@dataclass
class _State:
    """What the guard knows of one input partition: the last offset processed and the upstream offsets seen."""

    made: int = -1
    seen: dict[str, list[int]] = field(default_factory=dict)  # upstream "topic:partition" -> last offsets, sorted


class Deduplicator:
    """The duplicate guard of one stage: recovery from its progress records, lineage checks.

    Parameters
    ----------
    settings : KafkaSettings
    stage : str
        The stage: its progress topic is ``progress.<stage>`` (:func:`streams.topics.progress`).
    upstream : tuple of str, optional
        Topics a trusted ``src`` may name: the input of the stage whose outputs this stage
        consumes (``streams.stages.upstream_of``); ``()`` for a stage whose input comes from
        outside the pipeline (ingest: any ``src`` is rejected). None: any topic (still checked
        against its partitions and high watermark).
    metrics : StageMetrics, optional
        Where ``broker_lineage_rejected_total`` and ``broker_lineage_recovery_seconds`` go.
    window : int
        Upstream offsets remembered per upstream partition (:data:`WINDOW`).
    timeout : float
        Limit of one broker request and of a recovery's read (s). Default 10 s.
    """

    def __init__(self, settings: KafkaSettings, stage: str, upstream: tuple[str, ...] | None = None,
                 metrics: StageMetrics | None = None, window: int = WINDOW, timeout: float = 10.0) -> None:
        self.settings = settings
        self.stage = stage
        self.progress_topic = topics.progress(stage)
        self.upstream = upstream
        self.metrics = metrics or StageMetrics(stage)
        self.window = window
        self.timeout = timeout
        self._state: dict[tuple[str, int], _State] = {}
        self._pending: set[tuple[str, int]] = set()  # assigned, not yet recovered
        self._highs: dict[tuple[str, int], int] = {}  # upstream high watermarks last asked for
        self._partitions: dict[str, int] = {}  # partition counts of topics looked up
        self._logged: set[tuple[str, int, str]] = set()
        self._reader: Consumer | None = None

    # -- the runner's calls --------------------------------------------------------------------

    def assigned(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions newly assigned to the stage: recovered together at the first sight of any of them."""
        for tp in partitions:
            self._state.pop((tp.topic, tp.partition), None)
            self._pending.add((tp.topic, tp.partition))

    def revoked(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions taken away: forget them (another instance moves them on; recovered again if they come back)."""
        for tp in partitions:
            self._state.pop((tp.topic, tp.partition), None)
            self._pending.discard((tp.topic, tp.partition))

    def check(self, topic: str, partition: int, offset: int, src: bytes | None) -> Lineage:
        """Whether the input at ``topic[partition]@offset`` with lineage ``src`` was already processed.

        Raises
        ------
        StageFailure
            The progress topic is missing and cannot be created.
        KafkaException
            A broker request failed: nothing is recovered, and the next call tries again (the runner
            keeps the message through the outage, ``kafka_unavailable``).
        """
        state = self._state.get((topic, partition))
        if state is None:
            state = self._recover(topic, partition)
        if offset <= state.made:
            return Lineage(topic, partition, offset, duplicate=True)
        trusted = self._trust(topic, partition, offset, src)
        if trusted is None:
            return Lineage(topic, partition, offset)
        up, up_offset = trusted
        seen = state.seen.get(up, [])
        i = bisect.bisect_left(seen, up_offset)
        duplicate = (i < len(seen) and seen[i] == up_offset) or (i == 0 and len(seen) >= self.window)
        return Lineage(topic, partition, offset, up, up_offset, duplicate)

    def progress(self, lineage: Lineage) -> ProgressRecord:
        """The progress record of ``lineage``'s input, to produce in its transaction."""
        state = self._state[(lineage.topic, lineage.partition)]
        seen = self._seen_after(state, lineage)
        record = {"stage": self.stage, "topic": lineage.topic, "partition": lineage.partition,
                  "offset": lineage.offset, "seen": seen}
        return ProgressRecord(self.progress_topic, lineage.partition,
                              f"{lineage.topic}:{lineage.partition}".encode(), serde.encode("progress", record),
                              {serde.SCHEMA_HEADER: serde.schema_tag("progress").encode()})

    def done(self, lineage: Lineage) -> None:
        """Record an input whose transaction (or, for a duplicate, offset commit) has committed."""
        state = self._state.setdefault((lineage.topic, lineage.partition), _State())
        state.made = max(state.made, lineage.offset)
        if not lineage.duplicate:
            state.seen = self._seen_after(state, lineage)

    def close(self) -> None:
        """Close the guard's reader (a consumer without a group membership)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # -- lineage checks ------------------------------------------------------------------------

    def _seen_after(self, state: _State, lineage: Lineage) -> dict[str, list[int]]:
        """``state.seen`` with ``lineage``'s upstream offset added (the last :attr:`window` kept)."""
        seen = {k: list(v) for k, v in state.seen.items()}
        if lineage.upstream is not None:
            offsets = seen.setdefault(lineage.upstream, [])
            i = bisect.bisect_left(offsets, lineage.upstream_offset)
            if i == len(offsets) or offsets[i] != lineage.upstream_offset:
                offsets.insert(i, lineage.upstream_offset)
            del offsets[:-self.window]
        return seen

    def _trust(self, topic: str, partition: int, offset: int, src: bytes | None) -> tuple[str, int] | None:
        """(``<topic>:<partition>``, offset) of a ``src`` that can be trusted, else None (rejected ones alarmed)."""
        if not src:
            return None
        parsed = parse_src(src)
        reason = self._distrust(parsed)
        if parsed is None or reason:
            self._reject(topic, partition, offset, reason or "malformed", src)
            return None
        return f"{parsed[0]}:{parsed[1]}", parsed[2]

    def _distrust(self, parsed: tuple[str, int, int] | None) -> str:
        """Why a parsed ``src`` cannot be trusted (``""``: it can; None in: malformed)."""
        if parsed is None:
            return "malformed"
        up_topic, up_partition, up_offset = parsed
        if self.upstream is not None and up_topic not in self.upstream:
            return "wrong_topic"
        if up_offset >= self._highs.get((up_topic, up_partition), 0):  # not known to exist yet: ask
            count = self._partition_count(up_topic, up_partition)
            if count < 0:
                return "upstream_unreadable"
            if up_partition >= count:
                return "no_partition"
            self._highs[(up_topic, up_partition)] = self._high(up_topic, up_partition)
            high = self._highs[(up_topic, up_partition)]
            if up_offset >= high:
                if not self._exists(up_topic, up_partition, up_offset, high):
                    return "beyond_high_watermark"
                self._highs[(up_topic, up_partition)] = up_offset + 1
        return ""

    def _exists(self, topic: str, partition: int, offset: int, high: int) -> bool:
        """Whether ``topic[partition]`` holds a committed message at ``offset`` (at or beyond ``high``).

        Asked only when ``offset`` is at or beyond the high watermark ``high`` the broker reports.
        Kafka's is exact, so a genuine ``src`` or progress record never gets here; tansu 0.6
        reports one past the *first* offset of the partition's last record batch (measured: 3
        records in one batch, high watermark 1), so a message batched with others at the end of
        its partition does. The partition is read from ``high - 1`` (a message that exists; its
        start when ``high`` is 0) to its end, the last batch, and for :data:`EOF_GRACE` after the
        end is first reached: a watermark read just before a batch became visible is not a
        verdict. An offset more than :data:`MAX_BATCH` beyond ``high`` is not read for.
        """
        if offset >= high + MAX_BATCH:
            return False
        consumer = self._consumer()
        consumer.assign([TopicPartition(topic, partition, high - 1 if high > 0 else OFFSET_BEGINNING)])
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                msg = consumer.poll(0.1)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() in _NOT_THERE:  # the end of the partition: wait a little for more
                        deadline = min(deadline, time.monotonic() + EOF_GRACE)
                    continue
                if int(msg.offset() or 0) >= offset:
                    return int(msg.offset() or 0) == offset
            return False
        finally:
            consumer.unassign()

    def _reject(self, topic: str, partition: int, offset: int, reason: str, what: bytes) -> None:
        """Count a rejected lineage claim; log it the first time per input partition and reason."""
        self.metrics.lineage_rejected.labels(self.stage, reason).inc()
        if (topic, partition, reason) not in self._logged:
            self._logged.add((topic, partition, reason))
            log.warning("%s: ignoring an untrustworthy lineage claim %r (%s) for input %s[%d], offset %d; it is "
                        "processed as if it had none. Further ones on this partition are only counted "
                        "(broker_lineage_rejected_total)", self.stage, what[:100], reason, topic, partition, offset)
        return None

    # -- the guard's reads ---------------------------------------------------------------------

    def _consumer(self) -> Consumer:
        """The guard's reader: assigns partitions itself (no group membership), short fetch waits."""
        if self._reader is None:
            self._reader = Consumer({**self.settings.consumer(None), "enable.partition.eof": True,
                                     "fetch.wait.max.ms": 10, "auto.offset.reset": "error",
                                     # under the stage's group prefix, which its principal may use
                                     "group.id": f"{self.settings.app_id}.{self.stage}.lineage"})
        return self._reader

    def _partition_count(self, topic: str, partition: int) -> int:
        """Partitions of ``topic``; asked again when ``partition`` is not among them.

        0 when the topic does not exist, -1 when the stage may not describe it (its principal
        lacks ``Describe`` on its upstream topic: a deployment error, see ``k8s/users.yaml``).
        """
        if self._partitions.get(topic, 0) <= partition:
            meta = self._consumer().list_topics(topic, timeout=self.timeout).topics.get(topic)
            err = meta.error if meta is not None else None
            denied = err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
            self._partitions[topic] = -1 if denied else len(meta.partitions) if meta is not None and err is None else 0
        return self._partitions[topic]

    def _high(self, topic: str, partition: int) -> int:
        """High watermark of ``topic[partition]``, asked of the broker."""
        return self._consumer().get_watermark_offsets(TopicPartition(topic, partition), timeout=self.timeout,
                                                      cached=False)[1]

    def _recover(self, topic: str, partition: int) -> _State:
        """Recover ``topic[partition]`` and every other assigned partition of ``topic`` not yet recovered."""
        start = time.monotonic()
        parts = sorted({partition} | {p for t, p in self._pending if t == topic})
        self._ensure_progress_topic(topic, max(parts))
        records = self._read_progress(topic, parts)
        recovered: dict[int, _State] = {}  # kept only once every request succeeded: a failed one is retried whole
        for p in parts:
            state = recovered[p] = _State()
            record = records.get(p)
            if record is None:
                continue
            high = self._high(topic, p)
            if record["offset"] >= high and not self._exists(topic, p, record["offset"], high):
                self._reject(topic, p, record["offset"], "progress_beyond_high_watermark",
                             f"{self.progress_topic}: {topic}:{p}:{record['offset']}".encode())
                continue
            state.made = record["offset"]
            state.seen = {k: sorted(v)[-self.window:] for k, v in record["seen"].items()}
        self._state.update({(topic, p): state for p, state in recovered.items()})
        self._pending -= {(topic, p) for p in parts}
        self.metrics.lineage_recovery.labels(self.stage).observe(time.monotonic() - start)
        return self._state[(topic, partition)]

    def _read_progress(self, topic: str, parts: list[int]) -> dict[int, dict]:
        """The last committed progress record of input ``topic`` on each of ``parts`` of the progress topic."""
        consumer = self._consumer()
        marks = {p: consumer.get_watermark_offsets(TopicPartition(self.progress_topic, p), timeout=self.timeout,
                                                   cached=False) for p in parts}
        todo = {p: (low, high) for p, (low, high) in marks.items() if high > low}
        found: dict[int, dict] = {}
        span = TAIL
        while todo:
            starts = {p: max(low, high - span) for p, (low, high) in todo.items()}
            found.update(self._read_tails(topic, starts))
            todo = {p: (low, high) for p, (low, high) in todo.items() if p not in found and starts[p] > low}
            span *= 8
        return found

    def _read_tails(self, topic: str, starts: dict[int, int]) -> dict[int, dict]:
        """Read each progress partition from its start offset to its end; the last valid record of each."""
        consumer = self._consumer()
        consumer.assign([TopicPartition(self.progress_topic, p, o) for p, o in starts.items()])
        left, found = set(starts), {}
        deadline = time.monotonic() + self.timeout
        try:
            while left and time.monotonic() < deadline:
                msg = consumer.poll(0.1)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        left.discard(int(msg.partition() or 0))
                    elif err.fatal():
                        raise KafkaException(err)
                    continue
                record = self._decode(msg, topic)
                if record is not None:
                    found[int(msg.partition() or 0)] = record
        finally:
            consumer.unassign()
        if left:
            log.warning("%s: %s partitions %s not read to their end within %.0f s; recovering from what was read",
                        self.stage, self.progress_topic, sorted(left), self.timeout)
        return found

    def _decode(self, msg: Message, topic: str) -> dict | None:
        """The progress record of input ``topic`` in ``msg`` (None: another input's, or undecodable)."""
        partition = int(msg.partition() or 0)
        key = msg.key()
        if (key.encode() if isinstance(key, str) else key) != f"{topic}:{partition}".encode():
            return None
        try:
            record = serde.decode("progress", msg.value(), serde.message_headers(msg))
        except DecodeError:
            self._reject(topic, partition, int(msg.offset() or 0), "progress_undecodable",
                         f"{self.progress_topic}[{partition}]@{msg.offset()}".encode())
            return None
        return record if record["topic"] == topic and record["partition"] == partition else None

    def _ensure_progress_topic(self, topic: str, partition: int) -> None:
        """Create ``progress.<stage>`` (or add partitions) when it has no partition ``partition``.

        ``broker topics`` creates it with the pipeline's topics (:func:`streams.stages.pipeline_topics`);
        this covers a stage run on topics made otherwise (tests, a new stage). It gets the input
        topic's partitions and replication, and :data:`streams.topics.PROGRESS_CONFIG`.
        """
        if self._partition_count(self.progress_topic, partition) > partition:
            return
        have = self._partitions[self.progress_topic]
        meta = self._consumer().list_topics(topic, timeout=self.timeout).topics.get(topic)
        parts = meta.partitions if meta is not None and meta.error is None else {}
        want = max(len(parts), partition + 1)
        replication = len(next(iter(parts.values())).replicas) if parts else 1
        admin = AdminClient(self.settings.common())
        futures = (admin.create_partitions([NewPartitions(self.progress_topic, want)]) if have else
                   admin.create_topics([NewTopic(self.progress_topic, want, replication,
                                                 config=dict(topics.PROGRESS_CONFIG))]))
        try:
            for fut in futures.values():
                fut.result(self.timeout)
        except KafkaException as exc:
            if "ALREADY_EXISTS" not in str(exc) and "INVALID_PARTITIONS" not in str(exc):
                raise StageFailure(f"{self.stage}: cannot create its progress topic {self.progress_topic} "
                                   f"({want} partitions): {exc}; create it with `broker topics`") from exc
        deadline = time.monotonic() + self.timeout
        while self._partition_count(self.progress_topic, partition) <= partition:  # until the metadata has it
            if time.monotonic() > deadline:
                raise StageFailure(f"{self.stage}: {self.progress_topic} has no partition {partition} "
                                   f"{self.timeout:.0f} s after its creation")
            time.sleep(0.1)
        log.info("%s: created %s with %d partitions", self.stage, self.progress_topic, want)
