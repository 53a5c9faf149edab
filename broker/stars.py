"""Star catalogues of one image: detection, centroids, fluxes and the seeing.

:func:`find_stars` finds point sources with ``DAOStarFinder`` at the local maxima of the image
(:func:`local_peaks`) and measures the seeing FWHM on the brightest (:func:`star_fwhms`); the result
is a :class:`StarList`, used for PSFs, alignment and photometric scaling. Positions are 0-based
pixel coordinates (x = column, y = row).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from photutils.detection import DAOStarFinder
from scipy.special import erf

from broker.errors import ConfigError
from broker.pixels import box_indices
from broker.streaks import collinear_runs


@dataclass(frozen=True)
class StarConfig:
    """Settings of the star catalogue used for PSFs, alignment and photometric scaling.

    Attributes
    ----------
    threshold_sigma : float
        Detection threshold (sigma of the background). 10 keeps centroids good to ~0.1 px
        (FWHM/SNR).
    peak_fraction : float
        Candidate centres are the local maxima of the image above this fraction of the threshold
        (per pixel); DAOStarFinder then applies the threshold to its fitted peak amplitude, which
        a star's brightest pixel reaches to 0.6-1.0 (sub-pixel phase; FWHM >= 2 px): 0.5 loses
        none, and the noise adds a few candidates per frame.
    max_stars : int
        Brightest stars kept (count, 1 or more); 400 bounds the cost on crowded 2048^2 frames and
        leaves the PSF (50 stars) and the alignment (200) their choice.
    saturation_fraction : float
        Stars whose peak (sky included) exceeds this fraction of SATURATE are dropped
        (dimensionless); 0.8: detectors become non-linear some 10-20 % below full well.
    fwhm_guess_px : float
        Detection kernel FWHM (px, above 0 and at most 50) when no FWHM is given. The kernel only
        has to be within ~2x of the seeing to detect stars: 3 px serves seeing of 1.5-6 px, 50 px
        seeing of 25-100 px (far beyond ingest's ``fwhm_range``). On a simulated 6-frame field 50 px
        still gave alerts, 100 px none in 12 s instead of 2, and 1000 px did not finish.
    """

    threshold_sigma: float = 10.0
    peak_fraction: float = 0.5
    max_stars: int = 400
    saturation_fraction: float = 0.8
    fwhm_guess_px: float = 3.0

    def __post_init__(self) -> None:
        if self.max_stars < 1:
            raise ConfigError(f"max_stars must be 1 or more, not {self.max_stars}")
        if not 0.0 < self.fwhm_guess_px <= 50.0:
            raise ConfigError(f"fwhm_guess_px must be above 0 and at most 50 px, not {self.fwhm_guess_px}")


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

    def subset(self, keep: np.ndarray | slice) -> StarList:
        """The stars selected by ``keep`` (indices, bool mask or slice), same FWHM."""
        return StarList(self.x[keep], self.y[keep], self.flux[keep], self.peak[keep], self.fwhm)

    def as_array(self) -> np.ndarray:
        """(n, 4) float64 array of x, y, flux, peak."""
        return np.column_stack([self.x, self.y, self.flux, self.peak]).astype(np.float64)

    @classmethod
    def from_array(cls, arr: np.ndarray, fwhm: float) -> StarList:
        """Inverse of :meth:`as_array`."""
        arr = np.asarray(arr, dtype=np.float64).reshape(-1, 4)
        return cls(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], float(fwhm))


def _profile_fwhm(row: np.ndarray, c: int) -> float:
    """FWHM (px) of a 1-D profile peaking at index c, by linear interpolation of the half-max points."""
    if not row[c] > 0:
        return float("nan")
    half = row[c] / 2.0
    left = c
    while left > 0 and row[left - 1] > half:
        left -= 1
    right = c
    while right < len(row) - 1 and row[right + 1] > half:
        right += 1
    if left == 0 or right == len(row) - 1:
        return float("nan")
    xl = left - (row[left] - half) / (row[left] - row[left - 1])
    xr = right + (row[right] - half) / (row[right] - row[right + 1])
    return float(xr - xl)


def star_fwhms(data: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-star FWHM (px): geometric mean of the row and column half-maximum widths (NaN if odd)."""
    ny, nx = data.shape
    out = np.full(len(x), np.nan)
    for i, (xc, yc) in enumerate(zip(x, y, strict=True)):
        ix, iy = int(np.round(xc)), int(np.round(yc))
        if ix < 11 or iy < 11 or ix > nx - 12 or iy > ny - 12:
            continue
        fx = _profile_fwhm(data[iy, ix - 11:ix + 12], 11)
        fy = _profile_fwhm(data[iy - 11:iy + 12, ix], 11)
        if np.isfinite(fx) and np.isfinite(fy) and 0.67 < fx / fy < 1.5:
            out[i] = np.sqrt(fx * fy)
    return out


def fitted_fwhm(data: np.ndarray, stars: StarList, n: int = 30) -> float:
    """Median FWHM (px) of a pixel-integrated Gaussian fitted to the ``n`` brightest stars (:func:`fit_fwhms`).

    Unbiased where :attr:`StarList.fwhm` (half-maximum widths of the brightest pixel's row and
    column) reads high on undersampled stars: +24 % at 1.4 px, +12 % at 2.0 px, +7 % at 2.6 px for
    Gaussian stars (tests/broker/test_stars.py). ``stars.fwhm`` when fewer than 3 fits succeed.
    """
    fw = fit_fwhms(data, stars.x[:n], stars.y[:n], fwhm_guess=stars.fwhm if stars.fwhm > 0 else 3.0)
    fw = fw[np.isfinite(fw) & (fw > 0.5)]
    return float(np.median(fw)) if len(fw) >= 3 else float(stars.fwhm)


def local_peaks(data: np.ndarray, level: float, half: int = 2) -> np.ndarray:
    """Pixels above ``level`` that are the maximum of their (2 half + 1)^2 box, shape (n, 2) (x, y).

    Only the pixels above ``level`` are examined (a few % of a frame), where a frame-wide maximum
    filter, as in ``photutils.detection.find_peaks``, costs 0.4 s per 2k x 2k frame. Ties (flat
    saturated tops) keep the first pixel in row-major order.
    """
    ys, xs = np.nonzero(data > level)
    if len(ys) == 0:
        return np.zeros((0, 2), int)
    iy, ix = box_indices(data.shape, ys, xs, half)
    box = data[iy, ix]
    centre = box.shape[1] // 2
    v = data[ys, xs]
    before = np.arange(box.shape[1]) < centre  # box pixels preceding the centre in row-major order
    top = ~np.any((box > v[:, None]) | ((box == v[:, None]) & before), axis=1)
    return np.column_stack([xs[top], ys[top]])


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
        Known FWHM (px), used as the detection kernel; when omitted the kernel is
        ``config.fwhm_guess_px`` and the FWHM is measured on the brightest stars found.
    """
    thr = config.threshold_sigma if threshold_sigma is None else threshold_sigma
    clean = np.where(np.isfinite(data), data, 0.0).astype(np.float32)
    # The kernel only has to be within ~2x of the seeing to detect stars; its sharpness cut then
    # rejects hot pixels and cosmic rays, which are sharper than any PSF.
    kernel = fwhm if fwhm is not None else config.fwhm_guess_px
    xy = local_peaks(clean, config.peak_fraction * thr * rms, half=max(int(round(kernel)), 1))
    if len(xy) == 0:
        return StarList(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), float(kernel))
    finder = DAOStarFinder(threshold=thr * rms, fwhm=kernel, exclude_border=True,
                           n_brightest=config.max_stars, scale_threshold=False, xycoords=xy,
                           sharpness_range=(0.2, 1.0), roundness_range=(-0.7, 0.7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tab = finder(clean)
    if tab is None or len(tab) == 0:
        return StarList(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), float(kernel))
    x = np.asarray(tab["x_centroid"], float)
    y = np.asarray(tab["y_centroid"], float)
    peak = np.asarray(tab["peak"], float)
    flux = np.asarray(tab["flux"], float)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux)
    ok[ok] = ~collinear_runs(x[ok], y[ok], data.size)  # the segments of satellite trails and bleeds
    if np.isfinite(saturation):
        bkg_at = np.asarray(background)
        if bkg_at.ndim:
            bkg_at = bkg_at[np.clip(np.round(y).astype(int), 0, data.shape[0] - 1),
                            np.clip(np.round(x).astype(int), 0, data.shape[1] - 1)]
        ok &= (peak + bkg_at) < config.saturation_fraction * saturation
    order = np.flatnonzero(ok)[np.argsort(-flux[ok], kind="stable")]
    x, y, flux, peak = x[order], y[order], flux[order], peak[order]
    if fwhm is None:
        # the seeing: median width of the 100 brightest; cosmic-ray remnants are much narrower
        fw = star_fwhms(clean, x[:100], y[:100])
        fw = fw[np.isfinite(fw) & (fw > 1.0)]
        if len(fw) >= 3:
            med = np.median(fw)
            fwhm = float(np.median(fw[fw > 0.6 * med]))
        else:
            fwhm = kernel
    return StarList(x, y, flux, peak, float(fwhm))


#: FWHM of a Gaussian per unit sigma, 2 sqrt(2 ln 2).
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
#: Bounds of the fitted log sigma (sigma in px): 0.05 px is far sharper than any sampled PSF.
_LOG_SIGMA_MIN, _LOG_SIGMA_MAX = np.log(0.05), np.log(50.0)


def _pixel_gaussian_1d(u: np.ndarray, centre: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """A unit-flux 1-D Gaussian integrated over unit pixels at offsets ``u``, shape (n, len(u))."""
    s = np.sqrt(2.0) * sigma[:, None]
    return 0.5 * (erf((u + 0.5 - centre[:, None]) / s) - erf((u - 0.5 - centre[:, None]) / s))


def _gaussian_stamps(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Model stamps, shape (n, k, k), of parameters ``p`` = (flux, x, y, log sigma), shape (n, 4).

    Sigma is held within 0.05-50 px, so that no trial step divides by zero.
    """
    sigma = np.exp(np.clip(p[:, 3], _LOG_SIGMA_MIN, _LOG_SIGMA_MAX))
    return p[:, 0, None, None] * (_pixel_gaussian_1d(u, p[:, 2], sigma)[:, :, None]
                                  * _pixel_gaussian_1d(u, p[:, 1], sigma)[:, None, :])


def fit_fwhms(data: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm_guess: float = 3.0, fit_shape: int = 11,
              iterations: int = 30) -> np.ndarray:
    """Per-star FWHM (px) of a circular Gaussian integrated over the pixels, fitted to each star.

    The model of ``photutils.psf.fit_fwhm`` (``CircularGaussianPRF``: flux, centre, FWHM on a
    background-subtracted image), fitted to all stars at once by Levenberg-Marquardt steps over
    numpy arrays: ~25 ms for 30 stars, against 140-260 ms for photutils' one astropy fit per star
    (tests/broker/test_stars.py checks that both give the same FWHM).

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Background-subtracted image (ADU); NaN pixels count as 0.
    x, y : ndarray, shape (n,)
        Star centres (px, 0-based), within ~1 px.
    fwhm_guess : float
        Starting FWHM (px).
    fit_shape : int
        Side of the fitted box (px, odd). Default 11 (± 5 px: 4 sigma of a 2.9 px FWHM).
    iterations : int
        Levenberg-Marquardt steps, each taken or refused per star. Default 30: on 1.2-8 px seeing the
        result agrees with photutils' to 1e-3 (tests/broker/test_stars.py).

    Returns
    -------
    ndarray, shape (n,)
        FWHM (px); NaN for a star whose box leaves the image or whose fit does not converge to a
        centre inside its box.
    """
    half = fit_shape // 2
    ix, iy = np.round(np.asarray(x)).astype(int), np.round(np.asarray(y)).astype(int)
    ny, nx = data.shape
    inside = (ix >= half) & (iy >= half) & (ix < nx - half) & (iy < ny - half)
    out = np.full(len(ix), np.nan)
    if not inside.any():
        return out
    rows, cols = box_indices(data.shape, iy[inside], ix[inside], half)
    stamps = np.nan_to_num(data[rows, cols].astype(np.float64)).reshape(-1, fit_shape, fit_shape)
    u = np.arange(-half, half + 1, dtype=np.float64)
    start = np.column_stack([stamps.sum(axis=(1, 2)), np.asarray(x)[inside] - ix[inside],
                             np.asarray(y)[inside] - iy[inside],
                             np.full(len(stamps), np.log(fwhm_guess / _FWHM_PER_SIGMA))])
    with np.errstate(all="ignore"):  # a diverging star ends non-finite and is left out below
        p = _levenberg_marquardt(stamps, start, u, iterations)
    ok = (np.abs(p[:, 1]) < half) & (np.abs(p[:, 2]) < half) & (p[:, 0] > 0) & np.all(np.isfinite(p), axis=1)
    ok &= (p[:, 3] > _LOG_SIGMA_MIN) & (p[:, 3] < _LOG_SIGMA_MAX)  # not stopped at a bound
    out[np.flatnonzero(inside)[ok]] = _FWHM_PER_SIGMA * np.exp(p[ok, 3])
    return out


def _solve_steps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Solve ``a x = b`` per star (``a`` shape (n, 4, 4), ``b`` (n, 4)); and which systems were singular.

    A singular system (a star of two bright pixels among NaN ones lost its y pivot: 8e-12 against
    1e11) made ``np.linalg.solve`` raise for the whole batch; it gets a zero step here.
    """
    try:
        return np.linalg.solve(a, b[:, :, None])[:, :, 0], np.zeros(len(a), bool)
    except np.linalg.LinAlgError:
        pass
    steps, singular = np.zeros_like(b), np.zeros(len(a), bool)
    for i in range(len(a)):
        try:
            steps[i] = np.linalg.solve(a[i], b[i])
        except np.linalg.LinAlgError:
            singular[i] = True
    return steps, singular


def _levenberg_marquardt(stamps: np.ndarray, p: np.ndarray, u: np.ndarray, iterations: int) -> np.ndarray:
    """Least-squares parameters, shape (n, 4), of :func:`_gaussian_stamps` to ``stamps``, per star.

    NaN parameters for a star whose normal equations became singular (no fit).
    """
    n = len(stamps)
    lam = np.full(n, 1e-3)
    lost = np.zeros(n, bool)
    resid = (stamps - _gaussian_stamps(p, u)).reshape(n, -1)
    cost = np.einsum("ij,ij->i", resid, resid)
    steps = np.array([1e-3, 1e-4, 1e-4, 1e-4])
    for _ in range(iterations):
        h = steps * np.maximum(np.abs(p), 1.0)  # forward differences, relative to each parameter
        model = stamps.reshape(n, -1) - resid  # the current model, kept in the residuals
        jac = np.stack([(_gaussian_stamps(p + h[:, k, None] * np.eye(4)[k], u).reshape(n, -1) - model)
                        / h[:, k, None] for k in range(4)], axis=2)
        jtj = np.einsum("nik,nil->nkl", jac, jac)
        grad = np.einsum("nik,ni->nk", jac, resid)
        damped = jtj + lam[:, None, None] * (jtj * np.eye(4))
        delta, singular = _solve_steps(damped + 1e-12 * np.eye(4), grad)
        lost |= singular
        trial = p + delta
        trial_resid = (stamps - _gaussian_stamps(trial, u)).reshape(n, -1)
        trial_cost = np.einsum("ij,ij->i", trial_resid, trial_resid)
        better = np.isfinite(trial_cost) & (trial_cost < cost)
        p = np.where(better[:, None], trial, p)
        resid = np.where(better[:, None], trial_resid, resid)
        cost = np.where(better, trial_cost, cost)
        lam = np.where(better, lam / 10.0, lam * 10.0)
    return np.where(lost[:, None], np.nan, p)
