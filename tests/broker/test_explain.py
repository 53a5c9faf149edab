"""Tests of broker.explain: integrated gradients over the three channels, PNG, CLI entry point."""

from __future__ import annotations

import numpy as np
import pytest

from broker.explain import explain_cutouts, explain_triplet, main_explain, plot_explanation
from broker.normalise import normalise_triplet
from broker.realbogus import RealBogusClassifier, RealBogusNetV2
from broker.training.data import synth_triplets


@pytest.fixture(scope="module")
def clf():
    return RealBogusClassifier.load()


@pytest.fixture(scope="module")
def raw():
    x, labels, kinds = synth_triplets(8, seed=3)
    return x, labels, kinds


def test_attribution_shape_and_completeness(clf, raw):
    x, _, _ = raw
    trip, _ = normalise_triplet(*x[0])
    exp = explain_triplet(clf, trip)
    assert exp.attribution.shape == (3, 63, 63) and exp.attribution.dtype == np.float32
    assert np.all(np.isfinite(exp.attribution))
    assert exp.score == pytest.approx(float(clf.score(trip[None])[0]), abs=1e-5)
    # completeness: the attributions add up to logit(x) - logit(baseline), up to quadrature
    logit = np.log(exp.score / (1 - exp.score)) - np.log(exp.baseline_score / (1 - exp.baseline_score))
    assert abs(exp.completeness_error) < 0.1 * max(1.0, abs(logit))
    assert sum(exp.channel_share().values()) == pytest.approx(1.0)


def test_attribution_concentrates_on_the_candidate(clf, raw):
    """For a point source the attribution is denser near the centre than elsewhere.

    The central 21x21 px (11% of the stamp) holds over twice its share of the total.
    """
    x, labels, kinds = raw
    i = next(i for i in range(len(kinds)) if labels[i] == 1)
    exp = explain_cutouts(clf, *x[i])
    a = np.abs(exp.attribution).sum(axis=0)
    assert a[21:42, 21:42].sum() > 0.25 * a.sum()


def test_png_written(tmp_path, clf, raw):
    exp = explain_cutouts(clf, *raw[0][1])
    p = plot_explanation(exp, tmp_path / "e.png", "test")
    assert p.is_file() and 5_000 < p.stat().st_size < 200_000
    # an alert's ids in the title (the portal's attribution map) are text: '$' once raised out of savefig
    assert plot_explanation(exp, tmp_path / "tex.png", "OBJ$\\frac{1}{$ c$\\x$/1").is_file()


def test_png_written_where_named_or_a_broker_error(tmp_path, clf, raw):
    """``--out report`` wrote report.png but said "wrote report"; a folder or a file's subfolder was a traceback."""
    from broker.errors import ConfigError

    exp = explain_cutouts(clf, *raw[0][1])
    assert plot_explanation(exp, tmp_path / "report", "test").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "a.png").mkdir()
    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "a.png", tmp_path / "file" / "x.png"):
        with pytest.raises(ConfigError, match="cannot write"):
            plot_explanation(exp, bad, "test")


def test_main_explain_from_npz_and_untrained_model(tmp_path, raw):
    x, _, _ = raw
    np.savez(tmp_path / "trip.npz", science=x[:, 0], reference=x[:, 1], difference=x[:, 2])
    p = main_explain(tmp_path / "trip.npz", index=2, steps=16)
    assert p == tmp_path / "trip-2-explain.png" and p.is_file()
    # any saved model works, e.g. an untrained v2 net
    RealBogusClassifier(RealBogusNetV2(), "test-v0").save(tmp_path / "test-v0")
    q = main_explain(tmp_path / "trip.npz", 0, tmp_path / "q.png", tmp_path / "test-v0.pt", 8)
    assert q.is_file()


