"""ZOGY image subtraction (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27): D, P_D, S and S_corr.

Flux zero points are F_n = 1 (the science frame sets the flux scale) and F_r = the reference /
science flux ratio. Hats are 2-D Fourier transforms::

    den^2  = sigma_n^2 F_r^2 |P_r^|^2 + sigma_r^2 F_n^2 |P_n^|^2
    D^     = (F_r P_r^ N^ - F_n P_n^ R^) / den                                   (eq. 13)
    F_D    = F_r F_n / sqrt(sigma_n^2 F_r^2 + sigma_r^2 F_n^2)                    (eq. 15)
    P_D^   = F_r F_n P_r^ P_n^ / (F_D den)                                       (eq. 14)
    S      = F_D D (x) P_D-flipped = k_n (x) N - k_r (x) R                       (eqs. 17, 28-29)
    k_n^   = F_n F_r^2 conj(P_n^) |P_r^|^2 / den^2,  k_r^ = F_r F_n^2 conj(P_r^) |P_n^|^2 / den^2
    V(S_N) = V_N (x) k_n^2,  V(S_R) = V_R (x) k_r^2       (source + background noise, eqs. 26-27)
    V_ast  = sigma_x^2 (dS_N/dx)^2 + sigma_y^2 (dS_N/dy)^2 + the same for S_R     (eqs. 30-31)
    S_corr = S / sqrt(V(S_N) + V(S_R) + V_ast)                                   (eq. 25)
    flux   = S / F_S with F_S = F_D^2 sum(P_D^2)                                 (eqs. 41-42)

:func:`zogy` computes them in four parts: the PSF spectra and the denominator with D and the score
images S_N, S_R (:func:`_difference_and_scores`), the variance of S (:func:`_score_variance`),
S_corr (:func:`_corrected_score`) and P_D (:func:`_difference_psf`). The reference noise may be
coloured by its resampling (:func:`interpolation_kernel`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

from broker.psf import embed_centred

#: FFT threads: the broker runs one frame per process, so use every core it may run on.
FFT_WORKERS = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


@dataclass
class ZogyResult:
    """ZOGY images, all (ny, nx) float32 on the input grid.

    Attributes
    ----------
    D : difference image, unit background variance (``D / F_D`` in science ADU).
    S : matched-filter score.
    S_corr : S over its full noise (source, background, astrometric): N(0, 1) on blank sky.
    V_S : variance of S from source + background noise only (no astrometric term).
    P_D : (k, k) PSF of D, sum 1.
    F_D, F_S : float
        Flux zero point of D and of S (flux = S / F_S).
    """

    D: np.ndarray
    S: np.ndarray
    S_corr: np.ndarray
    V_S: np.ndarray
    P_D: np.ndarray
    F_D: float
    F_S: float


@dataclass(frozen=True)
class _Noise:
    """Background noise (ADU) and flux zero points of the two images."""

    sigma_n: float
    sigma_r: float
    F_r: float
    F_n: float


def _score_kernels(P_n: np.ndarray, P_r: np.ndarray, sigma_n: float, sigma_r: float, F_r: float, F_n: float,
                   half: int, ref_noise_kernel: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ZOGY's k_n and k_r (eqs. 28-29) on a centred (2 half + 1)^2 grid, in float64.

    With a reference noise kernel h, k_r is returned convolved with h: the kernel that maps the
    reference's *white* noise onto S_R, whose square gives V(S_R).
    """
    small = (2 * half + 1, 2 * half + 1)
    pn = fft.fft2(embed_centred(P_n, small).astype(np.float64))
    pr = fft.fft2(embed_centred(P_r, small).astype(np.float64))
    hh = fft.fft2(embed_centred(ref_noise_kernel, small).astype(np.float64)) if ref_noise_kernel is not None else 1.0
    a_n, a_r, a_h = np.abs(pn) ** 2, np.abs(pr) ** 2, np.abs(hh) ** 2
    den2 = np.maximum(sigma_n ** 2 * F_r ** 2 * a_r + sigma_r ** 2 * F_n ** 2 * a_h * a_n,
                      1e-12 * (sigma_n ** 2 * F_r ** 2 + sigma_r ** 2 * F_n ** 2))
    kn = np.real(fft.ifft2(F_n * F_r ** 2 * np.conj(pn) * a_r / den2))
    kr = np.real(fft.ifft2(F_r * F_n ** 2 * np.conj(pr) * a_n / den2 * hh))
    c = (half, half)
    return np.roll(kn, c, axis=(0, 1)), np.roll(kr, c, axis=(0, 1))


