"""Alert packet assembly: one record of schema ``alert/v4`` per candidate.

The packet follows ZTF (v4.02) and Rubin (v11.0): the source with its zero point, limiting magnitude
and position errors, its object and history (detections with magnitudes, upper limits, forced
photometry on earlier difference images) and three cutouts as gzipped FITS with the frame's WCS.
``docs/architecture.md`` ("Alert packet") maps each field to its ZTF and Rubin counterpart.

The cutouts are written here as FITS bytes directly (80-character cards, 2880-byte blocks,
big-endian float32) rather than through ``astropy.io.fits``, which costs ~1 ms per stamp: the alert
stage builds three per alert (``bench/alert_stage.py``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import re
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
from astropy.io import fits
from astropy.wcs import Wcsprm

from broker import __version__
from broker.candidate import Candidate, Detection
from broker.errors import SchemaError

SCHEMA_VERSION = "4.0"
PUBLISHER = f"transient-broker {__version__}"
#: gzip level of the cutouts. Noisy float32 pixels gain < 1 % from levels above 1 at 2-6x the
#: time (measured by ``bench/alert_stage.py``); ISA-L (``isal``) levels run 0-3, zlib's 0-9.
STAMP_COMPRESSLEVEL = 1
#: Largest pixel coordinate given a stamp origin (px): beyond it (or NaN) the stamp gets no WCS.
_MAX_PX = 1e9
#: FITS block size (bytes).
_BLOCK = 2880
#: 2.5 / ln(10): d(mag) / d(ln flux) (mag).
MAG_PER_LN = 2.5 / math.log(10.0)
#: Cards of a WCS header that describe the file, not the sky: never copied into a stamp.
_STRUCTURAL = frozenset({"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "END", "COMMENT",
                         "HISTORY", "", "XTENSION", "PCOUNT", "GCOUNT", "BSCALE", "BZERO", "BLANK", "CHECKSUM",
                         "DATASUM"})
#: Cards a stamp writes itself (dropped from the frame's WCS header to avoid duplicates).
_OWN = frozenset({"BUNIT", "TELESCOP", "FILTER", "MAGZP", "FRAMEID", "TYPE", "CANDID", "OBJECT", "LTV1", "LTV2"})
#: Columns 1-8 of a keyword card: the keyword, then blanks (FITS 4.0, section 4.1.2).
_KEYWORD = re.compile(r"[A-Z0-9_-]{1,8} *")
#: The three stamps of an alert: record field, TYPE card value, file-name suffix.
_STAMPS = (("cutoutScience", "science", "sci"), ("cutoutTemplate", "template", "ref"),
           ("cutoutDifference", "difference", "diff"))


def _compressor() -> Callable[[bytes], bytes]:
    """The gzip (RFC 1952) compression of one FITS file: ISA-L when installed (~6x faster), else zlib."""
    try:
        from isal import isal_zlib
    except ImportError:
        return lambda raw: zlib.compress(raw, STAMP_COMPRESSLEVEL, wbits=31)
    return lambda raw: isal_zlib.compress(raw, STAMP_COMPRESSLEVEL, wbits=31)


_gzip = _compressor()


# --- FITS cards -----------------------------------------------------------------------------------
def _fits_float(value: float) -> str:
    """A finite float as a FITS value with the shortest digits that round-trip.

    At most 24 characters: values over 20 use the free format (columns 11-80) that FITS allows for
    non-mandatory keywords, rather than losing digits.
    """
    text = repr(float(value))
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa if '.' in mantissa else mantissa + '.0'}E{int(exponent):+03d}"
    return text


def _fits_string(value: str) -> str:
    """A quoted FITS string value: printable ASCII, quotes doubled, at most 68 characters in all."""
    text = value[:66]
    if not (text.isascii() and text.isprintable()):
        text = "".join(c if " " <= c <= "~" else "?" for c in text)
    quoted = text.replace("'", "''")
    while len(quoted) > 66:
        text = text[:-1]
        quoted = text.replace("'", "''")
    return f"'{quoted:<8}'"


def card(key: str, value: str | bool | int | float, comment: str = "") -> str:
    """One 80-character FITS header card (``value`` must be finite when it is a float)."""
    if isinstance(value, bool):
        text = ("T" if value else "F").rjust(20)
    elif isinstance(value, int):
        text = str(value).rjust(20)
    elif isinstance(value, float):
        text = _fits_float(value).rjust(20)
    else:
        text = _fits_string(value)
    image = f"{key:<8}= {text}"
    if comment:
        image = f"{image} / {comment}"
    return image[:80].ljust(80)


_END = "END".ljust(80)
#: The TYPE card of each kind of stamp.
_TYPE_CARDS = {kind: card("TYPE", kind, "science, template or difference") for _, kind, _ in _STAMPS}


@lru_cache(maxsize=8)
def _mandatory_cards(ny: int, nx: int) -> str:
    """The cards every FITS image starts with, for a float32 image of ``ny`` rows and ``nx`` columns."""
    return "".join((card("SIMPLE", True, "conforms to FITS standard"), card("BITPIX", -32, "IEEE float32"),
                    card("NAXIS", 2), card("NAXIS1", nx, "columns"), card("NAXIS2", ny, "rows")))


def fits_image(image: np.ndarray, cards: Sequence[str]) -> bytes:
    """A FITS file holding one float32 image and the given header cards.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Pixels; written as big-endian float32 (BITPIX -32), NaN kept.
    cards : sequence of str
        Header card images (multiples of 80 characters) after the mandatory ones.

    Returns
    -------
    bytes
        Header and data, each padded to 2880-byte blocks.
    """
    if image.ndim != 2:
        raise SchemaError(f"a stamp must be a 2-D image, not of shape {image.shape}")
    head = "".join((_mandatory_cards(*image.shape), *cards, _END))
    head += " " * (-len(head) % _BLOCK)
    data = np.ascontiguousarray(image, dtype=">f4").tobytes()
    return head.encode("ascii") + data + b"\0" * (-len(data) % _BLOCK)


# --- the frame ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _StampWCS:
    """The frame's celestial WCS cards, with slots (1, 2) where CRPIX1 and CRPIX2 go."""

    parts: tuple[str | int, ...]
    crpix: tuple[float, float]

    def cards(self, x0: int, y0: int) -> list[str]:
        """Card images of the WCS of a stamp whose pixel (0, 0) is frame pixel (x0, y0) (0-based)."""
        shifted = (card("CRPIX1", self.crpix[0] - x0, "frame CRPIX1 - stamp origin x0"),
                   card("CRPIX2", self.crpix[1] - y0, "frame CRPIX2 - stamp origin y0"))
        return [p if isinstance(p, str) else shifted[p - 1] for p in self.parts]


