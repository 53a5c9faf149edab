"""Frames: one exposure's pixels, WCS and metadata, and their FITS encoding.

A frame travels as tile-compressed FITS bytes (RICE for integer pixels, lossless GZIP for
floating-point pixels, so that no quantisation noise is added before subtraction). The header
cards below are what a telescope must provide; :func:`decode_fits` raises a typed
:class:`~broker.errors.InvalidFrame` subclass that names what is wrong with a file.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from broker.errors import BadShape, CorruptFrame, MissingMetadata, MissingWCS

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
)


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


def celestial_wcs(header: fits.Header) -> WCS:
    """Return the celestial WCS of ``header`` or raise :class:`MissingWCS`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header, naxis=2)
        except Exception as exc:  # astropy raises many types for broken WCS cards
            raise MissingWCS(f"WCS cards cannot be parsed: {exc}") from exc
    if not wcs.has_celestial or wcs.celestial.naxis != 2:
        raise MissingWCS("no celestial WCS (CTYPE1/2 with RA/Dec and a projection are required)")
    return wcs.celestial


def meta_from_header(header: fits.Header) -> FrameMeta:
    """Read :class:`FrameMeta` from FITS cards, raising :class:`MissingMetadata` for gaps."""
    values: dict[str, object] = {}
    for card, attr, kind, required in _CARDS:
        raw = header.get(card)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            if required:
                raise MissingMetadata(f"header card {card} ({attr}) is missing")
            continue
        try:
            value = kind(raw.strip() if isinstance(raw, str) else raw)
        except (TypeError, ValueError) as exc:
            raise MissingMetadata(f"header card {card}={raw!r} is not a {kind.__name__}") from exc
        if kind is float and not np.isfinite(value):
            raise MissingMetadata(f"header card {card}={raw!r} is not finite")
        values[attr] = value
    if values["exptime"] <= 0:  # type: ignore[operator]
        raise MissingMetadata(f"EXPTIME={values['exptime']} must be > 0 s")
    frame_id = str(header.get("FRAMEID") or "").strip() or (
        f"{values['telescope']}-{values['field']}-{values['filter']}-{values['mjd_start']:.6f}"
    )
    return FrameMeta(frame_id=frame_id, **values)  # type: ignore[arg-type]


def decode_fits(payload: bytes) -> Frame:
    """Decode FITS bytes (plain or tile-compressed) into a :class:`Frame`.

    Raises
    ------
    CorruptFrame
        The bytes are not FITS or hold no image.
    BadShape
        The image is not 2-D or not numeric.
    MissingMetadata, MissingWCS
        Required cards are missing.
    """
    if not payload:
        raise CorruptFrame("empty payload (0 bytes)")
    try:
        with fits.open(io.BytesIO(payload), memmap=False, lazy_load_hdus=False) as hdul:
            hdu = next((h for h in hdul if h.is_image and h.data is not None), None)
            if hdu is None:
                raise CorruptFrame("the FITS file holds no image data")
            data = hdu.data
            header = hdu.header.copy()
            if isinstance(hdu, fits.CompImageHDU):
                # keep the primary header cards a producer may have put there
                for card in hdul[0].header.cards:
                    if card.keyword not in header and card.keyword not in ("", "COMMENT", "HISTORY"):
                        header.append(card)
    except CorruptFrame:
        raise
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError, ... on garbage
        raise CorruptFrame(f"not a readable FITS file: {type(exc).__name__}: {exc}") from exc
    if data.ndim != 2:
        raise BadShape(f"image has {data.ndim} dimensions, expected 2")
    if data.dtype.kind not in "iuf":
        raise BadShape(f"image dtype {data.dtype} is not numeric")
    meta = meta_from_header(header)
    celestial_wcs(header)
    return Frame(meta=meta, data=np.asarray(data, dtype=np.float32), header=header)


def encode_fits(frame: Frame, compress: bool = True) -> bytes:
    """Encode a frame as FITS bytes, tile-compressed by default (lossless)."""
    header = frame.header.copy()
    for key in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT"):
        header.remove(key, ignore_missing=True, remove_all=True)
    header["FRAMEID"] = frame.meta.frame_id
    data = frame.data
    if compress:
        is_int = (np.all(np.isfinite(data)) and np.array_equal(data, np.round(data))
                  and data.min() >= 0 and data.max() < 65535)
        if is_int:
            hdu = fits.CompImageHDU(data.astype(np.uint16), header=header, compression_type="RICE_1")
        else:
            hdu = fits.CompImageHDU(data.astype(np.float32), header=header, compression_type="GZIP_2",
                                    quantize_level=0.0)
        hdul = fits.HDUList([fits.PrimaryHDU(), hdu])
    else:
        hdul = fits.HDUList([fits.PrimaryHDU(data.astype(np.float32), header=header)])
    buf = io.BytesIO()
    hdul.writeto(buf)
    return buf.getvalue()


def sha256(payload: bytes) -> str:
    """Hex SHA-256 of ``payload`` (frame-store checksums)."""
    return hashlib.sha256(payload).hexdigest()
