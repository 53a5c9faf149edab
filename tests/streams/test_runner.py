"""The stage runner against the embedded broker: outputs, dead letters, carrying on."""

from __future__ import annotations

import hashlib
import logging
import threading

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from broker.errors import CorruptFrame, PoorQuality, StageFailure
from streams import serde, topics
from streams.monitor import read_all
from streams.runner import (
    DLQ_FIELD_BYTES,
    DLQ_HEADERS_BYTES,
    DLQ_VALUE_BYTES,
    MAX_TIMING_HEADERS,
    InMessage,
    OutMessage,
    StageRunner,
    dead_letter,
    parse_time,
    valid_timing,
)

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
        if msg.value == b"ok-3":  # a dead letter of another message beside its output (subtract's left-out frames)
            other = InMessage(src, 0, 0, msg.key, None, {}, 0)
            return [dead_letter(stage, other, PoorQuality("no flux ratio")), OutMessage(dst, b"OK-3", msg.key)]
        return [OutMessage(dst, msg.value.upper(), msg.key)]

    runner = StageRunner(stage, src, handler, settings)
    assert runner.run(max_messages=5) == 5

    out = read_all(settings, [dst])
    assert [m.value() for m in out] == [b"OK-1", b"OK-2", b"OK-3"]
    assert runner.metrics.errors.labels(stage, "poor_quality")._value.get() == 1
    headers = dict(out[0].headers())
    assert float(headers[f"t.{stage}.end"]) >= float(headers[f"t.{stage}.start"])
    assert headers["t.exposure_end"] == b"1700000000.0"  # timing headers travel on

    dead = [serde.decode("dlq", m.value(), dict(m.headers())) for m in read_all(settings, [topics.dlq(stage)])]
    assert [(d["value"], d["reason"], d["error_class"]) for d in dead] == [
        (b"bad", "corrupt", "CorruptFrame"), (b"boom", "unexpected:ZeroDivisionError", "ZeroDivisionError"),
        (None, "poor_quality", "PoorQuality")]
    assert dead[0]["offset"] == 1 and dead[0]["stage"] == stage and dead[0]["message"] == "not FITS"

    # offsets were committed with the outputs: a new runner of the group has nothing left to do
    again = StageRunner(stage, src, handler, settings)
    assert again.run(idle_timeout=8.0) == 0
    assert runner.metrics.errors.labels(stage, "corrupt")._value.get() == 1
    assert runner.metrics.unexpected.labels(stage, "ZeroDivisionError")._value.get() == 1
    assert runner.metrics.unexpected.labels(stage, "CorruptFrame")._value.get() == 0



def test_a_header_name_that_is_not_utf8_is_dead_lettered_and_the_next_message_processed(settings):
    """Reading such a header raised ``SystemError`` out of the runner: the stage died on it at every restart.

    Any producer but librdkafka's can write one (``tests/streams/raw_produce.py``); the message is now a
    ``decode`` dead letter and the stage goes on.
    """
    from tests.streams.raw_produce import produce_raw

    src, dst = f"in-{settings.app_id}", f"out-{settings.app_id}"
    stage = f"hdr-{settings.app_id}"
    _topics(settings, src, dst, topics.dlq(stage))
    produce_raw(settings.bootstrap, src, b"bad-name", [(b"\xff\xfeschema", b"x"), (b"t.exposure_end", b"1.5")])
    produce_raw(settings.bootstrap, src, b"ok", [(b"schema", b"frame/1")])
    runner = StageRunner(stage, src, lambda m: [OutMessage(dst, m.value.upper(), m.key)], settings)
    assert runner.run(max_messages=2, idle_timeout=20.0) == 2
    assert [m.value() for m in read_all(settings, [dst])] == [b"OK"]
    (dead,) = _dead(settings, stage)
    assert (dead["value"], dead["reason"], dead["offset"], dead["headers"]) == (b"bad-name", "decode", 0, {})
    assert "not UTF-8" in dead["message"] and "UnicodeDecodeError" in dead["message"]

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


def _history_down() -> Exception:
    from broker.errors import HistoryUnavailable

    return HistoryUnavailable("cannot connect to the history database: connection refused")


