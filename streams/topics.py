"""Topic names and configs, and their creation (topics are always created explicitly)."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from broker.errors import BrokerError

FRAMES = "frames"
INGESTED = "ingested"
CANDIDATES = "candidates"
CLASSIFIED = "classified"
SCORED = "scored"
ALERTS = "alerts"

#: Largest message a topic accepts (bytes): frames up to the inline limit plus headroom.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def dlq(stage: str) -> str:
    """Dead-letter topic of ``stage``."""
    return f"dlq.{stage}"


def alerts_for_filter(band: str) -> str:
    """Per-band alert topic (``alerts.<filter>``)."""
    return f"{ALERTS}.{band}"


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create: name, partitions and replication factor."""

    name: str
    partitions: int = 1
    replication: int = 1


def create_topics(bootstrap: str, specs: list[TopicSpec], timeout: float = 15.0) -> list[str]:
    """Create missing topics (with ``max.message.bytes``); return the names created."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout).topics)
    new = [NewTopic(s.name, s.partitions, s.replication, config={"max.message.bytes": str(MAX_MESSAGE_BYTES)})
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
