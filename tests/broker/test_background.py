"""Sky background and noise maps."""

from __future__ import annotations

import numpy as np
import pytest

from broker.background import BackgroundConfig, estimate_background, residual_sky
from broker.errors import BadPixelFraction, ConfigError
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


def test_mesh_background_agrees_with_photutils():
    shape = (512, 512)
    frame = make_frame(7, shape, make_sky(7, shape, 200), sky_level=500.0, read_noise=5.0)
    b1, r1 = estimate_background(frame.data, config=BackgroundConfig(method="photutils"))
    b2, r2 = estimate_background(frame.data, config=BackgroundConfig(method="meshes"))
    assert np.median(np.abs(b1 - b2)) < 0.1 * np.median(r1)
    assert np.median(r2) == pytest.approx(np.sqrt(500.0 + 25.0), rel=0.03)
    assert np.median(r2) == pytest.approx(np.median(r1), rel=0.04)


@pytest.mark.parametrize(("settings", "named"), [
    ({"filter_size": 16}, "filter_size must be 0 to 15"),
    ({"filter_size": 2 ** 62}, "filter_size"),
    ({"sigma_clip": 0.0}, "sigma_clip must be above 0"),
    ({"min_finite_fraction": 1.5}, "min_finite_fraction must be 0 to 1"),
    ({"min_finite_fraction": float("inf")}, "min_finite_fraction"),
])
def test_a_background_setting_without_meaning_is_a_config_error(settings, named):
    """Each loaded, and no frame gave an alert.

    A 2**62 mesh filter was a ValueError on every frame; 0 sigma clipping left no reference and no
    candidate; a usable fraction above 1 refused every frame as "only 100.0% usable pixels".
    """
    with pytest.raises(ConfigError, match=named):
        BackgroundConfig(**settings)


def test_the_widest_mesh_filter_runs(small_shape):
    frame = make_frame(1, small_shape, make_sky(1, small_shape, 30), sky_level=300.0, read_noise=5.0)
    bkg, _ = estimate_background(frame.data, config=BackgroundConfig(filter_size=15, min_finite_fraction=1.0))
    assert np.median(bkg) == pytest.approx(300.0, abs=2.0)



@pytest.mark.parametrize("seed", [0, 4])
def test_the_residual_sky_takes_out_the_broad_stars_wings_that_the_map_kept(seed):
    """A 9 px FWHM field of 60 stars of 2e3-1e5 ADU on 256^2 (true sky 200 ADU).

    The map's clipped meshes keep the stars' wings: 2.70 and 2.51 ADU over the truth on average,
    which in a 27 px aperture is 6 % of a 1e5 ADU star. The residual sky, measured with the
    sources masked, takes it back to within 0.4 ADU; where nothing is left to measure, zero.
    """
    data = make_frame(20 + seed, (256, 256), make_sky(7 + 100 * seed, (256, 256), 60), fwhm=9.0).data
    bkg, rms = estimate_background(data)
    assert np.mean(bkg) - 200.0 > 2.0
    sky = bkg + residual_sky(data - bkg, float(np.median(rms)))
    assert abs(np.mean(sky) - 200.0) < 0.4
    assert not residual_sky(np.full((64, 64), np.nan), 15.0).any()
    assert not residual_sky(data - bkg, float("nan")).any()