def _disk_full() -> Exception:
    import errno

    return OSError(errno.ENOSPC, "No space left on device", "/state/diffs/x/diff.npy")


@pytest.mark.parametrize(("error", "reason", "times"), [
    (_history_down, "history_unavailable", 3),
    (_disk_full, "storage_full", 6),  # more than max_unexpected: as unexpected:OSError the stage stopped
])
def test_an_outage_keeps_the_message_and_retries_it_instead_of_dead_lettering_it(settings, monkeypatch, error,
                                                                                  reason, times):
    """The history's PostgreSQL down, or the state's disk full: each message of it was dead-lettered."""
    monkeypatch.setattr("streams.runner.OUTAGE_WAITS_S", (0.05, 0.1))
    stage = f"patient-{reason[:7]}-{settings.app_id}"
    dst = f"out-{stage}"
    src = _feed(settings, stage, [b"a", b"b", b"c"])
    _topics(settings, dst)
    down = {"b": times}  # b fails so many times, then the service is back

    def handler(msg):
        left = down.get(msg.value.decode(), 0)
        if left:
            down[msg.value.decode()] = left - 1
            raise error()
        return [OutMessage(dst, msg.value)]

    runner = StageRunner(stage, src, handler, settings)
    assert runner.run(max_messages=3) == 3
    assert [m.value() for m in read_all(settings, [dst])] == [b"a", b"b", b"c"]  # in order, none lost
    assert _dead(settings, stage) == [] and _committed(settings, stage, src) == 3
    assert runner.metrics.outages.labels(stage, reason)._value.get() == times
    assert runner.metrics.messages_in.labels(stage)._value.get() == 3  # b once, though read several times
    assert runner.metrics.errors.labels(stage, reason)._value.get() == 0
    assert runner.metrics.unexpected.labels(stage, "OSError")._value.get() == 0


def test_storage_full_is_read_from_the_error_or_what_it_was_raised_from(tmp_path):
    import errno
    import sqlite3

    from broker.errors import ReferenceUnavailable, StorageFull, storage_full

    db = sqlite3.connect(tmp_path / "h.sqlite")
    db.execute("PRAGMA max_page_count = 4")  # SQLite's own "database or disk is full", as on a full disk
    db.execute("CREATE TABLE t (x BLOB)")
    with pytest.raises(sqlite3.OperationalError) as sqlite_full:
        db.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,))
    db.close()
    assert isinstance(storage_full(sqlite_full.value), StorageFull)
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as exc:
            raise ReferenceUnavailable("cannot keep the reference") from exc
    except ReferenceUnavailable as wrapped:
        assert storage_full(wrapped).reason == "storage_full"
    pg = type("DiskFull", (Exception,), {"sqlstate": "53100"})("could not extend file")
    assert isinstance(storage_full(pg), StorageFull)
    looped = OSError(errno.ENOENT, "gone")
    looped.__context__ = ValueError("x")
    looped.__context__.__context__ = looped
    for other in (looped, OSError(errno.EACCES, "denied"), ValueError("no"), sqlite3.OperationalError("locked")):
        assert storage_full(other) is None


# --- hostile messages (issue 27): sizes, topics the broker refuses, headers -----------------------------


def _dead(settings, stage: str) -> list[dict]:
    return [serde.decode("dlq", m.value(), dict(m.headers())) for m in read_all(settings, [topics.dlq(stage)])]


