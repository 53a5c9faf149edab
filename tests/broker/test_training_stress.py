"""Tests of broker.training.stress: what a misaligned reference and trails put under a source, trail brightness."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from broker.training.settings import TrainingSetConfig
from broker.training.stress import (
    FAINT_TRAIL_BRIGHTNESS,
    TRAIL_BRIGHTNESS,
    add_science_artifacts,
    residual_flux,
    trail_flux,
)


def test_residual_flux_scales_with_the_shift_and_the_star():
    sigma_fwhm = 2.3548  # sigma = 1 px
    assert residual_flux(0.5, sigma_fwhm, 1e5) == pytest.approx(1e5 * 0.5 * np.exp(-0.5))
    assert residual_flux(5.0, sigma_fwhm, 1e5) == 1e5  # capped at the star
    assert residual_flux(0.0, sigma_fwhm, 1e5) == 0.0


def test_trail_flux_is_what_a_psf_fit_sees_of_a_rendered_trail():
    from broker.simulate import render

    fwhm = 3.0
    s = fwhm / 2.3548
    flat, vals = render.line_profile((101, 101), 0.0, 30.0, 100.0, 70.0, s, 200.0)
    img = np.zeros(101 * 101)
    np.add.at(img, flat, vals)
    img = img.reshape(101, 101)
    trail = SimpleNamespace(x0=0.0, y0=30.0, x1=100.0, y1=70.0, flux=float(vals.sum()))
    yy, xx = np.indices(img.shape)
    for d in (0.0, 1.5, 3.0):  # perpendicular offsets from the trail's middle
        x, y = 50.0 - d * 0.371, 50.0 + d * 0.928
        psf = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
        fit = float((psf * img).sum() / (psf * psf).sum() * psf.sum())  # flux of the fitted PSF
        assert trail_flux(x, y, [trail], fwhm) == pytest.approx(fit, rel=0.03)
    assert trail_flux(50.0, 0.0, [trail], fwhm) < 1e-6 * fit


def test_faint_trails_are_drawn_at_the_detection_limit():
    sky, fwhm = 400.0, 2.5
    for per_frame, faint, want in ((3.0, 0.0, TRAIL_BRIGHTNESS), (0.0, 3.0, FAINT_TRAIL_BRIGHTNESS)):
        cfg = TrainingSetConfig(hot_pixels_per_frame=0.0, bad_columns_per_frame=0.0,
                                trails_per_frame=per_frame, faint_trails_per_frame=faint)
        b = []
        for seed in range(4):
            frame = SimpleNamespace(data=np.zeros((300, 300), np.float32),
                                    meta=SimpleNamespace(saturation=6e4))
            for t in add_science_artifacts(frame, fwhm, sky, cfg, np.random.default_rng(seed)):
                assert t.kind == "satellite"
                # ADU per px of length in units of sky sigma * FWHM
                b.append(t.flux / np.hypot(t.x1 - t.x0, t.y1 - t.y0) / (np.sqrt(sky) * fwhm))
        assert len(b) >= 5
        assert want[0] * 0.95 <= min(b) and max(b) <= want[1] * 1.05, (want, b)
