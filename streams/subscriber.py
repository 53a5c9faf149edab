"""Alert subscribers: read an alert topic from a chosen position, and count what is skipped.

A :class:`Subscription` reads one alert topic in any framing (:func:`streams.framing.decode_alert`),
starting where the user says (:func:`parse_start`), and yields the alerts. A message that is not an
alert of our schema (garbage, a truncated container, a record of another schema, null scores,
cutouts that are not gzipped FITS) is skipped with a warning and counted, never raised. The lag
(messages behind the end of the assigned partitions) is read from the consumer's cached watermarks,
so showing it costs no broker round trip. Filters and projections are in :mod:`streams.alert_expr`,
the PNG of the cutouts in :mod:`streams.triplet_png`.
"""

from __future__ import annotations

import logging
import time
import uuid
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaException,
)
from confluent_kafka import TopicPartition as KafkaPartition

from broker.errors import BrokerError, ConfigError, DecodeError, Unavailable, UnknownTopic
from streams import serde
from streams.alert_expr import is_num
from streams.framing import decode_alert
from streams.settings import KafkaSettings

log = logging.getLogger(__name__)


# --- is it an alert? -------------------------------------------------------------------------------

#: (path, kind) that every alert must have for the subscriber to show, filter and draw it.
_REQUIRED: tuple[tuple[str, str], ...] = (
    ("alertId", "int"), ("objectId", "str"), ("candid", "str"), ("source", "dict"), ("source.mjd", "num"),
    ("source.filter", "str"), ("source.ra", "num"), ("source.dec", "num"), ("source.snr", "num"),
    ("source.flux", "num"), ("object", "dict"), ("object.ndet", "int"), ("scores", "dict"),
    ("scores.rb", "num?"), ("scores.anomaly", "num?"), ("timing", "dict"), ("provenance", "dict"),
    ("cutoutScience", "dict"), ("cutoutTemplate", "dict"), ("cutoutDifference", "dict"),
)
_KINDS: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool), "str": lambda v: isinstance(v, str),
    "dict": lambda v: isinstance(v, dict), "num": is_num, "num?": lambda v: v is None or is_num(v),
}


def alert_problem(record: object) -> str | None:
    """Why ``record`` is not an alert the subscriber can use (None if it is one).

    Checks the fields the subscriber reads (ids, source, object, scores, cutouts) and that each
    cutout's bytes start as gzipped or plain FITS; a record of another schema or with null scores
    fails here. Cheap (no cutout is decoded): ~40 µs, a tenth of decoding the alert.
    """
    if not isinstance(record, dict):
        return f"not a record but {type(record).__name__}"
    for path, kind in _REQUIRED:
        head, _, leaf = path.partition(".")
        value = record.get(head)
        if leaf:
            value = value.get(leaf) if isinstance(value, dict) else None
        if not _KINDS[kind](value):
            what = "missing" if value is None else f"a {type(value).__name__}"
            return f"not an alert of our schema: {path} is {what}"
    history = record.get("prv_sources")
    if history is not None and not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        return "not an alert of our schema: prv_sources is not a list of records"
    for key in ("cutoutScience", "cutoutTemplate", "cutoutDifference"):
        data = record[key].get("stampData")
        if not isinstance(data, bytes) or not _looks_like_fits(data):
            return f"garbage cutout: {key}.stampData is not gzipped FITS"
    return None


