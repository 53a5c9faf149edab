"""Saturation masks and mask dilation."""

from __future__ import annotations

import numpy as np

from broker.masks import grow_regions, grow_square, saturated_mask


def test_saturated_mask_grows_each_region_by_margin_and_size():
    data = np.zeros((64, 64), np.float32)
    data[10, 10] = 100.0  # a single saturated pixel
    data[40:46, 40:46] = 100.0  # a 6 x 6 saturated core: equivalent radius 3.39 px
    m = saturated_mask(data, 100.0, 0.9, 2.0, 0.0)
    yy, xx = np.mgrid[:64, :64]
    assert np.array_equal(m[:30, :30], (np.hypot(yy - 10, xx - 10) <= 2.0)[:30, :30])
    grown = saturated_mask(data, 100.0, 0.9, 2.0, 1.0)
    assert grown[40:46, 40:46].all() and grown.sum() > m.sum()
    # a 1-px region: 2 px + its equivalent radius sqrt(1 / pi)
    assert np.array_equal(grown[:30, :30], (np.hypot(yy - 10, xx - 10) <= 2.0 + np.sqrt(1 / np.pi))[:30, :30])
    assert not saturated_mask(data, np.inf, 0.9, 2.0, 1.0).any()
    assert not saturated_mask(data, 1e6, 0.9, 2.0, 1.0).any()


def test_grow_square_sparse_and_dense_paths_agree_with_a_max_filter():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    for density in (0.001, 0.2):
        mask = rng.uniform(size=(50, 60)) < density
        expected = ndimage.maximum_filter(mask.view(np.uint8), size=5).astype(bool)
        assert np.array_equal(grow_square(mask, 1.5), expected)
    assert grow_square(mask, 0.0) is mask


def test_grow_regions_per_label_radius():
    mask = np.zeros((40, 40), bool)
    mask[10, 10] = mask[30, 30] = True
    out = grow_regions(mask, np.array([0.0, 1.0, 3.0]))
    assert out[8:13, 8:13].sum() == 5 and out[27:34, 27:34].sum() == 29


def test_a_growth_wider_than_the_frame_masks_all_of_it():
    """``[subtract] ref_bad_grow_fwhm = inf`` (or 1e308) loaded, then was an OverflowError on every frame."""
    mask = np.zeros((30, 40), bool)
    mask[3, 5] = True
    for radius in (50.0, 1e308, np.inf):  # 50 px: the frame diagonal
        assert grow_square(mask, radius).all() and grow_regions(mask, radius).all()
    data = np.zeros((30, 40), np.float32)
    data[3, 5] = 100.0
    assert saturated_mask(data, 100.0, 0.9, np.inf, 1.0).all()
