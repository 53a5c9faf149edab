"""Physical plausibility of a frame: header values within physical bounds, pixels an exposure can produce.

A frame can be readable, have a WCS and stars, and still be nonsense: a gain of -1.5 e-/ADU, an
exposure that started before 1990 or tomorrow, 1e300 s of exposure, an all-zero readout, a 0/1
mask sent as an image. Such frames once became alerts (500 from one all-zero frame; a frame at
MJD -1e6 rewrote ``first_mjd`` of 29 objects in the history). :func:`check_header`,
:func:`check_wcs` and :func:`check_pixels` refuse them with :class:`~broker.errors.ImplausibleHeader`
(reason ``implausible_header``), :class:`~broker.errors.MissingWCS` (``no_wcs``: pixels off the sky)
and :class:`~broker.errors.ImplausiblePixels` (``implausible_pixels``); the ingest stage, the
producer and the subtract stage call them through :func:`broker.ingest.validate`.
The bounds are :class:`PlausibilityConfig` (``[ingest.plausibility]`` in the TOML file).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from astropy.wcs.utils import proj_plane_pixel_scales

from broker.errors import ConfigError, ImplausibleHeader, ImplausiblePixels, MissingWCS
from broker.frame import Frame, FrameMeta

#: MJD of the Unix epoch (1970-01-01T00:00 UTC), days.
MJD_UNIX_EPOCH = 40587.0


def mjd_now() -> float:
    """The current time as MJD (days, UTC, from the system clock)."""
    return time.time() / 86400.0 + MJD_UNIX_EPOCH


@dataclass(frozen=True)
class PlausibilityConfig:
    """Bounds of a physically plausible frame (``[ingest.plausibility]``).

    Lower bounds that physics sets (an exposure > 0, a read noise >= 0) are not settings; the
    upper bounds, the smallest gain and the time window are, each generous enough for any real
    camera.

    Attributes
    ----------
    mjd_min : float
        Earliest accepted exposure start (MJD, days). Default 47892.0 = 1990-01-01: CCD frames with
        a FITS WCS; archival plates are out of scope. Set lower to reprocess older data.
    mjd_future_days : float
        Latest accepted exposure start, in days after now (system clock). Default 1.0: a clock
        skew of hours is tolerated, a frame "from next week" is not.
    gain_min : float
        Smallest accepted GAIN (e-/ADU). Default 1e-4: CMOS cameras at their highest gain setting,
        with 12-bit data scaled to 16 bits, reach ~0.005 e-/ADU in the file's units. GAIN = 1e-300
        (positive, so accepted before) made the noise model's source variance (signal / gain)
        1e300 times the signal; the candidates of a simulated frame changed from 16-26 to 7-12.
    gain_max : float
        Largest accepted GAIN (e-/ADU). Default 1000: CCDs and CMOS sensors
        run at 0.1-20 e-/ADU; beyond 1000 the noise model (variance = signal / gain) is
        meaningless. GAIN = -1.5 gave 2.6x the alerts of the same frame with its true gain.
    read_noise_max : float
        Largest accepted RDNOISE (e-); it must be >= 0. Default 1000: real detectors have
        1-20 e- (old CCDs up to ~100).
    exptime_max : float
        Longest accepted EXPTIME (s); it must be > 0 (``broker.frame``). Default 1e5 s
        (27.8 h): longer than any single exposure.
    saturation_max : float
        Largest accepted SATURATE (ADU); it must be > 0. Default 1e10: above any 32-bit
        integer detector's range (4.3e9) while finite.
    magzp_range : tuple of float
        Accepted MAGZP, inclusive (mag of a source giving 1 ADU in the exposure). Default
        (0, 50): real zero points are 15-35 mag.
    pixel_scale_range : tuple of float
        Accepted pixel scale of the WCS, inclusive (arcsec/px, the mean of both axes at the
        reference pixel). Default (0.01, 3600): from adaptive-optics imagers (~0.01"/px) to
        all-sky cameras (~10'/px); a scale of 1e-30 deg/px would put every candidate of a frame
        on one object.
    min_distinct_values : int
        Fewest distinct finite pixel values accepted (count, on the sample). Default 3: a constant
        (all-zero included) frame has one and a binary (0/1) image two; a real exposure with read
        noise has hundreds.
    max_mode_fraction : float
        Largest fraction of the finite unsaturated pixels (on the sample) that may share one value.
        Default 0.95: even integer pixels with 0.3 ADU of noise spread over a few values (~90 % at
        the mode); a readout that lost its data with a few hot pixels has nearly all at one value.
    sample_pixels : int
        Pixels sampled (a regular stride) for the pixel statistics (count, at least 1000). Default
        1e6: the statistics are exact to ~1e-3 and cost ~50 ms on any frame size. 0 sampled one
        pixel and refused every frame as "a constant image".
    """

    mjd_min: float = 47892.0
    mjd_future_days: float = 1.0
    gain_min: float = 1e-4
    gain_max: float = 1000.0
    read_noise_max: float = 1000.0
    exptime_max: float = 1e5
    saturation_max: float = 1e10
    magzp_range: tuple[float, float] = (0.0, 50.0)
    pixel_scale_range: tuple[float, float] = (0.01, 3600.0)
    min_distinct_values: int = 3
    max_mode_fraction: float = 0.95
    sample_pixels: int = 1_000_000

    def __post_init__(self) -> None:
        if self.sample_pixels < 1000:
            raise ConfigError(f"sample_pixels must be 1000 or more, not {self.sample_pixels}")


def header_problems(meta: FrameMeta, config: PlausibilityConfig = PlausibilityConfig(),
                    now_mjd: float | None = None) -> list[str]:
    """What is implausible in ``meta`` (empty when nothing): one phrase per value out of bounds.

    ``now_mjd`` (MJD, days) is the present for the MJD window; default the system clock.
    """
    c = config
    latest = (mjd_now() if now_mjd is None else now_mjd) + c.mjd_future_days
    checks = [
        (c.mjd_min <= meta.mjd_start <= latest,
         f"MJD-OBS={meta.mjd_start:g} outside [{c.mjd_min:g}, now + {c.mjd_future_days:g} d = {latest:.1f}]"),
        (0.0 < meta.exptime <= c.exptime_max, f"EXPTIME={meta.exptime:g} s outside (0, {c.exptime_max:g}]"),
        (c.gain_min <= meta.gain <= c.gain_max,
         f"GAIN={meta.gain:g} e-/ADU outside [{c.gain_min:g}, {c.gain_max:g}]"),
        (0.0 <= meta.read_noise <= c.read_noise_max,
         f"RDNOISE={meta.read_noise:g} e- outside [0, {c.read_noise_max:g}]"),
        (0.0 < meta.saturation <= c.saturation_max or meta.saturation == np.inf,
         f"SATURATE={meta.saturation:g} ADU outside (0, {c.saturation_max:g}]"),
        (meta.magzp is None or c.magzp_range[0] <= meta.magzp <= c.magzp_range[1],
         f"MAGZP={meta.magzp} mag outside [{c.magzp_range[0]:g}, {c.magzp_range[1]:g}]"),
    ]
    return [text for ok, text in checks if not ok]


def check_header(meta: FrameMeta, config: PlausibilityConfig = PlausibilityConfig(),
                 now_mjd: float | None = None) -> None:
    """Raise :class:`ImplausibleHeader` naming every header value out of its bounds (:func:`header_problems`)."""
    problems = header_problems(meta, config, now_mjd)
    if problems:
        raise ImplausibleHeader(f"frame {meta.frame_id}: " + "; ".join(problems))


def check_wcs(frame: Frame, config: PlausibilityConfig = PlausibilityConfig()) -> None:
    """Check that ``frame``'s WCS puts it on the sky at a plausible pixel scale.

    Raises
    ------
    MissingWCS
        A corner, edge midpoint or the centre maps to a non-finite or off-sphere RA/Dec (those
        reached the object history as NaN), or the WCS cannot transform at all.
    ImplausibleHeader
        The pixel scale is outside ``config.pixel_scale_range`` (arcsec/px).
    """
    ny, nx = frame.data.shape
    x = np.array([0, (nx - 1) / 2, nx - 1] * 3, float)
    y = np.repeat([0, (ny - 1) / 2, ny - 1], 3).astype(float)
    wcs = frame.wcs
    try:
        with np.errstate(invalid="ignore"):
            ra, dec = (np.asarray(v, float) for v in wcs.pixel_to_world_values(x, y))
        scale = float(np.mean(proj_plane_pixel_scales(wcs))) * 3600.0
    except Exception as exc:  # wcslib raises its own types for transformations it cannot do
        raise MissingWCS(f"the WCS cannot transform pixels: {exc}") from exc
    bad = ~(np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90.0))
    if bad.any():
        i = int(np.argmax(bad))
        raise MissingWCS(f"the WCS maps pixel ({x[i]:g}, {y[i]:g}) to RA, Dec = ({ra[i]}, {dec[i]}): "
                         "not a position on the sky")
    lo, hi = config.pixel_scale_range
    if not lo <= scale <= hi:
        raise ImplausibleHeader(f"frame {frame.meta.frame_id}: WCS pixel scale {scale:.3g} arcsec/px outside "
                                f"[{lo:g}, {hi:g}]")
    span = _span_scale(ra, dec, nx, ny)
    if not scale / SPAN_SCALE_FACTOR <= span <= scale * SPAN_SCALE_FACTOR:
        raise ImplausibleHeader(f"frame {frame.meta.frame_id}: the WCS maps the frame at {span:.3g} arcsec/px, "
                                f"not within a factor {SPAN_SCALE_FACTOR:g} of its pixel scale {scale:.3g}")


#: Largest ratio accepted between the WCS's pixel scale at its reference pixel and its mean scale
#: across the frame (:func:`_span_scale`). The real frames of ``../shared/data`` agree within 0.3 %;
#: a TAN projection 60 deg wide differs by 10 %; ``CRPIX1 = 1e6`` (a reference pixel 280 deg away)
#: by a factor 25.
SPAN_SCALE_FACTOR = 4.0


def _span_scale(ra: np.ndarray, dec: np.ndarray, nx: int, ny: int) -> float:
    """The smaller of the mean scales (arcsec/px) along the frame's middle row and middle column.

    ``ra``, ``dec`` (9,): the sky positions (deg) of :func:`check_wcs`'s 3 x 3 grid of pixels. The
    header's scale is the one at the reference pixel, which may lie anywhere: ``CRPIX1 = 1e300``
    kept a scale of 1 arcsec/px there while mapping every pixel of the frame to one position, and
    ``CRVAL1 = 1e300`` gave every pixel the same RA of 1e300.
    """
    u = np.stack([np.cos(np.radians(dec)) * np.cos(np.radians(ra)), np.cos(np.radians(dec)) * np.sin(np.radians(ra)),
                  np.sin(np.radians(dec))], axis=-1)
    row = np.degrees(np.arccos(np.clip(u[3] @ u[5], -1.0, 1.0))) / max(nx - 1, 1)
    column = np.degrees(np.arccos(np.clip(u[1] @ u[7], -1.0, 1.0))) / max(ny - 1, 1)
    return float(min(row, column)) * 3600.0


def pixel_problem(data: np.ndarray, saturation: float = np.inf,
                  config: PlausibilityConfig = PlausibilityConfig()) -> str | None:
    """What makes ``data`` (ADU) implausible as an exposure (blank, constant, binary, one value), or None.

    Measured on a regular sample of about ``config.sample_pixels`` pixels; pixels at or above
    ``saturation`` (ADU) are left out of the mode fraction (a saturated frame is flagged by ingest).
    """
    step = max(1, int(np.sqrt(data.size / max(config.sample_pixels, 1))))
    sample = data[::step, ::step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return None  # all NaN: BadPixelFraction names it
    values, counts = np.unique(sample, return_counts=True)
    if len(values) == 1:
        what = "a blank readout" if values[0] == 0 else "a constant image"
        return f"all finite pixels are {values[0]:g} ADU ({what})"
    if len(values) < config.min_distinct_values:
        shown = ", ".join(f"{v:g}" for v in values)
        kind = "binary" if len(values) == 2 else "few-valued"
        return f"the image is {kind}: only the values {shown} (at least {config.min_distinct_values} required)"
    unsaturated = values < saturation
    n = int(counts[unsaturated].sum())
    if n:
        i = int(np.argmax(np.where(unsaturated, counts, 0)))
        fraction = counts[i] / n
        if fraction > config.max_mode_fraction:
            return (f"{fraction:.1%} of the unsaturated pixels are {values[i]:g} ADU "
                    f"(at most {config.max_mode_fraction:.0%} may share one value)")
    return None


def check_pixels(frame: Frame, config: PlausibilityConfig = PlausibilityConfig()) -> None:
    """Raise :class:`ImplausiblePixels` when :func:`pixel_problem` finds ``frame``'s pixels implausible."""
    problem = pixel_problem(frame.data, frame.meta.saturation, config)
    if problem:
        raise ImplausiblePixels(f"frame {frame.meta.frame_id}: {problem}")
