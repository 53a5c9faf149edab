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
    """Every card read into FrameMeta (but FRAMEID, the broker's own) has its row: MAGZP and MAGZPERR had none."""
    from broker.frame import _CARDS

    assert [row.card for row in MAPPING] == [card for card, _, _, _ in _CARDS]


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


# Survey pipelines' headers, card by card as the pipeline writes them (keywords, units, types). Values are
# of the kind each pipeline writes; the sources of each convention are named above each header.

#: A ZTF science image (IPAC, ``ztf_*_sciimg.fits``): the keywords IPAC writes and ztfimg
#: (MickaelRigault/ztfimg) and Ampel's ZTF forced-photometry reader take from it (``MAGZP``, ``MAGZPUNC``,
#: ``MAGZPRMS``, ``CLRCOEFF``, ``GAIN``, ``READNOI``, ``SEEING``, ``OBSMJD``, ``FILTERID``, ``INFOBITS``);
#: ``ORIGIN``/``INSTRUME``/``RA---TPV`` as VaST (kirxkirx/vast) recognises a ZTF image. ``MAGZP`` is of
#: 1 DN in the exposure (IPAC: mag = MAGZP - 2.5 log10(flux [DN])); the pixels are DN.
ZTF_SCIIMG = """\
ORIGIN  = 'Zwicky Transient Facility' / Data producer
INSTRUME= 'ZTF/MOSAIC'         / Instrument name
OBJECT  = 'ZTF_survey'
DATE-OBS= '2019-06-11T06:20:16.000' / UTC shutter time YYYY-MM-DDTHH:MM:SS.SSS
OBSJD   =     2458645.76407407 / [day] Julian day at start of exposure
OBSMJD  =      58645.26407407 / [day] MJD at start of exposure
EXPTIME =                  30. / [s] Requested exposure time
FILTERID=                    2 / Filter ID (1=g; 2=r; 3=i)
FILTER  = 'ZTF_r   '           / Filter name
FIELDID =                  717 / ZTF field ID
CCDID   =                    7 / CCD number (1..16)
QID     =                    2 / Quadrant ID (1..4)
RCID    =                   25 / Readout channel ID (0..63)
GAIN    =                  5.8 / [e-/D.N.] Amplifier gain
READNOI =                  9.2 / [e-] Amplifier read noise
DARKCUR =                  0.1 / [e-/s] Dark current
SATURATE=              49120.0 / [DN] Saturation level
SEEING  =                 2.14 / [pixel] Seeing FWHM
MAGZP   =              26.2683 / [mag] Magnitude zero point
MAGZPUNC=           3.1877E-06 / [mag] Magnitude zero point uncertainty
MAGZPRMS=              0.03541 / [mag] RMS deviation of calibrators from ZP fit
CLRCOEFF=            -0.079117 / [mag] Linear color coefficient
CLRCOUNC=           5.3461E-06 / [mag] Color coefficient uncertainty
INFOBITS=                    0 / Info bit flags
CTYPE1  = 'RA---TPV'
CTYPE2  = 'DEC--TPV'
CRVAL1  =           250.211349
CRVAL2  =            46.455201
CRPIX1  =                 32.5
CRPIX2  =                 32.5
CD1_1   =      -0.000281
CD1_2   =               0.0
CD2_1   =               0.0
CD2_2   =       0.000281
"""

