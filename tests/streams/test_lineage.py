"""The duplicate guard: progress records, lineage checks and forged headers.

The runner-level tests use the embedded broker and an echo handler; the last test runs the whole
pipeline with the forged headers of issue 27 (``src`` on ``ingested``, and on ``alerts`` before an
alert-stage restart).
"""

from __future__ import annotations

import logging
import re
import signal
import time
import urllib.request

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from streams import serde, topics
from streams.lineage import MAX_SRC_BYTES, parse_src, src_of
from streams.monitor import read_all
from streams.runner import InMessage, OutMessage, StageRunner

FORGED = "untrustworthy lineage claim"


@pytest.mark.parametrize("value, parsed", [
    (b"frames:0:17", ("frames", 0, 17)),
    (b"alerts.r_-1a2b3c4d:11:0", ("alerts.r_-1a2b3c4d", 11, 0)),
    (src_of("scored", 3, 2**63 - 1), ("scored", 3, 2**63 - 1)),
    (b"frames:0:99999999999999999999", None),  # beyond Kafka's offsets
    (b"frames:-1:5", None),
    (b"frames:0:", None),
    (b"fr ames:0:5", None),
    (b"..:0:5", None),
    (b"\xff\xfe:0:5", None),
    (b"frames:0:5\n", None),
    (b"a" * MAX_SRC_BYTES + b":0:1", None),
    (b"", None),
    (None, None),
])
def test_parse_src_takes_only_well_formed_coordinates(value, parsed):
    assert parse_src(value) == parsed


def test_upstream_offsets_match_exactly_so_a_trusted_forgery_costs_only_the_message_it_names(monkeypatch):
    """Upstream offsets seen are matched exactly (no high-water mark); the oldest drop out of the window.

    No broker: the upstream partition is said to hold 1000 messages.
    """
    from streams.lineage import Deduplicator, Lineage
    from streams.settings import KafkaSettings

    guard = Deduplicator(KafkaSettings("127.0.0.1:9"), "unit", ("up",), window=4)
    monkeypatch.setattr(guard, "_partition_count", lambda topic, partition: 1)
    monkeypatch.setattr(guard, "_high", lambda topic, partition: 1000)
    guard.done(Lineage("in", 0, -1))  # the partition is known: nothing to recover

    def seen(offset: int, up: int) -> bool:
        lineage = guard.check("in", 0, offset, src_of("up", 0, up))
        guard.done(lineage)  # as the runner does once the input is committed
        return lineage.duplicate

    assert [seen(0, 10), seen(1, 900), seen(2, 11), seen(3, 10), seen(4, 12)] == [False, False, False, True, False]
    assert not seen(5, 899) and seen(6, 900)  # the forged 900 costs the genuine 900 only
    assert [seen(7, 13), seen(8, 14), seen(9, 11)] == [False, False, True]  # 11: below the window (13, 14, 899, 900)
    assert guard.check("in", 0, 9, src_of("up", 0, 20)).duplicate  # offset 9 already processed
    assert guard.progress(guard.check("in", 0, 10, src_of("up", 0, 15))).partition == 0


def _topics(settings, *specs):
    topics.create_topics(settings.bootstrap, [s if isinstance(s, topics.TopicSpec) else topics.TopicSpec(s)
                                              for s in specs])


def _send(settings, topic: str, items, partition: int | None = None) -> None:
    prod = Producer(settings.producer())
    for value, src in items:
        prod.produce(topic, value, b"k", headers={"src": src} if src is not None else {},
                     **({"partition": partition} if partition is not None else {}))
    prod.flush(10)


def _echo(dst: str):
    return lambda m: [OutMessage(dst, m.value, m.key)]


def _rejected(runner, reason: str) -> float:
    return runner.metrics.lineage_rejected.labels(runner.stage, reason)._value.get()