def _card_images(text: str) -> list[str] | None:
    """The 80-character cards of header text (one string, or one card per line); None if not ASCII."""
    if "\n" in text:
        text = "".join(line.ljust(80) for line in text.splitlines())
    if not (text.isascii() and text.isprintable()):
        return None
    text += " " * (-len(text) % 80)
    return [text[i:i + 80] for i in range(0, len(text), 80)]


def _stamp_wcs(wcs_header: str) -> _StampWCS | None:
    """Parse a frame's WCS header text once; None when it is empty or not a celestial WCS.

    wcslib (``Wcsprm``, ~0.1 ms) checks that the cards hold a celestial WCS and reads CRPIX; the
    cards themselves are copied as they are, but for the structural ones, those a stamp writes
    itself and anything that is not a valued keyword card (commentary, garbage).
    """
    images = _card_images(wcs_header) if wcs_header.strip() else None
    if images is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prm = Wcsprm("".join(images).encode("ascii"), relax=True)
            prm.set()
        except Exception:  # wcslib raises many types (ValueError, WcsError, MemoryError, ...)
            return None
    crpix = (float(prm.crpix[0]), float(prm.crpix[1])) if prm.naxis >= 2 else (math.nan, math.nan)
    if prm.lng < 0 or prm.lat < 0 or not all(map(math.isfinite, (*crpix, *prm.crval))):
        return None
    parts: list[str | int] = []
    kept = False
    for image in images:
        key = image[:8].rstrip()
        if key == "END":
            break
        if key == "CONTINUE":  # the rest of a long string: kept with its card
            if kept:
                parts.append(image)
            continue
        valued = image[8:10] == "= " and _KEYWORD.fullmatch(image[:8]) is not None
        kept = valued and key not in _STRUCTURAL and key not in _OWN
        if key in ("CRPIX1", "CRPIX2"):
            parts.append(int(key[-1]))
            kept = False
        elif kept:
            parts.append(image)
    parts += [slot for slot in (1, 2) if slot not in parts]
    return _StampWCS(tuple(parts), crpix)


