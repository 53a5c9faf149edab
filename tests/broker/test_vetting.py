"""Vetting labels: stored with who/when/model version, hostile ones refused, exported in the training format."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from broker.errors import InvalidLabel
from broker.feedback import FeedbackStore
from broker.labelsfile import read_labels, write_labels
from broker.vetting import LabelStore, Verdict, archived_records, check_verdict, export_labels
from tests.broker.test_archive import archived, commit, sample

BIG_ID = 8303929001448990786  # a real 63-bit alert id: more than a JavaScript number holds


def _verdict(alert_id=7, label="real", who="ana", **kw) -> Verdict:
    return Verdict(alert_id, kw.pop("object_id", "OBJ0000000000007"), kw.pop("candid", "F1/7"), label, who,
                   kw.pop("model_version", "realbogus-v11"), kw.pop("score", 0.73))


def test_labels_are_stored_with_who_when_model_and_score(tmp_path):
    with LabelStore(tmp_path / "labels.sqlite") as store:
        store.record(_verdict(BIG_ID, "bogus", score=0.61), now=1000.0)
        store.record(_verdict(BIG_ID, "real", who="ben", score=0.61), now=1001.0)  # a second opinion, later
        store.record(_verdict(8, "real", score=None), now=1002.0)
    with LabelStore(tmp_path / "labels.sqlite") as store:  # persisted
        rows = store.realbogus()
        latest = store.latest()
        counts = store.counts()
    assert [(v.alert_id, v.label, v.who, v.at) for v in rows] == [
        (BIG_ID, "bogus", "ana", 1000.0), (BIG_ID, "real", "ben", 1001.0), (8, "real", "ana", 1002.0)]
    assert rows[0].model_version == "realbogus-v11" and rows[0].score == pytest.approx(0.61)
    assert [(v.alert_id, v.label, v.who) for v in latest] == [(8, "real", "ana"), (BIG_ID, "real", "ben")]
    assert latest[0].score is None
    assert counts == {"bogus": 1, "real": 2}


def test_anomaly_labels_go_to_the_feedback_file_beside_it_that_broker_feedback_uses(tmp_path):
    path = tmp_path / "labels.sqlite"
    with LabelStore(path) as store:
        store.record(_verdict(9, "interesting", model_version="anomaly-v2", score=0.998), now=5.0)
        store.record(_verdict(10, "not_interesting", model_version="anomaly-v2", score=0.97), now=6.0)
        store.record(_verdict(9, "real"), now=7.0)
        assert store.labelled() == {9, 10}
        assert [(v.alert_id, v.label) for v in store.anomaly()] == [(9, "interesting"), (10, "not_interesting")]
        assert [v.label for v in store.all()] == ["interesting", "not_interesting", "real"]
    with FeedbackStore(tmp_path / "feedback.sqlite") as feedback:  # `broker feedback --state-dir` reads it
        rows = feedback.export()
    assert [(r["alert_id"], r["label"], r["model_version"]) for r in rows] == [
        ("9", "interesting", "anomaly-v2"), ("10", "not", "anomaly-v2")]


def test_a_nan_score_is_stored_as_unknown():
    assert check_verdict(_verdict(score=float("nan"))).score is None


@pytest.mark.parametrize("change", [
    {"label": "REAL"}, {"label": ""}, {"label": "real'); DROP TABLE vetting; --"}, {"label": None},
    {"alert_id": -1}, {"alert_id": 2**63}, {"alert_id": True}, {"alert_id": "12"}, {"alert_id": 1.5},
    {"who": ""}, {"who": "   "}, {"who": "a\x00b"}, {"who": "x" * 200}, {"who": 5},
    {"object_id": ""}, {"candid": "a\nb"}, {"model_version": ""},
    {"candid": "F" * 1025}, {"object_id": "O" * 1025}, {"object_id": " " * 300}, {"candid": "F" * 500 + "\x00"},
    {"candid": "a\x85b"}, {"candid": "a\x7fb"}, {"candid": "a\ud800b"}, {"object_id": "\x9b31m"},
    {"model_version": "m" * 129}, {"who": "a\u0085b"},
    {"score": 1.5}, {"score": -0.1}, {"score": "0.5"}, {"score": True}, {"score": float("inf")},
])
def test_hostile_labels_are_refused_and_nothing_is_stored(change):
    fields = {"alert_id": 7, "object_id": "OBJ1", "candid": "F1/7", "label": "real", "who": "ana",
              "model_version": "rb-1", "score": 0.5, **change}
    store = LabelStore(":memory:")
    with pytest.raises(InvalidLabel):
        store.record(Verdict(**fields))
    assert store.all() == []
    store.close()


def _records(n: int = 4) -> list[dict]:
    out = []
    for i in range(n):
        rec = copy.deepcopy(sample(3))
        rec["alertId"] = rec["sourceId"] = 100 + i
        rec["objectId"], rec["candid"] = f"OBJ{i:013x}", f"TEL-F1-r-0001/{i}"
        rec["source"]["snr"] = 10.0 + i
        out.append(rec)
    return out


def test_export_turns_real_bogus_labels_and_archived_cutouts_into_the_training_format(tmp_path):
    records = _records()
    records[2]["cutoutDifference"]["stampData"] = b"\x1f\x8bnot a gzip stream"
    verdicts = [_verdict(100, "real", object_id="OBJ0000000000000", candid="TEL-F1-r-0001/0"),
                _verdict(101, "bogus", who="ben", score=0.2, object_id="OBJ0000000000001", candid="TEL-F1-r-0001/1"),
                _verdict(102, "real"),  # its cutout is broken
                _verdict(103, "interesting"),  # not a real/bogus label: not exported
                _verdict(999, "bogus")]  # not in the archive
    out = export_labels(verdicts, records)
    assert [(lab.candidate_id, lab.label, lab.labeller) for lab in out.labels] == [
        ("TEL-F1-r-0001/0", 1, "ana"), ("TEL-F1-r-0001/1", 0, "ben")]
    assert out.skipped[999] == "not_archived" and out.skipped[102].startswith("cutout:") and 103 not in out.skipped
    assert out.labels[1].snr == 11.0 and out.labels[1].score == pytest.approx(0.2)
    assert out.labels[0].telescope == records[0]["provenance"]["telescope"]
    assert out.labels[0].science.shape == (63, 63)
    path = tmp_path / "vetted.npz"
    assert write_labels(path, out.labels) == 2
    data = read_labels(path)
    assert list(data["y"]) == [1, 0] and list(data["group"]) == ["OBJ0000000000000", "OBJ0000000000001"]
    assert data["x"].shape == (2, 3, 63, 63) and np.isfinite(data["x"]).all()
    assert export_labels([], records).labels == []


def test_archived_records_reads_only_the_labelled_alerts(tmp_path):
    from broker.archive.reader import Archive
    from broker.archive.writer import ArchiveWriter

    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    commit(writer, archived(_records()))
    store = Archive(tmp_path / "archive")
    assert sorted(r["alertId"] for r in archived_records(store, [101, 103, 555])) == [101, 103]
    assert list(archived_records(store, [])) == []


#: A candidate id as long as the pipeline makes: a 255-character frame id (the most a file name of the reference
#: and difference stores takes), '/', and the largest index.
LONG_CANDID = "LSST-" + "x" * 250 + "/" + str(2**63 - 1)


@pytest.mark.parametrize("object_id,candid", [
    ("OBJ" + "0" * 125, LONG_CANDID), ("O" * 1024, "F" * 1024), ("OBJ/é ünï", "FRAME 2025-03-14 #7 ☄/0")])
def test_labels_take_any_id_the_pipeline_makes_up_to_1024_characters(tmp_path, object_id, candid):
    """Labels of alerts whose ids are over 128 characters were refused (HTTP 400 on the portal)."""
    assert len(LONG_CANDID) == 275
    with LabelStore(tmp_path / "labels.sqlite") as store:
        store.record(_verdict(BIG_ID, object_id=object_id, candid=candid), now=1.0)
        store.record(_verdict(9, "interesting", object_id=object_id, candid=candid), now=2.0)
    with LabelStore(tmp_path / "labels.sqlite") as store:
        (saved,) = store.latest()
        (feedback,) = store.anomaly()
    assert (saved.object_id, saved.candid) == (object_id, candid) and feedback.object_id == object_id


def test_labels_of_long_ids_are_exported_with_them_whole(tmp_path):
    from broker.archive.reader import Archive
    from broker.archive.writer import ArchiveWriter

    records = _records(3)
    long_object = "OBJ" + "7" * 997
    records[1]["objectId"], records[1]["candid"] = long_object, LONG_CANDID
    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    commit(writer, archived(records))
    with LabelStore(tmp_path / "labels.sqlite") as store:
        for rec, label in ((records[0], "real"), (records[1], "bogus")):
            store.record(_verdict(rec["alertId"], label, object_id=rec["objectId"], candid=rec["candid"]))
        verdicts = store.latest()
    out = export_labels(verdicts, archived_records(Archive(tmp_path / "archive"), [v.alert_id for v in verdicts]))
    assert write_labels(tmp_path / "vetted.npz", out.labels) == 2 and not out.skipped
    data = read_labels(tmp_path / "vetted.npz")
    assert list(data["candidate_id"]) == [records[0]["candid"], LONG_CANDID]
    assert list(data["group"]) == [records[0]["objectId"], long_object] and list(data["y"]) == [1, 0]
