"""Noise-free rendering on stamps, S/N of injected signals, and the detector noise model.

Everything is vectorised over sources: stamps are ``(n, size, size)`` arrays added into the frame
with one :func:`numpy.bincount`, which is much faster than looping or :func:`numpy.add.at`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.signal import fftconvolve
from scipy.special import gammaincinv


def moffat_alpha(fwhm: float, beta: float) -> float:
    """Moffat core width alpha (px) for a FWHM (px) and beta."""
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _grid(size: int) -> np.ndarray:
    return np.arange(size, dtype=np.float64) - size // 2


def moffat_stamps(dx: ArrayLike, dy: ArrayLike, size: int, fwhm: float, beta: float,
                  ellip: float = 0.0, theta: float = 0.0) -> np.ndarray:
    """Unit-sum elliptical Moffat stamps at sub-pixel offsets.

    Parameters
    ----------
    dx, dy : ndarray, shape (n,)
        Source centre minus the stamp's central pixel centre, px (in [-0.5, 0.5] when the stamp is
        centred on the nearest pixel).
    size : int
        Stamp side, px (odd).
    fwhm : float
        Geometric-mean FWHM, px.
    beta : float
        Moffat index.
    ellip, theta : float
        Ellipticity 1 - b/a and position angle of the major axis (rad from +x).

    Returns
    -------
    ndarray, shape (n, size, size), float64
        Point-sampled profiles normalised to unit sum over the stamp (flux beyond the stamp edge,
        < 0.1 % for the defaults, is folded back in so the flux is exact).
    """
    dx = np.atleast_1d(np.asarray(dx, dtype=np.float64))[:, None, None]
    dy = np.atleast_1d(np.asarray(dy, dtype=np.float64))[:, None, None]
    g = _grid(size)
    u, v = g[None, None, :] - dx, g[None, :, None] - dy
    q = np.sqrt(1.0 - ellip)  # sqrt(b/a): keeps a*b, hence the geometric-mean FWHM, fixed
    c, s = np.cos(theta), np.sin(theta)
    r2 = ((u * c + v * s) * q) ** 2 + ((v * c - u * s) / q) ** 2
    prof = (1.0 + r2 / moffat_alpha(fwhm, beta) ** 2) ** (-beta)
    return prof / prof.sum(axis=(1, 2), keepdims=True)


def sersic_stamps(dx: np.ndarray, dy: np.ndarray, size: int, r_eff: np.ndarray, n: np.ndarray,
                  ellip: np.ndarray, theta: np.ndarray, oversample: int = 5) -> np.ndarray:
    """Unit-sum Sersic profiles, ``I ~ exp(-b_n ((r / r_eff)^(1/n) - 1))``, integrated over pixels.

    Same as :class:`astropy.modeling.functional_models.Sersic2D`, but evaluated for many galaxies
    at once. Parameters are arrays of shape (n_gal,); ``r_eff`` is along the major axis (px).
    Each pixel is the mean over ``oversample`` x ``oversample`` sub-pixels: a cuspy (n ~ 4)
    profile sampled at pixel centres would change with the sub-pixel phase from frame to frame
    and leave residuals in every difference image that no real galaxy leaves.

    Returns
    -------
    ndarray, shape (n_gal, size, size)
    """
    # float32 and r^(1/n) as exp(log(r^2) / 2n): 2x faster than float64 powers, and the stamps
    # differ by < 1e-6 of their peak (the largest single cost of a simulated frame)
    col = lambda a: np.asarray(a, dtype=np.float32)[:, None, None]  # noqa: E731
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    g = (_grid(size)[:, None] + sub[None, :]).ravel().astype(np.float32)  # sub-pixel centres
    bn_all = gammaincinv(2.0 * np.asarray(n, dtype=np.float64), 0.5)
    out = np.empty((len(np.atleast_1d(dx)), size, size))
    for i in range(0, len(out), 32):  # bounded memory: 32 x (size * oversample)^2 values at a time
        sl = slice(i, i + 32)
        u, v = g[None, None, :] - col(dx)[sl], g[None, :, None] - col(dy)[sl]
        c, s = np.cos(col(theta)[sl]), np.sin(col(theta)[sl])
        ia = 1.0 / col(r_eff)[sl]
        ib = 1.0 / (col(r_eff)[sl] * (1.0 - col(ellip)[sl]))
        r2 = ((u * c + v * s) * ia) ** 2 + ((v * c - u * s) * ib) ** 2
        with np.errstate(divide="ignore"):  # r = 0: log gives -inf, r^(1/n) = 0 as it should
            prof = np.exp(-col(bn_all)[sl] * (np.exp(np.log(r2) * (0.5 / col(n)[sl])) - 1.0))
        m = len(prof)
        out[sl] = prof.reshape(m, size, oversample, size, oversample).mean(axis=(2, 4),
                                                                           dtype=np.float64)
    return out / out.sum(axis=(1, 2), keepdims=True)


def convolve_stamps(stamps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve each stamp (n, s, s) with one centred kernel (k, k) by FFT, same size."""
    if len(stamps) == 0:
        return stamps
    return np.clip(fftconvolve(stamps, kernel[None], mode="same", axes=(1, 2)), 0.0, None)


