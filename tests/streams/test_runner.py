"""The stage runner against the embedded broker: outputs, dead letters, carrying on."""

from __future__ import annotations

import logging
import threading

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from broker.errors import CorruptFrame, StageFailure
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
    assert runner.metrics.unexpected.labels(stage, "ZeroDivisionError")._value.get() == 1
    assert runner.metrics.unexpected.labels(stage, "CorruptFrame")._value.get() == 0


def test_runner_stops_on_request(settings):
    src = f"idle-{settings.app_id}"
    _topics(settings, src)
    runner = StageRunner("idle", src, lambda m: [], settings)
    threading.Timer(2.0, runner.stop_event.set).start()
    assert runner.run() == 0


def test_messages_with_no_output_are_committed_too(settings):
    """A stage that emits nothing for some inputs still commits them.

    An empty batch at the alert stage, say: tansu 0.6 drops the offsets of a transaction without
    records.
    """
    src, dst = f"in0-{settings.app_id}", f"out0-{settings.app_id}"
    stage = f"sparse-{settings.app_id}"
    _topics(settings, src, dst, topics.dlq(stage))
    prod = Producer(settings.producer())
    for value in [b"a", b"", b"", b"d", b"", b""]:
        prod.produce(src, value or b"-")
    prod.flush(10)
    runner = StageRunner(stage, src, lambda m: [OutMessage(dst, m.value)] if m.value != b"-" else [], settings)
    assert runner.run(max_messages=6) == 6
    assert _committed(settings, stage, src) == 6


def _committed(settings, stage: str, topic: str) -> int:
    consumer = Consumer(settings.consumer(stage))
    try:
        return consumer.committed([TopicPartition(topic, 0)], timeout=10)[0].offset
    finally:
        consumer.close()


def _feed(settings, stage: str, values: list[bytes]) -> str:
    src = f"in-{stage}"
    _topics(settings, src, topics.dlq(stage))
    prod = Producer(settings.producer())
    for value in values:
        prod.produce(src, value)
    prod.flush(10)
    return src


def _flaky(msg):
    """Bad input raises a BrokerError, a bug a KeyError; anything else passes through as nothing."""
    if msg.value == b"bad":
        raise CorruptFrame("not FITS")
    if msg.value == b"bug":
        raise KeyError("quality")
    return []


def test_a_bug_that_repeats_stops_the_stage_after_dead_lettering_each_message(settings, caplog):
    """Unexpected errors are logged, counted and dead-lettered; the third in a row stops the stage.

    Each is logged with its traceback; the stage stops (StageFailure) with all three committed, and
    the rest left for the restarted stage.
    """
    stage = f"buggy-{settings.app_id}"
    src = _feed(settings, stage, [b"bug"] * 5)
    runner = StageRunner(stage, src, _flaky, settings, max_unexpected=3)
    with caplog.at_level(logging.ERROR, logger="streams.runner"), pytest.raises(StageFailure, match="3 unexpected"):
        runner.run(idle_timeout=8.0)
    assert _committed(settings, stage, src) == 3
    dead = [serde.decode("dlq", m.value(), dict(m.headers())) for m in read_all(settings, [topics.dlq(stage)])]
    assert [(d["reason"], d["error_class"], d["offset"]) for d in dead] == [
        ("unexpected:KeyError", "KeyError", i) for i in range(3)]
    assert runner.metrics.unexpected.labels(stage, "KeyError")._value.get() == 3
    tracebacks = [r for r in caplog.records if r.exc_info and r.exc_info[0] is KeyError]
    assert len(tracebacks) == 3


def test_bad_input_and_isolated_bugs_never_stop_the_stage(settings):
    """Expected errors (bad input) never count towards the limit; a success resets the count of unexpected ones."""
    stage = f"sturdy-{settings.app_id}"
    values = [b"bad"] * 4 + [b"bug", b"ok", b"bug", b"bad", b"bug", b"ok"]
    src = _feed(settings, stage, values)
    runner = StageRunner(stage, src, _flaky, settings, max_unexpected=2)
    assert runner.run(max_messages=len(values)) == len(values)
    assert _committed(settings, stage, src) == len(values)
    assert runner.metrics.errors.labels(stage, "corrupt")._value.get() == 5
    assert runner.metrics.unexpected.labels(stage, "KeyError")._value.get() == 3
