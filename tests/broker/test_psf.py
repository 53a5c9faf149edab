"""Background, star catalogue and PSF estimation."""

from __future__ import annotations

import numpy as np
import pytest

from broker.errors import BadPixelFraction, PSFError
from broker.psf import (
    PSFConfig, StarList, build_psf, estimate_background, find_stars, gaussian_psf, measure_fwhm,
)
from tests.broker.conftest import make_frame, make_sky


def test_background_recovers_level_and_rms(small_shape):
    frame = make_frame(1, small_shape, make_sky(1, small_shape, 30), sky_level=300.0, read_noise=5.0)
    bkg, rms = estimate_background(frame.data)
    assert bkg.shape == rms.shape == small_shape
    assert np.median(bkg) == pytest.approx(300.0, abs=2.0)
    assert np.median(rms) == pytest.approx(np.sqrt(300.0 + 25.0), rel=0.04)


def test_background_rejects_all_nan(small_shape):
    with pytest.raises(BadPixelFraction):
        estimate_background(np.full(small_shape, np.nan, np.float32))


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


def test_saturated_stars_are_not_psf_stars(small_shape):
    sky = make_sky(4, small_shape, 40, fmin=5e3, fmax=3e5)
    frame = make_frame(4, small_shape, sky, saturation=20000.0)
    bkg, rms = estimate_background(frame.data)
    stars = find_stars(frame.data - bkg, float(np.median(rms)), saturation=20000.0, background=bkg)
    assert len(stars)
    assert np.all(stars.peak + 200.0 < 0.8 * 20000.0 + 100.0)


def test_mesh_background_agrees_with_photutils():
    from broker.psf import BackgroundConfig

    shape = (512, 512)
    frame = make_frame(7, shape, make_sky(7, shape, 200), sky_level=500.0, read_noise=5.0)
    b1, r1 = estimate_background(frame.data, config=BackgroundConfig(method="photutils"))
    b2, r2 = estimate_background(frame.data, config=BackgroundConfig(method="meshes"))
    assert np.median(np.abs(b1 - b2)) < 0.1 * np.median(r1)
    assert np.median(r2) == pytest.approx(np.sqrt(500.0 + 25.0), rel=0.03)
    assert np.median(r2) == pytest.approx(np.median(r1), rel=0.04)


def test_bad_columns_finds_weak_defect_columns_but_not_trails():
    from broker.psf import bad_columns
    from broker.simulate.render import line_profile

    rng = np.random.default_rng(3)
    img = rng.normal(0.0, 20.0, (1024, 1024)).astype(np.float32)
    img[300:, 400] += 80.0  # hot column from row 300: 4 sigma per pixel, below any per-pixel cut
    img[:, 700] -= 60.0  # a cold one
    flat, vals = line_profile(img.shape, 100.0, 0.0, 190.0, 1023.0, 1.3, 3000.0)  # steep trail
    img.reshape(-1)[flat] += vals.astype(np.float32)
    m = bad_columns(img, 20.0)
    assert m[384:, 400].all() and m[:, 700].all()
    assert not m[:, 90:200].any()  # the trail is not a column
    assert m.sum() <= 1024 + 1024 - 256  # nothing else


def test_embed_places_the_centre_at_the_origin():
    from broker.psf import embed_centred

    st = np.arange(49, dtype=np.float32).reshape(7, 7)
    ref = np.roll(np.pad(st, ((0, 5), (0, 6))), (-3, -3), axis=(0, 1))
    assert np.array_equal(embed_centred(st, (12, 13)), ref)
