"""Frames: one exposure's pixels, WCS and metadata, and their FITS encoding.

A frame travels as tile-compressed FITS bytes (RICE for integer pixels, lossless GZIP for
floating-point pixels, so that no quantisation noise is added before subtraction). The header
cards below are what the broker reads; a header that lacks one of the required ones is first
normalised from its real conventions (:func:`broker.headers.normalise_header`: ``DATE-OBS``, ``JD``,
``EXPOSURE``, ``OBJECT``, vendor filter names, a telescope profile), and a raw colour-sensor frame
is binned to luminance (:mod:`broker.bayer`). :func:`decode_fits` raises a typed
:class:`~broker.errors.InvalidFrame` subclass that names what is wrong with a file.
"""

from __future__ import annotations

import bz2
import copy
import hashlib
import io
import math
import re
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from broker.bayer import bayer_pattern, colour_planes_luminance, superpixel_luminance
from broker.errors import (
    BadShape,
    CorruptFrame,
    ImplausibleCompression,
    ImplausibleHeader,
    InvalidFrame,
    MissingMetadata,
    MissingWCS,
    TooManyPixels,
    UnparseableHeader,
)
from broker.headers import check_frame_type, normalise_header, wcs_frame_problem, zero_point_cards
from broker.telescopes import TelescopeProfile

#: Header cards read into :class:`FrameMeta` (card, attribute, type, required).
_CARDS: tuple[tuple[str, str, type, bool], ...] = (
    ("TELESCOP", "telescope", str, True),
    ("FIELD", "field", str, True),
    ("FILTER", "filter", str, True),
    ("MJD-OBS", "mjd_start", float, True),
    ("EXPTIME", "exptime", float, True),
    ("GAIN", "gain", float, False),
    ("RDNOISE", "read_noise", float, False),
    ("SATURATE", "saturation", float, False),
    ("MAGZP", "magzp", float, False),
    ("MAGZPERR", "magzp_err", float, False),
)

#: The cards :func:`meta_from_header` reads: an unparseable value of one is refused, never guessed.
_META_CARDS = frozenset(card for card, _, _, _ in _CARDS) | {"FRAMEID"}

#: The cards without which a header is normalised first (:func:`broker.headers.normalise_header`).
_REQUIRED = tuple(card for card, _, _, required in _CARDS if required)


@dataclass(frozen=True)
class FrameMeta:
    """Exposure metadata.

    Attributes
    ----------
    frame_id : str
        Unique id of the exposure (``FRAMEID`` card, else telescope-field-filter-MJD).
    telescope, field, filter : str
        Where and how it was taken; together they key the reference image.
    mjd_start : float
        Exposure start, MJD (days, UTC).
    exptime : float
        Exposure length (s).
    gain : float
        e-/ADU; 1.0 when the header has none.
    read_noise : float
        Read noise (e-); 0.0 when unknown (the noise model then uses the measured sky RMS alone).
    saturation : float
        Saturation level (ADU); +inf when unknown.
    magzp : float or None
        Photometric zero point (mag of a 1 ADU/exposure source), when the header gives one.
    magzp_err : float or None
        1-sigma uncertainty of ``magzp`` (mag), when measured (:mod:`broker.photcal`).
    """

    frame_id: str
    telescope: str
    field: str
    filter: str
    mjd_start: float
    exptime: float
    gain: float = 1.0
    read_noise: float = 0.0
    saturation: float = float("inf")
    magzp: float | None = None
    magzp_err: float | None = None

    @property
    def mjd_end(self) -> float:
        """Exposure end (shutter close), MJD."""
        return self.mjd_start + self.exptime / 86400.0

    @property
    def reference_key(self) -> tuple[str, str, str]:
        """(telescope, field, filter): the key of the reference image this frame needs."""
        return (self.telescope, self.field, self.filter)


@dataclass
class Frame:
    """One exposure.

    Attributes
    ----------
    meta : FrameMeta
    data : ndarray, shape (ny, nx), float32
        Pixels in ADU, NaN where invalid.
    header : astropy.io.fits.Header
        The full original header (WCS and any other cards).
    """

    meta: FrameMeta
    data: np.ndarray
    header: fits.Header

    @property
    def wcs(self) -> WCS:
        """Celestial WCS of the frame (raises :class:`MissingWCS` when absent)."""
        return celestial_wcs(self.header)

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) in px."""
        return self.data.shape


#: Celestial WCSs parsed, by the SHA-256 of their header's text (the last :data:`_PARSED_WCS_KEPT` parsed):
#: a frame's is needed some ten times between decoding and subtraction, and astropy parses the whole header
#: each time (2.2 s at 98,000 cards, most of a prediction's 41 s).
_PARSED_WCS: dict[str, WCS] = {}
_PARSED_WCS_KEPT = 16
_PARSED_WCS_LOCK = threading.Lock()


def celestial_wcs(header: fits.Header) -> WCS:
    """Return the celestial WCS of ``header`` (a copy of its own) or raise :class:`MissingWCS`.

    A header of the same text as one parsed recently is not parsed again (:data:`_PARSED_WCS`).
    """
    try:
        key = hashlib.sha256(header.tostring().encode("utf-8", "surrogatepass")).hexdigest()
    except Exception:  # astropy: a card it cannot write; the parse names it
        return _parse_celestial_wcs(header)
    with _PARSED_WCS_LOCK:
        parsed = _PARSED_WCS.get(key)
    if parsed is None:
        parsed = _parse_celestial_wcs(header)
        with _PARSED_WCS_LOCK:
            while len(_PARSED_WCS) >= _PARSED_WCS_KEPT:
                del _PARSED_WCS[next(iter(_PARSED_WCS))]
            _PARSED_WCS[key] = parsed
    return copy.deepcopy(parsed)


def _parse_celestial_wcs(header: fits.Header) -> WCS:
    """The celestial WCS astropy parses from ``header``, or :class:`MissingWCS`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header, naxis=2)
        except Exception as exc:  # astropy raises many types for broken WCS cards
            raise MissingWCS(f"WCS cards cannot be parsed: {exc}") from exc
    if not wcs.has_celestial or wcs.celestial.naxis != 2:
        raise MissingWCS("no celestial WCS (CTYPE1/2 with RA/Dec and a projection are required)")
    problem = wcs_frame_problem(wcs.celestial)
    if problem:
        raise MissingWCS(f"the WCS {problem}: only equatorial RA, Dec (ICRS or FK5 J2000) in that order are read")
    return wcs.celestial


def has_wcs(header: fits.Header) -> bool:
    """Whether ``header`` holds a usable celestial WCS (:func:`celestial_wcs` does not raise)."""
    try:
        celestial_wcs(header)
    except MissingWCS:
        return False
    return True


