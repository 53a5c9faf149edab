"""Calibration of one frame at ingest: a checked WCS (solved when absent) and a measured zero point.

:func:`calibrate` is what the ingest stage runs before measuring quality: it detects the frame's
stars once, plate-solves a frame without a WCS (:func:`broker.astrometry.plate_solve`) or checks the
header's WCS against Tycho-2 (:func:`broker.astrometry.verify_wcs`), renames a field taken from the
pointing hint after the solved centre (:func:`broker.headers.rename_grid_field`), measures the zero
point (:func:`broker.photcal.zero_point`) and writes everything into the header, which travels with
the frame (``WCSSTAT WCSRESID WCSNMAT MAGZP MAGZPERR MAGZPN ZPSTAT``). The returned frame's metadata
is re-read from that header, so ``magzp`` is the calibrated one everywhere downstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clipped_stats

from broker.astrometry import Astrometry, AstrometryConfig, astrometry_cards, plate_solve, verify_wcs
from broker.errors import MissingWCS, SolverUnavailable
from broker.frame import WCS_CARD, Frame, has_wcs, meta_from_header
from broker.headers import pixel_scale_hint, pointing_hint, rename_grid_field, wcs_centre
from broker.photcal import PhotCalConfig, photcal_cards, zero_point, zp_problem
from broker.stars import StarConfig, StarList, find_stars
from broker.telescopes import TelescopeProfile, find_profile


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration at ingest (``[ingest.calibration]``).

    Attributes
    ----------
    enabled : bool
        Calibrate at all. False: frames must arrive with a WCS, which is trusted (the behaviour
        before plate solving existed).
    astrometry : AstrometryConfig
        Plate solving and WCS checks (``[ingest.calibration.astrometry]``).
    photcal : PhotCalConfig
        Zero point (``[ingest.calibration.photcal]``).
    """

    enabled: bool = True
    astrometry: AstrometryConfig = field(default_factory=AstrometryConfig)
    photcal: PhotCalConfig = field(default_factory=PhotCalConfig)


def sky_level(data: np.ndarray) -> tuple[float, float]:
    """Sky level and RMS (ADU): sigma-clipped median and standard deviation of a ~1 Mpx strided sample.

    Non-finite pixels are left out of the sample first: a frame with NaN borders (a registered or
    stacked frame) made astropy warn on every call ("Input data contains invalid values"), which
    the tests' ``filterwarnings = error`` turns into a failure. NaN when no pixel is finite.
    """
    step = max(1, int(np.sqrt(data.size / 1e6)))
    sample = data[::step, ::step]
    sample = sample[np.isfinite(sample)]
    if not sample.size:
        return float("nan"), float("nan")
    _, sky, rms = sigma_clipped_stats(sample, sigma=3.0, maxiters=5)
    return float(sky), float(rms)


def frame_stars(frame: Frame, config: AstrometryConfig) -> StarList:
    """The frame's stars for astrometry and photometry (brightest first, 0-based px)."""
    data = frame.data
    sky, rms = sky_level(data)
    return find_stars(data - np.float32(sky), float(rms), StarConfig(max_stars=config.max_sources * 2),
                      saturation=frame.meta.saturation, background=float(sky), threshold_sigma=config.detect_sigma)


def _astrometry(frame: Frame, stars: StarList, profile: TelescopeProfile | None,
                config: AstrometryConfig) -> Astrometry | None:
    """Solve or verify the WCS; None when a header WCS cannot be checked (no catalogue installed)."""
    if not has_wcs(frame.header):
        scale, hint = pixel_scale_hint(frame.header, profile), pointing_hint(frame.header)
        if scale is None and hint is None:
            raise MissingWCS("no celestial WCS, and neither a pointing (RA/DEC, OBJCTRA/OBJCTDEC) nor a pixel scale "
                             "(PIXSCALE, XPIXSZ + FOCALLEN, a telescope profile) to plate-solve it: an all-sky "
                             "search at every scale is too slow to run per frame")
        return plate_solve(stars, frame.shape, hint, scale, config)
    try:
        return verify_wcs(frame.header, stars, frame.shape, config)
    except SolverUnavailable:
        return None


