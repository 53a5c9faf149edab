"""The archive stage: every alert of the alert topic into the Parquet archive, exactly once across crashes.

Unlike the per-message stages (:mod:`streams.runner`), it consumes in batches of
``[archive] batch_alerts`` alerts, ``batch_bytes`` bytes of messages or ``batch_seconds`` s. A batch is written
as files, then one commit record naming the files and the offsets they cover
(:class:`broker.archive.writer.ArchiveWriter`): the archive, not Kafka, knows where each partition
stands. On start the stage deletes the files of a batch that never committed and seeks every
assigned partition to the offset after the last archived one, so a crash at any point neither loses
nor repeats an alert. It also commits those offsets to Kafka afterwards, only so that lag monitoring
(``stage_backlog``, KEDA) sees it.

Undecodable messages go to ``dlq.archive`` with their reason, produced before the batch commits: a
crash between the two repeats a dead letter, never loses one. ``docs/architecture.md``, "The archive".
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field

import pyarrow as pa
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from prometheus_client import Counter, Histogram

from broker.archive.config import ArchiveConfig
from broker.archive.log import Commit, OffsetRange
from broker.archive.reader import Archive
from broker.archive.rows import Archived, to_batch, version_of
from broker.archive.writer import ArchiveWriter
from broker.config import PipelineConfig
from broker.errors import ArchiveCorrupt, BrokerError, DecodeError, Outage, StageFailure
from streams import serde, topics
from streams.framing import decode_alert
from streams.metrics import StageMetrics
from streams.runner import (
    EXPOSURE_END,
    SEARCHED_LATE,
    InMessage,
    OutageWaits,
    OutMessage,
    dead_letter,
    error_reason,
    in_message,
    parse_time,
)
from streams.settings import KafkaSettings

log = logging.getLogger(__name__)

#: Failpoints for crash tests: ``BROKER_CRASH_IN_ARCHIVE=files:<n>`` makes the archive stage
#: SIGKILL itself at its n-th batch after writing the batch's files (no commit record yet),
#: ``commit:<n>`` after writing the commit record (offsets not yet committed to Kafka).
FAILPOINT_ENV = "BROKER_CRASH_IN_ARCHIVE"
_BATCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)
#: A ``schema`` header naming an alert version, the only kind passed on to ``version_of``.
_ALERT_TAG = re.compile(r"alert/[0-9]{1,6}")


def archive_url(config: PipelineConfig) -> str:
    """The archive of ``config``: ``[archive] path``, or ``<state_dir>/archive``."""
    return config.archive.path or str(config.state_dir / "archive")


def alert_tag(headers: dict[str, bytes]) -> str | None:
    """The ``schema`` header of an alert message when it names an alert version (``alert/<1-6 digits>``), else None.

    It only says which version :func:`broker.archive.rows.version_of` tries first (the record's
    fields decide), so any other value is ignored: ``alert/²`` or ``alert/`` and 5000 digits made
    ``version_of`` raise ``ValueError``, and a valid alert was dead-lettered ``unexpected:ValueError``
    instead of archived.
    """
    tag = headers.get(serde.SCHEMA_HEADER, b"").decode("ascii", errors="replace")
    return tag if _ALERT_TAG.fullmatch(tag) else None


class ArchiveMetrics:
    """The archive stage's own metrics, beside the :class:`StageMetrics` in the same registry."""

    def __init__(self, metrics: StageMetrics) -> None:
        r = metrics.registry
        self.batches = Counter("broker_archive_batches", "Batches committed to the archive", ["stage"], registry=r)
        self.alerts = Counter("broker_archive_alerts", "Alerts committed to the archive", ["stage"], registry=r)
        self.files = Counter("broker_archive_files", "Parquet files committed", ["stage"], registry=r)
        self.bytes = Counter("broker_archive_bytes", "Bytes of the Parquet files committed", ["stage"], registry=r)
        self.orphans = Counter("broker_archive_orphans_removed",
                               "Files of uncommitted batches deleted at start-up", ["stage"], registry=r)
        self.compactions = Counter("broker_archive_compactions", "Compactions (small files merged into one)",
                                   ["stage"], registry=r)
        self.corrupt = Counter("broker_archive_corrupt_files", "Compactions stopped by a file failing its checksum",
                               ["stage"], registry=r)
        self.batch_seconds = Histogram("broker_archive_batch_seconds", "Time to write and commit one batch",
                                       ["stage"], buckets=_BATCH_BUCKETS, registry=r)


