"""Background maps, star catalogues and empirical PSFs.

Everything here works on one image at a time and returns plain arrays / small dataclasses:

* :func:`estimate_background` -- photutils ``Background2D`` map and RMS map;
* :func:`find_stars` -- ``DAOStarFinder`` catalogue of point sources (x, y, flux, peak);
* :func:`build_psf` -- a stacked-star PSF from bright, isolated, unsaturated stars, with a Gaussian
  fallback (flagged) when too few stars qualify.

Positions are 0-based pixel coordinates (x = column, y = row).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from astropy.stats import SigmaClip
from photutils.background import Background2D, MADStdBackgroundRMS, MedianBackground
from photutils.detection import DAOStarFinder, find_peaks
from scipy import ndimage, optimize
from scipy.spatial import cKDTree

from broker.errors import BadPixelFraction, PSFError

#: FWHM of a Gaussian in units of its sigma.
GAUSS_FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))


# --- background -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackgroundConfig:
    """Settings of the background map.

    Attributes
    ----------
    box_size : int
        Mesh size (px). 64 px is the SExtractor/photutils default regime: >> the PSF FWHM (a few px)
        so stars barely bias it, << the scale of sky gradients on a CCD frame.
    filter_size : int
        Median filter over meshes (meshes); 3 is the SExtractor default.
    sigma_clip : float
        Clipping of sources inside each mesh (sigma); 3 is the photutils default. The RMS is the
        MAD-based standard deviation, unbiased for Gaussian noise (a clipped std is ~1.5 % low).
    min_finite_fraction : float
        Fraction of finite pixels below which the image is rejected (``BadPixelFraction``); 0.05
        means "almost nothing to measure a sky on".
    """

    box_size: int = 64
    filter_size: int = 3
    sigma_clip: float = 3.0
    min_finite_fraction: float = 0.05


def estimate_background(
    data: np.ndarray, mask: np.ndarray | None = None, config: BackgroundConfig = BackgroundConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Sky background and its RMS.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Image (ADU); NaN pixels are ignored.
    mask : ndarray of bool, shape (ny, nx), optional
        Extra pixels to ignore (saturated, ...).

    Returns
    -------
    background, rms : ndarray, shape (ny, nx), float32
        Sky level (ADU) and sky noise (ADU per pixel).

    Raises
    ------
    BadPixelFraction
        Fewer than ``min_finite_fraction`` of the pixels are usable.
    """
    bad = ~np.isfinite(data)
    if mask is not None:
        bad |= mask
    if bad.mean() > 1.0 - config.min_finite_fraction:
        raise BadPixelFraction(f"only {100 * (1 - bad.mean()):.1f}% usable pixels for the background")
    box = int(min(config.box_size, max(8, min(data.shape) // 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # photutils warns about meshes dropped for bad pixels
        bkg = Background2D(
            data, box, mask=bad, filter_size=config.filter_size,
            sigma_clip=SigmaClip(sigma=config.sigma_clip, maxiters=5),
            bkg_estimator=MedianBackground(), bkg_rms_estimator=MADStdBackgroundRMS(),
            exclude_percentile=50.0,
        )
    return bkg.background.astype(np.float32), bkg.background_rms.astype(np.float32)


# --- stars ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StarConfig:
    """Settings of the star catalogue used for PSFs, alignment and photometric scaling.

    Attributes
    ----------
    threshold_sigma : float
        Detection threshold (background RMS). 10 sigma keeps centroids good to ~0.1 px (FWHM/SNR).
    max_stars : int
        Brightest stars kept (count); bounds the cost on crowded 2048^2 frames.
    saturation_fraction : float
        Stars whose peak (sky included) exceeds this fraction of SATURATE are dropped: detectors
        become non-linear some 10-20 % below full well.
    fwhm_guess_px : float
        Detection kernel FWHM (px) when no star can be measured to set it.
    """

    threshold_sigma: float = 10.0
    max_stars: int = 400
    saturation_fraction: float = 0.8
    fwhm_guess_px: float = 3.0


@dataclass
class StarList:
    """A star catalogue (arrays of equal length n).

    Attributes
    ----------
    x, y : ndarray, shape (n,)
        Centroids (px).
    flux : ndarray, shape (n,)
        DAOStarFinder flux (ADU above background).
    peak : ndarray, shape (n,)
        Peak pixel above background (ADU).
    fwhm : float
        Median FWHM measured on the brightest stars (px), or the guess.
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    peak: np.ndarray
    fwhm: float

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, keep: np.ndarray) -> "StarList":
        return StarList(self.x[keep], self.y[keep], self.flux[keep], self.peak[keep], self.fwhm)

    def as_array(self) -> np.ndarray:
        """(n, 4) float64 array of x, y, flux, peak."""
        return np.column_stack([self.x, self.y, self.flux, self.peak]).astype(np.float64)

    @classmethod
    def from_array(cls, arr: np.ndarray, fwhm: float) -> "StarList":
        arr = np.asarray(arr, dtype=np.float64).reshape(-1, 4)
        return cls(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], float(fwhm))


def _quick_fwhm(data: np.ndarray, rms: float, guess: float, n: int = 30) -> float:
    """Median half-maximum-area FWHM of the brightest peaks (px): a detection-kernel guess only."""
    finite = np.where(np.isfinite(data), data, 0.0)
    try:
        peaks = find_peaks(finite, 20.0 * rms, box_size=11, n_peaks=n, border_width=10)
    except Exception:  # photutils raises on degenerate inputs; the guess is good enough then
        peaks = None
    if peaks is None or len(peaks) < 3:
        return guess
    out = []
    for x, y, v in zip(peaks["x_peak"], peaks["y_peak"], peaks["peak_value"]):
        st = finite[y - 7:y + 8, x - 7:x + 8]
        area = np.count_nonzero(st > 0.5 * v)
        out.append(2.0 * np.sqrt(area / np.pi))
    return float(np.clip(np.median(out), 1.0, 20.0))


def find_stars(
    data: np.ndarray,
    rms: float,
    config: StarConfig = StarConfig(),
    saturation: float = np.inf,
    background: float | np.ndarray = 0.0,
    fwhm: float | None = None,
    threshold_sigma: float | None = None,
) -> StarList:
    """Point sources above ``threshold_sigma`` on a background-subtracted image.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Background-subtracted image (ADU); NaN pixels are treated as 0.
    rms : float
        Sky noise (ADU per pixel).
    saturation : float
        Saturation level of the *raw* image (ADU); ``background`` is what was subtracted.
    fwhm : float, optional
        Detection kernel FWHM (px); estimated from the brightest peaks when omitted.
    """
    thr = config.threshold_sigma if threshold_sigma is None else threshold_sigma
    clean = np.where(np.isfinite(data), data, 0.0).astype(np.float32)
    if fwhm is None:
        fwhm = _quick_fwhm(clean, rms, config.fwhm_guess_px)
    finder = DAOStarFinder(threshold=thr * rms, fwhm=fwhm, exclude_border=True,
                           n_brightest=config.max_stars, scale_threshold=False,
                           sharpness_range=(0.2, 1.2), roundness_range=(-0.8, 0.8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tab = finder(clean)
    if tab is None or len(tab) == 0:
        return StarList(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), float(fwhm))
    x = np.asarray(tab["x_centroid"], float)
    y = np.asarray(tab["y_centroid"], float)
    peak = np.asarray(tab["peak"], float)
    flux = np.asarray(tab["flux"], float)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux)
    if np.isfinite(saturation):
        bkg_at = background if np.isscalar(background) else np.asarray(background)[
            np.clip(np.round(y).astype(int), 0, data.shape[0] - 1),
            np.clip(np.round(x).astype(int), 0, data.shape[1] - 1)]
        ok &= (peak + bkg_at) < config.saturation_fraction * saturation
    order = np.argsort(-flux[ok], kind="stable")
    return StarList(x[ok][order], y[ok][order], flux[ok][order], peak[ok][order], float(fwhm))


# --- PSF ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PSFConfig:
    """Settings of the empirical PSF.

    Attributes
    ----------
    max_stars : int
        Stars stacked (count); 50 gives a PSF noise well below that of any single star while
        keeping the cost at a few ms.
    min_stars : int
        Below this many usable stars (count) the Gaussian fallback is used and flagged.
    half_size_fwhm : float
        Stamp half-size in FWHM; 3 FWHM holds > 98 % of a Moffat(beta=2.5) flux.
    min_half_size, max_half_size : int
        Bounds on the stamp half-size (px).
    isolation_fwhm : float
        No other catalogue star within this many FWHM (so neighbours do not enter the stack).
    fallback_fwhm_px : float
        FWHM of the fallback Gaussian (px) when not even a rough FWHM can be measured.
    allow_fallback : bool
        When False, too few stars raise :class:`PSFError` instead.
    """

    max_stars: int = 50
    min_stars: int = 5
    half_size_fwhm: float = 3.0
    min_half_size: int = 7
    max_half_size: int = 25
    isolation_fwhm: float = 3.0
    fallback_fwhm_px: float = 3.0
    allow_fallback: bool = True


@dataclass
class PSFModel:
    """A PSF estimate.

    Attributes
    ----------
    stamp : ndarray, shape (2h+1, 2h+1), float32
        PSF sampled on pixels, centred on the central pixel, summing to 1.
    fwhm : float
        FWHM of a circular Gaussian fit to the stamp (px).
    n_stars : int
        Stars stacked (0 for the fallback).
    fallback : bool
        True when the stamp is the Gaussian fallback.
    star_flux : ndarray, shape (n_stars,)
        Stamp sums of the stacked stars (ADU), in the order of the positions given.
    """

    stamp: np.ndarray
    fwhm: float
    n_stars: int
    fallback: bool
    star_flux: np.ndarray | None = None


def half_size_for(fwhm: float, config: PSFConfig = PSFConfig()) -> int:
    """Stamp half-size (px) for a FWHM (px)."""
    return int(np.clip(np.ceil(config.half_size_fwhm * fwhm), config.min_half_size, config.max_half_size))


def gaussian_psf(fwhm: float, half_size: int) -> np.ndarray:
    """Pixel-integrated circular Gaussian stamp of shape (2h+1, 2h+1), sum 1."""
    from scipy.special import erf

    s = fwhm / GAUSS_FWHM
    edges = np.arange(-half_size - 0.5, half_size + 1.0)
    g = np.diff(erf(edges / (np.sqrt(2.0) * s)))
    stamp = np.outer(g, g)
    return (stamp / stamp.sum()).astype(np.float32)


def measure_fwhm(stamp: np.ndarray) -> float:
    """FWHM (px) of a circular Gaussian least-squares fit to a centred PSF stamp."""
    h = stamp.shape[0] // 2
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]

    def model(p: np.ndarray) -> np.ndarray:
        a, x0, y0, s = p
        return a * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s))

    p0 = np.array([stamp.max(), 0.0, 0.0, 1.2])
    try:
        res = optimize.least_squares(lambda p: (model(p) - stamp).ravel(), p0,
                                     bounds=([0, -3, -3, 0.3], [np.inf, 3, 3, 30]))
        return float(abs(res.x[3]) * GAUSS_FWHM)
    except Exception:  # a degenerate stamp: fall back on the second moment
        w = np.clip(stamp, 0, None)
        return float(np.sqrt((w * (xx ** 2 + yy ** 2)).sum() / max(w.sum(), 1e-12) / 2) * GAUSS_FWHM)


def stack_psf(
    data: np.ndarray, x: np.ndarray, y: np.ndarray, half_size: int
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Median stack of star stamps re-centred with sub-pixel (cubic spline) shifts.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Background-subtracted image (ADU).
    x, y : ndarray, shape (n,)
        Star centroids (px).
    half_size : int
        Stamp half-size h (px); stamps are (2h+1, 2h+1).

    Returns
    -------
    stamp : ndarray or None
        Normalised PSF (None when no star gives a clean stamp).
    flux : ndarray, shape (n,)
        Stamp sum of each star after local-sky correction (ADU; NaN where rejected).
    used : ndarray of bool, shape (n,)
    """
    h = half_size
    ny, nx = data.shape
    stamps, flux, used = [], np.full(len(x), np.nan), np.zeros(len(x), bool)
    for i, (xc, yc) in enumerate(zip(x, y)):
        ix, iy = int(np.round(xc)), int(np.round(yc))
        if ix - h - 2 < 0 or iy - h - 2 < 0 or ix + h + 3 > nx or iy + h + 3 > ny:
            continue
        big = data[iy - h - 2:iy + h + 3, ix - h - 2:ix + h + 3]
        if not np.all(np.isfinite(big)):
            continue
        shifted = ndimage.shift(big.astype(np.float64), (iy - yc, ix - xc), order=3, mode="nearest")
        st = shifted[2:-2, 2:-2]
        ring = np.concatenate([st[0], st[-1], st[1:-1, 0], st[1:-1, -1]])
        st = st - np.median(ring)  # residual local sky
        total = st.sum()
        if not total > 0:
            continue
        flux[i] = total
        used[i] = True
        stamps.append(st / total)
    if not stamps:
        return None, flux, used
    psf = np.median(np.asarray(stamps), axis=0)
    psf /= psf.sum()
    return psf.astype(np.float32), flux, used


def select_psf_stars(stars: StarList, shape: tuple[int, int], half_size: int,
                     config: PSFConfig = PSFConfig()) -> np.ndarray:
    """Indices (into ``stars``) of isolated stars away from the edges, brightest first."""
    if len(stars) == 0:
        return np.zeros(0, int)
    pts = np.column_stack([stars.x, stars.y])
    tree = cKDTree(pts)
    r = max(config.isolation_fwhm * stars.fwhm, half_size)
    counts = np.array([len(n) for n in tree.query_ball_point(pts, r)])
    ny, nx = shape
    edge = half_size + 3
    ok = (counts == 1) & (stars.x > edge) & (stars.x < nx - edge) & (stars.y > edge) & (stars.y < ny - edge)
    return np.flatnonzero(ok)[: config.max_stars]


def build_psf(data: np.ndarray, stars: StarList, config: PSFConfig = PSFConfig(),
              half_size: int | None = None) -> PSFModel:
    """Empirical PSF from bright, isolated, unsaturated stars (stacked), or a flagged fallback.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Background-subtracted image (ADU), NaN where invalid.
    stars : StarList
        Catalogue from :func:`find_stars` (saturated stars already removed).
    half_size : int, optional
        Stamp half-size (px); from the catalogue FWHM when omitted.

    Raises
    ------
    PSFError
        Too few stars and ``config.allow_fallback`` is False, or the image has no finite pixel.
    """
    if not np.isfinite(data).any():
        raise PSFError("image has no finite pixel")
    fwhm0 = stars.fwhm if np.isfinite(stars.fwhm) and stars.fwhm > 0 else config.fallback_fwhm_px
    h = half_size if half_size is not None else half_size_for(fwhm0, config)
    idx = select_psf_stars(stars, data.shape, h, config)
    stamp = None
    if len(idx) >= config.min_stars:
        stamp, _, used = stack_psf(data, stars.x[idx], stars.y[idx], h)
        if used.sum() < config.min_stars:
            stamp = None
    if stamp is None:
        if not config.allow_fallback:
            raise PSFError(f"only {len(idx)} usable PSF stars (need {config.min_stars})")
        return PSFModel(gaussian_psf(fwhm0, h), float(fwhm0), 0, True)
    return PSFModel(stamp, measure_fwhm(stamp), int(used.sum()), False)


def resize_stamp(stamp: np.ndarray, half_size: int) -> np.ndarray:
    """Crop or zero-pad a centred stamp to half-size ``half_size`` and renormalise."""
    h0 = stamp.shape[0] // 2
    out = np.zeros((2 * half_size + 1,) * 2, np.float32)
    m = min(h0, half_size)
    out[half_size - m:half_size + m + 1, half_size - m:half_size + m + 1] = stamp[h0 - m:h0 + m + 1, h0 - m:h0 + m + 1]
    return out / out.sum()
