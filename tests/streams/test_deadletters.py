"""``broker dead-letters``: the stages' refused messages read back with their reasons, and frames sent again."""

from __future__ import annotations

import json
import uuid

import pytest
from confluent_kafka import Producer
from typer.testing import CliRunner

from broker.errors import CorruptFrame, DecodeError, NotResendable, SolverBackingOff
from streams import serde, topics
from streams.cli import app
from streams.deadletters import DeadLetter, resend
from streams.monitor import read_all
from streams.runner import InMessage, dead_letter

pytestmark = [pytest.mark.kafka]
runner = CliRunner()


@pytest.fixture(scope="module")
def kafka():
    """A broker of this module's own: --resend writes to ``frames``, which other tests read whole."""
    from streams.embedded import EmbeddedKafka

    with EmbeddedKafka() as broker:
        yield broker  # conftest's ``settings`` then points at it


def _letter(topic: str, key: bytes, value: bytes, exc: Exception, max_value_bytes: int = 1 << 20,
            offset: int = 7) -> bytes:
    msg = InMessage(topic, 0, offset, key, value, {"t.exposure_end": b"1700000000.5", "sig": b"\x00\xff"},
                    1_700_000_000_000)
    return dead_letter("ingest", msg, exc, max_value_bytes).value


def _produce(producer: Producer, topic: str, value: bytes, key: bytes, headers=None) -> int:
    """Produce one record to partition 0; its offset."""
    offsets: list[int] = []
    producer.produce(topic, value, key, partition=0, headers=headers,
                     on_delivery=lambda err, msg: offsets.append(msg.offset()))
    assert producer.flush(30) == 0 and offsets
    return offsets[0]


@pytest.fixture
def letters(kafka):
    """Dead letters on ``dlq.ingest`` whose keys hold a tag of this test (the module's tests share the topic).

    The truncated one keeps 16 bytes of a frame whose whole record is on ``frames``; the gone one
    points at an offset ``frames`` does not hold.
    """
    tag = uuid.uuid4().hex[:10]
    topics.create_topics(kafka.bootstrap, [topics.TopicSpec(topics.FRAMES), topics.TopicSpec(topics.dlq("ingest"))])
    frame_value = f"frame-record-{tag}".encode() * 10
    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    long_key, long_value = f"Backyard/{tag}-t".encode(), f"long-frame-{tag}".encode() * 100
    original = _produce(producer, topics.FRAMES, long_value, long_key, [("t.exposure_end", b"1700000001.5")])
    sent = {
        "backoff": _letter(topics.FRAMES, f"Backyard/{tag}".encode(), frame_value, SolverBackingOff("backing off")),
        "intermediate": _letter(topics.INGESTED, f"Backyard/{tag}-i".encode(), b"x" * 50, CorruptFrame("cut")),
        "truncated": _letter(topics.FRAMES, long_key, long_value, CorruptFrame("cut"), 16, original),
        "gone": _letter(topics.FRAMES, f"Backyard/{tag}-g".encode(), long_value, CorruptFrame("cut"), 16, 10**9),
        "hostile": _letter(topics.FRAMES, f"[red]{tag}[/red]\x1b[2J".encode(), b"v", CorruptFrame("\x1b[31mred")),
    }
    for name, value in sent.items():
        producer.produce(topics.dlq("ingest"), value, f"{tag}-{name}".encode())
    producer.produce(topics.dlq("ingest"), b"\x00 not a dead letter", f"{tag}-garbage".encode())
    assert producer.flush(30) == 0
    return tag, frame_value, long_value


def _cli(kafka, *args: str):
    return runner.invoke(app, ["dead-letters", "--bootstrap", kafka.bootstrap, "--stage", "ingest", *args])


def test_dead_letters_are_listed_with_their_reasons_and_hostile_text_escaped(kafka, letters):
    tag, _, _ = letters
    res = _cli(kafka, "--key", tag)
    assert res.exit_code == 0, res.output
    assert f"ingest  solver_backoff  frames[0]@7  key=Backyard/{tag}  backing off" in res.stdout
    assert f"ingest  corrupt  ingested[0]@7  key=Backyard/{tag}-i  cut" in res.stdout
    assert f"key=[red]{tag}[/red]\\x1b[2J" in res.stdout and "\\x1b[31mred" in res.stdout  # shown, not obeyed
    assert "\x1b" not in res.stdout
    assert "ingest solver_backoff: 1" in res.stderr and "ingest corrupt: 4" in res.stderr
    json_res = _cli(kafka, "--key", tag, "--json", "--reason", "solver_backoff")
    (row,) = [json.loads(line) for line in json_res.stdout.splitlines()]
    assert row["key"] == f"Backyard/{tag}" and row["headers"]["t.exposure_end"] == "1700000000.5"
    assert "value" not in row and row["value_size"] == 230 and row["truncated"] is False