def _rubin_like_avro(path, side=30):
    """An Avro file of one packet whose stamps are bytes (Rubin's layout), ``side`` px a side."""
    import fastavro

    from tests.helpers import gz_fits

    keys = ("cutoutScience", "cutoutTemplate", "cutoutDifference")
    schema = {"type": "record", "name": "alert", "fields": [
        {"name": "diaSourceId", "type": "long"}, *({"name": k, "type": ["null", "bytes"]} for k in keys)]}
    rng = np.random.default_rng(0)
    rec = {"diaSourceId": 7, **{k: gz_fits(rng.normal(0, 1, (side, side))) for k in keys}}
    with open(path, "wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(schema), [rec])


def test_load_triplet_reads_an_alert_with_stamps_as_bytes(tmp_path):
    from broker.explain import load_triplet

    _rubin_like_avro(tmp_path / "rubin.avro")
    trip, label = load_triplet(tmp_path / "rubin.avro")
    assert trip.shape == (3, 30, 30) and label == "7"


def _bad_inputs(tmp_path, raw):
    """(file, index, error class, message) of inputs ``broker explain`` must refuse clearly."""
    from broker.errors import CutoutError, DecodeError

    _rubin_like_avro(tmp_path / "good.avro")
    whole = (tmp_path / "good.avro").read_bytes()
    (tmp_path / "cut.avro").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.avro").write_bytes(b"hello" * 100)
    (tmp_path / "tar.avro").write_bytes(b"\x1f\x8b\x08\x00" + bytes(60))  # a .tar.gz of alerts
    (tmp_path / "wire.avro").write_bytes(b"\x00\x00\x00\x04\x4c" + whole[100:])  # Confluent framing
    (tmp_path / "frame.fits").write_bytes(b"SIMPLE  =" + bytes(2871))
    np.save(tmp_path / "one.npy", np.zeros((3, 63, 63)))
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    x = raw[0]
    np.savez(tmp_path / "trip.npz", science=x[:, 0], reference=x[:, 1], difference=x[:, 2])
    np.savez(tmp_path / "odd.npz", science=x[0, 0], reference=x[0, 1][:40], difference=x[0, 2])
    return [("missing.avro", 0, DecodeError, "no such file"),
            ("cut.avro", 0, DecodeError, "not a readable Avro container"),
            ("text.avro", 0, DecodeError, "not an Avro container file"),
            ("tar.avro", 0, DecodeError, "gzip-compressed"),
            ("wire.avro", 0, DecodeError, "Confluent wire framing"),
            ("good.avro", 1, CutoutError, "no index 1"),
            ("good.avro", -1, CutoutError, "no index -1"),
            ("frame.fits", 0, DecodeError, "not an Avro alert file or a readable .npz"),
            ("one.npy", 0, DecodeError, "holds one array"),
            ("other.npz", 0, CutoutError, "no \\['science'"),
            ("trip.npz", len(x), CutoutError, f"no index {len(x)}"),
            ("trip.npz", -1, CutoutError, "no index -1"),
            ("odd.npz", 0, CutoutError, "not 2-D images of one shape")]


def test_load_triplet_refuses_bad_files_with_a_broker_error(tmp_path, raw):
    """``broker explain`` prints these errors (a BrokerError) instead of a traceback."""
    from broker.explain import load_triplet

    for name, index, error, match in _bad_inputs(tmp_path, raw):
        with pytest.raises(error, match=match):
            load_triplet(tmp_path / name, index)


def test_explain_settings_and_inputs_that_would_give_nan_are_refused(clf):
    from broker.errors import ConfigError, CutoutError
    from broker.explain import ExplainConfig

    for bad in ({"steps": 0}, {"steps": -3}, {"batch_size": 0}, {"steps": 2.5}):
        with pytest.raises(ConfigError, match="ExplainConfig"):
            ExplainConfig(**bad)
    x = np.zeros((3, 63, 63), np.float32)
    x[1, 5, 5] = np.nan  # not a normalised triplet: its attribution would be NaN
    with pytest.raises(CutoutError, match="NaN or inf"):
        explain_triplet(clf, x)
