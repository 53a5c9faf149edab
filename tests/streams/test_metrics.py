"""The stage metrics: what an idle stage exports, and the consumer-lag gauge (logic, then on the embedded broker)."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from streams.metrics import ConsumerLag, StageMetrics

INVALID = -1001  # librdkafka's OFFSET_INVALID: no position / nothing committed / watermark unknown


def _value(metrics: StageMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"stage": metrics.stage, **labels})


class FakeConsumer:
    """The consumer calls :class:`ConsumerLag` makes, over fixed numbers."""

    def __init__(self, positions: dict[int, int], watermarks: dict[int, tuple[int, int]],
                 committed: dict[int, int] | None = None, topic: str = "ingested") -> None:
        self.topic, self.positions, self.watermarks = topic, positions, watermarks
        self.committed_offsets = committed or {}
        self.committed_calls: list[list[int]] = []
        self.fail_committed = False

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in self.positions]

    def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.positions[tp.partition]) for tp in parts]

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False) -> tuple[int, int]:
        assert cached  # never a broker request
        return self.watermarks[tp.partition]

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.committed_calls.append([tp.partition for tp in parts])
        if self.fail_committed:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return [TopicPartition(tp.topic, tp.partition, self.committed_offsets.get(tp.partition, INVALID))
                for tp in parts]


def test_an_idle_stage_exports_zero_counts_and_its_process_start_time():
    m = StageMetrics("subtract")
    for name in ("broker_messages_in_total", "broker_duplicates_dropped_total", "broker_transactions_aborted_total"):
        assert _value(m, name) == 0.0
    start = m.registry.get_sample_value("process_start_time_seconds")
    assert start is not None and abs(start - time.time()) < 24 * 3600


def test_lag_is_high_watermark_minus_position_or_the_committed_offset_of_an_idle_partition():
    m = StageMetrics("subtract")
    lag = ConsumerLag(m.lag, "subtract", interval=1.0, committed_ttl=30.0)
    consumer = FakeConsumer(positions={0: 5, 1: INVALID, 2: INVALID, 3: 4},
                            watermarks={0: (0, 8), 1: (0, 10), 2: (4, 10), 3: (INVALID, INVALID)},
                            committed={1: 7})
    lag.update(consumer, now=100.0)
    got = {p: _value(m, "broker_consumer_lag", topic="ingested", partition=str(p)) for p in range(4)}
    # read up to 5 of 8; idle at committed 7 of 10; nothing committed: from the low watermark; end unknown: none
    assert got == {0: 3.0, 1: 3.0, 2: 6.0, 3: None}
    assert consumer.committed_calls == [[1, 2]]  # only the partitions without a position


def test_lag_updates_at_most_once_an_interval_and_asks_committed_offsets_again_only_after_their_ttl():
    m = StageMetrics("score")
    lag = ConsumerLag(m.lag, "score", interval=1.0, committed_ttl=30.0)
    consumer = FakeConsumer(positions={0: 2, 1: INVALID}, watermarks={0: (0, 9), 1: (0, 4)}, committed={1: 4})
    lag.update(consumer, now=10.0)
    consumer.positions[0] = 9
    lag.update(consumer, now=10.5)  # within the interval: nothing changes
    assert _value(m, "broker_consumer_lag", topic="ingested", partition="0") == 7.0
    lag.update(consumer, now=11.0)
    assert _value(m, "broker_consumer_lag", topic="ingested", partition="0") == 0.0
    lag.update(consumer, now=20.0)
    assert consumer.committed_calls == [[1]]  # cached
    consumer.committed_offsets[1] = 1  # e.g. moved away and back in a rebalance while another replica read it
    lag.update(consumer, now=41.0)
    assert consumer.committed_calls == [[1], [1]]
    assert _value(m, "broker_consumer_lag", topic="ingested", partition="1") == 3.0


def test_revoked_partitions_lose_their_series_and_a_failed_committed_request_is_not_fatal():
    m = StageMetrics("alert")
    lag = ConsumerLag(m.lag, "alert")
    consumer = FakeConsumer(positions={0: 1, 1: 1}, watermarks={0: (0, 2), 1: (0, 3)})
    lag.update(consumer, now=1.0)
    assert _value(m, "broker_consumer_lag", topic="ingested", partition="1") == 2.0
    consumer.positions = {0: 1, 2: INVALID}
    consumer.watermarks[2] = (0, 5)
    consumer.fail_committed = True
    lag.update(consumer, now=3.0)
    assert _value(m, "broker_consumer_lag", topic="ingested", partition="1") is None  # revoked
    assert _value(m, "broker_consumer_lag", topic="ingested", partition="0") == 1.0
    # the committed offset is unknown: the low watermark stands in until the next update asks again
    assert _value(m, "broker_consumer_lag", topic="ingested", partition="2") == 5.0
    consumer.fail_committed = False
    consumer.committed_offsets[2] = 5
    lag.update(consumer, now=4.0)
    assert _value(m, "broker_consumer_lag", topic="ingested", partition="2") == 0.0


@pytest.mark.kafka
def test_lag_on_a_transactional_topic_counts_commit_markers_and_reads_zero_when_caught_up(kafka, settings):
    """On tansu: 4 messages in 4 transactions take offsets 0-7; read all, the lag is 0, not 1."""
    from confluent_kafka import Consumer, Producer

    from streams import topics

    topic = f"lag-{uuid.uuid4().hex[:8]}"
    topics.create_topics(kafka.bootstrap, [topics.TopicSpec(topic, partitions=2)])
    producer = Producer(settings.producer("lag-test"))
    producer.init_transactions(30)
    for i in range(4):
        producer.begin_transaction()
        producer.produce(topic, b"v%d" % i, partition=0)
        producer.commit_transaction(30)
    m = StageMetrics("classify")
    lag = ConsumerLag(m.lag, "classify", interval=0.0)
    consumer = Consumer(settings.consumer("lag"))
    consumer.assign([TopicPartition(topic, 0, 0), TopicPartition(topic, 1, 0)])
    try:
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                seen.append(msg.offset())
                if len(seen) == 1:
                    lag.update(consumer)
                    first = _value(m, "broker_consumer_lag", topic=topic, partition="0")
            lag.update(consumer)
            if len(seen) == 4 and _value(m, "broker_consumer_lag", topic=topic, partition="0") == 0.0:
                break
    finally:
        consumer.close()
    assert seen == [0, 2, 4, 6]  # a commit marker after each message
    assert first == 7.0  # offsets 1-7 after the first message: three messages and four markers
    assert _value(m, "broker_consumer_lag", topic=topic, partition="0") == 0.0
    assert _value(m, "broker_consumer_lag", topic=topic, partition="1") == 0.0  # empty, nothing committed


def test_brokers_up_counts_working_connections_from_the_client_statistics():
    """Kafka gone mid-run: the stage kept ``up`` 1 and its lag froze, and no metric said so."""
    import json

    m = StageMetrics("score")
    report = {"brokers": {"k:9092/bootstrap": {"state": "UP", "nodeid": -1},
                          "k0:9092/0": {"state": "UP", "nodeid": 0}, "k1:9092/1": {"state": "UP", "nodeid": 1}}}
    m.observe_statistics(json.dumps(report))
    assert _value(m, "broker_kafka_brokers_up") == 2.0  # the bootstrap entry is no broker
    for b in report["brokers"].values():
        b["state"] = "CONNECT"
    m.observe_statistics(json.dumps(report))
    assert _value(m, "broker_kafka_brokers_up") == 0.0
    for junk in ("", "[]", '{"brokers": 3}', '{"brokers": {"x": 1}}'):
        m.observe_statistics(junk)  # left as it was
    assert _value(m, "broker_kafka_brokers_up") == 0.0


@pytest.mark.kafka
def test_a_running_stage_reports_its_kafka_connection(settings, monkeypatch):
    """The runner's consumer sends statistics; on the embedded broker one broker is up."""
    from streams import topics
    from streams.runner import StageRunner

    monkeypatch.setattr("streams.metrics.STATISTICS_MS", 200)
    src = f"stats-{uuid.uuid4().hex[:8]}"
    topics.create_topics(settings.bootstrap, [topics.TopicSpec(src)])
    runner = StageRunner("stats", src, lambda msg: [], settings)
    runner.run(idle_timeout=3.0)
    assert _value(runner.metrics, "broker_kafka_brokers_up") >= 1.0


def test_the_state_disk_is_read_at_each_scrape_from_the_nearest_folder_that_exists(tmp_path):
    import shutil

    from prometheus_client import generate_latest

    metrics = StageMetrics("subtract")
    metrics.watch_disk(tmp_path / "state" / "not-made-yet")
    text = generate_latest(metrics.registry).decode()
    free = [line for line in text.splitlines() if line.startswith('broker_state_disk_free_bytes{stage="subtract"}')]
    size = [line for line in text.splitlines() if line.startswith('broker_state_disk_size_bytes{stage="subtract"}')]
    assert len(free) == len(size) == 1
    assert float(size[0].split()[-1]) == shutil.disk_usage(tmp_path).total
    assert 0 < float(free[0].split()[-1]) <= float(size[0].split()[-1])
