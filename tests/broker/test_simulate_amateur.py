"""The amateur simulator mode: a raw Bayer frame of the real sky, solved and calibrated end to end."""

import shutil

import numpy as np
import pytest

from broker.astrometry import AstrometryConfig
from broker.calibrate import CalibrationConfig, calibrate
from broker.catalog import index_files
from broker.frame import decode_fits
from broker.ingest import ingest, validate
from broker.simulate.amateur import AmateurConfig, amateur_fits, amateur_frame, true_wcs
from broker.telescopes import TelescopeProfile

needs_tycho = pytest.mark.skipif(not index_files("/usr/share/astrometry"),
                                 reason="Tycho-2 index files not installed (Debian astrometry-data-tycho2)")
needs_solver = pytest.mark.skipif(shutil.which("solve-field") is None,
                                  reason="solve-field not installed (Debian astrometry.net)")
PROFILE = TelescopeProfile("seestar-sim", match=("Seestar S50 (simulated)",), gain=1.0, read_noise=1.5,
                           zeropoint_1s=23.0 - 2.5 * np.log10(10.0))
BOUNDED = CalibrationConfig(astrometry=AstrometryConfig(blind_retry=False, cpulimit_s=10))


@needs_tycho
def test_the_frame_is_raw_vendor_style_with_real_stars():
    data, header = amateur_frame(AmateurConfig(), seed=1)
    assert data.shape == (1920, 1080) and "CTYPE1" not in header and header["BAYERPAT"] == "GRBG"
    assert data.max() > 1000 and np.all(data == np.round(data))
    assert "EXPOSURE" in header and "EXPTIME" not in header and header["DATE-OBS"].endswith("-0700")


@needs_tycho
@needs_solver
def test_a_simulated_amateur_frame_is_solved_and_calibrated():
    config = AmateurConfig()
    payload = amateur_fits(*amateur_frame(config, seed=2))
    frame = decode_fits(payload, profiles=(PROFILE,), require_wcs=False)
    assert frame.meta.filter == "lum" and frame.shape == (960, 540) and frame.meta.gain == 1.0
    validate(frame, require_wcs=False)
    out = calibrate(frame, BOUNDED, (PROFILE,))
    assert out.header["WCSSTAT"] == "solved" and out.header["WCSNMAT"] >= 5
    # the solved WCS puts the true centre where the hidden WCS does (binned pixels: / 2)
    truth = true_wcs(config)
    ra, dec = truth.pixel_to_world_values(539.5, 959.5)
    x, y = out.wcs.world_to_pixel_values(ra, dec)
    assert abs(x - 269.75) < 0.5 and abs(y - 479.75) < 0.5
    assert out.meta.magzp == pytest.approx(config.magzp_luminance, abs=max(0.1, 3 * out.meta.magzp_err))
    assert out.meta.field.startswith("g0.5-") and out.header["FIELDSRC"] == "SOLVED"
    assert "zp_offset" not in ingest(out).flags


@needs_tycho
@needs_solver
def test_clouds_flag_the_zero_point():
    payload = amateur_fits(*amateur_frame(AmateurConfig(magzp_luminance=21.0), seed=3))
    frame = decode_fits(payload, profiles=(PROFILE,), require_wcs=False)
    out = calibrate(frame, BOUNDED, (PROFILE,))
    assert out.header["ZPSTAT"] == "offset" and "zp_offset" in ingest(out).flags