#: An LCO BANZAI reduced frame (``*-e91.fits``): ``L1ZP``/``L1ZPERR`` as ``banzai/photometry.py`` writes them
#: (comments verbatim), a zero point of 1 count/s (``banzai/utils/photometry_utils.py`` ``to_magnitude``:
#: ``-2.5 log10(flux / exptime) + zeropoint``); ``L1FWHM = 'NaN'`` is the string BANZAI writes when no source
#: gave a FWHM; ``RA`` sexagesimal hours, ``FILTER = 'rp'``, ``MJD-OBS`` (NEOexchange reads the same cards).
#: The other cards' comments are those of the BANZAI frames of ``../shared/data/small_telescopes/pds110`` (2017, before
#: BANZAI measured zero points: no ``L1ZP``).
BANZAI_E91 = """\
ORIGIN  = 'LCOGT   '           / Organization responsible for the data
SITEID  = 'lsc     '           / ID code of the Observatory site
TELESCOP= '1m0-05  '           / The Name of the Telescope
INSTRUME= 'fa15    '           / Instrument used
OBSTYPE = 'EXPOSE  '           / Observation type
OBJECT  = 'SN 2023ixf'         / Object name
FILTER  = 'rp      '           / Filter used
EXPTIME =              120.000 / [s] Exposure length
DATE-OBS= '2023-05-25T01:02:03.456' / [UTC] Start date and time of the observati
MJD-OBS =        60089.0430955 / [UTC days] Start date/time (Modified Julian Dat
RA      = '14:03:38.580'       / [HH:MM:SS.sss] RA where telescope is pointing
DEC     = '+54:18:42.02'       / [sDD:MM:SS.ss] Dec where telescope is pointing
GAIN    =                1.000 / [electrons/count] Pixel gain
RDNOISE =                7.800 / [electrons/pixel] Read noise
SATURATE=            127500.00 / [ADU] Saturation level used
PIXSCALE=                0.389 / [arcsec/pixel] Nominal pixel scale on sky
L1FWHM  = 'NaN     '           / [arcsec] Frame FWHM in arcsec
L1ZP    =               23.456 / Instrumental zeropoint [mag]
L1ZPERR =                0.012 / Error on Instrumental zeropoint [mag]
L1COLORU= 'r-i     '           / Color used for calibration
L1COLOR =               -0.021 / Color coefficient [mag]
"""

#: A DECam Community Pipeline CCD (``c4d_*_ooi_*.fits.fz`` extension): per-amplifier ``GAINA``/``GAINB``
#: [electrons/adu], ``RDNOISEA``/``RDNOISEB`` [electrons], ``SATURATA``/``SATURATB`` [adu] with these comments,
#: as quoted from a CP header in NOIRLab Astro Data Lab's help forum ("Which amplifier's gain value do I use
#: for DECam photometry", whose answer, like legacyzpts' ``gain = average of GAINA, GAINB``, takes their mean).
#: The DECam CCDs of ``../shared/data/image_pairs/sfft_decam_i`` carry the same cards and a ``GAIN`` that is
#: their mean (4.1505 = (4.006 + 4.295) / 2), and a ``SATURATE`` that is amplifier A's (46251, B's is 39364).
DECAM_CP = """\
TELESCOP= 'CTIO 4.0-m telescope' / Telescope name
INSTRUME= 'DECam   '           / Instrument used to obtain these data
OBSTYPE = 'object  '           / Observation type
OBJECT  = 'DES supernova hex SN-X1 tiling 20' / Object name
FILTER  = 'r DECam SDSS c0002 6415.0 1480.0' / Unique filter identifier
EXPTIME =                 200. / [s] Exposure duration
MJD-OBS =       56536.31617493 / MJD of observation start
DATE-OBS= '2013-08-31T07:35:17.514075' / Date of observation start (UTC)
DETPOS  = 'S25     '           / detector position ID
CCDNUM  =                    4 / CCD number
GAINA   =                4.061 / [electrons/adu] Gain for amp A
RDNOISEA=              6.05089 / [electrons] Read noise for amp A
SATURATA=              42059.0 / [adu] Saturation for amp A
GAINB   =                4.249 / [electrons/adu] Gain for amp B
RDNOISEB=             6.080319 / [electrons] Read noise for amp B
SATURATB=              42605.0 / [adu] Saturation for amp B
"""


def _pipeline_header(text: str, **cards) -> fits.Header:
    header = fits.Header.fromstring(text, sep="\n")
    for key, value in cards.items():
        if value is None:
            header.remove(key, ignore_missing=True)
        else:
            header[key] = value
    return header


def _pipeline_fits(text: str, **cards) -> bytes:
    import io

    data = np.random.default_rng(8).normal(300.0, 10.0, size=(64, 64)).astype(np.float32)
    buf = io.BytesIO()
    fits.PrimaryHDU(data, header=_pipeline_header(text, **cards)).writeto(buf)
    return buf.getvalue()