def _card(header: fits.Header, card: str) -> object:
    """The value of ``card`` (None when absent), or :class:`UnparseableHeader` naming the card as written."""
    try:
        return header.get(card)
    except Exception as exc:  # astropy: VerifyError, ValueError on a value string it cannot parse
        raise _unparseable(header.cards[card], card) from exc


def _unparseable(card: fits.Card, keyword: str) -> UnparseableHeader:
    """The error naming ``card`` as written (``.image`` would "fix" it first), cut to 120 characters."""
    raw = str(getattr(card, "_image", None) or keyword).strip()
    return UnparseableHeader(f"header card {keyword} cannot be parsed: {raw[:120]!r}")


#: Count cards astropy allocates or loops over (card: largest value, what it counts). No real header comes near:
#: ``WCSAXES = 3000`` took 1.6 s and ``A_ORDER = 3000`` 18 s per WCS built (a frame builds ~10), ``TFIELDS =
#: 1000000000`` hours per header copy; ``TFIELDS = 'nan'`` raised TypeError whenever a header was extended.
_COUNT_CARDS: dict[str, tuple[int, str]] = {
    "TFIELDS": (999, "columns of a table"), "WCSAXES": (99, "WCS axes"),
    **{f"{p}_ORDER": (20, "SIP distortion order") for p in ("A", "B", "AP", "BP")},
}


def _lacks_value_indicator(card: fits.Card) -> bool:
    """Whether ``card`` is a keyword card whose columns 9-10 are not ``= `` (a bit flipped in the ``=``).

    astropy keeps such a card with the rest of the line as its value and refuses to set another
    one: normalising the header raised ValueError.
    """
    commentary = card.keyword in ("", "COMMENT", "HISTORY") or card.image.startswith(("HIERARCH", "CONTINUE"))
    return not commentary and card.image[8:10] != "= "


def check_cards(header: fits.Header) -> None:
    """Refuse a header with a card that FITS cannot write, or a count no image has; fix what astropy can.

    A card astropy cannot write (an illegal keyword such as ``CRPI@1``, a character that is not
    printable ASCII, a keyword without its ``= ``) once stopped the ingest stage when it wrote the calibrated frame
    (:func:`encode_fits`), and an unparseable value (``IMAGETYP = -``) any step that read it. The
    value of a card :func:`meta_from_header` reads must parse (``EXPTIME = NaN``, ``GAIN = 1.5.2``:
    no guessing); any other unparseable value becomes the string as written, as astropy fixes it (a
    lower-case keyword is fixed too). ``header`` is fixed in place.

    Raises
    ------
    UnparseableHeader
        A card that cannot be written, or a card read into :class:`FrameMeta` that cannot be parsed,
        named as written.
    ImplausibleHeader
        A card of :data:`_COUNT_CARDS` that is not an integer within its bounds.
    """
    for card in header.cards:
        keyword = card.keyword if card.keyword.isprintable() else repr(card.keyword)
        try:
            if card.keyword in _META_CARDS:
                _ = card.value
            card.verify("silentfix+exception")
            value = card.value
        except Exception as exc:  # astropy: VerifyError, ValueError
            raise _unparseable(card, keyword) from exc
        if _lacks_value_indicator(card):  # astropy reads it, but no value can ever be set on it
            raise _unparseable(card, keyword)
        largest, what = _COUNT_CARDS.get(card.keyword, (None, ""))
        if largest is not None and not (type(value) is int and 0 <= value <= largest):
            raise ImplausibleHeader(f"header card {card.keyword} = {value!r} is not a count of {what} "
                                    f"(an integer in [0, {largest}])")


def meta_from_header(header: fits.Header) -> FrameMeta:
    """Read :class:`FrameMeta` from FITS cards.

    Raises
    ------
    MissingMetadata
        A required card is absent, not a number (a logical T/F included) or not finite, or EXPTIME <= 0.
    UnparseableHeader
        A card's value cannot be parsed at all (``EXPTIME = NaN``; a subclass of MissingMetadata).
    """
    values: dict[str, object] = {}
    for card, attr, kind, required in _CARDS:
        raw = _card(header, card)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            if required:
                raise MissingMetadata(f"header card {card} ({attr}) is missing")
            continue
        if kind is float and isinstance(raw, bool):  # ``EXPTIME = T`` would read as 1 s
            raise MissingMetadata(f"header card {card}={raw!r} is a logical (T/F), not a number")
        try:
            value = kind(raw.strip() if isinstance(raw, str) else raw)
        except (TypeError, ValueError) as exc:
            raise MissingMetadata(f"header card {card}={raw!r} is not a {kind.__name__}") from exc
        if kind is float and not np.isfinite(value):
            raise MissingMetadata(f"header card {card}={raw!r} is not finite")
        values[attr] = value
    if values["exptime"] <= 0:  # type: ignore[operator]
        raise MissingMetadata(f"EXPTIME={values['exptime']} must be > 0 s")
    frame_id = str(_card(header, "FRAMEID") or "").strip() or (
        f"{values['telescope']}-{values['field']}-{values['filter']}-{values['mjd_start']:.6f}"
    )
    return FrameMeta(frame_id=frame_id, **values)  # type: ignore[arg-type]


#: Bytes per pixel of each FITS BITPIX.
_BYTES_PER_PIXEL = {8: 1, 16: 2, 32: 4, 64: 8, -32: 4, -64: 8}


#: Names (``EXTNAME`` or Rubin's ``EXTTYPE``) of the planes written beside a science image: bad-pixel masks
#: (LCO BANZAI ``BPM``, HST ``DQ``, Rubin ``MASK``), uncertainties (``ERR``, ``VARIANCE``), drizzle weights and
#: contexts (HST ``WHT``, ``CTX``), exposure maps. They are never the frame's image.
AUXILIARY_PLANES = frozenset({
    "BPM", "MASK", "DQ", "FLAGS", "ERR", "ERROR", "SIGMA", "UNC", "UNCERT", "RMS", "NOISE", "VAR", "VARIANCE",
    "IVAR", "WHT", "WEIGHT", "CTX", "CON", "EXP", "EXPMAP", "SAT", "SAMP", "TIME",
})


def _plane_name(hdu: fits.hdu.base.ExtensionHDU | fits.PrimaryHDU) -> str:
    """The HDU's ``EXTNAME`` (else ``EXTTYPE``), upper-cased; '' when it has neither."""
    for card in ("EXTNAME", "EXTTYPE"):
        value = hdu.header.get(card)
        if isinstance(value, str) and value.strip():
            return value.strip().upper()
    return ""


