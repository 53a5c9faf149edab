"""Proper co-addition against its theory: white unit noise, flux kept, S/N^2 = sum of the inputs'."""

import numpy as np
import pytest

from broker.coadd import proper_coadd
from broker.psf import gaussian_psf

SHAPE = (256, 256)
FWHM = (2.0, 3.5, 5.0)
H = 10


def _point(psf: np.ndarray, flux: float) -> np.ndarray:
    a = np.zeros(SHAPE)
    a[128 - H:128 + H + 1, 128 - H:128 + H + 1] = flux * psf
    return a


def test_noise_is_white_and_as_low_as_the_inputs_allow():
    rng = np.random.default_rng(3)
    sig = [1.0, 2.0, 1.5]
    psfs = [gaussian_psf(f, H) for f in FWHM]
    image, variance, _ = proper_coadd([rng.normal(0, s, SHAPE) for s in sig],
                                      [np.full(SHAPE, s * s) for s in sig], psfs, sig)
    expect = 1.0 / np.sqrt(sum(1.0 / s ** 2 for s in sig))
    inner = image[2 * H:-2 * H, 2 * H:-2 * H]
    assert inner.std() == pytest.approx(expect, rel=0.02)
    assert np.median(variance[2 * H:-2 * H, 2 * H:-2 * H]) == pytest.approx(expect ** 2, rel=0.01)
    # white: neighbouring pixels uncorrelated
    assert abs(np.corrcoef(inner[:, :-1].ravel(), inner[:, 1:].ravel())[0, 1]) < 0.02


def test_point_source_flux_kept_and_snr_optimal():
    psfs = [gaussian_psf(f, H) for f in FWHM]
    sig = [1.0, 1.0, 1.0]
    image, _, psf = proper_coadd([_point(p, 100.0) for p in psfs], [np.ones(SHAPE)] * 3, psfs, sig)
    assert image.sum() == pytest.approx(100.0, rel=1e-3)
    assert psf.sum() == pytest.approx(1.0, abs=1e-5)
    # the co-add's point source is its PSF
    k = psf.shape[0] // 2
    np.testing.assert_allclose(image[128 - k:128 + k + 1, 128 - k:128 + k + 1] / 100.0, psf, atol=2e-4)
    snr = lambda p, s: 100.0 * np.sqrt((np.asarray(p, float) ** 2).sum()) / s  # noqa: E731
    optimal = np.sqrt(sum(snr(p, 1.0) ** 2 for p in psfs))
    assert snr(psf, 1.0 / np.sqrt(3)) == pytest.approx(optimal, rel=1e-3)
    # a 1/FWHM^2-weighted mean of the same inputs loses S/N (here 7 %)
    w = np.array([1.0 / f ** 2 for f in FWHM])
    w /= w.sum()
    mean_psf = sum(wi * p for wi, p in zip(w, psfs, strict=True))
    assert snr(mean_psf, np.sqrt((w ** 2).sum())) < 0.95 * optimal