def test_a_ztf_science_image_gives_its_zero_point_with_its_uncertainty_and_read_noise():
    """MAGZPUNC was not read: the zero-point flux ratio (MAGZP with MAGZPERR) never worked on ZTF frames."""
    from broker.fluxratio import zero_point_ratio
    from broker.frame import decode_fits

    meta = decode_fits(_pipeline_fits(ZTF_SCIIMG)).meta
    assert (meta.telescope, meta.filter, meta.exptime) == ("ZTF_MOSAIC", "r", 30.0)
    assert meta.mjd_start == pytest.approx(parse_iso_utc("2019-06-11T06:20:16"), abs=1e-9)
    assert (meta.gain, meta.read_noise, meta.saturation) == (5.8, 9.2, 49120.0)
    assert (meta.magzp, meta.magzp_err) == (26.2683, 3.1877e-06)
    later = decode_fits(_pipeline_fits(ZTF_SCIIMG, MAGZP=26.0183, MAGZPUNC=4.2e-06)).meta
    ratio = zero_point_ratio(meta, later)
    assert ratio.measured and ratio.value == pytest.approx(10 ** (-0.4 * 0.25))


def test_an_lco_banzai_zero_point_of_one_count_per_second_becomes_one_of_the_exposure():
    from broker.frame import decode_fits

    frame = decode_fits(_pipeline_fits(BANZAI_E91), require_wcs=False)
    assert (frame.meta.telescope, frame.meta.filter, frame.meta.exptime) == ("1m0-05", "r", 120.0)
    assert frame.meta.magzp == pytest.approx(23.456 + 2.5 * np.log10(120.0), abs=1e-6)  # 28.654
    assert frame.meta.magzp_err == 0.012 and frame.header["ZPSRC"] == "L1ZP/L1ZPERR+2.5log10(EXPTIME)"
    assert frame.header["L1FWHM"] == "NaN"  # BANZAI's string NaN is left alone: the broker does not read it


def test_decam_per_amplifier_gain_read_noise_and_saturation():
    """Only GAINA/GAINB: the gain was 1.0 instead of ~4.2 e-/ADU (Poisson noise 4x too large), saturation unknown."""
    out = normalise_header(_pipeline_header(DECAM_CP), (64, 64))
    assert out["GAIN"] == pytest.approx((4.061 + 4.249) / 2)
    assert out["RDNOISE"] == pytest.approx((6.05089 + 6.080319) / 2)
    assert out["SATURATE"] == 42059.0  # the lower amplifier's
    assert out["FILTER"] == "r" and out["TELESCOP"] == "CTIO_4.0-m_telescope"
    one_amp = normalise_header(_pipeline_header(DECAM_CP, GAINB=None, SATURATB="n/a"), (64, 64))
    assert "GAIN" not in one_amp and "SATURATE" not in one_amp  # half a pair is not the CCD's value


@pytest.mark.parametrize("text, cards, note", [
    (BANZAI_E91, {"L1ZP": -99.0, "L1ZPERR": -99.0}, "L1ZP = -99.0, L1ZPERR = -99.0: not a zero point"),
    (BANZAI_E91, {"L1ZP": -99.0, "L1ZPERR": 0.01}, "outside"),
    (BANZAI_E91, {"L1ZPERR": "NaN"}, "L1ZPERR = 'NaN'"),
    (ZTF_SCIIMG, {"MAGZPUNC": -1.0}, "MAGZPUNC = -1.0"),
    (ZTF_SCIIMG, {"MAGZPUNC": "n/a"}, "MAGZPUNC = 'n/a'"),
    (ZTF_SCIIMG, {"MAGZPUNC": True}, "MAGZPUNC = True"),
])
def test_unusable_pipeline_zero_points_are_not_used_and_say_why(text, cards, note):
    from broker.frame import decode_fits

    frame = decode_fits(_pipeline_fits(text, **cards), require_wcs=False)  # kept, never refused for this
    assert frame.meta.magzp_err is None and note in frame.header["ZPNOTE"]
    assert frame.meta.magzp == (26.2683 if text is ZTF_SCIIMG else None)  # a bare MAGZP stays as it was


