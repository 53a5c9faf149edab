"""Topic names and configs, and their creation (topics are always created explicitly)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from broker.errors import BrokerError, Unavailable

if TYPE_CHECKING:
    from streams.settings import KafkaSettings

FRAMES = "frames"
INGESTED = "ingested"
CANDIDATES = "candidates"
CLASSIFIED = "classified"
SCORED = "scored"
ALERTS = "alerts"
#: Follow-up requests (``followup/v1``, ``broker/followup.py``): written by the alert stage, read by telescopes.
FOLLOWUP = "followup"
#: Requests a telescope's listener refused (``dlq/v2``, stage ``followup``; ``streams/followup.py``).
DLQ_FOLLOWUP = "dlq.followup"

#: Largest message a topic accepts (bytes): frames up to the inline limit plus headroom.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def dlq(stage: str) -> str:
    """Dead-letter topic of ``stage``."""
    return f"dlq.{stage}"


def progress(stage: str) -> str:
    """Progress topic of ``stage``: its duplicate guard's committed state (:mod:`streams.lineage`)."""
    return f"progress.{stage}"


#: Configs of the progress topics: compacted (one live record per input partition, whatever the
#: traffic), segments rolled hourly so that compaction reaches them (the active segment is never
#: compacted), records far below the frames' 64 MiB.
PROGRESS_CONFIG = (("cleanup.policy", "compact"), ("segment.ms", "3600000"), ("max.message.bytes", "1048576"))


#: A topic name Kafka accepts: 1-249 of these characters, and neither ``.`` nor ``..``.
_LEGAL_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
#: A band used unchanged in a per-filter topic name (ASCII letters, digits, ``_``, ``-``; 1-32).
_PLAIN_BAND = re.compile(r"[A-Za-z0-9_-]{1,32}")


def is_legal_topic(name: str) -> bool:
    """Whether Kafka accepts ``name`` as a topic name (``[A-Za-z0-9._-]``, 1-249 characters, not ``.``/``..``)."""
    return bool(_LEGAL_TOPIC.fullmatch(name)) and name not in (".", "..")


def band_suffix(band: str) -> str:
    """The part of a per-filter topic name that stands for ``band`` (``docs/architecture.md``, "Topics").

    A band of 1-32 ASCII letters, digits, ``_`` or ``-`` is used as it is (``r``, ``g``, ``Halpha``).
    Any other (``r'``, ``Hα``, ``r.x``, empty, long) comes from a FITS header and cannot name a
    topic: its illegal characters become ``_``, it is cut to 24 characters and the first 8 hex digits
    of the SHA-256 of its UTF-8 bytes follow a ``-``, so distinct bands keep distinct topics
    (``r'`` -> ``r_-<8 hex>``).
    """
    if _PLAIN_BAND.fullmatch(band):
        return band
    digest = hashlib.sha256(band.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', band)[:24]}-{digest}"


def filter_topic(topic: str, band: str) -> str:
    """The per-filter copy of alert topic ``topic`` for ``band``: ``<topic>.<band_suffix(band)>``."""
    return f"{topic}.{band_suffix(band)}"


def alerts_for_filter(band: str) -> str:
    """Per-band alert topic (``alerts.<filter>``, the band made safe by :func:`band_suffix`)."""
    return filter_topic(ALERTS, band)


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create: name, partitions, replication factor and configs (over ``max.message.bytes``)."""

    name: str
    partitions: int = 1
    replication: int = 1
    config: tuple[tuple[str, str], ...] = ()


def create_topics(bootstrap: str | KafkaSettings, specs: list[TopicSpec], timeout: float = 15.0) -> list[str]:
    """Create missing topics (with ``max.message.bytes``); return the names created.

    ``bootstrap`` is ``host:port`` (plaintext) or a :class:`streams.settings.KafkaSettings`, whose
    security (SASL, TLS) the admin client then uses.

    Raises
    ------
    Unavailable
        Kafka did not answer within ``timeout`` s.
    BrokerError
        Kafka refused to create a topic.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap} if isinstance(bootstrap, str) else bootstrap.admin())
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        where = bootstrap if isinstance(bootstrap, str) else bootstrap.bootstrap
        raise Unavailable(f"Kafka at {where} did not answer: {exc.args[0].str()}") from exc
    new = [NewTopic(s.name, s.partitions, s.replication,
                    config={"max.message.bytes": str(MAX_MESSAGE_BYTES), **dict(s.config)})
           for s in specs if s.name not in existing]
    if not new:
        return []
    created = []
    for name, fut in admin.create_topics(new, request_timeout=timeout).items():
        try:
            fut.result(timeout)
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise BrokerError(f"cannot create topic {name}: {exc}") from exc
    return created
