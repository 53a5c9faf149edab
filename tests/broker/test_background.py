"""Sky background and noise maps."""

from __future__ import annotations

import numpy as np
import pytest

from broker.background import BackgroundConfig, estimate_background
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