def test_zero_point_precedence_when_conventions_meet():
    from broker.headers import zero_point_cards

    both = zero_point_cards(_pipeline_header(ZTF_SCIIMG, MAGZPERR=0.02))  # disagreeing with MAGZPUNC
    assert both["MAGZPERR"] == 0.02 and "ZPSRC" not in both
    mixed = zero_point_cards(_pipeline_header(BANZAI_E91, MAGZP=25.0, MAGZPUNC=0.03))
    assert (mixed["MAGZP"], mixed["MAGZPERR"], mixed["ZPSRC"]) == (25.0, 0.03, "MAGZP/MAGZPUNC")
    bare = _pipeline_header(ZTF_SCIIMG, MAGZPUNC=None)
    assert zero_point_cards(bare) is bare  # a nominal MAGZP without any uncertainty: nothing to write
    no_time = zero_point_cards(_pipeline_header(BANZAI_E91, EXPTIME=None))
    assert "MAGZP" not in no_time and "per second and EXPTIME = None" in no_time["ZPNOTE"]
    assert zero_point_cards(zero_point_cards(_pipeline_header(BANZAI_E91)))["MAGZP"] == pytest.approx(28.654, abs=1e-3)


#: A TESS SPOC image extension's time and exposure cards, as the SPOC writes them (the TESS header lightkurve's
#: "Target Pixel Files" tutorial prints; Kepler's are the same): ``EXPOSURE`` and ``TELAPSE`` in days (their
#: comments open with ``[d]``), ``TIMESYS = 'TDB'`` for ``TSTART``/``TSTOP`` (BTJD) beside a ``DATE-OBS`` that
#: is "TSTART as UTC calendar date".
TESS_SPOC = """\
TELESCOP= 'TESS    '           / telescope
INSTRUME= 'TESS Photometer'    / detector type
OBJECT  = 'TIC 307210830'      / string version of target id
RADESYS = 'ICRS    '           / reference frame of celestial coordinates
RA_OBJ  = 124.5332711499119100 / [deg] right ascension
DEC_OBJ = -68.3147861875501700 / [deg] declination
EQUINOX =               2000.0 / equinox of celestial coordinate system
EXPOSURE=   0.0165000000000000 / [d] time on source
TIMEREF = 'SOLARSYSTEM'        / barycentric correction applied to times
TASSIGN = 'SPACECRAFT'         / where time is assigned
TIMESYS = 'TDB     '           / time system is Barycentric Dynamical Time (TDB)
BJDREFI =              2457000 / integer part of BTJD reference date
BJDREFF =           0.00000000 / fraction of the day in BTJD reference date
TIMEUNIT= 'd       '           / time unit for TIME, TSTART and TSTOP
TELAPSE =   0.0208333333333333 / [d] TSTOP - TSTART
TSTART  =    1437.975829368090 / observation start time in BTJD
TSTOP   =    1437.996662701423 / observation stop time in BTJD
DATE-OBS= '2018-11-15T11:24:02.473Z' / TSTART as UTC calendar date
DATE-END= '2018-11-15T11:54:02.473Z' / TSTOP as UTC calendar date
GAINA   =    5.239999771118164 / [electrons/count] CCD output A gain
"""


def test_tess_exposure_in_days_and_utc_dates_beside_a_tdb_time_system():
    """EXPOSURE [d] was read as seconds (0.0165 s for 1425.6 s), and a DATE-OBS without its Z as TDB (69 s early)."""
    utc = parse_iso_utc("2018-11-15T11:24:02.473")
    out = normalise_header(_pipeline_header(TESS_SPOC), (64, 64))
    assert out["EXPTIME"] == pytest.approx(0.0165 * 86400.0) and out["MJD-OBS"] == pytest.approx(utc, abs=1e-9)
    bare = _pipeline_header(TESS_SPOC)
    bare["DATE-OBS"] = ("2018-11-15T11:24:02.473", "TSTART as UTC calendar date")  # no zone: the comment says UTC
    assert normalise_header(bare, (64, 64))["MJD-OBS"] == pytest.approx(utc, abs=1e-9)
    bare["DATE-OBS"] = ("2018-11-15T11:24:02.473", "start of the observation")  # nothing says UTC: TIMESYS rules
    assert (normalise_header(bare, (64, 64))["MJD-OBS"] - utc) * 86400 == pytest.approx(-69.184, abs=0.01)
    elapsed = normalise_header(_pipeline_header(TESS_SPOC, EXPOSURE=None), (64, 64))
    assert elapsed["EXPTIME"] == pytest.approx(1800.0)  # TELAPSE [d]