def calibrate(frame: Frame, config: CalibrationConfig = CalibrationConfig(),
              profiles: tuple[TelescopeProfile, ...] = ()) -> Frame:
    """``frame`` with a checked (or solved) WCS and a measured zero point in its header.

    Raises
    ------
    MissingWCS
        A frame without a WCS and without any pointing or pixel-scale hint to solve it.
    UnsolvableField, PoorAstrometry
        A frame without a WCS that cannot be solved, or whose solution does not fit the catalogue.
    SolverUnavailable
        A frame without a WCS where solve-field or the index files are not installed.
    """
    if not config.enabled:
        return frame
    profile = find_profile(profiles, frame.meta.telescope, "")
    stars = frame_stars(frame, config.astrometry)
    result = _astrometry(frame, stars, profile, config.astrometry)
    if result is None:
        header = frame.header.copy()
        header["WCSSTAT"] = ("unconfirmed", "no Tycho-2 index installed to check the WCS")
        return Frame(meta_from_header(header), frame.data, header)
    header = with_wcs(frame.header, result.wcs_header)
    for card, value, comment in astrometry_cards(result):
        header[card] = (value, comment)
    if result.status == "solved":
        centre = wcs_centre(header, frame.shape)
        header = rename_grid_field(header, centre, profiles) if centre is not None else header
    if result.status != "unconfirmed":
        _photometry(frame, header, stars, result, profile, config.photcal)
    return Frame(meta_from_header(header), frame.data, header)


def with_wcs(header: fits.Header, wcs: fits.Header) -> fits.Header:
    """A copy of ``header`` whose WCS cards (every keyword of ``wcs``, and every WCS card) are those of ``wcs``.

    All of the old WCS goes (:data:`broker.frame.WCS_CARD`): its SIP terms, or a ``RADESYS = 'FK4'``
    or galactic ``CTYPE`` the solved WCS does not name, would otherwise be read with it.

    Built in one pass: astropy's ``Header.remove`` and ``extend`` each walk the whole header for
    every card, and a verified WCS brings the whole header back, so a header of 98,000 cards (an
    upload within its 64 MiB) took hours. The cards are those ``extend(unique=True, update=True)``
    gave, where it put them: the structural cards of ``wcs`` (``SIMPLE``, ``NAXIS``...) left out,
    its other cards after the last card that is not commentary, its commentary at the end.
    """
    fresh = wcs.copy()
    fresh.strip()
    kept = [card for card in header.cards if card.keyword not in wcs and not WCS_CARD.match(card.keyword)]
    commentary = fits.Card._commentary_keywords
    cut = max((i + 1 for i, card in enumerate(kept) if card.keyword not in commentary), default=0)
    plain = [card for card in fresh.cards if card.keyword not in commentary]
    notes = [card for card in fresh.cards if card.keyword in commentary]
    return fits.Header(kept[:cut] + plain + kept[cut:] + notes)


def _photometry(frame: Frame, header: fits.Header, stars: StarList, result: Astrometry,
                profile: TelescopeProfile | None, config: PhotCalConfig) -> None:
    """Write the measured zero point and its check into ``header`` (left as it is without enough stars)."""
    zp = zero_point(frame.data, stars, result, frame.meta.saturation, config)
    if zp is None:
        header["ZPSTAT"] = ("uncalibrated", "too few Tycho-2 stars for a zero point")
        return
    for card, value, comment in photcal_cards(zp, frame.meta.magzp):
        header[card] = (value, comment)
    problem = zp_problem(zp, frame.meta.exptime, profile.zeropoint_1s if profile else None, config)
    header["ZPSTAT"] = ("offset", "zero point far below nominal") if problem else ("ok", "zero point as expected")
