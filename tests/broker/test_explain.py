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


def test_main_explain_from_npz_and_untrained_model(tmp_path, raw):
    x, _, _ = raw
    np.savez(tmp_path / "trip.npz", science=x[:, 0], reference=x[:, 1], difference=x[:, 2])
    p = main_explain(tmp_path / "trip.npz", index=2, steps=16)
    assert p == tmp_path / "trip-2-explain.png" and p.is_file()
    # any saved model works, e.g. an untrained v2 net
    RealBogusClassifier(RealBogusNetV2(), "test-v0").save(tmp_path / "test-v0")
    q = main_explain(tmp_path / "trip.npz", 0, tmp_path / "q.png", tmp_path / "test-v0.pt", 8)
    assert q.is_file()
