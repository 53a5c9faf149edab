"""Prometheus metrics of a stage process and of the SASL/TLS gateway (each served on ``/metrics``)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from broker.errors import ConfigError

if TYPE_CHECKING:  # broker.reference imports the science stack (2 s); the gateway's metrics need none of it
    from broker.reference import ReferenceStore

# Stage times span ms (classify) to seconds (subtract on 4k frames).
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
# Edges at the alert-latency SLO (60 s, deploy/prometheus/alerts.yml) and around it, so its p95 is read
# from bucket edges rather than interpolated across a wide bucket.
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 300, 600)
_COUNT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
#: Interval of the consumers' statistics reports, which set ``broker_kafka_brokers_up`` (ms).
STATISTICS_MS = 15_000


class StageMetrics:
    """The metrics every stage exports, in a registry of its own."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages_in = Counter("broker_messages_in", "Messages consumed and committed (once, however often "
                                   "retried)", ["stage"], registry=r)
        self.messages_out = Counter("broker_messages_out", "Messages produced", ["stage", "topic"], registry=r)
        self.errors = Counter("broker_errors", "Messages dead-lettered, by reason", ["stage", "reason"], registry=r)
        self.unexpected = Counter("broker_unexpected_errors",
                                  "Messages dead-lettered by an unexpected exception (a bug), by exception class",
                                  ["stage", "error_class"], registry=r)
        self.duplicates = Counter("broker_duplicates_dropped", "Inputs dropped as duplicates by lineage",
                                  ["stage"], registry=r)
        self.bad_headers = Counter("broker_bad_headers", "Malformed timing headers dropped from inputs, by header "
                                   "(t.exposure_end or t.*)", ["stage", "header"], registry=r)
        self.aborts = Counter("broker_transactions_aborted", "Transactions aborted and retried", ["stage"], registry=r)
        self.outages = Counter("broker_outage_retries", "Messages kept and retried because a service the stage "
                               "needs is down, by reason", ["stage", "reason"], registry=r)
        self.lineage_rejected = Counter("broker_lineage_rejected", "Lineage claims ignored as untrustworthy (a src "
                                        "header, a progress record), by reason", ["stage", "reason"], registry=r)
        self.lineage_recovery = Histogram("broker_lineage_recovery_seconds", "Time to recover the duplicate guard's "
                                          "state of newly assigned input partitions", ["stage"],
                                          buckets=_DURATION_BUCKETS, registry=r)
        self.duration = Histogram("broker_stage_duration_seconds", "Time to process one message",
                                  ["stage"], buckets=_DURATION_BUCKETS, registry=r)
        self.latency = Histogram("broker_latency_from_exposure_seconds",
                                 "Time from shutter close to the end of this stage (messages of frames searched "
                                 "late, t.searched_late, left out)", ["stage"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.candidates = Histogram("broker_candidates_per_frame", "Candidates per frame", ["stage"],
                                    buckets=_COUNT_BUCKETS, registry=r)
        self.lag = Gauge("broker_consumer_lag", "Offsets of an assigned input partition not yet read "
                         "(cached high watermark minus position)", ["stage", "topic", "partition"], registry=r)
        self.set_aside = Counter("broker_reference_frames_set_aside", "Frames a refused reference build set "
                                 "aside in omitted/ to be searched once their field has a reference, by the refusal's "
                                 "reason", ["stage", "reason"], registry=r)
        self.left_out_searched = Counter("broker_left_out_searched", "Frames a new reference left out or set aside, "
                                         "searched against it, by outcome (batch status or dead_lettered)",
                                         ["stage", "outcome"], registry=r)
        self.brokers_up = Gauge("broker_kafka_brokers_up", "Kafka brokers the stage's consumer has a working "
                                "connection to (librdkafka statistics)", ["stage"], registry=r)
        ProcessCollector(registry=r)  # process_start_time_seconds (restarts), resident memory, CPU
        for metric in (self.messages_in, self.duplicates, self.aborts, self.duration, self.latency):
            metric.labels(stage)  # exported as 0 from the start: rates and absent() see an idle stage
        self._lag = ConsumerLag(self.lag, stage)

    def watching(self, consumer_config: dict) -> dict:
        """``consumer_config`` plus librdkafka statistics every :data:`STATISTICS_MS` into :meth:`observe_statistics`.

        Every stage's consumer is built with it, so each stage exports ``broker_kafka_brokers_up``.
        """
        return {**consumer_config, "statistics.interval.ms": STATISTICS_MS, "stats_cb": self.observe_statistics}

    def observe_statistics(self, stats_json: str) -> None:
        """Set ``broker_kafka_brokers_up`` from a librdkafka statistics report (its ``stats_cb`` argument).

        The brokers whose connection is ``UP``, the bootstrap entries (node id -1) left out. 0 while
        Kafka is unreachable: the stage itself keeps running (``up`` stays 1) and its lag freezes,
        so nothing else shows it. A report that is not the expected JSON leaves the gauge as it was.
        """
        try:
            brokers = json.loads(stats_json)["brokers"].values()
            up = sum(1 for b in brokers if b.get("state") == "UP" and b.get("nodeid", -1) >= 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        self.brokers_up.labels(self.stage).set(up)

    def observe_lag(self, consumer: Consumer) -> None:
        """Update ``broker_consumer_lag`` from ``consumer`` (at most once a second; see :class:`ConsumerLag`)."""
        self._lag.update(consumer)

    def watch_disk(self, folder: Path) -> None:
        """Export the free and total bytes of the disk holding ``folder`` (the stage's state), read at each scrape.

        ``broker_state_disk_free_bytes`` and ``broker_state_disk_size_bytes`` (labels ``stage``), so
        ``BrokerStateDiskFilling`` warns before the disk fills (a full one is the outage
        ``storage_full``). Read when scraped, so they move while the stage waits inside a message;
        left out of a scrape while the folder cannot be read.
        """
        self.registry.register(StateDisk(self.stage, folder))

    def watch_references(self, store: ReferenceStore, interval: float = 30.0) -> None:
        """Export the frames waiting in ``store``'s ``.../omitted/`` folders (:class:`ReferenceWaiting`).

        ``broker_reference_frames_waiting`` and ``broker_reference_oldest_waiting_seconds`` (labels
        ``stage``), so ``BrokerFramesWaitingForReference`` sees a field whose frames keep failing.
        """
        self.registry.register(ReferenceWaiting(self.stage, store, interval))

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr:port`` (port 0: a free one); return the port.

        Raises
        ------
        ConfigError
            The address cannot be listened on (the port taken, an address not of this host).
        """
        return int(serve_registry(self.registry, port, addr).server_address[1])


def serve_registry(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1") -> WSGIServer:
    """Serve ``registry`` on ``/metrics`` of ``addr:port`` (port 0: a free one) in a daemon thread; the server.

    Raises
    ------
    ConfigError
        The address cannot be listened on (the port taken, an address not of this host).
    """
    try:
        server, _ = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve /metrics on {addr}:{port}: {exc.strerror or exc}") from exc
    return server


class StateDisk(Collector):
    """``broker_state_disk_{free,size}_bytes{stage}``: ``shutil.disk_usage`` of a folder at each scrape.

    Free is what an unprivileged writer may use (``statvfs``'s available blocks), as the stage runs.
    """

    def __init__(self, stage: str, folder: Path) -> None:
        self.stage, self.folder = stage, folder

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The two gauges (of the nearest folder that exists, until the stage makes its own), or none on an error."""
        folder = next((p for p in (self.folder, *self.folder.parents) if p.exists()), self.folder)
        try:
            usage = shutil.disk_usage(folder)
        except OSError:
            return
        for name, text, value in (("free", "Bytes free", usage.free), ("size", "Bytes in all", usage.total)):
            family = GaugeMetricFamily(f"broker_state_disk_{name}_bytes", f"{text} on the disk of the stage's "
                                       "state folder", labels=["stage"])
            family.add_metric([self.stage], float(value))
            yield family


class ReferenceWaiting(Collector):
    """``broker_reference_frames_waiting{stage}`` and ``broker_reference_oldest_waiting_seconds{stage}``.

    From :meth:`ReferenceStore.waiting`: the frames a refused build set aside in ``.../omitted/`` of
    the fields with no reference yet, and the age of the oldest (s since its frame arrived; 0 when
    none). Per stage, not per field: a label per field would be a series
    per field. The store is read at most every ``interval`` s (default 30 s; a listing per key, so
    thousands of fields are not walked at each 5 s scrape); between reads the last values are
    exported, the age growing with the clock. Left out of a scrape while the store cannot be read.
    """

    def __init__(self, stage: str, store: ReferenceStore, interval: float = 30.0) -> None:
        self.stage, self.store, self.interval = stage, store, interval
        self._read_at = float("-inf")
        self._count: int = 0
        self._oldest: float | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The two gauges, or none when the store cannot be read."""
        now = time.monotonic()
        if now - self._read_at >= self.interval:
            try:
                self._count, self._oldest = self.store.waiting()
            except OSError:
                return
            self._read_at = now
        age = 0.0 if self._oldest is None else max(0.0, time.time() - self._oldest)
        for name, text, value in (
                ("frames_waiting", "Frames set aside in omitted/ of fields with no reference yet, waiting to be "
                 "searched against their field's reference", float(self._count)),
                ("oldest_waiting_seconds", "Age of the oldest of them: time since it arrived (s; 0 when none)", age)):
            family = GaugeMetricFamily(f"broker_reference_{name}", text, labels=["stage"])
            family.add_metric([self.stage], value)
            yield family


class ConsumerLag:
    """The ``broker_consumer_lag`` gauge of one consumer: per assigned partition, the offsets not yet read.

    Lag is the high watermark cached from the consumer's last fetch response (in ``read_committed``
    the last stable offset) minus the consumer's position (the offset after the last message handed
    to the stage), in offsets as Kafka counts consumer lag: on a transactional input each commit
    marker takes one, so a backlog of n messages written one per transaction reads up to 2n.
    librdkafka moves the position past a final marker, so a caught-up stage reads 0. Both numbers
    are the consumer's own state: no broker request. The gauge is updated between messages, so
    it holds its value while the stage is inside one. A partition on which nothing has been read
    since it was assigned has no position: its committed offset stands in (the low watermark if the
    group has none: ``auto.offset.reset = earliest``), asked for once and then every
    ``committed_ttl`` s while the partition stays idle, never per message. Revoked partitions'
    series are removed.

    Parameters
    ----------
    gauge : Gauge
        ``broker_consumer_lag`` with labels ``stage``, ``topic``, ``partition``.
    stage : str
    interval : float
        Least time between two updates (s). Default 1 s: the finest scrape interval in use
        (``deploy/prometheus/prometheus.yml`` scrapes every 5 s, the tests every 1 s).
    committed_ttl : float
        Age after which an idle partition's committed offset is asked for again (s). Default 30 s:
        one small request per idle partition per 30 s; a rebalance that moved a partition away and
        back is seen within that time.
    """

    def __init__(self, gauge: Gauge, stage: str, interval: float = 1.0, committed_ttl: float = 30.0) -> None:
        self._gauge, self._stage = gauge, stage
        self._interval, self._ttl = interval, committed_ttl
        self._next = 0.0
        self._committed: dict[tuple[str, int], tuple[int, float]] = {}  # (topic, partition) -> (offset, when)
        self._shown: set[tuple[str, int]] = set()

    def update(self, consumer: Consumer, now: float | None = None) -> None:
        """Set the gauge of every assigned partition of ``consumer`` (a no-op within ``interval`` of the last)."""
        now = time.monotonic() if now is None else now
        if now < self._next:
            return
        self._next = now + self._interval
        positions = consumer.position(consumer.assignment())
        keys = {(tp.topic, tp.partition) for tp in positions}
        for topic, partition in self._shown - keys:  # revoked
            self._gauge.remove(self._stage, topic, str(partition))
        self._shown &= keys
        self._committed = {k: v for k, v in self._committed.items() if k in keys}
        self._refresh_committed(consumer, [tp for tp in positions if tp.offset < 0], now)
        for tp in positions:
            key = (tp.topic, tp.partition)
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            pos = tp.offset if tp.offset >= 0 else self._committed.get(key, (-1, 0.0))[0]
            pos = pos if pos >= 0 else low
            if high >= 0 and pos >= 0:
                self._gauge.labels(self._stage, tp.topic, str(tp.partition)).set(max(0, high - pos))
                self._shown.add(key)

    def _refresh_committed(self, consumer: Consumer, idle: list[TopicPartition], now: float) -> None:
        """Ask for the committed offsets of the ``idle`` partitions not known or older than ``committed_ttl``."""
        stale = [TopicPartition(tp.topic, tp.partition) for tp in idle
                 if now - self._committed.get((tp.topic, tp.partition), (0, float("-inf")))[1] >= self._ttl]
        if not stale:
            return
        try:
            for tp in consumer.committed(stale, timeout=5):
                self._committed[(tp.topic, tp.partition)] = (tp.offset, now)
        except KafkaException:
            pass  # e.g. a rebalance in progress: asked again at the next update


#: Why the gateway closed a connection before admitting it (``broker_gateway_refused_total{reason}``).
GATEWAY_REFUSALS = (
    "too_many_unauthenticated",  # its address already has MAX_UNAUTHENTICATED connections not authenticated
    "too_many_logins",  # a PLAIN login while MAX_PENDING_DERIVATIONS others derive their keys or wait to
    "tls_handshake",  # the TLS handshake failed (no TLS, an untrusted or missing client certificate, cut)
    "tls_timeout",  # no TLS handshake within auth_timeout_s
    "auth_timeout",  # not authenticated within auth_timeout_s after it (without SASL: no first bytes)
    "second_handshake",  # a second SaslHandshake on the connection
    "unsupported_mechanism",  # a SASL mechanism not offered (answered UNSUPPORTED_SASL_MECHANISM first)
    "out_of_order",  # a request other than ApiVersions, SaslHandshake, SaslAuthenticate before authentication
    "malformed_request",  # a request that cannot be read (oversized, truncated, a bad varint)
)
#: Why a SASL login was refused (``broker_gateway_auth_failures_total{reason}``): ``credentials`` is a wrong
#: password and an unknown user alike, on purpose (the gateway answers both the same way, and its metrics do
#: not tell them apart either); ``malformed`` a SASL message that cannot be read or breaks the exchange.
GATEWAY_AUTH_FAILURES = ("credentials", "malformed")
#: Why a connection to the upstream broker failed (``broker_gateway_upstream_failures_total{reason}``).
GATEWAY_UPSTREAM_FAILURES = ("unreachable", "no_answer")


class GatewayMetrics:
    """The metrics of the SASL/TLS gateway (:mod:`streams.gateway`), in a registry of its own.

    No label holds a client's address or a user name: each distinct value is a series Prometheus
    keeps (memory, and every query over it), so a client able to pick values (connecting from many
    addresses, trying many user names) could grow the gateway's and Prometheus's memory without
    bound. Every label takes a value from a fixed list (:data:`GATEWAY_REFUSALS`,
    :data:`GATEWAY_AUTH_FAILURES`, :data:`GATEWAY_UPSTREAM_FAILURES`, the mechanisms offered, the two
    directions); the log names the address and the user. Every series is exported as 0 from the
    start, so that rates and ``increase()`` see the first event.

    Parameters
    ----------
    mechanisms : tuple of str
        The SASL mechanisms the gateway offers (``gateway.MECHANISMS``); ``none`` is added (the
        admissions without SASL).
    """

    def __init__(self, mechanisms: tuple[str, ...]) -> None:
        self.registry = r = CollectorRegistry()
        self.connections = Counter("broker_gateway_connections", "Client connections accepted", registry=r)
        self.open = Gauge("broker_gateway_connections_open", "Client connections open now, admitted or not",
                          registry=r)
        self.admitted = Counter("broker_gateway_admitted", "Connections admitted: authenticated, by SASL mechanism "
                                "(without SASL, mechanism none: on their first bytes)", ["mechanism"], registry=r)
        self.auth_failures = Counter("broker_gateway_auth_failures", "SASL logins refused, by mechanism and reason "
                                     "(credentials: a wrong password or an unknown user, not told apart)",
                                     ["mechanism", "reason"], registry=r)
        self.refused = Counter("broker_gateway_refused", "Connections the gateway closed before admitting them, "
                               "by reason (failed logins are broker_gateway_auth_failures)", ["reason"], registry=r)
        self.abandoned = Counter("broker_gateway_abandoned", "Connections the client closed before it was admitted, "
                                 "having sent bytes (a connection closed before its first byte is a probe)",
                                 registry=r)
        self.probes = Counter("broker_gateway_probes", "Connections closed or reset by the client before it sent a "
                              "byte: TCP health checks (a load balancer's, a Kubernetes tcpSocket probe), neither "
                              "refused nor abandoned", registry=r)
        self.upstream_failures = Counter("broker_gateway_upstream_failures", "Connections to the upstream broker "
                                         "(tansu) not opened in time or refused (unreachable), or with no "
                                         "ApiVersions answer (no_answer)", ["reason"], registry=r)
        self.bytes = Counter("broker_gateway_bytes", "Bytes piped between admitted clients and the upstream broker, "
                             "by direction (to_upstream, to_client)", ["direction"], registry=r)
        ProcessCollector(registry=r)  # process_start_time_seconds (restarts), resident memory, CPU
        for mechanism in (*mechanisms, "none"):
            self.admitted.labels(mechanism)
        for mechanism in mechanisms:
            for reason in GATEWAY_AUTH_FAILURES:
                self.auth_failures.labels(mechanism, reason)
        for reason in GATEWAY_REFUSALS:
            self.refused.labels(reason)
        for reason in GATEWAY_UPSTREAM_FAILURES:
            self.upstream_failures.labels(reason)
        self.to_upstream, self.to_client = self.bytes.labels("to_upstream"), self.bytes.labels("to_client")
