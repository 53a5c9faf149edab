"""The stage runner: consume -> decode -> call -> encode -> produce -> commit, exactly once.

Each input message is processed in its own Kafka transaction that holds the outputs (or the
dead-letter record) and the consumer offset, so a crash at any point either commits both or
neither: no message is lost and none is processed twice as seen by ``read_committed`` readers.
The ``transactional.id`` is stable per (stage, instance) so that a restarted instance fences its
killed predecessor and aborts its open transaction at once. Inputs that an upstream stage
emitted twice are dropped by their lineage header (:mod:`streams.lineage`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from broker.errors import BrokerError, StageFailure
from streams import serde, topics
from streams.lineage import SRC_HEADER, Deduplicator, src_of
from streams.metrics import StageMetrics
from streams.settings import KafkaSettings

log = logging.getLogger(__name__)

#: Failpoints for crash tests: ``BROKER_CRASH_IN_TRANSACTION=<stage>:<n>[,<stage>:<n>...]`` makes
#: the stage SIGKILL itself while its n-th message's transaction is open (outputs produced,
#: nothing committed).
FAILPOINT_ENV = "BROKER_CRASH_IN_TRANSACTION"

#: Header prefix of the timing headers (Unix seconds as text).
TIMING_PREFIX = "t."
EXPOSURE_END = "t.exposure_end"


@dataclass
class InMessage:
    """A consumed message, as a handler sees it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp_ms: int