@pytest.mark.kafka
def test_forged_src_headers_are_ignored_counted_and_logged_once_and_do_not_silence_the_stage(settings, caplog):
    """Forged ``src`` headers: the messages are processed, later ones too, before and after a restart.

    The upstream topic ``up`` holds 3 messages (high watermark 3). Among the inputs: two offsets
    beyond it, a topic that is not upstream, a partition ``up`` does not have, a malformed value,
    and one genuine replayed copy (the only input dropped).
    """
    up, src_topic, dst = f"up-{settings.app_id}", f"in-{settings.app_id}", f"out-{settings.app_id}"
    stage = f"forged-{settings.app_id}"
    _topics(settings, up, src_topic, dst, topics.dlq(stage))
    _send(settings, up, [(b"u", None)] * 3)
    inputs = [(b"a", f"{up}:0:0"), (b"forged-1", f"{up}:0:999999999"), (b"b", f"{up}:0:1"),
              (b"b-copy", f"{up}:0:1"), (b"wrong-topic", "frames:0:1"), (b"junk", b"\xff\x00junk"),
              (b"forged-2", f"{up}:0:888888888"), (b"no-partition", f"{up}:7:0"), (b"c", f"{up}:0:2")]
    _send(settings, src_topic, inputs)
    runner = StageRunner(stage, src_topic, _echo(dst), settings, upstream=(up,))
    with caplog.at_level(logging.WARNING, logger="streams.lineage"):
        assert runner.run(max_messages=len(inputs)) == len(inputs)
    assert [m.value() for m in read_all(settings, [dst])] == [v for v, _ in inputs if v != b"b-copy"]
    assert runner.metrics.duplicates.labels(stage)._value.get() == 1
    assert {r: _rejected(runner, r) for r in ("beyond_high_watermark", "wrong_topic", "malformed", "no_partition")} \
        == {"beyond_high_watermark": 2, "wrong_topic": 1, "malformed": 1, "no_partition": 1}
    logged = [r.getMessage() for r in caplog.records if FORGED in r.getMessage()]
    assert len(logged) == 4 and "999999999" in logged[0]  # once per input partition and reason

    # a restart: the forgeries left nothing behind; the genuine lineage was recovered from progress.<stage>
    _send(settings, up, [(b"u", None)])
    more = [(b"c-copy", f"{up}:0:2"), (b"a-copy", f"{up}:0:0"), (b"d", f"{up}:0:3"), (b"e", None)]
    _send(settings, src_topic, more)
    again = StageRunner(stage, src_topic, _echo(dst), settings, upstream=(up,))
    assert again.run(max_messages=len(more)) == len(more)
    assert [m.value() for m in read_all(settings, [dst])][len(inputs) - 1:] == [b"d", b"e"]
    assert again.metrics.duplicates.labels(stage)._value.get() == 2
    assert sum(_rejected(again, r) for r in ("beyond_high_watermark", "wrong_topic", "malformed")) == 0


@pytest.mark.kafka
def test_a_watermark_reported_low_or_zero_does_not_reject_a_message_that_exists(settings, monkeypatch):
    """The upstream message is read for when the reported high watermark is 0 or stale; far forgeries are not.

    ``up`` holds 3 messages. The broker's watermark is replaced by 0 (as reported before the
    partition's first batch was visible) and by 1 (tansu's watermark of one 3-record batch).
    """
    from streams.lineage import MAX_BATCH, Deduplicator

    up = f"up-{settings.app_id}"
    _topics(settings, up)
    _send(settings, up, [(b"u", None)] * 3)
    for reported in (0, 1):
        guard = Deduplicator(settings, f"low-{reported}", (up,))
        monkeypatch.setattr(guard, "_high", lambda topic, partition, reported=reported: reported)
        try:
            assert [guard._distrust((up, 0, o)) for o in (2, 0, 1)] == ["", "", ""]
            assert guard._distrust((up, 0, 3)) == "beyond_high_watermark"
            start = time.monotonic()
            assert guard._distrust((up, 0, reported + MAX_BATCH)) == "beyond_high_watermark"
            assert time.monotonic() - start < 0.5  # not read for
        finally:
            guard.close()


def _group(settings, stage: str):
    """The consumer-group metadata of ``stage`` (for a transaction that commits its offsets)."""
    consumer = Consumer(settings.consumer(stage))
    try:
        return consumer.consumer_group_metadata()
    finally:
        consumer.close()


def _progress(stage: str, topic: str, partition: int, offset: int, seen=None) -> tuple[bytes, bytes, list]:
    record = {"stage": stage, "topic": topic, "partition": partition, "offset": offset, "seen": seen or {}}
    return (f"{topic}:{partition}".encode(), serde.encode("progress", record),
            [(serde.SCHEMA_HEADER, serde.schema_tag("progress").encode())])


def _killed_instance_made_a_and_b(settings, stage: str, src_topic: str, dst: str) -> None:
    """A killed instance's two transactions: outputs and progress of inputs 0 and 1, the group's offset at 1."""
    zombie = Producer(settings.producer(f"{stage}.zombie"))
    zombie.init_transactions(30)
    for offset, value in enumerate([b"a", b"b"]):
        zombie.begin_transaction()
        zombie.produce(dst, value, b"k")
        key, record, headers = _progress(stage, src_topic, 0, offset)
        zombie.produce(topics.progress(stage), record, key, partition=0, headers=headers)
        if offset == 0:
            zombie.send_offsets_to_transaction([TopicPartition(src_topic, 0, 1)], _group(settings, stage), 30)
        zombie.commit_transaction(30)


