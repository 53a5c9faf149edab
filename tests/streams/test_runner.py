"""The stage runner against the embedded broker: outputs, dead letters, carrying on."""

from __future__ import annotations

import threading

import pytest
from confluent_kafka import Producer

from broker.errors import CorruptFrame
from streams import serde, topics
from streams.monitor import read_all
from streams.runner import OutMessage, StageRunner

pytestmark = pytest.mark.kafka


def _topics(settings, *names):
    topics.create_topics(settings.bootstrap, [topics.TopicSpec(n) for n in names])


def test_runner_outputs_dead_letters_and_carries_on(settings):
    src, dst = f"in-{settings.app_id}", f"out-{settings.app_id}"
    stage = f"echo-{settings.app_id}"
    _topics(settings, src, dst, topics.dlq(stage))
    prod = Producer(settings.producer())
    for value in [b"ok-1", b"bad", b"ok-2", b"boom", b"ok-3"]:
        prod.produce(src, value, b"k", headers={"t.exposure_end": b"1700000000.0"})
    prod.flush(10)

    def handler(msg):
        if msg.value == b"bad":
            raise CorruptFrame("not FITS")
        if msg.value == b"boom":
            raise ZeroDivisionError("a bug")
        return [OutMessage(dst, msg.value.upper(), msg.key)]

    runner = StageRunner(stage, src, handler, settings)
    assert runner.run(max_messages=5) == 5

    out = read_all(settings, [dst])
    assert [m.value() for m in out] == [b"OK-1", b"OK-2", b"OK-3"]
    headers = dict(out[0].headers())
    assert float(headers[f"t.{stage}.end"]) >= float(headers[f"t.{stage}.start"])
    assert headers["t.exposure_end"] == b"1700000000.0"  # timing headers travel on

    dead = [serde.decode("dlq", m.value(), dict(m.headers())) for m in read_all(settings, [topics.dlq(stage)])]
    assert [(d["value"], d["reason"], d["error_class"]) for d in dead] == [
        (b"bad", "corrupt", "CorruptFrame"), (b"boom", "unexpected:ZeroDivisionError", "ZeroDivisionError")]
    assert dead[0]["offset"] == 1 and dead[0]["stage"] == stage and dead[0]["message"] == "not FITS"

    # offsets were committed with the outputs: a new runner of the group has nothing left to do
    again = StageRunner(stage, src, handler, settings)
    assert again.run(idle_timeout=8.0) == 0
    assert runner.metrics.errors.labels(stage, "corrupt")._value.get() == 1


def test_runner_stops_on_request(settings):
    src = f"idle-{settings.app_id}"
    _topics(settings, src)
    runner = StageRunner("idle", src, lambda m: [], settings)
    threading.Timer(2.0, runner.stop_event.set).start()
    assert runner.run() == 0


def test_messages_with_no_output_are_committed_too(settings):
    """A stage that emits nothing for some inputs (an empty batch at the alert stage) still
    commits them (tansu 0.6 drops the offsets of a transaction without records)."""
    src, dst = f"in0-{settings.app_id}", f"out0-{settings.app_id}"
    stage = f"sparse-{settings.app_id}"
    _topics(settings, src, dst, topics.dlq(stage))
    prod = Producer(settings.producer())
    for value in [b"a", b"", b"", b"d", b"", b""]:
        prod.produce(src, value or b"-")
    prod.flush(10)
    runner = StageRunner(stage, src, lambda m: [OutMessage(dst, m.value)] if m.value != b"-" else [], settings)
    assert runner.run(max_messages=6) == 6
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(settings.consumer(stage))
    assert consumer.committed([TopicPartition(src, 0)], timeout=10)[0].offset == 6
    consumer.close()
