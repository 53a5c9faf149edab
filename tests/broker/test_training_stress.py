"""Tests of broker.training.stress: what a misaligned reference and trails put under a source, trail brightness."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from broker.training.settings import TrainingSetConfig
from broker.training.stress import (
    FAINT_TRAIL_BRIGHTNESS,
    GLINT_BRIGHTNESS,
    TRAIL_BRIGHTNESS,
    add_science_artifacts,
    reference_gap,
    residual_flux,
    trail_flux,
)

QUIET = dict(hot_pixels_per_frame=0.0, bad_columns_per_frame=0.0, trails_per_frame=0.0,
             faint_trails_per_frame=0.0)


def _blank_frame(shape=(300, 300)):
    return SimpleNamespace(data=np.zeros(shape, np.float32), meta=SimpleNamespace(saturation=6e4))


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


def test_glints_are_trains_of_point_like_knots_along_a_line():
    sky, fwhm = 400.0, 2.5
    frame = _blank_frame()
    cfg = TrainingSetConfig(**QUIET, glints_per_frame=2.0)
    glints = add_science_artifacts(frame, fwhm, sky, cfg, np.random.default_rng(5))
    assert glints and all(g.kind == "satellite" and g.source_id.startswith("GL") for g in glints)
    peak = frame.data.max() / np.sqrt(sky)
    assert GLINT_BRIGHTNESS[0] * 0.9 <= peak <= GLINT_BRIGHTNESS[1] * 1.1
    g = glints[0]
    t = np.linspace(0.05, 0.95, 400)
    xs, ys = g.x0 + t * (g.x1 - g.x0), g.y0 + t * (g.y1 - g.y0)
    along = frame.data[np.rint(ys).astype(int), np.rint(xs).astype(int)]
    assert along.min() < 0.05 * along.max()  # dark gaps between the knots, not a continuous trail


def test_glints_draw_nothing_when_off():
    """Sets made without glints keep their random stream (and so their candidates)."""
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    add_science_artifacts(_blank_frame(), 2.5, 400.0, TrainingSetConfig(glints_per_frame=0.0), a)
    add_science_artifacts(_blank_frame(), 2.5, 400.0, TrainingSetConfig(glints_per_frame=0.0), b)
    assert a.uniform() == b.uniform()
    frame = _blank_frame()
    add_science_artifacts(frame, 2.5, 400.0, TrainingSetConfig(**QUIET, glints_per_frame=0.0),
                          np.random.default_rng(1))
    assert not frame.data.any()


def test_reference_gap_blanks_a_block_and_keeps_the_catalogue():
    from broker.subtract import reference_sources
    from tests.broker.conftest import make_reference, make_sky

    ref = make_reference(3, (256, 256), make_sky(3, (256, 256), 40))
    stars = reference_sources(ref)
    rng = np.random.default_rng(0)
    assert reference_gap(ref, TrainingSetConfig(p_reference_gap=0.0), rng) is ref
    assert rng.uniform() == np.random.default_rng(0).uniform()  # nothing drawn when off
    fractions = []
    for seed in range(12):
        out = reference_gap(ref, TrainingSetConfig(p_reference_gap=1.0), np.random.default_rng(seed))
        blank = ~np.isfinite(out.image)
        ys, xs = np.nonzero(blank)
        assert blank.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)  # one rectangle
        assert min(np.ptp(ys), np.ptp(xs)) + 1 >= 30
        assert reference_sources(out) is stars and np.isfinite(ref.image).all()  # the input is kept
        fractions.append(blank.mean())
    assert 0 < min(fractions) and max(fractions) < 1