def stamp_indices(x: np.ndarray, y: np.ndarray, size: int, shape: tuple[int, int]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Place stamps centred on the pixels nearest to (x, y).

    Returns
    -------
    dx, dy : ndarray, shape (n,)
        Sub-pixel offsets of the sources from their stamp centres (px).
    flat : ndarray, shape (n, size, size), int64
        Flat frame index of every stamp pixel (clipped into the frame).
    inside : ndarray, shape (n, size, size), bool
        Whether that stamp pixel lies on the frame.
    """
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    g = np.arange(size) - size // 2
    cols = ix[:, None, None] + g[None, None, :]
    rows = iy[:, None, None] + g[None, :, None]
    inside = (cols >= 0) & (cols < shape[1]) & (rows >= 0) & (rows < shape[0])
    flat = np.clip(rows, 0, shape[0] - 1) * shape[1] + np.clip(cols, 0, shape[1] - 1)
    return x - ix, y - iy, flat, inside


def spike_stamps(dx: ArrayLike, dy: ArrayLike, size: int, fwhm: float, strength: float,
                 angle: float) -> np.ndarray:
    """Diffraction spikes of unit-flux stars: four arms at ``angle`` + k 90 deg (not the star).

    Each arm has a Gaussian cross-section of the seeing and starts at ``strength`` times the
    central pixel of a Gaussian star of this FWHM, falling as ``(fwhm / (r + fwhm))^1.5`` with
    the distance r along it (vane diffraction falls as r^-2 far out; the seeing and the finite
    vane width soften it near the star).

    Parameters
    ----------
    dx, dy : ndarray, shape (n,)
        Star centres minus their stamp centres, px.
    size : int
        Stamp side, px (odd): the arms end at the stamp edge.
    fwhm : float
        Seeing FWHM, px.
    strength : float
        Arm peak / star peak.
    angle : float
        Position angle of the first arm, rad from +x.

    Returns
    -------
    ndarray, shape (n, size, size), float32
        ADU per unit star flux.
    """
    dx = np.atleast_1d(np.asarray(dx, dtype=np.float32))[:, None, None]
    dy = np.atleast_1d(np.asarray(dy, dtype=np.float32))[:, None, None]
    g = _grid(size).astype(np.float32)
    x, y = g[None, None, :] - dx, g[None, :, None] - dy
    sigma = fwhm / 2.3548
    peak = strength / (2.0 * np.pi * sigma ** 2)
    out = np.zeros((len(dx), size, size), np.float32)
    for a in (angle, angle + np.pi / 2):  # each axis carries two opposite arms
        u = np.abs(x * np.cos(a) + y * np.sin(a))
        v = -x * np.sin(a) + y * np.cos(a)
        out += peak * (fwhm / (u + fwhm)) ** 1.5 * np.exp(-0.5 * (v / sigma) ** 2)
    return out


def add_stamps(image: np.ndarray, stamps: np.ndarray, flat: np.ndarray, inside: np.ndarray) -> None:
    """Add stamps (n, s, s) into ``image`` in place at the flat indices of :func:`stamp_indices`."""
    if stamps.size * 16 < image.size:  # a few stamps: a full-frame bincount would dominate
        np.add.at(image.reshape(-1), flat[inside], stamps[inside].astype(image.dtype))
    elif stamps.size:
        image += np.bincount(flat[inside], weights=stamps[inside],
                             minlength=image.size).reshape(image.shape)


def optimal_snr(signal: np.ndarray, model: np.ndarray, gain: float, read_noise: float,
                lost: np.ndarray | None = None) -> np.ndarray:
    """Optimal (PSF-weighted) S/N of signals given the expected frame.

    ``S/N^2 = sum_i s_i^2 / var_i`` in electrons, with ``var_i = gain * model_i + read_noise^2``
    (Poisson noise of everything expected in the pixel, the source included, plus read noise).
    For a source on empty sky this is ``sum (F P_i)^2 / (F P_i + B_i)``.

    Parameters
    ----------
    signal : ndarray, shape (n, m)
        Signal of each of n sources in its m pixels, ADU (may be negative for a fading source).
    model : ndarray, shape (n, m)
        Expected (noise-free) frame in the same pixels, ADU.
    lost : ndarray of bool, shape (n, m), optional
        Pixels that carry no information (saturated, cosmic ray, detector defect): left out.

    Returns
    -------
    ndarray, shape (n,)
        S/N, carrying the sign of the summed signal.
    """
    var = gain * np.clip(model, 0.0, None) + read_noise ** 2
    terms = (gain * signal) ** 2 / var
    if lost is not None:
        terms = np.where(lost, 0.0, terms)
    snr = np.sqrt(np.sum(terms, axis=-1))
    return np.where(np.sum(signal, axis=-1) < 0, -snr, snr)


def add_noise(model: np.ndarray, gain: float, read_noise: float, saturation: float,
              rng: np.random.Generator) -> np.ndarray:
    """Turn an expected frame (ADU) into a raw one.

    Poisson noise in electrons, Gaussian read noise, back to ADU, rounded like an ADC, clipped to
    [0, min(saturation, 65535)] so saturated stars are flat-topped.

    Returns
    -------
    ndarray, same shape, float32 holding integers.
    """
    electrons = rng.poisson(gain * np.clip(model, 0.0, None)).astype(np.float32)
    electrons += rng.normal(0.0, read_noise, model.shape).astype(np.float32)
    adu = np.rint(electrons / np.float32(gain))
    return np.clip(adu, 0.0, min(saturation, 65535.0)).astype(np.float32)


def line_profile(shape: tuple[int, int], x0: float, y0: float, x1: float, y1: float,
                 sigma: float, adu_per_px: float) -> tuple[np.ndarray, np.ndarray]:
    """A straight trail (satellite) with a Gaussian cross-section.

    Returns the flat indices of the pixels within 5 sigma of the line and their values (ADU);
    ``adu_per_px`` is the flux per px of trail length (a PSF-convolved line has the PSF's 1-D
    profile across it; a Gaussian of the seeing is close enough for an artifact).
    """
    ny, nx = shape
    yy, xx = np.ogrid[0:ny, 0:nx]
    length = np.hypot(x1 - x0, y1 - y0)
    dist = np.abs((x1 - x0) * (y0 - yy) - (x0 - xx) * (y1 - y0)) / length
    near = np.flatnonzero(dist.ravel() < 5.0 * sigma)
    d = dist.ravel()[near]
    values = adu_per_px / (np.sqrt(2.0 * np.pi) * sigma) * np.exp(-0.5 * (d / sigma) ** 2)
    return near, values
