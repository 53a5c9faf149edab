"""ZOGY subtraction maths on pure-noise images."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from broker.psf import gaussian_psf
from broker.zogy import interpolation_kernel, zogy

SHAPE = (256, 256)


def test_zogy_white_noise_is_unit_variance():
    rng = np.random.default_rng(0)
    n = rng.normal(0, 15, SHAPE).astype(np.float32)
    r = rng.normal(0, 8, SHAPE).astype(np.float32)
    z = zogy(n, r, gaussian_psf(3.0, 9), gaussian_psf(2.5, 9), np.full(SHAPE, 225, np.float32),
             np.full(SHAPE, 64, np.float32), 15.0, 8.0, 1.0)
    assert z.D.std() == pytest.approx(1.0, abs=0.02)
    assert z.S_corr.std() == pytest.approx(1.0, abs=0.02)
    assert z.P_D.sum() == pytest.approx(1.0, abs=1e-5)
    assert z.F_D == pytest.approx(1.0 / np.sqrt(225 + 64))


def test_interpolation_kernel():
    k0 = interpolation_kernel(np.eye(2), np.zeros(2), SHAPE)
    assert k0[4, 4] == pytest.approx(1.0, abs=1e-6) and np.abs(k0).sum() == pytest.approx(1.0, abs=1e-6)
    k = interpolation_kernel(np.eye(2), np.array([0.5, 0.5]), SHAPE)
    assert k.sum() == pytest.approx(1.0, abs=1e-4)
    # a half-pixel cubic-spline shift smooths white noise: less than unit variance passes
    assert 0.4 < (k.astype(float) ** 2).sum() < 0.8


def test_zogy_coloured_reference_noise_stays_unit_variance():
    """A resampled reference has correlated noise; with its kernel S_corr keeps unit variance."""
    rng = np.random.default_rng(5)
    n = rng.normal(0, 10, SHAPE).astype(np.float32)
    r = ndimage.shift(rng.normal(0, 20, SHAPE), (-0.5, -0.5), order=3, mode="wrap").astype(np.float32)
    h = interpolation_kernel(np.eye(2), np.array([0.5, 0.5]), SHAPE)
    # a sharp PSF (FWHM 1.2 px) sees the high frequencies the interpolation removed
    args = (n, r, gaussian_psf(1.2, 9), gaussian_psf(1.2, 9), np.full(SHAPE, 100, np.float32),
            np.full(SHAPE, 400, np.float32), 10.0, 20.0, 1.0)
    white = zogy(*args).S_corr.std()
    coloured = zogy(*args, ref_noise_kernel=h).S_corr.std()
    assert coloured == pytest.approx(1.0, abs=0.03)
    assert white < coloured - 0.03  # treating it as white over-counts the reference noise
