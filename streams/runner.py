"""The stage runner: consume -> decode -> call -> encode -> produce -> commit, exactly once.

Each input message is processed in its own Kafka transaction that holds the outputs (or the
dead-letter record) and the consumer offset, so a crash at any point either commits both or
neither: no message is lost and none is processed twice as seen by ``read_committed`` readers.
The ``transactional.id`` is stable per (stage, instance) so that a restarted instance fences its
killed predecessor and aborts its open transaction at once. Inputs that an upstream stage
emitted twice are dropped by their lineage header (:mod:`streams.lineage`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from broker.errors import (
    BrokerError,
    DecodeError,
    InvalidTopic,
    KafkaUnavailable,
    Outage,
    OutputTooLarge,
    StageFailure,
    UndeliverableOutput,
    storage_full,
)
from streams import serde, topics
from streams.lineage import SRC_HEADER, Deduplicator, Lineage, ProgressRecord, src_of
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
#: Timing header of a batch of a frame its field's new reference left out, searched against it long after its
#: shutter closed (:func:`streams.stages._left_out_outputs`): when it was searched. Its messages are kept out of
#: ``broker_latency_from_exposure_seconds``, which the alert-latency SLO reads (docs/architecture.md, Observability).
SEARCHED_LATE = "t.searched_late"
#: Names a timing header may have: ``t.exposure_end``, ``t.searched_late`` and ``t.<stage>.start|end``.
_TIMING_NAME = re.compile(r"t\.(exposure_end|searched_late|[a-z][a-z0-9_-]{0,31}\.(start|end))")
#: How far in the future a timing header may lie (s): producers' and stages' clocks disagree a little.
MAX_CLOCK_SKEW_S = 86400.0
#: Timing headers kept per message at most (a pipeline of six stages sets eleven).
MAX_TIMING_HEADERS = 32

#: Room left in an output for the runner's own headers (timing, lineage) and Kafka's record-batch
#: overhead when its size is checked against the topic limit (bytes).
HEADROOM_BYTES = 64 * 1024
#: Default of ``PipelineConfig.dlq_value_bytes``: bytes of a longer original value a dead letter keeps.
DLQ_VALUE_BYTES = 1024 * 1024
#: Bytes a dead letter keeps of the original key, and of each original header value.
DLQ_FIELD_BYTES = 64 * 1024
#: Bytes a dead letter keeps of the original headers in all (names and values).
DLQ_HEADERS_BYTES = 256 * 1024
#: Kafka errors by which the broker (or the client, before sending) refuses one output for good:
#: the input is dead-lettered instead of retried.
_REFUSED = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.TOPIC_EXCEPTION,
                      KafkaError.INVALID_RECORD, KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC,
                      KafkaError._INVALID_ARG})
_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
#: Exit status of a stage whose transaction blocked past ``PipelineConfig.transaction_deadline_s``.
EXIT_HUNG = 4
#: Waits before the 1st, 2nd, ... retry of a message kept through an outage (s; the last repeats). A
#: history that stays down takes ``[history] connect_timeout_s`` (60 s) per try on top: together under
#: the consumer's 300 s ``max.poll.interval.ms``, so the stage keeps its partitions while it waits.
OUTAGE_WAITS_S = (1.0, 5.0, 15.0, 30.0, 60.0)
#: librdkafka's errors of no broker answering: a request made outside the consumer's loop (the
#: duplicate guard's) that fails with one is an outage, not a reason to exit.
_UNREACHABLE = (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT, KafkaError._RESOLVE)


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Exit the process with :data:`EXIT_HUNG` if the block is still running after ``seconds`` (0: no limit).

    For calls that should time out but may not: librdkafka's transactional calls wait without
    limit for a coordinator whose broker handle is being replaced (seen after the embedded broker
    restarted). Exiting is safe where it is used: nothing of the open transaction is committed,
    and the restarted stage resumes from its committed offsets and progress records.
    """
    def expire() -> None:
        log.critical("%s still blocked after %.0f s; exiting with status %d for the supervisor to restart the stage",
                     what, seconds, EXIT_HUNG)
        logging.shutdown()
        os._exit(EXIT_HUNG)

    timer = threading.Timer(seconds, expire) if seconds > 0 else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


