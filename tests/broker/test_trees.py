"""Tests of broker.trees: numpy evaluation equals scikit-learn's, on seeded data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest, RandomForestClassifier

from broker.trees import (
    Forest,
    contributions,
    export_forest,
    isolation_score,
    predict_proba,
)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(600, 5))
    x[:, 3] = np.round(x[:, 3])  # ties on thresholds
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    return x, y


def test_random_forest_probabilities_and_contributions(data):
    x, y = data
    rf = RandomForestClassifier(n_estimators=15, max_depth=7, random_state=0).fit(x, y)
    forest = export_forest(rf)
    xt = np.random.default_rng(4).normal(size=(300, 5)) * 2
    p = predict_proba(forest, xt)
    np.testing.assert_allclose(p, rf.predict_proba(xt), atol=1e-6)
    bias, contrib = contributions(forest, xt)
    assert contrib.shape == (300, 5, 3)
    np.testing.assert_allclose(bias + contrib.sum(axis=1), p, atol=1e-6)
    # the informative features dominate the explanation of class 2 (x2 > 1)
    assert np.abs(contrib[:, 2, 2]).mean() > np.abs(contrib[:, 4, 2]).mean()


def test_isolation_forest_scores(data):
    x, _ = data
    iso = IsolationForest(n_estimators=30, max_samples=128, random_state=0).fit(x)
    forest = export_forest(iso)
    xt = np.vstack([x[:50], np.random.default_rng(5).normal(size=(50, 5)) * 4])
    np.testing.assert_allclose(isolation_score(forest, xt, iso.max_samples_),
                               iso.score_samples(xt), rtol=1e-9, atol=1e-12)


def test_roundtrip_arrays_and_hostile_inputs(data, tmp_path):
    x, y = data
    rf = RandomForestClassifier(n_estimators=3, max_depth=4, random_state=0).fit(x, y)
    forest = export_forest(rf)
    np.savez(tmp_path / "f.npz", **forest.to_arrays("rf_"))
    with np.load(tmp_path / "f.npz", allow_pickle=False) as a:
        again = Forest.from_arrays(a, "rf_")
    hostile = np.array([[np.inf, -np.inf, 1e300, 0, np.nan]])
    p = predict_proba(again, hostile)
    assert p.shape == (1, 3) and np.isclose(p.sum(), 1.0)
    assert predict_proba(again, np.zeros((0, 5))).shape == (0, 3)
    bad = forest.to_arrays()
    bad["left"] = bad["left"] + 10**6
    with pytest.raises(ValueError):
        Forest.from_arrays(bad)
    with pytest.raises(KeyError):
        Forest.from_arrays({"left": np.zeros(1)})


def test_imputation_and_model_paths(tmp_path):
    from broker.trees import BIG, impute, missing_fill, model_path

    x = np.array([[1.0, np.nan], [3.0, np.nan], [5.0, np.nan]])
    fill = missing_fill(x)
    assert fill[0] == pytest.approx(1.0 - 2.0) and fill[1] == -1.0  # min - IQR; all-NaN column
    y = impute(np.array([[np.nan, np.inf], [2.0, -np.inf]]), fill)
    assert y[0, 0] == fill[0] and y[0, 1] == BIG and y[1, 1] == -BIG
    with pytest.raises(ValueError):
        impute(np.zeros((1, 3)), fill)
    assert model_path(None, "m-v1", tmp_path) == tmp_path / "m-v1.npz"
    assert model_path("m-v2", "m-v1", tmp_path) == tmp_path / "m-v2.npz"
    assert model_path(tmp_path / "x.json", "m-v1", tmp_path) == tmp_path / "x.npz"