def test_undecodable_bytes_on_a_dead_letter_topic_are_shown_not_fatal(kafka, letters):
    res = _cli(kafka, "--reason", "undecodable")
    assert res.exit_code == 0, res.output
    assert "undecodable" in res.stdout and "not a valid dlq record" in res.stdout


def test_resend_publishes_a_refused_frame_as_it_was_and_names_the_ones_it_cannot(kafka, letters, settings):
    tag, frame_value, long_value = letters
    res = _cli(kafka, "--key", tag, "--resend")
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    assert sum(line.startswith("sent again:") for line in lines) == 3  # backed off, truncated (read back), hostile
    assert sum(line.startswith("not sent again:") for line in lines) == 2
    assert "a message of 'ingested', not a frame" in res.stderr
    assert "holds only part" in res.stderr and f"frames[0]@{10**9} is no longer there" in res.stderr
    again = {m.key(): m for m in read_all(settings, [topics.FRAMES]) if tag.encode() in m.key()}
    assert again[f"Backyard/{tag}".encode()].value() == frame_value
    assert dict(again[f"Backyard/{tag}".encode()].headers()) == {"t.exposure_end": b"1700000000.5", "sig": b"\x00\xff"}
    long_records = [m for m in read_all(settings, [topics.FRAMES]) if m.key() == f"Backyard/{tag}-t".encode()]
    assert len(long_records) == 2 and long_records[1].value() == long_value  # the original, and it sent again
    assert dict(long_records[1].headers()) == {"t.exposure_end": b"1700000001.5"}


def test_resend_of_a_truncated_letter_refuses_a_record_that_is_not_its_frame(kafka, settings):
    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    topics.create_topics(kafka.bootstrap, [topics.TopicSpec(topics.FRAMES)])
    other = _produce(producer, topics.FRAMES, b"another frame at that offset", b"Backyard/other")
    letter = DeadLetter("dlq.ingest", 0, 1, serde.decode("dlq", _letter(
        topics.FRAMES, b"Backyard/x", b"the refused frame" * 10, CorruptFrame("cut"), 16, other)))
    with pytest.raises(NotResendable, match="SHA-256"):
        resend(letter, producer, settings)


def test_resend_of_a_truncated_letter_whose_frame_has_a_header_name_that_is_not_utf8_is_refused(kafka, settings):
    """Such a frame is a ``decode`` dead letter of ingest; one over ``dlq_value_bytes`` is read back from ``frames``.

    ``resend`` read its headers with ``msg.headers()``: ``SystemError`` out of ``broker dead-letters
    --resend`` (a traceback), or, on a call site CPython had specialised, a crash of the process.
    """
    from tests.streams.raw_produce import produce_raw

    topics.create_topics(kafka.bootstrap, [topics.TopicSpec(topics.FRAMES)])
    value = b"a frame whose header name is not UTF-8" * 10
    offset = produce_raw(kafka.bootstrap, topics.FRAMES, value, [(b"\xfft.exposure_end", b"1")], key=b"Backyard/h")
    letter = DeadLetter("dlq.ingest", 0, 1, serde.decode("dlq", _letter(
        topics.FRAMES, b"Backyard/h", value, DecodeError("headers that cannot be read"), 16, offset)))
    with pytest.raises(NotResendable, match="not UTF-8"):
        resend(letter, Producer({"bootstrap.servers": kafka.bootstrap}), settings)


def test_resend_refuses_a_value_that_does_not_match_its_checksum():
    rec = {"topic": topics.FRAMES, "value": b"changed", "truncated": False, "value_size": 7,
           "value_sha256": "0" * 64, "key": b"k", "headers": {}}
    with pytest.raises(NotResendable, match="SHA-256"):
        resend(DeadLetter("dlq.ingest", 0, 1, rec), producer=None)  # refused before anything is produced


def test_an_unknown_stage_is_a_clear_error(kafka):
    res = runner.invoke(app, ["dead-letters", "--bootstrap", kafka.bootstrap, "--stage", "nosuch"])
    assert res.exit_code == 2 and "unknown stage(s) ['nosuch']" in res.output
