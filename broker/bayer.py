"""Colour (Bayer) sensors: raw colour-filter-array frames -> one luminance band, on purpose.

A one-shot-colour camera (ZWO Seestar, most ZWO/QHY colour CMOS) writes raw frames in which each
pixel sees one of red, green or blue through a 2x2 filter mosaic (``BAYERPAT = 'RGGB'``, ``GRBG``,
...). Subtracting such a frame as if it were monochrome makes every star a checkerboard whose
pattern shifts with the sub-pixel position: a PSF model cannot fit it and the difference image is
full of dipoles. :func:`superpixel_luminance` sums each 2x2 cell (R + G + G + B) into one pixel:

* the band is ``lum`` (the sensor's summed response through its IR-cut filter), a band of its own
  that never shares a reference with a monochrome camera's ``clear``;
* no interpolation: superpixels are independent, so the noise model stays ``variance = signal /
  gain + read_noise^2`` with the same gain (e-/ADU) and the read noise of four pixels
  (``2 x RDNOISE``), and the PSF is sampled on a regular grid of twice the pixel size;
* a superpixel holding a saturated raw pixel is set to the summed saturation level
  (``4 x SATURATE``) so it is masked as saturated; ``SATURATE`` becomes that level;
* a WCS the raw frame may carry is dropped (cards ``CTYPE*``, ``CRPIX*``, ``CD*``, ...): the
  ingest stage solves the binned frame (``broker.astrometry``), so nothing inherits a half-pixel error;
  its centre and scale stay as the solver's hints (``RA``/``DEC``, ``PIXSCALE``) where the header has none.

``XPIXSZ``/``YPIXSZ`` and ``PIXSCALE`` double; ``BAYERPAT`` moves to ``BAYERRAW`` and ``BAYERMOD``
records the mode, so a decoded frame is never binned twice.

Colour *images* (a cube of three planes, ``NAXIS3 = 3``: what capture and stacking software writes
once it has interpolated the mosaic, e.g. a smart telescope's stacked frame) are summed plane by
plane into the same ``lum`` band by :func:`colour_planes_luminance`, at full resolution: their
celestial WCS still applies. Interpolated planes are correlated, so the summed noise is not the
raw ``signal / gain + read_noise^2`` (``RDNOISE`` becomes sqrt(3) x, the independent-planes
value); the pipeline measures the sky noise from the image itself. A cube of one plane is read as
its plane; other cubes are refused with :class:`~broker.errors.BadShape`.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from broker.errors import BadShape
from broker.headers import pixel_scale_hint, pointing_hint, wcs_centre

#: Accepted mosaic patterns (top-left 2x2 cell read row by row).
PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")

#: Cards of a cube's third axis, dropped when its planes are summed (``PC``/``CD`` terms with a 3).
_AXIS3 = re.compile(r"^(?:(?:CTYPE|CRPIX|CRVAL|CDELT|CUNIT|CROTA|CNAME|CRDER|CSYER)3|NAXIS3|(?:PC|CD)(?:3_\d|\d_3)"
                    r"|P[VS]3_\d+)$")

#: WCS cards dropped from a binned frame.
_WCS_PREFIXES = ("CTYPE", "CRPIX", "CRVAL", "CDELT", "CUNIT", "CD1_", "CD2_", "PC1_", "PC2_", "CROTA",
                 "A_", "B_", "AP_", "BP_", "PV1_", "PV2_", "WCSAXES", "LONPOLE", "LATPOLE")


#: ``COLORTYP`` written as a number (MaxIm DL, Celestron AstroFX): ASCOM's ``SensorType`` code, 0 for a
#: monochrome sensor, 2 for an RGGB mosaic (its phase, ``XBAYROFF``/``YBAYROFF``, does not change a 2x2 sum).
#: The other codes (1 colour planes, 3-5 CMYG, CMYG2 and LRGB mosaics) are refused.
SENSOR_TYPES = {0: "MONO", 2: "RGGB"}


def bayer_pattern(header: fits.Header) -> str | None:
    """The header's mosaic pattern (``BAYERPAT`` or ``COLORTYP``) in upper case; None for a monochrome frame.

    Raises
    ------
    BadShape
        The pattern is not one of :data:`PATTERNS` (nor a :data:`SENSOR_TYPES` code of ``COLORTYP``).
    """
    if "BAYERMOD" in header:
        return None  # already binned
    card = "BAYERPAT" if "BAYERPAT" in header else "COLORTYP"
    raw = header.get(card)
    if card == "COLORTYP" and isinstance(raw, int) and not isinstance(raw, bool):
        raw = SENSOR_TYPES.get(raw, raw)
    if raw is None or not str(raw).strip() or str(raw).strip().upper() in ("NONE", "MONO"):
        return None
    pattern = str(raw).strip().upper()
    if pattern not in PATTERNS:
        raise BadShape(f"{card}={header[card]!r} is not a 2x2 colour mosaic ({', '.join(PATTERNS)}"
                       f"{', or COLORTYP = 0 or 2' if card == 'COLORTYP' else ''})")
    return pattern


def _number(value: object) -> float | None:
    """``value`` as a float when it is a number card (not a logical T/F, not a string) that doubled stays finite.

    Else None, and the card is left as written: ``SECPIX = 1e999`` reads as inf, which astropy
    cannot write back (found by an exhaustive run of the frame fuzzer's card values).
    """
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return float(value) if math.isfinite(2.0 * float(value)) else None


def _without(header: fits.Header, dropped: Callable[[str], bool]) -> fits.Header:
    """A copy of ``header`` without the cards whose keyword ``dropped`` is true of, made in one pass.

    ``Header.remove`` re-indexes every card for each card removed: 8,000 ``A_*`` cards of a raw
    frame took 2.6 s to drop one by one, 98,000 about 7 min.
    """
    return fits.Header([copy.copy(card) for card in header.cards if not dropped(card.keyword)])


def _mark_luminance(header: fits.Header, mode: str, comment: str) -> None:
    """Record in ``header`` that it is now a ``lum`` frame made by ``mode``; a mosaic pattern moves to ``BAYERRAW``."""
    if "BAYERPAT" in header or "COLORTYP" in header:
        pattern = str(header.get("BAYERPAT", header.get("COLORTYP", "")))
        header["BAYERRAW"] = (pattern, "mosaic pattern of the raw frame")
        header.remove("BAYERPAT", ignore_missing=True)
        header.remove("COLORTYP", ignore_missing=True)
    header["BAYERMOD"] = (mode, comment)
    header["FILTER"] = ("lum", "colour-sensor luminance (broker.bayer)")


def superpixel_luminance(data: np.ndarray, header: fits.Header, saturation: float) -> tuple[np.ndarray, fits.Header]:
    """Sum each 2x2 mosaic cell of a raw colour frame into one luminance pixel.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Raw mosaic frame (ADU); an odd last row or column is cut.
    header : astropy.io.fits.Header
        Its (normalised) header; not modified.
    saturation : float
        Saturation level of a raw pixel (ADU); +inf when unknown.

    Returns
    -------
    data : ndarray, shape (ny // 2, nx // 2), float32
        Luminance (ADU, sum of four pixels); NaN where any of the four is NaN.
    header : astropy.io.fits.Header
        Copy with ``FILTER = 'lum'``, ``RDNOISE`` x2, ``SATURATE`` x4, pixel sizes x2, no WCS,
        ``BAYERMOD = 'superpixel-sum'``.
    """
    ny, nx = (data.shape[0] // 2) * 2, (data.shape[1] // 2) * 2
    if ny < 2 or nx < 2:
        raise BadShape(f"a {data.shape[1]}x{data.shape[0]} px mosaic has no complete 2x2 cell")
    cells = data[:ny, :nx].astype(np.float32).reshape(ny // 2, 2, nx // 2, 2)
    lum = cells.sum(axis=(1, 3), dtype=np.float32)
    if math.isfinite(4.0 * saturation):  # SATURATE = 1e308: never reached, and 4x it cannot be written
        lum[cells.max(axis=(1, 3)) >= saturation] = np.float32(4.0 * saturation)
    out = _without(header, lambda keyword: keyword.startswith(_WCS_PREFIXES))
    _keep_wcs_hints(header, out, data.shape)
    _mark_luminance(out, "superpixel-sum", "2x2 R+G+G+B summed (broker.bayer)")
    read_noise = _number(out.get("RDNOISE"))
    if read_noise is not None:  # anything else is left for ``meta_from_header`` to name
        out["RDNOISE"] = (2.0 * read_noise, "[e-] read noise of a 2x2 superpixel")
    if math.isfinite(4.0 * saturation):
        out["SATURATE"] = (4.0 * saturation, "[ADU] saturation of a 2x2 superpixel")
    for key in ("XPIXSZ", "YPIXSZ", "PIXSCALE", "SECPIX", "IM_SCALE"):
        size = _number(out.get(key))
        if size is not None:
            out[key] = 2.0 * size
    return lum, out


def _keep_wcs_hints(raw: fits.Header, out: fits.Header, shape: tuple[int, ...]) -> None:
    """Write the dropped WCS's centre (``RA``, ``DEC``, deg) and binned scale (``PIXSCALE``) where ``out`` has none.

    The plate solver needs a pointing or a scale: a raw colour frame whose only hints were its WCS
    (a frame solved by the capture program, no mount cards) lost them with it and was refused
    ``no_wcs``. The hints written are the raw WCS's, the binned frame is still solved.
    """
    centre = wcs_centre(raw, (int(shape[-2]), int(shape[-1])))
    if centre is None:
        return
    if pointing_hint(out) is None:
        out["RA"] = (round(centre[0], 6), "[deg] centre of the raw frame's WCS (a solver hint)")
        out["DEC"] = (round(centre[1], 6), "[deg] centre of the raw frame's WCS (a solver hint)")
    if pixel_scale_hint(out) is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            scale = float(np.mean(proj_plane_pixel_scales(WCS(raw, naxis=2).celestial))) * 3600.0
        if math.isfinite(scale) and scale > 0:  # PIXSCALE is doubled with the pixel sizes below
            out["PIXSCALE"] = (scale, "[arcsec/px] scale of the raw frame's WCS (a solver hint)")


def colour_planes_luminance(data: np.ndarray, header: fits.Header,
                            saturation: float) -> tuple[np.ndarray, fits.Header]:
    """The 2-D image of a cube: its only plane, or the sum of its three colour planes.

    Parameters
    ----------
    data : ndarray, shape (planes, ny, nx)
        The cube (ADU), ``NAXIS3`` planes.
    header : astropy.io.fits.Header
        Its (normalised) header; not modified.
    saturation : float
        Saturation level of one plane's pixel (ADU); +inf when unknown.

    Returns
    -------
    data : ndarray, shape (ny, nx), float32
        One plane: that plane. Three: R + G + B (ADU), NaN where a plane is NaN, and ``3 x
        saturation`` where a plane is saturated.
    header : astropy.io.fits.Header
        Copy without the third axis (``NAXIS3``, ``CTYPE3``, ``PC3_1``, ...; ``NAXIS = 2``); for
        three planes also ``FILTER = 'lum'``, ``RDNOISE`` x sqrt(3), ``SATURATE`` x 3,
        ``BAYERMOD = 'planes-sum'`` (a mosaic pattern left in the header moves to ``BAYERRAW``).

    Raises
    ------
    BadShape
        Not 3-D, or a number of planes other than 1 or 3 (a time series, an interleaved RGB).
    """
    if data.ndim != 3 or data.shape[0] not in (1, 3):
        raise BadShape(f"a cube of shape {data.shape} (NAXIS3, NAXIS2, NAXIS1): expected an image, one plane or "
                       "three colour planes")
    out = _without(header, lambda keyword: _AXIS3.match(keyword) is not None)
    out["NAXIS"] = 2
    if "WCSAXES" in out:
        out["WCSAXES"] = 2
    if data.shape[0] == 1:
        return data[0], out
    lum = data.astype(np.float32).sum(axis=0, dtype=np.float32)
    if math.isfinite(3.0 * saturation):
        lum[data.max(axis=0) >= saturation] = np.float32(3.0 * saturation)
        out["SATURATE"] = (3.0 * saturation, "[ADU] saturation of R + G + B")
    _mark_luminance(out, "planes-sum", "3 colour planes R+G+B summed (broker.bayer)")
    read_noise = _number(out.get("RDNOISE"))
    if read_noise is not None:
        out["RDNOISE"] = (math.sqrt(3.0) * read_noise, "[e-] read noise of R + G + B")
    return lum, out