def interpolation_kernel(matrix: np.ndarray, offset: np.ndarray, shape: tuple[int, int], half: int = 4,
                         order: int = 3) -> np.ndarray:
    """Weights with which a spline resampling mixed the reference pixels at the frame centre.

    The aligned reference is ``R(p) = sum_j R_ref(j) w(M p + t - j)``: its noise is the white
    reference noise convolved with this (2 half + 1)^2 kernel (the fractional part of the shift
    at the centre; a <= 1 deg rotation changes it little across the frame).

    Parameters
    ----------
    matrix, offset : ndarray, shapes (2, 2) and (2,)
        Science (x, y) -> reference (x, y) affine map (:class:`~broker.align.Alignment`), px.
    shape : (int, int)
        Science frame shape (ny, nx).
    half : int
        Kernel half-size (px).
    order : int
        Spline order of the resampling.

    Returns
    -------
    ndarray, shape (2 half + 1, 2 half + 1), float32
    """
    c = np.array([shape[1] / 2.0, shape[0] / 2.0])
    q = matrix @ c + offset
    frac = q - np.round(q)
    delta = np.zeros((2 * half + 1, 2 * half + 1))
    delta[half, half] = 1.0
    # out(p) = delta(p + frac): ndimage.shift moves content by +shift, so shift by -frac (row, col)
    k = ndimage.shift(delta, (-frac[1], -frac[0]), order=order, mode="constant")
    return k.astype(np.float32)


def _add_gradient_variance(out: np.ndarray, img: np.ndarray, sx: float, sy: float) -> None:
    """``out += sx^2 (d img/dx)^2 + sy^2 (d img/dy)^2`` with central differences, in place (float32)."""
    g = np.empty_like(out)
    g[:, 1:-1] = img[:, 2:] - img[:, :-2]
    g[:, 0] = g[:, -1] = 0.0
    g *= g
    out += np.float32(0.25 * sx * sx) * g
    g[1:-1] = img[2:] - img[:-2]
    g[0] = g[-1] = 0.0
    g *= g
    out += np.float32(0.25 * sy * sy) * g


def _power(spectrum: np.ndarray) -> np.ndarray:
    """|spectrum|^2 as float32."""
    return (spectrum.real ** 2 + spectrum.imag ** 2).astype(np.float32)


