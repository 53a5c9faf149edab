"""Header normalisation: real conventions -> canonical cards, and hostile headers."""

import numpy as np
import pytest
from astropy.io import fits

from broker.errors import MissingMetadata
from broker.headers import (
    MAPPING,
    canonical_band,
    grid_field,
    normalise_header,
    parse_iso_utc,
    pixel_scale_hint,
    pointing_hint,
    rename_grid_field,
)
from broker.telescopes import TelescopeProfile


def _amateur(**cards) -> fits.Header:
    header = fits.Header()
    base = {"TELESCOP": "S50_1d3fe189", "INSTRUME": "Seestar S50", "OBJECT": "M 94", "FILTER": "IRCUT",
            "DATE-OBS": "2025-03-27T01:20:32.955", "EXPOSURE": 10.0, "GAIN": 80, "RA": 193.04166,
            "DEC": 40.970556, "XPIXSZ": 2.9, "FOCALLEN": 250, "BITPIX": 16, "BZERO": 32768}
    base.update(cards)
    for key, value in base.items():
        if value is not None:
            header[key] = value
    return header


def test_an_amateur_header_gets_every_canonical_card():
    out = normalise_header(_amateur(), (1080, 1920))
    assert out["TELESCOP"] == "S50_1d3fe189" and out["ORIGTEL"] == "S50_1d3fe189"
    assert out["FILTER"] == "clear" and out["FILTRAW"] == "IRCUT"
    assert out["EXPTIME"] == 10.0
    assert out["MJD-OBS"] == pytest.approx(60761.05593698, abs=1e-8)
    assert out["FIELD"] == grid_field(193.04166, 40.970556, 0.5) and out["FIELDSRC"] == "POINTING"
    assert out["SATURATE"] == 65535.0 and out["GAIN"] == 80  # the header's (wrong) gain without a profile
    assert normalise_header(out, (1080, 1920)) is out  # idempotent


def test_a_profile_overrides_the_header_and_maps_filters():
    profile = TelescopeProfile("seestar", match=("Seestar S50",), gain=0.5, read_noise=1.6,
                               filters={"IRCUT": "lum"}, time_reference="mid", field_grid_deg=1.0)
    out = normalise_header(_amateur(), (1080, 1920), (profile,))
    assert out["TELESCOP"] == "seestar" and out["GAIN"] == 0.5 and out["RDNOISE"] == 1.6
    assert out["FILTER"] == "lum"
    assert out["MJD-OBS"] == pytest.approx(60761.05593698 - 5.0 / 86400.0, abs=1e-8)  # mid -> start
    assert out["FIELD"].startswith("g1-")


def test_local_time_with_a_zone_offset_becomes_utc():
    assert parse_iso_utc("2017-12-19T18:33:43.317-0700") == pytest.approx(parse_iso_utc("2017-12-20T01:33:43.317"))
    assert parse_iso_utc("2017-12-20T01:33:43Z") == pytest.approx(58107.06508, abs=1e-5)
    out = normalise_header(_amateur(**{"DATE-OBS": "2013-03-11", "TIME-OBS": "03:35:20"}), (10, 10))
    assert out["MJD-OBS"] == pytest.approx(56362.14953704, abs=1e-7)


@pytest.mark.parametrize("cards, source", [({"DATE-OBS": None, "JD": 2456362.649537037}, "JD"),
                                           ({"DATE-OBS": None, "MJD-OBS": 58353.3677}, "MJD-OBS")])
def test_other_time_cards(cards, source):
    out = normalise_header(_amateur(**cards), (10, 10))
    assert out["TIMESRC"] == source and 56000 < out["MJD-OBS"] < 59000


@pytest.mark.parametrize("raw, band", [("rp", "r"), ("i DECam SDSS c0003 7835.0 1470.0", "i"), ("ZTF_g", "g"),
                                       ("R", "R"), ("r", "r"), ("Clear", "clear"), ("None", "clear"),
                                       ("H-alpha", "Ha"), ("Wide/Odd filter!", "Wide_Odd_filter")])
def test_vendor_filter_names(raw, band):
    assert canonical_band(raw) == band


