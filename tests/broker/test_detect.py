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


def _isolated_positions(rng, shape, sky, n, min_star_px=12.0, margin=20.0):
    """``n`` positions (px) at least ``min_star_px`` from any star of ``sky`` and 15 px from each other."""
    from tests.broker.conftest import make_wcs

    sx, sy = make_wcs(shape).world_to_pixel_values(sky.ra, sky.dec)
    out: list[tuple[float, float]] = []
    while len(out) < n:
        x, y = rng.uniform(margin, shape[1] - margin), rng.uniform(margin, shape[0] - margin)
        if np.min(np.hypot(sx - x, sy - y)) > min_star_px and all(np.hypot(x - a, y - b) > 15 for a, b in out):
            out.append((x, y))
    return out


def test_position_errors_match_the_scatter_about_injected_positions():
    """Pulls (measured - true position) / error of seeded sources at S/N 6-35 have a std near 1."""
    from broker.subtract import subtract_and_detect
    from tests.broker.conftest import make_frame, make_reference, make_sky

    shape, rng = (256, 256), np.random.default_rng(11)
    pulls, errs = [], []
    for seed in range(8):
        sky = make_sky(seed + 400, shape, 30)
        pos = _isolated_positions(rng, shape, sky, 12)
        flux = rng.uniform(450, 3000, len(pos))
        sci = make_frame(seed + 500, shape, sky, extra=[(x, y, f) for (x, y), f in zip(pos, flux, strict=True)])
        for cand in subtract_and_detect(sci, make_reference(seed + 600, shape, sky)).candidates:
            d = cand.detection
            dist = [np.hypot(d.x - x, d.y - y) for x, y in pos]
            j = int(np.argmin(dist))
            if dist[j] < 2:
                pulls += [(d.x - pos[j][0]) / d.x_err, (d.y - pos[j][1]) / d.y_err]
                errs.append((d.x_err, d.y_err, d.ra_err, d.dec_err, d.snr))
    pulls_a, e = np.array(pulls), np.array(errs)
    assert len(e) > 80
    assert abs(pulls_a.mean()) < 0.2 and 0.85 < pulls_a.std() < 1.2
    # 1"/px, north up: the sky errors are the pixel errors in arcsec
    assert np.allclose(e[:, 2], e[:, 0], rtol=1e-6) and np.allclose(e[:, 3], e[:, 1], rtol=1e-6)
    # the Cramer-Rao scale for a Gaussian PSF, sqrt(2) FWHM_D / (2.35 S/N), FWHM_D ~ 3 px
    assert np.median(e[:, 0] * e[:, 4] / (np.sqrt(2) * 3.0 / 2.3548)) == pytest.approx(1.0, abs=0.25)


def test_sky_errors_follow_the_wcs_rotation_and_scale():
    from broker.detect import sky_errors
    from tests.broker.conftest import make_wcs

    cov = np.array([[[0.04, 0.0], [0.0, 0.01]]])  # 0.2 px in x, 0.1 px in y
    assert np.allclose(sky_errors(cov, make_wcs((64, 64))), [[0.2, 0.1]])
    assert np.allclose(sky_errors(cov, make_wcs((64, 64), rot_deg=90.0)), [[0.1, 0.2]])
    w = make_wcs((64, 64))
    w.wcs.cd = w.wcs.cd * 0.5  # 0.5"/px
    assert np.allclose(sky_errors(cov, w), [[0.1, 0.05]])


def test_psf_flux_and_forced_flux_share_one_photometry():
    """A fixed-position fit recovers a noiseless source exactly; its error is sigma / sqrt(sum P^2)."""
    from broker.detect import ShiftedPSF, forced_flux, psf_flux
    from broker.psf import gaussian_psf

    psf = gaussian_psf(3.0, 8).astype(np.float64)
    shifted = ShiftedPSF(psf, 5)
    img = np.zeros((40, 40))
    img[10:27, 12:29] = 500.0 * psf  # centred on pixel (20, 18)
    p = shifted(0.0, 0.0)
    amp, err = psf_flux(img[13:24, 15:26], np.ones((11, 11), bool), p, 2.0)
    assert amp == pytest.approx(500.0, rel=1e-3) and err == pytest.approx(2.0 / np.sqrt((p ** 2).sum()))
    flux, ferr = forced_flux(img.astype(np.float32), np.full((40, 40), 2.0, np.float32), 0.5, shifted, 20.0, 18.0)
    assert flux == pytest.approx(amp, rel=1e-6) and ferr == pytest.approx(2 * err)  # noise 2 x (1 / F_D = 2)
    assert psf_flux(img[13:24, 15:26], np.zeros((11, 11), bool), p, 1.0) is None
    masked = img.astype(np.float32)
    masked[:, :21] = np.nan  # more than half the PSF is gone
    assert forced_flux(masked, np.ones((40, 40), np.float32), 1.0, shifted, 20.0, 18.0) is None
    assert forced_flux(img, np.ones((40, 40)), 1.0, shifted, 40.2, 18.0) is None  # off the image


def test_stamp_of_a_box_off_the_image_is_all_nan():
    """A reference source far outside a drifting frame gives an empty (NaN) stamp, not an error."""
    from broker.detect import _stamp

    img = np.arange(100.0).reshape(10, 10)
    assert np.isnan(_stamp(img, -51, 5, 4)).all() and np.isnan(_stamp(img, 5, 60, 4)).all()
    edge = _stamp(img, -2, 0, 3)  # partly inside
    assert edge[3, 5] == img[0, 0] and np.isnan(edge[0, 0])


def test_a_host_radius_of_any_size_finds_the_host():
    """``host_radius_arcsec = 1e308`` loaded, then squaring it overflowed (OverflowError) on every frame."""
    from broker.detect import DetectConfig, _host_in_stamp, concentration

    h, fwhm = 20, 3.0
    point = _blob((2 * h + 1, 2 * h + 1), h, h, 100.0, fwhm / 2.3548)
    galaxy = _blob((2 * h + 1, 2 * h + 1), h + 8, h, 100.0, 5.0)
    c_psf = concentration(point, h, h, fwhm)
    found = [_host_in_stamp(galaxy, galaxy, 1.0, h, fwhm, c_psf, r, DetectConfig()) for r in (20.0, 1e308, np.inf)]
    assert found[0][0] == pytest.approx(h + 8, abs=0.5) and found[1] == found[2] == found[0]


def test_a_footprint_wider_than_a_cutout_is_a_config_error():
    """2**62 loaded, then was a ValueError of every subtraction; 1000 px dropped every candidate as bad."""
    from broker.detect import DetectConfig
    from broker.errors import ConfigError

    with pytest.raises(ConfigError, match="footprint_half must be 0 to 31 px"):
        DetectConfig(footprint_half=32)
    assert DetectConfig(footprint_half=31).footprint_half == 31