def _looks_like_fits(data: bytes) -> bool:
    """Whether ``data`` starts as a FITS file, plain or gzipped (decompresses at most 80 bytes)."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[:4096], 80)
        except zlib.error:
            return False
    return data[:9] == b"SIMPLE  ="


# --- where to start -------------------------------------------------------------------------------

#: Largest Kafka offset (a signed 64-bit integer).
MAX_OFFSET = 2**63 - 1


@dataclass(frozen=True)
class StartPosition:
    """Where a subscription starts on each partition of its topic.

    Attributes
    ----------
    kind : str
        ``earliest``, ``latest``, ``offset`` (the same offset on every partition) or ``time``.
    offset : int | None
        The offset of kind ``offset`` (>= 0).
    time_ms : int | None
        The time of kind ``time`` (Unix ms): the first message of each partition with a timestamp
        at or after it.
    """

    kind: str
    offset: int | None = None
    time_ms: int | None = None


def parse_start(text: str | None) -> StartPosition | None:
    """``earliest``, ``latest``, an offset (``1200``) or an ISO time (``2025-03-01T04:00``, UTC if naive).

    None (or an empty string) means: a named group resumes from its committed position, a new
    one starts at the earliest offset.
    """
    text = (text or "").strip()
    if not text:
        return None
    if text in ("earliest", "latest"):
        return StartPosition(text)
    if text.lstrip("+-").isdecimal():  # not isdigit: '²' is a digit that int() refuses
        if not 0 <= int(text) <= MAX_OFFSET:
            raise ConfigError(f"--start offset must be in [0, {MAX_OFFSET}], not {text}")
        return StartPosition("offset", offset=int(text))
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"--start {text!r} is none of earliest, latest, an offset or an ISO time "
                          "(e.g. 2025-03-01T04:00:00Z)") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    # Kafka's timestamps are >= 0, and a negative one asks for something else (-1 the end, -2 the
    # beginning, others an error): a time before 1970 starts at each partition's first message
    return StartPosition("time", time_ms=max(0, int(when.timestamp() * 1000)))


# --- the subscription -----------------------------------------------------------------------------


@dataclass
class SubscriptionStats:
    """What a subscription has seen so far.

    Attributes
    ----------
    alerts : int
        Alerts yielded.
    duplicates : int
        Alerts dropped because their ``alertId`` was seen already.
    skipped : Counter
        Messages or records that are not alerts, by reason (``undecodable``, ``not_an_alert``,
        ``garbage_cutout``); ``broker subscribe`` adds alerts its filter cannot be evaluated on
        (``filter_error``).
    before_start : int
        Messages before the ``--start`` time, read and dropped (brokers without a time index).
    lag : int | None
        Messages behind the end of the assigned partitions, summed (None until known).
    """

    alerts: int = 0
    duplicates: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    before_start: int = 0
    lag: int | None = None

    def line(self) -> str:
        """One status line: alerts, lag, skipped records by reason."""
        lag = "?" if self.lag is None else str(self.lag)
        skipped = sum(self.skipped.values())
        why = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        return (f"{self.alerts} alerts, lag {lag}, skipped {skipped}" + (f" ({why})" if why else "")
                + (f", {self.duplicates} duplicates dropped" if self.duplicates else ""))


@dataclass(frozen=True)
class Skipped:
    """A message (or one record of it) the subscription skipped."""

    partition: int
    offset: int
    reason: str
    message: str

    def __str__(self) -> str:
        """``partition P offset O (reason): message``."""
        return f"partition {self.partition} offset {self.offset} ({self.reason}): {self.message}"


#: Seconds a subscription may wait to join its group before its idle timeout starts (s).
JOIN_WAIT = 30.0


def _log_skip(s: Skipped) -> None:
    log.warning("skipped %s", s)


class Subscription:
    """Alerts of one topic, from a chosen start, with counts of what was skipped and the lag.

    Parameters
    ----------
    settings : KafkaSettings
    topic : str
        The alert topic; :class:`UnknownTopic` when the broker has none of that name.
    group : str | None
        Consumer group (offsets committed as alerts are read); default a new one of its own.
    start : StartPosition | None
        Where to start on each partition (:func:`parse_start`). None: a named group resumes from
        its committed position (the earliest offset if it has none), a new group starts at the
        earliest offset. Given, it applies to every partition even for a group with commits.
    on_skip : callable
        Called with each :class:`Skipped` (default: a logged warning).
    on_status : callable | None
        Called with the :class:`SubscriptionStats` every ``status_every`` s (s) while consuming.
    registry : str | None
        Schema registry URL to look up the schema ids of ``confluent``-framed alerts (default none:
        the ``schema`` header, which this broker writes, names the version).
    """

    def __init__(self, settings: KafkaSettings, topic: str, group: str | None = None,
                 start: StartPosition | None = None, on_skip: Callable[[Skipped], None] = _log_skip,
                 on_status: Callable[[SubscriptionStats], None] | None = None, status_every: float = 5.0,
                 registry: str | None = None) -> None:
        self.settings, self.topic, self.group, self.start = settings, topic, group, start
        self._decode_kw = {"registry": registry} if registry else {}
        self.on_skip, self.on_status, self.status_every = on_skip, on_status, status_every
        self.stats = SubscriptionStats()
        self._consumer: Consumer | None = None
        self._placed: set[int] = set()
        self._not_before: dict[int, int] = {}
        self._seen: OrderedDict[object, None] = OrderedDict()
        self._assigned_at: float | None = None

    def __enter__(self) -> Subscription:
        """Connect, check that the topic exists and subscribe."""
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        """Commit and leave the group."""
        self.close()

    def open(self) -> None:
        """Connect, check that the topic exists (:class:`UnknownTopic` if not; BrokerError: no answer), subscribe."""
        reset = "latest" if self.start is not None and self.start.kind == "offset" else "earliest"
        conf = self.settings.consumer(self.group or f"subscriber-{uuid.uuid4().hex[:8]}", reset)
        # offsets are stored by alerts() once a message is read: one kept for a registry outage is read again
        conf.update({"enable.auto.commit": True, "enable.auto.offset.store": False})
        consumer = Consumer(conf)
        try:
            try:
                existing = consumer.list_topics(timeout=15).topics
            except KafkaException as exc:
                raise BrokerError(f"Kafka at {self.settings.bootstrap} did not answer within 15 s: {exc}") from exc
            if self.topic not in existing or existing[self.topic].error is not None:
                names = sorted(t for t in existing if not t.startswith("__"))
                raise UnknownTopic(f"topic {self.topic!r} does not exist on {self.settings.bootstrap}; "
                                   f"topics there: {', '.join(names) or 'none'}")
        except BaseException:
            consumer.close()
            raise
        self._consumer = consumer
        consumer.subscribe([self.topic], on_assign=self._on_assign)

    def close(self) -> None:
        """Commit the position (a named group resumes there) and leave the group."""
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _on_assign(self, consumer: Consumer, partitions: list[KafkaPartition]) -> None:
        """Place each newly assigned partition at the start position (once per partition)."""
        new = [tp for tp in partitions if tp.partition not in self._placed]
        if self.start is not None and new:
            kind = self.start.kind
            if kind == "time":
                assert self.start.time_ms is not None
                try:
                    found = consumer.offsets_for_times([KafkaPartition(tp.topic, tp.partition, self.start.time_ms)
                                                        for tp in new], timeout=15)
                except KafkaException as exc:  # out of poll() it was a traceback of the client's
                    raise Unavailable(f"cannot find where {self.topic} reaches the --start time: "
                                      f"{exc.args[0] if exc.args else exc}") from exc
                offsets = {f.partition: f.offset if f.offset >= 0 else OFFSET_END for f in found}
                self._not_before.update(dict.fromkeys(offsets, self.start.time_ms))
            else:
                at = {"earliest": OFFSET_BEGINNING, "latest": OFFSET_END}.get(kind, self.start.offset)
                offsets = {tp.partition: at if at is not None else OFFSET_INVALID for tp in new}
            for tp in new:
                tp.offset = offsets[tp.partition]
        self._placed.update(tp.partition for tp in new)
        self._assigned_at = time.monotonic()  # joining the group is not idle time
        consumer.assign(partitions)

    def lag(self) -> int | None:
        """Messages behind the end of the assigned partitions, summed (None until a fetch told the end).

        From the consumer's cached high watermarks and positions: no broker round trip. On a
        transactional topic the commit marker after the last alert counts as one message.
        """
        if self._consumer is None:
            return None
        parts = self._consumer.assignment()
        total, known = 0, False
        for pos in self._consumer.position(parts) if parts else []:
            _, high = self._consumer.get_watermark_offsets(pos, cached=True)
            if high >= 0 and pos.offset >= 0:
                total, known = total + max(0, high - pos.offset), True
        return total if known else None

    def _idle(self, now: float, last: float) -> float:
        """Seconds without a message since the later of the last one and joining the group.

        Before the first assignment the wait counts only past :data:`JOIN_WAIT` s (a group join
        takes ~3 s on the embedded broker and up to a session timeout on Kafka).
        """
        if self._assigned_at is None:
            return now - last - JOIN_WAIT
        return now - max(last, self._assigned_at)

    def _skip(self, partition: int, offset: int, reason: str, message: str) -> None:
        self.stats.skipped[reason] += 1
        self.on_skip(Skipped(partition, offset, reason, message))

    def _records(self, msg: Any) -> list[dict]:
        """The new alerts of one message; skips (and counts) what is not one."""
        part, offset = msg.partition(), msg.offset()
        kind, ts = msg.timestamp()
        if part in self._not_before and kind != TIMESTAMP_NOT_AVAILABLE:
            if ts < self._not_before[part]:
                self.stats.before_start += 1
                return []
            del self._not_before[part]  # the first at or after the start time: Kafka's semantics from here
        try:
            records = decode_alert(msg.key(), msg.value(), serde.message_headers(msg), **self._decode_kw)
        except DecodeError as exc:
            self._skip(part, offset, "undecodable", str(exc))
            return []
        out = []
        for rec in records:
            problem = alert_problem(rec)
            if problem is not None:
                self._skip(part, offset, "garbage_cutout" if problem.startswith("garbage") else "not_an_alert",
                           problem)
            elif rec["alertId"] in self._seen:
                self.stats.duplicates += 1
            else:
                self._seen[rec["alertId"]] = None
                if len(self._seen) > 100_000:
                    self._seen.popitem(last=False)
                out.append(rec)
        return out

    def _store(self, msg: Any) -> None:
        """Store ``msg``'s offset for the next commit (not when its partition was revoked meanwhile)."""
        assert self._consumer is not None
        try:
            self._consumer.store_offsets(message=msg)
        except KafkaException as exc:  # its partition revoked: its new owner reads it
            log.debug("offset of partition %d offset %d not stored: %s", msg.partition(), msg.offset(), exc)

    def alerts(self, timeout: float | None = None, max_alerts: int | None = None,
               stop: Callable[[], bool] = lambda: False) -> Iterator[tuple[dict, float]]:
        """Yield (alert, receipt time as Unix s) as they arrive.

        Stops after ``max_alerts``, ``timeout`` s without a message (not counting the time to join
        the group), or when ``stop()`` is true.
        An alert whose ``alertId`` was seen among the last 100 000 is dropped: on a broker that can
        repeat a crashed transaction (the embedded one, see :mod:`streams.lineage`) nobody sees it
        twice.

        Raises
        ------
        RegistryUnavailable
            The schema registry did not answer for a ``confluent`` alert: the subscription stops
            before that message, which a named group reads again when it resumes (skipped as
            undecodable, it was committed past and lost).
        """
        if self._consumer is None:
            self.open()
        assert self._consumer is not None
        last = last_status = time.monotonic()
        while (max_alerts is None or self.stats.alerts < max_alerts) and not stop():
            msg = self._consumer.poll(0.5)
            now = time.monotonic()
            if self.on_status is not None and now - last_status >= self.status_every:
                self.stats.lag, last_status = self.lag(), now
                self.on_status(self.stats)
            if msg is None or msg.error():
                if timeout is not None and self._idle(now, last) > timeout:
                    break
                continue
            last = now
            records = self._records(msg)  # a RegistryUnavailable propagates before the offset is stored
            self._store(msg)
            for rec in records:
                self.stats.alerts += 1
                yield rec, time.time()
                if max_alerts is not None and self.stats.alerts >= max_alerts:
                    break
        self.stats.lag = self.lag()


def alerts(settings: KafkaSettings, topic: str, group: str | None = None, from_start: bool = True,
           timeout: float | None = None, max_alerts: int | None = None,
           stop: Callable[[], bool] = lambda: False) -> Iterator[tuple[dict, float]]:
    """Yield (alert, receipt time) from ``topic`` as they arrive (see :meth:`Subscription.alerts`).

    ``from_start`` False starts at the end of each partition; records that are not alerts are
    skipped with a logged warning.
    """
    with Subscription(settings, topic, group, None if from_start else StartPosition("latest")) as sub:
        yield from sub.alerts(timeout, max_alerts, stop)
