"""Plate solving and WCS checks against Tycho-2 (synthetic frames of the real sky)."""

import shutil
import time

import numpy as np
import pytest
from astropy.stats import sigma_clipped_stats

from broker.astrometry import AstrometryConfig, astrometry_cards, plate_solve, solver_path, verify_wcs
from broker.bayer import superpixel_luminance
from broker.catalog import cone, index_files
from broker.errors import ConfigError, SolverUnavailable, UnsolvableField
from broker.simulate.amateur import AmateurConfig, amateur_frame, true_wcs
from broker.stars import StarConfig, StarList, find_stars

pytestmark = pytest.mark.skipif(not index_files("/usr/share/astrometry"),
                                reason="Tycho-2 index files not installed (Debian astrometry-data-tycho2)")
needs_solver = pytest.mark.skipif(shutil.which("solve-field") is None,
                                  reason="solve-field not installed (Debian astrometry.net)")
MONO = AmateurConfig(bayer=None)


def _stars(data):
    _, sky, rms = sigma_clipped_stats(data[::2, ::2])
    return find_stars(data - sky, rms, StarConfig(max_stars=300), threshold_sigma=5)


def test_the_catalogue_reader_returns_tycho2_stars():
    stars = cone(193.0, 41.0, 0.5)
    assert 10 < len(stars) < 500 and np.all((stars.mag > 3) & (stars.mag < 14))
    sep = np.hypot((stars.ra - 193.0) * np.cos(np.radians(41.0)), stars.dec - 41.0)
    assert sep.max() <= 0.5 + 1e-6
    with pytest.raises(SolverUnavailable, match="astrometry-data-tycho2"):
        cone(0, 0, 1, "/nonexistent")


def test_a_true_header_wcs_is_verified_and_a_wrong_one_unconfirmed():
    data, _ = amateur_frame(MONO, seed=4)
    stars = _stars(data)
    header = true_wcs(MONO).to_header()
    result = verify_wcs(header, stars, data.shape)
    assert result.status == "verified" and result.check.n_matched >= 5 and result.check.residual_arcsec < 1.5
    wrong = true_wcs(AmateurConfig(bayer=None, ra=193.3)).to_header()
    assert verify_wcs(wrong, stars, data.shape).status == "unconfirmed"
    assert dict((c[0], c[1]) for c in astrometry_cards(result))["WCSSTAT"] == "verified"


@needs_solver
def test_a_frame_without_wcs_is_solved_from_the_hint():
    data, header = amateur_frame(AmateurConfig(), seed=5)
    lum, _ = superpixel_luminance(data, header, 65535.0)
    result = plate_solve(_stars(lum), lum.shape, (193.05, 41.0), 4.785)
    assert result.status == "solved" and result.hint_offset_deg < 0.1
    assert result.check.residual_arcsec < 1.5 * result.check.scale_arcsec


@needs_solver
def test_a_wrong_hint_or_no_stars_is_a_clear_unsolvable():
    data, header = amateur_frame(AmateurConfig(), seed=6)
    lum, _ = superpixel_luminance(data, header, 65535.0)
    config = AstrometryConfig(blind_retry=False, cpulimit_s=5, timeout_s=120)
    start = time.monotonic()
    with pytest.raises(UnsolvableField, match="around the header's pointing"):
        plate_solve(_stars(lum), lum.shape, (20.0, -30.0), 4.785, config)
    assert time.monotonic() - start < 30  # stopped by cpulimit_s (~6 s); it used to run until timeout_s
    rng = np.random.default_rng(0)
    noise = StarList(rng.uniform(0, 500, 40), rng.uniform(0, 300, 40), rng.uniform(1, 100, 40), np.ones(40), 3.0)
    with pytest.raises(UnsolvableField, match="no solution"):
        plate_solve(noise, (300, 500), (193.0, 41.0), 4.785, config)
    with pytest.raises(UnsolvableField, match="only 2 stars"):
        plate_solve(noise.subset(slice(0, 2)), (300, 500), None, None, config)


def test_a_missing_solver_names_the_debian_package():
    with pytest.raises(SolverUnavailable, match="astrometry.net"):
        solver_path(AstrometryConfig(solver="no-such-solve-field"))
    with pytest.raises(SolverUnavailable, match="astrometry-data-tycho2"):
        solver_path(AstrometryConfig(index_dir="/nonexistent"))


def test_a_solver_run_over_its_timeout_is_killed(tmp_path):
    from broker.astrometry import _run_bounded

    start = time.monotonic()
    assert not _run_bounded(["sh", "-c", "sleep 30 & sleep 30"], tmp_path, 0.3)  # a child of its own too
    assert time.monotonic() - start < 5
    assert _run_bounded(["true"], tmp_path, 5)


def test_a_wcs_that_puts_the_whole_sky_in_the_frame_matches_only_the_brightest_catalogue_stars(monkeypatch):
    """Found by the frame fuzzer: 8 s and 1.2 GB per frame in ingest for a WCS of 1 deg/px.

    CTYPE cards alone (CDELT defaults to 1 deg) put 190,000 Tycho-2 stars in a 650 x 500 frame, and
    the check matched every one of them against every detected star.
    """
    from astropy.io import fits

    import broker.astrometry as astrometry
    from broker.catalog import CatalogStars

    sizes: list[int] = []
    nearest = astrometry._nearest
    monkeypatch.setattr(astrometry, "_nearest", lambda x, *args: sizes.append(len(x)) or nearest(x, *args))
    rng = np.random.default_rng(8)
    header = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRPIX1": 325.0, "CRPIX2": 250.0})
    n = 50_000
    catalog = CatalogStars(rng.uniform(-20, 20, n) % 360.0, rng.uniform(-20, 20, n), rng.uniform(5, 12, n))
    stars = StarList(rng.uniform(0, 650, 150), rng.uniform(0, 500, 150), rng.uniform(1, 100, 150), np.ones(150), 3.0)
    config = AstrometryConfig()
    check = astrometry.check_wcs(header, (500, 650), stars, catalog, config)
    assert check.n_catalog == n  # all of them counted as inside the frame
    assert sizes and max(sizes) <= 20 * config.max_sources  # the brightest matched
    brightest = np.sort(catalog.mag)[20 * config.max_sources]
    assert np.all(catalog.mag[check.catalog_index] <= brightest)


def test_a_solver_given_no_star_is_a_config_error():
    """``max_sources = 0`` loaded, then the star finder of every frame raised ValueError."""
    with pytest.raises(ConfigError, match="max_sources must be 1 or more"):
        AstrometryConfig(max_sources=0)
