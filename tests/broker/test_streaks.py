"""Dense runs of collinear sources (satellite trails) among detections."""

from __future__ import annotations

import numpy as np
import pytest

from broker.streaks import MAX_SOURCES, collinear_runs


def _trail(x0, y0, x1, y1, step, rng, scatter=0.3):
    """Sources every ``step`` px (jittered along) on a line, within ``scatter`` px across it."""
    length = np.hypot(x1 - x0, y1 - y0)
    t = np.arange(0.0, length, step) + rng.uniform(-0.3, 0.3) * step
    t = np.clip(t, 0.0, length)
    u = np.array([x1 - x0, y1 - y0]) / length
    off = rng.normal(0.0, scatter, len(t))
    return x0 + t * u[0] - off * u[1], y0 + t * u[1] + off * u[0]


def test_a_trail_is_found_and_the_stars_around_it_are_not():
    rng = np.random.default_rng(1)
    sx, sy = rng.uniform(0, 1024, (2, 300))
    tx, ty = _trail(0.0, 150.0, 1023.0, 900.0, 12.0, rng)
    member = collinear_runs(np.r_[sx, tx], np.r_[sy, ty], 1024**2)
    assert member[300:].all()
    assert member[:300].sum() <= 2  # a star that happens to sit on the trail


def test_a_glint_train_with_gaps_is_found_in_pieces_and_short_pieces_are_left():
    rng = np.random.default_rng(2)
    tx, ty = _trail(100.0, 900.0, 900.0, 100.0, 40.0, rng)  # knots 40 px apart
    far = np.r_[tx[:5], tx[5:] + 400.0], np.r_[ty[:5], ty[5:]]  # the first 5 cut off from the rest
    sx, sy = np.random.default_rng(3).uniform(0, 2048, (2, 100))
    member = collinear_runs(np.r_[far[0], sx], np.r_[far[1], sy], 2048**2)
    assert not member[:5].any() and member[5:len(tx)].all()


@pytest.mark.parametrize(("side", "n"), [(2048, 400), (1024, 400), (512, 400), (256, 400), (256, 40)])
def test_random_star_fields_hold_no_run(side, n):
    """However crowded, stars placed at random do not line up (the gap follows their density)."""
    rng = np.random.default_rng(side + n)
    for _ in range(10):
        x, y = rng.uniform(0, side, (2, n))
        assert not collinear_runs(x, y, side**2).any()


def test_crowded_sources_on_a_frame_claimed_to_be_huge_are_searched_fast_and_hold_no_run():
    """A hostile batch: 2,000 candidates in 300^2 px of a 'frame' of 1e12 px took 78 s and gave 68 runs."""
    import time

    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 300, (2, 2000))
    start = time.perf_counter()
    assert not collinear_runs(x, y, 1e12).any()
    assert time.perf_counter() - start < 5.0
    assert not collinear_runs(*rng.uniform(0, 1e4, (2, MAX_SOURCES + 1)), 1e8).any()  # not searched


def test_degenerate_inputs():
    assert collinear_runs(np.zeros(0), np.zeros(0), 1e6).shape == (0,)
    assert not collinear_runs(np.arange(5.0), np.arange(5.0), 1e6).any()  # fewer than min_points
    same = np.full(20, 7.0)
    assert not collinear_runs(same, same, 1e6).any()  # one position repeated: no line
    x = np.r_[np.arange(0.0, 200.0, 10.0), 50.0, 50.0]
    y = np.r_[np.full(20, 3.0), 3.0, 3.0]  # a run with two duplicates on it
    assert collinear_runs(x, y, 1e6).all()
    x, y = np.r_[x, np.nan, np.inf], np.r_[y, 3.0, 3.0]  # positions that are not numbers: on no line
    assert collinear_runs(x, y, 1e6).tolist() == [True] * 22 + [False, False]
