"""Kafka client settings, read once at start-up and shared by every client of a process."""

from __future__ import annotations

from dataclasses import dataclass, field

from streams.topics import MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class KafkaSettings:
    """How to reach Kafka and how the clients behave.

    Attributes
    ----------
    bootstrap : str
        ``host:port[,host:port]`` of any Kafka-protocol broker.
    app_id : str
        Prefix of consumer-group and transactional ids, so two pipelines can share a cluster.
    session_timeout_ms : int
        Consumer session timeout (ms). 6000 is Kafka's minimum allowed by default
        (``group.min.session.timeout.ms``) and keeps tansu's group joins near 3 s
        (``docs/architecture.md``, "The embedded broker").
    transaction_timeout_ms : int
        Producer transaction timeout (ms); an open transaction of a killed process is aborted
        after this long at the latest (sooner: a restarted instance with the same
        ``transactional.id`` fences it at start-up).
    extra : dict
        Further librdkafka settings (security, ...) applied to every client.
    """

    bootstrap: str
    app_id: str = "broker"
    session_timeout_ms: int = 6000
    transaction_timeout_ms: int = 60000
    extra: dict[str, str] = field(default_factory=dict)

    def common(self) -> dict:
        """Settings (librdkafka names) of every client."""
        # connections closed by an idle broker are normal; librdkafka would log each one
        return {"bootstrap.servers": self.bootstrap, "log.connection.close": False, **self.extra}

    def producer(self, transactional_id: str | None = None) -> dict:
        """Producer settings: transactional under ``<app_id>.<transactional_id>``, else idempotent."""
        conf = {
            **self.common(),
            "message.max.bytes": MAX_MESSAGE_BYTES,
            "compression.type": "lz4",
            "linger.ms": 5,
        }
        if transactional_id:
            conf["transactional.id"] = f"{self.app_id}.{transactional_id}"
            conf["transaction.timeout.ms"] = self.transaction_timeout_ms
        else:
            conf["enable.idempotence"] = True
        return conf

    def consumer(self, group: str | None, offset_reset: str = "earliest") -> dict:
        """Consumer settings of group ``<app_id>.<group>``: manual commits, ``read_committed``."""
        conf = {
            **self.common(),
            "group.id": f"{self.app_id}.{group}" if group else f"{self.app_id}.anon",
            "enable.auto.commit": False,
            "auto.offset.reset": offset_reset,
            "isolation.level": "read_committed",
            "session.timeout.ms": self.session_timeout_ms,
            "heartbeat.interval.ms": max(500, self.session_timeout_ms // 3),
            "fetch.max.bytes": 2 * MAX_MESSAGE_BYTES,
            "max.partition.fetch.bytes": MAX_MESSAGE_BYTES + 1024 * 1024,
            "receive.message.max.bytes": 2 * MAX_MESSAGE_BYTES + 1024 * 1024,
        }
        return conf
