"""Residual distortion of a registration: fitted when it is there, left alone when it is noise."""

from __future__ import annotations

import numpy as np
import pytest

from broker.align import AlignConfig
from broker.distortion import design, fit_distortion, undistort
from broker.subtract import SubtractConfig, subtract_and_detect
from tests.broker.conftest import Sky, make_frame, make_reference, make_sky, make_wcs

SHAPE = (300, 300)


def _field(xy: np.ndarray) -> np.ndarray:
    """A smooth displacement (px) of up to ~0.8 px at the corners: two telescopes' optics."""
    u, v = design(xy[:, 0], xy[:, 1], SHAPE, 1)[:, 1:].T  # the normalised positions
    return np.column_stack([0.8 * u * u - 0.2, -0.6 * u * v])


def test_a_smooth_displacement_is_fitted_and_centroid_noise_is_not():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 299, (80, 2))
    noise = rng.normal(0, 0.05, (80, 2))
    fit = fit_distortion(xy, _field(xy) + noise, SHAPE)
    assert fit is not None and fit.rms_after < 0.08 < 0.3 < fit.rms_before
    grid = rng.uniform(0, 299, (200, 2))
    dx, dy = fit.at(grid[:, 0], grid[:, 1])
    assert np.max(np.hypot(dx - _field(grid)[:, 0], dy - _field(grid)[:, 1])) < 0.1
    assert fit_distortion(xy, noise, SHAPE) is None  # nothing to gain: the affine registration stays
    assert fit_distortion(xy[:20], _field(xy[:20]), SHAPE) is None  # too few stars to tell


def test_undistort_moves_the_image_and_keeps_invalid_pixels_invalid():
    yy, xx = np.mgrid[0:64, 0:64].astype(float)
    image = np.exp(-((xx - 30.0) ** 2 + (yy - 32.0) ** 2) / 8.0).astype(np.float32)
    image[10, 50] = np.nan
    fit = fit_distortion(np.array([[x, y] for x in range(0, 64, 8) for y in range(0, 64, 8)], float),
                         np.tile([1.5, 0.0], (64, 1)) + np.random.default_rng(1).normal(0, 1e-3, (64, 2)),
                         (64, 64))
    assert fit is not None
    out, var = undistort(image, np.ones_like(image), fit)
    peak = np.unravel_index(np.nanargmax(out), out.shape)
    assert peak == (32, 31) or peak == (32, 32)  # moved by +1.5 px in x
    assert np.isnan(out[10, 51]) and np.isnan(var[10, 51]) and np.isnan(out[:, 0]).all()
    assert np.isfinite(out[32, 20:45]).all()


def test_a_distorted_science_frame_subtracts_without_dipoles():
    """The science pixels are displaced by a smooth field its TAN WCS does not carry.

    Affine registration leaves dipoles on the bright stars; with the distortion removed, only the
    transient is found.
    """
    sky = make_sky(70, SHAPE, 150)
    x, y = make_wcs(SHAPE).world_to_pixel_values(sky.ra, sky.dec)
    xy = np.column_stack([x, y])
    shifted = xy + _field(xy)
    ra, dec = make_wcs(SHAPE).pixel_to_world_values(shifted[:, 0], shifted[:, 1])
    sci = make_frame(71, SHAPE, Sky(np.asarray(ra), np.asarray(dec), sky.flux),
                     extra=[(150.3, 120.6, 15000.0)], frame_id="distorted")
    ref = make_reference(72, SHAPE, sky)
    affine = subtract_and_detect(sci, ref, SubtractConfig(align=AlignConfig(distortion_min_stars=0)))
    fixed = subtract_and_detect(sci, ref, SubtractConfig())
    assert len(affine.candidates) >= 5
    assert [(round(c.detection.x), round(c.detection.y)) for c in fixed.candidates] == [(150, 121)]
    assert fixed.diagnostics["astrometric_residual_px"] < 0.1 < 0.25 < affine.diagnostics["astrometric_residual_px"]


@pytest.mark.parametrize("seed", [0, 1])
def test_frames_registered_by_their_wcs_are_left_as_they_are(seed):
    """No distortion: the same candidates and residual whether the step is on or off."""
    sky = make_sky(80 + seed, SHAPE, 150)
    sci = make_frame(81 + seed, SHAPE, sky, extra=[(100.3, 180.6, 15000.0)], dx=0.7, dy=-0.4, true_dx=1.1)
    ref = make_reference(82 + seed, SHAPE, sky)
    on = subtract_and_detect(sci, ref, SubtractConfig())
    off = subtract_and_detect(sci, ref, SubtractConfig(align=AlignConfig(distortion_min_stars=0)))
    assert on.diagnostics["astrometric_residual_px"] == off.diagnostics["astrometric_residual_px"]
    assert [c.detection.snr for c in on.candidates] == [c.detection.snr for c in off.candidates]