def _science_hdus(hdul: fits.HDUList) -> list[tuple[str, fits.hdu.base.ExtensionHDU | fits.PrimaryHDU]]:
    """The HDUs that may hold the frame's image, each with its name, found from the headers alone.

    Planes of :data:`AUXILIARY_PLANES` are passed over (a mask or error plane before the image no
    longer stands in for it); of the others, those named ``SCI`` win (LCO, HST). A name is the
    ``EXTNAME`` (else ``EXTTYPE``) made of letters, digits and ``._+-``, else ``HDU<index>``; a name
    that several images share gets ``-<index>`` (HST's two ``SCI`` chips).
    """
    images = [(i, h) for i, h in enumerate(hdul) if h.is_image and len(h.shape or ()) > 0]
    if not images:
        raise CorruptFrame("the FITS file holds no image data")
    science = [(i, h) for i, h in images if _plane_name(h) not in AUXILIARY_PLANES]
    science = [(i, h) for i, h in science if _plane_name(h) == "SCI"] or science
    if not science:
        raise BadShape("the FITS file holds only auxiliary planes (" + ", ".join(_plane_name(h) for _, h in images)
                       + "), no science image")
    names = [re.sub(r"[^A-Za-z0-9._+-]", "_", _plane_name(h))[:16] or f"HDU{i}" for i, h in science]
    return [(f"{n}-{i}" if names.count(n) > 1 else n, h) for n, (i, h) in zip(names, science, strict=True)]


def _image_hdu(hdul: fits.HDUList, image: str | None = None) -> fits.hdu.base.ExtensionHDU | fits.PrimaryHDU:
    """The HDU that holds the frame's image: the one science image (:func:`_science_hdus`), or the one named ``image``.

    Several images and no ``image`` (a mosaic camera's CCDs, HST's two ``SCI`` chips) are refused:
    which one is meant cannot be told (``broker produce`` sends each, :func:`science_images`).
    """
    science = _science_hdus(hdul)
    if image is not None:
        chosen = [h for n, h in science if n == image]
        if not chosen:
            raise BadShape(f"the FITS file holds no science image named {image!r} "
                           f"({', '.join(n for n, _ in science[:8])}{', ...' if len(science) > 8 else ''})")
        return chosen[0]
    if len(science) > 1:
        named = ", ".join(n for n, _ in science[:8])
        raise BadShape(f"the FITS file holds {len(science)} images ({named}{', ...' if len(science) > 8 else ''}): "
                       "a mosaic camera's CCDs or several exposures; send one image per file, or send the file "
                       "with broker produce, which sends each image as a frame of its own")
    return science[0][1]


def science_images(payload: bytes, max_pixels: int | None = None, max_expansion: float | None = None) -> list[str]:
    """The names of the science images of FITS bytes (plain, tile-compressed, gzipped or bzip2), read from headers only.

    One name per image that :func:`decode_fits` takes as ``image`` (a mosaic camera's CCDs by
    ``EXTNAME``: DECam's ``N4``, ``S31``); a file of one image gives one name.

    Raises
    ------
    CorruptFrame, BadShape
        As :func:`decode_fits`: not FITS, no image, only auxiliary planes.
    """
    if not payload:
        raise CorruptFrame("empty payload (0 bytes)")
    if is_compressed(payload):
        payload = uncompressed(payload, max_pixels, max_expansion)
    check_structure(payload)
    try:
        with fits.open(io.BytesIO(payload), memmap=False, lazy_load_hdus=True) as hdul:
            return [name for name, _ in _science_hdus(hdul)]
    except InvalidFrame:
        raise
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError, ... on garbage
        raise CorruptFrame(f"not a readable FITS file: {type(exc).__name__}: {exc}") from exc


#: Most HDUs in one FITS file: a mosaic camera writes one per CCD (DECam 70, Rubin 189).
MAX_HDUS = 1000
#: Most cards in one header: a survey frame's has a few hundred; astropy parses every one.
MAX_HEADER_CARDS = 100_000
#: Largest count of axes or table columns (the FITS standard's limit for NAXIS, ZNAXIS, TFIELDS).
_MAX_COUNT = 999
_BYTES_PER_BITPIX = {8: 1, 16: 2, 32: 4, 64: 8, -32: 4, -64: 8}
#: The cards :func:`check_structure` reads.
_SIZE_CARD = re.compile(r"^(?:BITPIX|PCOUNT|GCOUNT|TFIELDS|Z?NAXIS\d*)$")


#: Leading bytes of files sent for FITS that are not: what a refusal names them.
OTHER_FORMATS = {
    b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"II*\x00": "a TIFF image or camera raw",
    b"MM\x00*": "a TIFF image or camera raw", b"XISF0100": "a PixInsight XISF image",
    b"LUCAM-RECORDER": "a SER video", b"\x1f\x9d": "a Unix-compressed (.Z) file",
    b"BZh": "bzip2 inside a compressed file",
    b"\xfd7zXZ\x00": "an xz file", b"PK\x03\x04": "a zip archive", b"\x28\xb5\x2f\xfd": "a zstd file",
    b"\x1f\x8b": "gzip inside a compressed file",
}


def check_structure(payload: bytes) -> int:
    """Refuse FITS bytes whose headers would make astropy loop, before astropy reads any of them.

    The headers are walked in the raw bytes, each HDU's data skipped by its size cards. Refused:
    an axis or column count above 999 (astropy reads ``NAXISn`` one by one: ``NAXIS = 2147483648``
    never finished), a negative size card (a negative data size sent astropy back to the header
    it had read, forever, its memory growing ~1 GB every 20 s), a size card that is not an integer,
    a header without its END card within :data:`MAX_HEADER_CARDS`, more than :data:`MAX_HDUS`
    HDUs. Bytes after the last HDU that do not start an extension are left to astropy.

    Returns
    -------
    int
        Bytes of data the headers announce beyond the end of ``payload`` (0 for a whole file): a
        file cut short, which :func:`decode_fits` names as such once its size was checked.

    Raises
    ------
    CorruptFrame
        Also for bytes that do not start as FITS (``SIMPLE``), naming the format when it is one of
        :data:`OTHER_FORMATS`.
    """
    if payload[:6] != b"SIMPLE":
        kind = next((name for magic, name in OTHER_FORMATS.items() if payload.startswith(magic)), None)
        raise CorruptFrame(f"not a FITS file ({kind or f'it starts with {payload[:16]!r}'}): send the FITS file "
                           "the camera or its capture software wrote")
    offset = 0
    for index in range(MAX_HDUS + 1):
        if offset >= len(payload) or (index and payload[offset:offset + 8] != b"XTENSION"):
            return 0
        if index == MAX_HDUS:
            raise CorruptFrame(f"the FITS file holds more than {MAX_HDUS} HDUs")
        end = _end_card(payload, offset, index)
        cards = _size_cards(payload[offset:end], index)
        data = _BYTES_PER_BITPIX.get(cards.get("BITPIX", 8), 1) * _data_elements(cards)
        if _blocks(end + 80) + data > len(payload):
            return _blocks(end + 80) + data - len(payload)
        offset = _blocks(end + 80) + _blocks(data)
    return 0