@pytest.mark.parametrize("cards, match", [
    ({"TELESCOP": None, "INSTRUME": None}, "TELESCOP"),
    ({"EXPOSURE": None}, "EXPTIME"),
    ({"DATE-OBS": "19/12/17"}, "ISO"),
    ({"DATE-OBS": "2017-02-30T00:00:00"}, "valid date"),
    ({"DATE-OBS": None}, "time stamp"),
    ({"RA": None, "DEC": None, "OBJECT": None}, "field identity"),
])
def test_hostile_headers_get_a_clear_reason(cards, match):
    with pytest.raises(MissingMetadata, match=match):
        normalise_header(_amateur(**cards), (10, 10))


def test_hints_from_sexagesimal_and_degrees():
    h = _amateur(RA=None, DEC=None, OBJCTRA="09 02 22", OBJCTDEC="-49 49 09")
    ra, dec = pointing_hint(h)
    assert ra == pytest.approx(135.591667) and dec == pytest.approx(-49.819167)
    assert pointing_hint(_amateur(RA="garbage", DEC=3.0)) is None
    assert pointing_hint(_amateur(RA=400.0, DEC=3.0)) is None
    for only_separators in ("'", "::", " h m s"):  # DEC = "'" raised IndexError (frame fuzzing, seed 1)
        assert pointing_hint(_amateur(RA=10.0, DEC=only_separators)) is None
    assert pixel_scale_hint(_amateur()) == pytest.approx(2.3927, abs=1e-3)
    assert pixel_scale_hint(_amateur(IM_SCALE=5.21)) == 5.21


def test_pixel_scale_hints_no_camera_can_have_are_ignored():
    """An infinite or zero scale went to the plate solver as ``--scale-low inf`` or ``0.0000``."""
    assert pixel_scale_hint(_amateur(XPIXSZ=1e300, FOCALLEN=1e-300)) is None
    assert pixel_scale_hint(_amateur(XPIXSZ=1e-300, FOCALLEN=1e300)) is None
    profile = TelescopeProfile("cam", match=("cam",), pixel_scale_arcsec=2.0)
    for binning in (-3.0, 0.0, 1e300):
        assert pixel_scale_hint(_amateur(XPIXSZ=None, FOCALLEN=None, XBINNING=binning), profile) == 2.0
    assert pixel_scale_hint(_amateur(XPIXSZ=None, FOCALLEN=None, XBINNING=2), profile) == 4.0


def test_grid_cells_are_stable_and_renamed_after_solving():
    assert grid_field(193.04166, 40.970556, 0.5) == grid_field(192.995835, 40.978611, 0.5)
    assert grid_field(10.0, -89.99, 0.5) != grid_field(10.0, 89.99, 0.5)
    rng = np.random.default_rng(1)
    for ra, dec in zip(rng.uniform(0, 360, 200), rng.uniform(-90, 90, 200), strict=True):
        assert grid_field(ra, dec, 0.5).startswith("g0.5-")
    out = normalise_header(_amateur(), (10, 10))
    assert rename_grid_field(out, (100.0, 10.0))["FIELDSRC"] == "SOLVED"
    fixed = normalise_header(_amateur(FIELD="M94"), (10, 10))
    assert rename_grid_field(fixed, (100.0, 10.0))["FIELD"] == "M94"


def test_the_mapping_table_names_every_canonical_card():
    assert [row.card for row in MAPPING] == ["TELESCOP", "FIELD", "FILTER", "MJD-OBS", "EXPTIME", "GAIN",
                                             "RDNOISE", "SATURATE"]


def test_the_documented_mapping_table_is_the_code_s():
    from pathlib import Path

    from broker.headers import mapping_table_markdown

    text = (Path(__file__).parents[2] / "docs" / "telescopes.md").read_text()
    block = text.split("<!-- header-mapping -->\n")[1].split("\n<!-- /header-mapping -->")[0]
    assert block == mapping_table_markdown()


@pytest.mark.parametrize("cards, error, match", [
    ({"EXPOSURE": -5.0}, "MissingMetadata", "EXPTIME=-5"),
    ({"DATE-OBS": "1850-01-01T00:00:00"}, "ImplausibleHeader", "MJD-OBS"),
    ({"DATE-OBS": "2999-01-01T00:00:00"}, "ImplausibleHeader", "MJD-OBS"),
    ({"BAYERPAT": "CMYG"}, "BadShape", "BAYERPAT"),
])
def test_absurd_vendor_values_are_refused_when_decoded(cards, error, match):
    from broker import errors
    from broker.frame import decode_fits
    from broker.ingest import validate
    from broker.simulate.amateur import amateur_fits

    rng = np.random.default_rng(5)
    data = rng.poisson(400.0, size=(128, 128)).astype(np.float32)
    header = _amateur(**cards)
    with pytest.raises(getattr(errors, error), match=match):
        validate(decode_fits(amateur_fits(data, header), require_wcs=False), require_wcs=False)


