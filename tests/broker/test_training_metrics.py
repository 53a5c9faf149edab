"""Tests of broker.training.metrics: error rates, AUCs and their subsets."""

from __future__ import annotations

import numpy as np
import pytest

from broker.training.metrics import (
    by_lobe_ratio,
    by_reference_brightness,
    by_sign,
    equal_error,
    evaluate,
    evaluate_simulated,
    paired_auc_difference,
)


def test_evaluate_metrics():
    s = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1])
    y = np.array([1, 1, 1, 0, 0, 0])
    m = evaluate(s, y, 0.5, kinds=["t", "t", "t", "cr", "cr", "hp"])
    assert m["fnr"] == pytest.approx(1 / 3) and m["fpr"] == pytest.approx(1 / 3)
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["per_kind"]["cr"]["misclassified"] == pytest.approx(0.5)


def test_by_sign_separates_brightenings_from_fadings():
    s = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3, 0.6, 0.4])
    y = np.array([1, 1, 0, 0, 1, 0, 0, 1])
    snr = np.array([8.0, 9.0, 7.0, 6.0, -8.0, -9.0, -7.0, -6.0])
    b = by_sign(s, y, snr)
    assert b["brightening"] == {"n": 4, "n_real": 2, "n_bogus": 2, "auc": 1.0, "eer": 0.0}
    # fadings: one real below one bogus, so 3 of 4 pairs in order and one error per class
    assert b["fading"]["auc"] == pytest.approx(0.75) and b["fading"]["eer"] == pytest.approx(0.5)
    assert np.isnan(by_sign(s[:2], y[:2], snr[:2])["brightening"]["auc"])  # one class only


def test_held_out_errors_split_by_reference_state_at_the_overall_threshold():
    s = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3, 0.6, 0.4])
    y = np.array([1, 1, 0, 0, 1, 0, 0, 1])
    ref = np.array(["as_built"] * 4 + ["misaligned"] * 4)
    res = evaluate_simulated(s, y, np.array(["k"] * 8), None, 0.5, ref)
    st = res["by_reference_state"]
    assert set(st) == {"as_built", "misaligned"}
    assert st["as_built"]["eer"] == 0.0 and st["as_built"]["fnr"] == st["as_built"]["fpr"] == 0.0
    # misaligned: the real at 0.4 and the bogus at 0.6 are on the wrong sides of the overall
    # equal-error threshold (all 8 candidates), one error per class
    t = res["eer_threshold"]
    assert 0.4 < t <= 0.6
    assert st["misaligned"]["fnr"] == pytest.approx(0.5) and st["misaligned"]["fpr"] == \
        pytest.approx(0.5)
    assert "by_reference_state" not in evaluate_simulated(s, y, np.array(["k"] * 8))


def test_lobe_ratio_table_counts_errors_by_the_stamps_dipole():
    from broker.normalise import normalise_triplet

    rng = np.random.default_rng(1)
    yy, xx = np.indices((63, 63))

    def psf(x0, f):
        return f * np.exp(-((xx - x0) ** 2 + (yy - 31) ** 2) / (2 * 1.5**2))

    blob, dipole = psf(31, 40), psf(31, 40) - psf(33, 40)  # ratios ~0 and ~1
    stamps = [blob, blob, dipole, dipole]
    x = np.stack([normalise_triplet(rng.normal(0, 1, (63, 63)), rng.normal(0, 1, (63, 63)),
                                    d + rng.normal(0, 1, (63, 63)))[0] for d in stamps])
    s, y = np.array([0.9, 0.2, 0.8, 0.1]), np.array([1, 1, 0, 0])
    bins = by_lobe_ratio(s, y, x, threshold=0.5)
    low, high = bins[0], bins[-1]
    assert (low["lo"], high["hi"]) == (0.0, np.inf)
    assert (low["n_real"], low["err_real"], low["n_bogus"]) == (2, 1, 0)
    assert (high["n_bogus"], high["err_bogus"], high["n_real"]) == (2, 1, 0)


def test_by_reference_brightness_bins_by_the_reference_source():
    x = np.zeros((6, 3, 63, 63), np.float32)
    x[:, 1, 29:34, 29:34] = np.array([0.5, 1.0, 10.0, 10.0, 30.0, 30.0])[:, None, None]
    x[4, 1, 31, 31] = 100.0  # one pixel of the 5x5 raises its mean from 30 to 32.8: same bin
    s = np.array([0.9, 0.2, 0.8, 0.3, 0.4, 0.6])
    y = np.array([1, 0, 1, 0, 1, 0])
    b = by_reference_brightness(s, y, x, 0.5, edges=(2.0, 20.0))
    assert [(d["lo"], d["hi"], d["n_real"], d["n_bogus"]) for d in b] == [
        (-np.inf, 2.0, 1, 1), (2.0, 20.0, 1, 1), (20.0, np.inf, 1, 1)]
    assert b[0]["pass_real"] == 1.0 and b[0]["pass_bogus"] == 0.0 and b[0]["auc"] == 1.0
    assert b[2]["pass_real"] == 0.0 and b[2]["pass_bogus"] == 1.0 and b[2]["auc"] == 0.0
    one = by_reference_brightness(s[:1], y[:1], x[:1], 0.5, edges=(2.0,))
    assert np.isnan(one[0]["auc"]) and np.isnan(one[1]["pass_real"])  # one class; empty bin


def test_paired_auc_difference():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.random(400) < 0.7
    good = rng.random(400) + 0.8 * y
    worse = good + rng.normal(0, 0.4, 400)  # the same model with noise added
    d = paired_auc_difference(y, good, worse, n_boot=500)
    assert d["delta"] == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, worse))
    assert 0 < d["lo"] < d["delta"] < d["hi"]  # clearly better: the interval excludes 0
    same = paired_auc_difference(y, good, good, n_boot=50)
    assert same["delta"] == same["lo"] == same["hi"] == 0
    assert np.isnan(paired_auc_difference(np.ones(5), good[:5], worse[:5])["delta"])


def test_equal_error_threshold():
    rng = np.random.default_rng(0)
    s = np.r_[rng.uniform(0.3, 1, 500), rng.uniform(0, 0.7, 500)]
    y = np.r_[np.ones(500), np.zeros(500)]
    t, rate = equal_error(s, y)
    assert 0.45 < t < 0.55 and 0.2 < rate < 0.35
    assert abs(np.mean(s[y == 1] < t) - np.mean(s[y == 0] >= t)) < 0.01