@pytest.mark.parametrize("card, comment, seconds", [
    ("EXPTIME", "[s] Exposure time", 30.0), ("EXPTIME", "Exposure time in seconds", 30.0),
    ("EXPOSURE", "[ms] exposure", 0.03), ("EXPOSURE", "[sec] Duration of exposure", 30.0),
    ("EXPOSURE", "[min]", 1800.0), ("EXPTIME", "[d]", 30.0 * 86400.0),
])
def test_an_exposure_card_s_unit_is_its_comment_s(card, comment, seconds):
    header = _amateur(EXPOSURE=None)
    header[card] = (30.0, comment)
    assert normalise_header(header, (10, 10))["EXPTIME"] == pytest.approx(seconds)


def test_an_exposure_in_a_unit_of_no_time_is_refused_with_its_reason():
    header = _amateur()
    header["EXPOSURE"] = (30.0, "[adu] not a time")
    with pytest.raises(MissingMetadata, match=r"EXPOSURE = 30 is in \[adu\], not a unit of time"):
        normalise_header(header, (10, 10))


#: A Pan-STARRS1 image (IPP): telescope, instrument and filter only in HIERARCH cards, the filter named
#: ``r.00000``, the detector's values as ``CELL.*`` (the cards SNflows' ``flows/instruments`` and lcogtsnpipe's
#: ``lsc.externaldata`` read from PS1 files: ``FPA.TELESCOPE = 'PS1'``, ``FPA.INSTRUMENT = 'GPC1'``,
#: ``FPA.FILTER``, ``MJD-OBS``, ``CELL.GAIN``, ``CELL.READNOISE``, ``CELL.SATURATION``).
PS1_GPC1 = """\
HIERARCH FPA.TELESCOPE = 'PS1     '
HIERARCH FPA.INSTRUMENT = 'GPC1    '
HIERARCH FPA.FILTER = 'r.00000 '
HIERARCH CELL.GAIN = 1.01
HIERARCH CELL.READNOISE = 6.5
HIERARCH CELL.SATURATION = 60000.0
MJD-OBS =       56000.50000000
EXPTIME =                 40.0
CTYPE1  = 'RA---TAN'
CTYPE2  = 'DEC--TAN'
CRVAL1  =                150.0
CRVAL2  =                  2.0
CRPIX1  =                 32.5
CRPIX2  =                 32.5
CD1_1   =          -6.9444E-05
CD1_2   =                  0.0
CD2_1   =                  0.0
CD2_2   =           6.9444E-05
"""


def test_a_pan_starrs_image_named_only_in_hierarch_cards():
    """No TELESCOP, INSTRUME or FILTER: refused "TELESCOP is missing", and r.00000 was a band of its own."""
    out = normalise_header(_pipeline_header(PS1_GPC1), (64, 64))
    assert (out["TELESCOP"], out["ORIGTEL"], out["FILTER"], out["FILTRAW"]) == ("PS1", "PS1", "r", "r.00000")
    assert (out["GAIN"], out["RDNOISE"], out["SATURATE"]) == (1.01, 6.5, 60000.0)
    assert [canonical_band(f"{b}.00000") for b in "grizyw"] == ["g", "r", "i", "z", "y", "w.00000"]