def test_a_wrong_pointing_hint_only_moves_the_provisional_field():
    from broker.frame import decode_fits
    from broker.simulate.amateur import amateur_fits

    data = np.random.default_rng(6).poisson(400.0, size=(128, 128)).astype(np.float32)
    frame = decode_fits(amateur_fits(data, _amateur(RA=400.0, DEC=95.0, BAYERPAT=None)), require_wcs=False)
    assert frame.meta.field == "obj-m_94" and frame.header["FIELDSRC"] == "OBJECT"


@pytest.mark.parametrize("card, value", [("IMAGETYP", "Dark Frame"), ("IMAGETYP", "FLAT"), ("IMAGETYP", "Bias"),
                                         ("OBSTYPE", "SKYFLAT"), ("OBSTYPE", "zero"), ("IMGTYPE", "dome flat"),
                                         ("FRAMETYP", "DarkFlat")])
def test_calibration_frames_are_refused_by_their_type(card, value):
    from broker.errors import NotScience
    from broker.frame import decode_fits
    from broker.simulate.amateur import amateur_fits, amateur_frame

    data, head = amateur_frame(seed=1)
    head[card] = value
    with pytest.raises(NotScience, match=f"{card} = '{value}'"):
        decode_fits(amateur_fits(data, head), require_wcs=False)


@pytest.mark.parametrize("card, value", [("IMAGETYP", "Light Frame"), ("IMAGETYP", "LIGHT"), ("OBSTYPE", "EXPOSE"),
                                         ("OBSTYPE", "object"), ("IMGTYPE", "science"), ("OBSTYPE", "STANDARD"),
                                         ("IMAGETYP", "something else"), ("IMAGETYP", 3)])
def test_light_and_unknown_frame_types_pass(card, value):
    from broker.frame import decode_fits
    from broker.simulate.amateur import amateur_fits, amateur_frame

    data, head = amateur_frame(seed=1)
    head[card] = value
    assert decode_fits(amateur_fits(data, head), require_wcs=False).data.ndim == 2


def test_a_galactic_wcs_gives_no_field_centre_nor_pointing_hint():
    """Its CRVAL1/2 (l, b) were taken for RA, Dec: the field and the solver's hint were 40 deg off."""
    from broker.headers import normalise_header, pointing_hint, wcs_centre
    from tests.helpers import header

    galactic = header(CTYPE1="GLON-TAN", CTYPE2="GLAT-TAN", OBJECT="M 94")
    del galactic["FIELD"]
    assert wcs_centre(galactic, (256, 256)) is None and pointing_hint(galactic) is None
    assert normalise_header(galactic, (256, 256))["FIELDSRC"] == "OBJECT"
    assert pointing_hint(header()) == (150.0, 2.0)


def test_egain_is_the_gain_and_a_gain_setting_or_zero_is_not():
    """N.I.N.A. writes the camera's gain setting in GAIN (100) and e-/ADU in EGAIN: the setting was taken as 100 e-/ADU.

    And GAIN = 0 (N.I.N.A. with a driver that does not say) was refused implausible_header.
    """
    from astropy.io import fits

    from broker.headers import normalise_header

    nina = fits.Header({"INSTRUME": "ZWO ASI183MM Pro", "EXPOSURE": 10.0, "DATE-OBS": "2025-04-03T01:12:00.288",
                        "OBJECT": "M 94", "GAIN": 100, "OFFSET": 50, "EGAIN": 0.25})
    assert normalise_header(nina, (64, 64))["GAIN"] == 0.25
    sbig = nina.copy()
    sbig["GAIN"] = 0
    del sbig["EGAIN"]
    assert "GAIN" not in normalise_header(sbig, (64, 64))
    survey = nina.copy()
    del survey["EGAIN"]
    survey["GAIN"] = 4.2
    assert normalise_header(survey, (64, 64))["GAIN"] == 4.2


