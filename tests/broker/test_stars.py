"""Star catalogues."""

from __future__ import annotations

import numpy as np

from broker.background import estimate_background
from broker.stars import find_stars
from tests.broker.conftest import make_frame, make_sky


def test_saturated_stars_are_not_psf_stars(small_shape):
    sky = make_sky(4, small_shape, 40, fmin=5e3, fmax=3e5)
    frame = make_frame(4, small_shape, sky, saturation=20000.0)
    bkg, rms = estimate_background(frame.data)
    stars = find_stars(frame.data - bkg, float(np.median(rms)), saturation=20000.0, background=bkg)
    assert len(stars)
    assert np.all(stars.peak + 200.0 < 0.8 * 20000.0 + 100.0)
