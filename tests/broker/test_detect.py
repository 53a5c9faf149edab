"""Peak finding on S_corr and cutouts."""

from __future__ import annotations

import numpy as np
import pytest

from broker.cutouts import cutout
from broker.detect import find_scorr_peaks


def _blob(shape, x, y, amp, s=1.5):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return amp * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))


def test_positive_and_negative_peaks_in_deterministic_order():
    shape = (64, 64)
    img = _blob(shape, 10, 20, 8.0) + _blob(shape, 40, 40, -12.0) + _blob(shape, 50, 10, 6.0) \
        + _blob(shape, 30, 5, 4.0)  # below threshold
    x, y, v = find_scorr_peaks(img.astype(np.float32), 5.0)
    assert list(zip(x, y, strict=True)) == [(40, 40), (10, 20), (50, 10)]
    assert v[0] < -11 and v[1] > 7.9 and v[2] > 5.9


def test_track_gives_one_peak():
    img = np.zeros((64, 64), np.float32)
    img[30, 10:25] = 7.0
    img[30, 17] = 9.0
    x, y, v = find_scorr_peaks(img, 5.0)
    assert list(zip(x, y, strict=True)) == [(17, 30)]


def test_nothing_found_is_empty():
    x, y, v = find_scorr_peaks(np.zeros((32, 32), np.float32), 5.0)
    assert len(x) == len(y) == len(v) == 0


def test_cutout_is_nan_padded():
    img = np.arange(100 * 100, dtype=np.float32).reshape(100, 100)
    c = cutout(img, 2.2, 97.6, 63)
    assert c.shape == (63, 63)
    assert c[31, 31] == img[98, 2]
    assert np.isnan(c[:, :29]).all() and np.isfinite(c[:, 29]).any()
    assert np.isnan(c[33:, :]).all()
    assert np.isnan(cutout(img, 500.0, 500.0, 63)).all()


def test_peak_value_recovers_a_gaussian_peak_between_pixels():
    from broker.detect import peak_value

    yy, xx = np.mgrid[0:11, 0:11]
    for dx, dy in ((0.0, 0.0), (0.3, -0.2), (0.5, 0.5)):
        g = 7.0 * np.exp(-((xx - 5 - dx) ** 2 + (yy - 5 - dy) ** 2) / (2 * 1.9 ** 2))
        assert g[5, 5] <= peak_value(g, 5, 5) == pytest.approx(7.0, rel=1e-6)
        assert peak_value(-g, 5, 5, sign=-1.0) == pytest.approx(7.0, rel=1e-6)
