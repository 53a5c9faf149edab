"""Zero points against Tycho-2: value, uncertainty, the cloud flag."""

import numpy as np
import pytest
from astropy.stats import sigma_clipped_stats

from broker.astrometry import verify_wcs
from broker.catalog import index_files
from broker.photcal import ZeroPoint, aperture_flux, photcal_cards, zero_point, zp_problem
from broker.simulate.amateur import AmateurConfig, amateur_frame, true_wcs
from broker.stars import StarConfig, find_stars


def test_aperture_flux_of_a_gaussian_star():
    yy, xx = np.mgrid[0:41, 0:41]
    image = 10.0 + 1000.0 * np.exp(-((xx - 20.3) ** 2 + (yy - 19.6) ** 2) / (2 * 1.5 ** 2)) / (2 * np.pi * 1.5 ** 2)
    flux, peak = aperture_flux(image, 20.3, 19.6, 7.0, (10.5, 17.5))
    assert flux == pytest.approx(1000.0, rel=0.01) and peak > 10
    assert np.isnan(aperture_flux(image, 2.0, 2.0, 7.0, (10.5, 17.5))[0])


@pytest.mark.skipif(not index_files("/usr/share/astrometry"), reason="Tycho-2 index files not installed")
def test_the_zero_point_recovers_the_truth():
    config = AmateurConfig(bayer=None, magzp_luminance=22.0)
    data, _ = amateur_frame(config, seed=7)
    _, sky, rms = sigma_clipped_stats(data[::2, ::2])
    stars = find_stars(data - sky, rms, StarConfig(max_stars=300), threshold_sigma=5)
    result = verify_wcs(true_wcs(config).to_header(), stars, data.shape)
    zp = zero_point(data, stars, result, 65535.0)
    assert zp is not None and zp.n_stars >= 5
    assert zp.magzp == pytest.approx(22.0, abs=max(0.15, 3 * zp.magzp_err))  # aperture loss: ~0.1 mag
    assert 0 < zp.magzp_err < 0.1


def test_wildly_off_zero_points_are_named():
    zp = ZeroPoint(20.0, 0.02, 0.1, 12)
    assert zp_problem(zp, 10.0, 20.5) and "clouds" in zp_problem(zp, 10.0, 20.5)
    assert zp_problem(zp, 10.0, 18.0) is None and zp_problem(zp, 10.0, None) is None
    cards = dict((c[0], c[1]) for c in photcal_cards(zp, 27.5))
    assert cards["MAGZP"] == 20.0 and cards["MAGZPERR"] == 0.02 and cards["MAGZPHDR"] == 27.5
    assert cards["ZPSRC"] == "Tycho-2"  # a pipeline's ZPSRC no longer names the cards of the MAGZP it replaces