@dataclass(frozen=True)
class FrameContext:
    """What an alert needs to know about its frame (built by :func:`frame_context`).

    Attributes
    ----------
    frame_id, telescope, field, filter : str
        The exposure and where and how it was taken.
    mjd_start : float
        Exposure start, MJD (days, UTC).
    exptime : float
        Exposure length (s).
    magzp : float or None
        Zero point (mag of a 1 ADU per exposure source); None when the frame has none.
    reference_frames : tuple of str
        Frames co-added into the reference.
    wcs_header : str
        The frame's celestial WCS as FITS header cards (``astropy.io.fits.Header.tostring()``);
        empty when unknown (v1 batches): the stamps then carry no WCS.
    limiting_flux : float or None
        5-sigma point-source flux limit of the difference image (ADU); None when not measured.
    magzp_err : float or None
        1-sigma uncertainty of ``magzp`` (mag); None when not measured.
    """

    frame_id: str
    telescope: str
    field: str
    filter: str
    mjd_start: float
    exptime: float
    magzp: float | None
    reference_frames: tuple[str, ...]
    wcs_header: str = ""
    limiting_flux: float | None = None
    magzp_err: float | None = None

    @property
    def mjd_mid(self) -> float:
        """Mid-exposure time, MJD (days)."""
        return self.mjd_start + self.exptime / 172800.0

    @cached_property
    def diffmaglim(self) -> float | None:
        """5-sigma limiting magnitude of the difference image (mag), or None."""
        return limiting_magnitude(self.limiting_flux, self.magzp)

    @cached_property
    def stamp_wcs(self) -> _StampWCS | None:
        """The parsed WCS cards (once per frame), or None without a usable WCS."""
        return _stamp_wcs(self.wcs_header)

    @cached_property
    def stamp_cards(self) -> list[str]:
        """Header cards every stamp of the frame carries."""
        cards = [card("BUNIT", "adu", "pixel unit: ADU of the science frame"),
                 card("TELESCOP", self.telescope), card("FILTER", self.filter), card("FRAMEID", self.frame_id)]
        zp = _finite(self.magzp)
        if zp is not None:
            cards.append(card("MAGZP", zp, "mag of 1 ADU per exposure"))
        if self.magzp_err is not None:
            cards.append(card("MAGZPERR", self.magzp_err, "[mag] 1-sigma uncertainty of MAGZP"))
        return cards


def frame_context(batch: dict) -> FrameContext:
    """The :class:`FrameContext` of a decoded ``candidates`` batch of any version (v1: no WCS, no limit).

    The zero point's uncertainty travels in the batch's ``diagnostics`` map (``magzp_err``, mag).
    """
    return FrameContext(batch["frame_id"], batch["telescope"], batch["field"], batch["filter"],
                        float(batch["mjd_start"]), float(batch["exptime"]), _finite(batch.get("magzp")),
                        tuple(batch["reference_frames"]), str(batch.get("wcs_header") or ""),
                        _finite(batch.get("limiting_flux")),
                        _finite((batch.get("diagnostics") or {}).get("magzp_err")))


# --- ids and photometry ---------------------------------------------------------------------------
def alert_id(cand_id: str) -> int:
    """Stable 63-bit id of the alert for ``cand_id`` (also its ``sourceId``)."""
    return int.from_bytes(hashlib.sha1(cand_id.encode()).digest()[:8], "big") & (2**63 - 1)


def object_num_id(object_id: str) -> int:
    """Numeric object id: the hex digits of ``OBJ<13 hex>``, else the first 63 bits of SHA-1."""
    digits = object_id[3:]
    if len(object_id) == 16 and object_id.startswith("OBJ") and all(c in "0123456789abcdef" for c in digits):
        return int(digits, 16)
    return alert_id(object_id)