#: An ESO imager's raw frame: the detector in HIERARCH cards, ``ESO DET OUT1 CONAD`` the gain in e-/ADU
#: ("Conversion from ADUs to electrons"; ESO's VIMOS pipeline reads it as the gain, "The gain factor is: %.2f
#: e-/ADU", and the SOXS pipeline notes "CONAD IS REALLY GAIN") beside ``ESO DET OUT1 GAIN``, its inverse; the
#: filter only in ``ESO INS FILT1 NAME``, named with its ESO number.
ESO_EFOSC = """\
TELESCOP= 'ESO-NTT '           / ESO Telescope Name
INSTRUME= 'EFOSC   '           / Instrument used.
OBJECT  = 'SN2023ixf'          / Original target.
RA      =           210.910750 / 14:03:38.5 RA (J2000) pointing (deg)
DEC     =             54.31167 / 54:18:42.0 DEC (J2000) pointing (deg)
EXPTIME =               60.000 / Integration time
MJD-OBS =       60089.04309550 / Obs start
DATE-OBS= '2023-05-25T01:02:03.451' / Observing date
HIERARCH ESO INS FILT1 NAME = 'r#784' / FILT1 name.
HIERARCH ESO DET OUT1 GAIN = 0.55 / Conversion from electrons to ADU
HIERARCH ESO DET OUT1 CONAD = 1.18 / Conversion from ADUs to electrons
HIERARCH ESO DET OUT1 RON = 11.0 / Readout noise per output (e-)
"""


def test_an_eso_frame_s_gain_is_conad_never_its_inverse():
    """No GAIN card: the gain was 1.0 e-/ADU (CONAD: 1.18), the read noise 0, the band clear (no FILTER card)."""
    out = normalise_header(_pipeline_header(ESO_EFOSC), (64, 64))
    assert (out["GAIN"], out["RDNOISE"], out["TELESCOP"], out["FILTER"]) == (1.18, 11.0, "ESO-NTT", "r")
    assert [canonical_band(n) for n in ("V#641", "R#642", "g#782", "Ha#692", "OG530#1")] == ["V", "R", "g", "Ha",
                                                                                            "OG530_1"]
    assert "GAIN" not in normalise_header(_pipeline_header(ESO_EFOSC, **{"ESO DET OUT1 CONAD": None}), (64, 64))


#: An SDSS corrected frame (``frame-r-004263-5-0119.fits``, DR8 and later): its first cards verbatim as the
#: frame's header holds them (the header Celeste's accuracy-benchmark test parses, a real frame's): ``TAI`` in
#: seconds since MJD 0, ``DATE-OBS`` the TAI *date* alone and ``TAIHMS`` the TAI time, both "1st row", the
#: COMMENT saying they are "at reading of col 0, row 0". The image is in nanomaggies (the frame data model:
#: "Units are in nanomaggies"; ``BUNIT = 'nanomaggy'``, the value readers such as ELiXer check), and
#: ``NMGY`` is the calibration factor in nanomaggies per count (the data model's calibration vector "translates
#: the counts in the original image into nanomaggies"; readers take counts = image / NMGY and the zero point
#: 22.5 - 2.5 log10(NMGY)); ``EXPTIME`` is written as a string. The cards after ORIGIN are the frame's keywords
#: (named as in the data model), with values of this run.
SDSS_FRAME = """\
TAI     =        4537928038.58 / 1st row - Number of seconds since Nov 17 1858
RA      =            359.76830 / 1st row - Right ascension of telescope boresigh
DEC     =            0.000000  / 1st row - Declination of telescope boresight (d
DATE-OBS= '2002-09-05'         / 1st row - TAI date
TAIHMS  = '07:33:58.57'        / 1st row - TAI time (HH:MM:SS.SS) (TAI-UT = appr
COMMENT  TAI,RA,DEC,SPA,IPA,IPARATE,AZ,ALT,FOCUS at reading of col 0, row 0
ORIGIN  = 'SDSS    '
TELESCOP= '2.5m    '
RUN     =                 4263 / Run number
FRAME   =                  119 / Frame sequence number within the run
OBJECT  = '82 N    '           / e.g., 'stripe 50.6 degrees, north strip'
EXPTIME = '53.907456'          / Exposure time (seconds)
BUNIT   = 'nanomaggy'          / 1 nanomaggy = 3.631e-6 Jy
FILTER  = 'r       '           / filter used
CAMCOL  =                    5 / column in the imaging camera
CTYPE1  = 'RA---TAN'
CTYPE2  = 'DEC--TAN'
CRPIX1  =                 32.5
CRPIX2  =                 32.5
CRVAL1  =            0.5130370
CRVAL2  =            0.5356310
CD1_1   =       4.35000000E-06
CD1_2   =       1.09870000E-04
CD2_1   =       1.09870000E-04
CD2_2   =      -4.35000000E-06
NMGY    =           0.00475200 / Calibration factor [nMgy per count]
NMGYIVAR=        4.5000000E+08 / Calibration factor inverse variance
"""