@dataclass
class _Batch:
    """Messages read since the last commit."""

    pending: list[tuple[InMessage, list[Archived]]] = field(default_factory=list)  # decoded, not yet rows
    dead: list[OutMessage] = field(default_factory=list)
    ranges: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # [first, next) per partition
    alerts: int = 0
    messages: int = 0
    bytes: int = 0  # keys and values of its messages
    exposure_ends: list[float] = field(default_factory=list)
    started: float = 0.0  # time.monotonic() of its first message


class Archiver:
    """Consume ``input_topic`` as group ``<app_id>.<stage>`` and archive every alert in batches.

    Parameters
    ----------
    config : ArchiveConfig
        Batch size and delay, night longitudes, Parquet codec.
    url : str
        The archive (:func:`archive_url`).
    settings : KafkaSettings
    metrics : StageMetrics, optional
    stage : str
        Stage name: consumer group, dead-letter topic ``dlq.<stage>``, metrics label.
    input_topic : str
    max_unexpected : int
        Unexpected (non-:class:`BrokerError`) decode errors in a row after which :meth:`run`
        raises :class:`StageFailure`, once their dead letters are committed (0: never).
    registry : str, optional
        Schema registry URL to read ``confluent``-framed alerts with (else their ``schema`` header).

    One archive has one archive stage process (it reads every partition): a second writer's
    commit fails rather than interleave.
    """

    def __init__(self, config: ArchiveConfig, url: str, settings: KafkaSettings,
                 metrics: StageMetrics | None = None, stage: str = "archive", input_topic: str = topics.ALERTS,
                 max_unexpected: int = 5, registry: str | None = None) -> None:
        self.config = config
        self.registry = registry
        self.writer = ArchiveWriter(Archive(url), config)
        self.settings = settings
        self.metrics = metrics or StageMetrics(stage)
        self.archive_metrics = ArchiveMetrics(self.metrics)
        self.stage = stage
        self.input_topic = input_topic
        self.max_unexpected = max_unexpected
        self.stop_event = threading.Event()
        self.batch = _Batch()
        self._unexpected_in_a_row = 0
        self._flushes = 0
        self.outages = OutageWaits(stage, self.metrics, self.stop_event)
        point, _, n = os.environ.get(FAILPOINT_ENV, "").partition(":")
        self._crash_at = (point, int(n)) if n.isdigit() else None
        self._producer: Producer | None = None

    def install_signal_handlers(self) -> None:
        """Commit the batch in hand and stop on SIGTERM or Ctrl-C."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())

    def run(self, max_messages: int | None = None, idle_timeout: float | None = None) -> int:
        """Archive messages until stopped (or ``max_messages`` / ``idle_timeout`` s idle); return the count.

        The batch in hand is committed before returning.

        Raises
        ------
        StageFailure
            ``max_unexpected`` unexpected errors in a row (their dead letters committed).
        KafkaException
            A fatal Kafka error.
        """
        removed = self.writer.recover()
        if removed:
            log.warning("%s: deleted %d file(s) of a batch that never committed: %s", self.stage, len(removed),
                        removed)
            self.archive_metrics.orphans.labels(self.stage).inc(len(removed))
        consumer = Consumer(self.metrics.watching(self.settings.consumer(self.stage)))
        self._producer = Producer(self.settings.producer())
        consumer.subscribe([self.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        done, last = 0, time.monotonic()
        try:
            while not self.stop_event.is_set() and (max_messages is None or done < max_messages):
                msg = consumer.poll(0.5)
                self.metrics.observe_lag(consumer)  # local reads, at most once a second
                if msg is not None and self._taken(consumer, msg):
                    done, last = done + 1, time.monotonic()
                elif idle_timeout is not None and time.monotonic() - last > idle_timeout:
                    break
                if self._due():
                    self._flush(consumer)
            self._flush(consumer)
        finally:
            consumer.close()
            self._producer.flush(10)
        return done

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        """Start each assigned partition where the archive stands (the archive is the source of truth)."""
        positions = self.writer.positions()
        for tp in parts:
            tp.offset = positions.get((tp.topic, tp.partition), OFFSET_BEGINNING)
        log.info("%s: assigned %s", self.stage, [(tp.topic, tp.partition, tp.offset) for tp in parts])
        consumer.assign(parts)

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        """Drop the uncommitted batch: its messages are read again from the archive's offsets."""
        if self.batch.messages:
            log.info("%s: partitions revoked; %d uncommitted message(s) will be read again", self.stage,
                     self.batch.messages)
        self.batch = _Batch()

    def _due(self) -> bool:
        """Whether the batch is to be committed: ``batch_alerts``, ``batch_bytes`` or ``batch_seconds`` reached."""
        b, c = self.batch, self.config
        return bool(b.messages) and (b.alerts >= c.batch_alerts or b.messages >= c.batch_alerts
                                     or b.bytes >= c.batch_bytes or time.monotonic() - b.started >= c.batch_seconds)

    def _taken(self, consumer: Consumer, raw: Message) -> bool:
        """:meth:`_take`, or, on an :class:`~broker.errors.Outage`, the message kept and polled again after a wait.

        The waits are the stages' (:class:`streams.runner.OutageWaits`); a stop request ends one.
        Meanwhile the batch in hand is committed when due, up to the message kept.
        """
        try:
            return self._take(raw)
        except Outage as exc:
            self.outages.keep(consumer, in_message(raw), exc)
            return False

    def _take(self, raw: Message) -> bool:
        """Add one consumed message to the batch (its alerts, or its dead letter); False for a consumer event."""
        err = raw.error()
        if err is not None:
            if err.fatal():
                raise KafkaException(err)
            log.warning("%s: consumer error %s", self.stage, err)
            return False
        msg = in_message(raw)
        error: Exception | None = None
        try:
            alerts = self._alerts(msg)
        except Outage:
            raise  # the schema registry down: not the message's fault, _taken keeps it
        except Exception as exc:  # a BrokerError is bad input, anything else a bug: both are dead-lettered
            alerts, error = [], exc
        self.outages.retries = 0
        self.metrics.messages_in.labels(self.stage).inc()
        b = self.batch
        if not b.messages:
            b.started = time.monotonic()
        b.messages += 1
        b.bytes += len(msg.key or b"") + len(msg.value or b"")
        b.ranges.setdefault((msg.topic, msg.partition), [msg.offset, msg.offset + 1])[1] = msg.offset + 1
        if error is not None:
            self._dead_letter(msg, error)
            return True
        b.pending.append((msg, alerts))
        b.alerts += len(alerts)
        end = parse_time(msg.headers.get(EXPOSURE_END))  # None: absent or malformed (never trusted)
        if end is not None and SEARCHED_LATE not in msg.headers:  # a left-out frame's, late by design
            b.exposure_ends.append(end)
        self._unexpected_in_a_row = 0
        return True

    def _alerts(self, msg: InMessage) -> list[Archived]:
        """The alerts of one message, with their schema versions."""
        msg.require_headers()
        records = decode_alert(msg.key, msg.value, msg.headers, registry=self.registry)
        if not records:
            raise DecodeError("the message holds no alert")
        tag = alert_tag(msg.headers)
        return [Archived(r, version_of(r, tag), msg.topic, msg.partition, msg.offset) for r in records]

    def _rows(self, pending: list[tuple[InMessage, list[Archived]]]) -> list[pa.RecordBatch]:
        """The archive rows of the batch, one record batch per schema version.

        Built for the whole batch at once (ten times faster than per message); when that fails, per
        message, and the messages whose alerts do not fit their columns are dead-lettered.
        """
        alerts = [a for _, mine in pending for a in mine]
        try:
            return [to_batch([a for a in alerts if a.version == v], self.config.longitudes)
                    for v in sorted({a.version for a in alerts})]
        except BrokerError:
            rows = []
            for msg, mine in pending:
                try:
                    rows += [to_batch([a for a in mine if a.version == v], self.config.longitudes)
                             for v in sorted({a.version for a in mine})]
                except Exception as exc:  # bad input or a bug: dead-lettered either way
                    self._dead_letter(msg, exc)
                    self.batch.alerts -= len(mine)
            return rows

    def _dead_letter(self, msg: InMessage, exc: Exception) -> None:
        reason = error_reason(exc)
        if isinstance(exc, BrokerError):
            log.warning("%s: dead-lettering %s[%d]@%d (%s): %s", self.stage, msg.topic, msg.partition, msg.offset,
                        reason, exc)
            self._unexpected_in_a_row = 0
        else:
            log.error("%s: unexpected error on %s[%d]@%d; dead-lettering it", self.stage, msg.topic, msg.partition,
                      msg.offset, exc_info=exc)
            self.metrics.unexpected.labels(self.stage, type(exc).__name__).inc()
            self._unexpected_in_a_row += 1
        self.metrics.errors.labels(self.stage, reason).inc()
        self.batch.dead.append(dead_letter(self.stage, msg, exc))

    def _flush(self, consumer: Consumer) -> None:
        """Commit the batch: dead letters, then files, then the commit record, then the Kafka offsets."""
        b = self.batch
        if not b.messages:
            return
        start = time.monotonic()
        rows = self._rows(b.pending) if b.pending else []
        self._send_dead_letters(b.dead)
        offsets = [OffsetRange(t, p, first, nxt) for (t, p), (first, nxt) in sorted(b.ranges.items())]
        commit = self._commit(rows, offsets, len(b.dead))
        self.batch = _Batch()
        try:  # for lag monitoring only: on restart the archive's offsets win
            consumer.commit(offsets=[TopicPartition(o.topic, o.partition, o.next) for o in offsets],
                            asynchronous=False)
        except KafkaException as exc:
            log.warning("%s: could not commit offsets to Kafka (lag monitoring only): %s", self.stage, exc)
        self._observe(b, commit.seq, list(commit.files), time.monotonic() - start)
        self._compact()
        if self.max_unexpected and self._unexpected_in_a_row >= self.max_unexpected:
            raise StageFailure(f"{self.stage}: {self._unexpected_in_a_row} unexpected errors in a row; stopping")

    def _commit(self, rows: list[pa.RecordBatch], offsets: list[OffsetRange], dead: int) -> Commit:
        """Write the batch's files, then its commit record.

        Raises
        ------
        StageFailure
            The archive's store cannot be written (a folder gone, a disk full, an object store
            down): nothing of the batch is committed, and the restarted stage archives it again from
            the archive's own offsets (``broker stage`` exits 3, naming the store and its error).
        """
        try:
            files = self.writer.write(rows) if rows else []
            self._flushes += 1
            self._failpoint("files")
            commit = self.writer.commit(files, offsets, dead)
        except BrokerError:
            raise
        except Exception as exc:
            raise StageFailure(f"{self.stage}: the archive {self.writer.archive.url} cannot be written "
                               f"({type(exc).__name__}: {exc}); the batch is not committed, and the stage "
                               "archives it again once restarted") from exc
        self._failpoint("commit")
        return commit

    def _compact(self) -> None:
        """Merge small files (:meth:`ArchiveWriter.compact`) and delete retired ones past their time.

        A file that fails its checksum is left as it is, logged and counted (queries report it),
        and the stage carries on archiving.
        """
        try:
            merged = self.writer.compact()
        except ArchiveCorrupt as exc:
            log.error("%s: compaction stopped: %s", self.stage, exc)
            self.archive_metrics.corrupt.labels(self.stage).inc()
            return
        if merged:
            self.archive_metrics.compactions.labels(self.stage).inc(len(merged))
            log.info("%s: compacted %d file(s) into %d", self.stage, sum(len(c.removed) for c in merged), len(merged))
        self.writer.vacuum()

    def _send_dead_letters(self, dead: list[OutMessage]) -> None:
        """Produce the batch's dead letters and wait for every delivery report.

        A batch holds up to ``batch_alerts`` dead letters of up to ``dlq_value_bytes`` (1 MiB) each,
        more than the producer's queue (1 GiB): a full queue is waited on, its delivery reports served.

        Raises
        ------
        StageFailure
            A dead letter refused (``MSG_SIZE_TOO_LARGE`` on a ``dlq.archive`` made with a smaller
            limit, say: such a report left nothing in the queue, so it passed as delivered and the
            batch committed without it) or not delivered within 30 s: the batch is not committed.
        """
        if not dead:
            return
        assert self._producer is not None  # set by run()
        errors: list[KafkaError] = []
        for out in dead:
            while True:
                try:
                    self._producer.produce(out.topic, out.value, out.key, headers={**out.headers},
                                           on_delivery=lambda err, _: errors.append(err) if err is not None else None)
                    break
                except BufferError:  # was raised out of the stage, which met the same batch at every restart
                    self._producer.poll(0.5)
            self.metrics.messages_out.labels(self.stage, out.topic).inc()
        left = self._producer.flush(30)
        if left or errors:
            why = f"{len(errors)} refused ({errors[0].str()})" if errors else f"{left} not delivered"
            raise StageFailure(f"{self.stage}: dead letter(s) {why}; the batch is not committed")

    def _failpoint(self, point: str) -> None:
        if self._crash_at == (point, self._flushes):
            log.warning("%s: failpoint %s:%d, SIGKILL", self.stage, point, self._flushes)
            os.kill(os.getpid(), signal.SIGKILL)

    def _observe(self, b: _Batch, seq: int, files: list, seconds: float) -> None:
        m, am = self.metrics, self.archive_metrics
        am.batches.labels(self.stage).inc()
        am.alerts.labels(self.stage).inc(b.alerts)
        am.files.labels(self.stage).inc(len(files))
        am.bytes.labels(self.stage).inc(sum(f.size for f in files))
        am.batch_seconds.labels(self.stage).observe(seconds)
        now = time.time()
        for end in b.exposure_ends:
            m.latency.labels(self.stage).observe(max(0.0, now - end))
        log.info("%s: commit %d: %d alert(s) in %d file(s), %d dead letter(s), %.2f s", self.stage, seq, b.alerts,
                 len(files), len(b.dead), seconds)