def _finite(value: float | None) -> float | None:
    """``value`` as a float, or None when it is None or not finite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def limiting_magnitude(limiting_flux: float | None, magzp: float | None) -> float | None:
    """Limiting magnitude magzp - 2.5 log10(limiting_flux) (mag); None without a zp or a positive limit."""
    lim, zp = _finite(limiting_flux), _finite(magzp)
    if lim is None or zp is None or lim <= 0:
        return None
    return zp - 2.5 * math.log10(lim)


def _mag(flux: float, flux_err: float, magzp: float | None) -> tuple[float | None, float | None]:
    """(magpsf, sigmapsf) of a difference flux (mag); (None, None) without a zero point or a flux."""
    zp = _finite(magzp)
    if zp is None or not math.isfinite(flux) or flux == 0:
        return None, None
    return zp - 2.5 * math.log10(abs(flux)), MAG_PER_LN * flux_err / abs(flux)


def _frame_of(cand_id: str) -> str:
    """The frame id of a candidate id ``<frame_id>/<index>``."""
    return cand_id.rpartition("/")[0] or cand_id


# --- records --------------------------------------------------------------------------------------
def _source(ctx: FrameContext, det: Detection) -> dict:
    mag, sig = _mag(det.flux, det.flux_err, ctx.magzp)
    return {
        "mjd": ctx.mjd_start, "mjd_mid": ctx.mjd_mid, "exptime": ctx.exptime, "filter": ctx.filter,
        "ra": det.ra, "dec": det.dec, "ra_err": _finite(det.ra_err),
        "dec_err": _finite(det.dec_err), "x": det.x, "y": det.y,
        "x_err": _finite(det.x_err), "y_err": _finite(det.y_err),
        "flux": det.flux, "flux_err": det.flux_err, "snr": det.snr, "scorr": det.scorr,
        "isdiffpos": bool(det.flux > 0), "magpsf": mag, "sigmapsf": sig, "magzpsci": _finite(ctx.magzp),
        "magzpsciunc": ctx.magzp_err,
        "limiting_flux": ctx.limiting_flux, "diffmaglim": ctx.diffmaglim,
        "fwhm": det.fwhm, "elongation": det.elongation, "dipole": det.dipole, "n_bad": det.n_bad,
        "ref_dist": det.ref_dist, "ref_flux": det.ref_flux,
    }


def _previous(h: dict) -> dict:
    """A ``PreviousSource`` record from an object-history entry."""
    mag, sig = _mag(h["flux"], h["flux_err"], h.get("magzp"))
    return {"candid": h["cand_id"], "sourceId": alert_id(h["cand_id"]), "frame_id": _frame_of(h["cand_id"]),
            "mjd": h["mjd"], "filter": h["filter"], "ra": h["ra"], "dec": h["dec"], "flux": h["flux"],
            "flux_err": h["flux_err"], "snr": h["snr"], "isdiffpos": bool(h["flux"] > 0), "magpsf": mag,
            "sigmapsf": sig, "magzpsci": _finite(h.get("magzp")),
            "diffmaglim": limiting_magnitude(h.get("limiting_flux"), h.get("magzp")), "rb": h.get("rb")}


def _forced(forced: list[dict]) -> list[dict]:
    """``ForcedSource`` records of the forced photometry on earlier frames, oldest first."""
    out = []
    for f in sorted(forced, key=lambda f: f["mjd"]):
        flux, err = float(f["flux"]), float(f["flux_err"])
        out.append({"frame_id": f["frame_id"], "mjd": f["mjd"], "mjd_mid": f["mjd"] + f["exptime"] / 172800.0,
                    "filter": f["filter"], "flux": flux, "flux_err": err,
                    "snr": flux / err if err > 0 and math.isfinite(flux) else None,
                    "magzpsci": _finite(f.get("magzp")),
                    "diffmaglim": limiting_magnitude(f.get("limiting_flux"), f.get("magzp"))})
    return out


def upper_limits(frame_id: str, forced: list[dict], history: list[dict]) -> list[dict]:
    """``NonDetection`` records: frames that covered the position with no detection of the object.

    Parameters
    ----------
    frame_id : str
        The alert's own frame (never an upper limit of itself).
    forced : list of dict
        ``Candidate.forced``: one entry per earlier frame that covered the position.
    history : list of dict
        ``Candidate.history``: the object's earlier detections; their frames are not upper limits.
    """
    detected = {_frame_of(h["cand_id"]) for h in history} | {frame_id}
    return [{"frame_id": f["frame_id"], "mjd": f["mjd"], "filter": f["filter"],
             "limiting_flux": _finite(f.get("limiting_flux")),
             "diffmaglim": limiting_magnitude(f.get("limiting_flux"), f.get("magzp"))}
            for f in sorted(forced, key=lambda f: f["mjd"]) if f["frame_id"] not in detected]


# --- cutouts --------------------------------------------------------------------------------------
def stamp(image: np.ndarray, name: str, cards: Sequence[str] = ()) -> dict:
    """A cutout as ZTF ships it: ``{fileName, stampData}`` with gzipped FITS bytes."""
    return {"fileName": name, "stampData": _gzip(fits_image(np.asarray(image), cards))}


def read_stamp(stamp_data: bytes) -> np.ndarray:
    """Pixels of a stamp written by :func:`stamp` (also reads ZTF's gzipped-FITS cutouts)."""
    raw = gzip.decompress(stamp_data) if stamp_data[:2] == b"\x1f\x8b" else stamp_data
    with fits.open(io.BytesIO(raw)) as hdul:
        return np.asarray(hdul[0].data, dtype=np.float32)


def _cutouts(ctx: FrameContext, cand: Candidate, object_id: str) -> dict:
    """The three ``Cutout`` records of ``cand``, each with the frame's WCS shifted to the stamp."""
    det, name = cand.detection, cand.cand_id.replace("/", "_")
    common = [*ctx.stamp_cards, card("CANDID", cand.cand_id), card("OBJECT", object_id)]
    ny, nx = np.shape(cand.science)[-2:] if np.ndim(cand.science) >= 2 else (0, 0)
    if abs(det.x) < _MAX_PX and abs(det.y) < _MAX_PX:  # the origin rule of broker.cutouts.cutout
        x0, y0 = round(det.x) - nx // 2, round(det.y) - ny // 2
        common += [card("LTV1", -x0, "stamp px = frame px + LTV (IRAF)"), card("LTV2", -y0)]
        if ctx.stamp_wcs is not None:
            common += ctx.stamp_wcs.cards(x0, y0)
    images = (cand.science, cand.reference, cand.difference)
    return {key: stamp(image, f"{name}_{suffix}.fits.gz", [_TYPE_CARDS[kind], *common])
            for (key, kind, suffix), image in zip(_STAMPS, images, strict=True)}


def alert_fields(ctx: FrameContext, cand: Candidate, model_versions: dict[str, str]) -> dict:
    """The fields of ``cand``'s alert that the score stage knows: all but the cutouts, follow-up and timing.

    What follow-up rules are evaluated on (``[[followup.rules]]``): the same paths as the alert.
    See :func:`build_alert` for the parameters.

    Raises
    ------
    SchemaError
        The candidate has not been classified and scored.
    """
    det, obj = cand.detection, cand.obj
    if obj is None or cand.anomaly is None:
        raise SchemaError(f"candidate {cand.cand_id} has not been classified and scored")
    source_id = alert_id(cand.cand_id)
    return {
        "schemavsn": SCHEMA_VERSION, "publisher": PUBLISHER, "alertId": source_id, "sourceId": source_id,
        "objectId": obj.object_id, "candid": cand.cand_id,
        "source": _source(ctx, det),
        "object": {"objectId": obj.object_id, "objectIdNum": object_num_id(obj.object_id), "ra": obj.ra,
                   "dec": obj.dec, "ndet": obj.ndet, "first_mjd": obj.first_mjd},
        "prv_sources": [_previous(h) for h in cand.history],
        "prv_nondetections": upper_limits(ctx.frame_id, cand.forced, cand.history),
        "prv_forced_sources": _forced(cand.forced),
        "scores": {"rb": cand.rb, "rb_model": model_versions.get("rb", ""), "anomaly": float(cand.anomaly),
                   "anomaly_model": model_versions.get("anomaly", "")},
        "context": cand.context, "features": cand.features, "classification": cand.classification,
        "provenance": {"telescope": ctx.telescope, "field": ctx.field, "frame_id": ctx.frame_id,
                       "reference_frames": list(ctx.reference_frames), "pipeline_version": __version__},
    }


def build_alert(ctx: FrameContext, cand: Candidate, model_versions: dict[str, str],
                timing: dict, alert_time: float) -> dict:
    """The ``alert/v4`` record of ``cand``.

    Parameters
    ----------
    ctx : FrameContext
        The candidate's frame (:func:`frame_context`).
    cand : Candidate
        A classified and scored candidate (``obj`` and ``anomaly`` set); its ``history`` and
        ``forced`` (when present) give the previous sources, upper limits and forced photometry;
        its ``context``, ``features``, ``classification`` and ``followup`` records are copied as they
        are (null when the score stage set none).
    model_versions : dict
        ``{"rb": str, "anomaly": str}`` (a model not named: ``""``).
    timing : dict
        ``{"exposure_end": float, "stages": [{"stage", "start", "end"}, ...]}`` (Unix s).
    alert_time : float
        When the packet is made (Unix s).

    Raises
    ------
    SchemaError
        The candidate has not been scored, or a cutout is not a 2-D image.
    """
    fields = alert_fields(ctx, cand, model_versions)
    return {**fields, **_cutouts(ctx, cand, fields["objectId"]), "followup": cand.followup,
            "timing": {**timing, "alert_time": alert_time}}
