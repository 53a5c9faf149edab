"""Tests of broker.feedback: operator labels in SQLite."""

from __future__ import annotations

import math

import pytest

from broker.errors import InvalidLabel
from broker.feedback import FeedbackStore


def test_record_and_export_roundtrip(tmp_path):
    path = tmp_path / "sub" / "feedback.sqlite"
    with FeedbackStore(path) as store:
        a = store.record("obj1", "F1/3", "interesting", "ana", "anomaly-v2", 0.997, now=100.0)
        b = store.record("obj2", "F2/1", "not", "bo", "anomaly-v2", None, now=50.0)
        store.record("obj1", "F3/2", "not", "ana", "anomaly-v3", math.nan, now=200.0)
        assert a != b
    with FeedbackStore(path) as again:  # persisted
        rows = again.export()
        assert [r["alert_id"] for r in rows] == ["F2/1", "F1/3", "F3/2"]  # oldest first
        assert rows[1] == {"id": a, "object_id": "obj1", "alert_id": "F1/3", "label": "interesting",
                           "who": "ana", "at": 100.0, "model_version": "anomaly-v2", "score": 0.997}
        assert rows[0]["score"] is None and rows[2]["score"] is None
        assert len(again.export("anomaly-v3")) == 1


@pytest.mark.parametrize("kwargs", [
    {"label": "maybe"}, {"object_id": ""}, {"who": "  "}, {"score": 1.5}, {"score": -0.1},
    {"model_version": ""}, {"alert_id": None},
])
def test_rejects_bad_labels(kwargs):
    args = {"object_id": "o", "alert_id": "a", "label": "not", "who": "w",
            "model_version": "anomaly-v2", "score": 0.5} | kwargs
    store = FeedbackStore(":memory:")
    with pytest.raises(InvalidLabel):
        store.record(**args)
    assert store.export() == []


def test_hostile_strings_are_data():
    store = FeedbackStore(":memory:")
    evil = "x'); DROP TABLE feedback; --"
    store.record(evil, evil, "interesting", evil, evil, 0.0)
    assert store.export()[0]["object_id"] == evil
