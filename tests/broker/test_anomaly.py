"""Tests of broker.anomaly: fit, the conditional term, scores, persistence without pickle, the shipped model."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from broker import MODELS_DIR
from broker.anomaly import (
    DEFAULT_VERSION,
    EDGE_TOL,
    FEATURE_NAMES,
    AnomalyConfig,
    AnomalyModel,
    _bins,
    _edges,
    fit_anomaly,
)
from broker.errors import ModelError
from broker.lightcurve import ALL_FEATURE_NAMES
from broker.simulate.lightcurves import LCSimConfig, simulate_objects
from broker.training.lightcurves import alert_table, training_alerts

SEASON = LCSimConfig(surveys=(("season", 1.0),))
TINY = AnomalyConfig(n_bins=12, n_cdf_knots=51, seed=2)
TINY_IF = AnomalyConfig(method="iforest", n_estimators=10, max_samples=64, n_cdf_knots=51)


@pytest.fixture(scope="module")
def data():
    # season surveys: long histories, on which the thresholds below were measured (the tiny isolation
    # forest is too weak a detector for the broader mix with nightly surveys)
    table = alert_table(training_alerts(simulate_objects(90, seed=31, cfg=SEASON), seed=31, max_alerts=8))
    return table.x, table.kind


@pytest.fixture(scope="module", params=["hbos", "hbos-single", "iforest"])
def model(request, data):
    cfg = {"hbos": TINY, "hbos-single": replace(TINY, per_class=False), "iforest": TINY_IF}
    return fit_anomaly(*data, config=cfg[request.param], version="anomaly-t")


def test_scores_are_a_cdf_over_training(model, data):
    x, _ = data
    s = model.score(x)
    assert s.shape == (len(x),) and s.min() >= 0.0 and s.max() <= 1.0
    assert 0.35 < np.median(s) < 0.65  # calibrated on (a superset of) these rows
    odd = np.nanmedian(x, axis=0)
    odd[ALL_FEATURE_NAMES.index("decline_rate")] = 50.0  # 50 mag/day
    odd[ALL_FEATURE_NAMES.index("duration")] = 5000.0
    odd[ALL_FEATURE_NAMES.index("peak_mag")] = 9.0
    # isolation forests split on few of the features per path: a weaker (measured) detector
    assert model.score(odd)[0] > (0.95 if model.method == "hbos" else 0.75)


def test_hostile_rows(model):
    x = np.full((3, len(FEATURE_NAMES)), np.nan)
    x[1] = np.inf
    x[2] = -1e300
    s = model.score(x)
    assert np.isfinite(s).all() and ((s >= 0) & (s <= 1)).all()
    with pytest.raises(ModelError):
        model.score(np.zeros((2, 5)))


def test_save_load_and_errors(model, data, tmp_path):
    p = model.save(tmp_path / "anomaly-t")
    with np.load(p, allow_pickle=False) as a:  # plain arrays only
        assert all(a[k].dtype != object for k in a.files)
    again = AnomalyModel.load(p)
    assert again.version == "anomaly-t"
    np.testing.assert_allclose(again.score(data[0][:30]), model.score(data[0][:30]))
    with pytest.raises(ModelError, match="not found"):
        AnomalyModel.load(tmp_path / "missing")
    (tmp_path / "bad.npz").write_bytes(b"\x00" * 10)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ModelError, match="corrupt"):
        AnomalyModel.load(tmp_path / "bad")
    meta = json.loads(p.with_suffix(".json").read_text())
    p.with_suffix(".json").write_text(json.dumps({**meta, "feature_names": ["log_abs_snr"]}))
    with pytest.raises(ModelError, match="feature_names"):
        AnomalyModel.load(p)
    p.with_suffix(".json").write_text(json.dumps({k: v for k, v in meta.items()
                                                  if k != "method"}))
    with pytest.raises(ModelError, match="corrupt"):
        AnomalyModel.load(p)


def test_fit_needs_labels_per_class(data):
    with pytest.raises(ModelError, match="label"):
        fit_anomaly(data[0], None, config=TINY)
    with pytest.raises(ModelError):
        fit_anomaly(data[0][:5], data[1][:5], config=TINY)


def test_shipped_model(data):
    if not (MODELS_DIR / f"{DEFAULT_VERSION}.npz").is_file():
        pytest.fail(f"shipped anomaly model missing: {MODELS_DIR / DEFAULT_VERSION}.npz")
    model = AnomalyModel.load()
    assert model.version == DEFAULT_VERSION == "anomaly-v5"
    assert float(model.params["cond_weight"]) == 0.5 and int(model.params["cond_degree"]) == 2
    s = model.score(np.full((2, len(FEATURE_NAMES)), np.nan))
    assert s.shape == (2,)
    # fitted on one CPU, scored on any: rows a last bit apart score the same (anomaly-v4 did not)
    x = data[0]
    wobble = 1 + 1e-12 * np.random.default_rng(9).standard_normal(x.shape)
    np.testing.assert_allclose(model.score(x * wobble), model.score(x), atol=1e-6)


def test_training_command_writes_a_loadable_model(tmp_path):
    from broker.training.lightcurves import main_train_anomaly

    out = main_train_anomaly(seed=3, n_objects=40, out=tmp_path, version="anomaly-t", n_eval=30)
    assert 0 <= out["rare_recovered"] <= 1 and out["bogus_in_top100"] >= 0
    assert AnomalyModel.load(tmp_path / "anomaly-t").version == "anomaly-t"
    assert "## Reproduce" in (tmp_path / "anomaly-t.md").read_text()


@pytest.mark.parametrize("degree", [1, 2])
def test_conditional_term_scores_unusual_combinations(degree):
    # two features tied to each other (z_b = z_a + small noise) and a third independent one: a row
    # whose values are each common but break the tie is ordinary to the per-feature histograms
    rng = np.random.default_rng(5)
    x = np.zeros((4000, len(FEATURE_NAMES)))
    a, b = ALL_FEATURE_NAMES.index("peak_mag"), ALL_FEATURE_NAMES.index("amplitude")
    c = ALL_FEATURE_NAMES.index("duration")
    x[:, a] = rng.normal(18.0, 1.0, len(x))
    x[:, b] = x[:, a] - 16.0 + rng.normal(0.0, 0.05, len(x))
    x[:, c] = rng.normal(30.0, 5.0, len(x))
    cfg = AnomalyConfig(features=("peak_mag", "amplitude", "duration"), per_class=False, n_cdf_knots=101)
    plain = fit_anomaly(x, None, config=replace(cfg, conditional_weight=0.0))
    joint = fit_anomaly(x, None, config=replace(cfg, conditional_weight=0.5, conditional_degree=degree))
    peak_scale, amplitude_scale, duration_scale = joint.params["cond_scale"][0]
    assert max(peak_scale, amplitude_scale) < 0.1 < 0.5 < duration_scale  # predictable / not
    odd = np.median(x, axis=0)
    odd[a], odd[b] = 19.0, 0.5  # each value within 1.5 sigma, the pair 50 sigma off the tie
    assert plain.score(odd)[0] < 0.9  # measured 0.65
    assert joint.score(odd)[0] > 0.98  # measured 0.996
    np.testing.assert_allclose(np.median(joint.score(x)), 0.5, atol=0.05)


def test_conditional_term_persists_and_old_models_load(data, tmp_path):
    joint = fit_anomaly(*data, config=replace(TINY, conditional_weight=0.5), version="anomaly-t")
    again = AnomalyModel.load(joint.save(tmp_path / "anomaly-t"))
    np.testing.assert_allclose(again.score(data[0][:50]), joint.score(data[0][:50]))
    params = {k: v for k, v in joint.params.items() if not k.startswith("cond_")}
    old = AnomalyModel("hbos", joint.columns, joint.center, joint.scale, joint.fill, params,
                       joint.class_knots, joint.cdf_knots, "old")  # a model saved before the term
    assert old.score(data[0][:5]).shape == (5,)
    with pytest.raises(ModelError, match="conditional"):
        AnomalyModel("hbos", joint.columns, joint.center, joint.scale, joint.fill,
                     {**joint.params, "cond_scale": np.zeros((1, 2))}, joint.class_knots,
                     joint.cdf_knots, "bad")


def test_conditional_term_on_a_tiny_or_degenerate_class(data):
    # a class of 3 alerts and a class whose features are all NaN (one value each): no crash,
    # finite scores, and no term for the features the degenerate class cannot predict
    x, kind = data
    x = np.vstack([x, x[:3], np.full((30, len(FEATURE_NAMES)), np.nan)])
    kind = np.concatenate([kind, ["tiny"] * 3, ["empty"] * 30])
    model = fit_anomaly(x, kind, config=TINY)
    empty = model.metadata["groups"].index("empty")
    assert (model.params["cond_scale"][empty] == 0).all()
    s = model.score(x)
    assert np.isfinite(s).all() and ((s >= 0) & (s <= 1)).all()


def test_histogram_edges_keep_clear_of_training_values():
    # integer counts put equal-width edges on the values themselves, a constant feature has no range
    values = np.repeat(np.arange(21.0), 5)
    edges = _edges(values, 20)
    assert np.all(np.diff(edges) >= 0) and edges[0] < 0 and edges[-1] > 20
    assert np.abs(edges[:, None] - values[None, :]).min() >= EDGE_TOL * 0.999
    for v in (values, np.full(40, 0.7)):
        z = np.column_stack([v, v * (1 + 1e-13)])  # the same values, last bits apart
        e = np.array([_edges(v, 20)] * 2)
        np.testing.assert_array_equal(_bins(z, e)[:, 0], _bins(z, e)[:, 1])


@pytest.mark.parametrize("where", ["score", "fit"])
def test_scores_do_not_move_when_inputs_differ_in_their_last_bits(data, where):
    # other CPUs' vector maths change inputs in their last bits; such a change in the rows scored or
    # in the training rows once moved a rare-event recovery by 10 points (docs/notes/anomaly-experiments.md)
    x, kind = data
    wobble = 1 + 1e-12 * np.random.default_rng(8).standard_normal(x.shape)
    model = fit_anomaly(x, kind, config=replace(TINY, conditional_weight=0.5))
    if where == "score":
        moved = model.score(x * wobble)
    else:
        moved = fit_anomaly(x * wobble, kind, config=replace(TINY, conditional_weight=0.5)).score(x)
    np.testing.assert_allclose(moved, model.score(x), atol=1e-6)
