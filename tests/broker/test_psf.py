"""Empirical PSFs and PSF stamps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from broker.background import estimate_background
from broker.errors import ConfigError, PSFError
from broker.psf import (
    PSFConfig,
    build_psf,
    embed_centred,
    gaussian_psf,
    measure_fwhm,
    select_psf_stars,
    significant_psf,
    stack_psf,
)
from broker.stars import StarList, find_stars
from tests.broker.conftest import make_frame, make_sky, make_wcs


def test_psf_from_stars_matches_truth(small_shape):
    frame = make_frame(2, small_shape, make_sky(2, small_shape, 60), fwhm=3.2)
    bkg, rms = estimate_background(frame.data)
    stars = find_stars(frame.data - bkg, float(np.median(rms)))
    assert len(stars) > 20
    assert stars.fwhm == pytest.approx(3.2, rel=0.15)
    psf = build_psf(frame.data - bkg, stars)
    assert not psf.fallback and psf.n_stars >= 5
    assert psf.stamp.shape[0] % 2 == 1 and psf.stamp.sum() == pytest.approx(1.0, abs=1e-5)
    assert psf.fwhm == pytest.approx(3.2, rel=0.05)
    # centred: first moments within 0.05 px of the central pixel
    h = psf.stamp.shape[0] // 2
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    assert abs((psf.stamp * xx).sum()) < 0.05 and abs((psf.stamp * yy).sum()) < 0.05


def test_psf_fallback_flagged_when_too_few_stars(small_shape):
    frame = make_frame(3, small_shape, None)
    data = frame.data - np.median(frame.data)
    stars = StarList(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), 2.7)
    psf = build_psf(data, stars)
    assert psf.fallback and psf.n_stars == 0
    assert psf.fwhm == pytest.approx(2.7)
    assert measure_fwhm(psf.stamp) == pytest.approx(2.7, rel=0.05)
    with pytest.raises(PSFError):
        build_psf(data, stars, PSFConfig(allow_fallback=False))
    with pytest.raises(PSFError):
        build_psf(np.full(small_shape, np.nan), stars)


def test_gaussian_psf_fwhm():
    assert measure_fwhm(gaussian_psf(4.0, 12)) == pytest.approx(4.0, rel=0.03)


def test_embed_places_the_centre_at_the_origin():
    st = np.arange(49, dtype=np.float32).reshape(7, 7)
    ref = np.roll(np.pad(st, ((0, 5), (0, 6))), (-3, -3), axis=(0, 1))
    assert np.array_equal(embed_centred(st, (12, 13)), ref)


def test_a_psf_stamp_of_no_pixel_is_a_config_error():
    """``max_half_size = 0`` loaded and was a ValueError of every subtraction (a 1 px stamp embedded)."""
    with pytest.raises(ConfigError, match="max_half_size must be 1 px or more"):
        PSFConfig(max_half_size=0)
    assert PSFConfig(min_half_size=0, max_half_size=1).max_half_size == 1


def _wide_psf_field(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A 256^2 frame of 60 stars with a 9 px Gaussian PSF, less its sky.

    Returns (data, x, y, flux) of the stars isolated within 25 px (brightest first) and the
    positions of all 60.
    """
    shape = (256, 256)
    sky = make_sky(7, shape, 60)
    data = make_frame(seed, shape, sky, fwhm=9.0).data - 200.0
    ax, ay = (np.asarray(v) for v in make_wcs(shape).world_to_pixel_values(sky.ra, sky.dec))
    pts = np.column_stack([ax, ay])
    alone = np.array([len(n) == 1 for n in cKDTree(pts).query_ball_point(pts, 25)])
    sel = [i for i in np.argsort(-sky.flux) if alone[i] and 28 < ax[i] < 228 and 28 < ay[i] < 228]
    return data, ax[sel], ay[sel], sky.flux[sel], ax, ay


@pytest.mark.parametrize("seed", [20, 21, 22])
def test_a_wide_psf_is_stacked_without_its_neighbours_light(seed):
    """A 9 px PSF is stacked without its neighbours' light.

    Stars isolated within 25 px still had neighbours' light in their 51 x 51 stamps: the stamp sums
    were 1.6x the fluxes and the stack 23 % too peaked. With the other stars masked (2 FWHM) the
    PSF-fit fluxes are the stars' and the stack is the PSF.
    """
    data, x, y, flux, ax, ay = _wide_psf_field(seed)
    psf, fit, used = stack_psf(data, x, y, 25, (ax, ay), 18.0)
    assert psf is not None and used.sum() >= 7
    assert np.median(fit[used] / flux[used]) == pytest.approx(1.0, abs=0.025)
    truth = gaussian_psf(9.0, 25)
    assert psf.max() == pytest.approx(truth.max(), rel=0.025)
    assert np.abs(psf - truth).sum() < 0.13
    assert measure_fwhm(psf) == pytest.approx(9.0, rel=0.03)


