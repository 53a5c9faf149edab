"""Replay: archived alerts back onto a topic, exactly as archived, in any framing; clear refusals."""

from __future__ import annotations

import copy
import uuid

import pytest

import schemas
from broker.archive.log import OffsetRange
from broker.archive.reader import Archive
from broker.archive.rows import mjd_of, to_batch
from broker.archive.writer import ArchiveWriter
from broker.errors import ArchiveError, UnknownTopic
from streams import topics
from streams.framing import FramingConfig, decode_alert
from streams.monitor import read_all
from streams.replay import replay, selection
from tests.broker.test_archive import archived, objects, same, sample


def test_the_selection_is_a_time_range_and_a_condition():
    assert selection() == "true"
    assert selection("2025-03-14", None, "rb > 0.8") == f"mjd >= {mjd_of('2025-03-14')!r} AND (rb > 0.8)"
    assert selection(None, "2025-03-15T00:00:00Z") == f"mjd < {mjd_of('2025-03-15T00:00:00+00:00')!r}"
    with pytest.raises(ArchiveError, match="ISO 8601"):
        selection("last week")


def test_an_inverted_or_empty_range_is_refused_not_replayed_as_nothing():
    """``--from`` after ``--to`` (or a time zone that puts it there) replayed 0 alerts and said nothing else."""
    for start, end in (("2025-03-15", "2025-03-14"), ("2025-03-14T00:00", "2025-03-14T00:00"),
                       ("2025-03-14T01:00+02:00", "2025-03-13T23:00Z")):
        with pytest.raises(ArchiveError, match="is not after --from"):
            selection(start, end)
    assert selection("2025-03-14T01:00+02:00", "2025-03-13T23:01Z")  # one minute, once the zones are counted


@pytest.fixture
def archive(tmp_path):
    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    old = sample(1)  # an alert archived under v1: replayed in the current version
    old["objectId"] = "OBJv1"
    source = f"alerts-{uuid.uuid4().hex[:6]}"  # the topic the archive read
    alerts = archived(objects(12, schemas.CURRENT["alert"]) + [old], topic=source)
    for i, a in enumerate(alerts):
        a.record["source"]["mjd"] = 60000.5 + i
    writer.commit(writer.write([to_batch([a]) for a in alerts]), [OffsetRange(source, 0, 0, len(alerts))])
    return Archive(tmp_path / "archive"), [a.record for a in alerts]


@pytest.mark.kafka
@pytest.mark.parametrize("framing", ["ocf", "fink"])
def test_replay_publishes_the_archived_records_in_order(settings, archive, framing):
    store, records = archive
    topic = f"replay-{uuid.uuid4().hex[:6]}"
    topics.create_topics(settings.bootstrap, [topics.TopicSpec(topic)])
    seen: list[int] = []
    cond = selection("1858-11-20T00:00:00", None, "rb > 0.3 OR object_id = 'OBJv1'") + f" AND mjd < {60000.5 + 12.5}"
    n = replay(store, settings, topic, cond, FramingConfig(framing), on_start=seen.append,
               on_alert=lambda: seen.append(-1))
    want = [r for r in records if r["scores"]["rb"] > 0.3 or r["objectId"] == "OBJv1"]
    assert n == len(want) == seen[0] == seen.count(-1) > 2
    back = [a for m in read_all(settings, [topic]) for a in decode_alert(m.key(), m.value(), dict(m.headers()))]
    assert [a["objectId"] for a in back] == [r["objectId"] for r in want]  # observation order
    for got, original in zip(back, want, strict=True):
        if original["objectId"] == "OBJv1":  # resolved to the current version: the v1 fields kept
            assert got["schemavsn"] == original["schemavsn"] and same(got["source"]["ra"], original["source"]["ra"])
            assert got["cutoutScience"] == original["cutoutScience"] and "prv_forced_sources" in got
        else:
            assert same(got, original)


