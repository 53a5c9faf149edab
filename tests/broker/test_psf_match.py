"""PSFs of a science frame and its reference stacked from the same stars, per tile."""

from __future__ import annotations

import numpy as np
import pytest

from broker.psf_match import common_psfs, tile_boxes, tile_stars
from tests.broker.conftest import render


def test_common_psfs_share_stars_and_measure_the_flux_ratio():
    rng = np.random.default_rng(4)
    shape = (200, 200)
    x, y = rng.uniform(30, 170, 12), rng.uniform(30, 170, 12)
    flux = rng.uniform(2e4, 5e4, 12)
    N = (render(shape, x, y, flux, 2.5) + rng.normal(0, 1.0, shape)).astype(np.float32)
    R = (render(shape, x, y, 2.0 * flux, 2.5) + rng.normal(0, 1.0, shape)).astype(np.float32)
    P_n, P_r, n, ratio = common_psfs(N, R, x, y, 8, 3)
    assert P_n is not None and P_r is not None and n == len(ratio) >= 3
    assert P_n.shape == P_r.shape == (17, 17)
    assert np.abs(P_n - P_r).max() < 0.01 * P_n.max()
    assert np.median(ratio) == pytest.approx(2.0, rel=0.01)
    assert common_psfs(N, R, x, y, 8, 100)[0] is None


def test_tiles_cover_the_frame_and_take_stars_a_quarter_tile_around():
    boxes = tile_boxes((1000, 2048), 512)
    assert len(boxes) == 2 * 4
    cover = np.zeros((1000, 2048), int)
    for y0, y1, x0, x1 in boxes:
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()
    x, y = np.array([10.0, 600.0, 700.0]), np.array([10.0, 10.0, 10.0])
    assert list(tile_stars(x, y, boxes[0])) == [0, 1]  # 600 is within 512 / 4 of x1 = 512
