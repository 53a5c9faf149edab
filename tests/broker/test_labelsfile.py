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


def _arrays(**replaced) -> dict[str, np.ndarray]:
    """The arrays of a valid one-label file, some replaced."""
    from broker.labelsfile import _STR_KEYS

    arrays = dict(x=np.zeros((1, 3, 63, 63), np.float16), y=np.array([1], np.uint8), snr=np.zeros(1, np.float32),
                  labelled_at=np.zeros(1), score=np.zeros(1, np.float32), format=np.array(FORMAT),
                  **{k: np.array(["a"]) for k in _STR_KEYS})
    return {**arrays, **replaced}


@pytest.mark.parametrize("replaced", [
    {"y": np.array(1)}, {"kind": np.array("vetted")}, {"y": np.ones((1, 1), np.uint8)}, {"y": np.array([1.0])},
    {"x": np.full((1, 3, 63, 63), "a")}, {"x": np.zeros((1, 3, 63, 63), complex)}, {"format": np.array([FORMAT])},
], ids=["0-d labels", "0-d strings", "2-d labels", "float labels", "string pixels", "complex pixels", "1-d format"])
def test_arrays_of_another_type_or_shape_are_refused_by_name(tmp_path, replaced):
    """Each raised TypeError or passed unchecked (0-d arrays have no len(); strings no isfinite)."""
    np.savez(tmp_path / "l.npz", **_arrays(**replaced))
    (key,) = replaced
    with pytest.raises(InvalidLabel, match=f"array {key} is"):
        read_labels(tmp_path / "l.npz")


def test_a_header_announcing_terabytes_is_refused_before_it_is_loaded(tmp_path):
    """A 200-byte member whose header announces 7 TiB raised MemoryError when numpy allocated it."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f2", "fortran_order": False,
                                                  "shape": (10**12, 3, 63, 63)})
    np.savez(tmp_path / "l.npz", **_arrays())
    with zipfile.ZipFile(tmp_path / "l.npz") as src, zipfile.ZipFile(tmp_path / "huge.npz", "w") as out:
        for name in src.namelist():
            out.writestr(name, header.getvalue() + bytes(100) if name == "x.npy" else src.read(name))
    with pytest.raises(InvalidLabel, match="declare .* GiB"):
        read_labels(tmp_path / "huge.npz")
    assert read_labels(tmp_path / "l.npz")["y"].tolist() == [1]
