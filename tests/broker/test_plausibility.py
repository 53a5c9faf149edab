"""Physical plausibility: the absurd frames of issue 27 are refused by name, real frames pass."""

from __future__ import annotations

import glob
import warnings

import numpy as np
import pytest

from broker.config import load_config
from broker.errors import ConfigError, ImplausibleHeader, ImplausiblePixels, MissingWCS
from broker.frame import Frame, meta_from_header
from broker.ingest import IngestConfig, ingest, validate
from broker.plausibility import PlausibilityConfig, check_header, mjd_now, pixel_problem
from tests.conftest import shared_data
from tests.helpers import star_frame

NOW = 60800.0  # a fixed present (MJD) for the time window


@pytest.mark.parametrize(("cards", "named"), [
    ({"GAIN": -1.5}, "GAIN=-1.5 e-/ADU outside [0.0001, 1000]"),
    ({"GAIN": 1e-300}, "GAIN=1e-300 e-/ADU outside [0.0001, 1000]"),
    ({"MJD-OBS": -1e6}, "MJD-OBS=-1e+06 outside [47892, now + 1 d = 60801.0]"),
    ({"MJD-OBS": 9.9e7}, "MJD-OBS=9.9e+07 outside"),
    ({"MJD-OBS": NOW + 2}, "MJD-OBS=60802 outside"),  # the day after tomorrow
    ({"EXPTIME": 1e300}, "EXPTIME=1e+300 s outside (0, 100000]"),
    ({"RDNOISE": -3.0}, "RDNOISE=-3 e- outside [0, 1000]"),
    ({"SATURATE": -1.0}, "SATURATE=-1 ADU outside (0, 1e+10]"),
    ({"MAGZP": 99.0}, "MAGZP=99.0 mag outside [0, 50]"),
])
def test_absurd_header_values_are_implausible(cards, named):
    """Each gave alerts before (GAIN -1.5: 2.6x the alerts; MJD -1e6 rewrote first_mjd in the history)."""
    frame = star_frame(**cards)
    with pytest.raises(ImplausibleHeader, match=named.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")
                       .replace("[", r"\[").replace("]", r"\]")) as err:
        validate(frame, now_mjd=NOW)
    assert err.value.reason == "implausible_header"


def test_every_bad_value_is_named_at_once_and_the_bounds_are_settings(tmp_path):
    frame = star_frame(GAIN=0.0, EXPTIME=2e5)
    with pytest.raises(ImplausibleHeader, match="EXPTIME=200000 s .*; GAIN=0 e-/ADU"):
        check_header(frame.meta, now_mjd=NOW)
    (tmp_path / "p.toml").write_text("[ingest.plausibility]\nexptime_max = 3e5\ngain_max = 10.0\nmjd_min = 0.0\n")
    cfg = load_config(tmp_path / "p.toml").ingest.plausibility
    assert cfg == PlausibilityConfig(exptime_max=3e5, gain_max=10.0, mjd_min=0.0)
    check_header(star_frame(EXPTIME=2e5, **{"MJD-OBS": 10.0}).meta, cfg, now_mjd=NOW)  # allowed now
    with pytest.raises(ImplausibleHeader, match="GAIN=20"):
        check_header(star_frame(GAIN=20.0).meta, cfg, now_mjd=NOW)
    assert abs(mjd_now() - (60000.0 + (np.datetime64("now", "s") - np.datetime64("2023-02-25T00:00:00"))
                            / np.timedelta64(1, "D"))) < 1e-3  # MJD 60000 = 2023-02-25


@pytest.mark.parametrize(("pixels", "named"), [
    (lambda d: np.zeros_like(d), r"all finite pixels are 0 ADU \(a blank readout\)"),
    (lambda d: np.full_like(d, 812.0), r"all finite pixels are 812 ADU \(a constant image\)"),
    (lambda d: (d > np.median(d)).astype(np.float32), "binary: only the values 0, 1"),
    (lambda d: np.where(np.arange(d.size).reshape(d.shape) % 97 == 0, d, 0.0).astype(np.float32),
     r"99\.\d% of the unsaturated pixels are 0 ADU"),
])
def test_blank_constant_and_binary_frames_are_implausible(pixels, named):
    """An all-zero frame on a field with a reference gave 500 alerts; a 0/1 image went into a reference."""
    good = star_frame()
    frame = Frame(good.meta, pixels(good.data), good.header)
    with pytest.raises(ImplausiblePixels, match=named) as err:
        ingest(frame)
    assert err.value.reason == "implausible_pixels"


