"""Prometheus metrics of a stage process (served on ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

# Stage times span ms (classify) to seconds (subtract on 4k frames).
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 600)
_COUNT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class StageMetrics:
    """The metrics every stage exports, in a registry of its own."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages_in = Counter("broker_messages_in", "Messages consumed", ["stage"], registry=r)
        self.messages_out = Counter("broker_messages_out", "Messages produced", ["stage", "topic"], registry=r)
        self.errors = Counter("broker_errors", "Messages dead-lettered, by reason", ["stage", "reason"], registry=r)
        self.unexpected = Counter("broker_unexpected_errors",
                                  "Messages dead-lettered by an unexpected exception (a bug), by exception class",
                                  ["stage", "error_class"], registry=r)
        self.duplicates = Counter("broker_duplicates_dropped", "Inputs dropped as duplicates by lineage",
                                  ["stage"], registry=r)
        self.aborts = Counter("broker_transactions_aborted", "Transactions aborted and retried", ["stage"], registry=r)
        self.duration = Histogram("broker_stage_duration_seconds", "Time to process one message",
                                  ["stage"], buckets=_DURATION_BUCKETS, registry=r)
        self.latency = Histogram("broker_latency_from_exposure_seconds",
                                 "Time from shutter close to the end of this stage", ["stage"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.candidates = Histogram("broker_candidates_per_frame", "Candidates per frame", ["stage"],
                                    buckets=_COUNT_BUCKETS, registry=r)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr:port`` (port 0: a free one); return the port."""
        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return server.server_address[1]
