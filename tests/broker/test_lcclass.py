"""Tests of broker.lcclass: fit, explainable classification, records, persistence, shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from broker import MODELS_DIR
from broker.errors import ModelError
from broker.lcclass import (
    CLASS_NAMES,
    Classification,
    LCClassConfig,
    LightCurveClassifier,
    fit_lcclass,
    object_weights,
)
from broker.lightcurve import ALL_FEATURE_NAMES
from broker.simulate.lightcurves import simulate_objects
from broker.training.lightcurves import alert_table, training_alerts

TINY = LCClassConfig(n_estimators=8, max_depth=6, min_samples_leaf=3, max_samples=0.8, seed=1)


@pytest.fixture(scope="module")
def data():
    table = alert_table(training_alerts(simulate_objects(90, seed=21), seed=21, max_alerts=8))
    return table.x, table.kind, table.object_id


@pytest.fixture(scope="module")
def model(data):
    x, kind, objects = data
    return fit_lcclass(x, kind, config=TINY, version="lcclass-test", objects=objects)


def test_classify_explains_every_class(model, data):
    x, kind, _ = data
    out = model.classify(x[:50])
    assert len(out) == 50
    for c in out:
        assert set(c.probabilities) == set(CLASS_NAMES)
        assert sum(c.probabilities.values()) == pytest.approx(1.0)
        assert c.label == max(c.probabilities, key=c.probabilities.get)
        assert len(c.explanation) == 3 * len(CLASS_NAMES)
        assert all(f in ALL_FEATURE_NAMES and lab in CLASS_NAMES for lab, f, _ in c.explanation)
    np.testing.assert_allclose([[c.probabilities[k] for k in CLASS_NAMES] for c in out],
                               model.predict_proba(x[:50]), atol=1e-6)
    acc = np.mean(np.array([c.label for c in model.classify(x)]) == kind)
    assert acc > 0.6  # training fit of a tiny forest, 6 classes


def test_hostile_rows(model):
    x = np.full((3, len(ALL_FEATURE_NAMES)), np.nan)
    x[1] = np.inf
    x[2] = -1e300
    out = model.classify(x)
    assert all(np.isfinite(list(c.probabilities.values())).all() for c in out)
    with pytest.raises(ValueError):
        model.classify(np.zeros((1, 3)))


def test_record_roundtrip(model, data):
    c = model.classify(data[0][:1])[0]
    rec = json.loads(json.dumps(c.to_record()))
    assert list(rec["probabilities"]) == list(CLASS_NAMES)
    assert set(rec["explanation"][0]) == {"label", "feature", "contribution"}
    assert Classification.from_record(rec) == c


def test_save_load_and_errors(model, data, tmp_path):
    p = model.save(tmp_path / "lcclass-test")
    again = LightCurveClassifier.load(p)
    assert again.version == "lcclass-test"
    np.testing.assert_allclose(again.predict_proba(data[0][:20]), model.predict_proba(data[0][:20]))
    assert LightCurveClassifier.load(tmp_path / "lcclass-test").version == "lcclass-test"
    with pytest.raises(ModelError, match="not found"):
        LightCurveClassifier.load(tmp_path / "nope")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ModelError):
        LightCurveClassifier.load(tmp_path / "bad.npz")
    meta = json.loads(p.with_suffix(".json").read_text())
    meta["feature_names"] = meta["feature_names"][:-1]
    p.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="feature_names"):
        LightCurveClassifier.load(p)
    p.with_suffix(".json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="corrupt"):
        LightCurveClassifier.load(p)


def test_fit_rejects_incomplete_labels(data):
    x, kind, objects = data
    keep = kind != "mover"
    with pytest.raises(ModelError, match="mover"):
        fit_lcclass(x[keep], kind[keep], config=TINY, objects=objects[keep])
    with pytest.raises(ModelError, match="object"):
        fit_lcclass(x, kind, config=TINY)  # object weighting without the objects


def test_object_weights_give_each_object_and_each_class_an_equal_share():
    objects = np.array(["a", "a", "a", "b", "c", "c", "d"])
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    w = object_weights(objects, y)
    assert w.sum() == pytest.approx(len(w))
    assert w[:3].sum() == pytest.approx(w[3])  # objects of one class weigh the same in total
    assert w[:4].sum() == pytest.approx(w[4:].sum())  # and so do the classes
    assert w[4] == pytest.approx(w[5]) and w[6] == pytest.approx(w[4] + w[5])
    with pytest.raises(ModelError, match="weighting"):
        LCClassConfig(weighting="per-pixel")


def test_shipped_model():
    if not (MODELS_DIR / "lcclass-v2.npz").is_file():
        pytest.fail(f"shipped classifier missing: {MODELS_DIR / 'lcclass-v2.npz'}")
    m = LightCurveClassifier.load()
    assert m.version == "lcclass-v2" and m.metadata["config"]["weighting"] == "object"
    assert len(m.classify(np.full((1, len(ALL_FEATURE_NAMES)), np.nan))) == 1


def test_training_command_writes_a_loadable_model(tmp_path):
    from broker.training.lightcurves import main_train_lcclass

    out = main_train_lcclass(seed=3, n_objects=40, out=tmp_path, version="lcclass-t", n_eval=20)
    assert out["n_train"] > 40 and 0 <= out["held_out_accuracy"] <= 1
    assert LightCurveClassifier.load(tmp_path / "lcclass-t").version == "lcclass-t"
    assert "## Reproduce" in (tmp_path / "lcclass-t.md").read_text()
