"""PSFs of a science frame and its reference stacked from the same stars, per tile."""

from __future__ import annotations

import numpy as np
import pytest

from broker.psf_match import StackPlan, common_psfs, tile_boxes, tile_stars
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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_flux_ratio_of_a_reference_of_much_worse_seeing(seed):
    """Science 3 px, reference 9 px, same fluxes: the flux ratio is 1.

    The ratio of the stars' stamp sums was 0.88-1.07 (a neighbour's light in the stamps' corners,
    fully in the sharp image and partly in the wide one); stacked on each image's own stamp, other
    stars masked, the PSF fits give 1 within 3 %.
    """
    rng = np.random.default_rng(seed)
    shape = (256, 256)
    # 9 stars on a grid, each with a neighbour 28-34 px away: outside the 25 px isolation radius
    x, y = (g.ravel() + rng.uniform(-3, 3, 9) for g in np.meshgrid([64.0, 128.0, 192.0], [64.0, 128.0, 192.0]))
    angle, dist = rng.uniform(0, 2 * np.pi, 9), rng.uniform(28, 34, 9)
    ax, ay = np.concatenate([x, x + dist * np.cos(angle)]), np.concatenate([y, y + dist * np.sin(angle)])
    flux = np.exp(rng.uniform(np.log(1e4), np.log(1e5), 18))
    N = (render(shape, ax, ay, flux, 3.0) + rng.normal(0, 15.0, shape)).astype(np.float32)
    R = (render(shape, ax, ay, flux, 9.0) + rng.normal(0, 15.0, shape)).astype(np.float32)
    plan = StackPlan((10, 25), (ax, ay), (6.0, 18.0))
    P_n, P_r, n, ratio = common_psfs(N, R, x, y, 25, 3, plan)
    assert P_n is not None and P_r is not None and P_n.shape == (51, 51) and len(ratio) >= 7
    assert np.median(ratio) == pytest.approx(1.0, abs=0.03)
    # the science PSF is stacked on its own 21 x 21 stamp, zero beyond
    assert np.all(P_n[:15] == 0) and np.all(P_n[-15:] == 0)