def test_quiet_and_saturated_frames_are_plausible():
    """Integer pixels with 0.3 ADU of noise (~90 % at one value) and a frame 80 % saturated are real exposures."""
    rng = np.random.default_rng(1)
    assert pixel_problem(np.round(rng.normal(100.0, 0.3, (512, 512))).astype(np.float32)) is None
    data = np.where(rng.uniform(size=(256, 256)) < 0.8, 60000.0, rng.normal(500, 20, (256, 256))).astype(np.float32)
    assert pixel_problem(data, saturation=60000.0) is None
    assert pixel_problem(np.full((64, 64), np.nan)) is None  # all NaN: BadPixelFraction's to name


def test_a_wcs_that_maps_pixels_off_the_sky_is_refused():
    """An orthographic (SIN) projection at 1 deg/px: the corners of 256 px lie off the sphere (NaN RA/Dec)."""
    frame = star_frame(CTYPE1="RA---SIN", CTYPE2="DEC--SIN", CDELT1=-1.0, CDELT2=1.0)
    with pytest.raises(MissingWCS, match=r"maps pixel \(0, 0\) to RA, Dec = \(nan, nan\)"):
        validate(frame)
    with pytest.raises(ImplausibleHeader, match=r"pixel scale 3.6e-27 arcsec/px outside \[0.01, 3600\]"):
        validate(star_frame(CDELT1=-1e-30, CDELT2=1e-30))


@pytest.mark.parametrize(("cards", "span"), [
    ({"CRPIX1": 1e300}, "at 0 arcsec/px"),  # every pixel on one position
    ({"CRVAL1": 1e300}, "at 0 arcsec/px"),  # every pixel at RA 1e300
    ({"CRPIX2": -1e8}, "at 0 arcsec/px"),  # the frame squeezed onto the pole
    ({"CRPIX1": 1e6}, "at 0.0408 arcsec/px"),  # the reference pixel 280 deg away
])
def test_a_wcs_whose_scale_across_the_frame_is_not_its_pixel_scale_is_refused(cards, span):
    """Each was accepted: the pixel scale was read at the reference pixel only (1 arcsec/px for all four)."""
    with pytest.raises(ImplausibleHeader, match=f"maps the frame {span}, not within a factor 4 of its pixel scale 1"):
        validate(star_frame(**cards), now_mjd=NOW)


def test_a_wide_field_wcs_keeps_its_frames():
    """A TAN projection 60 deg wide (843 arcsec/px over 256 px) is 10 % smaller at its edges: accepted."""
    validate(star_frame(CDELT1=-0.234, CDELT2=0.234), now_mjd=NOW)


def test_real_frames_are_plausible():
    """Real DECam and LCO 0.4 m frames (../shared/data) pass every check, and compress far less than the limit."""
    from astropy.io import fits

    files = sorted(glob.glob(str(shared_data("image_pairs", "sfft_decam_i", "input_data") / "*.mini.fits")))
    files += sorted(glob.glob(str(shared_data("small_telescopes", "pds110") / "*.fits.fz")))
    assert len(files) >= 10
    for path in files:
        with warnings.catch_warnings(), fits.open(path) as hdul:
            warnings.simplefilter("ignore")  # non-standard cards of real headers
            hdu = next(h for h in hdul if h.is_image and len(h.shape) == 2)
            header = hdu.header.copy()
            for card, value in (("TELESCOP", "real"), ("FIELD", "real"), ("FILTER", "i")):
                header.setdefault(card, value)
            frame = Frame(meta_from_header(header), hdu.data.astype(np.float32), header)
            ratio = np.prod(hdu.shape) * abs(hdu.header["BITPIX"]) / 8 / sum(h.filebytes() for h in hdul)
        assert ingest(frame).flags == (), path
        assert ratio < IngestConfig().max_expansion / 10, path


def test_a_pixel_sample_too_small_to_judge_a_frame_is_a_config_error():
    """``sample_pixels = 0`` loaded, sampled one pixel and refused every frame as "a constant image"."""
    for n in (0, 999):
        with pytest.raises(ConfigError, match="sample_pixels must be 1000 or more"):
            PlausibilityConfig(sample_pixels=n)
    assert pixel_problem(star_frame().data, config=PlausibilityConfig(sample_pixels=1000)) is None
