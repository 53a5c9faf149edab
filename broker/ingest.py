"""Frame validation and quality measurement (the ingest stage's science).

:func:`validate` raises a typed :class:`~broker.errors.InvalidFrame` naming what is wrong;
:func:`measure_quality` returns sky, seeing and depth; :func:`ingest` does both and applies the
configured quality cuts (frames are flagged, and rejected only when a cut says so).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
from astropy.wcs.utils import proj_plane_pixel_scales

from broker.calibrate import CalibrationConfig, sky_level
from broker.errors import BadPixelFraction, BadShape, ConfigError, PoorQuality, RecordMismatch
from broker.frame import Frame, has_wcs
from broker.plausibility import PlausibilityConfig, check_header, check_pixels, check_wcs
from broker.stars import StarConfig, find_stars, fit_fwhms


@dataclass(frozen=True)
class IngestConfig:
    """Validation limits and quality cuts.

    Attributes
    ----------
    min_side, max_side : int
        Accepted image sides (px; ``min_side <= max_side``). 64 px is the smallest frame that holds
        a 63 px cutout; 16384 px bounds memory per frame (16k^2 float32 = 1 GiB).
    max_nan_fraction : float
        Largest fraction of non-finite pixels accepted (0.5: half a frame still yields alerts;
        beyond that the reference alignment is unreliable).
    fwhm_range : tuple of float
        Accepted seeing (px). Below 0.8 px stars are undersampled and look like cosmic rays; above
        15 px the frame is out of focus or trailed. Outside: flag ``seeing``, reject when
        ``reject_on`` contains it.
    min_stars : int
        Fewer measured stars flag ``few_stars`` (the seeing is then unknown; 5 is the least for a
        stable median).
    max_saturated_fraction : float
        More saturated pixels flag ``saturated`` (5%: bright-sky twilight frames).
    detect_sigma : float
        Threshold (sigma of the sky) of the star finder used for seeing (10: bright stars only).
    max_stars : int
        Brightest stars fitted for the FWHM (count, 1 or more): 30 give the median to ~2% and bound the time
        (:func:`broker.stars.fit_fwhms` fits them together in ~25 ms).
    seeing_window : int
        Side (px, at least 64) of the central region searched for stars; 1024 px hold plenty of
        stars on any sky and keep the search O(1 Mpx) on large frames. 0 flagged every frame
        ``few_stars``, so that no field ever got a reference.
    reject_on : tuple of str
        Flags that reject the frame (dead-letter ``poor_quality``) rather than only flag it.
    subtract_skip_on : tuple of str
        Flags with which the subtract stage does not subtract a frame even when its field has a
        reference: the frame is dead-lettered ``poor_quality`` by subtract (any flag already keeps a
        frame out of reference building). Default ``("few_stars",)``: without measured stars the
        seeing and PSF are unknown and the frame may be blank or clouded out (an all-zero frame
        once gave 500 alerts); ``saturated`` frames are subtracted, their saturated pixels masked.
    max_pixels : int
        Most pixels a frame may have (count), checked from its header before any pixel is
        decompressed. Default 2**27 = 134 Mpx (512 MiB as float32): the largest monolithic sensors
        (10560^2 = 112 Mpx) fit; a 1.1 MB message that announces more is refused unread.
    max_expansion : float
        Largest ratio of a frame's decoded pixel bytes (at its BITPIX) to its FITS bytes. Default
        64: lossless RICE/GZIP compress real exposures 1.5-10x (noise does not compress); a 1.1 MB
        8192^2 all-zero frame expands 120x and once left ~600 MB resident in subtract.
    plausibility : PlausibilityConfig
        Physical bounds of header values and pixel statistics (``[ingest.plausibility]``;
        :class:`broker.plausibility.PlausibilityConfig`).
    calibration : CalibrationConfig
        Plate solving, WCS checks against Tycho-2 and the zero point (``[ingest.calibration]``;
        :class:`broker.calibrate.CalibrationConfig`). A frame whose zero point is wildly off the
        telescope profile's nominal one is flagged ``zp_offset``.
    telescopes_dir : str or None
        Directory of telescope profiles (``*.toml``, :mod:`broker.telescopes`; written by
        ``broker telescope add``) used to normalise headers; None: built-in mapping only.
    """

    min_side: int = 64
    max_side: int = 16384
    max_nan_fraction: float = 0.5
    fwhm_range: tuple[float, float] = (0.8, 15.0)
    min_stars: int = 5
    max_saturated_fraction: float = 0.05
    detect_sigma: float = 10.0
    max_stars: int = 30
    seeing_window: int = 1024
    reject_on: tuple[str, ...] = ("seeing",)
    subtract_skip_on: tuple[str, ...] = ("few_stars",)
    max_pixels: int = 2 ** 27
    max_expansion: float = 64.0
    plausibility: PlausibilityConfig = field(default_factory=PlausibilityConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    telescopes_dir: str | None = None

    def __post_init__(self) -> None:
        if self.max_stars < 1:  # 0 was a ValueError of the star finder on every frame
            raise ConfigError(f"max_stars must be 1 or more, not {self.max_stars}")
        if self.seeing_window < 64:
            raise ConfigError(f"seeing_window must be 64 px or more, not {self.seeing_window}")
        if self.min_side > self.max_side:  # every frame would be refused bad_shape
            raise ConfigError(f"min_side ({self.min_side}) must be at most max_side ({self.max_side})")


@dataclass(frozen=True)
class FrameQuality:
    """Measured quality of a frame (units in the Avro schema ``frame/v1``)."""

    sky: float
    sky_rms: float
    fwhm: float
    fwhm_arcsec: float
    n_stars: int
    limit_flux: float
    limit_mag: float | None
    nan_fraction: float
    saturated_fraction: float
    flags: tuple[str, ...] = field(default_factory=tuple)

    def to_record(self) -> dict:
        """The ``quality`` field of a ``frame`` record."""
        return {**self.__dict__, "flags": list(self.flags)}


def validate(frame: Frame, config: IngestConfig = IngestConfig(), now_mjd: float | None = None,
             require_wcs: bool = True) -> None:
    """Raise a typed :class:`~broker.errors.InvalidFrame` for a frame that must not be processed.

    Checks, in order: the image size (:class:`BadShape`), the header's physical bounds
    (:class:`ImplausibleHeader`; ``now_mjd`` is the present for the MJD window, default the system
    clock), a celestial WCS that maps the frame onto the sky at a plausible pixel scale
    (:class:`MissingWCS`, :class:`ImplausibleHeader`), the fraction of NaN pixels
    (:class:`BadPixelFraction`) and the pixel statistics (:class:`ImplausiblePixels`).
    ``require_wcs=False`` (the producer: the ingest stage plate-solves) skips the WCS check for a
    frame that has no WCS at all; a WCS that is present is always checked.
    """
    check_size_and_header(frame, config, now_mjd)
    if require_wcs or has_wcs(frame.header):
        check_wcs(frame, config.plausibility)
    nan_fraction = 1.0 - np.count_nonzero(np.isfinite(frame.data)) / frame.data.size
    if nan_fraction > config.max_nan_fraction:
        raise BadPixelFraction(f"{nan_fraction:.1%} of the pixels are NaN/inf (limit {config.max_nan_fraction:.0%})")
    check_pixels(frame, config.plausibility)


def check_size_and_header(frame: Frame, config: IngestConfig = IngestConfig(), now_mjd: float | None = None,
                          with_magzp: bool = True) -> None:
    """The checks of :func:`validate` that read no pixel: the image size, then the header's physical bounds.

    The ingest stage runs them before calibration too, so a frame they refuse never reaches the
    plate solver (seconds per frame). ``with_magzp=False`` leaves out the zero point, which
    calibration measures again (:func:`validate` checks the calibrated one).

    Raises
    ------
    BadShape, ImplausibleHeader
    """
    ny, nx = frame.data.shape
    if min(ny, nx) < config.min_side or max(ny, nx) > config.max_side:
        raise BadShape(f"image is {nx}x{ny} px; sides must be within [{config.min_side}, {config.max_side}]")
    check_header(frame.meta if with_magzp else replace(frame.meta, magzp=None), config.plausibility, now_mjd)


def check_record(claimed: Mapping[str, object], frame: Frame, size_bytes: int) -> None:
    """Raise :class:`RecordMismatch` when what a message claims about a frame disagrees with its FITS bytes.

    Parameters
    ----------
    claimed : mapping
        The message's own account of the frame (the ``frame`` record's ``frame_id``, ``telescope``,
        ``field``, ``filter``, ``mjd_start`` (MJD), ``exptime`` (s), ``nx``, ``ny`` (px),
        ``size_bytes``); keys it lacks are not checked.
    frame : Frame
        The decoded frame.
    size_bytes : int
        Size of its FITS bytes (bytes).
    """
    m = frame.meta
    truth: dict[str, object] = {"frame_id": m.frame_id, "telescope": m.telescope, "field": m.field,
                                "filter": m.filter, "mjd_start": m.mjd_start, "exptime": m.exptime,
                                "ny": frame.shape[0], "nx": frame.shape[1], "size_bytes": size_bytes}
    wrong = [f"{k}={claimed[k]!r} (the FITS says {v!r})" for k, v in truth.items()
             if k in claimed and not _same(claimed[k], v)]
    if wrong:
        raise RecordMismatch("the message disagrees with its FITS bytes: " + ", ".join(wrong))


def _same(a: object, b: object) -> bool:
    if isinstance(b, float):
        return isinstance(a, int | float) and math.isclose(float(a), b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def measure_quality(frame: Frame, config: IngestConfig = IngestConfig()) -> FrameQuality:
    """Sky level and RMS, seeing from bright unsaturated stars, and the 5-sigma depth."""
    data = frame.data
    finite = np.isfinite(data)
    nan_fraction = 1.0 - np.count_nonzero(finite) / data.size
    saturated = np.count_nonzero(data[finite] >= frame.meta.saturation) / data.size
    sky, sky_rms = sky_level(data)  # a strided subsample: O(1 Mpx) on any frame size
    ny, nx = data.shape
    h = config.seeing_window // 2
    centre = data[max(0, ny // 2 - h): ny // 2 + h, max(0, nx // 2 - h): nx // 2 + h]
    fwhm, n_stars = _seeing(centre - sky, sky_rms, frame.meta.saturation - sky, config)
    scale = float(np.mean(proj_plane_pixel_scales(frame.wcs))) * 3600.0
    # 5-sigma PSF flux limit, background-limited: n_eff = 4 pi sigma^2 for a Gaussian PSF
    sigma_psf = (fwhm if np.isfinite(fwhm) else 2.5) / 2.3548
    limit_flux = 5.0 * sky_rms * np.sqrt(4 * np.pi * sigma_psf**2)
    limit_mag = (None if frame.meta.magzp is None or not limit_flux > 0  # a sky without noise: 8-bit quantised
                 else float(frame.meta.magzp - 2.5 * np.log10(limit_flux)))
    flags = []
    if n_stars < config.min_stars:
        flags.append("few_stars")
    if np.isfinite(fwhm) and not config.fwhm_range[0] <= fwhm <= config.fwhm_range[1]:
        flags.append("seeing")
    if saturated > config.max_saturated_fraction:
        flags.append("saturated")
    if str(frame.header.get("ZPSTAT", "")) == "offset":
        flags.append("zp_offset")
    return FrameQuality(float(sky), float(sky_rms), float(fwhm), float(fwhm * scale), int(n_stars),
                        float(limit_flux), limit_mag, float(nan_fraction), float(saturated), tuple(flags))


def _seeing(data: np.ndarray, rms: float, saturation: float, config: IngestConfig) -> tuple[float, int]:
    """Median FWHM (px) of the brightest isolated unsaturated stars, and how many were fitted."""
    found = find_stars(data, rms, StarConfig(threshold_sigma=config.detect_sigma, max_stars=config.max_stars * 2),
                       fwhm=3.0)  # a 3 px kernel finds stars of 1.5-6 px seeing; their FWHM is fitted below
    bright = np.flatnonzero(found.peak < 0.7 * saturation)[: config.max_stars]  # away from non-linearity
    fwhm = fit_fwhms(data, found.x[bright], found.y[bright], fwhm_guess=3.0, fit_shape=11)
    good = np.isfinite(fwhm) & (fwhm > 0.3) & (fwhm < 30)
    if not good.any():
        return float("nan"), 0
    return float(np.median(fwhm[good])), int(good.sum())


def ingest(frame: Frame, config: IngestConfig = IngestConfig()) -> FrameQuality:
    """Validate and measure ``frame``; raise :class:`PoorQuality` when a rejecting flag is set."""
    validate(frame, config)
    quality = measure_quality(frame, config)
    rejected = [f for f in quality.flags if f in config.reject_on]
    if rejected:
        raise PoorQuality(f"frame rejected by quality cuts {rejected}: fwhm={quality.fwhm:.2f} px, "
                          f"stars={quality.n_stars}, sky={quality.sky:.1f} ADU")
    return quality
