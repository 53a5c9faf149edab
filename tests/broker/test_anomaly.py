"""Tests of broker.anomaly: features, fit, persistence without pickle, the shipped model."""

from __future__ import annotations

import numpy as np
import pytest

from broker.anomaly import (
    FEATURE_NAMES,
    MODELS_DIR,
    AnomalyConfig,
    AnomalyModel,
    features_from,
    fit_anomaly,
)
from broker.candidate import Candidate, Detection
from broker.errors import ModelError


def _cand(snr=10.0, flux=1000.0, fwhm=2.5, elong=1.1, dipole=0.05, ref_dist=np.inf):
    det = Detection(10, 10, 1, 1, flux, flux / snr, snr, snr, fwhm, elong, dipole, 0, ref_dist, 0)
    z = np.zeros((63, 63), np.float32)
    return Candidate("f/0", det, z, z, z)


def test_features_finite_with_and_without_history():
    f0 = features_from(_cand(), [])
    assert f0.shape == (len(FEATURE_NAMES),) and np.all(np.isfinite(f0))
    hist = [{"mjd": 60000.0, "flux": 500.0, "flux_err": 50.0, "snr": 10.0, "filter": "r"},
            {"mjd": 60002.0, "flux": 800.0, "flux_err": 50.0, "snr": 16.0, "filter": "g"}]
    f = features_from(_cand(flux=1000.0), hist, mjd=60004.0)
    names = dict(zip(FEATURE_NAMES, f, strict=True))
    assert names["log_n_prev"] == pytest.approx(np.log10(3))
    assert names["log_age"] == pytest.approx(np.log10(5))
    # brightening from 800 to 1000 ADU in 2 days: -0.121 mag/day
    assert names["rate"] == pytest.approx(np.arcsinh(-2.5 * np.log10(1000 / 800) / 2))
    assert names["n_filters"] == 2
    # without the current time, age and rate are the history's own (500 -> 800 ADU in 2 days)
    g = dict(zip(FEATURE_NAMES, features_from(_cand(flux=1000.0), hist), strict=True))
    assert g["log_age"] == pytest.approx(np.log10(3))
    assert g["rate"] == pytest.approx(np.arcsinh(-2.5 * np.log10(800 / 500) / 2))
    # NaN measurements do not leak into the features
    assert np.all(np.isfinite(features_from(_cand(snr=np.nan, fwhm=np.nan), hist)))


def _ordinary(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([features_from(_cand(snr=rng.uniform(5, 30), flux=rng.uniform(300, 5000),
                                         fwhm=rng.normal(2.5, 0.2), elong=rng.uniform(1, 1.3),
                                         dipole=rng.uniform(0, 0.1)), []) for _ in range(n)])


def test_fit_save_load_score(tmp_path):
    x = _ordinary(400)
    model = fit_anomaly(x, AnomalyConfig(n_components=3), version="anomaly-test")
    path = model.save(tmp_path / "anomaly-test")
    back = AnomalyModel.load(path)
    assert back.version == "anomaly-test"
    s = back.score(x)
    assert s.shape == (400,) and np.all((s >= 0) & (s <= 1))
    np.testing.assert_allclose(s, model.score(x))
    # the empirical CDF of the training scores is ~uniform on the training set
    assert 0.4 < np.median(s) < 0.6
    odd = features_from(_cand(snr=2000.0, flux=5e6, fwhm=9.0, elong=4.0, dipole=0.9), [])
    assert back.score(odd[None])[0] > 0.99
    # the file holds plain arrays only
    with np.load(path, allow_pickle=False) as a:
        assert all(a[k].dtype != object for k in a.files)


def test_load_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        AnomalyModel.load(tmp_path / "nope")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ModelError, match="corrupt"):
        AnomalyModel.load(tmp_path / "bad.npz")


def test_too_few_rows():
    with pytest.raises(ModelError):
        fit_anomaly(_ordinary(5))


def test_shipped_model_loads_and_scores():
    if not (MODELS_DIR / "anomaly-v1.npz").is_file():
        pytest.fail(f"shipped anomaly model missing: {MODELS_DIR / 'anomaly-v1.npz'}")
    model = AnomalyModel.load()
    assert model.version == "anomaly-v1"
    s = model.score(_ordinary(20))
    assert s.shape == (20,) and np.all((s >= 0) & (s <= 1))
    c = _cand()
    model.score_candidates([c])
    assert 0.0 <= c.anomaly <= 1.0