def _difference_and_scores(N: np.ndarray, R: np.ndarray, P_n: np.ndarray, P_r: np.ndarray, noise: _Noise,
                           ref_noise_kernel: np.ndarray | None, workers: int
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """D (eq. 13) and the two score images S_N = k_n (x) N, S_R = k_r (x) R (eqs. 28-29).

    Returns
    -------
    D, S_N, S_R : ndarray, shape (ny, nx), float64
    """
    shape = N.shape
    sigma_n, sigma_r, F_r, F_n = noise.sigma_n, noise.sigma_r, noise.F_r, noise.F_n
    pn = fft.rfft2(embed_centred(P_n, shape), workers=workers)
    pr = fft.rfft2(embed_centred(P_r, shape), workers=workers)
    a_n, a_r = _power(pn), _power(pr)
    a_h: np.ndarray | np.float32
    if ref_noise_kernel is not None:
        a_h = _power(fft.rfft2(embed_centred(ref_noise_kernel, shape), workers=workers))
    else:
        a_h = np.float32(1.0)
    den2 = (sigma_n ** 2 * F_r ** 2) * a_r + (sigma_r ** 2 * F_n ** 2) * a_h * a_n
    den2 = np.maximum(den2, np.float32(1e-12 * (sigma_n ** 2 * F_r ** 2 + sigma_r ** 2 * F_n ** 2))).astype(np.float32)
    del a_h
    nh = fft.rfft2(N, workers=workers)
    rh = fft.rfft2(R, workers=workers)
    D = fft.irfft2((F_r * pr * nh - F_n * pn * rh) / np.sqrt(den2), s=shape, workers=workers)
    S_N = fft.irfft2(((F_n * F_r ** 2) * a_r / den2) * np.conj(pn) * nh, s=shape, workers=workers)
    del nh
    S_R = fft.irfft2(((F_r * F_n ** 2) * a_n / den2) * np.conj(pr) * rh, s=shape, workers=workers)
    return D, S_N, S_R


def _score_variance(V_N: np.ndarray, V_R: np.ndarray, P_n: np.ndarray, P_r: np.ndarray, noise: _Noise,
                    ref_noise_kernel: np.ndarray | None, workers: int) -> np.ndarray:
    """V(S_N) + V(S_R) (eqs. 26-27) in one inverse FFT, float32, shape (ny, nx).

    The kernels k_n, k_r are computed on a small grid (they are as compact as the PSFs), so their
    squares need one full-size FFT each and never go through a full-size inverse.
    """
    shape = V_N.shape
    sigma_n, sigma_r = noise.sigma_n, noise.sigma_r
    kn_small, kr_small = _score_kernels(P_n, P_r, sigma_n, sigma_r, noise.F_r, noise.F_n, 3 * (P_n.shape[0] // 2),
                                        ref_noise_kernel)
    kn2, kr2 = kn_small ** 2, kr_small ** 2
    vh = fft.rfft2(V_N, workers=workers) * fft.rfft2(embed_centred(kn2, shape), workers=workers)
    vh += fft.rfft2(V_R, workers=workers) * fft.rfft2(embed_centred(kr2, shape), workers=workers)
    V = fft.irfft2(vh, s=shape, workers=workers)
    del vh
    # FFT rounding can leave tiny negatives far from anything: bound by the blank-sky value
    # (from sigma_n, sigma_r: a median over the padded arrays is the masks' huge variance on small frames)
    floor = 0.5 * (sigma_n ** 2 * float(kn2.sum()) + sigma_r ** 2 * float(kr2.sum()))
    return np.maximum(V, floor).astype(np.float32)


def _corrected_score(S: np.ndarray, S_N: np.ndarray, S_R: np.ndarray, V_S: np.ndarray,
                     sigma_ast: tuple[float, float], flux_error: float) -> np.ndarray:
    """S_corr (eq. 25): S over the root of V_S plus the astrometric (eqs. 30-31) and flux-error terms.

    Returns
    -------
    ndarray, shape (ny, nx), float32
    """
    sx, sy = sigma_ast
    V_tot = V_S.copy()
    if sx > 0 or sy > 0:
        for img in (S_N, S_R):
            _add_gradient_variance(V_tot, img, sx, sy)
    if flux_error > 0:
        V_tot += (flux_error * flux_error) * (S_N * S_N + S_R * S_R)
    return (S / np.sqrt(V_tot)).astype(np.float32)


def _difference_psf(P_n: np.ndarray, P_r: np.ndarray, noise: _Noise, f_d: float) -> np.ndarray:
    """P_D (eq. 14) on a small grid (it is as compact as the PSFs): (2h+1, 2h+1) float32, sum 1."""
    sigma_n, sigma_r, F_r, F_n = noise.sigma_n, noise.sigma_r, noise.F_r, noise.F_n
    h = P_n.shape[0] // 2
    small = (4 * h + 1, 4 * h + 1)
    pn_s = fft.fft2(embed_centred(P_n, small))
    pr_s = fft.fft2(embed_centred(P_r, small))
    den_s = np.sqrt(sigma_n ** 2 * F_r ** 2 * np.abs(pr_s) ** 2 + sigma_r ** 2 * F_n ** 2 * np.abs(pn_s) ** 2)
    pd = np.real(fft.ifft2(F_r * F_n * pr_s * pn_s / (f_d * np.maximum(den_s, 1e-30))))
    pd = np.roll(pd, (2 * h, 2 * h), axis=(0, 1))[h:3 * h + 1, h:3 * h + 1]
    return (pd / pd.sum()).astype(np.float32)


def zogy(
    N: np.ndarray, R: np.ndarray, P_n: np.ndarray, P_r: np.ndarray,
    V_N: np.ndarray, V_R: np.ndarray, sigma_n: float, sigma_r: float, F_r: float,
    F_n: float = 1.0, sigma_ast: tuple[float, float] = (0.0, 0.0), flux_error: float = 0.0,
    workers: int = FFT_WORKERS, ref_noise_kernel: np.ndarray | None = None,
) -> ZogyResult:
    """ZOGY D, P_D, S and S_corr (see the module docstring for the equations).

    Parameters
    ----------
    N, R : ndarray, shape (ny, nx), float32
        Background-subtracted science and aligned reference (ADU), finite everywhere (bad pixels
        already replaced by 0); pad them yourself if wrap-around matters.
    P_n, P_r : ndarray, shape (2h+1, 2h+1)
        Centred PSFs, sum 1, same shape.
    V_N, V_R : ndarray, shape (ny, nx)
        Per-pixel variance of N and R (ADU^2), sources included.
    sigma_n, sigma_r : float
        Background noise of N and R (ADU).
    F_r, F_n : float
        Flux zero points (reference / science flux ratio, and 1).
    sigma_ast : (float, float)
        Registration noise in x and y (px).
    flux_error : float
        Fractional error of the flux scaling and PSF models (dimensionless). Not in ZOGY: it adds
        ``flux_error^2 (S_N^2 + S_R^2)`` to the variance, the way the astrometric term does for
        registration errors, because residuals of bright stars scale with their flux.
    workers : int
        FFT threads.
    ref_noise_kernel : ndarray, shape (2m+1, 2m+1), optional
        Kernel h that correlated the reference noise (the interpolation weights of its resampling):
        R's noise spectrum is then ``sigma_r^2 |h^|^2`` instead of white. It enters ``den^2`` in
        place of sigma_r^2 (the optimal filter for coloured noise) and the variance of S_R through
        ``(k_r (x) h)^2``. A cubic-spline shift of (0.37, 0.23) px leaves 0.67x the per-pixel
        variance, all of it taken from high frequencies: for well-sampled PSFs (FWHM >= 2.5 px)
        the matched filter hardly sees the difference (< 0.5 % in S_corr), for undersampled ones
        (FWHM 1.2 px, half-pixel shift) treating the noise as white deflates S_corr by ~7 %.

    Returns
    -------
    ZogyResult
    """
    noise = _Noise(sigma_n, sigma_r, F_r, F_n)
    f_d = F_r * F_n / np.sqrt(sigma_n ** 2 * F_r ** 2 + sigma_r ** 2 * F_n ** 2)
    D, S_N, S_R = _difference_and_scores(N, R, P_n, P_r, noise, ref_noise_kernel, workers)
    V_S = _score_variance(V_N, V_R, P_n, P_r, noise, ref_noise_kernel, workers)
    S = (S_N - S_R).astype(np.float32)
    S_corr = _corrected_score(S, S_N, S_R, V_S, sigma_ast, flux_error)
    del S_N, S_R
    pd = _difference_psf(P_n, P_r, noise, f_d)
    f_s = float(f_d ** 2 * (pd.astype(np.float64) ** 2).sum())
    return ZogyResult(D.astype(np.float32), S, S_corr, V_S, pd, float(f_d), f_s)