@pytest.mark.kafka
def test_replay_refuses_a_missing_topic_and_the_archived_one(settings, archive):
    store, _ = archive
    missing = f"nowhere-{uuid.uuid4().hex[:6]}"
    with pytest.raises(UnknownTopic, match=f"does not exist.*broker topics .*--framing {missing}=ocf"):
        replay(store, settings, missing)  # the command that creates it: `broker topics` alone does not
    (source,) = {t for t, _ in store.snapshot().positions}
    topics.create_topics(settings.bootstrap, [topics.TopicSpec(source)])
    with pytest.raises(ArchiveError, match="archive these alerts twice"):
        replay(store, settings, source)


@pytest.mark.kafka
def test_an_alert_archived_twice_is_replayed_once_as_first_archived(settings, tmp_path):
    """An alert archived twice (a replay into the topic the archive reads, a producer repeating an id) is sent once.

    Replay sent both copies, and subscribers keyed on the alert id saw it twice, or the later one last.
    """
    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    recs = objects(5, schemas.CURRENT["alert"])
    for i, r in enumerate(recs):
        r["source"]["mjd"] = 60000.5 + i
    source = f"alerts-{uuid.uuid4().hex[:6]}"
    alerts = archived(recs, topic=source)
    writer.commit(writer.write([to_batch(alerts)]), [OffsetRange(source, 0, 0, 5)])
    forged = [copy.deepcopy(recs[3]), copy.deepcopy(recs[1])]
    for f in forged:
        f["source"]["mjd"] -= 0.25  # earlier in observation order than the first copy
        f["scores"]["rb"] = 0.999
    later = archived(forged, topic=source, start=5)
    writer.commit(writer.write([to_batch(later)]), [OffsetRange(source, 0, 5, 7)])
    topic = f"replay-{uuid.uuid4().hex[:6]}"
    topics.create_topics(settings.bootstrap, [topics.TopicSpec(topic)])
    assert replay(Archive(tmp_path / "archive"), settings, topic) == 5
    back = [a for m in read_all(settings, [topic]) for a in decode_alert(m.key(), m.value(), dict(m.headers()))]
    assert [a["alertId"] for a in back] == [r["alertId"] for r in recs]  # once each, in observation order
    assert all(same(got, original) for got, original in zip(back, recs, strict=True))
    assert replay(Archive(tmp_path / "archive"), settings, topic, "rb = 0.999") == 0  # never the later copies


@pytest.mark.kafka
def test_an_alert_the_client_refuses_as_too_large_is_a_failed_delivery_not_a_traceback(settings, tmp_path,
                                                                                        monkeypatch):
    """``produce`` raised KafkaException (MSG_SIZE_TOO_LARGE) out of ``broker replay``: a traceback, the rest unsent.

    An alert archived from a ``confluent`` topic near the largest message is over it once framed with an
    OCF header; here the producer's limit is lowered instead, under the second of three alerts.
    """
    import streams.settings

    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    recs = objects(3, schemas.CURRENT["alert"])
    for i, r in enumerate(recs):
        r["source"]["mjd"] = 60000.5 + i
    recs[1]["cutoutScience"]["stampData"] = bytes(range(256)) * 2000  # 512 kB: over the lowered limit
    source = f"alerts-{uuid.uuid4().hex[:6]}"
    writer.commit(writer.write([to_batch(archived(recs, topic=source))]), [OffsetRange(source, 0, 0, 3)])
    topic = f"replay-{uuid.uuid4().hex[:6]}"
    topics.create_topics(settings.bootstrap, [topics.TopicSpec(topic)])
    with monkeypatch.context() as patched, pytest.raises(ArchiveError, match="1 of 3 .* not delivered.*(?i:too large)"):
        patched.setattr(streams.settings, "MAX_MESSAGE_BYTES", 256 * 1024)
        replay(Archive(tmp_path / "archive"), settings, topic)
    back = [a for m in read_all(settings, [topic]) for a in decode_alert(m.key(), m.value(), dict(m.headers()))]
    assert [a["alertId"] for a in back] == [recs[0]["alertId"], recs[2]["alertId"]]
