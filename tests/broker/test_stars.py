"""Star catalogues."""

from __future__ import annotations

import numpy as np
import pytest

from broker.background import estimate_background
from broker.errors import ConfigError
from broker.stars import StarConfig, find_stars, fit_fwhms, fitted_fwhm
from tests.broker.conftest import make_frame, make_sky
from tests.helpers import star_frame, trailed_frame


def test_saturated_stars_are_not_psf_stars(small_shape):
    sky = make_sky(4, small_shape, 40, fmin=5e3, fmax=3e5)
    frame = make_frame(4, small_shape, sky, saturation=20000.0)
    bkg, rms = estimate_background(frame.data)
    stars = find_stars(frame.data - bkg, float(np.median(rms)), saturation=20000.0, background=bkg)
    assert len(stars)
    assert np.all(stars.peak + 200.0 < 0.8 * 20000.0 + 100.0)


def test_satellite_trail_segments_are_not_stars():
    """A bright trail's local maxima passed as stars, and the star list's seeing read the trail's width."""
    lines = [(0.0, 40.0, 511.0, 300.0), (0.0, 480.0, 511.0, 130.0), (60.0, 0.0, 200.0, 511.0)]
    frame = trailed_frame(star_frame(shape=(512, 512), n_stars=60, fwhm=6.0, seed=5), 6.0, 30000.0, lines)
    stars = find_stars(frame.data - 500.0, np.sqrt(500.0))
    x0, y0, x1, y1 = np.array(lines).T
    dist = np.abs((x1 - x0)[:, None] * (y0[:, None] - stars.y) - (x0[:, None] - stars.x) * (y1 - y0)[:, None])
    dist /= np.hypot(x1 - x0, y1 - y0)[:, None]
    assert np.count_nonzero(dist.min(axis=0) < 3.0) <= 3  # stars that happen to sit on a trail
    assert len(stars) >= 40 and stars.fwhm == pytest.approx(6.0, rel=0.1)  # 52 stars without the trails


def _pixel_gaussians(shape, xs, ys, fwhm, flux=2e4, seed=0):
    """Stars as circular Gaussians integrated over the pixels, with Gaussian noise (rms 5)."""
    from scipy.special import erf

    s = np.sqrt(2.0) * fwhm / 2.3548
    img = np.zeros(shape)
    cols, rows = np.arange(shape[1]), np.arange(shape[0])
    for x, y in zip(xs, ys, strict=True):
        ex = 0.5 * (erf((cols + 0.5 - x) / s) - erf((cols - 0.5 - x) / s))
        ey = 0.5 * (erf((rows + 0.5 - y) / s) - erf((rows - 0.5 - y) / s))
        img += flux * np.outer(ey, ex)
    return img + np.random.default_rng(seed).normal(0.0, 5.0, shape)


@pytest.mark.parametrize("fwhm", [1.3, 2.2, 4.0, 7.0])
def test_fit_fwhms_recovers_the_seeing_and_agrees_with_photutils(fwhm):
    from photutils.psf import fit_fwhm

    rng = np.random.default_rng(3)
    xs, ys = rng.uniform(20, 180, 12), rng.uniform(20, 180, 12)
    image = _pixel_gaussians((200, 200), xs, ys, fwhm)
    x0, y0 = xs + rng.uniform(-0.7, 0.7, 12), ys + rng.uniform(-0.7, 0.7, 12)  # centres known to < 1 px
    ours = fit_fwhms(image, x0, y0, fwhm_guess=3.0)
    reference = np.asarray(fit_fwhm(image, xypos=np.column_stack([x0, y0]), fit_shape=11, fwhm=3.0))
    assert np.median(ours) == pytest.approx(fwhm, rel=0.02)
    assert np.allclose(ours, reference, rtol=1e-3)


def test_fit_fwhms_is_nan_off_the_image_and_on_empty_sky():
    image = _pixel_gaussians((64, 64), [30.0], [30.0], 3.0)
    out = fit_fwhms(image, np.array([30.0, 2.0, 61.5]), np.array([30.0, 30.0, 30.0]))
    assert np.isfinite(out[0]) and np.isnan(out[1:]).all()
    blank = np.random.default_rng(1).normal(0.0, 5.0, (64, 64))
    assert len(fit_fwhms(blank, np.array([]), np.array([]))) == 0
    assert not np.isfinite(fit_fwhms(np.full((64, 64), np.nan), np.array([30.0]), np.array([30.0]))).any()


@pytest.mark.parametrize(("fwhm", "half_max_bias"), [(1.4, 0.24), (2.0, 0.12), (2.6, 0.07)])
def test_fitted_fwhm_is_unbiased_where_the_half_maximum_width_reads_high(fwhm, half_max_bias):
    rng = np.random.default_rng(5)
    image = _pixel_gaussians((220, 220), rng.uniform(15, 205, 40), rng.uniform(15, 205, 40), fwhm, flux=5e4)
    stars = find_stars(image, 5.0)
    assert fitted_fwhm(image, stars) == pytest.approx(fwhm, rel=0.02)
    assert stars.fwhm / fwhm - 1 == pytest.approx(half_max_bias, abs=0.04)  # the figures of fitted_fwhm's docstring


def test_a_star_whose_fit_turns_singular_is_no_fit_not_a_linalg_error():
    """Found by the frame fuzzer: a LinAlgError out of subtract on a frame 45% NaN.

    Two bright pixels among NaN ones made one star's normal equations singular (a y pivot of 8e-12
    against 1e11), and ``np.linalg.solve`` raised for the whole batch.
    """
    rng = np.random.default_rng(36)
    stamp = rng.normal(0.0, 20.0, (11, 11))
    stamp[rng.random((11, 11)) < 0.45] = np.nan
    stamp[5, 5], stamp[5, 6] = 23213.0, 23023.0
    yy, xx = np.mgrid[-5:6, -5:6]
    star = 5000.0 * np.exp(-(xx ** 2 + yy ** 2) / (2 * 1.5 ** 2))  # and a good star in the same batch
    image = np.zeros((11, 40))
    image[:, :11], image[:, 20:31] = stamp, star
    fw = fit_fwhms(image, np.array([5 - 0.407, 25.0]), np.array([5.0, 5.0]), fwhm_guess=2.035)
    assert np.isnan(fw[0]) and fw[1] == pytest.approx(2.3548 * 1.5, rel=0.05)


@pytest.mark.parametrize(("settings", "named"), [
    ({"max_stars": 0}, "max_stars must be 1 or more"),
    ({"fwhm_guess_px": 0.0}, "fwhm_guess_px must be above 0 and at most 50"),
    ({"fwhm_guess_px": 1e308}, "fwhm_guess_px"),
    ({"fwhm_guess_px": float("inf")}, "fwhm_guess_px"),
])
def test_a_star_catalogue_that_cannot_be_searched_is_a_config_error(settings, named):
    """Each loaded, then failed every subtraction.

    0 stars or a 0 px kernel were a ValueError of DAOStarFinder, a kernel of 1e308 px too large a
    box, inf an OverflowError; 1000 px did not finish.
    """
    with pytest.raises(ConfigError, match=named):
        StarConfig(**settings)
    StarConfig(max_stars=1, fwhm_guess_px=50.0)  # the bounds themselves
