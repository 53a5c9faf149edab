"""Photometric calibration: the zero point of a frame against Tycho-2, with its uncertainty.

The stars that matched the catalogue in :func:`broker.astrometry.check_wcs` are measured by
aperture photometry (radius ``aperture_fwhm`` x FWHM, sky from an annulus) on the frame, and each
gives ``V_T + 2.5 log10(flux_ADU)``; the zero point is their sigma-clipped median (mag of a source
giving 1 ADU in the exposure, the broker's ``MAGZP`` convention) and its uncertainty the clipped
scatter / sqrt(n). Tycho-2 in the Debian index files carries only V_T (no B_T, no colours), so
there is no colour term: for a ``clear``/``lum``/``r`` band the zero point is on V_T and the star-to-
star scatter (0.1-0.3 mag) includes the colour spread; it is reported as ``MAGZPSCT``. A zero
point fainter than the profile's nominal one by more than ``max_extinction_mag`` flags the frame
``zp_offset`` (clouds); fewer than ``min_stars`` usable stars leave the header's ``MAGZP`` (if any)
in place and flag nothing (relative photometry against the frame's reference still holds:
subtraction scales the reference to the frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.stats import sigma_clipped_stats

from broker.astrometry import Astrometry
from broker.stars import StarList


@dataclass(frozen=True)
class PhotCalConfig:
    """Zero-point measurement (``[ingest.photcal]``).

    Attributes
    ----------
    aperture_fwhm : float
        Aperture radius in units of the FWHM (2.0: >99 % of a Gaussian PSF, ~95 % of a Moffat
        beta = 2.5; the difference is in the zero point's systematic error).
    annulus_fwhm : tuple of float
        Inner and outer radius of the sky annulus (FWHM units).
    min_stars : int
        Fewest calibration stars for a measured zero point (count).
    saturation_fraction : float
        Stars whose peak pixel exceeds this fraction of SATURATE are not used.
    max_extinction_mag : float
        A zero point fainter than the telescope profile's nominal one (``zeropoint_1s`` + 2.5
        log10 EXPTIME) by more than this flags ``zp_offset`` (mag). 1.0: thin cirrus costs
        0.1-0.5 mag, thick cloud several.
    """

    aperture_fwhm: float = 2.0
    annulus_fwhm: tuple[float, float] = (3.0, 5.0)
    min_stars: int = 3
    saturation_fraction: float = 0.8
    max_extinction_mag: float = 1.0


@dataclass(frozen=True)
class ZeroPoint:
    """A measured zero point.

    ``magzp`` (mag of 1 ADU in the exposure), ``magzp_err`` (1 sigma, mag), ``scatter`` (clipped
    star-to-star RMS, mag), ``n_stars`` (count).
    """

    magzp: float
    magzp_err: float
    scatter: float
    n_stars: int


def aperture_flux(data: np.ndarray, x: float, y: float, radius: float, annulus: tuple[float, float]
                  ) -> tuple[float, float]:
    """(sky-subtracted flux in a circle of ``radius`` px, peak pixel) at (x, y) (0-based px); NaN off the frame."""
    r_out = annulus[1]
    x0, x1 = int(math.floor(x - r_out)), int(math.ceil(x + r_out)) + 1
    y0, y1 = int(math.floor(y - r_out)), int(math.ceil(y + r_out)) + 1
    if x0 < 0 or y0 < 0 or x1 > data.shape[1] or y1 > data.shape[0]:
        return float("nan"), float("nan")
    box = data[y0:y1, x0:x1]
    yy, xx = np.mgrid[y0:y1, x0:x1]
    r = np.hypot(xx - x, yy - y)
    ring = box[(r >= annulus[0]) & (r < annulus[1])]
    ring = ring[np.isfinite(ring)]
    inner = box[r < radius]
    if ring.size < 10 or not np.all(np.isfinite(inner)):
        return float("nan"), float("nan")
    sky = float(np.median(ring))
    return float(np.sum(inner - sky)), float(np.max(inner))


def zero_point(data: np.ndarray, stars: StarList, astrometry: Astrometry, saturation: float,
               config: PhotCalConfig = PhotCalConfig()) -> ZeroPoint | None:
    """The zero point from the catalogue stars matched in ``astrometry``; None with fewer than ``min_stars``.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        The frame (ADU, sky included).
    stars : StarList
        The detections ``astrometry.check`` indexes (0-based px), with their FWHM (px).
    saturation : float
        SATURATE of the frame (ADU); +inf when unknown.
    """
    check, fwhm = astrometry.check, stars.fwhm if math.isfinite(stars.fwhm) and stars.fwhm > 0 else 3.0
    annulus = (config.annulus_fwhm[0] * fwhm, config.annulus_fwhm[1] * fwhm)
    values = []
    for si, ci in zip(check.star_index, check.catalog_index, strict=True):
        flux, peak = aperture_flux(data, float(stars.x[si]), float(stars.y[si]), config.aperture_fwhm * fwhm, annulus)
        if flux > 0 and peak < config.saturation_fraction * saturation:
            values.append(float(astrometry.catalog.mag[ci]) + 2.5 * math.log10(flux))
    if len(values) < config.min_stars:
        return None
    _, median, std = sigma_clipped_stats(np.asarray(values), sigma=3.0, maxiters=5)
    n = len(values)
    scatter = float(std) if n > 1 else float("nan")
    return ZeroPoint(float(median), float(1.2533 * scatter / math.sqrt(n)), scatter, n)


def zp_problem(zp: ZeroPoint, exptime: float, nominal_1s: float | None,
               config: PhotCalConfig = PhotCalConfig()) -> str | None:
    """Why ``zp`` is wildly off the nominal zero point (``zeropoint_1s``, mag for 1 ADU/s), or None."""
    if nominal_1s is None:
        return None
    expected = nominal_1s + 2.5 * math.log10(exptime)
    if expected - zp.magzp > config.max_extinction_mag:
        return (f"zero point {zp.magzp:.2f} mag is {expected - zp.magzp:.2f} mag below the nominal {expected:.2f} "
                f"(more than {config.max_extinction_mag:g} mag: clouds?)")
    return None


def photcal_cards(zp: ZeroPoint, header_magzp: float | None) -> list[tuple[str, object, str]]:
    """Header cards that store the zero point with the frame (``MAGZP`` is the measured one).

    ``ZPSRC`` names the measurement: a frame whose ``MAGZP`` a pipeline's cards gave
    (:func:`broker.headers.zero_point_cards`, ``ZPSRC = 'L1ZP/L1ZPERR+2.5log10(EXPTIME)'``) kept that
    source beside the Tycho-2 zero point that replaced it.
    """
    cards: list[tuple[str, object, str]] = [
        ("MAGZP", round(zp.magzp, 4), "[mag] zero point vs Tycho-2 V_T"),
        ("MAGZPERR", round(zp.magzp_err, 4), "[mag] 1-sigma uncertainty of MAGZP"),
        ("MAGZPSCT", round(zp.scatter, 4) if math.isfinite(zp.scatter) else -1.0, "[mag] star-to-star scatter"),
        ("MAGZPN", zp.n_stars, "calibration stars"),
        ("ZPSRC", "Tycho-2", "where MAGZP, MAGZPERR came from"),
    ]
    if header_magzp is not None:
        cards.append(("MAGZPHDR", header_magzp, "[mag] MAGZP the frame arrived with"))
    return cards
