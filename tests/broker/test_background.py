"""Sky background and noise maps."""

from __future__ import annotations

import numpy as np
import pytest

from broker.background import BackgroundConfig, estimate_background
from broker.errors import BadPixelFraction
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
