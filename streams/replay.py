"""Replay: archived alerts back onto a topic, in any framing (``broker replay``).

The archive keeps every field of every alert (:mod:`broker.archive`), so a replayed alert is the
record that was archived, encoded by :class:`~streams.framing.AlertEncoder` in the chosen framing.
An alert archived under an older schema version is replayed in the current one (Avro schema
resolution: the fields added since take their defaults), since one topic carries one schema.
Each alert id is replayed once, however many times it was archived: its first copy in Kafka order
(:data:`broker.archive.reader.COPY_ORDER`), the one the archive's ``alerts`` view holds.
"""

from __future__ import annotations

from collections.abc import Callable

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient

from broker.archive.reader import Archive
from broker.archive.rows import mjd_of, to_current
from broker.errors import ArchiveError, BrokerError, UnknownTopic
from streams.framing import AlertEncoder, Framed, FramingConfig
from streams.settings import KafkaSettings


def selection(start: str | None = None, end: str | None = None, where: str | None = None) -> str:
    """The SQL condition of a replay: ``start <= mjd < end`` (ISO 8601 times, UTC by default) and ``where``.

    Raises
    ------
    ArchiveError
        A time that is not ISO 8601, or a range that holds no time (``end`` at or before ``start``).
    """
    parts = []
    first, last = mjd_of(start) if start else None, mjd_of(end) if end else None
    if first is not None and last is not None and last <= first:
        raise ArchiveError(f"--to {end} is not after --from {start}: the range holds no alert")
    if first is not None:
        parts.append(f"mjd >= {first!r}")
    if last is not None:
        parts.append(f"mjd < {last!r}")
    if where:
        parts.append(f"({where})")
    return " AND ".join(parts) or "true"


def _check_topic(settings: KafkaSettings, archive: Archive, topic: str) -> None:
    """Refuse a topic that does not exist, or that the archive itself reads (it would archive every alert twice).

    A Kafka that does not answer is a :class:`~broker.errors.BrokerError` naming it.
    """
    try:
        existing = AdminClient(settings.common()).list_topics(timeout=10).topics
    except KafkaException as exc:
        raise BrokerError(f"Kafka at {settings.bootstrap} did not answer within 10 s: {exc}") from exc
    if topic not in existing:
        raise UnknownTopic(f"topic {topic!r} does not exist on {settings.bootstrap}; create it first "
                           f"(broker topics --bootstrap {settings.bootstrap} --framing {topic}=ocf) or pick one of "
                           f"{sorted(t for t in existing if not t.startswith('__'))}")
    archived = {t for t, _ in archive.snapshot().positions}
    if topic in archived:
        raise ArchiveError(f"the archive reads {topic!r}: replaying into it would archive these alerts twice; "
                           "replay to another topic")


def _produce(producer: Producer, topic: str, out: Framed, delivered: Callable[[object, object], None]) -> None:
    """Produce one message, waiting for room in the local queue when it is full.

    One the client refuses outright (``MSG_SIZE_TOO_LARGE``: an alert archived from a ``confluent``
    topic near the largest message, framed again with an OCF header) is a failed delivery: reported
    to ``delivered``, and counted with the others once every alert is sent.
    """
    while True:
        try:
            producer.produce(topic, out.value, out.key, headers={**out.headers}, on_delivery=delivered)
            break
        except BufferError:
            producer.poll(0.5)
        except KafkaException as exc:  # was a traceback out of `broker replay`, the rest of the selection unsent
            delivered(exc.args[0] if exc.args else exc, None)
            return
    producer.poll(0)


def replay(archive: Archive, settings: KafkaSettings, topic: str, where: str = "true",
           framing: FramingConfig | None = None, verify: bool = True,
           on_start: Callable[[int], None] | None = None, on_alert: Callable[[], None] | None = None) -> int:
    """Publish the archived alerts matching ``where`` to ``topic`` in observation order; return how many.

    Each alert id is published once: an alert archived more than once (copies of it read from a
    topic the archive reads, a producer repeating an id) is its first copy (the lowest Kafka topic,
    partition and offset, then file and row: :data:`broker.archive.reader.COPY_ORDER`), matched
    against ``where`` alone; its later copies are never sent.

    Parameters
    ----------
    archive : Archive
    settings : KafkaSettings
    topic : str
        An existing topic that the archive does not read.
    where : str
        SQL condition over the ``alerts`` view (:func:`selection`).
    framing : FramingConfig, optional
        How the alerts are framed (a ``confluent`` framing registers the schema under ``<topic>-value``).
        Default ``ocf``.
    verify : bool
        Check the SHA-256 of every archive file the alerts come from before publishing any.
    on_start, on_alert : callable, optional
        Called with the number of alerts to publish, then once per alert published (progress).

    Raises
    ------
    UnknownTopic
        No such topic.
    ArchiveError
        The archive reads ``topic``, the condition is not valid SQL, ...
    ArchiveCorrupt
        A file of the selection is missing, truncated, altered or unreadable (nothing is skipped).
    """
    _check_topic(settings, archive, topic)
    encoder = AlertEncoder(framing or FramingConfig(), topic)
    count, rows = archive.select(where, verify=verify)
    if on_start:
        on_start(count)
    producer = Producer(settings.producer())
    failed: list[str] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            failed.append(str(err))

    sent = 0
    for version, record in rows:
        out = encoder.encode(to_current(record, version), str(record["objectId"]).encode())
        _produce(producer, topic, out, delivered)
        sent += 1
        if on_alert:
            on_alert()
    left = producer.flush(60)
    if left or failed:
        raise ArchiveError(f"{left + len(failed)} of {sent} replayed alert(s) were not delivered to {topic}: "
                           f"{failed[:3]}")
    return sent
