"""Whether two frames hold one exposure (``broker.exposure``), on seeded synthetic frames."""

from __future__ import annotations

import numpy as np
import pytest

from broker.exposure import Fingerprint, pixel_noise, same_exposure
from tests.broker.conftest import make_frame, make_sky

SHAPE = (256, 256)


@pytest.fixture(scope="module")
def frames():
    sky = make_sky(3, SHAPE, 60)
    return make_frame(4, SHAPE, sky).data, make_frame(5, SHAPE, sky).data


def test_pixel_noise_is_the_noise_under_a_gradient():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512]
    data = 1000.0 + 3.0 * xx + 2.0 * yy + rng.normal(0, 10.0, (512, 512))
    assert pixel_noise(data) == pytest.approx(10.0, rel=0.05)
    assert np.isnan(pixel_noise(np.full((8, 8), np.nan)))


@pytest.mark.parametrize("kind", ["exact", "quantised", "offset", "scaled", "nan_half"])
def test_copies_of_an_exposure_are_one_exposure(frames, kind):
    a, _ = frames
    noise = pixel_noise(a)
    q = noise / 16  # fpack's default quantisation
    b = {"exact": a.copy(), "quantised": np.round(a / q) * q, "offset": a + 100.0, "scaled": 1.3 * a - 40.0,
         "nan_half": np.where(np.arange(SHAPE[1]) < 128, np.nan, a)}[kind]
    assert same_exposure(a, b, noise)
    assert Fingerprint.of(a).matches(b)


def test_two_exposures_of_one_field_are_not_one(frames):
    a, b = frames
    assert not same_exposure(a, b, pixel_noise(a))
    assert not Fingerprint.of(a).matches(b)
    # nor are a frame and a cut of it, nor a constant frame and itself (no noise: nothing to recognise)
    assert not Fingerprint.of(a).matches(a[:128])
    flat = np.full(SHAPE, 7.0, np.float32)
    assert not same_exposure(flat, flat, pixel_noise(flat))


def test_a_fingerprint_is_small(frames):
    fp = Fingerprint.of(frames[0])
    assert fp.pixels.size <= 4096 and fp.step == 4 and fp.shape == SHAPE
    big = Fingerprint.of(np.zeros((2048, 2048), np.float32))
    assert big.pixels.size <= 4096 and big.step == 32
