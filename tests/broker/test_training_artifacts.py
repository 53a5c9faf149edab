"""Tests of broker.training.artifacts: streaks and bright-star residuals on simulated stamps."""

from __future__ import annotations

import numpy as np

from broker.normalise import normalise_triplet
from broker.training.artifacts import artifact_set, from_sigma, star_residual, streak, to_sigma
from broker.training.data import synth_triplets


def _sim(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    raw, y, kinds = synth_triplets(n, seed)
    x = np.stack([normalise_triplet(*t)[0] for t in raw]).astype(np.float16)
    return {"x": x, "y": y.astype(np.uint8), "kind": np.array(kinds)}


def test_sigma_units_invert_the_normaliser():
    z = np.array([-300.0, -3.0, 0.0, 2.0, 40.0, 1e4], np.float32)
    assert np.allclose(to_sigma(from_sigma(z)), z, rtol=1e-4)


def test_a_streak_crosses_the_stamp_through_its_centre():
    rng = np.random.default_rng(3)
    for _ in range(5):
        s = streak(rng)
        assert s.shape == (63, 63) and s.max() <= 12.01 and s.min() >= 0
        # brighter near the centre than in a corner it does not cross
        assert s[26:37, 26:37].max() > 0.5 * s.max()
        # it spans the stamp: signal on at least two of the four edges
        edges = [s[0].max(), s[-1].max(), s[:, 0].max(), s[:, -1].max()]
        assert sum(e > 0.1 * s.max() for e in edges) >= 2


def test_a_star_residual_is_nearly_zero_sum():
    yy, xx = np.mgrid[:63, :63]
    star = 500 * np.exp(-((xx - 31) ** 2 + (yy - 31) ** 2) / (2 * 1.5 ** 2))
    r = star_residual(star, np.random.default_rng(0))
    assert np.abs(r).max() >= 5 and abs(r.sum()) < 0.1 * np.abs(r).sum()


def test_artifact_set_is_bogus_finite_and_seeded():
    sim = _sim()
    a, b = artifact_set(sim, 10, seed=4), artifact_set(sim, 10, seed=4)
    assert a["x"].shape == (10, 3, 63, 63) and a["x"].dtype == np.float16
    assert np.isfinite(a["x"]).all() and (a["y"] == 0).all()
    assert set(a["kind"]) == {"streak", "star_residual"}
    assert np.array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], artifact_set(sim, 10, seed=5)["x"])
