"""Detection of significant peaks on a ZOGY S_corr image and their measurement on D.

:func:`find_scorr_peaks` finds local extrema with ``|S_corr| >= threshold`` (positive = brightened,
negative = faded); :func:`measure_candidates` turns each into a :class:`~broker.candidate.Detection`
(PSF-fit flux on D, sub-pixel position, shape, dipole measure, bad pixels, nearest reference source).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS
from scipy import ndimage
from scipy.spatial import cKDTree

from broker.candidate import CUTOUT_SIZE, Detection
from broker.defects import psf_peak_excess
from broker.errors import ConfigError
from broker.psf import GAUSS_FWHM


@dataclass(frozen=True)
class DetectConfig:
    """Settings of detection and measurement.

    Attributes
    ----------
    threshold_sigma : float
        Detection threshold on |S_corr| (sigma); 5 is the ZTF/ZOGY standard (a 256^2 noise frame then
        has ~0.04 false positives).
    footprint_half : int
        Half-size of the bad-pixel footprint (px): 2 -> the 5x5 px of ``Detection.n_bad``. At most
        31, the half-size of the cutouts (``CUTOUT_SIZE``): beyond the frame the footprint counts as
        bad (1000 px dropped every candidate of a 256^2 frame; 2**62 was a ValueError).
    max_bad_fraction : float
        Candidates whose footprint has more bad pixels than this fraction (dimensionless; 0.5) are
        dropped: they measure a mask edge, not the sky.
    dipole_sigma : float
        Only pixels of D beyond this many sigma enter the dipole measure; 3 (with 2, plain noise
        around an S/N 10 source already gives ~0.2).
    max_candidates : int
        At most this many candidates per frame (count; the most significant); 500: a frame beyond
        it is garbage and downstream stages must not be flooded.
    subpixel_peak : bool
        Threshold S_corr at its sub-pixel peak rather than at the best pixel
        (:func:`find_scorr_peaks`): ~2 % more S/N for sources between pixel centres, and as many
        more noise peaks as a threshold 2 % lower gives. Off: on 6 bench pairs
        (``python -m bench.subtraction``) the best-pixel statistic matches the theoretical
        completeness within 0.006 with 0.8 false detections a frame; the sub-pixel peak, the
        maximum of a noisy surface, exceeds it by up to 0.04 with 1.0.
    host_radius_arcsec : float
        A candidate that sits on no extended reference source takes the nearest one whose
        isophote comes within this distance as its host (arcsec); 5, a few seeing disks: beyond,
        a galaxy of the simulator's density (300 per 2k x 2k at 1"/px) is as likely a chance
        neighbour as a host.
    host_threshold_sigma : float
        Isophote of the reference sources (:func:`reference_context`): pixels of the reference,
        smoothed by the PSF, above this many sigma of the smoothed noise (sigma); 3.
    extended_margin : float
        A reference source is extended when its light within 0.75 FWHM over that within 2 FWHM
        is below a point source's (:func:`psf_concentration`) by more than this fraction
        (dimensionless); 0.15 (noise and the sub-pixel phase move a point source's ratio by a few
        %; for a Gaussian PSF, an exponential disc of half-light radius 0.5 / 1 / 2 FWHM lowers it
        by 28 / 51 / 66 %).
    ref_source_sigma : float
        A candidate with no catalogued reference source within 1 FWHM still has one under it when
        the PSF-smoothed reference peaks within 1 FWHM above this many sigma of its noise (sigma);
        5, the catalogue's threshold (the catalogue drops blended and odd-shaped sources).
    host_stamp_half : int
        Largest half-size of the reference stamp examined around a candidate (px); 48 bounds the
        cost (a 97^2 stamp: ~0.3 ms) and the size measurable for very large galaxies.
    """

    threshold_sigma: float = 5.0
    footprint_half: int = 2
    max_bad_fraction: float = 0.5
    dipole_sigma: float = 3.0
    max_candidates: int = 500
    subpixel_peak: bool = False
    host_radius_arcsec: float = 5.0
    host_threshold_sigma: float = 3.0
    extended_margin: float = 0.15
    ref_source_sigma: float = 5.0
    host_stamp_half: int = 48

    def __post_init__(self) -> None:
        if self.footprint_half > CUTOUT_SIZE // 2:
            raise ConfigError(f"footprint_half must be 0 to {CUTOUT_SIZE // 2} px, not {self.footprint_half}")


def find_scorr_peaks(scorr: np.ndarray, threshold: float, box_size: int = 0, border: int = 0,
                     refine: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One peak per connected region of ``|S_corr| >= threshold`` (positive and negative).

    A connected region rather than a local-maximum box: a cosmic-ray track or a galaxy residual
    gives one candidate, not a string of them. Two sources closer than their footprints merge (the
    brighter is kept).

    With ``refine``, the statistic is S_corr at the sub-pixel peak (a Gaussian through the 3 x 3
    pixels, :func:`peak_value`) rather than at the nearest pixel centre, where a source lies up to
    half a pixel off and loses ~2 % of its S/N (PSF FWHM 3 px): the theoretical ZOGY completeness
    is that of the statistic at the source. Regions are then found at 0.9 x the threshold and kept
    when their refined peak reaches it.

    Parameters
    ----------
    scorr : ndarray, shape (ny, nx)
    threshold : float
        Sigma.
    box_size : int
        Unused (kept for a local-maximum variant); regions are 8-connected.
    border : int
        Peaks closer than this to the frame edge (px) are dropped.
    refine : bool

    Returns
    -------
    x, y : ndarray of int
        Peak pixels, ordered by decreasing |value| then (y, x): a deterministic order.
    value : ndarray of float
        S_corr at the peak (signed; refined when ``refine``).
    """
    xs, ys, vs = [], [], []
    eight = np.ones((3, 3), bool)
    search = 0.9 * threshold if refine else threshold
    for sign in (1.0, -1.0):
        hits = (sign * scorr) >= search
        if not hits.any():
            continue
        labels, n = ndimage.label(hits, structure=eight)
        yx = np.zeros((n, 2), int)
        # per-region arg-max on bounding boxes (ndimage.maximum_position sorts the whole frame)
        for i, sl in enumerate(ndimage.find_objects(labels)):
            sub = np.where(labels[sl] == i + 1, sign * scorr[sl], -np.inf)
            iy, ix = np.unravel_index(int(np.argmax(sub)), sub.shape)
            yx[i] = (sl[0].start + iy, sl[1].start + ix)
        v = scorr[yx[:, 0], yx[:, 1]].astype(float)
        if refine:
            v = sign * np.array([peak_value(scorr, x, y, sign) for y, x in yx])
        keep = sign * v >= threshold
        ys.append(yx[keep, 0])
        xs.append(yx[keep, 1])
        vs.append(v[keep])
    if not xs:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    x, y, v = np.concatenate(xs), np.concatenate(ys), np.concatenate(vs)
    if border:
        ny, nx = scorr.shape
        ok = (x >= border) & (y >= border) & (x < nx - border) & (y < ny - border)
        x, y, v = x[ok], y[ok], v[ok]
    order = np.lexsort((x, y, -np.abs(v)))
    return x[order], y[order], v[order]


