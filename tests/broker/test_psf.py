"""Empirical PSFs and PSF stamps."""

from __future__ import annotations

import numpy as np
import pytest

from broker.background import estimate_background
from broker.errors import ConfigError, PSFError
from broker.psf import PSFConfig, build_psf, embed_centred, gaussian_psf, measure_fwhm
from broker.stars import StarList, find_stars
from tests.broker.conftest import make_frame, make_sky


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