@pytest.mark.parametrize("cards, mjd, source", [
    ({"DATE-OBS": "2013-03-11", "JD": 2456362.649537037}, 56362.149537037, "JD"),  # MaxIm DL: no midnight
    ({"DATE-OBS": "11/03/13", "JD": 2456362.649537037}, 56362.149537037, "JD"),
    ({"DATE-OBS": "2013-03-11 03:35:20", "TIME-OBS": "03:35:20"}, 56362.14953704, "DATE-OBS"),
])
def test_a_date_obs_without_a_time_of_day_gives_way_to_the_next_time_card(cards, mjd, source):
    """A date alone became midnight UTC (3.6 h off here), and a non-ISO one was refused though JD gave the time."""
    out = normalise_header(_amateur(**cards), (10, 10))
    assert out["TIMESRC"] == source and out["MJD-OBS"] == pytest.approx(mjd, abs=1e-7)


def test_a_date_without_a_time_of_day_and_nothing_else_is_refused():
    with pytest.raises(MissingMetadata, match=r"DATE-OBS '2013-03-11' has no time of day"):
        normalise_header(_amateur(**{"DATE-OBS": "2013-03-11"}), (10, 10))


@pytest.mark.parametrize("timesys, seconds", [("UTC", 0.0), ("UT", 0.0), ("TT", -69.184), ("TAI", -37.0),
                                              ("GPS", -18.0)])
def test_times_in_another_time_scale_are_converted_to_utc(timesys, seconds):
    """TIMESYS was ignored: a DATE-OBS or MJD-OBS in TT was read as UTC, 69 s late."""
    utc = normalise_header(_amateur(), (10, 10))["MJD-OBS"]
    for cards in ({"TIMESYS": timesys}, {"TIMESYS": timesys, "DATE-OBS": None, "MJD-OBS": utc}):
        out = normalise_header(_amateur(**cards), (10, 10))
        assert (out["MJD-OBS"] - utc) * 86400 == pytest.approx(seconds, abs=1e-3)
    zoned = normalise_header(_amateur(TIMESYS="TT", **{"DATE-OBS": "2025-03-27T01:20:32.955Z"}), (10, 10))
    assert zoned["MJD-OBS"] == pytest.approx(utc, abs=1e-9)  # the zone says UTC
    with pytest.raises(MissingMetadata, match="TIMESYS = 'LOCAL'"):
        normalise_header(_amateur(TIMESYS="LOCAL"), (10, 10))


@pytest.mark.parametrize("cards, level", [({"BITPIX": 8, "BZERO": None}, 255.0), ({"BITPIX": 8, "BZERO": -128}, 127.0),
                                          ({}, 65535.0), ({"BITPIX": -32, "BZERO": None}, None)])
def test_an_integer_image_saturates_at_the_top_of_its_range(cards, level):
    """An 8-bit frame's saturation was unknown: its clipped stars entered the zero point (1.2 mag off)."""
    assert normalise_header(_amateur(**cards), (10, 10)).get("SATURATE") == level


@pytest.mark.parametrize("raw, band", [("Sloan r'", "r"), ("SDSS g", "g"), ("sdss_i", "i"), ("Sloan z'", "z"),
                                       ("Johnson V", "V"), ("Bessell R", "R"), ("Cousins Ic", "I"),
                                       ("Sloan B", "Sloan_B"), ("Cousins V", "Cousins_V")])
def test_filter_wheel_names_with_a_system_and_a_blank(raw, band):
    """N.I.N.A. and MaxIm filter wheels are named "Sloan r'" or "Johnson V": they keyed references of their own."""
    assert canonical_band(raw) == band


@pytest.mark.parametrize("cards", [{"MJD-OBS": 0.0}, {"MJD-OBS": 0.0, "JD": 0}, {"JD": 0.0}])
def test_a_time_card_of_zero_is_a_placeholder_not_the_exposure_start(cards):
    """MJD-OBS = 0 beside a good DATE-OBS became the start (1858) and the frame was refused implausible_header."""
    out = normalise_header(_amateur(**cards), (10, 10))
    assert out["TIMESRC"] == "DATE-OBS" and out["MJD-OBS"] == pytest.approx(60761.05593698, abs=1e-7)
