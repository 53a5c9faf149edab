"""Kafka client settings, read once at start-up and shared by every client of a process."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from streams.security import KafkaSecurity, auth_error_callback, redact
from streams.topics import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from broker.config import PipelineConfig


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
        Further librdkafka settings applied to every client.
    security : KafkaSecurity
        SASL and TLS of every client (``[kafka]`` and ``BROKER_KAFKA_*``, :mod:`streams.security`);
        default plaintext. Its password never shows in ``repr``.
    """

    bootstrap: str
    app_id: str = "broker"
    session_timeout_ms: int = 6000
    transaction_timeout_ms: int = 60000
    extra: dict[str, str] = field(default_factory=dict)
    security: KafkaSecurity = field(default_factory=KafkaSecurity)

    @classmethod
    def load(cls, bootstrap: str, config: PipelineConfig | Mapping | None = None, app_id: str = "broker",
             env: Mapping[str, str] | None = None) -> KafkaSettings:
        """Settings of ``bootstrap`` with the security of the config's ``[kafka]`` table and the environment.

        ``config`` is a :class:`broker.config.PipelineConfig`, its ``[kafka]`` table, or None (the
        environment alone; ``os.environ`` unless ``env`` is given). Raises ``ConfigError``.
        """
        table = config if config is None or isinstance(config, Mapping) else config.kafka
        return cls(bootstrap, app_id=app_id, security=KafkaSecurity.load(table, os.environ if env is None else env))

    def common(self) -> dict:
        """Settings (librdkafka names) of every client: bootstrap, security, and an error callback.

        The callback raises :class:`broker.errors.KafkaAuthError` from the client's next poll when
        the broker refuses the login or the TLS handshake (librdkafka would retry for ever).
        """
        # connections closed by an idle broker are normal; librdkafka would log each one
        return {"bootstrap.servers": self.bootstrap, "log.connection.close": False,
                **self.security.client_conf(), "error_cb": auth_error_callback(self.security, self.bootstrap),
                **self.extra}

    def admin(self) -> dict:
        """AdminClient settings (topic creation, metadata, offsets)."""
        return self.common()

    def verify_login(self, timeout: float = 20.0) -> None:
        """Connect once (metadata) so that a refused login or certificate stops a command at once.

        Nothing to check for ``PLAINTEXT``: it returns at once, and an unreachable broker is
        retried by the clients as before.

        Raises
        ------
        KafkaAuthError
            The broker refused the login or the TLS handshake (the message names the user, never
            the password).
        BrokerError
            No answer within ``timeout`` s.
        """
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        from broker.errors import BrokerError, KafkaAuthError

        if self.security.security_protocol == "PLAINTEXT":
            return
        conf, seen = self.admin(), []
        refuse = conf["error_cb"]

        def on_error(err: object) -> None:
            seen.append(str(getattr(err, "str", lambda: err)()))
            refuse(err)

        conf["error_cb"] = on_error
        admin = AdminClient(conf)
        deadline, refused = time.monotonic() + timeout, None
        try:
            while time.monotonic() < deadline:
                admin.poll(0.1)  # serves the error callback: a refused login raises KafkaAuthError here
                try:
                    admin.list_topics(timeout=1.0)
                    return
                except KafkaException:
                    continue
        except KafkaAuthError as exc:
            refused = str(exc)
        finally:
            del admin  # its threads stop now, not when a traceback lets go of it
        if refused is not None:
            raise KafkaAuthError(refused)
        last = f"; last error: {redact(seen[-1], self.security)}" if seen else ""
        raise BrokerError(f"Kafka at {self.bootstrap} did not answer within {timeout:g} s "
                          f"({self.security.describe()}){last}")

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