def _blocks(nbytes: int) -> int:
    """``nbytes`` rounded up to whole 2880-byte FITS blocks."""
    return -(-nbytes // 2880) * 2880


def _end_card(payload: bytes, start: int, index: int) -> int:
    """Offset of the END card of the header that starts at ``start``."""
    limit, at = start + MAX_HEADER_CARDS * 80, start
    while (at := payload.find(b"END     ", at, limit)) >= 0 and (at - start) % 80:
        at += 1
    if at < 0:
        raise CorruptFrame(f"HDU {index}: no END card in its header (or more than {MAX_HEADER_CARDS} cards)")
    return at


def _size_cards(header: bytes, index: int) -> dict[str, int]:
    """The integer cards of a raw header that size its data and its loops, each checked."""
    cards: dict[str, int] = {}
    for at in range(0, len(header), 80):
        key = header[at:at + 8].decode("latin-1").strip()
        if not _SIZE_CARD.match(key) or (key == "TFIELDS" and index == 0):  # no table in a primary HDU
            continue
        text = header[at + 10:at + 80].decode("latin-1").split("/")[0].strip()
        try:
            value = int(text)
        except ValueError:
            raise CorruptFrame(f"HDU {index}: {key} = {text[:20]!r} is not an integer") from None
        limit = _MAX_COUNT if key in ("NAXIS", "ZNAXIS", "TFIELDS") else None
        if key != "BITPIX" and (value < 0 or (limit is not None and value > limit)):
            raise CorruptFrame(f"HDU {index}: {key} = {value} is out of range (0 to {limit or 'any size'})")
        cards[key] = value
    return cards


def _data_elements(cards: dict[str, int]) -> int:
    """Elements of an HDU's data: GCOUNT x (PCOUNT + the product of its axes), 0 without axes."""
    axes = [cards.get(f"NAXIS{i}", 0) for i in range(1, cards.get("NAXIS", 0) + 1)]
    if not axes:
        return 0
    if axes[0] == 0 and len(axes) > 1:  # random groups: NAXIS1 = 0
        axes = axes[1:]
    return cards.get("GCOUNT", 1) * (cards.get("PCOUNT", 0) + math.prod(axes))


def check_image_size(shape: tuple[int, ...], bitpix: int, payload_bytes: int, max_pixels: int | None = None,
                     max_expansion: float | None = None) -> None:
    """Refuse an image by its header before its pixels are read (decompression bombs).

    Parameters
    ----------
    shape : tuple of int
        The image shape announced by the header (NAXISn, or ZNAXISn of a compressed image).
    bitpix : int
        Its BITPIX (ZBITPIX when compressed).
    payload_bytes : int
        Size of the whole FITS file (bytes).
    max_pixels : int, optional
        Most pixels accepted (count); None: no limit.
    max_expansion : float, optional
        Largest ratio of the decoded image's bytes to the file's bytes; None: no limit.

    Raises
    ------
    TooManyPixels
        More pixels than ``max_pixels``.
    ImplausibleCompression
        The image would expand more than ``max_expansion`` times.
    """
    npix = int(np.prod([int(n) for n in shape], dtype=np.int64))
    size = "x".join(str(int(n)) for n in reversed(shape))
    if max_pixels is not None and npix > max_pixels:
        raise TooManyPixels(f"image is {size} px = {npix / 1e6:.1f} Mpx, over the {max_pixels / 1e6:.1f} Mpx limit "
                            "(refused before decompression)")
    decoded = npix * _BYTES_PER_PIXEL.get(int(bitpix), 8)
    if max_expansion is not None and decoded > max_expansion * max(payload_bytes, 1):
        raise ImplausibleCompression(
            f"{payload_bytes / 1e6:.2f} MB of FITS would expand to {decoded / 1e6:.0f} MB of {size} pixels "
            f"({decoded / max(payload_bytes, 1):.0f}x, limit {max_expansion:g}x): refused before decompression")


GZIP_MAGIC = b"\x1f\x8b"
#: Leading bytes of a bzip2 stream (SDSS distributes its frames as ``.fits.bz2``).
BZIP2_MAGIC = b"BZh"
#: Header bytes allowed beside the pixels when a compressed file's inflated size is bounded (1000 blocks).
_HEADER_ALLOWANCE = 1000 * 2880


def is_compressed(payload: bytes) -> bool:
    """Whether bytes start as a gzip or bzip2 stream (a ``.fits.gz`` or ``.fits.bz2`` file)."""
    return payload[:2] == GZIP_MAGIC or payload[:3] == BZIP2_MAGIC


def uncompressed(payload: bytes, max_pixels: int | None = None, max_expansion: float | None = None) -> bytes:
    """The FITS bytes of a gzipped or bzip2 file, inflated no further than its image may be.

    The bound is ``max_expansion`` times the compressed bytes and ``max_pixels`` 8-byte pixels plus
    :data:`_HEADER_ALLOWANCE`, whichever is smaller (none without either); see :func:`inflate`.
    """
    bounds = [int(max_expansion * len(payload))] if max_expansion is not None else []
    bounds += [max_pixels * 8 + _HEADER_ALLOWANCE] if max_pixels is not None else []
    return inflate(payload, min(bounds, default=0))


def inflate(payload: bytes, limit: int = 0) -> bytes:
    """The content of a gzip or bzip2 stream, refused once it passes ``limit`` bytes (0: no bound).

    A compression bomb is refused after ``limit`` bytes, not held in memory whole. Concatenated
    members (gzip's, bzip2's, or both in turn) are read in turn. Frames (:func:`uncompressed`), alert
    stamps (:func:`broker.normalise.decode_stamp`), subscribers' cutouts (:mod:`streams.triplet_png`)
    and the portal's FITS cutouts (:mod:`streams.web.render`) are inflated here.

    Raises
    ------
    CorruptFrame
        The stream is corrupt or cut short.
    ImplausibleCompression
        It inflates beyond ``limit``.
    """
    out, rest, kind = bytearray(), payload, "gzip"
    try:
        while is_compressed(rest):
            kind = "gzip" if rest[:2] == GZIP_MAGIC else "bzip2"
            inflater: Any = zlib.decompressobj(16 + zlib.MAX_WBITS) if kind == "gzip" else bz2.BZ2Decompressor()
            room = limit + 1 - len(out) if limit else (0 if kind == "gzip" else -1)
            out += inflater.decompress(rest, room)
            if limit and len(out) > limit:
                raise ImplausibleCompression(f"{len(payload) / 1e6:.2f} MB of {kind} inflate beyond "
                                             f"{limit / 1e6:.1f} MB: refused before inflating further")
            if not inflater.eof:
                raise CorruptFrame(f"{kind} stream cut short after {len(out)} inflated bytes")
            rest = inflater.unused_data
    except (zlib.error, OSError, EOFError) as exc:
        raise CorruptFrame(f"corrupt {kind} stream: {exc}") from exc
    return bytes(out)


def decode_fits(payload: bytes, max_pixels: int | None = None, max_expansion: float | None = None,
                profiles: tuple[TelescopeProfile, ...] = (), require_wcs: bool = True,
                telescope: str | None = None, image: str | None = None) -> Frame:
    """Decode FITS bytes (plain, tile-compressed, gzipped or bzip2) into a :class:`Frame`.

    The image's size is checked from its header before any pixel is decompressed
    (:func:`check_image_size`; the stages pass ``IngestConfig.max_pixels`` and ``max_expansion``).
    A header without one of the required cards is normalised (:func:`broker.headers.normalise_header`
    with ``profiles``) and a raw Bayer frame binned to luminance (:func:`broker.bayer.superpixel_luminance`).
    ``require_wcs=False`` (the producer and the ingest stage, which plate-solves) accepts a frame
    without a celestial WCS. ``telescope`` (``broker produce --telescope``) names the telescope, or
    the profile, of a header whose ``TELESCOP`` and ``INSTRUME`` are both absent or blank; a header
    that names one keeps it. ``image`` (a name of :func:`science_images`) decodes that image of a
    mosaic file as a frame of its own: its field is the file's field then ``.<image>`` (``FIELD``;
    ``MOSAICIM`` keeps the name), so that each CCD has its own references.

    Raises
    ------
    CorruptFrame
        The bytes are not FITS or hold no image.
    TooManyPixels, ImplausibleCompression
        The header announces more pixels than ``max_pixels``, or more than ``max_expansion`` times
        the file's bytes.
    BadShape
        The image is neither 2-D nor a cube of one or three planes, or not numeric; the file holds
        several science images (a mosaic's CCDs) or only auxiliary planes (:func:`_image_hdu`).
    NotScience
        A frame-type card names a dark, flat or bias (:func:`broker.headers.check_frame_type`).
    MissingMetadata, UnparseableHeader, MissingWCS
        Required cards are missing or cannot be parsed.
    """
    reading, payload = _reading(payload, max_pixels, max_expansion, profiles, require_wcs, telescope)
    with _read_as_fits():
        hdul = fits.open(io.BytesIO(payload), memmap=False)
    with hdul:
        with _read_as_fits():
            hdu = _image_hdu(hdul, image)
        return _frame_of(hdul, hdu, image, reading)


def decode_mosaic(payload: bytes, max_pixels: int | None = None, max_expansion: float | None = None,
                  profiles: tuple[TelescopeProfile, ...] = (), require_wcs: bool = True,
                  telescope: str | None = None) -> Iterator[tuple[str, Frame | InvalidFrame]]:
    """Each science image of a FITS file, as :func:`decode_fits` with ``image=`` its name gives it, the file read once.

    For a mosaic camera's file (``broker produce``): an image refused (a dead CCD) is its
    :class:`InvalidFrame` in place of its frame, and the next images follow. Each image's pixels are
    let go once its frame is made. Decoding the file once per image read every header of the file
    again for each image: 62 CCDs of 64x64 pixels and 200 cards took 5.3 s, quadratic in the count.

    Yields
    ------
    (str, Frame or InvalidFrame)
        The image's name (:func:`science_images`) and its frame, or why it is refused.

    Raises
    ------
    CorruptFrame, BadShape, TooManyPixels, ImplausibleCompression
        The file as a whole cannot be read (as :func:`science_images`), before any image is yielded.
    """
    reading, payload = _reading(payload, max_pixels, max_expansion, profiles, require_wcs, telescope)
    with _read_as_fits():
        hdul = fits.open(io.BytesIO(payload), memmap=False)
        science = _science_hdus(hdul)
    with hdul:
        for name, hdu in science:
            try:
                yield name, _frame_of(hdul, hdu, name, reading)
            except InvalidFrame as exc:
                yield name, exc
            del hdu.data  # its pixels are the frame's now


@dataclass(frozen=True)
class _Reading:
    """How each image of one FITS file is read: the file's size as sent and the caller's limits and options."""

    sent_bytes: int
    missing: int  # bytes its headers announce beyond its end (check_structure)
    max_pixels: int | None
    max_expansion: float | None
    profiles: tuple[TelescopeProfile, ...]
    require_wcs: bool
    telescope: str | None


def _reading(payload: bytes, max_pixels: int | None, max_expansion: float | None,
             profiles: tuple[TelescopeProfile, ...], require_wcs: bool,
             telescope: str | None) -> tuple[_Reading, bytes]:
    """The :class:`_Reading` of FITS bytes and the bytes inflated; empty or structurally hostile bytes refused."""
    if not payload:
        raise CorruptFrame("empty payload (0 bytes)")
    sent_bytes = len(payload)
    if is_compressed(payload):
        payload = uncompressed(payload, max_pixels, max_expansion)
    missing = check_structure(payload)
    return _Reading(sent_bytes, missing, max_pixels, max_expansion, profiles, require_wcs, telescope), payload


@contextmanager
def _read_as_fits() -> Iterator[None]:
    """Astropy's errors on garbage (OSError, ValueError, TypeError, ...) raised as :class:`CorruptFrame`.

    Its warning "File may have been truncated" is silenced: a file cut short is said by
    :func:`_pixels_of`, once its announced size was checked.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "File may have been truncated")
            yield
    except InvalidFrame:
        raise
    except Exception as exc:
        raise CorruptFrame(f"not a readable FITS file: {type(exc).__name__}: {exc}") from exc


def _frame_of(hdul: fits.HDUList, hdu: fits.hdu.base.ExtensionHDU | fits.PrimaryHDU, image: str | None,
              reading: _Reading) -> Frame:
    """The :class:`Frame` of image HDU ``hdu`` of an open file (``image``: its name in a mosaic, else None)."""
    with _read_as_fits():
        data, header = _pixels_of(hdul, hdu, reading)
    if data is None or data.ndim not in (2, 3):
        raise BadShape(f"image has {0 if data is None else data.ndim} dimensions, expected 2 "
                       "(or a cube of colour planes)")
    if data.dtype.kind not in "iuf":
        raise BadShape(f"image dtype {data.dtype} is not numeric")
    check_frame_type(header)
    data, header = _adopt(blank_infinities(data), _named(header, reading.telescope), reading.profiles)
    meta = meta_from_header(header) if image is None else _one_of_a_mosaic(header, image)
    if reading.require_wcs:
        celestial_wcs(header)
    return Frame(meta=meta, data=data if data.dtype == np.float32 else data.astype(np.float32), header=header)


def _one_of_a_mosaic(header: fits.Header, image: str) -> FrameMeta:
    """The metadata of image ``image`` of a mosaic file, its field (and a ``FRAMEID`` it inherited) given the name.

    ``header`` is changed in place.
    """
    meta = meta_from_header(header)
    header["FIELD"] = (f"{meta.field}.{image}", "field id: the file's field, then its image")
    header["MOSAICIM"] = (image, "the image of a mosaic file this frame is")
    if _card(header, "FRAMEID"):
        header["FRAMEID"] = f"{meta.frame_id}.{image}"
    return meta_from_header(header)


def _pixels_of(hdul: fits.HDUList, hdu: fits.hdu.base.ExtensionHDU | fits.PrimaryHDU,
               reading: _Reading) -> tuple[np.ndarray | None, fits.Header]:
    """The pixels and merged header of an image HDU, its size checked before a pixel is read.

    A file cut short is :class:`CorruptFrame` saying so, once its announced size was checked: its
    few bytes would otherwise read as an implausible compression, or as astropy's "buffer is too
    small for requested array".
    """
    check_image_size(hdu.shape, hdu.header.get("BITPIX", 8), reading.sent_bytes, reading.max_pixels,
                     None if reading.missing else reading.max_expansion)
    if reading.missing:
        raise CorruptFrame(f"the file is cut short: {reading.missing} bytes of the data its headers announce "
                           "are missing (an interrupted copy or download?)")
    header = _merged_header(hdul, hdu)
    check_cards(header)
    return hdu.data, header


def blank_infinities(data: np.ndarray) -> np.ndarray:
    """``data`` with +-inf pixels made NaN, the one marker of an invalid pixel (:class:`Frame`).

    An infinite pixel is no measurement either, but the steps that skip NaN read it: a few -inf
    pixels spread through the star finder's filter and hid every star of a frame from the seeing
    measurement (``few_stars``), +inf ones put every pixel of the background mesh out of reach and
    kept a [0, 1] image off the ADU scale (:func:`adu_scale`).

    Parameters
    ----------
    data : ndarray, shape (ny, nx) or (n, ny, nx)
        Pixels as read (ADU); integer images are returned as they are.

    Returns
    -------
    ndarray
        Same shape and dtype; a new array only when an infinite pixel was replaced.
    """
    if data.dtype.kind != "f":
        return data
    infinite = np.isinf(data)
    return np.where(infinite, np.array(np.nan, data.dtype), data) if infinite.any() else data


def _named(header: fits.Header, telescope: str | None) -> fits.Header:
    """``header``, or a copy with ``TELESCOP = telescope`` when it names no telescope (nor instrument)."""
    if not telescope or not (_absent(header, "TELESCOP") and _absent(header, "INSTRUME")):
        return header
    named = header.copy()
    named["TELESCOP"] = telescope
    return named


def _absent(header: fits.Header, card: str) -> bool:
    """Whether ``card`` is missing or blank (a card present but unparseable is not: :func:`_card` names it)."""
    if card not in header:
        return True
    try:
        value = header.get(card)
    except Exception:  # astropy: VerifyError on a value it cannot parse
        return False
    return value is None or (isinstance(value, str) and not value.strip())


#: ``BUNIT`` of a rate image (upper-cased, blanks dropped): the count unit, then per second. HST's calibrated images
#: (``BUNIT = 'ELECTRONS/S'``), TESS's calibrated FFIs (``electrons/s``), drizzled and co-added products.
_RATE_UNIT = re.compile(r"^(ELECTRONS?|E-|COUNTS?|CTS|ADU|DN)/(S|SEC|SECOND)$")


def rate_to_counts(data: np.ndarray, header: fits.Header) -> tuple[np.ndarray, fits.Header]:
    """A rate image (``BUNIT`` per second) put back on the counts of its exposure: pixels, SATURATE and MAGZP.

    Read as counts, an image in e-/s of a 1425.6 s TESS frame had its sources' modelled Poisson variance
    (signal / gain, gain 1) 1425.6 times the true one (rate / EXPTIME), its zero point 7.9 mag off the
    broker's convention (mag of 1 unit in the exposure). Pixels and a ``SATURATE`` are multiplied by
    ``EXPTIME`` (s), a ``MAGZP`` (of 1 unit per second, as the image is) gains 2.5 log10(EXPTIME),
    ``BUNIT`` loses its ``/s`` and ``RATESCAL`` records the factor (a decoded frame is never scaled
    twice). A frame in electrons (per second or not) has ``GAIN = 1`` (e-/e-): a gain card of its raw
    readout (TESS's ``GAINA``...) is not its gain. Other frames pass as they are; an ``EXPTIME`` that is
    no number > 0 leaves the frame to :func:`meta_from_header`, which names it.
    """
    unit = re.sub(r"\s+", "", str(header.get("BUNIT", "") or "")).upper()
    rate = _RATE_UNIT.match(unit)
    electrons = re.fullmatch(r"(ELECTRONS?|E-)(/(S|SEC|SECOND))?", unit) is not None
    exptime = header.get("EXPTIME")
    if "RATESCAL" in header or not (rate or electrons):
        return data, header
    out = header.copy()
    if electrons:
        out["GAIN"] = (1.0, "[e-/e-] pixels are electrons (BUNIT)")
    if rate is None or isinstance(exptime, bool) or not isinstance(exptime, int | float) or not exptime > 0:
        return data, out
    count_unit = {"E-": "electrons", "ELECTRON": "electrons", "COUNT": "counts", "CTS": "counts"}.get(rate.group(1))
    out["BUNIT"] = (count_unit or rate.group(1).lower(), "pixel unit: counts of the exposure")
    out["RATESCAL"] = (float(exptime), "[s] rate image x this (EXPTIME): counts")
    for card, scaled in (("SATURATE", lambda v: v * exptime), ("MAGZP", lambda v: v + 2.5 * math.log10(exptime))):
        value = out.get(card)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[card] = scaled(float(value))
    return (data * np.float32(exptime)).astype(np.float32), out


#: ``BUNIT`` of an image calibrated in nanomaggies (upper-cased, blanks dropped): SDSS's corrected frames
#: (``frame-*.fits``, ``BUNIT = 'nanomaggy'``; the data model: "Units are in nanomaggies").
_NANOMAGGY_UNIT = re.compile(r"^(NANOMAGG(Y|IES)|NMGY)$")
#: AB magnitude of 1 nanomaggy (SDSS: m = 22.5 - 2.5 log10(flux [nanomaggies])).
NANOMAGGY_AB_MAG = 22.5


def nanomaggies_to_counts(data: np.ndarray, header: fits.Header) -> tuple[np.ndarray, fits.Header]:
    """An image in nanomaggies (SDSS) put back on counts with ``NMGY``; its zero point written from it.

    Read as counts, an SDSS frame's sources had a modelled Poisson variance (signal / gain) NMGY
    times the true one (1/210 at NMGY = 0.004752 nanomaggies per count) and no zero point. ``NMGY``
    is the frame's calibration in nanomaggies per count (the data model's calibration vector
    "translates the counts in the original image into nanomaggies"), so the pixels and a
    ``SATURATE`` are divided by it, ``MAGZP`` = 22.5 - 2.5 log10(NMGY) (mag of 1 count in the
    exposure) and ``MAGZPERR`` = 1.0857 sigma(NMGY) / NMGY from ``NMGYIVAR`` (its inverse variance;
    none when that is not a number > 0), ``ZPSRC`` naming them. ``BUNIT`` becomes ``counts`` and
    ``NMGYSCAL`` records the factor (a decoded frame is never converted twice). Other frames pass.

    Raises
    ------
    MissingMetadata
        ``BUNIT`` is nanomaggies and ``NMGY`` is no number > 0: the counts cannot be recovered.
    """
    unit = re.sub(r"\s+", "", str(header.get("BUNIT", "") or "")).upper()
    if "NMGYSCAL" in header or not _NANOMAGGY_UNIT.match(unit):
        return data, header
    nmgy = _positive_number(header.get("NMGY"))
    if nmgy is None:
        raise MissingMetadata(f"BUNIT = {header.get('BUNIT')!r} and NMGY = {header.get('NMGY')!r}: no calibration "
                              "factor (nanomaggies per count, a number > 0) to put the image back on counts")
    out = header.copy()
    out["BUNIT"] = ("counts", "pixel unit: counts of the exposure")
    out["NMGYSCAL"] = (1.0 / nmgy, "nanomaggy image x this (1 / NMGY): counts")
    out["MAGZP"] = (round(NANOMAGGY_AB_MAG - 2.5 * math.log10(nmgy), 6), "[mag] 1 count in the exposure (NMGY)")
    out.remove("MAGZPERR", ignore_missing=True)
    ivar = _positive_number(header.get("NMGYIVAR"))
    if ivar is not None:
        out["MAGZPERR"] = (2.5 / math.log(10.0) / math.sqrt(ivar) / nmgy, "[mag] 1-sigma of MAGZP (NMGYIVAR)")
    out["ZPSRC"] = ("NMGY/NMGYIVAR" if ivar is not None else "NMGY", "where MAGZP, MAGZPERR came from")
    saturation = _positive_number(out.get("SATURATE"))
    if saturation is not None:
        out["SATURATE"] = saturation / nmgy
    return (data / np.float32(nmgy)).astype(np.float32), out


def _positive_number(value: object) -> float | None:
    """``value`` as a finite float > 0 (a number or a string of one), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


#: The ADU scale of a floating-point image normalised to [0, 1]: Siril and PixInsight write ADU / 65535.
NORMALISED_SCALE = 65535.0


def adu_scale(data: np.ndarray, header: fits.Header) -> tuple[np.ndarray, fits.Header]:
    """A float image normalised to [0, 1] put back on the 16-bit ADU scale its GAIN and SATURATE mean.

    Siril and PixInsight save calibrated or stacked frames as 32-bit floats in [0, 1] (ADU / 65535)
    and keep the camera's ``GAIN`` (e-/ADU at 16 bits). Read as ADU, such a frame's source
    variance (signal / gain) is 65535 times too large and its transients drown in it (4 of 60
    injections found on a simulated normalised series, against 49 of 60 in ADU). A float image
    whose largest finite value is in (0, 1] is multiplied by :data:`NORMALISED_SCALE`; ``SATURATE``
    of at most 1 is scaled with it, a missing one becomes 65535, and ``ADUSCALE`` records the factor
    (so a decoded frame is never scaled twice). Integer images and any other float image pass as
    they are.
    """
    if data.dtype.kind != "f" or "ADUSCALE" in header:
        return data, header
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN image: nanmax warns, gives NaN
        top = float(np.nanmax(data)) if data.size else float("nan")
    if not 0.0 < top <= 1.0:
        return data, header
    out = header.copy()
    out["ADUSCALE"] = (NORMALISED_SCALE, "[0, 1] image x this: 16-bit ADU")
    saturation = out.get("SATURATE")
    if not isinstance(saturation, int | float) or saturation <= 1.0:
        out["SATURATE"] = (NORMALISED_SCALE * float(saturation) if isinstance(saturation, int | float)
                           else NORMALISED_SCALE, "[ADU] on the 16-bit scale")
    return (data * np.float32(NORMALISED_SCALE)).astype(np.float32), out


def _adopt(data: np.ndarray, header: fits.Header, profiles: tuple[TelescopeProfile, ...]
           ) -> tuple[np.ndarray, fits.Header]:
    """Normalise a header lacking a required card; zero points; nanomaggies, rates, [0, 1] to counts; colour."""
    if any(_absent(header, card) for card in _REQUIRED):
        header = normalise_header(header, data.shape[-2:], profiles)
    data, header = nanomaggies_to_counts(data, header)
    header = zero_point_cards(header)
    data, header = rate_to_counts(data, header)
    data, header = adu_scale(data, header)
    saturation = header.get("SATURATE")
    level = float(saturation) if isinstance(saturation, int | float) else float("inf")
    if data.ndim == 3:
        data, header = colour_planes_luminance(data, header, level)
    if bayer_pattern(header) is not None:
        data, header = superpixel_luminance(data, header, level)
    return data, header


#: Cards of a primary header never inherited by the image extension: its own layout and checksums.
_NOT_INHERITED = re.compile(r"^(?:SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|BZERO|BSCALE|BLANK|EXTNAME"
                            r"|EXTVER|EXTTYPE|INHERIT|CHECKSUM|DATASUM)$")
#: World-coordinate cards: an extension with a WCS of its own inherits none of the primary's; a solved WCS
#: replaces all of a header's (:func:`broker.calibrate.with_wcs`).
WCS_CARD = re.compile(r"^(?:WCSAXES|CTYPE|CRPIX|CRVAL|CDELT|CUNIT|CROTA|CD\d_|PC\d_|PV\d_|PS\d_|A_|B_|AP_|BP_|LONPOLE"
                       r"|LATPOLE|RADESYS|RADECSYS|EQUINOX|EPOCH)")


def _merged_header(hdul: fits.HDUList, hdu: fits.hdu.base.ExtensionHDU | fits.PrimaryHDU) -> fits.Header:
    """The image's header, plus the primary header's cards it lacks when the image is an extension.

    Survey and pipeline files keep the exposure's cards in the primary header (DECam, with ``INHERIT
    = T``; HST; a compressed image's producer) and the image's own in its extension: read alone, the
    extension named no telescope, time or filter and was refused ``missing_metadata``. The
    extension's cards win; ``INHERIT = F`` turns inheritance off; an extension with a WCS of its
    own (``CTYPE1``) inherits none of the primary's WCS cards, so that the two are never mixed.
    A card inherited (the first of each keyword; no commentary) goes after the image header's last
    card that is not commentary, where ``Header.append`` put it. Built in one pass: an append
    re-indexes every card of the header, and 8,000 primary cards took 1.3 s to merge, 98,000 about 3 min.
    """
    image = hdu.header
    if hdu is hdul[0] or image.get("INHERIT") is False:
        return image.copy()
    own_wcs = "CTYPE1" in image
    commentary = fits.Card._commentary_keywords
    extra, seen = [], set()
    for card in hdul[0].header.cards:
        key = card.keyword
        if (key in commentary or key in seen or key in image or _NOT_INHERITED.match(key)
                or (own_wcs and WCS_CARD.match(key))):
            continue
        seen.add(key)
        extra.append(card)
    cards = list(image.cards)
    cut = max((i + 1 for i, card in enumerate(cards) if card.keyword not in commentary), default=0)
    return fits.Header([copy.copy(card) for card in cards[:cut] + extra + cards[cut:]])


#: Cards of the array layout in the file a frame was decoded from (BLANK, BZERO, BSCALE: its stored
#: integers; NAXISn: its axes); :func:`encode_fits` writes its own. A ``BLANK`` left on float pixels,
#: or an ``NAXIS3`` on a 2-D image, made astropy refuse to write the calibrated frame.
_LAYOUT_CARD = re.compile(r"^(?:SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|BZERO|BSCALE|BLANK)$")


def encode_fits(frame: Frame, compress: bool = True) -> bytes:
    """Encode a frame as FITS bytes, tile-compressed by default (lossless).

    Pixels that are all integers in [0, 65535) are RICE-compressed as 16-bit integers, any others
    GZIP-compressed as 32-bit floats without quantisation (:func:`tile_compressed`); every card of
    the header is kept, in order, but for the layout cards of :data:`_LAYOUT_CARD`.
    """
    # The layout cards describe the old file's array, not these pixels. Left out in one pass: Header.remove
    # re-indexes every card for each one removed (16,000 repeated BZERO and NAXIS3 cards took 4.8 s).
    header = fits.Header([copy.copy(card) for card in frame.header.cards if not _LAYOUT_CARD.match(card.keyword)])
    header["FRAMEID"] = frame.meta.frame_id
    data = frame.data
    if not compress:
        buf = io.BytesIO()
        fits.HDUList([fits.PrimaryHDU(data.astype(np.float32), header=header)]).writeto(buf)
        return buf.getvalue()
    is_int = (np.all(np.isfinite(data)) and np.array_equal(data, np.round(data))
              and data.min() >= 0 and data.max() < 65535)
    if is_int:
        return tile_compressed(data.astype(np.uint16), header, compression_type="RICE_1")
    return tile_compressed(data.astype(np.float32), header, compression_type="GZIP_2", quantize_level=0.0)


#: Cards that astropy's compressed-image writer maps to others, moves or drops: those of the FITS tiled
#: image convention (FITS 4.0 section 10: ``Z*`` and the image cards they stand for), the binary table's
#: own (``TFIELDS``, ``TTYPEn``, ...), ``EXTNAME`` and the array's scaling. :func:`tile_compressed`
#: leaves them to astropy; every other card is written as it stands.
_TILED_CARD = re.compile(
    r"^(?:SIMPLE|XTENSION|BITPIX|NAXIS\d*|EXTEND|BLOCKED|PCOUNT|GCOUNT|CHECKSUM|DATASUM|EXTNAME|BSCALE|BZERO|BLANK"
    r"|TFIELDS|THEAP|T(?:TYPE|FORM|UNIT|NULL|SCAL|ZERO|DISP|BCOL|DIM|CTYP|CUNI|CRPX|CRVL|CDLT|RPOS)[1-9]\d*"
    r"|Z(?:IMAGE|CMPTYPE|MASKCMP|QUANTIZ|DITHER0|BLANK|SCALE|ZERO|SIMPLE|TENSION|BITPIX|EXTEND|BLOCKED|PCOUNT"
    r"|GCOUNT|HECKSUM|DATASUM)|Z(?:NAXIS|TILE|NAME|VAL)(?:[1-9]\d*)?)$")


def tile_compressed(data: np.ndarray, header: fits.Header, **compression: Any) -> bytes:
    """FITS bytes of ``data`` as a tile-compressed image HDU with ``header``, in time linear in its cards.

    astropy's compressed-image writer copies an image header into the binary table's one card by
    card, each append and each ``COMMENT``/``HISTORY`` insertion re-indexing every card before it:
    quadratic in the cards, 1.6 s for 4,000, 23 s for 16,000, some 14 min for 98,000. Here astropy writes
    the HDU with the cards of :data:`_TILED_CARD` alone; every other card is verified as astropy's
    writer would (``output_verify="exception"``) and written, in order, after the table's cards.
    Unlike astropy's copy, a repeated keyword and a blank card are kept, where they stand.

    Parameters
    ----------
    data : ndarray
        The pixels, of the dtype to store.
    header : astropy.io.fits.Header
        The image's cards (no layout cards: astropy writes its own from ``data``).
    **compression
        Passed to :class:`astropy.io.fits.CompImageHDU` (``compression_type``, ``quantize_level``, ...).

    Returns
    -------
    bytes
        A primary HDU without data, then the compressed image HDU.

    Raises
    ------
    astropy.io.fits.VerifyError
        A card astropy cannot write (as its writer raised).
    """
    tiled = [card for card in header.cards if _TILED_CARD.match(card.keyword)]
    plain = [card for card in header.cards if not _TILED_CARD.match(card.keyword)]
    for card in plain:
        card.verify("exception")
    buf = io.BytesIO()
    hdu = fits.CompImageHDU(data, header=fits.Header(tiled), **compression)
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf)
    raw = buf.getvalue()
    start = _blocks(_end_card(raw, 0, 0) + 80)
    end = _end_card(raw, start, 1)
    cards = raw[start:end] + "".join(str(card) for card in plain).encode("ascii") + b"END".ljust(80)
    return raw[:start] + cards.ljust(_blocks(len(cards))) + raw[_blocks(end + 80):]


def sha256(payload: bytes) -> str:
    """Hex SHA-256 of ``payload`` (frame-store checksums)."""
    return hashlib.sha256(payload).hexdigest()
