"""Residual distortion of a registration: fitted on matched stars, removed from the aligned image.

:func:`broker.align.align_reference` maps the reference onto the science grid through both WCSs
and an affine correction fitted on matched stars. What the two WCSs get wrong beyond an affine map
(the optics of two telescopes, a TAN header over a distorted field, a per-frame SIP fitted on few
stars) stays as a smooth displacement of up to a pixel at the edges, and every bright star then
leaves a dipole. With enough matched stars the displacement is fitted as a low-order polynomial of
the science position (:func:`fit_distortion`), kept only when it predicts held-out stars better than
no correction by a margin, and the aligned image is read at the displaced positions
(:func:`undistort`: a second resampling, ~2 s of one core for 2048 x 2048 px, paid only when the
correction is kept). Frames whose residuals are centroid noise (every simulated frame) keep the
affine registration unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Cross-validation folds of :func:`fit_distortion` (count).
FOLDS = 5


@dataclass(frozen=True)
class Distortion:
    """A displacement field d(x, y) (px): how far a star of the aligned reference is from the science star.

    Attributes
    ----------
    coef_x, coef_y : ndarray, shape (m,)
        Polynomial coefficients of dx and dy over :func:`design` terms.
    degree : int
        Polynomial degree.
    shape : (int, int)
        Science frame shape (ny, nx), which normalises the positions.
    rms_before, rms_after : float
        RMS residual distance (px) of the matched stars without and with the correction.
    """

    coef_x: np.ndarray
    coef_y: np.ndarray
    degree: int
    shape: tuple[int, int]
    rms_before: float
    rms_after: float

    def at(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dx, dy) (px) at science positions ``x``, ``y`` (px, any equal shapes)."""
        a = design(np.ravel(x), np.ravel(y), self.shape, self.degree)
        return (a @ self.coef_x).reshape(np.shape(x)), (a @ self.coef_y).reshape(np.shape(y))


def design(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], degree: int) -> np.ndarray:
    """Terms u^i v^j, i + j <= ``degree``, of positions normalised to [-1, 1] over ``shape``.

    Returns
    -------
    ndarray, shape (n, (degree + 1) (degree + 2) / 2)
    """
    ny, nx = shape
    u = (np.asarray(x, float) - (nx - 1) / 2) / max((nx - 1) / 2, 1.0)
    v = (np.asarray(y, float) - (ny - 1) / 2) / max((ny - 1) / 2, 1.0)
    return np.column_stack([u ** i * v ** (k - i) for k in range(degree + 1) for i in range(k + 1)])


def _cv_rms(a: np.ndarray, d: np.ndarray) -> float:
    """RMS distance (px) of held-out displacements ``d`` (n, 2) from a least-squares fit on the other folds."""
    folds = np.arange(len(d)) % FOLDS
    err = np.empty_like(d)
    for k in range(FOLDS):
        test = folds == k
        coef, *_ = np.linalg.lstsq(a[~test], d[~test], rcond=None)
        err[test] = d[test] - a[test] @ coef
    return float(np.sqrt(np.mean(np.sum(err ** 2, axis=1))))


def fit_distortion(xy: np.ndarray, d: np.ndarray, shape: tuple[int, int], degrees: tuple[int, ...] = (2, 3),
                   min_stars: int = 30, min_gain: float = 0.25) -> Distortion | None:
    """The residual displacement of matched stars as a polynomial, or None when it is not worth it.

    Parameters
    ----------
    xy : ndarray, shape (n, 2)
        Science positions of the matched stars (px).
    d : ndarray, shape (n, 2)
        Their science position minus the affinely registered reference position (px).
    shape : (int, int)
        Science frame shape (ny, nx).
    degrees : tuple of int
        Degrees tried; the one with the smallest cross-validated residual is kept.
    min_stars : int
        Fewer matched stars: None (a cubic has 10 terms per axis; 30 stars leave 3 per term).
    min_gain : float
        The cross-validated RMS residual must fall below ``(1 - min_gain)`` times the RMS without
        correction (dimensionless); else None: the residual is centroid noise, not distortion.

    Returns
    -------
    Distortion or None
    """
    n = len(d)
    if n < min_stars:
        return None
    before = float(np.sqrt(np.mean(np.sum(d ** 2, axis=1))))
    cv = {deg: _cv_rms(design(xy[:, 0], xy[:, 1], shape, deg), d) for deg in degrees
          if (deg + 1) * (deg + 2) // 2 * 3 <= n}
    if not cv:
        return None
    degree = min(cv, key=lambda k: cv[k])
    if not cv[degree] < (1.0 - min_gain) * before:
        return None
    a = design(xy[:, 0], xy[:, 1], shape, degree)
    coef, *_ = np.linalg.lstsq(a, d, rcond=None)
    after = float(np.sqrt(np.mean(np.sum((d - a @ coef) ** 2, axis=1))))
    return Distortion(coef[:, 0].copy(), coef[:, 1].copy(), degree, shape, before, after)


def undistort(image: np.ndarray, variance: np.ndarray, distortion: Distortion
              ) -> tuple[np.ndarray, np.ndarray]:
    """The aligned reference read at ``p - d(p)``, so that its stars sit on the science stars.

    Cubic spline for the image, linear for the variance; a pixel whose spline touches an invalid
    (NaN) pixel, or reads outside the image, is NaN in both.

    Parameters
    ----------
    image, variance : ndarray, shape (ny, nx)
        Aligned reference (ADU) and its variance (ADU^2) on the science grid, NaN where invalid.
    distortion : Distortion

    Returns
    -------
    image, variance : ndarray, shape (ny, nx), float32
    """
    ny, nx = image.shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    dx, dy = distortion.at(xx, yy)
    coords = np.array([yy - dy, xx - dx], dtype=np.float32)
    bad = ~np.isfinite(image) | ~np.isfinite(variance)
    out = ndimage.map_coordinates(np.where(bad, 0.0, image).astype(np.float32), coords, order=3,
                                  mode="constant", cval=0.0).astype(np.float32)
    vout = ndimage.map_coordinates(np.where(bad, 0.0, variance).astype(np.float32), coords, order=1,
                                   mode="constant", cval=0.0).astype(np.float32)
    outside = (coords[0] < 0) | (coords[0] > ny - 1) | (coords[1] < 0) | (coords[1] > nx - 1)
    touched = ndimage.map_coordinates(bad.astype(np.float32), coords, order=1, mode="constant", cval=1.0) > 0
    invalid = ndimage.binary_dilation(touched, np.ones((5, 5), bool)) | outside
    out[invalid] = np.nan
    vout[invalid] = np.nan
    return out, vout