@dataclass
class InMessage:
    """A consumed message, as a handler sees it.

    ``unreadable_headers`` says why its headers could not be read (they are then empty): the
    consumer dead-letters it (:meth:`require_headers`) instead of handling it.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp_ms: int
    unreadable_headers: str | None = None

    def require_headers(self) -> None:
        """Raise :class:`DecodeError` when the headers could not be read (:func:`streams.serde.message_headers`)."""
        if self.unreadable_headers is not None:
            raise DecodeError(self.unreadable_headers)


@dataclass
class OutMessage:
    """A message a handler wants produced (in the input's transaction)."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: dict[str, bytes] = field(default_factory=dict)
    candidates: int | None = None  # for the candidates-per-frame metric
    # reasons of the frames a refused reference build set aside in this call (broker_reference_frames_set_aside_total)
    set_aside: tuple[str, ...] = ()
    # the outcome of a left-out frame's search this output gives (broker_left_out_searched_total)
    left_out: str | None = None
    # what is committed in its place when the input is dead-lettered for an output refused for good
    # (StageRunner._in_place_of): a left-out frame's search, which the frame ledger already holds as done, keeps
    # a dead letter of its own instead of being lost with the refused transaction; None: nothing
    if_refused: Callable[[BrokerError], OutMessage] | None = None
    # its own timing headers (t.*), in place of the input's, this stage's start and end added (output_timing):
    # a left-out frame's batch, whose shutter closed long before the input's; None: the input's
    own_timing: dict[str, bytes] | None = None


Handler = Callable[[InMessage], list[OutMessage]]



@dataclass
class OutageWaits:
    """Messages kept through an outage: each polled again after the next of :data:`OUTAGE_WAITS_S`.

    ``retries`` counts the retries, in a row, of the message in hand; its stage sets it to 0 once
    the message is handled. Each keep is logged and counted in ``broker_outage_retries``.
    """

    stage: str
    metrics: StageMetrics
    stop_event: threading.Event
    retries: int = 0

    def keep(self, consumer: Consumer, msg: InMessage, exc: Outage) -> None:
        """Seek ``consumer`` back to ``msg`` and wait before the retry (a stop request ends the wait)."""
        wait = OUTAGE_WAITS_S[min(self.retries, len(OUTAGE_WAITS_S) - 1)]
        self.retries += 1
        log.warning("%s: %s[%d]@%d kept, retry %d in %.0f s: %s (%s)", self.stage, msg.topic, msg.partition,
                    msg.offset, self.retries, wait, exc, exc.reason)
        self.metrics.outages.labels(self.stage, exc.reason).inc()
        consumer.seek(TopicPartition(msg.topic, msg.partition, msg.offset))  # polled again after the wait
        self.stop_event.wait(wait)

def in_message(msg: Message) -> InMessage:
    """A consumed message as a handler sees it: coordinates, key, value, headers (as bytes) and timestamp.

    ``msg`` carries no error (its topic, partition and offset are set). Used by :class:`StageRunner`,
    the archive stage (``streams/archiver.py``), which consumes outside a transaction, and the
    follow-up listener. Headers that cannot be read are left empty and said why
    (``unreadable_headers``): each of those consumers then dead-letters the message
    (:meth:`InMessage.require_headers`).
    """
    try:
        headers, unreadable = serde.message_headers(msg), None
    except DecodeError as exc:
        headers, unreadable = {}, str(exc)
    key = msg.key()
    return InMessage(str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0),
                     key.encode() if isinstance(key, str) else key, msg.value(), headers, msg.timestamp()[1],
                     unreadable)


