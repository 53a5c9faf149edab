"""A frame's flux ratio to another of the same field, and what measured it.

The reference co-add scales each frame to its grid frame by this ratio (:mod:`broker.reference`)
and the subtraction measures its F_r, the reference's flux over the science frame's, the same way
(:mod:`broker.subtract`): PSF fits of isolated stars where there are enough (the callers' own,
which stack the PSF too), else apertures on every matched star (:func:`aperture_flux_ratio`),
else the frames' measured zero points (:func:`zero_point_ratio`); :func:`measure_flux_ratio`
takes the first that gives one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from broker.background import BackgroundConfig, residual_sky

#: Signal-to-noise ratio (sky noise in the aperture) a matched star's aperture flux must reach in
#: both images to give an aperture flux ratio (:func:`aperture_flux_ratio`); 20: the ratio of two
#: such fluxes is within 7 % (1 sigma), the median of 3 of them within about 5 %.
APERTURE_MIN_SNR = 20.0


#: Radius of the apertures of :func:`aperture_flux_ratio` in FWHM of the broader image (dimensionless);
#: 3. At 2 (``PhotCalConfig.aperture_fwhm``, > 99 % of a Gaussian) a field of close pairs gave 1.954-
#: 1.961 for a true F of 2 (seeing 2.6 and 3.2 px, seeds 5-7): a neighbour on the aperture's edge
#: has less of its light inside in the broader image. At 3 the pairs lie inside: 2.000-2.008.
APERTURE_RADIUS_FWHM = 3.0

#: Radius of :func:`aperture_flux_ratio`'s inner apertures in FWHM of the broader image
#: (dimensionless); 1.5. The sums in both radii, both images at the broader seeing, give each
#: star's ratio free of what is left of the sky: 1.001, 0.995, 1.002 for the true 1 on the
#: fields of a 9 px reference against a 3 px frame (2 FWHM: 1.004, 1.000, 1.006).
APERTURE_INNER_FWHM = 1.5


@dataclass(frozen=True)
class FluxRatio:
    """A frame's flux ratio to the grid frame, and what measured it (:func:`measure_flux_ratio`).

    Attributes
    ----------
    value : float
        F, a source's flux in the frame over its flux in the grid frame (dimensionless); NaN when
        nothing measured it.
    source : str
        ``"grid"`` (the grid frame itself, F = 1), ``"psf_stars"``, ``"aperture"``, ``"zero_point"``,
        or ``"none"``.
    n_stars : int
        Stars whose ratios' median F is (count; 0 for a zero point).
    reason : str
        Why nothing measured it ("" when something did).
    """

    value: float
    source: str
    n_stars: int = 0
    reason: str = ""

    @property
    def measured(self) -> bool:
        """Whether F is a measured, finite, positive ratio."""
        return self.source != "none" and bool(np.isfinite(self.value) and self.value > 0)


def aperture_flux_ratio(g_img: np.ndarray, img: np.ndarray, x: np.ndarray, y: np.ndarray,
                        sigmas: tuple[float, float], fwhm_px: float, min_stars: int,
                        background: BackgroundConfig, fwhms: tuple[float, float]) -> FluxRatio:
    """Median ratio of a registered frame's aperture fluxes to the grid frame's at the same positions.

    Parameters
    ----------
    g_img, img : ndarray, shape (ny, nx)
        The grid frame and the frame registered onto its grid, background-subtracted (ADU; NaN where
        invalid: a star with a NaN in its aperture, saturated say, gives no ratio).
    x, y : ndarray, shape (n,)
        Matched stars on the grid (px), isolated or not.
    sigmas : (float, float)
        Sky RMS of the grid frame and of the frame (ADU per pixel).
    fwhm_px : float
        The broader of the two FWHMs (px); apertures of :data:`APERTURE_RADIUS_FWHM` and
        :data:`APERTURE_INNER_FWHM` of it, the same on both images.
    min_stars : int
        Fewest ratios (stars of S/N >= :data:`APERTURE_MIN_SNR` in both images) for a median.
    background : BackgroundConfig
        Meshes of the residual sky (:func:`broker.background.residual_sky`) taken out of each image
        first: a broad-seeing image's map holds its stars' wings (a 9 px reference's apertures
        gave F 0.90-0.96 for the true 1, 0.99-1.01 on the true sky; no annulus helps in such a
        field, the stars' wings cover it: 0.83-0.94).
    fwhms : (float, float)
        The grid frame's and the frame's own FWHMs (px; NaN: unknown). The sharper image is blurred
        by a Gaussian to ``fwhm_px`` (:func:`_at_seeing`), so a neighbour on an aperture's edge puts
        the same share of its light inside in both; each star's ratio is then that of its sums in
        the two apertures less a constant sky per unit area (what the residual sky leaves, 1-2 %
        at 9 px): (b1 r^2 - b r1^2) / (a1 r^2 - a r1^2), for grid sums a, a1 and frame sums b, b1.

    Returns
    -------
    FluxRatio
        Source ``"aperture"``, NaN with fewer than ``min_stars`` ratios.
    """
    r, r1 = APERTURE_RADIUS_FWHM * fwhm_px, APERTURE_INNER_FWHM * fwhm_px
    g_img, img = g_img - residual_sky(g_img, sigmas[0], background), img - residual_sky(img, sigmas[1], background)
    least = [APERTURE_MIN_SNR * float(np.sqrt(np.pi)) * r * s for s in sigmas]
    with np.errstate(invalid="ignore"):
        good = (_aperture_sums(g_img, x, y, r) > least[0]) & (_aperture_sums(img, x, y, r) > least[1])
    g_img, img = _at_seeing(g_img, fwhms[0], fwhm_px), _at_seeing(img, fwhms[1], fwhm_px)
    a, a1 = _aperture_sums(g_img, x[good], y[good], r), _aperture_sums(g_img, x[good], y[good], r1)
    b, b1 = _aperture_sums(img, x[good], y[good], r), _aperture_sums(img, x[good], y[good], r1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (b1 * r * r - b * r1 * r1) / (a1 * r * r - a * r1 * r1)
    ratio = ratio[np.isfinite(ratio)]
    F = float(np.median(ratio)) if len(ratio) >= min_stars else float("nan")
    return FluxRatio(F, "aperture", len(ratio))


def _at_seeing(image: np.ndarray, fwhm: float, fwhm_px: float) -> np.ndarray:
    """``image`` of FWHM ``fwhm`` blurred by a Gaussian to ``fwhm_px`` (px); as it is when not sharper or unknown.

    NaN pixels spread to where their blurred weight reaches 0.1 %: a saturated core gives no sum.
    """
    from scipy import ndimage

    if not (np.isfinite(fwhm) and 0 < fwhm < fwhm_px):
        return image
    s = float(np.sqrt(fwhm_px ** 2 - fwhm ** 2)) / 2.3548200450309493
    bad = ~np.isfinite(image)
    out = ndimage.gaussian_filter(np.where(bad, 0.0, image), s)
    out[ndimage.gaussian_filter(bad.astype(np.float64), s) > 1e-3] = np.nan
    return out


def _aperture_sums(data: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Sums of ``data`` (ADU) within ``radius`` px of each (x, y) (0-based px); NaN off the image or at a NaN."""
    out = np.full(len(x), np.nan)
    ny, nx = data.shape
    for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
        x0, x1 = int(np.floor(xi - radius)), int(np.ceil(xi + radius)) + 1
        y0, y1 = int(np.floor(yi - radius)), int(np.ceil(yi + radius)) + 1
        if x0 < 0 or y0 < 0 or x1 > nx or y1 > ny:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        out[i] = float(np.sum(data[y0:y1, x0:x1][np.hypot(xx - xi, yy - yi) < radius]))
    return out


class MeasuredZeroPoint(Protocol):
    """An image's photometric zero point: a frame's `FrameMeta`, a :class:`~broker.reference.Reference`."""

    @property
    def magzp(self) -> float | None:
        """Zero point (mag of a source giving 1 ADU in the image), when known."""

    @property
    def magzp_err(self) -> float | None:
        """Its 1-sigma uncertainty (mag), when measured."""


def zero_point_ratio(grid: MeasuredZeroPoint, frame: MeasuredZeroPoint) -> FluxRatio:
    """F from the two images' measured zero points: ``10**(0.4 (MAGZP_frame - MAGZP_grid))``.

    Measured means a ``MAGZP`` with its ``MAGZPERR``, as ingest's calibration writes them
    (:mod:`broker.photcal`, against Tycho-2) or a survey's pipeline may; a bare ``MAGZP`` may be a
    nominal value blind to the night's transparency and is not used. NaN without both, or with a
    negative uncertainty (no measurement gives one). A reference carries its grid frame's
    (:attr:`Reference.magzp`). Pipelines' own conventions (ZTF's ``MAGZPUNC``, LCO BANZAI's ``L1ZP``)
    are written into ``MAGZP``/``MAGZPERR`` when a frame is decoded (:func:`broker.headers.zero_point_cards`).
    """
    zps = []
    for m in (grid, frame):
        if (m.magzp is None or m.magzp_err is None or not (np.isfinite(m.magzp) and np.isfinite(m.magzp_err))
                or m.magzp_err < 0):
            return FluxRatio(float("nan"), "zero_point")
        zps.append(m.magzp)
    return FluxRatio(float(10 ** (0.4 * (zps[1] - zps[0]))), "zero_point")


def measure_flux_ratio(by_psf: FluxRatio, by_aperture: Callable[[], FluxRatio], by_zero_point: FluxRatio,
                       what: str, min_stars: str) -> FluxRatio:
    """A frame's flux ratio F to the grid frame: the first of three measurements that gives one.

    1. ``by_psf``: PSF fits of isolated matched stars (the caller's: :mod:`broker.reference`,
       :mod:`broker.subtract`), the most precise (a neighbour's light is masked out).
    2. ``by_aperture`` (called only when needed): apertures on every matched star
       (:func:`aperture_flux_ratio`), for a crowded field where no star, or too few, is isolated.
    3. ``by_zero_point``: the frames' measured zero points (:func:`zero_point_ratio`), the least
       precise: F's error is that of the zero points' difference (0.01 mag: 0.9 %), and each rests
       on Tycho-2 stars of the whole frame, without a colour term (:mod:`broker.photcal`).

    The ratio of exposure times (``EXPTIME``) is no measurement: it ignores the transparency
    (cirrus 0.1-0.5 mag, cloud several) and the airmass. Nor is F = 1, taken before when no
    isolated star measured F: a frame twice as deep entered the co-add at twice the grid's flux
    scale. When none measures F, the result's source is ``"none"`` and its reason says why; the
    frame is then left out of the co-add (:func:`broker.reference.build_reference`). The subtraction measures its
    F_r, the reference's flux over the science frame's, the same way (the science frame as the
    grid; :func:`broker.subtract.subtract_and_detect`), and the pipeline refuses a frame none
    measures (:func:`broker.pipeline.process_frame`).

    Parameters
    ----------
    what : str
        The frame, for the reason ("frame X to the grid frame Y").
    min_stars : str
        The setting of the fewest stars and its value, for the reason
        (``"[reference] flux_min_stars = 3"``).
    """
    if by_psf.measured:
        return by_psf
    aperture = by_aperture()
    for ratio in (aperture, by_zero_point):
        if ratio.measured:
            return ratio
    return FluxRatio(float("nan"), "none", 0, (
        f"no flux ratio of {what} was measured: {by_psf.n_stars} isolated matched star(s) fitted and "
        f"{aperture.n_stars} matched star(s) of S/N >= {APERTURE_MIN_SNR:g} in apertures, under {min_stars}, "
        "and no measured zero points (MAGZP with MAGZPERR) of both images"))