def _axis_fit(a: float, b: float, c: float, log: bool | None = None) -> tuple[float, float]:
    """Sub-pixel offset and gain of a peak along one axis from three samples.

    Offset (px, within +-0.5) and gain of a Gaussian (a parabola in log) through three samples
    around a maximum b, or of a plain parabola (gain then additive) when they are not all
    positive or ``log`` is False.
    """
    if log is None:
        log = a > 0 and b > 0 and c > 0
    if log:
        la, lb, lc = np.log(a), np.log(b), np.log(c)
    else:
        la, lb, lc = a, b, c
    den = la - 2 * lb + lc
    if not den < 0:
        return 0.0, 0.0
    off = float(np.clip(0.5 * (la - lc) / den, -0.5, 0.5))
    return off, float(0.5 * (lc - la) * off + 0.5 * den * off * off)


def _window(img: np.ndarray, x: int, y: int, sign: float) -> np.ndarray | None:
    """``sign * img`` in the 3 x 3 pixels around (x, y) (float64), or None at the frame edge."""
    ny, nx = img.shape
    if not (0 < x < nx - 1 and 0 < y < ny - 1):
        return None
    return sign * np.asarray(img[y - 1:y + 2, x - 1:x + 2], np.float64)


def peak_value(img: np.ndarray, x: int, y: int, sign: float = 1.0) -> float:
    """Value of ``sign * img`` at its sub-pixel maximum near pixel (x, y).

    ``sign * img`` at its sub-pixel maximum near pixel (x, y) (per-axis Gaussian fits), never
    below the pixel value.
    """
    w = _window(img, x, y, sign)
    if w is None:
        return float(sign * img[y, x])
    b = w[1, 1]
    log = bool(b > 0 and w[1, 0] > 0 and w[1, 2] > 0 and w[0, 1] > 0 and w[2, 1] > 0)
    gain = _axis_fit(w[1, 0], b, w[1, 2], log)[1] + _axis_fit(w[0, 1], b, w[2, 1], log)[1]
    return float(b * np.exp(gain) if log else b + gain)