def test_the_unmeasured_wings_of_a_stacked_psf_are_zero():
    """Noise beyond where the stack measures the PSF is cut (it held 3-7 % of a 9 px PSF's flux)."""
    rng = np.random.default_rng(5)
    truth = gaussian_psf(9.0, 25).astype(np.float64)
    stack = truth + rng.normal(0.0, 2e-4, (15,) + truth.shape)
    psf = significant_psf(np.median(stack, axis=0), stack)
    r = np.hypot(*np.mgrid[-25:26, -25:26])
    assert np.all(psf[r < 1.5 * 9.0] == np.median(stack, axis=0)[r < 1.5 * 9.0])
    assert np.all(psf[r > 2.5 * 9.0] == 0.0)
    assert abs(psf.sum() - 1.0) < 0.01
    # a PSF the stack measures to its edge (Moffat wings, bright stars) keeps every pixel
    moffat = (1 + (r / (9.0 / (2 * np.sqrt(2 ** (1 / 2.5) - 1)))) ** 2) ** -2.5
    moffat /= moffat.sum()
    bright = moffat + rng.normal(0.0, 1e-8, (15,) + truth.shape)
    assert np.array_equal(significant_psf(np.median(bright, axis=0), bright), np.median(bright, axis=0))


@pytest.mark.parametrize(("seed", "n_stars"), [(7, 60), (1, 60), (3, 120)])
def test_build_psf_masks_the_neighbours_of_its_stars(seed, n_stars):
    """A 9 px PSF built from a frame's own catalogue is the PSF, its stars' neighbours masked.

    Unmasked (``neighbour_mask_fwhm = 0``, as build_psf stacked before) it was 11-14 % too peaked
    on these fields (FWHM 8.6-8.9 px): the light of stars just outside the isolation radius.
    """
    shape = (256, 256)
    frame = make_frame(20, shape, make_sky(seed, shape, n_stars), fwhm=9.0, saturation=60000.0)
    bkg, rms = estimate_background(frame.data)
    data = frame.data - bkg
    stars = find_stars(data, float(np.median(rms)), saturation=60000.0, background=bkg)
    truth = gaussian_psf(9.0, 25)
    psf = build_psf(data, stars, half_size=25)
    assert not psf.fallback
    assert psf.stamp.max() == pytest.approx(truth.max(), rel=0.05)
    assert psf.fwhm == pytest.approx(9.0, rel=0.02)
    unmasked = build_psf(data, stars, PSFConfig(neighbour_mask_fwhm=0.0), half_size=25)
    assert unmasked.stamp.max() > 1.08 * truth.max()


def test_psf_stars_are_isolated_among_the_neighbours_given():
    """Isolation is tested against every catalogued star when given, not only the candidates themselves.

    A subtraction picks its PSF stars among the matched stars and masks every catalogued star: a
    neighbour 10 px away in the science catalogue only masked a star's core in the reference.
    """
    stars = StarList(np.array([50.0, 120.0]), np.array([50.0, 50.0]), np.array([2e4, 1e4]), np.array([2e3, 1e3]), 3.0)
    assert select_psf_stars(stars, (200, 200), 10).tolist() == [0, 1]
    others = (np.array([50.0, 120.0, 60.0]), np.array([50.0, 50.0, 50.0]))
    assert select_psf_stars(stars, (200, 200), 10, neighbours=others).tolist() == [1]


def test_a_psf_star_keeps_its_stamp_when_a_cleaned_pixel_lies_outside_its_core(small_shape):
    """NaN pixels (cosmic rays, hot pixels, bad columns the frame's cleaning set to NaN) away from a star's core.

    A stamp box holding any NaN pixel dropped its star: on a 128^2 simulated field with 40 hot
    pixels (229 NaN pixels after cleaning) 5 of 6 isolated stars were dropped, and the PSF fell
    back on a Gaussian. Now only a NaN within h / 3 px of the centre drops the star.
    """
    frame = make_frame(2, small_shape, make_sky(2, small_shape, 60), fwhm=3.2)
    bkg, rms = estimate_background(frame.data)
    data = frame.data - bkg
    stars = find_stars(data, float(np.median(rms)))
    clean = build_psf(data, stars)
    h = clean.stamp.shape[0] // 2
    idx = select_psf_stars(stars, data.shape, h)
    holed = data.copy()
    for x, y in zip(stars.x[idx], stars.y[idx], strict=True):  # two NaN pixels 6 px out on each PSF star
        holed[int(round(y)) + 6, int(round(x))] = holed[int(round(y)), int(round(x)) - 6] = np.nan
    psf = build_psf(holed, stars)
    assert not psf.fallback and psf.n_stars == clean.n_stars
    assert np.abs(psf.stamp - clean.stamp).max() < 0.02 * clean.stamp.max()
    for x, y in zip(stars.x[idx], stars.y[idx], strict=True):  # and one in each core: no star is left
        holed[int(round(y)), int(round(x)) + 1] = np.nan
    assert build_psf(holed, stars).fallback