def test_a_dead_letter_keeps_the_first_bytes_of_a_long_value_with_its_length_and_checksum():
    """No broker: what a dead letter of a long value, a long key and many long headers keeps (``dlq/v2``)."""
    rng = np.random.default_rng(27)
    value, key = rng.bytes(3 * DLQ_VALUE_BYTES), rng.bytes(3 * DLQ_FIELD_BYTES)
    headers = {f"h{i}": rng.bytes(DLQ_FIELD_BYTES + 10) for i in range(8)}
    msg = InMessage("frames", 2, 41, key, value, headers, 1_700_000_000_000)
    out = dead_letter("ingest", msg, CorruptFrame("not FITS"))
    rec = serde.decode("dlq", out.value, out.headers)
    assert rec["value"] == value[:DLQ_VALUE_BYTES] and rec["value_size"] == len(value) and rec["truncated"]
    assert rec["value_sha256"] == hashlib.sha256(value).hexdigest()
    assert rec["key"] == out.key == key[:DLQ_FIELD_BYTES]
    assert all(headers[k].startswith(v) and len(v) == DLQ_FIELD_BYTES for k, v in rec["headers"].items())
    kept = sum(len(k) + len(v) for k, v in rec["headers"].items())
    assert kept <= DLQ_HEADERS_BYTES < sum(map(len, headers.values()))
    assert len(out.value) < DLQ_VALUE_BYTES + DLQ_FIELD_BYTES + DLQ_HEADERS_BYTES + 8192
    assert len(dead_letter("ingest", msg, CorruptFrame("x"), max_value_bytes=1000).value) < len(out.value)
    # a short message is kept whole, as v1 did
    small = dead_letter("ingest", InMessage("frames", 0, 1, b"k", b"abc", {"t.exposure_end": b"1.5"}, 0),
                        CorruptFrame("x"))
    rec = serde.decode("dlq", small.value, small.headers)
    assert (rec["value"], rec["value_size"], rec["truncated"], rec["key"]) == (b"abc", 3, False, b"k")
    assert rec["headers"] == {"t.exposure_end": b"1.5"}


def test_a_dead_letter_encodes_an_error_message_that_quotes_a_lone_surrogate():
    r"""``DecodeError("... \udcfe")`` (JSON of a hostile writer schema) made ``dead_letter`` raise ``SchemaError``."""
    from broker.errors import DecodeError

    out = dead_letter("archive", InMessage("alerts", 0, 3, b"k", b"v", {}, 0), DecodeError("UnknownType: \udcfe"))
    assert serde.decode("dlq", out.value, out.headers)["message"] == "UnknownType: \\udcfe"

def test_timing_headers_are_validated():
    now = 1_800_000_000.0
    assert parse_time(b"1700000000.25", now) == 1_700_000_000.25
    for bad in (None, b"", b"garbage", b"nan", b"inf", b"-5", b"1e300", b"\xff", b"1" * 40, repr(now + 2e5).encode()):
        assert parse_time(bad, now) is None, bad
    headers = {"schema": b"frame/1", "t.exposure_end": b"nan", "t.ingest.start": b"1700000000.0",
               "t.ingest.end": b"soon", "t.Evil Name.start": b"1.0", "t.x": b"1.0", "src": b"frames:0:1"}
    kept, bad = valid_timing(headers, now)
    assert kept == {"t.ingest.start": b"1700000000.0"}
    assert sorted(bad) == ["t.Evil Name.start", "t.exposure_end", "t.ingest.end", "t.x"]
    many = {f"t.s{i}.start": b"1.0" for i in range(MAX_TIMING_HEADERS + 5)}
    assert len(valid_timing(many, now)[0]) == MAX_TIMING_HEADERS


def test_a_message_near_the_size_limit_whose_output_is_larger_is_dead_lettered_and_the_next_processed(settings):
    """A message within 300 bytes of the 64 MiB limit on the input (issue 27), whose output would exceed it.

    The output (ingest's grows a little) is refused before anything is produced; the dead letter
    keeps the value's first MiB, its length and SHA-256 (it used to copy the whole value, could not
    be produced, and the stage crash-looped), and the message behind it is processed.
    """
    stage = f"grow-{settings.app_id}"
    dst = f"out-{stage}"
    big = np.random.default_rng(5).bytes(topics.MAX_MESSAGE_BYTES - 300)
    src = _feed(settings, stage, [big, b"ok"])
    _topics(settings, dst)
    runner = StageRunner(stage, src, lambda m: [OutMessage(dst, m.value + b"+" * 1024, m.key)], settings)
    assert runner.run(max_messages=2) == 2
    assert [m.value() for m in read_all(settings, [dst])] == [b"ok" + b"+" * 1024]
    (dead,) = _dead(settings, stage)
    assert (dead["reason"], dead["error_class"], dead["offset"]) == ("too_large", "OutputTooLarge", 0)
    assert dead["value"] == big[:DLQ_VALUE_BYTES] and dead["value_size"] == len(big) and dead["truncated"]
    assert dead["value_sha256"] == hashlib.sha256(big).hexdigest()
    assert f"to {dst} exceeds" in dead["message"]
    assert _committed(settings, stage, src) == 2
    assert runner.metrics.errors.labels(stage, "too_large")._value.get() == 1