def error_reason(exc: BaseException) -> str:
    """The dead-letter reason of ``exc``.

    Its ``reason`` for a :class:`BrokerError` (expected,
    bad input), ``unexpected:<Type>`` for anything else (a bug).
    """
    return exc.reason if isinstance(exc, BrokerError) else f"unexpected:{type(exc).__name__}"


def dead_letter(stage: str, msg: InMessage, exc: BaseException, max_value_bytes: int = DLQ_VALUE_BYTES) -> OutMessage:
    """The dead-letter record of ``msg`` (``dlq/v2``): original bytes, error class, reason, message, offset.

    A value longer than ``max_value_bytes`` keeps its first ``max_value_bytes`` bytes; the record
    always gives the whole value's length and SHA-256. The key and each header value keep their
    first :data:`DLQ_FIELD_BYTES`, the headers :data:`DLQ_HEADERS_BYTES` in all; ``truncated`` says
    whether anything was cut. So a dead letter holds at most ``max_value_bytes`` + ~0.4 MiB of the
    input, whatever the input (one near the 64 MiB limit included).
    """
    reason = error_reason(exc)
    value, key = msg.value, msg.key[:DLQ_FIELD_BYTES] if msg.key is not None else None
    headers, headers_cut = _kept_headers(msg.headers)
    truncated = headers_cut or key != msg.key or (value is not None and len(value) > max_value_bytes)
    record = {
        "stage": stage, "error_class": type(exc).__name__, "reason": reason, "message": _utf8(str(exc)[:4000]),
        "topic": msg.topic, "partition": msg.partition, "offset": msg.offset, "timestamp_ms": msg.timestamp_ms,
        "key": key, "value": None if value is None else value[:max_value_bytes], "headers": headers,
        "value_size": None if value is None else len(value),
        "value_sha256": None if value is None else hashlib.sha256(value).hexdigest(), "truncated": truncated,
    }
    out_headers = {serde.SCHEMA_HEADER: serde.schema_tag("dlq").encode(), "reason": reason.encode()}
    return OutMessage(topics.dlq(stage), serde.encode("dlq", record), key, out_headers)


