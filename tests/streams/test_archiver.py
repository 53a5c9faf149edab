"""The archive stage on the embedded broker: every alert once, dead letters, SIGKILL mid-batch, query and replay."""

from __future__ import annotations

import copy
import io
import signal
import time
import uuid
from collections import Counter

import fastavro
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from typer.testing import CliRunner

import schemas
from broker.archive.config import ArchiveConfig
from broker.archive.log import positions
from broker.archive.reader import Archive
from broker.errors import ConfigError
from broker.simulate import SimConfig, SkySimulator
from streams import serde, topics
from streams.archiver import FAILPOINT_ENV, Archiver
from streams.cli import app
from streams.demo import start_stages, stop_stages, wait_until_drained
from streams.framestore import FrameStore
from streams.framing import AlertEncoder, FramingConfig, decode_alert
from streams.monitor import read_all, stage_backlog
from streams.producer import FrameProducer
from streams.stages import STAGE_NAMES, pipeline_topics
from tests.broker.test_archive import same

pytestmark = pytest.mark.kafka


def _sample() -> dict:
    data = (schemas.ROOT / "alert" / "samples" / f"v{schemas.CURRENT['alert']}.avro").read_bytes()
    (record,) = fastavro.reader(io.BytesIO(data))
    return record


def _alerts(n: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        rec = copy.deepcopy(_sample())
        rec["objectId"], rec["candid"], rec["alertId"] = f"OBJ{i:05d}", f"F-{i}/0", i
        out.append(rec)
    return out


def _foreign_ocf() -> bytes:
    schema = {"type": "record", "name": "Other", "fields": [{"name": "objectId", "type": "string"}]}
    buf = io.BytesIO()
    fastavro.writer(buf, schema, [{"objectId": "X"}])
    return buf.getvalue()


def test_every_alert_is_archived_once_and_bad_messages_are_dead_lettered(settings, tmp_path):
    stage, topic = f"archive-{uuid.uuid4().hex[:6]}", f"alerts-{uuid.uuid4().hex[:6]}"
    topics.create_topics(settings.bootstrap, [topics.TopicSpec(topic, 2), topics.TopicSpec(topics.dlq(stage))])
    producer = Producer(settings.producer())
    ocf, fink = AlertEncoder(FramingConfig("ocf")), AlertEncoder(FramingConfig("fink"))
    sent = _alerts(9)
    for i, rec in enumerate(sent):
        out = (fink if i % 3 == 0 else ocf).encode(rec, rec["objectId"].encode())
        producer.produce(topic, out.value, out.key, partition=i % 2, headers=out.headers)
    timeless = copy.deepcopy(sent[0])
    timeless["source"]["mjd"] = float("nan")  # decodes, but has no night to be filed under
    bad = [(b"\x00not an alert", "decode"), (b"", "decode"), (_foreign_ocf(), "decode"),
           (ocf.encode(timeless, b"k").value, "schema")]
    for value, _ in bad:
        producer.produce(topic, value, b"bad", partition=0)
    producer.flush(10)

    url = str(tmp_path / "archive")
    config = ArchiveConfig(batch_alerts=4, batch_seconds=1.0)
    n = Archiver(config, url, settings, stage=stage, input_topic=topic).run(idle_timeout=6)
    archive = Archive(url)
    assert n == len(sent) + len(bad) and archive.count() == len(sent)
    rows = archive.query("SELECT object_id, kafka_partition, kafka_offset, alert FROM alerts").to_pylist()
    assert sorted(r["object_id"] for r in rows) == [r["objectId"] for r in sent]
    by_id = {r["objectId"]: r for r in sent}
    assert all(same(dict(r["alert"]), by_id[r["object_id"]]) for r in rows)  # fink and ocf alike
    dead = [serde.decode("dlq", m.value(), dict(m.headers())) for m in read_all(settings, [topics.dlq(stage)])]
    assert [d["reason"] for d in dead] == [reason for _, reason in bad] and all(d["stage"] == stage for d in dead)
    assert sum(c.dead_letters for c in archive.log()) == len(bad)

    # the archive's offsets are committed to Kafka too (lag monitoring sees a caught-up stage)
    assert stage_backlog(settings, stage, topic) == 0
    consumer = Consumer(settings.consumer(stage))
    committed = consumer.committed([TopicPartition(topic, p) for p in (0, 1)], timeout=10)
    consumer.close()
    assert {(topic, tp.partition): tp.offset for tp in committed} == positions(archive.log())

    # a restarted stage starts where the archive stands: only the new alerts are added
    more = _alerts(3, start=100)
    for rec in more:
        out = ocf.encode(rec, rec["objectId"].encode())
        producer.produce(topic, out.value, out.key, partition=1, headers=out.headers)
    producer.flush(10)
    assert Archiver(config, url, settings, stage=stage, input_topic=topic).run(idle_timeout=6) == len(more)
    ids = archive.query("SELECT object_id FROM alerts").column(0).to_pylist()
    assert sorted(ids) == sorted(r["objectId"] for r in sent + more)


# --- a real pipeline run --------------------------------------------------------------------------
SIM = SimConfig(shape=(512, 512), fields=("F001",), n_stars=250, n_galaxies=25, n_transients=6,
                n_variables=4, n_moving=1, n_cosmic_rays=10.0)


@pytest.fixture
def pipeline():
    """A broker of its own (the pipeline's topic names are fixed) and a schema registry."""
    from streams.embedded import EmbeddedKafka
    from streams.registry import EmbeddedRegistry
    from streams.settings import KafkaSettings

    with EmbeddedKafka() as kafka, EmbeddedRegistry() as registry:
        yield KafkaSettings(kafka.bootstrap, app_id="archive-test"), registry.url


def _kafka_position(settings, group: str) -> int:
    consumer = Consumer(settings.consumer(group))
    try:
        (tp,) = consumer.committed([TopicPartition(topics.ALERTS, 0)], timeout=10)
        return tp.offset
    finally:
        consumer.close()


def _run_with_two_crashes(settings, workdir, config) -> Archive:
    """The pipeline with the archive stage SIGKILLed mid-batch twice (files written; commit record written)."""
    i = STAGE_NAMES.index("archive")
    procs = start_stages(settings.bootstrap, settings.app_id, workdir, config, env={FAILPOINT_ENV: "files:2"})
    archive = Archive(workdir / "state" / "archive")
    try:
        producer = FrameProducer(settings, FrameStore(str(workdir / "frames")), 8 << 20, 1 << 30)
        for frame, _ in SkySimulator(SIM, seed=3).frames(6):
            producer.publish_frame(frame, time.time())
        producer.flush()
        assert procs[i].wait(timeout=500) == -signal.SIGKILL
        committed = {f.path for f in archive.files()}
        assert len(archive.log()) == 1  # the second batch's files are on disk, not committed
        assert [p for p in archive.sizes() if p.endswith(".parquet") and p not in committed]
        (procs[i],) = start_stages(settings.bootstrap, settings.app_id, workdir, config, stages=("archive",),
                                   env={FAILPOINT_ENV: "commit:2"})
        assert procs[i].wait(timeout=300) == -signal.SIGKILL
        assert archive.log()[-1].offsets  # the last record is its batch's; Kafka was not told
        assert _kafka_position(settings, "archive") < positions(archive.log())[(topics.ALERTS, 0)]
        (procs[i],) = start_stages(settings.bootstrap, settings.app_id, workdir, config, stages=("archive",))
        wait_until_drained(settings, procs, timeout=300)
    finally:
        stop_stages(procs)
    assert [p.returncode for p in procs] == [0] * len(STAGE_NAMES)
    return archive


def _replayed(settings, topic: str, registry: str) -> dict[str, dict]:
    records = [r for m in read_all(settings, [topic]) for r in decode_alert(m.key(), m.value(), dict(m.headers()),
                                                                             registry=registry)]
    return {r["candid"]: r for r in records}


@pytest.mark.slow
def test_a_sigkilled_archiver_loses_and_repeats_nothing_and_the_archive_answers(pipeline, tmp_path):
    settings, registry = pipeline
    config = tmp_path / "pipeline.toml"
    config.write_text("[archive]\nbatch_alerts = 3\nbatch_seconds = 2.0\ncompact_files = 2\n")  # many commits
    replay_topics = ["replay.ocf", "replay.fink", "replay.confluent"]
    extra = [topics.TopicSpec(t) for t in replay_topics]
    topics.create_topics(settings.bootstrap, pipeline_topics(SIM.filters) + extra)
    archive = _run_with_two_crashes(settings, tmp_path, config)

    alerts = {a["candid"]: a for m in read_all(settings, [topics.ALERTS]) for a in decode_alert(m.key(), m.value())}
    archived = Counter(archive.query("SELECT candid FROM alerts").column(0).to_pylist())
    assert alerts and archived == Counter(set(alerts))  # every alert of the run, each once
    retired = {p for c in archive.log() for p in c.removed}  # compacted: kept an hour for queries in flight
    on_disk = {p for p in archive.sizes() if p.endswith(".parquet")}
    assert retired and on_disk == {f.path for f in archive.files()} | retired  # no orphan left

    runner, where = CliRunner(), "snr > 0"
    res = runner.invoke(app, ["query", "--archive", archive.url, f"SELECT count(*) AS n FROM alerts WHERE {where}"])
    expected = sum(a["source"]["snr"] > 0 for a in alerts.values())
    assert res.exit_code == 0 and f"│ {expected} " in res.output, res.output
    for topic in replay_topics:
        framing = topic.split(".")[1]
        res = runner.invoke(app, ["replay", "--topic", topic, "--bootstrap", settings.bootstrap, "--archive",
                                  str(archive.url), "--from", "2000-01-01", "--to", "2100-01-01T00:00:00Z",
                                  "--where", where, "--framing", framing, "--registry-url", registry])
        assert res.exit_code == 0 and f"replayed {expected} alert(s)" in res.output, res.output
        back = _replayed(settings, topic, registry)
        assert back.keys() == {c for c, a in alerts.items() if a["source"]["snr"] > 0}
        assert all(same(back[c], alerts[c]) for c in back)  # the exact records, in any framing
    res = runner.invoke(app, ["replay", "--topic", topics.ALERTS, "--bootstrap", settings.bootstrap,
                              "--archive", str(archive.url)])
    assert res.exit_code == 2 and "archive these alerts twice" in res.output

    f = archive.files()[0]  # a truncated file: reported, never skipped
    data = archive.fs.cat_file(archive.path(f.path))
    archive.fs.pipe_file(archive.path(f.path), data[:-100])
    for args in (["query", "--archive", str(archive.url), "SELECT count(*) FROM alerts"],
                 ["replay", "--topic", "replay.ocf", "--bootstrap", settings.bootstrap, "--archive", str(archive.url)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "truncated" in res.output and f.path in res.output, res.output


def test_a_valid_alert_with_a_junk_schema_header_is_archived_not_dead_lettered(tmp_path):
    """``schema: alert/²`` (or 5000 digits) made ``version_of`` raise: the alert was ``unexpected:ValueError``.

    The header only says which version to try first; the container's alert is archived whatever it says.
    """
    from confluent_kafka import Message

    from streams.settings import KafkaSettings

    archiver = Archiver(ArchiveConfig(), str(tmp_path / "archive"), KafkaSettings("127.0.0.1:1"))
    value = serde.encode_ocf("alert", _alerts(1)[0])
    tags = ("alert/\u00b2".encode(), b"alert/" + b"9" * 5000, b"\xff\xfe", b"alert/-1", b"alert/4")
    for offset, tag in enumerate(tags):
        msg = Message(topic="alerts", partition=0, offset=offset, key=b"OBJ00000", value=value,
                      headers=[("_format", b"avro"), (serde.SCHEMA_HEADER, tag)])
        assert archiver._take(msg)
    assert archiver.batch.dead == [] and archiver.batch.alerts == len(tags)
    (rows,) = archiver._rows(archiver.batch.pending)
    assert rows.num_rows == len(tags)


def _container(writer_schema: bytes) -> bytes:
    """An Avro container file whose header names ``writer_schema`` (JSON, as written), with one empty block."""

    def long(n: int) -> bytes:
        n, out = (n << 1) ^ (n >> 63), bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    meta = ((b"avro.schema", writer_schema), (b"avro.codec", b"null"))
    sync = b"S" * 16
    header = b"Obj\x01" + long(len(meta)) + b"".join(long(len(k)) + k + long(len(v)) + v for k, v in meta)
    return header + long(0) + sync + long(1) + long(1) + b"\x00" + sync


def test_a_container_whose_writer_schema_holds_a_lone_surrogate_is_dead_lettered_not_a_crash_loop(tmp_path):
    r"""A field type ``"\udcfe"`` (valid JSON) went into the decode error, which the dead letter could not encode.

    The ``SchemaError`` escaped the archive stage, which met the message again at every restart.
    """
    from confluent_kafka import Message

    from streams.settings import KafkaSettings

    archiver = Archiver(ArchiveConfig(), str(tmp_path / "archive"), KafkaSettings("127.0.0.1:1"))
    schema = b'{"type": "record", "name": "a", "fields": [{"name": "b", "type": "\\udcfe"}]}'
    for offset, (key, value) in enumerate(((None, _container(schema)), (schema, b"\x00"))):  # OCF, then Fink
        assert archiver._take(Message(topic="alerts", partition=0, offset=offset, key=key, value=value,
                                      headers=[("_format", b"avro")] if key is None else []))
    letters = [serde.decode("dlq", d.value, d.headers) for d in archiver.batch.dead]
    assert [d["reason"] for d in letters] == ["decode", "decode"]
    assert all("\\udcfe" in d["message"] for d in letters) and letters[0]["value"] == _container(schema)


def _large_alert_message(offset: int, cutout_bytes: int):
    """A message of one alert whose three cutouts are ``cutout_bytes`` of random bytes each."""
    import os

    from confluent_kafka import Message

    (rec,) = _alerts(1, start=offset)
    for cutout in ("cutoutScience", "cutoutTemplate", "cutoutDifference"):
        rec[cutout]["stampData"] = os.urandom(cutout_bytes)
    return Message(topic="alerts", partition=0, offset=offset, key=rec["objectId"].encode(),
                   value=serde.encode_ocf("alert", rec), headers=[("_format", b"avro")])


def test_a_batch_of_large_alerts_is_committed_once_it_holds_batch_bytes(tmp_path):
    """A batch was bounded by its count of alerts and its age only: 2000 alerts of up to 64 MiB each.

    It is now committed too once its messages (keys and values) pass ``batch_bytes``.
    """
    from streams.settings import KafkaSettings

    archiver = Archiver(ArchiveConfig(batch_bytes=8 << 20), str(tmp_path / "archive"), KafkaSettings("127.0.0.1:1"))
    messages = [_large_alert_message(i, 1 << 20) for i in range(3)]  # ~3 MiB each
    due = []
    for msg in messages:
        archiver._take(msg)
        due.append(archiver._due())
    assert due == [False, False, True]
    assert archiver.batch.bytes == sum(len(m.value()) + len(m.key()) for m in messages) > 8 << 20
    with pytest.raises(ConfigError, match="batch_bytes >= 1"):
        ArchiveConfig(batch_bytes=0)


class _RefusingProducer:
    """Reports ``MSG_SIZE_TOO_LARGE`` for every message at flush, leaving none in its queue (as librdkafka does)."""

    def __init__(self) -> None:
        self.pending: list = []

    def produce(self, topic, value, key=None, headers=None, on_delivery=None) -> None:
        self.pending.append(on_delivery)

    def flush(self, timeout: float) -> int:
        from confluent_kafka import KafkaError

        for on_delivery in self.pending:
            if on_delivery is not None:
                on_delivery(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None)
        self.pending = []
        return 0


def test_a_refused_dead_letter_keeps_the_batch_from_committing(tmp_path):
    """A dead letter the broker refused left nothing in the queue: it passed as delivered and the batch committed.

    Its message was then lost: neither archived nor dead-lettered. Now the batch is not committed.
    """
    from confluent_kafka import Message

    from broker.errors import StageFailure
    from streams.settings import KafkaSettings

    archiver = Archiver(ArchiveConfig(), str(tmp_path / "archive"), KafkaSettings("127.0.0.1:1"))
    archiver._producer = _RefusingProducer()
    assert archiver._take(Message(topic="alerts", partition=0, offset=0, key=b"k", value=b"\x00garbage",
                                  headers=[("_format", b"avro")]))
    with pytest.raises(StageFailure, match=r"1 refused \(.*\); the batch is not committed"):
        archiver._flush(consumer=None)
    assert archiver.writer.positions() == {}



def test_an_alert_whose_header_name_is_not_utf8_is_dead_lettered_not_a_crash_loop(settings, tmp_path):
    """Reading such a header raised ``SystemError`` out of the archive stage, which met it again at every restart."""
    from streams.settings import KafkaSettings
    from tests.streams.raw_produce import produce_raw

    topic = f"alerts-{uuid.uuid4().hex[:6]}"
    topics.create_topics(settings.bootstrap, [topics.TopicSpec(topic)])
    value = serde.encode_ocf("alert", _alerts(1)[0])
    produce_raw(settings.bootstrap, topic, value, [(b"\xff_format", b"avro")])
    (raw,) = read_all(settings, [topic])
    archiver = Archiver(ArchiveConfig(), str(tmp_path / "archive"), KafkaSettings("127.0.0.1:1"))
    assert archiver._take(raw)
    (letter,) = [serde.decode("dlq", d.value, d.headers) for d in archiver.batch.dead]
    assert (letter["reason"], letter["value"], letter["headers"]) == ("decode", value, {})


def test_an_archive_that_cannot_be_written_stops_the_stage_with_its_reason_and_commits_nothing(tmp_path):
    """An archive folder gone (or a full disk, an object store down) escaped as a traceback."""
    import shutil

    from confluent_kafka import Message

    from broker.errors import StageFailure
    from streams.settings import KafkaSettings

    archiver = Archiver(ArchiveConfig(), str(tmp_path / "archive"), KafkaSettings("127.0.0.1:1"))
    assert archiver._take(Message(topic="alerts", partition=0, offset=0, key=b"k",
                                  value=serde.encode_ocf("alert", _alerts(1)[0]), headers=[("_format", b"avro")]))
    shutil.rmtree(tmp_path / "archive", ignore_errors=True)
    (tmp_path / "archive").write_bytes(b"")  # the archive's path is now a file: nothing can be written under it
    with pytest.raises(StageFailure, match=r"cannot be written \(.*Error.*\); the batch is not committed"):
        archiver._flush(consumer=None)
    (tmp_path / "archive").unlink()
    assert Archive(tmp_path / "archive").count() == 0


def test_a_batch_of_dead_letters_over_the_producers_queue_is_sent_not_a_buffer_error(settings, tmp_path):
    """A batch's dead letters were produced without serving delivery reports: past the queue, ``BufferError``.

    A batch holds up to ``batch_alerts`` (2000) dead letters of up to 1 MiB; the producer's queue
    holds 1 GiB, so ~1,000 garbage messages of 1 MiB (a backlog read in one batch) raised it out of the
    stage, which met the same batch at every restart. Here the queue is made to hold one dead letter.
    """
    from confluent_kafka import Message

    from streams.settings import KafkaSettings

    stage = f"archive-{uuid.uuid4().hex[:6]}"
    topics.create_topics(settings.bootstrap, [topics.TopicSpec(topics.dlq(stage))])
    archiver = Archiver(ArchiveConfig(), str(tmp_path / "archive"), KafkaSettings("127.0.0.1:1"), stage=stage)
    archiver._producer = Producer({"bootstrap.servers": settings.bootstrap, "queue.buffering.max.kbytes": 1536,
                                   "message.max.bytes": 4 << 20})
    for offset in range(3):
        garbage = bytes([offset]) + b"\x00garbage" * 150_000  # 1.2 MB: its dead letter keeps 1 MiB
        assert archiver._take(Message(topic="alerts", partition=0, offset=offset, key=b"k", value=garbage))
    archiver._send_dead_letters(archiver.batch.dead)
    letters = [serde.decode("dlq", m.value(), dict(m.headers())) for m in read_all(settings, [topics.dlq(stage)])]
    assert [(d["offset"], d["reason"], d["value_size"]) for d in letters] == [(i, "decode", 1_200_001)
                                                                              for i in range(3)]


def test_a_registry_that_does_not_answer_keeps_the_alert_for_a_retry_not_a_dead_letter(tmp_path):
    """A registry outage dead-lettered every ``confluent`` alert of the archive stage (reason registry_unavailable).

    Not the message's fault: the stage now keeps it (nothing of it in the batch), seeks back to it
    and polls it again after the stages' outage wait, as the other stages do for an outage.
    """
    import struct

    from confluent_kafka import Message

    from broker.errors import RegistryUnavailable
    from streams.embedded import free_port
    from streams.settings import KafkaSettings

    archiver = Archiver(ArchiveConfig(), str(tmp_path / "archive"), KafkaSettings("127.0.0.1:1"),
                        registry=f"http://127.0.0.1:{free_port()}")
    raw = Message(topic="alerts", partition=0, offset=7, key=b"k", value=struct.pack(">bI", 0, 42) + b"\x02" * 64)
    with pytest.raises(RegistryUnavailable):
        archiver._take(raw)
    assert archiver.batch.messages == 0 and not archiver.batch.dead

    class Seeks:
        def __init__(self) -> None:
            self.seen: list = []

        def seek(self, tp) -> None:
            self.seen.append((tp.topic, tp.partition, tp.offset))

    consumer = Seeks()
    archiver.stop_event.set()  # the wait returns at once
    assert not archiver._taken(consumer, raw)
    assert consumer.seen == [("alerts", 0, 7)] and archiver.batch.messages == 0 and not archiver.batch.dead
    assert archiver.metrics.outages.labels("archive", "registry_unavailable")._value.get() == 1


def test_a_left_out_frames_alert_stays_out_of_the_archive_latency_histogram(tmp_path):
    """An alert of a frame searched late (``t.searched_late``, nights after its shutter closed) is not the SLO's."""
    from confluent_kafka import Message

    from streams.settings import KafkaSettings

    archiver = Archiver(ArchiveConfig(), str(tmp_path / "archive"), KafkaSettings("127.0.0.1:1"))
    for i, late in enumerate((False, True)):
        (rec,) = _alerts(1, start=i)
        headers = [("_format", b"avro"), ("t.exposure_end", b"1700000000.0")] + [("t.searched_late", b"1.8e9")] * late
        archiver._take(Message(topic="alerts", partition=0, offset=i, key=rec["objectId"].encode(),
                               value=serde.encode_ocf("alert", rec), headers=headers))
    assert archiver.batch.alerts == 2 and archiver.batch.exposure_ends == [1700000000.0]
