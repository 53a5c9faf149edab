"""Follow-up requests on Kafka: the rules the score stage evaluates, the record, and the telescope's listener.

:class:`FollowupRules` compiles the ``when`` expression of every ``[[followup.rules]]`` entry with the
subscriber's filter language (:class:`streams.alert_expr.AlertFilter`) at start-up, so a bad one
stops the stage there (``ConfigError``), and gives the first rule an alert matches.
:func:`request_message` frames a ``followup/v1`` record (:func:`broker.followup.request_record`) for
the topic ``followup``. :class:`FollowupListener` is the telescope's side: it reads ``followup``,
checks every request (:func:`broker.followup.validate_request`), dead-letters a malformed or invalid
one to ``dlq.followup`` with its reason (a ``dlq/v2`` record, :func:`streams.runner.dead_letter`)
and yields the others; :func:`run_listener` is what ``broker followup`` runs.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from broker.errors import (
    BrokerError,
    ConfigError,
    DecodeError,
    FilterExpressionError,
    InvalidRequest,
    StageFailure,
    UnknownTopic,
)
from broker.followup import FollowupConfig, FollowupRule, mjd_now, validate_request
from streams import serde, topics
from streams.alert_expr import AlertFilter, to_json
from streams.runner import InMessage, OutMessage, dead_letter, in_message
from streams.serde import SCHEMA_HEADER
from streams.settings import KafkaSettings
from streams.subscriber import JOIN_WAIT

log = logging.getLogger(__name__)

#: Record type of the topic ``followup`` (``schemas/followup``).
RECORD = "followup"
#: Stage name of the listener's dead letters (topic ``dlq.followup``).
STAGE = "followup"
#: Largest request the listener decodes (bytes); a real one is ~250.
MAX_REQUEST_BYTES = 64 * 1024
#: Request ids a listener remembers to drop repeats (a re-emitted request, a redelivery).
MAX_SEEN = 100_000
#: Longest wait for a dead letter's delivery before the listener stops (s).
DEAD_LETTER_TIMEOUT_S = 15.0


# --- rules -----------------------------------------------------------------------------------------


class FollowupRules:
    """The rules of a :class:`broker.followup.FollowupConfig`, compiled once.

    Raises
    ------
    ConfigError
        A rule whose ``when`` is not a valid filter expression (syntax, a name that is no field of
        any alert schema version, a construct the filter language refuses).
    """

    def __init__(self, config: FollowupConfig) -> None:
        self.config = config
        self._compiled: list[tuple[FollowupRule, AlertFilter]] = []
        for rule in config.rules:
            try:
                self._compiled.append((rule, AlertFilter(rule.when)))
            except FilterExpressionError as exc:
                raise ConfigError(f"[[followup.rules]] {rule.name!r}: when = {rule.when!r}: {exc}") from exc

    def first_match(self, alert_view: dict) -> FollowupRule | None:
        """The first rule whose condition ``alert_view`` meets (None: none, or requests disabled).

        ``alert_view`` is the alert, or a dict of the same shape holding at least the fields the
        rules read (``scores.rb``, ``scores.anomaly``, ``classification.probabilities.SN``,
        ``object.ndet`` for the defaults). A rule that cannot be evaluated on it (a null score, a
        missing field, a value past the language's bounds such as ``snr ** snr ** snr``) does not
        match; the last is logged, as the alert's candidates must still be scored and published.
        """
        if not self.config.enabled:
            return None
        return next((rule for rule, when in self._compiled if self._holds(rule, when, alert_view)), None)

    @staticmethod
    def _holds(rule: FollowupRule, when: AlertFilter, alert_view: dict) -> bool:
        return when.passes(alert_view, lambda exc: log.warning("follow-up rule %r not evaluated on %s: %s", rule.name,
                                                               alert_view.get("candid"), exc))


# --- the record on Kafka -----------------------------------------------------------------------------


def encode_request(record: dict) -> bytes:
    """Schemaless Avro body of a ``followup`` record (current version; :class:`SchemaError` when it does not fit)."""
    return serde.encode(RECORD, record)


def request_message(record: dict) -> OutMessage:
    """The message of ``record`` on ``followup``: keyed by object id, ``schema: followup/<version>``."""
    return OutMessage(topics.FOLLOWUP, encode_request(record), str(record["object_id"]).encode(),
                      {SCHEMA_HEADER: serde.schema_tag(RECORD).encode()})


def decode_request(payload: bytes | None, headers: dict[str, bytes] | None = None) -> dict:
    """A ``followup`` record from its message (:func:`streams.serde.decode`, after a size check).

    Raises
    ------
    DecodeError
        Empty, over :data:`MAX_REQUEST_BYTES`, another record type or version, or bytes that are
        not one ``followup`` record.
    """
    if payload and len(payload) > MAX_REQUEST_BYTES:
        raise DecodeError(f"followup message of {len(payload)} bytes (at most {MAX_REQUEST_BYTES})")
    return serde.decode(RECORD, payload, headers)


# --- the telescope's listener -----------------------------------------------------------------------


@dataclass
class ListenerStats:
    """What a listener has seen.

    Attributes
    ----------
    received : int
        Messages read from ``followup``.
    valid : int
        Requests yielded.
    duplicates : int
        Requests dropped because their ``request_id`` was yielded already.
    dead_letters : Counter
        Messages dead-lettered to ``dlq.followup``, by reason (``decode``, ``invalid_request``).
    """

    received: int = 0
    valid: int = 0
    duplicates: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)


class FollowupListener:
    """The follow-up requests of topic ``followup`` that a telescope can schedule.

    Parameters
    ----------
    settings : KafkaSettings
    group : str
        Consumer group (``<app_id>.<group>``); offsets are committed as requests are handled, so a
        restarted listener resumes after the last one (at least once: a request handled just before
        a crash may come again; its ``request_id`` says so).
    filters : collection of str, optional
        The telescope's bands; a request for another is dead-lettered. None: any band.
    clock : callable
        The telescope's time (MJD); a request whose expiry is not after it is dead-lettered
        (``expired``). Default the wall clock.
    topic : str
        Default ``followup``.
    """

    def __init__(self, settings: KafkaSettings, group: str = "followup-listener",
                 filters: Collection[str] | None = None, clock: Callable[[], float] = mjd_now,
                 topic: str = topics.FOLLOWUP) -> None:
        self.settings, self.group, self.filters, self.clock, self.topic = settings, group, filters, clock, topic
        self.stats = ListenerStats()
        self._seen: OrderedDict[str, None] = OrderedDict()  # the last MAX_SEEN request ids yielded
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._assigned_at: float | None = None

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_at = time.monotonic()  # joining the group is not idle time
        consumer.assign(partitions)

    def _idle(self, last: float) -> float:
        """Seconds without a message since the later of the last one and joining the group.

        Before the group is joined the wait counts only past :data:`streams.subscriber.JOIN_WAIT` s.
        """
        now = time.monotonic()
        return now - last - JOIN_WAIT if self._assigned_at is None else now - max(last, self._assigned_at)

    def open(self) -> None:
        """Connect, check that the topic exists (:class:`UnknownTopic` if not; BrokerError: no answer), subscribe."""
        consumer = Consumer(self.settings.consumer(self.group, "earliest"))
        try:
            try:
                existing = consumer.list_topics(timeout=15).topics
            except KafkaException as exc:  # was a traceback out of `broker followup`
                raise BrokerError(f"Kafka at {self.settings.bootstrap} did not answer within 15 s: {exc}") from exc
            if self.topic not in existing or existing[self.topic].error is not None:
                raise UnknownTopic(f"topic {self.topic!r} does not exist on {self.settings.bootstrap}")
        except BaseException:
            consumer.close()
            raise
        consumer.subscribe([self.topic], on_assign=self._on_assign)
        self._consumer, self._producer = consumer, Producer(self.settings.producer())

    def close(self) -> None:
        """Send the pending dead letters, commit and leave the group."""
        if self._producer is not None:
            self._producer.flush(15)
            self._producer = None
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def __enter__(self) -> FollowupListener:
        """Open."""
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        """Close."""
        self.close()

    def check(self, msg: InMessage) -> dict:
        """The request of ``msg``, decoded and valid.

        Raises
        ------
        DecodeError
            Not a ``followup`` record.
        InvalidRequest
            A request this telescope must not schedule; the message lists every reason.
        """
        msg.require_headers()
        record = decode_request(msg.value, msg.headers)
        problems = validate_request(record, self.clock(), self.filters)
        if problems:
            raise InvalidRequest(f"request {str(record.get('request_id'))[:80]!r}: {'; '.join(problems)}")
        return record

    def requests(self, timeout: float | None = None, max_requests: int | None = None,
                 stop: Callable[[], bool] = lambda: False) -> Iterator[dict]:
        """Yield the valid requests as they arrive; dead-letter the others.

        Stops after ``max_requests``, ``timeout`` s without a message, or when ``stop()`` is true.
        """
        if self._consumer is None:
            self.open()
        assert self._consumer is not None and self._producer is not None
        last = time.monotonic()
        while (max_requests is None or self.stats.valid < max_requests) and not stop():
            raw = self._consumer.poll(0.5)
            if raw is None or raw.error():
                if timeout is not None and self._idle(last) > timeout:
                    break
                continue
            last = time.monotonic()
            record = self._handle(raw)
            if record is not None:
                yield record
            self._consumer.commit(message=raw, asynchronous=True)

    def _handle(self, raw: Message) -> dict | None:
        """The request of one message if it is new and valid; dead-letters it when it is not valid."""
        self.stats.received += 1
        msg = in_message(raw)
        try:
            record = self.check(msg)
        except BrokerError as exc:
            self._dead_letter(msg, exc)
            return None
        if record["request_id"] in self._seen:
            self.stats.duplicates += 1
            return None
        self._seen[record["request_id"]] = None
        if len(self._seen) > MAX_SEEN:
            self._seen.popitem(last=False)
        self.stats.valid += 1
        return record

    def _dead_letter(self, msg: InMessage, exc: BrokerError) -> None:
        """Send the dead letter of ``msg`` and wait until it is delivered, before its offset is committed.

        Raises
        ------
        StageFailure
            The dead letter was refused (no ``dlq.followup``, say) or not delivered within
            :data:`DEAD_LETTER_TIMEOUT_S`: the listener stops with the request's offset uncommitted, so
            a restarted listener meets it again instead of losing it.
        """
        assert self._producer is not None
        out = dead_letter(STAGE, msg, exc)
        log.warning("follow-up request at %s:%d:%d dead-lettered (%s): %s", msg.topic, msg.partition, msg.offset,
                    exc.reason, exc)
        errors: list[KafkaError] = []
        self._producer.produce(out.topic, out.value, out.key, headers=list(out.headers.items()),
                               on_delivery=lambda err, _: errors.append(err) if err is not None else None)
        left = self._producer.flush(DEAD_LETTER_TIMEOUT_S)
        if left or errors:
            why = errors[0].str() if errors else f"not delivered within {DEAD_LETTER_TIMEOUT_S:g} s"
            raise StageFailure(f"the dead letter of {msg.topic}[{msg.partition}]@{msg.offset} did not reach "
                               f"{out.topic} ({why}); stopping with its offset uncommitted")
        self.stats.dead_letters[exc.reason] += 1


def run_listener(settings: KafkaSettings, write: Callable[[str], Any] = print, group: str | None = None,
                 filters: Collection[str] | None = None, timeout: float | None = None,
                 max_requests: int | None = None) -> ListenerStats:
    """``broker followup``: print each valid request as one JSON line; dead-letter the others.

    ``group`` defaults to a new one (from the earliest request); ``timeout`` (s without a request)
    and ``max_requests`` end it, else it runs until interrupted. Returns the counts.
    """
    listener = FollowupListener(settings, group or f"followup-{uuid.uuid4().hex[:8]}", filters)
    with listener:
        try:
            for record in listener.requests(timeout, max_requests):
                write(to_json(record))
        except KeyboardInterrupt:
            pass
    return listener.stats
