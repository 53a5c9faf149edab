"""Tests of broker.labelsfile: vetted labels in the training shard format."""

from __future__ import annotations

import numpy as np
import pytest

from broker.errors import InvalidLabel
from broker.labelsfile import FORMAT, VettedLabel, read_labels, write_labels


def _label(i: int, rng: np.random.Generator, **kw) -> VettedLabel:
    stamps = {k: rng.normal(100, 5, (63, 63)) for k in ("science", "reference", "difference")}
    fields = dict(candidate_id=f"F1/{i}", object_id=f"obj{i // 2}", label=i % 2, labeller="ana",
                  labelled_at=1.8e9 + i, model_version="realbogus-v11", score=0.3, snr=7.5,
                  telescope="sim")
    fields.update(stamps)
    fields.update(kw)
    return VettedLabel(**fields)


def test_roundtrip_reads_like_a_shard(tmp_path):
    rng = np.random.default_rng(0)
    labels = [_label(i, rng) for i in range(4)]
    labels.append(_label(4, rng, science=np.full((48, 63), 3.0), reference=np.ones((48, 63)),
                         difference=np.where(np.eye(48, 63) > 0, np.nan, 0.0)))  # CCD edge, NaNs
    assert write_labels(tmp_path / "l.npz", labels) == 5
    d = read_labels(tmp_path / "l.npz")
    assert d["x"].shape == (5, 3, 63, 63) and d["x"].dtype == np.float16
    assert d["y"].tolist() == [0, 1, 0, 1, 0]
    assert d["group"].tolist() == ["obj0", "obj0", "obj1", "obj1", "obj2"]
    assert d["candidate_id"][4] == "F1/4" and str(d["format"]) == FORMAT
    assert np.isfinite(d["x"]).all()


@pytest.mark.parametrize("kw", [{"label": 2}, {"labeller": " "},
                                {"difference": np.zeros((10, 63))}, {"science": np.zeros(63)}])
def test_bad_labels_are_refused(tmp_path, kw):
    with pytest.raises(InvalidLabel):
        write_labels(tmp_path / "l.npz", [_label(0, np.random.default_rng(1), **kw)])


def test_hostile_files_are_refused(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros((1, 3, 63, 63)), y=np.array([1]), format=np.array("something-else"))
    for path in (junk, other, tmp_path / "absent.npz"):
        with pytest.raises(InvalidLabel):
            read_labels(path)