@dataclass
class OutMessage:
    """A message a handler wants produced (in the input's transaction)."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: dict[str, bytes] = field(default_factory=dict)
    candidates: int | None = None  # for the candidates-per-frame metric


Handler = Callable[[InMessage], list[OutMessage]]


def in_message(msg: Message) -> InMessage:
    """A consumed message as a handler sees it: coordinates, key, value, headers (as bytes) and timestamp.

    ``msg`` carries no error (its topic, partition and offset are set). Used by :class:`StageRunner`
    and by the archive stage (``streams/archiver.py``), which consumes outside a transaction.
    """
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    headers = {k: v.encode() if isinstance(v, str) else (v or b"") for k, v in pairs}
    key = msg.key()
    return InMessage(str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0),
                     key.encode() if isinstance(key, str) else key, msg.value(), headers, msg.timestamp()[1])


def error_reason(exc: BaseException) -> str:
    """The dead-letter reason of ``exc``.

    Its ``reason`` for a :class:`BrokerError` (expected,
    bad input), ``unexpected:<Type>`` for anything else (a bug).
    """
    return exc.reason if isinstance(exc, BrokerError) else f"unexpected:{type(exc).__name__}"


def dead_letter(stage: str, msg: InMessage, exc: BaseException) -> OutMessage:
    """The dead-letter record of ``msg``: original bytes, error class, reason, message, offset."""
    reason = error_reason(exc)
    record = {
        "stage": stage, "error_class": type(exc).__name__, "reason": reason, "message": str(exc)[:4000],
        "topic": msg.topic, "partition": msg.partition, "offset": msg.offset,
        "timestamp_ms": msg.timestamp_ms, "key": msg.key, "value": msg.value, "headers": msg.headers,
    }
    headers = {serde.SCHEMA_HEADER: serde.schema_tag("dlq").encode(), "reason": reason.encode()}
    return OutMessage(topics.dlq(stage), serde.encode("dlq", record), msg.key, headers)


class StageRunner:
    """Run ``handler`` over ``input_topic`` as consumer group ``<app_id>.<stage>``.

    Parameters
    ----------
    stage : str
        Stage name: the consumer group, the dead-letter topic ``dlq.<stage>`` and metrics label.
    input_topic : str
    handler : callable
        ``InMessage -> list[OutMessage]``. A :class:`BrokerError` it raises (bad input) dead-letters
        the message with the error's reason and the stage carries on. Any other exception (a bug)
        is logged with its traceback, counted in ``broker_unexpected_errors``, dead-lettered as
        ``unexpected:<Type>``, and after ``max_unexpected`` of them in a row :meth:`run` raises
        :class:`~broker.errors.StageFailure` so that the process exits non-zero.
    settings : KafkaSettings
    metrics : StageMetrics, optional
    instance : int
        Index of this process among the stage's replicas (keys its ``transactional.id``).
    outputs : tuple of str
        Topics the stage writes, read back by the restart guard (:class:`Deduplicator`).
    max_unexpected : int
        Unexpected errors in a row after which the stage stops (count; 0: never).
        Default 5 (``PipelineConfig.max_consecutive_unexpected``).
    """

    def __init__(self, stage: str, input_topic: str, handler: Handler, settings: KafkaSettings,
                 metrics: StageMetrics | None = None, instance: int = 0, outputs: tuple[str, ...] = (),
                 max_unexpected: int = 5) -> None:
        self.stage = stage
        self.input_topic = input_topic
        self.handler = handler
        self.settings = settings
        self.metrics = metrics or StageMetrics(stage)
        self.instance = instance
        self.stop_event = threading.Event()
        self.dedup = Deduplicator(settings, outputs=outputs)
        self.max_unexpected = max_unexpected
        self._unexpected_in_a_row = 0
        self._seen = 0
        points = dict(p.partition(":")[::2] for p in os.environ.get(FAILPOINT_ENV, "").split(",") if p)
        self._crash_at = int(points[stage]) if points.get(stage, "").isdigit() else None

    def install_signal_handlers(self) -> None:
        """Stop after the message in hand on SIGTERM or Ctrl-C."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())

    def run(self, max_messages: int | None = None, idle_timeout: float | None = None) -> int:
        """Process messages until stopped (or ``max_messages`` / ``idle_timeout`` s idle); return the count.

        Raises
        ------
        StageFailure
            ``max_unexpected`` unexpected errors in a row (each message already dead-lettered).
        KafkaException
            A fatal Kafka error (e.g. fenced by a newer instance of the stage).
        """
        consumer = Consumer(self.settings.consumer(self.stage))
        producer = Producer(self.settings.producer(f"{self.stage}.{self.instance}"))
        producer.init_transactions(30)
        consumer.subscribe([self.input_topic])
        done, last = 0, time.monotonic()
        try:
            while not self.stop_event.is_set() and (max_messages is None or done < max_messages):
                msg = consumer.poll(0.5)
                if msg is None:
                    if idle_timeout is not None and time.monotonic() - last > idle_timeout:
                        break
                    continue
                err = msg.error()
                if err is not None:
                    if err.fatal():
                        raise KafkaException(err)
                    log.warning("%s: consumer error %s", self.stage, err)
                    continue
                self._process(consumer, producer, msg)
                done += 1
                last = time.monotonic()
        finally:
            consumer.close()
            producer.flush(10)
        return done

    def _process(self, consumer: Consumer, producer: Producer, raw: Message) -> None:
        msg = in_message(raw)
        self.metrics.messages_in.labels(self.stage).inc()
        start = time.time()
        src = msg.headers.get(SRC_HEADER)
        outs, unexpected = self._handle(msg, src)
        end = time.time()
        timing = {k: v for k, v in msg.headers.items() if k.startswith(TIMING_PREFIX)}
        timing[f"{TIMING_PREFIX}{self.stage}.start"] = repr(start).encode()
        timing[f"{TIMING_PREFIX}{self.stage}.end"] = repr(end).encode()
        timing[SRC_HEADER] = src_of(msg.topic, msg.partition, msg.offset)
        offsets = [TopicPartition(msg.topic, msg.partition, msg.offset + 1)]
        if not outs:
            # nothing to make atomic: a crash before this commit just redoes a no-op. (tansu 0.6
            # drops the offsets of a transaction that produced no record, so don't use one.)
            consumer.commit(offsets=offsets, asynchronous=False)
        elif not self._commit_in_transaction(consumer, producer, msg, outs, timing, offsets):
            return
        self.dedup.done(msg.topic, msg.partition, msg.offset, src)
        self._observe(msg, outs, start, end)
        self._unexpected_in_a_row = self._unexpected_in_a_row + 1 if unexpected else 0
        if self.max_unexpected and self._unexpected_in_a_row >= self.max_unexpected:
            raise StageFailure(f"{self.stage}: {self._unexpected_in_a_row} unexpected errors in a row "
                               f"(the last at {msg.topic}[{msg.partition}]@{msg.offset}); stopping")

    def _handle(self, msg: InMessage, src: bytes | None) -> tuple[list[OutMessage], bool]:
        """Call the handler: its outputs or the dead-letter record, and whether the error was a bug.

        The handler's outputs, or the dead-letter record of its error; and whether that error
        was unexpected (not a :class:`BrokerError`).
        """
        try:
            if self.dedup.is_duplicate(msg.topic, msg.partition, msg.offset, src):
                log.warning("%s: dropping %s[%d]@%d, a duplicate of upstream %s", self.stage, msg.topic,
                            msg.partition, msg.offset, src)
                self.metrics.duplicates.labels(self.stage).inc()
                return [], False
            return self.handler(msg), False
        except BrokerError as exc:  # bad input: dead-letter it with its reason and carry on
            log.warning("%s: dead-lettering %s[%d]@%d (%s): %s", self.stage, msg.topic, msg.partition,
                        msg.offset, exc.reason, exc)
            self.metrics.errors.labels(self.stage, exc.reason).inc()
            return [dead_letter(self.stage, msg, exc)], False
        except Exception as exc:  # a bug: keep the message, make it visible, stop if it repeats
            log.exception("%s: unexpected error on %s[%d]@%d; dead-lettering it", self.stage, msg.topic,
                          msg.partition, msg.offset)
            self.metrics.errors.labels(self.stage, error_reason(exc)).inc()
            self.metrics.unexpected.labels(self.stage, type(exc).__name__).inc()
            return [dead_letter(self.stage, msg, exc)], True

    def _commit_in_transaction(self, consumer: Consumer, producer: Producer, msg: InMessage,
                               outs: list[OutMessage], timing: dict[str, bytes], offsets: list) -> bool:
        """Produce ``outs`` and commit ``offsets`` atomically; False when aborted (to be redone)."""
        try:
            producer.begin_transaction()
            for out in outs:
                producer.produce(out.topic, out.value, out.key, headers={**timing, **out.headers})
            self._seen += 1
            if self._seen == self._crash_at:
                producer.flush(10)  # the outputs reach the broker, uncommitted
                os.kill(os.getpid(), signal.SIGKILL)
            producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
            producer.commit_transaction(60)
            return True
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if not err.txn_requires_abort():
                raise  # fatal (e.g. fenced by a newer instance): exit and let the supervisor restart
            producer.abort_transaction(30)
            self.metrics.aborts.labels(self.stage).inc()
            consumer.seek(TopicPartition(msg.topic, msg.partition, msg.offset))  # process it again
            return False

    def _observe(self, msg: InMessage, outs: list[OutMessage], start: float, end: float) -> None:
        m = self.metrics
        m.duration.labels(self.stage).observe(end - start)
        for out in outs:
            m.messages_out.labels(self.stage, out.topic).inc()
            if out.candidates is not None:
                m.candidates.labels(self.stage).observe(out.candidates)
        exposure_end = msg.headers.get(EXPOSURE_END)
        if exposure_end:
            try:
                m.latency.labels(self.stage).observe(max(0.0, time.time() - float(exposure_end)))
            except ValueError:
                pass  # a producer's malformed header must not stop the stage