def _refusing(dst: str):
    def handler(msg):
        if msg.value == b"illegal":
            return [OutMessage("alerts.r'", b"x", msg.key)]  # FILTER r' made this topic (issue 27)
        if msg.value == b"huge":
            return [OutMessage(dst, bytes(topics.MAX_MESSAGE_BYTES + 1024), msg.key)]
        return [OutMessage(dst, msg.value, msg.key)]

    return handler


def test_outputs_the_broker_refuses_are_dead_lettered_and_the_stage_carries_on(settings, monkeypatch):
    """An output to an illegal topic name or over the size limit: the input is dead-lettered, the stage carries on.

    First refused by the runner's checks before anything is produced; then, with those checks
    switched off, by the client at ``produce()`` (over ``message.max.bytes``) and by the broker at
    commit (``TOPIC_EXCEPTION``): each a dead letter in the input's place (the stage used to retry
    the input for ever, or exit).
    """
    for checked in (True, False):
        stage = f"refuse-{int(checked)}-{settings.app_id}"
        dst = f"out-{stage}"
        src = _feed(settings, stage, [b"illegal", b"ok-1", b"huge", b"ok-2"])
        _topics(settings, dst)
        if not checked:
            monkeypatch.setattr(topics, "is_legal_topic", lambda name: True)
        runner = StageRunner(stage, src, _refusing(dst), settings,
                             max_message_bytes=topics.MAX_MESSAGE_BYTES if checked else 2 * topics.MAX_MESSAGE_BYTES)
        assert runner.run(max_messages=4) == 4
        assert [m.value() for m in read_all(settings, [dst])] == [b"ok-1", b"ok-2"]
        dead = _dead(settings, stage)
        assert [(d["reason"], d["offset"], d["value"]) for d in dead] == [
            ("invalid_topic", 0, b"illegal"), ("too_large", 2, b"huge")], checked
        if not checked:
            assert "TOPIC_EXCEPTION" in dead[0]["message"] and "MSG_SIZE_TOO_LARGE" in dead[1]["message"]
        assert _committed(settings, stage, src) == 4


def test_malformed_timing_headers_are_dropped_and_counted(settings):
    """A bad ``t.exposure_end`` never reaches the handler or the outputs; the input is processed."""
    stage = f"timing-{settings.app_id}"
    dst = f"out-{stage}"
    src = f"in-{stage}"
    _topics(settings, src, dst, topics.dlq(stage))
    prod = Producer(settings.producer())
    for end in (b"not a time", b"nan", b"1e300", b"1700000000.5"):
        prod.produce(src, end, b"k", headers={"t.exposure_end": end, "t.upstream.start": b"1700000000.0"})
    prod.flush(10)
    seen = []

    def handler(msg):
        seen.append(msg.headers.get("t.exposure_end"))
        return [OutMessage(dst, msg.value, msg.key)]

    runner = StageRunner(stage, src, handler, settings)
    assert runner.run(max_messages=4) == 4
    assert seen == [None, None, None, b"1700000000.5"]
    out = [dict(m.headers()) for m in read_all(settings, [dst])]
    assert [h.get("t.exposure_end") for h in out] == seen
    assert all(h["t.upstream.start"] == b"1700000000.0" and f"t.{stage}.end" in h for h in out)
    assert runner.metrics.bad_headers.labels(stage, "t.exposure_end")._value.get() == 3
    assert not _dead(settings, stage)


def test_a_transaction_blocked_past_its_deadline_exits_the_process_with_status_4():
    import subprocess
    import sys

    code = ("import time\nfrom streams.runner import deadline\n"
            "with deadline(5, 'quick'):\n    pass\n"  # finished in time: the timer is cancelled
            "with deadline(0.3, 'a stuck commit'):\n    time.sleep(30)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 4 and "a stuck commit still blocked after 0 s" in res.stderr
    assert "quick" not in res.stderr