def _utf8(text: str) -> str:
    r"""``text`` with what UTF-8 cannot encode (lone surrogates) as backslash escapes.

    An error message may quote the input, and JSON in it may hold ``\udcfe`` (a writer schema
    naming that type in an alert container): the dead letter's Avro string then did not encode,
    and the ``SchemaError`` escaped the stage, which crash-looped on the message.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _kept_headers(headers: dict[str, bytes]) -> tuple[dict[str, bytes], bool]:
    """The headers a dead letter keeps, and whether any was cut or left out.

    Names are cut to 256 characters, values to :data:`DLQ_FIELD_BYTES`, and headers beyond
    :data:`DLQ_HEADERS_BYTES` in all are left out.
    """
    kept: dict[str, bytes] = {}
    left, cut = DLQ_HEADERS_BYTES, False
    for name, value in headers.items():
        short_name, short_value = name[:256], value[:DLQ_FIELD_BYTES]
        size = len(short_name) + len(short_value)
        cut = cut or short_name != name or len(short_value) != len(value) or size > left
        if size <= left:
            kept[short_name] = short_value
            left -= size
    return kept, cut


def parse_time(value: bytes | None, now: float | None = None) -> float | None:
    """The Unix time (s) of a timing header, or None when it is absent or not valid.

    Valid: ASCII text of at most 32 bytes giving a finite number from 0 to ``now`` (default: the
    clock) + :data:`MAX_CLOCK_SKEW_S`.
    """
    if not value or len(value) > 32:
        return None
    try:
        t = float(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return t if math.isfinite(t) and 0.0 <= t <= (time.time() if now is None else now) + MAX_CLOCK_SKEW_S else None


def valid_timing(headers: dict[str, bytes], now: float | None = None) -> tuple[dict[str, bytes], list[str]]:
    """The valid timing headers (``t.*``) of ``headers``, and the names of the others.

    Valid: named ``t.exposure_end`` or ``t.<stage>.start|end`` (stage: 1-32 lower-case letters,
    digits, ``_``, ``-``), with a value :func:`parse_time` accepts; :data:`MAX_TIMING_HEADERS` at most.
    """
    kept: dict[str, bytes] = {}
    bad: list[str] = []
    for name, value in headers.items():
        if name.startswith(TIMING_PREFIX):
            good = _TIMING_NAME.fullmatch(name) and parse_time(value, now) is not None
            if good and len(kept) < MAX_TIMING_HEADERS:
                kept[name] = value
            else:
                bad.append(name)
    return kept, bad


def output_timing(timing: dict[str, bytes], stage: str, own: dict[str, bytes] | None) -> dict[str, bytes]:
    """The runner's headers of an output: ``timing`` (the input's ``t.*``, ``stage``'s, ``src``), or with ``own``.

    With ``own`` (``OutMessage.own_timing``), the input's timing headers are left off but ``stage``'s
    start and end, and ``own`` is added: the output is not the input's frame.
    """
    if own is None:
        return timing
    mine = f"{TIMING_PREFIX}{stage}."
    return {k: v for k, v in timing.items() if not k.startswith(TIMING_PREFIX) or k.startswith(mine)} | own


def check_outputs(outs: list[OutMessage], max_bytes: int) -> None:
    """Refuse outputs the broker would refuse: an illegal topic name, or more than ``max_bytes`` bytes.

    Checked before anything is produced, so nothing of a refused input reaches a topic.

    Raises
    ------
    InvalidTopic
        A topic name Kafka does not allow (:func:`streams.topics.is_legal_topic`).
    OutputTooLarge
        Key, value and headers over ``max_bytes`` (bytes) in all.
    """
    for out in outs:
        if not topics.is_legal_topic(out.topic):
            raise InvalidTopic(f"output topic {out.topic[:300]!r} is not a legal Kafka topic name")
        size = len(out.value) + len(out.key or b"") + sum(len(k) + len(v) for k, v in out.headers.items())
        if size > max_bytes:
            raise OutputTooLarge(f"an output of {size} bytes to {out.topic} exceeds the limit of {max_bytes} bytes "
                                 "(the largest message a topic takes, less headroom for headers)")


class StageRunner:
    """Run ``handler`` over ``input_topic`` as consumer group ``<app_id>.<stage>``.

    Parameters
    ----------
    stage : str
        Stage name: the consumer group, the dead-letter topic ``dlq.<stage>`` and metrics label.
    input_topic : str
    handler : callable
        ``InMessage -> list[OutMessage]``. A :class:`BrokerError` it raises (bad input) dead-letters
        the message with the error's reason and the stage carries on; an
        :class:`~broker.errors.Outage` (a service the stage needs is down, e.g. the history's
        PostgreSQL) keeps the message and retries it after :data:`OUTAGE_WAITS_S`, counted in
        ``broker_outage_retries``, so nothing of an outage ends on the dead-letter topic. Any other exception (a bug)
        is logged with its traceback, counted in ``broker_unexpected_errors``, dead-lettered as
        ``unexpected:<Type>``, and after ``max_unexpected`` of them in a row :meth:`run` raises
        :class:`~broker.errors.StageFailure` so that the process exits non-zero.
    settings : KafkaSettings
    metrics : StageMetrics, optional
    instance : int or str
        This process among the stage's replicas, an index or a stable name (a StatefulSet pod's):
        keys its ``transactional.id``, ``<app_id>.<stage>.<instance>``.
    upstream : tuple of str, optional
        Topics a trusted lineage header (``src``) may name: the input of the stage whose outputs this
        one consumes (``()``: none, the input comes from outside the pipeline; None: any). The
        duplicate guard (:class:`~streams.lineage.Deduplicator`) ignores and counts any other.
    max_unexpected : int
        Unexpected errors in a row after which the stage stops (count; 0: never).
        Default 5 (``PipelineConfig.max_consecutive_unexpected``).
    dlq_value_bytes : int
        Bytes of a longer original value a dead letter keeps (:func:`dead_letter`). Default
        :data:`DLQ_VALUE_BYTES`, 1 MiB (``PipelineConfig.dlq_value_bytes``).
    max_message_bytes : int
        Largest message the output topics take (bytes). An input whose outputs would be larger (less
        :data:`HEADROOM_BYTES`) or go to an illegal topic name is dead-lettered (``too_large``,
        ``invalid_topic``) before anything is produced; one whose output the broker still refuses
        for good is dead-lettered in place of its outputs (``undeliverable``). Default
        :data:`streams.topics.MAX_MESSAGE_BYTES`, 64 MiB (``broker topics`` creates topics with it).
    transaction_deadline_s : float
        Longest an input's transaction may block before the process exits with :data:`EXIT_HUNG`
        (s; 0: never; :func:`deadline`). Default 120 (``PipelineConfig.transaction_deadline_s``).
    """

    def __init__(self, stage: str, input_topic: str, handler: Handler, settings: KafkaSettings,
                 metrics: StageMetrics | None = None, instance: int | str = 0, upstream: tuple[str, ...] | None = None,
                 max_unexpected: int = 5, dlq_value_bytes: int = DLQ_VALUE_BYTES,
                 max_message_bytes: int = topics.MAX_MESSAGE_BYTES, transaction_deadline_s: float = 120.0) -> None:
        self.stage = stage
        self.input_topic = input_topic
        self.handler = handler
        self.settings = settings
        self.metrics = metrics or StageMetrics(stage)
        self.instance = instance
        self.stop_event = threading.Event()
        self.dedup = Deduplicator(settings, stage, upstream, self.metrics)
        self._progress: ProgressRecord | None = None  # produced in the transaction of the input in hand
        self.max_unexpected = max_unexpected
        self.dlq_value_bytes = dlq_value_bytes
        self.max_message_bytes = max_message_bytes
        self.transaction_deadline_s = transaction_deadline_s
        self._unexpected_in_a_row = 0
        self.outages = OutageWaits(stage, self.metrics, self.stop_event)
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
        consumer = Consumer(self.metrics.watching(self.settings.consumer(self.stage)))
        producer = Producer(self.settings.producer(f"{self.stage}.{self.instance}"))
        producer.init_transactions(30)
        consumer.subscribe([self.input_topic], on_assign=lambda _, ps: self.dedup.assigned(ps),
                           on_revoke=lambda _, ps: self.dedup.revoked(ps))
        done, last = 0, time.monotonic()
        try:
            while not self.stop_event.is_set() and (max_messages is None or done < max_messages):
                msg = consumer.poll(0.5)
                self.metrics.observe_lag(consumer)  # local reads, at most once a second
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
                if self._process(consumer, producer, msg):
                    done += 1
                last = time.monotonic()
        finally:
            consumer.close()
            producer.flush(10)
            self.dedup.close()
        return done

    def _process(self, consumer: Consumer, producer: Producer, raw: Message) -> bool:
        """Handle one message and commit its outputs; False when it is kept for a retry (an outage, an abort)."""
        msg = self._checked(in_message(raw))
        start = time.time()
        try:
            lineage = self._lineage(msg)
            outs, unexpected = self._handle(msg, lineage)
        except Outage as exc:
            self.outages.keep(consumer, msg, exc)
            return False
        self.outages.retries = 0
        end = time.time()
        timing = {k: v for k, v in msg.headers.items() if k.startswith(TIMING_PREFIX)}
        timing[f"{TIMING_PREFIX}{self.stage}.start"] = repr(start).encode()
        timing[f"{TIMING_PREFIX}{self.stage}.end"] = repr(end).encode()
        timing[SRC_HEADER] = src_of(msg.topic, msg.partition, msg.offset)
        offsets = [TopicPartition(msg.topic, msg.partition, msg.offset + 1)]
        if lineage.duplicate:  # nothing to make atomic: a crash before this commit drops it again
            consumer.commit(offsets=offsets, asynchronous=False)
        else:  # the outputs (maybe none) and the progress record, with the offset
            self._progress = self.dedup.progress(lineage)
            if not self._commit_in_transaction(consumer, producer, msg, outs, timing, offsets):
                return False
        self.dedup.done(lineage)
        self._observe(msg, outs, start, end)
        self._unexpected_in_a_row = self._unexpected_in_a_row + 1 if unexpected else 0
        if self.max_unexpected and self._unexpected_in_a_row >= self.max_unexpected:
            raise StageFailure(f"{self.stage}: {self._unexpected_in_a_row} unexpected errors in a row "
                               f"(the last at {msg.topic}[{msg.partition}]@{msg.offset}); stopping")
        return True

    def _lineage(self, msg: InMessage) -> Lineage:
        """The duplicate guard's verdict on ``msg``; :class:`KafkaUnavailable` when its requests find no broker."""
        try:
            return self.dedup.check(msg.topic, msg.partition, msg.offset, msg.headers.get(SRC_HEADER))
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if err is None or err.fatal() or not (err.retriable() or err.code() in _UNREACHABLE):
                raise
            raise KafkaUnavailable(f"the duplicate guard's request to Kafka failed: {err.str()}") from exc

    def _handle(self, msg: InMessage, lineage: Lineage) -> tuple[list[OutMessage], bool]:
        """Call the handler: its outputs or the dead-letter record, and whether the error was a bug.

        The handler's outputs, or the dead-letter record of its error; and whether that error
        was unexpected (not a :class:`BrokerError`). An :class:`~broker.errors.Outage` propagates,
        a full disk (:func:`storage_full`) as :class:`~broker.errors.StorageFull`.
        """
        outs: list[OutMessage] = []
        try:
            if lineage.duplicate:
                log.warning("%s: dropping %s[%d]@%d, already processed (upstream %s@%d)", self.stage, msg.topic,
                            msg.partition, msg.offset, lineage.upstream, lineage.upstream_offset)
                self.metrics.duplicates.labels(self.stage).inc()
                return [], False
            msg.require_headers()
            outs = self.handler(msg)
            self._count_handler_events(outs)
            check_outputs(outs, self.max_message_bytes - HEADROOM_BYTES)
            self._count_dead_letters(outs)
            return outs, False
        except Outage:
            raise  # not the input's fault: kept and retried (OutageWaits)
        except Exception as exc:
            full = storage_full(exc)
            if full is not None:
                raise full from exc
            letters, unexpected = self._dead_lettered(msg, exc)
            return [*self._in_place_of(outs, exc), *letters], unexpected  # outs: refused by check_outputs

    def _in_place_of(self, outs: list[OutMessage], exc: BaseException) -> list[OutMessage]:
        """What ``outs`` commit in their place when their input is dead-lettered for ``exc`` (``if_refused``).

        Only outputs refused after the handler returned have any (:func:`check_outputs`, or the
        broker at commit): the subtract stage's left-out searches, recorded in the frame ledger
        during the call, each get a dead letter naming the frame, counted in ``broker_errors_total``.
        """
        error = exc if isinstance(exc, BrokerError) else UndeliverableOutput(str(exc))
        kept = [out.if_refused(error) for out in outs if out.if_refused is not None]
        self._count_dead_letters(kept)
        return kept

    def _count_handler_events(self, outs: list[OutMessage]) -> None:
        """Count the frames a refused reference build set aside during the handler's call (``OutMessage.set_aside``).

        Counted per call, not per commit: the store moved them on disk, which a retry of the
        message does not do again (an aborted transaction's retry finds them in ``omitted/``).
        """
        for out in outs:
            for reason in out.set_aside:
                self.metrics.set_aside.labels(self.stage, reason).inc()

    def _count_dead_letters(self, outs: list[OutMessage]) -> None:
        """Count the dead letters a handler made itself among its outputs, by their ``reason`` header.

        The subtract stage dead-letters a left-out frame whose search against its new reference
        fails beside the outputs of the message in hand (:func:`streams.stages.subtract_handler`).
        """
        for out in outs:
            if out.topic == topics.dlq(self.stage):
                self.metrics.errors.labels(self.stage, out.headers.get("reason", b"").decode(errors="replace")).inc()

    def _dead_lettered(self, msg: InMessage, exc: Exception) -> tuple[list[OutMessage], bool]:
        """The dead-letter record of ``msg`` refused with ``exc``, and whether ``exc`` was a bug."""
        if isinstance(exc, BrokerError):  # bad input: dead-letter it with its reason and carry on
            log.warning("%s: dead-lettering %s[%d]@%d (%s): %.1000s", self.stage, msg.topic, msg.partition,
                        msg.offset, exc.reason, exc)
            self.metrics.errors.labels(self.stage, exc.reason).inc()
            return [dead_letter(self.stage, msg, exc, self.dlq_value_bytes)], False
        # a bug: keep the message, make it visible, stop if it repeats
        log.error("%s: unexpected error on %s[%d]@%d; dead-lettering it", self.stage, msg.topic, msg.partition,
                  msg.offset, exc_info=exc)
        self.metrics.errors.labels(self.stage, error_reason(exc)).inc()
        self.metrics.unexpected.labels(self.stage, type(exc).__name__).inc()
        return [dead_letter(self.stage, msg, exc, self.dlq_value_bytes)], True

    def _checked(self, msg: InMessage) -> InMessage:
        """``msg`` with only its valid timing headers (:func:`valid_timing`); the others logged and counted.

        The first stage that reads a timing header validates it, so no later stage trusts a bad
        one: a malformed ``t.exposure_end`` is dropped here (the alert's ``timing.exposure_end`` is
        then NaN) instead of failing the alert stage after the history was written.
        """
        timing, bad = valid_timing(msg.headers)
        if bad:
            log.warning("%s: dropping malformed timing header(s) %s of %s[%d]@%d", self.stage,
                        ", ".join(f"{n[:40]}={msg.headers[n][:40]!r}" for n in bad[:4]), msg.topic, msg.partition,
                        msg.offset)
            for name in bad:
                self.metrics.bad_headers.labels(self.stage, EXPOSURE_END if name == EXPOSURE_END else "t.*").inc()
        msg.headers = {k: v for k, v in msg.headers.items() if not k.startswith(TIMING_PREFIX)} | timing
        return msg

    def _commit_in_transaction(self, consumer: Consumer, producer: Producer, msg: InMessage,
                               outs: list[OutMessage], timing: dict[str, bytes], offsets: list) -> bool:
        """Produce ``outs`` and commit ``offsets`` atomically; False when aborted (to be redone).

        When the broker (or the client) refuses an output for good (:data:`_REFUSED`: too large, an
        illegal or unknown topic) the transaction is aborted and the input's dead letter is
        committed in its place, after what the outputs keep of themselves (:meth:`_in_place_of`): they
        replace the items of ``outs``. A dead letter refused too stops
        the stage (:class:`StageFailure`: the dead-letter topic is missing or misconfigured).
        """
        self._seen += 1
        try:
            with deadline(self.transaction_deadline_s, f"{self.stage}: the transaction of {msg.topic}[{msg.partition}]"
                          f"@{msg.offset}"):
                refused = self._transaction(consumer, producer, outs, timing, offsets, self._seen == self._crash_at)
                if refused is not None:
                    exc = self._refusal(*refused)
                    outs[:] = [*self._in_place_of(outs, exc), self._refused(msg, exc)]
                    if self._transaction(consumer, producer, outs, timing, offsets) is not None:
                        raise StageFailure(f"{self.stage}: {topics.dlq(self.stage)} refuses the dead letter of "
                                           f"{msg.topic}[{msg.partition}]@{msg.offset}; stopping")
            return True
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if not err.txn_requires_abort():
                raise  # fatal (e.g. fenced by a newer instance): exit and let the supervisor restart
            producer.abort_transaction(30)
            self.metrics.aborts.labels(self.stage).inc()
            consumer.seek(TopicPartition(msg.topic, msg.partition, msg.offset))  # process it again
            return False

    def _transaction(self, consumer: Consumer, producer: Producer, outs: list[OutMessage], timing: dict[str, bytes],
                     offsets: list, crash: bool = False) -> tuple[str, KafkaError] | None:
        """One transaction: produce ``outs``, send ``offsets``, commit; None once committed.

        Returns (topic, error) of an output refused for good (:data:`_REFUSED`), the transaction
        aborted; raises any other Kafka error (``crash``: the failpoint, SIGKILL before the commit).
        """
        refused: list[tuple[str, KafkaError]] = []

        def delivered(err: KafkaError | None, out: Message) -> None:
            if err is not None and err.code() in _REFUSED:
                refused.append((str(out.topic()), err))

        producer.begin_transaction()
        topic = ""
        try:
            for out in outs:
                topic = out.topic
                producer.produce(out.topic, out.value, out.key,
                                 headers={**output_timing(timing, self.stage, out.own_timing), **out.headers},
                                 on_delivery=delivered)
            if self._progress is not None:  # the duplicate guard's state, committed with the outputs
                p = self._progress
                producer.produce(p.topic, p.value, p.key, partition=p.partition, headers={**p.headers})
            if crash:
                producer.flush(10)  # the outputs reach the broker, uncommitted
                os.kill(os.getpid(), signal.SIGKILL)
            producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
            producer.commit_transaction(60)
            return None
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.code() in _REFUSED and not refused:
                refused.append((topic, err))  # refused by produce() itself, before sending
            if err.fatal() or not refused:
                raise
        producer.abort_transaction(30)
        return refused[0]

    @staticmethod
    def _refusal(topic: str, err: KafkaError) -> BrokerError:
        """The error of an output to ``topic`` that the broker (or the client) refused for good with ``err``."""
        kind = (OutputTooLarge if err.code() in _TOO_LARGE else
                InvalidTopic if err.code() == KafkaError.TOPIC_EXCEPTION else UndeliverableOutput)
        return kind(f"the broker refused an output to {topic[:300]!r}: {err.name()}: {err.str()}")

    def _refused(self, msg: InMessage, exc: BrokerError) -> OutMessage:
        """The dead letter of ``msg``, an output of which was refused for good with ``exc`` (logged and counted)."""
        log.warning("%s: dead-lettering %s[%d]@%d (%s): %s", self.stage, msg.topic, msg.partition, msg.offset,
                    exc.reason, exc)
        self.metrics.errors.labels(self.stage, exc.reason).inc()
        return dead_letter(self.stage, msg, exc, self.dlq_value_bytes)

    def _observe(self, msg: InMessage, outs: list[OutMessage], start: float, end: float) -> None:
        """Count a committed input once, however often an outage or an aborted transaction had it read.

        Its latency from shutter close is left out when it carries :data:`SEARCHED_LATE`.
        """
        m = self.metrics
        m.messages_in.labels(self.stage).inc()
        m.duration.labels(self.stage).observe(end - start)
        for out in outs:
            m.messages_out.labels(self.stage, out.topic).inc()
            if out.candidates is not None:
                m.candidates.labels(self.stage).observe(out.candidates)
            if out.left_out is not None:
                m.left_out_searched.labels(self.stage, out.left_out).inc()
        exposure_end = parse_time(msg.headers.get(EXPOSURE_END))  # validated by _checked
        if exposure_end is not None and SEARCHED_LATE not in msg.headers:  # late by design: not the SLO's
            m.latency.labels(self.stage).observe(max(0.0, time.time() - exposure_end))