def _sdss_fits(**cards) -> bytes:
    import io

    rng = np.random.default_rng(11)
    data = rng.normal(0.0, 0.02, size=(64, 64)).astype(np.float32)  # sky-subtracted, nanomaggies
    data[30:33, 30:33] += 1.5
    buf = io.BytesIO()
    fits.PrimaryHDU(data, header=_pipeline_header(SDSS_FRAME, **cards)).writeto(buf)
    return buf.getvalue()


def test_an_sdss_frame_s_time_is_its_tai_row_read_less_the_drift_exposure():
    """A date-only DATE-OBS with its clock in TAIHMS was refused "has no time of day"."""
    from astropy.time import Time

    row0_utc = Time("2002-09-05T07:33:58.57", scale="tai").utc.mjd  # TAI - UTC was 32 s in 2002
    assert row0_utc == pytest.approx(4537928038.58 / 86400.0 - 32.0 / 86400.0, abs=2e-7)  # the header's TAI
    for timesys in (None, "UTC", "TAI"):  # TAIHMS is TAI whatever TIMESYS says
        out = normalise_header(_pipeline_header(SDSS_FRAME, TIMESYS=timesys), (64, 64))
        assert out["EXPTIME"] == pytest.approx(53.907456)
        assert out["MJD-OBS"] == pytest.approx(row0_utc - 53.907456 / 86400.0, abs=1e-8)
        assert out["TIMESRC"] == "DATE-OBS+TAIHMS(TAI)-EXPTIME"
    with pytest.raises(MissingMetadata, match=r"TAIHMS '7h33': time '2002-09-05T7h33' is not an ISO date-time"):
        normalise_header(_pipeline_header(SDSS_FRAME, TAIHMS="7h33"), (64, 64))


def test_an_sdss_frame_in_nanomaggies_becomes_counts_with_its_zero_point():
    """Nanomaggies were read as counts: a Poisson variance 1 / NMGY = 210x too small, no zero point."""
    from broker.frame import decode_fits

    raw = fits.getdata(__import__("io").BytesIO(_sdss_fits()))
    frame = decode_fits(_sdss_fits())
    assert (frame.meta.telescope, frame.meta.filter) == ("2.5m", "r")
    np.testing.assert_allclose(frame.data, raw / np.float32(0.004752), rtol=1e-6)
    assert frame.header["BUNIT"] == "counts" and frame.header["ZPSRC"] == "NMGY/NMGYIVAR"
    assert frame.meta.magzp == pytest.approx(22.5 - 2.5 * np.log10(0.004752), abs=1e-6)  # 28.31
    assert frame.meta.magzp_err == pytest.approx(2.5 / np.log(10) / np.sqrt(4.5e8) / 0.004752, rel=1e-6)
    again = decode_fits(__import__("broker.frame", fromlist=["encode_fits"]).encode_fits(frame))
    np.testing.assert_allclose(again.data, frame.data, rtol=1e-6)  # never converted twice
    assert again.meta.magzp == pytest.approx(frame.meta.magzp)
    bare = decode_fits(_sdss_fits(NMGYIVAR=None))
    assert bare.meta.magzp == pytest.approx(frame.meta.magzp) and bare.meta.magzp_err is None


@pytest.mark.parametrize("nmgy", [None, 0.0, -0.004, "n/a", "NaN"])
def test_an_image_in_nanomaggies_without_its_calibration_factor_is_refused_with_its_reason(nmgy):
    from broker.frame import decode_fits

    with pytest.raises(MissingMetadata, match=r"BUNIT = 'nanomaggy'.*NMGY = .*nanomaggies per count"):
        decode_fits(_sdss_fits(NMGY=nmgy))