@pytest.mark.kafka
def test_an_input_whose_progress_record_committed_is_not_made_again(settings):
    """The embedded broker's restart case: outputs and progress committed, the input's offset not.

    A killed instance's transaction, committed by the broker when the next one starts, holds the
    output of input 1 and its progress record; the group's offset still points at input 1. The
    restarted stage must not make it again. (The three inputs share one record batch, for which
    tansu reports a high watermark of 1: the guard must find input 1 there all the same.)
    """
    src_topic, dst = f"in-{settings.app_id}", f"out-{settings.app_id}"
    stage = f"crashed-{settings.app_id}"
    _topics(settings, src_topic, dst, topics.dlq(stage),
            topics.TopicSpec(topics.progress(stage), config=topics.PROGRESS_CONFIG))
    _send(settings, src_topic, [(b"a", None), (b"b", None), (b"c", None)])
    _killed_instance_made_a_and_b(settings, stage, src_topic, dst)

    runner = StageRunner(stage, src_topic, _echo(dst), settings)
    assert runner.run(max_messages=2) == 2
    assert [m.value() for m in read_all(settings, [dst])] == [b"a", b"b", b"c"]  # "b" once
    assert runner.metrics.duplicates.labels(stage)._value.get() == 1
    assert runner.metrics.registry.get_sample_value("broker_lineage_recovery_seconds_count", {"stage": stage}) == 1


@pytest.mark.kafka
def test_a_broker_gone_during_recovery_keeps_the_message_and_recovers_whole_once_back(settings, monkeypatch):
    """The monitoring run's score stage exited (code 4) when Kafka stopped as it recovered its guard.

    A message handed over from the consumer's queue as the brokers went away made the guard's first
    request fail, and the stage exited. Now the message is kept (``kafka_unavailable``), and the retry
    recovers the partition whole: a recovery cut short keeps nothing, or input 1 would be made again.
    """
    from confluent_kafka import KafkaError, KafkaException

    monkeypatch.setattr("streams.runner.OUTAGE_WAITS_S", (0.05,))
    src_topic, dst = f"gone-{settings.app_id}", f"gone-out-{settings.app_id}"
    stage = f"gone-{settings.app_id}"
    _topics(settings, src_topic, dst, topics.dlq(stage),
            topics.TopicSpec(topics.progress(stage), config=topics.PROGRESS_CONFIG))
    _send(settings, src_topic, [(b"a", None), (b"b", None), (b"c", None)])
    _killed_instance_made_a_and_b(settings, stage, src_topic, dst)

    runner = StageRunner(stage, src_topic, _echo(dst), settings)
    high, failures = runner.dedup._high, [KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN]

    def gone_then_back(topic, partition):
        if failures:
            raise KafkaException(KafkaError(failures.pop(0), "Failed to get metadata: Local: Broker transport failure"))
        return high(topic, partition)

    monkeypatch.setattr(runner.dedup, "_high", gone_then_back)
    assert runner.run(max_messages=2) == 2
    assert [m.value() for m in read_all(settings, [dst])] == [b"a", b"b", b"c"]  # "b" once
    assert runner.metrics.outages.labels(stage, "kafka_unavailable")._value.get() == 2
    assert runner.metrics.duplicates.labels(stage)._value.get() == 1


def test_a_fatal_or_unknown_kafka_error_of_the_guard_still_stops_the_stage(settings):
    from confluent_kafka import KafkaError, KafkaException

    runner = StageRunner("x", "in", _echo("out"), settings)
    msg = InMessage("in", 0, 0, b"k", b"v", {}, 0)
    fatal = KafkaError(KafkaError._FENCED, "fenced", fatal=True)
    for err in (fatal, KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)):
        def failing(*args, error=err):
            raise KafkaException(error)

        runner.dedup.check = failing
        with pytest.raises(KafkaException):
            runner._lineage(msg)


