"""Header normalisation: real FITS header conventions -> the cards :func:`broker.frame.meta_from_header` reads.

Frames from small and amateur telescopes (N.I.N.A., SharpCap, ASIAIR, MaxIm DL, ACP, Ekos, smart
telescopes) and from surveys (DECam, ZTF, LSST, LCO) name the same facts differently: ``DATE-OBS``
in local time with an offset, ``JD`` instead of ``MJD-OBS``, ``EXPOSURE`` for ``EXPTIME``, ``OBJECT``
instead of a field id, vendor filter names. :func:`normalise_header` writes the broker's canonical
cards (``TELESCOP FIELD FILTER MJD-OBS EXPTIME GAIN RDNOISE SATURATE``) from whatever the header
holds, in the order of :data:`MAPPING`, filling gaps from a telescope profile
(:mod:`broker.telescopes`), and records where each value came from (``HDRNORM``, ``TIMESRC``,
``FIELDSRC``, ``FILTRAW``, ``ORIGTEL``). Values a profile gives win over the header's (a ZWO camera
writes its gain *setting* in ``GAIN``, not e-/ADU). The table is rendered in ``docs/telescopes.md``.
A header already normalised (``HDRNORM`` present) is returned unchanged, so decoding is idempotent.

:func:`check_frame_type` refuses calibration exposures (darks, flats, bias frames) by their
frame-type card, which capture software writes into the same folders as the light frames.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS, FITSFixedWarning
from erfa import ErfaWarning

from broker.errors import ConfigError, MissingMetadata, NotScience
from broker.telescopes import TelescopeProfile, find_profile

#: Canonical bands: SDSS/LSST-like (lower case), Johnson-Cousins (upper case), ATLAS' cyan ``c`` and orange ``o``
#: (its own broad bands, 420-650 and 560-820 nm, neither an SDSS band; lower case as ATLAS writes them: ``C`` is a
#: filter wheel's clear), unfiltered, colour-sensor luminance (:mod:`broker.bayer`) and narrow bands.
BANDS = ("u", "g", "r", "i", "z", "y", "U", "B", "V", "R", "I", "c", "o", "clear", "lum", "Ha", "OIII", "SII")

#: Vendor filter name (compared upper-cased, blanks and quotes stripped) -> canonical band. Single
#: letters are matched as written first (``r`` is SDSS r, ``R`` is Cousins R). DECam-style names
#: (``i DECam SDSS c0003 7835.0 1470.0``) are matched on their first word.
FILTER_ALIASES: dict[str, str] = {
    "UP": "u", "GP": "g", "RP": "r", "IP": "i", "ZS": "z", "ZP": "z", "Y": "y",  # LCO primed SDSS
    "SDSS-U": "u", "SDSS-G": "g", "SDSS-R": "r", "SDSS-I": "i", "SDSS-Z": "z",
    "SDSSU": "u", "SDSSG": "g", "SDSSR": "r", "SDSSI": "i", "SDSSZ": "z",
    "U'": "u", "G'": "g", "R'": "r", "I'": "i", "Z'": "z",
    "ZTF_G": "g", "ZTF_R": "r", "ZTF_I": "i", "ZG": "g", "ZR": "r", "ZI": "i",  # ZTF
    "JOHNSON-U": "U", "JOHNSON-B": "B", "JOHNSON-V": "V", "BESSELL-B": "B", "BESSELL-V": "V",
    "BESSELL-R": "R", "BESSELL-I": "I", "RC": "R", "IC": "I", "COUSINS-R": "R", "COUSINS-I": "I",
    "CLEAR": "clear", "CLR": "clear", "C": "clear", "NONE": "clear", "OPEN": "clear", "NOFILTER": "clear",
    "NO FILTER": "clear", "W": "clear", "L": "clear", "LUM": "clear", "LUMINANCE": "clear",
    "IRCUT": "clear", "UV/IR CUT": "clear", "UVIR": "clear", "UV-IR": "clear", "LP": "clear",
    "HA": "Ha", "H-ALPHA": "Ha", "HALPHA": "Ha", "H_ALPHA": "Ha", "OIII": "OIII", "O3": "OIII",
    "SII": "SII", "S2": "SII",
}


#: A photometric system's name before its band letter, as filter wheels are named in capture programs
#: (``Sloan r'``, ``SDSS g``, ``Johnson V``, ``Bessell R``, ``Cousins Ic``); matched upper-cased.
_SYSTEM_BAND = re.compile(r"^(SLOAN|SDSS|JOHNSON|BESSELL|COUSINS)[\s_-]*([A-Z])(?:'|C)?$")
#: Pan-STARRS' filter names (``FPA.FILTER``): a band letter, a dot and zeros (its broad ``w.00000`` is no band of
#: :data:`BANDS` and is kept as named).
_PS1_FILTER = re.compile(r"^([grizy])\.0+$")
#: ESO's filter names (``ESO INS FILT1 NAME``): a band, ``#`` and the filter's ESO number (EFOSC2's ``r#784``).
_ESO_FILTER = re.compile(r"^([A-Za-z]{1,4})#\d+$")
#: The bands of each system (:data:`_SYSTEM_BAND`): SDSS bands are lower case, Johnson-Cousins upper case.
_SYSTEM_BANDS = {"SLOAN": "ugriz", "SDSS": "ugriz", "JOHNSON": "UBVRI", "BESSELL": "UBVRI", "COUSINS": "RI"}


@dataclass(frozen=True)
class CardSource:
    """One row of the mapping table: a canonical card and the header cards it is read from, in order."""

    card: str
    sources: tuple[str, ...]
    note: str


#: The mapping table (``docs/telescopes.md`` renders it): first source present wins, then the profile.
MAPPING: tuple[CardSource, ...] = (
    CardSource("TELESCOP", ("profile name", "TELESCOP", "INSTRUME", "FPA.TELESCOPE", "FPA.INSTRUMENT"),
               "characters other than letters, digits and `._+-` become `_` (it keys references and "
               "Kafka keys); the original is kept in `ORIGTEL`"),
    CardSource("FIELD", ("FIELD", "header WCS centre on a sky grid", "RA/DEC, OBJCTRA/OBJCTDEC pointing on a sky grid",
                         "OBJECT"),
               "grid cells of `field_grid_deg` (profile, default 0.5 deg), named `g<deg>-<ra>-<dec>`; "
               "`FIELDSRC` says which source was used; after plate solving, a field taken from the pointing "
               "or OBJECT is renamed from the solved centre (`FIELDSRC = SOLVED`)"),
    CardSource("FILTER", ("FILTER", "FILTNAM", "FILTER1", "FILT-1", "FPA.FILTER", "ESO INS FILT1 NAME",
                          "profile filters", "built-in aliases"),
               "vendor name -> canonical band (`BANDS`; Pan-STARRS' `r.00000` and ESO's `r#784` are `r`; ATLAS' "
               "`c` and `o` are bands of their own, `C` is clear); an unknown name is kept (it "
               "keys its own references); no filter card: `clear`; Bayer frames: `lum`; original in `FILTRAW`"),
    CardSource("MJD-OBS", ("MJD-OBS", "DATE-OBS (+TIME-OBS/UT/UTSTART, or TAIHMS - EXPTIME)", "JD", "JD-OBS",
                           "MJD-AVG", "DATE-AVG"),
               "UTC exposure start (MJD); ISO times with a zone offset (`-0700`) are converted to UTC; SDSS's "
               "`TAIHMS` is the TAI time its drift scan read row 0, that row's exposure end, whatever `TIMESYS` "
               "says; a JD in an MJD card (>= 2400000.5) or an MJD in a JD card is refused, naming it; a DATE-OBS "
               "without its time of day, or not ISO, gives way to the cards after it (refused when none gives it); "
               "`*-AVG` and a profile with `time_reference = \"mid\"` are moved back by EXPTIME/2; times are in "
               "the scale `TIMESYS` names, except a DATE-OBS with a zone or a comment naming UTC (TESS: `TIMESYS = "
               "'TDB'` beside \"TSTART as UTC calendar date\")"),
    CardSource("EXPTIME", ("EXPTIME", "EXPOSURE", "EXP_TIME", "ITIME", "TELAPSE"),
               "seconds, or the unit in brackets the card's comment opens with (TESS's and Kepler's `EXPOSURE` "
               "and `TELAPSE`: \"[d] time on source\", in days; also ms, us, min, h), else a unit of time the "
               "comment names in words (\"exposure time in ms\", \"(msec)\"); another bracketed unit is refused"),
    CardSource("GAIN", ("profile gain", "EGAIN", "GAIN", "CELL.GAIN", "ESO DET OUT1 CONAD", "mean of GAINA/GAINB"),
               "e-/ADU; none (or 0, as N.I.N.A. writes for a camera that does not say): 1.0. N.I.N.A., SGP and "
               "ZWO cameras write their gain *setting* (e.g. 100) in GAIN and e-/ADU in EGAIN, which wins; a "
               "camera that writes only the setting in GAIN (Seestar) needs a profile. `GAINA`/`GAINB` are "
               "DECam's per amplifier (Community Pipeline; legacyzpts takes their mean too). ESO's gain in e-/ADU "
               "is `ESO DET OUT1 CONAD`; its `ESO DET OUT1 GAIN` is the inverse (ADU/e-) and is never read"),
    CardSource("RDNOISE", ("profile read_noise", "RDNOISE", "READNOIS", "RON", "READNOI", "CELL.READNOISE",
                           "ESO DET OUT1 RON", "mean of RDNOISEA/RDNOISEB"),
               "e-; none: 0 (sky RMS only). `READNOI` is ZTF's (IPAC science images); `RDNOISEA`/`RDNOISEB` "
               "DECam's per amplifier"),
    CardSource("SATURATE", ("profile saturation", "SATURATE", "SATLEVEL", "MAXLIN", "CELL.SATURATION",
                            "lower of SATURATA/SATURATB",
                            "8- or 16-bit data range"),
               "ADU; `SATURATA`/`SATURATB` are DECam's per amplifier (the lower one: no star clipped in either half "
               "enters the zero point); unsigned 16-bit data (`BZERO = 32768`) saturate at 65535 at the latest, "
               "8-bit data at 255"),
    CardSource("MAGZP", ("22.5 - 2.5 log10(NMGY) (BUNIT nanomaggies)", "MAGZP", "L1ZP + 2.5 log10(EXPTIME)"),
               "mag of a source giving 1 ADU in the exposure; read from every header, normalised or not "
               "(`broker.headers.zero_point_cards`). An SDSS frame in nanomaggies is put back on counts with "
               "`NMGY` (nanomaggies per count; `broker.frame.nanomaggies_to_counts`), its `MAGZPERR` from "
               "`NMGYIVAR`. ZTF's `MAGZP` is already per exposure (DN); LCO BANZAI's "
               "`L1ZP` is per second (`banzai/utils/photometry_utils.py` `to_magnitude`: `-2.5 log10(flux / "
               "exptime) + zp`); a `MAGZP` present wins over `L1ZP`; a zero point outside (0, 50] mag (a "
               "placeholder such as `-99`) is not used, and `ZPNOTE` says why"),
    CardSource("MAGZPERR", ("NMGYIVAR (with NMGY)", "MAGZPERR", "MAGZPUNC (with MAGZP)", "L1ZPERR (with L1ZP)"),
               "mag, 1 sigma; only the uncertainty of the zero point it came with. `MAGZPUNC` is ZTF's (IPAC); a "
               "`MAGZPERR` present wins over a disagreeing `MAGZPUNC` (it is the broker's own card, rewritten by "
               "calibration); a value that is not a finite number >= 0 is not used (`ZPNOTE`), and a zero point "
               "without an uncertainty is never used for a flux ratio (`broker.fluxratio.zero_point_ratio`)"),
)

#: Cards that name an exposure's type: MaxIm DL, N.I.N.A., SharpCap, ASIAIR, Seestar (``IMAGETYP``:
#: ``Light Frame``, ``LIGHT``, ``Dark``), LCO and DECam (``OBSTYPE``: ``EXPOSE``, ``object``, ``BIAS``,
#: ``SKYFLAT``, ``zero``), ZTF and LSST (``IMGTYPE``: ``object``, ``science``, ``flat``), others.
FRAME_TYPE_CARDS = ("IMAGETYP", "IMAGETYPE", "FRAMETYP", "OBSTYPE", "IMGTYPE", "EXPTYPE")
#: A frame-type value of a calibration exposure (``zero`` is IRAF's and DECam's name for a bias).
CALIBRATION_TYPE = re.compile(r"dark|flat|bias|zero", re.IGNORECASE)


def check_frame_type(header: fits.Header) -> None:
    """Raise :class:`~broker.errors.NotScience` when a frame-type card names a calibration exposure.

    Any other value (``LIGHT``, ``OBJECT``, ``EXPOSE``, ``SCIENCE``, ``STANDARD``, a name we do
    not know) and a header without such a card pass: only what is known to be a calibration frame
    is refused.
    """
    for card in FRAME_TYPE_CARDS:
        value = header.get(card)
        if isinstance(value, str) and CALIBRATION_TYPE.search(value):
            raise NotScience(f"a calibration frame ({card} = {value.strip()!r}): only light frames are processed")


_TIME_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:[T ](\d{1,2}:\d{2}(?::\d{2}(?:\.\d*)?)?))?\s*"
                      r"(Z|UTC|[+-]\d{2}:?\d{2})?$")


def _value(header: fits.Header, *cards: str) -> object | None:
    """The first of ``cards`` present with a non-blank value (None when none is)."""
    for card in cards:
        try:
            value = header.get(card)
        except Exception:  # an unparseable card counts as absent here; frame.py names it if required
            continue
        if value is not None and not (isinstance(value, str) and not value.strip()):
            return value.strip() if isinstance(value, str) else value
    return None


def _number(header: fits.Header, *cards: str) -> float | None:
    value = _value(header, *cards)
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _positive(header: fits.Header, *cards: str) -> float | None:
    """The first of ``cards`` whose value is a finite number > 0 (None when none is): 0 means "unknown" there."""
    for card in cards:
        number = _number(header, card)
        if number is not None and number > 0:
            return number
    return None


def parse_iso_utc(text: str) -> float:
    """MJD (days, UTC) of an ISO date-time, with an optional zone (``Z``, ``UTC``, ``-0700``, ``+05:30``).

    Raises
    ------
    MissingMetadata
        The text is not an ISO date(-time) with a 4-digit year.
    """
    match = _TIME_RE.match(text.strip())
    if match is None:
        raise MissingMetadata(f"time {text!r} is not an ISO date-time (YYYY-MM-DDThh:mm:ss[.s][zone])")
    date, clock, zone = match.groups()
    try:
        with warnings.catch_warnings():  # "dubious year": the plausibility check names a date out of range
            warnings.simplefilter("ignore", ErfaWarning)
            mjd = float(Time(f"{date}T{clock or '00:00:00'}", format="isot", scale="utc").mjd)
    except ValueError as exc:
        raise MissingMetadata(f"time {text!r} is not a valid date: {exc}") from exc
    if zone and zone not in ("Z", "UTC"):
        sign = -1.0 if zone[0] == "-" else 1.0
        hours, minutes = int(zone[1:3]), int(zone[-2:])
        mjd -= sign * (hours + minutes / 60.0) / 24.0  # local = UTC + offset
    return mjd


_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
#: The cards that give the time of day of a date-only ``DATE-OBS``, in order. ``TAIHMS`` is SDSS's (corrected
#: frames, ``frame-*.fits``): the TAI time at which the drift scan read row 0 of the frame (its ``COMMENT``: "at
#: reading of col 0, row 0"), whatever ``TIMESYS`` says; that row's exposure ended then (:data:`TAI_ROW_READ`).
CLOCK_CARDS = ("TIME-OBS", "UT", "UTSTART", "TAIHMS")
#: The clock card of a drift scan's row-0 read, in TAI (SDSS): the exposure start is that time less EXPTIME.
TAI_ROW_READ = "TAIHMS"


def _date_obs(header: fits.Header) -> tuple[float | None, str | None, str | None]:
    """(MJD of ``DATE-OBS``, None, its clock card) when it gives a time; (None, why not, None) when it gives none.

    A date without a clock (``2025-04-03``; its time of day in a card of :data:`CLOCK_CARDS` when
    any) or a date that is not ISO (``03/04/25``) leaves the exposure start to the cards after it.
    The clock card is None when ``DATE-OBS`` carries its own time of day.
    """
    date = _value(header, "DATE-OBS")
    if not isinstance(date, str):
        return None, None, None
    clock_card, given = None, f"DATE-OBS {date!r}"
    if _DATE_ONLY.match(date):
        clock_card = next((card for card in CLOCK_CARDS if isinstance(_value(header, card), str)), None)
        if clock_card is None:
            return None, f"{given} has no time of day (nor {', '.join(CLOCK_CARDS)})", None
        clock = _value(header, clock_card)
        given, date = f"{given} with {clock_card} {clock!r}", f"{date}T{clock}"
    try:
        return parse_iso_utc(date), None, clock_card
    except MissingMetadata as exc:
        return None, f"{given}: {exc}" if clock_card else str(exc), None


#: ``TIMESYS`` values -> astropy time scales; a header without one (or ``UTC``, ``UT``, ``GMT``) is in UTC, and
#: so is ``UT1`` (within 0.9 s of it; converting would need the IERS tables).
TIME_SCALES = {"UTC": "utc", "UT": "utc", "UT1": "utc", "GMT": "utc", "TT": "tt", "TDT": "tt", "ET": "tt",
               "TAI": "tai", "IAT": "tai",
               "GPS": "gps", "TDB": "tdb", "TCB": "tcb", "TCG": "tcg"}
#: ``TIMESRC`` of an SDSS frame's start: DATE-OBS + TAIHMS (TAI), less EXPTIME; converted from TAI to UTC.
_TAI_SOURCE = "DATE-OBS+TAIHMS(TAI)-EXPTIME"
#: GPS time runs 19 s behind TAI.
_GPS_BEHIND_TAI_S = 19.0


def exposure_start(header: fits.Header, exptime: float, profile: TelescopeProfile | None) -> tuple[float, str]:
    """(MJD of the exposure start in UTC; the card it came from): :func:`exposure_start_as_written` in UTC.

    The header's times are in the scale ``TIMESYS`` names (:data:`TIME_SCALES`, FITS standard
    section 9.2.1): a time in TT was read as UTC, 69 s late. A zone in an ISO time (``Z``, ``-0700``)
    says UTC already.

    Raises
    ------
    MissingMetadata
        No card gives the time, or ``TIMESYS`` names a scale that is not one of :data:`TIME_SCALES`.
    """
    mjd, source = exposure_start_as_written(header, exptime, profile)
    if source == _TAI_SOURCE:  # SDSS: TAIHMS is TAI whatever TIMESYS says
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ErfaWarning)
            return float(Time(mjd, format="mjd", scale="tai").utc.mjd), source
    timesys = _value(header, "TIMESYS")
    scale = TIME_SCALES.get(str(timesys).upper(), "") if timesys is not None else "utc"
    if scale == "utc" or (source.startswith("DATE-OBS") and _date_obs_says_utc(header)):
        return mjd, source
    if not scale:
        raise MissingMetadata(f"TIMESYS = {timesys!r} is no time scale the broker converts ({', '.join(TIME_SCALES)})")
    if scale == "gps":
        scale, mjd = "tai", mjd + _GPS_BEHIND_TAI_S / 86400.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ErfaWarning)
        return float(Time(mjd, format="mjd", scale=scale).utc.mjd), f"{source}({timesys})"


def _date_obs_says_utc(header: fits.Header) -> bool:
    """Whether ``DATE-OBS`` says it is UTC itself: a zone in the time (``Z``, ``-0700``), or its comment naming UTC.

    TESS and Kepler write ``TIMESYS = 'TDB'`` (of their ``TSTART``/``TSTOP``) beside ``DATE-OBS`` commented
    "TSTART as UTC calendar date": read in TDB, the start was 69 s early.
    """
    date = _value(header, "DATE-OBS")
    match = _TIME_RE.match(date.strip()) if isinstance(date, str) else None
    if match is not None and match.group(3) is not None:
        return True
    try:
        comment = str(header.comments["DATE-OBS"])
    except (KeyError, IndexError):
        return False
    return re.search(r"\bUTC\b", comment, re.IGNORECASE) is not None


def exposure_start_as_written(header: fits.Header, exptime: float,
                              profile: TelescopeProfile | None) -> tuple[float, str]:
    """(MJD of the exposure start in the header's time scale; the card it came from), following :data:`MAPPING`.

    Raises
    ------
    MissingMetadata
        No card gives the time: a ``DATE-OBS`` that gives none (a date without its time of day,
        not ISO) is named when no later card gives it either.
    """
    mid = profile is not None and profile.time_reference == "mid"
    shift = exptime / 2.0 / 86400.0
    mjd = _day_number(header, ("MJD-OBS",), julian=False)  # 0: a placeholder some drivers write, not 1858
    if mjd is not None:
        return mjd, "MJD-OBS"
    start, unusable, clock_card = _date_obs(header)
    if start is not None and clock_card == TAI_ROW_READ:  # a drift scan's row read: its exposure ended then
        return start - exptime / 86400.0, _TAI_SOURCE
    if start is not None:
        return (start - shift, "DATE-OBS(mid)") if mid else (start, "DATE-OBS")
    jd = _day_number(header, ("JD", "JD-OBS"), julian=True)
    if jd is not None:
        return (jd - shift if mid else jd), "JD"
    avg = _day_number(header, ("MJD-AVG",), julian=False)
    avg_date = _value(header, "DATE-AVG")
    if avg is None and isinstance(avg_date, str):
        avg = parse_iso_utc(avg_date)
    if avg is not None:
        return avg - shift, "MJD-AVG"
    if unusable:
        raise MissingMetadata(f"{unusable}, and no JD, JD-OBS, MJD-AVG or DATE-AVG gives the exposure start")
    raise MissingMetadata("no exposure time stamp: none of MJD-OBS, DATE-OBS, JD, JD-OBS, MJD-AVG, DATE-AVG")


#: JD of MJD 0 (1858-11-17 0h): an MJD card at or above it holds a JD (an MJD of the year 8429), a JD card below it
#: an MJD or a reduced JD (a date before 1858).
JD_OF_MJD0 = 2400000.5


def _day_number(header: fits.Header, cards: tuple[str, ...], julian: bool) -> float | None:
    """MJD (days) of the first of ``cards`` whose value is a number > 0, a JD (``julian``) or an MJD; None if none is.

    A JD written into an MJD card, or an MJD into a JD card, was read as a date thousands of years off
    (``JD = 60089.04``: MJD -2339911) and refused only at ingest, as an MJD out of range.

    Raises
    ------
    MissingMetadata
        The value is on the other side of :data:`JD_OF_MJD0` than its card's kind of day number.
    """
    card = next((c for c in cards if _positive(header, c) is not None), None)
    value = _positive(header, card) if card is not None else None
    if card is None or value is None:
        return None
    if julian and value < JD_OF_MJD0:
        raise MissingMetadata(f"{card} = {value:.12g} is no Julian date (< {JD_OF_MJD0:.1f}, before 1858-11-17): "
                              "an MJD or a reduced JD written as a JD?")
    if not julian and value >= JD_OF_MJD0:
        raise MissingMetadata(f"{card} = {value:.12g} is no MJD (>= {JD_OF_MJD0:.1f}, the year 8429 or later): a "
                              "Julian date written as an MJD?")
    return value - JD_OF_MJD0 if julian else value


#: The cards of the exposure time, in order (:data:`MAPPING`).
EXPOSURE_CARDS = ("EXPTIME", "EXPOSURE", "EXP_TIME", "ITIME", "TELAPSE")
#: Units of time (a card comment's leading ``[unit]``, FITS standard 4.3.2) -> seconds; no unit: seconds.
TIME_UNITS = {"s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0, "ms": 1e-3, "msec": 1e-3,
              "milliseconds": 1e-3, "us": 1e-6, "usec": 1e-6, "microseconds": 1e-6, "min": 60.0, "minutes": 60.0,
              "h": 3600.0, "hr": 3600.0, "hours": 3600.0, "d": 86400.0, "day": 86400.0, "days": 86400.0}
_COMMENT_UNIT = re.compile(r"^\s*\[([^\]]*)\]")
#: A unit of time a comment names in words, not in brackets: "exposure time in ms", "Exposure (msec)".
_WORDED_UNIT = re.compile(r"\bin\s+([a-z]+)\b|\(([a-z]+)\)", re.IGNORECASE)


def _comment_unit(comment: str) -> str:
    """The unit of an exposure card's comment: the brackets it opens with, else a unit of time it names in words.

    A comment that names none is seconds. A worded unit counts only when it is one of :data:`TIME_UNITS`
    ("in the V band" is no unit): ``EXPTIME = 160000 / exposure time in ms`` was read as 44 hours.
    """
    match = _COMMENT_UNIT.match(comment)
    if match is not None:
        return match.group(1).strip()
    for worded in _WORDED_UNIT.finditer(comment):
        word = (worded.group(1) or worded.group(2)).lower()
        if word in TIME_UNITS:
            return word
    return "s"


def exposure_seconds(header: fits.Header) -> float | None:
    """The exposure time (s) from the first of :data:`EXPOSURE_CARDS` present; None when none is or it is no number.

    The unit is the one the card's comment opens with (``[d] time on source``: TESS's and Kepler's
    ``EXPOSURE`` and ``TELAPSE`` are in days, a 1800 s TESS frame was read as 0.02 s), else a unit of
    time it names in words (``exposure time in ms``, :func:`_comment_unit`); seconds without one.

    Raises
    ------
    MissingMetadata
        The comment names a unit that is no unit of time of :data:`TIME_UNITS`.
    """
    card = next((c for c in EXPOSURE_CARDS if _value(header, c) is not None), None)
    value = _number(header, card) if card is not None else None
    if card is None or value is None:
        return None
    try:
        unit = _comment_unit(str(header.comments[card]))
    except (KeyError, IndexError):
        unit = "s"
    if unit.lower() not in TIME_UNITS:
        raise MissingMetadata(f"header card {card} = {value:g} is in [{unit}], not a unit of time the broker converts "
                              f"({', '.join(TIME_UNITS)})")
    return value * TIME_UNITS[unit.lower()]


def canonical_band(raw: str, profile: TelescopeProfile | None = None) -> str:
    """The canonical band of a vendor filter name (the name itself, cleaned, when unknown)."""
    name = raw.strip().strip("'\"").strip()
    if profile is not None:
        for vendor, band in profile.filters.items():
            if vendor.strip().upper() == name.upper():
                return band
    if name in BANDS:
        return name
    key = name.upper()
    if key in FILTER_ALIASES:
        return FILTER_ALIASES[key]
    system = _SYSTEM_BAND.match(key)  # a filter wheel's "Sloan r'" or "Johnson V"
    bands = _SYSTEM_BANDS[system.group(1)] if system is not None else ""
    if system is not None and system.group(2).lower() in bands.lower():
        return bands[bands.lower().index(system.group(2).lower())]
    numbered = _PS1_FILTER.match(name) or _ESO_FILTER.match(name)  # Pan-STARRS' r.00000, ESO's r#784
    if numbered is not None and numbered.group(1) in BANDS:
        return numbered.group(1)
    first = key.split()[0] if key.split() else key
    if len(name.split()) > 1 and name.split()[0] in BANDS:  # DECam: "i DECam SDSS c0003 ..."
        return name.split()[0]
    return FILTER_ALIASES.get(first, clean_name(name) or "unknown")


def clean_name(text: str) -> str:
    """``text`` with every run of characters other than letters, digits and ``._+-`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text.strip()).strip("_")[:64]


def telescope_name(text: str) -> str:
    """A telescope name given by a user (``broker produce --telescope``, ``?telescope=``), cleaned.

    Raises
    ------
    ConfigError
        Nothing of it is a name (:func:`clean_name` leaves it empty).
    """
    name = clean_name(text)
    if not name:
        raise ConfigError(f"telescope {text!r} names no telescope (letters, digits, ._+- expected)")
    return name


def _angle(value: object, hours: bool) -> float | None:
    """Degrees of a number (deg) or a sexagesimal string (hours for RA when ``hours``)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    parts = re.split(r"[:\s hmsd°'\"]+", value.strip())
    parts = [p for p in parts if p]
    if not parts:  # only separators: DEC = "'" or "::"
        return None
    try:
        if len(parts) == 1:
            return float(parts[0])
        sign = -1.0 if parts[0].startswith("-") else 1.0
        numbers = [abs(float(p)) for p in parts[:3]]
    except ValueError:
        return None
    degrees = sum(n / 60.0 ** k for k, n in enumerate(numbers))
    return sign * degrees * (15.0 if hours else 1.0)


def pointing_hint(header: fits.Header) -> tuple[float, float] | None:
    """Where the telescope says it pointed (RA, Dec in deg), from RA/DEC, OBJCTRA/OBJCTDEC or CRVAL; None if none.

    ``RA`` as a number is taken as degrees, as a sexagesimal string as hours (MaxIm DL, ACP, LCO).
    """
    for ra_card, dec_card in (("RA", "DEC"), ("OBJCTRA", "OBJCTDEC"), ("RA_OBJ", "DEC_OBJ"), ("CRVAL1", "CRVAL2")):
        ra_raw, dec_raw = _value(header, ra_card), _value(header, dec_card)
        if ra_raw is None or dec_raw is None or (ra_card == "CRVAL1" and not _equatorial_axis1(header)):
            continue
        ra, dec = _angle(ra_raw, hours=isinstance(ra_raw, str)), _angle(dec_raw, hours=False)
        if ra is not None and dec is not None and 0.0 <= ra < 360.0 and -90.0 <= dec <= 90.0:
            return ra, dec
    return None


def _equatorial_axis1(header: fits.Header) -> bool:
    """Whether ``CTYPE1`` is RA (or absent): CRVAL1/2 of a galactic or Dec-first WCS are no RA/Dec pointing."""
    ctype = _value(header, "CTYPE1")
    return ctype is None or str(ctype).upper().startswith("RA")


def pixel_scale_hint(header: fits.Header, profile: TelescopeProfile | None = None) -> float | None:
    """Pixel scale (arcsec/px) the header or profile implies, for the plate solver; None when unknown."""
    scale = _number(header, "PIXSCALE", "SECPIX", "SECPIX1", "IM_SCALE", "PIXSCAL1", "SCALE")
    if scale is not None and _plausible_scale(scale):
        return scale
    pixel_um, focal_mm = _number(header, "XPIXSZ"), _number(header, "FOCALLEN")
    if pixel_um and focal_mm and pixel_um > 0 and focal_mm > 0:
        scale = 206.264806 * pixel_um / focal_mm
        if _plausible_scale(scale):
            return scale
    if profile is not None and profile.pixel_scale_arcsec is not None:
        binning = _number(header, "XBINNING")
        binning = binning if binning is not None and 1.0 <= binning <= 64.0 else 1.0
        return profile.pixel_scale_arcsec * binning
    return None


def _plausible_scale(arcsec_per_px: float) -> bool:
    """Whether a pixel scale hint is one a camera can have (0.01-3600 arcsec/px); others are ignored."""
    return 0.01 < arcsec_per_px < 3600.0


def grid_field(ra: float, dec: float, cell_deg: float) -> str:
    """The sky-grid cell of (ra, dec) (deg): ``g<cell>-<ra>-<dec>`` with the cell's lower corner in deg.

    Cells are ``cell_deg`` high in Dec and ``cell_deg / cos(dec)`` wide in RA (rounded to a whole
    number of cells around the sky), so every cell covers about the same area. Pointings that
    fall on two sides of a cell edge get two fields (two references); documented in ``docs/telescopes.md``.
    """
    row = math.floor((dec + 90.0) / cell_deg)
    dec_lo = -90.0 + row * cell_deg
    dec_mid = min(dec_lo + cell_deg / 2.0, 89.999)
    n_ra = max(1, int(360.0 * math.cos(math.radians(dec_mid)) / cell_deg))
    col = int((ra % 360.0) / (360.0 / n_ra)) % n_ra
    return f"g{cell_deg:g}-{col * 360.0 / n_ra:07.3f}-{dec_lo:+07.3f}"


#: Largest distance (years) of an FK5 ``EQUINOX`` from J2000 read as J2000 (0.1 yr: 5 arcsec of precession).
_EQUINOX_TOLERANCE = 0.1


def wcs_frame_problem(wcs: WCS) -> str | None:
    """Why the celestial ``wcs`` does not give ICRS RA, Dec as (axis 1, axis 2); None when it does.

    Everything downstream reads ``pixel_to_world_values`` as (RA, Dec) in ICRS: a galactic WCS gave
    (l, b) as RA, Dec, a B1950 (FK4) one positions 0.6 deg off, a Dec-first one the two swapped.
    """
    lng, lat = wcs.wcs.lngtyp.strip(), wcs.wcs.lattyp.strip()
    if (lng, lat) != ("RA", "DEC"):
        return f"is in {lng or '?'}/{lat or '?'} coordinates (CTYPE {', '.join(wcs.wcs.ctype)})"
    if wcs.wcs.lng != 0:
        return "has Dec on axis 1 and RA on axis 2"
    radesys, equinox = wcs.wcs.radesys.strip().upper(), float(wcs.wcs.equinox)
    if radesys == "FK5" and math.isfinite(equinox) and abs(equinox - 2000.0) > _EQUINOX_TOLERANCE:
        return f"is FK5 of equinox {equinox:g} (not J2000)"
    if radesys not in ("ICRS", "FK5", ""):
        return f"is in the {radesys} reference system{f' (equinox {equinox:g})' if math.isfinite(equinox) else ''}"
    return None


def wcs_centre(header: fits.Header, shape: tuple[int, int]) -> tuple[float, float] | None:
    """(RA, Dec) in deg of the image centre under the header's celestial WCS; None without a usable one."""
    if not str(header.get("CTYPE1", "")).strip():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header, naxis=2)
            if not wcs.has_celestial or wcs_frame_problem(wcs.celestial) is not None:
                return None
            ra, dec = wcs.celestial.pixel_to_world_values((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
    except Exception:  # broken WCS cards: frame.celestial_wcs names them later
        return None
    ra, dec = float(ra), float(dec)
    return (ra % 360.0, dec) if math.isfinite(ra) and math.isfinite(dec) and abs(dec) <= 90.0 else None


def _field(header: fits.Header, shape: tuple[int, int], grid_deg: float) -> tuple[str, str]:
    """(field id, its source) following :data:`MAPPING`."""
    field = _value(header, "FIELD")
    if field is not None:
        return str(field), "FIELD"
    centre = wcs_centre(header, shape)
    if centre is not None:
        return grid_field(*centre, grid_deg), "WCS"
    hint = pointing_hint(header)
    if hint is not None:
        return grid_field(*hint, grid_deg), "POINTING"
    target = _value(header, "OBJECT")
    if target is not None and clean_name(str(target)):
        return "obj-" + clean_name(str(target)).lower(), "OBJECT"
    raise MissingMetadata("no field identity: no FIELD card, no WCS, no RA/DEC pointing and no OBJECT")


def _saturation(header: fits.Header, profile: TelescopeProfile | None) -> float | None:
    """SATURATE (ADU): the profile's, the header's, else the top of an integer data range (None for floats).

    The top of an 8-bit image (255; webcams, all-sky and video cameras, JPEG conversions) was not
    known: its clipped stars entered the zero point, 1.2 mag too bright on a simulated frame.
    """
    if profile is not None and profile.saturation is not None:
        return profile.saturation
    level = _number(header, "SATURATE", "SATLEVEL", "MAXLIN", "CELL.SATURATION")
    if level is not None:
        return level
    amplifiers = [_positive(header, card) for card in ("SATURATA", "SATURATB")]
    if all(amplifiers):  # DECam: one level per amplifier; a star clipped in either half is clipped
        return min(a for a in amplifiers if a is not None)
    bitpix, bzero = header.get("BITPIX"), header.get("BZERO")
    if bitpix == 16:
        return 65535.0 if bzero == 32768 else 32767.0
    if bitpix == 8:
        return 127.0 if bzero == -128 else 255.0
    return None


def _amplifier_mean(header: fits.Header, cards: tuple[str, str]) -> float | None:
    """Mean of two per-amplifier values (DECam's ``GAINA``/``GAINB``), when both are finite numbers > 0."""
    values = [_positive(header, card) for card in cards]
    return sum(v for v in values if v is not None) / 2.0 if all(values) else None


def _detector(header: fits.Header, profile: TelescopeProfile | None) -> dict[str, float]:
    """GAIN, RDNOISE and SATURATE, the profile's values winning over the header's (order of :data:`MAPPING`)."""
    gain = (profile.gain if profile is not None and profile.gain is not None
            else _positive(header, "EGAIN", "GAIN", "CELL.GAIN", "ESO DET OUT1 CONAD")
            or _amplifier_mean(header, ("GAINA", "GAINB")))
    noise = (profile.read_noise if profile is not None and profile.read_noise is not None
             else _non_negative(header, "RDNOISE", "READNOIS", "RON", "READNOI", "CELL.READNOISE", "ESO DET OUT1 RON")
             or _amplifier_mean(header, ("RDNOISEA", "RDNOISEB")))
    values = {"GAIN": gain, "RDNOISE": noise, "SATURATE": _saturation(header, profile)}
    return {card: value for card, value in values.items() if value is not None}


def _non_negative(header: fits.Header, *cards: str) -> float | None:
    """The first of ``cards`` whose value is a finite number >= 0 (None when none is)."""
    for card in cards:
        number = _number(header, card)
        if number is not None and number >= 0:
            return number
    return None


@dataclass(frozen=True)
class ZeroPointConvention:
    """How one pipeline writes a measured photometric zero point (:func:`zero_point_cards`).

    Attributes
    ----------
    card : str
        The zero-point card (mag).
    errors : tuple of str
        Its 1-sigma uncertainty's cards (mag), in order of precedence.
    per_second : bool
        Whether it is the magnitude of 1 ADU/s (the broker's ``MAGZP`` is of 1 ADU in the exposure:
        ``+ 2.5 log10(EXPTIME)``).
    """

    card: str
    errors: tuple[str, ...]
    per_second: bool


#: Zero-point conventions: the first whose zero-point card the header holds decides (a ``MAGZP`` wins
#: over an ``L1ZP``). ``MAGZP``/``MAGZPERR``: the broker's own (:mod:`broker.photcal`); ``MAGZPUNC``: ZTF's
#: IPAC science images (``MAGZP`` of 1 DN in the exposure, its uncertainty ``MAGZPUNC``; the keywords ztfimg
#: and Ampel's ZTF forced-photometry reader take); ``L1ZP``/``L1ZPERR``: LCO BANZAI
#: (``banzai/photometry.py`` writes them, ``banzai/utils/photometry_utils.py`` ``to_magnitude`` applies
#: ``-2.5 log10(flux / exptime) + zeropoint``: a zero point of 1 count/s).
ZERO_POINTS: tuple[ZeroPointConvention, ...] = (
    ZeroPointConvention("MAGZP", ("MAGZPERR", "MAGZPUNC"), per_second=False),
    ZeroPointConvention("L1ZP", ("L1ZPERR",), per_second=True),
)

#: Zero points written into ``MAGZP`` (mag of 1 ADU in the exposure), exclusive-inclusive: the range
#: ``PlausibilityConfig.magzp_range`` accepts by default (real ones are 15-35 mag); outside it is a
#: placeholder (NEOexchange writes ``-99`` for a BANZAI frame without one).
ZERO_POINT_RANGE = (0.0, 50.0)


def zero_point_cards(header: fits.Header) -> fits.Header:
    """``header``, or a copy whose ``MAGZP`` and ``MAGZPERR`` are written from the pipeline's own cards.

    A pipeline's measured zero point reaches :func:`broker.fluxratio.zero_point_ratio` only as
    ``MAGZP`` with ``MAGZPERR``: ZTF's ``MAGZPUNC`` and BANZAI's ``L1ZP``/``L1ZPERR`` were never read,
    and the fallback never worked on their frames. The first convention of :data:`ZERO_POINTS` whose
    zero-point card is present decides; a ``MAGZPERR`` present is kept as it is (it wins over a
    ``MAGZPUNC`` that disagrees). Applied to every header, normalised or not; idempotent.

    Returns
    -------
    astropy.io.fits.Header
        ``header`` itself when nothing is to be written; else a copy with ``MAGZP``, ``MAGZPERR`` and
        ``ZPSRC`` (the cards they came from), or, when the pipeline's values are unusable (not
        numbers, not finite, a negative uncertainty, a zero point outside :data:`ZERO_POINT_RANGE`),
        with ``ZPNOTE`` saying why and no zero point written.
    """
    for convention in ZERO_POINTS:
        if _value(header, convention.card) is None:
            continue
        if convention.card == "MAGZP" and _value(header, "MAGZPERR") is not None:
            return header
        found = _measured_zero_point(header, convention)
        if found is None:
            return header  # a bare zero point: a nominal value, never used for a flux ratio
        out = header.copy()
        if isinstance(found, str):
            set_card(out, "ZPNOTE", found, "why no zero point was read")
            return out
        magzp, error, source = found
        set_card(out, "MAGZP", round(magzp, 6), "[mag] 1 ADU in the exposure (normalised)")
        set_card(out, "MAGZPERR", error, "[mag] 1-sigma uncertainty of MAGZP")
        set_card(out, "ZPSRC", source, "where MAGZP, MAGZPERR came from")
        return out
    return header


def _measured_zero_point(header: fits.Header, convention: ZeroPointConvention) -> tuple[float, float, str] | str | None:
    """(MAGZP, MAGZPERR, source) of ``convention``; why not (str) if its values are unusable; None without an error."""
    error_card = next((card for card in convention.errors if _value(header, card) is not None), None)
    if error_card is None:
        return None
    raw_zp, raw_error = _value(header, convention.card), _value(header, error_card)
    zp, error = _number(header, convention.card), _number(header, error_card)
    if zp is None or error is None or error < 0:
        return (f"{convention.card} = {raw_zp!r}, {error_card} = {raw_error!r}: not a zero point (a finite number) "
                "with its uncertainty (a finite number >= 0 mag)")
    source = f"{convention.card}/{error_card}"
    if convention.per_second:
        exptime = _positive(header, "EXPTIME")
        if exptime is None:
            return f"{convention.card} is per second and EXPTIME = {_value(header, 'EXPTIME')!r} is no exposure time"
        zp, source = zp + 2.5 * math.log10(exptime), f"{source}+2.5log10(EXPTIME)"
    if not ZERO_POINT_RANGE[0] < zp <= ZERO_POINT_RANGE[1]:
        return (f"{convention.card} = {raw_zp!r} gives MAGZP {zp:g} mag, outside ({ZERO_POINT_RANGE[0]:g}, "
                f"{ZERO_POINT_RANGE[1]:g}]: a placeholder, not a zero point")
    return zp, error, source


def normalise_header(header: fits.Header, shape: tuple[int, int],
                     profiles: tuple[TelescopeProfile, ...] = ()) -> fits.Header:
    """A copy of ``header`` with the broker's canonical cards written from its real conventions.

    Parameters
    ----------
    header : astropy.io.fits.Header
        The frame's header as the telescope wrote it.
    shape : tuple of int
        (ny, nx) of the image (px), for the WCS centre.
    profiles : tuple of TelescopeProfile
        Known telescopes; the one ``TELESCOP`` or ``INSTRUME`` selects fills what the header lacks.

    Returns
    -------
    astropy.io.fits.Header
        ``header`` itself when it carries ``HDRNORM`` already; else a copy with ``TELESCOP FIELD
        FILTER MJD-OBS EXPTIME`` (and ``GAIN RDNOISE SATURATE`` when known) in canonical form plus
        ``HDRNORM``, ``TIMESRC``, ``FIELDSRC``, ``FILTRAW`` and ``ORIGTEL``.

    Raises
    ------
    MissingMetadata
        No telescope name, exposure time, time stamp or field identity can be found, or a time is
        not an ISO date-time.
    """
    if "HDRNORM" in header:
        return header
    out = header.copy()
    telescop = str(_value(header, "TELESCOP", "FPA.TELESCOPE") or "")  # FPA.*: Pan-STARRS' HIERARCH cards
    instrume = str(_value(header, "INSTRUME", "FPA.INSTRUMENT") or "")
    profile = find_profile(profiles, telescop, instrume)
    name = profile.name if profile is not None else clean_name(telescop or instrume)
    if not name:
        raise MissingMetadata("header card TELESCOP (telescope) is missing, and so is INSTRUME")
    exptime = exposure_seconds(header)
    if exptime is None:
        raise MissingMetadata(f"header card EXPTIME (exptime) is missing (nor {', '.join(EXPOSURE_CARDS[1:])})")
    mjd, time_source = exposure_start(header, exptime, profile)
    field, field_source = _field(header, shape, profile.field_grid_deg if profile else 0.5)
    detector = _detector(header, profile)
    if "GAIN" not in detector:  # GAIN = 0 or a word: unknown, read as 1.0 rather than refused
        out.remove("GAIN", ignore_missing=True, remove_all=True)
    raw_filter = _value(header, "FILTER", "FILTNAM", "FILTER1", "FILT-1", "FPA.FILTER", "ESO INS FILT1 NAME")
    band = canonical_band(str(raw_filter), profile) if raw_filter is not None else "clear"
    cards: dict[str, tuple[object, str]] = {
        "ORIGTEL": (telescop or instrume, "telescope as the header named it"),
        "TELESCOP": (name, "telescope (normalised, broker.headers)"),
        "FIELD": (field, "field id (normalised)"), "FIELDSRC": (field_source, "where FIELD came from"),
        "FILTRAW": (str(raw_filter or ""), "filter as the header named it"),
        "FILTER": (band, "canonical band (broker.headers.BANDS)"),
        "MJD-OBS": (mjd, "[d] exposure start, MJD UTC (normalised)"),
        "TIMESRC": (time_source, "where MJD-OBS came from"),
        "EXPTIME": (exptime, "[s] exposure time"),
        **{card: (value, "(normalised)") for card, value in detector.items()},
        "HDRNORM": ("1", "header normalised by broker.headers v1"),
    }
    for card, (value, comment) in cards.items():
        set_card(out, card, value, comment)
    return out


def set_card(header: fits.Header, card: str, value: object, comment: str) -> None:
    """Set ``card`` to ``value``, with ``comment`` only where the 80-character card has room for it.

    A long string value (``ORIGTEL = 'ACP->TCSGalilHybrid.DFM.ASCOM.Telescope'``) would otherwise make
    astropy warn, and truncate, when the frame is written.
    """
    text = str(value) if isinstance(value, str) else ""
    header[card] = (value, comment) if len(card) + len(text) + len(comment) < 52 or not text else value


def rename_grid_field(header: fits.Header, centre: tuple[float, float],
                      profiles: tuple[TelescopeProfile, ...] = ()) -> fits.Header:
    """A copy of ``header`` whose grid field (``FIELDSRC`` POINTING or OBJECT) is renamed from the solved centre.

    ``centre`` is the solved image centre (RA, Dec in deg). A field given by ``FIELD`` or by the
    header WCS is left as it is.
    """
    out = header.copy()
    if str(out.get("FIELDSRC", "")) in ("POINTING", "OBJECT"):
        profile = find_profile(profiles, str(out.get("TELESCOP", "")), "")
        out["FIELD"] = (grid_field(*centre, profile.field_grid_deg if profile else 0.5), "field id (solved pointing)")
        out["FIELDSRC"] = ("SOLVED", "where FIELD came from")
    return out


def mapping_table_markdown() -> str:
    """The mapping table as Markdown (``docs/telescopes.md`` holds it between ``<!-- header-mapping -->`` markers)."""
    rows = ["| canonical card | read from, in order | notes |", "|---|---|---|"]
    rows += [f"| `{row.card}` | {', '.join(row.sources)} | {row.note} |" for row in MAPPING]
    return "\n".join(rows)