#: ATLAS reduced images (``02a60205o0444c.fits.fz``): ``MJD-OBS`` (the start), ``EXPTIME``, ``FILTER`` 'c' (cyan)
#: or 'o' (orange), ``OBSTYPE = 'OBJECT'``, ``GAIN``, ``MAGZPT`` with ``ZPRMS``/``ZPNPT``, and no ``INSTRUME``:
#: the cards the instrument-id package's ATLAS reader takes (a third-party reader, not ATLAS's own documentation:
#: its note that ``MAGZPT`` is of 1 ADU/s is not read here). Without ``TELESCOP``/``INSTRUME`` the frame needs
#: ``broker produce --telescope``; here it is named.
ATLAS_REDUCED = """\
TELESCOP= 'ATLAS-HKO'
OBSNAME = '02a60205o0444c'
CONTROLR= 'Archon  '
OBSTYPE = 'OBJECT  '
MJD-OBS =       60205.48121354
EXPTIME =                 30.0
FILTER  = 'c       '
GAIN    =                 1.99
MAGZPT  =               21.543
ZPRMS   =                0.021
ZPNPT   =                 1520
RA      =           210.910750
DEC     =             54.31167
"""


def test_atlas_cyan_and_orange_are_bands_of_their_own():
    """ATLAS' cyan ``c`` was read as ``clear`` (the alias of a filter wheel's ``C``)."""
    cyan = normalise_header(_pipeline_header(ATLAS_REDUCED), (64, 64))
    orange = normalise_header(_pipeline_header(ATLAS_REDUCED, FILTER="o"), (64, 64))
    assert (cyan["FILTER"], orange["FILTER"]) == ("c", "o")
    assert (cyan["MJD-OBS"], cyan["EXPTIME"], cyan["GAIN"], cyan["TIMESRC"]) == (60205.48121354, 30.0, 1.99, "MJD-OBS")
    assert "MAGZP" not in cyan  # MAGZPT's unit is not read from a primary source
    assert [canonical_band(n) for n in ("c", "o", "C", "Clear")] == ["c", "o", "clear", "clear"]
    with pytest.raises(MissingMetadata, match="TELESCOP"):
        normalise_header(_pipeline_header(ATLAS_REDUCED, TELESCOP=None), (64, 64))


@pytest.mark.parametrize("cards, match", [
    ({"DATE-OBS": None, "JD": 56362.149537037}, r"JD = 56362.149537 is no Julian date"),  # an MJD as JD
    ({"DATE-OBS": "2013-03-11", "JD-OBS": 56362.149537037}, r"JD-OBS = 56362.149537 is no Julian date"),
    ({"DATE-OBS": None, "MJD-OBS": 2456362.649537037}, r"MJD-OBS = 2456362.64954 is no MJD"),  # a JD as MJD
    ({"DATE-OBS": None, "MJD-AVG": 2456362.649537037}, r"MJD-AVG = 2456362.64954 is no MJD"),
])
def test_a_jd_in_an_mjd_card_or_an_mjd_in_a_jd_card_is_refused_naming_it(cards, match):
    """JD = 56362.15 (an MJD) became MJD -2343638, a date 8400 years off, refused only at ingest as out of range."""
    with pytest.raises(MissingMetadata, match=match):
        normalise_header(_amateur(**cards), (10, 10))


@pytest.mark.parametrize("comment, seconds", [
    ("exposure time in ms", 160.0),  # the NF Observatory's headers (nfo.edu), EXPTIME = 160000 / exposure time in ms
    ("Exposure time (msec)", 160.0), ("Exposure time in seconds", 160000.0), ("time in the V band", 160000.0),
    ("[s] exposure, not in ms", 160000.0),  # a bracketed unit wins over words
])
def test_an_exposure_unit_named_in_words_is_read(comment, seconds):
    """EXPTIME = 160000 / exposure time in ms was read as 160000 s (44 h), 1000x its exposure."""
    header = _amateur(EXPOSURE=None)
    header["EXPTIME"] = (160000, comment)
    assert normalise_header(header, (10, 10))["EXPTIME"] == pytest.approx(seconds)