@pytest.mark.kafka
def test_a_progress_record_beyond_the_input_is_ignored_and_partitions_recover_in_one_pass(settings, caplog):
    """A progress record claiming an offset the input does not have yet is ignored and alarmed.

    The input has 4 partitions; the guard recovers all four (assigned together) in one pass.
    """
    src_topic, dst = f"in4-{settings.app_id}", f"out4-{settings.app_id}"
    stage = f"ahead-{settings.app_id}"
    _topics(settings, topics.TopicSpec(src_topic, 4), dst, topics.dlq(stage),
            topics.TopicSpec(topics.progress(stage), 4, config=topics.PROGRESS_CONFIG))
    for p in range(4):
        _send(settings, src_topic, [(f"m{p}".encode(), None)], partition=p)
    writer = Producer(settings.producer())
    key, value, headers = _progress(stage, src_topic, 2, 999999999)
    writer.produce(topics.progress(stage), value, key, partition=2, headers=headers)
    writer.flush(10)

    runner = StageRunner(stage, src_topic, _echo(dst), settings)
    with caplog.at_level(logging.WARNING, logger="streams.lineage"):
        assert runner.run(max_messages=4) == 4
    assert sorted(m.value() for m in read_all(settings, [dst])) == [b"m0", b"m1", b"m2", b"m3"]
    assert _rejected(runner, "progress_beyond_high_watermark") == 1
    assert sum(FORGED in r.getMessage() for r in caplog.records) == 1
    recoveries = runner.metrics.registry.get_sample_value("broker_lineage_recovery_seconds_count", {"stage": stage})
    assert recoveries == 1  # the four partitions, assigned together, recovered in one pass


def _metrics_url(log_text: str) -> str:
    return re.findall(r"metrics on (http://\S+/metrics)", log_text)[-1]


def _scrape(url: str, name: str) -> dict[str, float]:
    """The samples of metric ``name`` at ``url`` by their label text."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{name}\{{(.*?)\}} (\S+)$", text, re.M)}


@pytest.mark.kafka
@pytest.mark.slow
def test_forged_headers_on_ingested_and_alerts_do_not_silence_the_pipeline(tmp_path):
    """Issue 27's forged headers, on a pipeline run (about 60-90 s: six stage processes, one restarted).

    ``src = frames:0:999999999`` on ``ingested`` (twice), and ``src = scored:0:999999999`` on
    ``alerts`` before the alert stage is restarted: before this guard, subtract then dropped every
    later frame as already processed, and the restarted alert stage every later batch, silently.
    Now every frame is subtracted, every candidate is an alert, the forgery is counted in
    ``broker_lineage_rejected_total`` and logged once.
    """
    from broker.simulate import SimConfig, SkySimulator
    from streams.demo import start_stages, stop_stages, wait_until_drained
    from streams.embedded import EmbeddedKafka
    from streams.framestore import FrameStore
    from streams.producer import FrameProducer
    from streams.settings import KafkaSettings
    from streams.stages import STAGE_NAMES, pipeline_topics

    sim = SimConfig(shape=(256, 256), fields=("F001",), n_stars=80, n_galaxies=8, n_transients=4,
                    n_variables=2, n_moving=0, n_cosmic_rays=4.0)
    frames = list(SkySimulator(sim, seed=7).frames(5))  # 0-2 build the reference, 3-4 are subtracted
    with EmbeddedKafka() as kafka:
        settings = KafkaSettings(kafka.bootstrap, app_id="lineage-test")
        topics.create_topics(kafka.bootstrap, pipeline_topics(sim.filters))
        _send(settings, topics.INGESTED, [(b"forged", "frames:0:999999999")] * 2)
        procs = start_stages(kafka.bootstrap, settings.app_id, tmp_path)
        alert = STAGE_NAMES.index("alert")
        try:
            producer = FrameProducer(settings, FrameStore(str(tmp_path / "frames")), 8 << 20, 1 << 30)
            for frame, _ in frames[:3]:
                producer.publish_frame(frame, time.time())
            producer.flush()
            wait_until_drained(settings, procs, timeout=300)
            _send(settings, topics.ALERTS, [(b"forged", "scored:0:999999999")])
            procs[alert].send_signal(signal.SIGTERM)
            assert procs[alert].wait(timeout=60) == 0
            (procs[alert],) = start_stages(kafka.bootstrap, settings.app_id, tmp_path, stages=("alert",))
            for frame, _ in frames[3:]:
                producer.publish_frame(frame, time.time())
            producer.flush()
            wait_until_drained(settings, procs, timeout=300)
            subtract_log = (tmp_path / "logs" / "subtract.log").read_text()
            rejected = _scrape(_metrics_url(subtract_log), "broker_lineage_rejected_total")
        finally:
            stop_stages(procs)
        batches = [serde.decode("candidates", m.value(), dict(m.headers())) for m in read_all(settings, ["candidates"])]
        alerts = read_all(settings, [topics.ALERTS])
    assert [b["frame_id"] for b in batches] == [t.frame_id for _, t in frames]
    n_cand = sum(len(b["candidates"]) for b in batches)
    assert n_cand > 0 and len(alerts) == n_cand + 1  # every candidate's alert, and the forged record
    assert rejected == {'reason="beyond_high_watermark",stage="subtract"': 2.0}
    assert subtract_log.count(FORGED) == 1