def sharp_peaks(image: np.ndarray, rms: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm: float,
                nsigma: float = 8.0, margin: float = 2.0, search: int = 2) -> np.ndarray:
    """Which peaks sit on a pixel sharper than the PSF allows: cosmic rays (and hot pixels).

    The brightest pixel of ``image`` within ``search`` px of each peak is compared with the median
    of its 3x3 neighbourhood, with the criterion of :func:`broker.defects.sharp_outliers` (excess over
    that median > ``nsigma`` noise sigma *and* > ``margin`` x the most a PSF of this FWHM can give).
    Only the peaks are examined, so it costs nothing next to a frame-wide filter; a transient, blurred
    by the same PSF as the stars, never qualifies.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Background-subtracted science frame (ADU), NaN where invalid.
    rms : ndarray, shape (ny, nx)
        Its sky noise (ADU).
    x, y : ndarray of int
        Peak pixels.
    fwhm : float
        Science PSF FWHM (px).

    Returns
    -------
    ndarray of bool, shape (n,)
    """
    if len(x) == 0:
        return np.zeros(0, bool)
    ny, nx = image.shape
    img = np.where(np.isfinite(image), image, 0.0)
    excess = psf_peak_excess(fwhm)
    out = np.zeros(len(x), bool)
    for i, (xi, yi) in enumerate(zip(np.asarray(x, int), np.asarray(y, int), strict=True)):
        y0, y1 = max(1, yi - search), min(ny - 1, yi + search + 1)
        x0, x1 = max(1, xi - search), min(nx - 1, xi + search + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        win = img[y0:y1, x0:x1]
        py, px = np.unravel_index(int(np.argmax(win)), win.shape)
        py, px = py + y0, px + x0
        med = float(np.median(img[py - 1:py + 2, px - 1:px + 2]))
        d = float(img[py, px]) - med
        out[i] = d > nsigma * float(rms[py, px]) and d > margin * excess * max(med, 0.0)
    return out


def _subpixel(img: np.ndarray, x: int, y: int, sign: float = 1.0) -> tuple[float, float]:
    """Peak position of ``sign * img`` by a 3-point Gaussian (log-parabola) fit per axis, parabola if not positive.

    Only the 3 x 3 pixels around (x, y) are read (never scale the whole image).
    """
    w = _window(img, x, y, sign)
    if w is None:
        return float(x), float(y)
    return x + _axis_fit(w[1, 0], w[1, 1], w[1, 2])[0], y + _axis_fit(w[0, 1], w[1, 1], w[2, 1])[0]


def _stamp(img: np.ndarray, x: int, y: int, h: int) -> np.ndarray:
    """(2h+1)^2 stamp centred on (x, y), NaN outside the image."""
    ny, nx = img.shape
    out = np.full((2 * h + 1, 2 * h + 1), np.nan, np.float32)
    y0, y1, x0, x1 = max(0, y - h), min(ny, y + h + 1), max(0, x - h), min(nx, x + h + 1)
    if y0 >= y1 or x0 >= x1:  # the box misses the image (a reference source far off the frame)
        return out
    out[y0 - (y - h):y1 - (y - h), x0 - (x - h):x1 - (x - h)] = img[y0:y1, x0:x1]
    return out


def _shape(st: np.ndarray) -> tuple[float, float]:
    """FWHM (px) and elongation from the second moments of the positive part of a stamp."""
    w = np.where(np.isfinite(st) & (st > 0), st, 0.0)
    tot = w.sum()
    if tot <= 0:
        return float("nan"), float("nan")
    h = st.shape[0] // 2
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    mx, my = (w * xx).sum() / tot, (w * yy).sum() / tot
    cxx = (w * (xx - mx) ** 2).sum() / tot
    cyy = (w * (yy - my) ** 2).sum() / tot
    cxy = (w * (xx - mx) * (yy - my)).sum() / tot
    tr, det = cxx + cyy, cxx * cyy - cxy * cxy
    disc = np.sqrt(max(tr * tr / 4 - det, 0.0))
    l1, l2 = tr / 2 + disc, max(tr / 2 - disc, 1e-6)
    return float(GAUSS_FWHM * np.sqrt(np.sqrt(l1 * l2))), float(np.sqrt(l1 / l2))


def fit_half_size(fwhm_D: float, k: int) -> int:
    """Half-size (px) of the stamp of the PSF fit and moments: 1.5 FWHM of P_D, within [3, k]."""
    return int(np.clip(np.ceil(1.5 * fwhm_D), 3, k))


class ShiftedPSF:
    """P_D moved by sub-pixel offsets (cubic spline), cached on a 0.05 px grid, cropped to half-size hm.

    A PSF-fit flux with the model 0.025 px off changes by < 0.1 %; the cache turns one spline
    resampling per candidate into one per occupied grid cell (at most 21 x 21). Calling it gives
    the PSF; :meth:`with_gradient` also its (d/dy, d/dx) pixel gradients, cached alike;
    :meth:`shift_derivatives` its derivatives with respect to the offsets.
    """

    STEP = 0.05

    def __init__(self, P_D: np.ndarray, hm: int) -> None:
        self.P = P_D.astype(np.float64)
        self.k = P_D.shape[0] // 2
        self.hm = hm
        self.cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def with_gradient(self, dy: float, dx: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The PSF centred (dy, dx) px from the stamp centre and its gradients along y and x."""
        return self._at((int(round(dy / self.STEP)), int(round(dx / self.STEP))))

    def _at(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The PSF centred ``key * STEP`` px from the stamp centre and its pixel gradients (cached)."""
        out = self.cache.get(key)
        if out is None:
            psf = ndimage.shift(self.P, (key[0] * self.STEP, key[1] * self.STEP), order=3, mode="constant")
            k, hm = self.k, self.hm
            p = psf[k - hm:k + hm + 1, k - hm:k + hm + 1]
            out = self.cache[key] = (p, *np.gradient(p))
        return out

    def __call__(self, dy: float, dx: float) -> np.ndarray:
        """The PSF centred (dy, dx) px from the stamp centre."""
        return self.with_gradient(dy, dx)[0]

    def shift_derivatives(self, dy: float, dx: float) -> tuple[np.ndarray, np.ndarray]:
        """Derivatives (per px) of the PSF centred (dy, dx) px from the stamp centre with respect to dy and dx.

        Central differences of the spline-shifted PSF 2 grid steps (0.1 px) either side: the change
        of the model when the source moves, which the pixel gradient of a PSF of FWHM ~3 px
        underestimates by ~5 %.
        """
        ky, kx = int(round(dy / self.STEP)), int(round(dx / self.STEP))
        h = 2
        d_dy = (self._at((ky + h, kx))[0] - self._at((ky - h, kx))[0]) / (2 * h * self.STEP)
        d_dx = (self._at((ky, kx + h))[0] - self._at((ky, kx - h))[0]) / (2 * h * self.STEP)
        return d_dy, d_dx


def psf_fit_position(stamp: np.ndarray, good: np.ndarray,
                     psf_at: Callable[[float, float], tuple[np.ndarray, np.ndarray, np.ndarray]], dx: float, dy: float,
                     iterations: int = 10, max_step: float = 0.5) -> tuple[float, float] | None:
    """Position of a PSF on ``stamp`` fitted with a plane beneath it (Gauss-Newton).

    The S_corr peak is the maximum-likelihood position on flat noise; on the wing of a bright-star
    or galaxy residual the slope drags it by a pixel or more. Fitting ``a P(x - dx, y - dy) + b0 +
    bx x + by y`` removes that slope.

    Parameters
    ----------
    stamp : ndarray, shape (2h+1, 2h+1)
        D around the peak, of the source's sign (positive).
    good : ndarray of bool, same shape
        Pixels that enter the fit.
    psf_at : callable
        ``psf_at(dy, dx)`` -> the PSF centred ``(dy, dx)`` px from the stamp centre, same shape,
        and its gradients along y and x (``np.gradient``).
    dx, dy : float
        Starting offset from the stamp centre (px).

    Returns
    -------
    (dx, dy) or None
        Fitted offset (px), or None if the fit does not converge to a positive source within the
        stamp.
    """
    h = stamp.shape[0] // 2
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    cols = [np.ones(int(good.sum())), xx[good] / h, yy[good] / h]
    b = stamp[good]
    for _ in range(iterations):
        p, gy, gx = psf_at(dy, dx)  # moving the source by +dx changes the model by -dP/dx dx
        a = np.column_stack([p[good], -gx[good], -gy[good], *cols])
        try:
            coef = np.linalg.solve(a.T @ a, a.T @ b)
        except np.linalg.LinAlgError:
            return None
        if coef[0] <= 0:
            return None
        step = np.clip(coef[1:3] / coef[0], -max_step, max_step)
        dx, dy = dx + float(step[0]), dy + float(step[1])
        if max(abs(dx), abs(dy)) > h / 2:
            return None
        if np.all(np.abs(step) < ShiftedPSF.STEP):
            return dx, dy
    return None


def measure_candidates(
    x: np.ndarray, y: np.ndarray, value: np.ndarray, *,
    D: np.ndarray, scorr: np.ndarray, P_D: np.ndarray, F_D: float, noise_ratio: np.ndarray, bad: np.ndarray,
    wcs: WCS, pixel_scale_arcsec: float, ref_xy: np.ndarray, ref_flux: np.ndarray,
    fwhm_D: float, config: DetectConfig = DetectConfig(),
) -> tuple[list[Detection], np.ndarray]:
    """Measure each peak on the difference image.

    Parameters
    ----------
    x, y, value : ndarray
        Peaks from :func:`find_scorr_peaks` (px, px, sigma).
    D : ndarray, shape (ny, nx)
        ZOGY difference image (unit background noise); ``D / F_D`` is in science ADU.
    scorr : ndarray, shape (ny, nx)
        S_corr, for the sub-pixel position.
    P_D : ndarray, shape (k, k)
        PSF of D, centred, sum 1.
    noise_ratio : ndarray, shape (ny, nx)
        Variance of S (source + background noise) over its background-only value: inflates the flux
        error where the source itself adds noise.
    bad : ndarray of bool, shape (ny, nx)
    wcs : astropy.wcs.WCS
        Science WCS, for RA/Dec.
    ref_xy, ref_flux : ndarray, shapes (m, 2), (m,)
        Reference sources on the science grid (px) and their fluxes (science ADU).
    fwhm_D : float
        FWHM of P_D (px).

    Returns
    -------
    detections : list of Detection
    kept : ndarray of int
        Indices of the peaks kept (those with an acceptable footprint).
    """
    badf = bad.astype(np.float32)
    shifted = ShiftedPSF(P_D, fit_half_size(fwhm_D, P_D.shape[0] // 2))
    rows, kept = [], []
    for i, (xi, yi, v) in enumerate(zip(x, y, value, strict=True)):
        row = _measure_peak(xi, yi, v, D, scorr, badf, noise_ratio, F_D, shifted, config)
        if row is not None:
            rows.append(row)
            kept.append(i)
    if not rows:
        return [], np.zeros(0, int)
    return _detections(rows, wcs, pixel_scale_arcsec, ref_xy, ref_flux), np.asarray(kept, int)


@dataclass(frozen=True)
class _Measurement:
    """One peak measured on D (see :class:`~broker.candidate.Detection` for the fields)."""

    x: float
    y: float
    flux: float
    flux_err: float
    scorr: float
    fwhm: float
    elongation: float
    dipole: float
    n_bad: int
    cov: np.ndarray


def psf_flux(stamp: np.ndarray, good: np.ndarray, psf: np.ndarray, sigma: float) -> tuple[float, float] | None:
    """PSF-fit amplitude of a stamp at a fixed position, and its 1-sigma error.

    The one PSF photometry of the broker: candidates on their own difference image
    (:func:`measure_candidates`) and forced photometry on earlier ones (:func:`forced_flux`).
    Least squares of ``amp * psf`` on the good pixels, ``amp = sum(stamp psf) / sum(psf^2)``,
    with error ``sigma / sqrt(sum(psf^2))`` for white pixel noise ``sigma``: the optimal estimate on
    a difference image of flat noise (ZOGY's D is white).

    Parameters
    ----------
    stamp : ndarray, shape (2h+1, 2h+1)
        Image around the position (any unit; the amplitude has the same).
    good : ndarray of bool, same shape
        Pixels that enter the fit.
    psf : ndarray, same shape
        The PSF centred on the position, normalised as the amplitude is to be.
    sigma : float
        Noise of one pixel (unit of ``stamp``).

    Returns
    -------
    (amp, amp_err) or None
        None when no pixel of the PSF is good.
    """
    p2 = float((psf[good] ** 2).sum())
    if p2 <= 0:
        return None
    return float((stamp[good] * psf[good]).sum() / p2), float(sigma / np.sqrt(p2))


def position_covariance(good: np.ndarray, shifted: ShiftedPSF, dx: float, dy: float, amp: float,
                        sigma: float) -> np.ndarray:
    """Covariance of the fitted position of a PSF (px^2): the inverse Fisher matrix of its fit.

    The model of :func:`psf_fit_position`, ``a P(x - dx, y - dy)`` plus a plane, linearised at the
    fitted position: a shift d changes it by ``a d dP/d(dx)``
    (:meth:`ShiftedPSF.shift_derivatives`), so the position error is that of the derivative's
    coefficient over ``a``. On white noise ``sigma`` (ZOGY's D) this is the Cramer-Rao bound
    the fit attains, ~ sqrt(2) FWHM / (2.35 S/N) per axis for a Gaussian PSF; tests check its pulls
    against injected positions.

    Parameters
    ----------
    good : ndarray of bool, shape (2h+1, 2h+1)
        Pixels of the fit.
    shifted : ShiftedPSF
        The PSF (its half-size is the stamp's).
    dx, dy : float
        Fitted offset from the stamp centre (px).
    amp : float
        Amplitude of the source (of the PSF's normalisation; positive).
    sigma : float
        Noise of one pixel (unit of ``amp``).

    Returns
    -------
    ndarray, shape (2, 2)
        Covariance of (x, y) (px^2); NaN when ``amp`` is not positive or the fit is degenerate.
    """
    if not amp > 0:
        return np.full((2, 2), np.nan)
    h = good.shape[0] // 2
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    p = shifted(dy, dx)
    d_dy, d_dx = shifted.shift_derivatives(dy, dx)
    a = np.column_stack([p[good], d_dx[good], d_dy[good], np.ones(int(good.sum())), xx[good] / h, yy[good] / h])
    try:
        inv = np.linalg.inv(a.T @ a)
    except np.linalg.LinAlgError:
        return np.full((2, 2), np.nan)
    return (sigma / amp) ** 2 * inv[1:3, 1:3]


def forced_flux(diff: np.ndarray, noise_scale: np.ndarray, F_D: float, shifted: ShiftedPSF, x: float, y: float,
                min_psf_fraction: float = 0.5) -> tuple[float, float] | None:
    """PSF-fit flux at a fixed position of a difference image, and its 1-sigma error.

    The photometry of :func:`measure_candidates` (:func:`psf_flux`, P_D moved to the sub-pixel
    position) without the position fit: forced photometry. Only the stamp around the position is
    read, so ``diff`` and ``noise`` may be memory-mapped files.

    Parameters
    ----------
    diff : ndarray, shape (ny, nx)
        Difference image (science ADU), NaN where bad.
    noise_scale : ndarray, shape (ny, nx)
        Pixel noise of D over its blank-sky value (``sqrt(max(noise_ratio, 1))`` of
        :func:`measure_candidates`; dimensionless), read at the position's pixel as there.
    F_D : float
        Flux zero point of D on the position's tile: its blank-sky pixel noise is ``1 / F_D`` (ADU).
    shifted : ShiftedPSF
        P_D of the position's tile (its half-size sets the stamp).
    x, y : float
        Position on that image (px, 0-based).
    min_psf_fraction : float
        Least fraction of sum P_D^2 on good pixels (dimensionless); below, None.

    Returns
    -------
    (flux, flux_err) or None
        ADU; None when the position is off the image or too much of its PSF is bad.
    """
    xi, yi = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    ny, nx = diff.shape
    if not (0 <= xi < nx and 0 <= yi < ny):
        return None
    st = _stamp(diff, xi, yi, shifted.hm).astype(np.float64)
    good = np.isfinite(st)
    psf = shifted(y - yi, x - xi)
    if not (psf[good] ** 2).sum() >= min_psf_fraction * (psf ** 2).sum():
        return None
    return psf_flux(st, good, psf, float(noise_scale[yi, xi]) / F_D)


def _dipole(st: np.ndarray, sign: float, nsigma: float) -> float:
    """Fraction of the |D| beyond ``nsigma`` on a stamp that has the sign opposite to the source."""
    sig = np.abs(st) > nsigma
    pos = float(np.nansum(np.where(sig & (sign * st > 0), np.abs(st), 0.0)))
    neg = float(np.nansum(np.where(sig & (sign * st < 0), np.abs(st), 0.0)))
    return neg / (pos + neg) if pos + neg > 0 else 0.0


def _measure_peak(xi: np.integer, yi: np.integer, v: float, D: np.ndarray, scorr: np.ndarray, badf: np.ndarray,
                  noise_ratio: np.ndarray, F_D: float, shifted: ShiftedPSF, config: DetectConfig
                  ) -> _Measurement | None:
    """Position, PSF-fit flux, shape and dipole of one peak, or None.

    Position, PSF-fit flux, shape and dipole of one peak (px, sigma) on D, or None when its
    footprint is mostly bad or no PSF pixel is good.
    """
    fp = _stamp(badf, int(xi), int(yi), config.footprint_half)
    n_bad = int(np.nansum(fp) + np.isnan(fp).sum())
    if n_bad > config.max_bad_fraction * fp.size:
        return None
    sign = 1.0 if v >= 0 else -1.0
    # S is D matched-filtered by P_D: its peak is the maximum-likelihood position on flat
    # noise; a PSF-plus-plane fit on D then takes out the slope of any residual beneath
    xs, ys = _subpixel(scorr, int(xi), int(yi), sign)
    st = _stamp(D, int(xi), int(yi), shifted.hm).astype(np.float64)
    good = np.isfinite(st) & ~(_stamp(badf, int(xi), int(yi), shifted.hm) != 0)
    fit = psf_fit_position(sign * st, good, shifted.with_gradient, xs - xi, ys - yi)
    if fit is not None:
        xs, ys = xi + fit[0], yi + fit[1]
    # PSF fit of the flux on D with P_D moved to the sub-pixel position
    sigma = np.sqrt(max(noise_ratio[int(yi), int(xi)], 1.0))  # D: unit noise on blank sky
    phot = psf_flux(st, good, shifted(ys - yi, xs - xi), sigma)
    if phot is None:
        return None
    amp, err = phot
    cov = position_covariance(good, shifted, xs - xi, ys - yi, sign * amp, sigma)
    fwhm, elong = _shape(sign * st)
    return _Measurement(float(xs), float(ys), amp / F_D, err / F_D, float(v), fwhm, elong,
                        _dipole(st, sign, config.dipole_sigma), n_bad, cov)


def wrap_ra(ra: np.ndarray) -> np.ndarray:
    """RA (deg) in [0, 360). wcslib keeps the side of 0 its ``CRVAL1`` is on: ``CRVAL1 = -10`` gave RA -9.96."""
    wrapped = np.mod(np.asarray(ra, dtype=np.float64), 360.0)
    return np.where(wrapped >= 360.0, 0.0, wrapped)  # a tiny negative RA rounds to 360.0


def _detections(rows: list[_Measurement], wcs: WCS, pixel_scale_arcsec: float, ref_xy: np.ndarray,
                ref_flux: np.ndarray) -> list[Detection]:
    """Detections of the measured peaks, with RA/Dec and the nearest reference source."""
    px = np.array([r.x for r in rows])
    py = np.array([r.y for r in rows])
    ra, dec = wcs.pixel_to_world_values(px, py)  # vectorised: one WCS call per frame
    ra = wrap_ra(ra)
    if len(ref_xy):
        dist, j = cKDTree(ref_xy).query(np.column_stack([px, py]))
        rdist, rflux = dist * pixel_scale_arcsec, ref_flux[j]
    else:
        rdist, rflux = np.full(len(rows), np.inf), np.zeros(len(rows))
    cov = np.stack([r.cov for r in rows])
    sky_err = sky_errors(cov, wcs)
    return [Detection(x=r.x, y=r.y, ra=float(ra[k]), dec=float(dec[k]), flux=r.flux, flux_err=r.flux_err,
                      snr=r.flux / r.flux_err, scorr=r.scorr, fwhm=r.fwhm, elongation=r.elongation,
                      dipole=r.dipole, n_bad=r.n_bad, ref_dist=float(rdist[k]), ref_flux=float(rflux[k]),
                      x_err=float(np.sqrt(cov[k, 0, 0])), y_err=float(np.sqrt(cov[k, 1, 1])),
                      ra_err=float(sky_err[k, 0]), dec_err=float(sky_err[k, 1]))
            for k, r in enumerate(rows)]


def sky_errors(cov: np.ndarray, wcs: WCS) -> np.ndarray:
    """Position errors on the sky (arcsec) from pixel covariances, through the WCS's pixel scale matrix.

    Parameters
    ----------
    cov : ndarray, shape (n, 2, 2)
        Covariances of (x, y) (px^2).
    wcs : astropy.wcs.WCS
        Celestial WCS; its linear part (CD or PC x CDELT, deg/px) maps pixel offsets onto the
        projection plane, whose axes are the RA (times cos Dec) and Dec directions at the tangent
        point.

    Returns
    -------
    ndarray, shape (n, 2)
        1-sigma errors along RA (of ``ra cos(dec)``) and Dec (arcsec).
    """
    m = np.asarray(wcs.pixel_scale_matrix, float) * 3600.0
    sky = np.einsum("ij,njk,lk->nil", m, cov, m)
    return np.sqrt(np.stack([sky[:, 0, 0], sky[:, 1, 1]], axis=1))


#: Columns of :func:`reference_context`'s result.
REFERENCE_CONTEXT_COLUMNS = ("ref_extended", "host_x", "host_y", "host_dist_px", "host_size_px", "host_flux")


def concentration(stamp: np.ndarray, x: float, y: float, fwhm: float) -> float:
    """Light within 0.75 FWHM over light within 2 FWHM of (x, y) on a background-subtracted stamp.

    Parameters
    ----------
    stamp : ndarray, shape (ny, nx)
        Image (ADU); NaN pixels count as 0.
    x, y : float
        Centre (px, stamp coordinates).
    fwhm : float
        PSF FWHM (px).

    Returns
    -------
    float
        Dimensionless, 1 for all light in the core; NaN when the outer sum is not positive.
    """
    yy, xx = np.indices(stamp.shape)
    r2 = (xx - x) ** 2 + (yy - y) ** 2
    v = np.where(np.isfinite(stamp), stamp, 0.0)
    outer = float(v[r2 <= (2.0 * fwhm) ** 2].sum())
    inner = float(v[r2 <= (0.75 * fwhm) ** 2].sum())
    return inner / outer if outer > 0 else float("nan")


def _component_moments(st: np.ndarray, comp: np.ndarray, psf_var: float) -> tuple[float, float]:
    """Flux and PSF-deconvolved rms radius along the major axis (px) of the pixels ``comp`` of ``st``."""
    w = np.where(comp, np.clip(np.nan_to_num(st), 0.0, None), 0.0)
    tot = float(w.sum())
    if tot <= 0:
        return 0.0, float("nan")
    yy, xx = np.indices(st.shape)
    mx, my = (w * xx).sum() / tot, (w * yy).sum() / tot
    cxx, cyy = (w * (xx - mx) ** 2).sum() / tot, (w * (yy - my) ** 2).sum() / tot
    cxy = (w * (xx - mx) * (yy - my)).sum() / tot
    major = (cxx + cyy) / 2 + np.sqrt(max((cxx - cyy) ** 2 / 4 + cxy ** 2, 0.0))
    return float(np.where(comp, np.nan_to_num(st), 0.0).sum()), float(np.sqrt(max(major - psf_var, 0.0)))


def _smoothed(st: np.ndarray, fwhm: float, sigma: float) -> tuple[np.ndarray, float]:
    """A stamp smoothed by a Gaussian of the PSF's width, and the smoothed sky noise (ADU)."""
    s = max(fwhm / GAUSS_FWHM, 0.5)
    smooth = ndimage.gaussian_filter(np.nan_to_num(st), s, mode="constant")
    # white noise of rms sigma smoothed by a unit-sum Gaussian of width s: rms sigma / (2 sqrt(pi) s)
    return smooth, sigma / (2.0 * np.sqrt(np.pi) * s)


def _source_under(smooth: np.ndarray, x: float, y: float, fwhm: float, level: float) -> tuple[float, float] | None:
    """Brightest pixel of the smoothed stamp within 1 FWHM of (x, y) if it is a peak above ``level``, else None."""
    yy, xx = np.indices(smooth.shape)
    near = (xx - x) ** 2 + (yy - y) ** 2 <= fwhm ** 2
    k = int(np.argmax(np.where(near, smooth, -np.inf)))
    py, px = np.unravel_index(k, smooth.shape)
    box = smooth[max(py - 1, 0):py + 2, max(px - 1, 0):px + 2]
    if smooth[py, px] < level or smooth[py, px] < box.max():
        return None
    return float(px), float(py)


def _centre(st: np.ndarray, cell: np.ndarray, px: int, py: int, fwhm: float) -> tuple[float, float]:
    """Centroid of the light of ``cell`` within 1 FWHM of its peak (px, py) (stamp px)."""
    yy, xx = np.indices(st.shape)
    near = cell & ((xx - px) ** 2 + (yy - py) ** 2 <= fwhm ** 2)
    w = np.where(near, np.clip(np.nan_to_num(st), 0.0, None), 0.0)
    tot = float(w.sum())
    if tot <= 0:
        return float(px), float(py)
    return float((w * xx).sum() / tot), float((w * yy).sum() / tot)


def _climb(smooth: np.ndarray, y: int, x: int) -> tuple[int, int]:
    """The local maximum of ``smooth`` reached by steepest ascent from pixel (y, x)."""
    ny, nx = smooth.shape
    for _ in range(4 * (ny + nx)):
        y0, x0 = max(y - 1, 0), max(x - 1, 0)
        win = smooth[y0:y + 2, x0:x + 2]
        dy, dx = np.unravel_index(int(np.argmax(win)), win.shape)
        if (y0 + dy, x0 + dx) == (y, x) or win[dy, dx] <= smooth[y, x]:
            break
        y, x = int(y0 + dy), int(x0 + dx)
    return y, x


def _cells(smooth: np.ndarray, comp: np.ndarray, start: tuple[int, int], fwhm: float, level: float
           ) -> list[tuple[np.ndarray, int, int]]:
    """A component split among its peaks, the peak the candidate's light climbs to first.

    Peaks: maxima of ``smooth`` within 1 FWHM above ``level``; each pixel of ``comp`` goes to its
    nearest peak. Returns (cell mask, peak x, peak y) for each, the climbed-to peak first, then
    the others by distance from ``start`` (y, x).
    """
    size = 2 * int(np.ceil(fwhm)) + 1
    peak = comp & (smooth >= ndimage.maximum_filter(smooth, size=size)) & (smooth > level)
    py, px = np.nonzero(peak)
    if not len(py):
        k = int(np.argmax(np.where(comp, smooth, -np.inf)))
        py, px = (np.array([v]) for v in np.unravel_index(k, smooth.shape))
    cy, cx = _climb(smooth, *start)
    first = int(np.argmin((py - cy) ** 2 + (px - cx) ** 2))
    order = [first] + [int(k) for k in np.argsort((py - start[0]) ** 2 + (px - start[1]) ** 2) if k != first]
    if len(py) == 1:
        return [(comp, int(px[0]), int(py[0]))]
    yy, xx = np.nonzero(comp)
    owner = np.argmin((yy[:, None] - py[None, :]) ** 2 + (xx[:, None] - px[None, :]) ** 2, axis=1)
    out = []
    for k in order:
        cell = np.zeros_like(comp)
        cell[yy[owner == k], xx[owner == k]] = True
        out.append((cell, int(px[k]), int(py[k])))
    return out


def _host_in_stamp(st: np.ndarray, smooth: np.ndarray, noise: float, h: int, fwhm: float, c_psf: float,
                   radius_px: float, config: DetectConfig) -> tuple[float, float, float, float]:
    """Host of a candidate at the centre (h, h) of a reference stamp, or NaNs.

    Components of the smoothed stamp above ``config.host_threshold_sigma`` x ``noise`` are the
    sources, nearest first; each is split among its peaks (:func:`_cells`: blended galaxies), and
    the first extended one within ``radius_px`` is the host. Returns (x, y) of its centre (stamp
    px), its size (px) and flux (ADU).
    """
    nan4 = (np.nan,) * 4
    labels, n = ndimage.label(smooth > config.host_threshold_sigma * noise)
    if n == 0:
        return nan4
    yy, xx = np.indices(st.shape)
    d2 = (xx - h) ** 2 + (yy - h) ** 2
    # distance from the candidate to each component's nearest pixel
    nearest = ndimage.minimum(d2, labels, index=np.arange(1, n + 1))
    for k in np.argsort(nearest):
        if nearest[k] > radius_px * radius_px:  # ** raised OverflowError at 1e308 arcsec (inf: any distance)
            break
        comp = labels == k + 1
        start = np.unravel_index(int(np.argmin(np.where(comp, d2, np.inf))), st.shape)
        for cell, px, py in _cells(smooth, comp, (int(start[0]), int(start[1])), fwhm,
                                   config.ref_source_sigma * noise):
            cx, cy = _centre(st, cell, px, py, fwhm)
            if not concentration(st, cx, cy, fwhm) < c_psf * (1.0 - config.extended_margin):
                continue  # point-like (a star) or unmeasurable
            flux, size = _component_moments(st, cell, (fwhm / GAUSS_FWHM) ** 2)
            return cx, cy, size, flux
    return nan4


def psf_concentration(ref: np.ndarray, psf: np.ndarray, fwhm: float, ref_xy: np.ndarray, n: int = 50) -> float:
    """Concentration (:func:`concentration`) of a point source: the median of the first ``n`` sources.

    Measured on the image itself, at the first ``n`` sources of ``ref_xy`` (a catalogue sorted
    brightest first, mostly stars: its finder rejects most galaxies), so that a PSF model that
    misses the wings (a Gaussian fallback under Moffat stars) does not make every star extended;
    the PSF stamp's own when fewer than 5 can be measured.
    """
    h = int(np.ceil(2 * fwhm)) + 1
    values = []
    for x, y in ref_xy[:n]:
        if np.isfinite(x) and np.isfinite(y):
            ix, iy = int(round(x)), int(round(y))
            st = _stamp(ref, ix, iy, h)
            if np.isfinite(st).all():
                values.append(concentration(st, h + x - ix, h + y - iy, fwhm))
    good = [v for v in values if np.isfinite(v)]
    if len(good) >= 5:
        return float(np.median(good))
    kp = psf.shape[0] // 2
    return concentration(psf, kp, kp, fwhm)


def reference_context(ref: np.ndarray, ref_sigma: float, psf: np.ndarray, fwhm: float, x: np.ndarray,
                      y: np.ndarray, ref_xy: np.ndarray, pixel_scale_arcsec: float,
                      config: DetectConfig = DetectConfig(), ref_scale: float = 1.0) -> np.ndarray:
    """What the reference holds under and around each candidate: a star, a host galaxy.

    For each candidate, a stamp of the reference around it (at most ``config.host_stamp_half``
    px each side) is smoothed by the PSF and cut at ``config.host_threshold_sigma``; its connected
    components are the reference sources. A source is extended when its light is less
    concentrated than a point source's (:func:`concentration`, ``config.extended_margin``;
    the point source's measured on the image, :func:`psf_concentration`). ``ref_extended`` is
    measured on the catalogue source within 1 FWHM, else on a peak of the smoothed reference
    within 1 FWHM (``config.ref_source_sigma``). The host is
    the extended source under the candidate, else the one whose isophote comes nearest within
    ``config.host_radius_arcsec``.

    Parameters
    ----------
    ref : ndarray, shape (ny, nx)
        Background-subtracted reference on the science grid (ADU; times ``ref_scale``: science
        scale), NaN where invalid. Not modified.
    ref_sigma : float
        Its sky noise per pixel (ADU, science scale).
    psf : ndarray, shape (k, k)
        Reference PSF on the science grid, centred, sum 1 (the point source's concentration when
        fewer than 5 catalogue sources can be measured).
    fwhm : float
        Its FWHM (px).
    x, y : ndarray, shape (n,)
        Candidate positions (px, science grid).
    ref_xy : ndarray, shape (m, 2)
        Reference catalogue on the science grid (px), brightest first (:class:`~broker.stars.StarList`
        order).
    pixel_scale_arcsec : float
        arcsec/px.
    ref_scale : float
        Factor taking ``ref`` to science ADU (1 / the flux ratio F_r; dimensionless).

    Returns
    -------
    ndarray, shape (n, 6)
        Columns :data:`REFERENCE_CONTEXT_COLUMNS`: ref_extended (1, 0 or NaN), host centre x, y
        (px, science grid), host distance (px), host size (px; PSF-deconvolved rms radius along the
        major axis) and host flux (ADU); NaN where there is no host.

    Notes
    -----
    Cost: one stamp, one Gaussian filter and one labelling per candidate (~1 ms).
    """
    out = np.full((len(x), 6), np.nan)
    if not len(x) or not (np.isfinite(ref_sigma) and ref_sigma > 0 and np.isfinite(fwhm) and fwhm > 0):
        return out
    c_psf = psf_concentration(ref, psf, fwhm, ref_xy)
    point_like = c_psf * (1.0 - config.extended_margin)
    radius_px = config.host_radius_arcsec / pixel_scale_arcsec
    h = int(min(config.host_stamp_half, np.ceil(radius_px + 4 * fwhm)))
    tree = cKDTree(ref_xy) if len(ref_xy) else None
    for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
        if not (np.isfinite(xi) and np.isfinite(yi)):
            continue
        ix, iy = int(round(xi)), int(round(yi))
        st = _stamp(ref, ix, iy, h) * np.float32(ref_scale)
        dx, dy = xi - ix, yi - iy
        smooth, noise = _smoothed(st, fwhm, ref_sigma)
        under: tuple[float, float] | None = None
        if tree is not None:
            dist, j = tree.query([xi, yi])
            if dist <= fwhm:
                under = (h + ref_xy[j, 0] - ix, h + ref_xy[j, 1] - iy)
        if under is None:  # a source the catalogue lacks (blended, cut by its shape limits)
            under = _source_under(smooth, h + dx, h + dy, fwhm, config.ref_source_sigma * noise)
        if under is not None:
            conc = concentration(st, under[0], under[1], fwhm)
            if np.isfinite(conc):
                out[i, 0] = float(conc < point_like)
        hx, hy, size, flux = _host_in_stamp(st, smooth, noise, h, fwhm, c_psf, radius_px, config)
        out[i, 1:] = (hx - h + ix, hy - h + iy, float(np.hypot(hx - h - dx, hy - h - dy)), size, flux)
    return out
