"""Bayer frames: 2x2 superpixel luminance, saturation and the header."""

import numpy as np
import pytest
from astropy.io import fits

from broker.bayer import bayer_pattern, superpixel_luminance
from broker.errors import BadShape


def test_superpixels_sum_the_mosaic_and_keep_the_noise_model():
    rng = np.random.default_rng(3)
    raw = rng.poisson(100.0, size=(101, 64)).astype(np.float32)
    raw[10, 10] = 65535.0
    header = fits.Header({"BAYERPAT": "GRBG", "RDNOISE": 1.5, "SATURATE": 65535.0, "XPIXSZ": 2.9,
                          "CTYPE1": "RA---TAN", "CRPIX1": 3.0})
    lum, out = superpixel_luminance(raw, header, 65535.0)
    assert lum.shape == (50, 32)
    assert lum[0, 0] == raw[0:2, 0:2].sum()
    assert lum[5, 5] == 4 * 65535.0 and out["SATURATE"] == 4 * 65535.0
    assert out["RDNOISE"] == 3.0 and out["XPIXSZ"] == 5.8 and out["FILTER"] == "lum"
    assert "CTYPE1" not in out and "BAYERPAT" not in out and bayer_pattern(out) is None
    # variance of a sum of four Poisson(100) pixels is 400: the gain is unchanged
    assert np.var(lum[lum < 1000]) == pytest.approx(400.0, rel=0.15)


@pytest.mark.parametrize("value", ["XYZW", 2, "RGB"])
def test_unknown_patterns_are_refused(value):
    with pytest.raises(BadShape, match="BAYERPAT"):
        bayer_pattern(fits.Header({"BAYERPAT": value}))


def test_monochrome_and_tiny_frames():
    assert bayer_pattern(fits.Header({"BAYERPAT": "NONE"})) is None
    assert bayer_pattern(fits.Header()) is None
    with pytest.raises(BadShape, match="2x2"):
        superpixel_luminance(np.zeros((1, 5), np.float32), fits.Header({"BAYERPAT": "RGGB"}), np.inf)
