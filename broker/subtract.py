"""ZOGY image subtraction and the subtract+detect step.

The difference image follows Zackay, Ofek & Gal-Yam (2016, ApJ 830, 27; "ZOGY"), with flux zero
points F_n = 1 (the science frame sets the flux scale) and F_r = the reference/science flux ratio
measured on matched stars. Hats are 2-D Fourier transforms::

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

Bad pixels (NaN in either image, saturated and their dilated surroundings, outside the reference)
are set to 0 (= background, both images being background-subtracted) in *both* images before any
FFT, so nothing rings, and receive a huge variance, so S_corr is suppressed wherever the matched
filter reaches them. The frames are zero-padded by two PSF stamps (marked bad) against wrap-around.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import fft, ndimage

from broker.align import AlignConfig, Alignment, align_reference
from broker.candidate import Candidate
from broker.cutouts import triplet
from broker.detect import DetectConfig, find_scorr_peaks, measure_candidates, sharp_peaks
from broker.errors import BadPixelFraction, ReferenceUnavailable
from broker.frame import Frame
from broker.psf import (
    BackgroundConfig, PSFConfig, StarConfig, StarList, build_psf, estimate_background, find_stars,
    FILL_MAX_SPREAD, bad_columns, half_size_for, inpaint, measure_fwhm, resize_stamp, select_psf_stars, sharp_outliers, stack_psf,
    star_fwhms, embed_centred,
)

#: FFT threads: the broker runs one frame per process, so use every core it may run on.
FFT_WORKERS = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
#: Largest reference source catalogue (count): every 5 sigma source of a crowded 2k x 2k field.
SOURCE_MAX_STARS = 20000


@dataclass(frozen=True)
class SubtractConfig:
    """Settings of subtract+detect.

    Attributes
    ----------
    threshold_sigma : float
        Detection threshold on |S_corr| (sigma); 5 as in ZTF (also ``detect.threshold_sigma``,
        which this value overrides).
    saturation_fraction : float
        Pixels above this fraction of SATURATE are masked (non-linearity starts ~10 % below full
        well on most CCDs).
    sat_grow_fwhm : float
        Saturated regions are dilated by this many PSF FWHM ...
    sat_grow_size : float
        ... plus this many times their own equivalent radius (brighter stars -> bigger wings).
    ref_bad_grow_fwhm : float
        Invalid reference pixels (saturated cores co-added as NaN, edges) are dilated by this many FWHM.
    bad_variance_factor : float
        Variance given to bad pixels, in units of the median science variance. 1e4 suppresses
        S_corr within ~2 FWHM of a mask (where the matched filter still sees it) and nowhere else.
    astrometric_floor_px : float
        Lower bound on the registration noise sigma_x, sigma_y of the astrometric term (px). The
        registration error itself is the fit RMS / sqrt(n matched); star-matched registrations are
        good to a few 0.01 px, and the floor keeps bright-star residuals below threshold.
    astrometric_max_px : float
        Upper bound on sigma_x, sigma_y (px): a bad fit must not blind the whole frame.
    flux_error : float
        Fractional flux-scaling / PSF-model error (dimensionless) entering S_corr's variance as
        ``flux_error^2 (S_N^2 + S_R^2)`` (an extension of ZOGY, like its astrometric term). Off (0)
        by default: it is not ZOGY, and at 0.02 it hid S/N 8-17 transients on bright galaxies. The
        galaxy residuals it was holding down came from the simulator rendering cuspy Sersic cores
        point-sampled at each frame's sub-pixel phase (the same galaxy differs between frames);
        with pixel-integrated galaxies (``bench/peers/synth.py``) ZOGY leaves none.
    cosmic_ray_sigma : float
        Science pixels that exceed their 3x3 median by this many sigma and by twice what the PSF
        allows (cosmic rays, hot pixels; :func:`broker.psf.sharp_outliers`, a stand-in for
        L.A.Cosmic, also used on reference inputs) are interpolated over before the subtraction,
        and positive peaks still sitting on such a pixel are dropped
        (:func:`broker.detect.sharp_peaks`). 8 sigma keeps the brightest pixel of any PSF-blurred
        source. 0 disables both.
    bad_column_sigma : float
        Column segments whose 128-row median stands this many sigma from their neighbours' (hot,
        cold and bleeding columns; :func:`broker.psf.bad_columns`) are interpolated like cosmic
        rays. 0 disables.
    reference_noise_kernel : bool
        Model the reference noise as coloured by its resampling (see :func:`interpolation_kernel`)
        instead of white (matters for undersampled PSFs; see :func:`zogy`).
    min_flux_ratio_stars : int
        Matched stars needed for the measured flux ratio F_r (count); below, F_r = 1 (flagged).
    renormalise_scorr : bool
        Divide S_corr by its robust (MAD) standard deviation over good pixels. Off by default:
        the ZOGY variance terms are expected to give unit variance already (checked by the tests and
        reported in the diagnostics as ``scorr_std``).
    renormalise_tolerance : float
        When the measured blank-sky std of S_corr differs from 1 by more than this (dimensionless),
        S_corr is divided by it anyway (flagged ``scorr_renormalised``). The noise model assumes
        white pixel noise; inputs that are themselves resampled stacks (e.g. the DECam pair: 1.5)
        have correlated noise that the per-pixel RMS under-counts, and the 5 sigma threshold would
        then flood the stream. 0.1 leaves the normal case (1.00-1.03) untouched.
    max_candidates : int
        Cap on candidates per frame (count), the most significant kept.
    psf_tile_px : int
        Frames of 1.5x this side (px) or more are split into tiles of about this size, each
        with its own science and reference PSFs (from the stars of the tile and a quarter tile
        around it) and its own ZOGY solution, so that a PSF varying across the field is followed
        (optics, tracking, focus). 1024 px on a 2k x 2k frame: 2 x 2 tiles of ~15-50 isolated
        stars each at high latitude. 0: one PSF for the frame. On a test pair whose seeing goes
        from 2.6 to 3.2 px across 1024 px, one PSF gave 182 false candidates, 256 px tiles 1.
    psf_tile_min_change : float
        The tiles are used only when their science or reference FWHMs span more than this
        fraction of the median (dimensionless): PSFs from a quarter of the stars are noisier, and
        on the simulator's constant-PSF frames (span ~1 %) tiles doubled the demo's false
        candidates (24 -> 45). 0.05: a 0.15 px change of a 3 px PSF, which already leaves
        5-10 sigma rings on stars of 10^5 ADU.
    sky_offset_box_px : int
        Mesh (px) of the blank-sky level of S_corr that is subtracted from S_corr and D: the
        differential background that SFFT fits as a polynomial and HOTPANTS as a kernel term. The
        science and reference sky maps are biased by the faint sources under them by different
        amounts (other depth, other seeing, 64 px sky meshes); on the bench pairs that left S_corr
        at -0.17 sigma on average (-0.04 to -0.33 between 256 px meshes): 3x the Gaussian rate
        of pixels below -4.5 sigma, half of it above +4.5. 64 (the sky meshes' scale): false
        detections per 2k x 2k bench frame 2.3 -> 1.0 over 6 pairs (256 px: half the offset
        left). The level of a 64 px mesh is good to ~0.06 sigma after the 3 x 3 mesh filter,
        which adds < 0.5 % to the variance of S_corr.
        0 disables.
    """

    threshold_sigma: float = 5.0
    saturation_fraction: float = 0.9
    sat_grow_fwhm: float = 2.0
    sat_grow_size: float = 1.5
    ref_bad_grow_fwhm: float = 1.0
    bad_variance_factor: float = 1e4
    astrometric_floor_px: float = 0.03
    astrometric_max_px: float = 0.5
    flux_error: float = 0.0
    cosmic_ray_sigma: float = 8.0
    bad_column_sigma: float = 6.0
    reference_noise_kernel: bool = True
    min_flux_ratio_stars: int = 3
    renormalise_scorr: bool = False
    renormalise_tolerance: float = 0.1
    max_candidates: int = 500
    psf_tile_px: int = 1024
    psf_tile_min_change: float = 0.05
    sky_offset_box_px: int = 64
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    stars: StarConfig = field(default_factory=StarConfig)
    psf: PSFConfig = field(default_factory=PSFConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)


@dataclass
class SubtractionResult:
    """Output of :func:`subtract_and_detect`.

    Attributes
    ----------
    candidates : list of Candidate
        ``cand_id = f"{frame_id}/{i}"`` in order of decreasing |S_corr| (ties by y, x).
    diagnostics : dict of str -> float
        ``astrometric_residual_px``, ``n_matched_stars``, ``fwhm_science_px``,
        ``fwhm_reference_px``, ``flux_ratio``, ``scorr_std`` (robust std of S_corr on blank sky),
        ``psf_fallback`` (1: science PSF is the Gaussian fallback), ``psf_common_stars`` (1: both
        PSFs stacked from the same matched stars; 0: science PSF from its own stars and the
        reference PSF from its stored stamp),
        ``flux_ratio_fallback`` (0/1), ``n_psf_stars``, ``overlap``, ``bad_fraction``,
        ``n_candidates``, ``n_cosmic_rays`` (peaks vetoed as sharper than the PSF), ``t_<step>_s`` per
        step and ``t_total_s`` (s).
    images : dict of str -> ndarray, optional
        The full D (science ADU), S_corr and bad mask when ``keep_images`` was asked.
    """

    candidates: list[Candidate]
    diagnostics: dict[str, float]
    images: dict[str, np.ndarray] = field(default_factory=dict)


# --- ZOGY -----------------------------------------------------------------------------------------
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
    matrix, offset : science (x, y) -> reference (x, y) affine map (:class:`~broker.align.Alignment`).
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
    ref_noise_kernel : ndarray, shape (2m+1, 2m+1), optional
        Kernel h that correlated the reference noise (the interpolation weights of its resampling):
        R's noise spectrum is then ``sigma_r^2 |h^|^2`` instead of white. It enters ``den^2`` in
        place of sigma_r^2 (the optimal filter for coloured noise) and the variance of S_R through
        ``(k_r (x) h)^2``. A cubic-spline shift of (0.37, 0.23) px leaves 0.67x the per-pixel
        variance, all of it taken from high frequencies: for well-sampled PSFs (FWHM >= 2.5 px)
        the matched filter hardly sees the difference (< 0.5 % in S_corr), for undersampled ones
        (FWHM 1.2 px, half-pixel shift) treating the noise as white deflates S_corr by ~7 %.
    """
    shape = N.shape
    f_d = F_r * F_n / np.sqrt(sigma_n ** 2 * F_r ** 2 + sigma_r ** 2 * F_n ** 2)
    h = P_n.shape[0] // 2
    # the matched-filter kernels k_n, k_r on a small grid (they are as compact as the PSFs): their
    # squares then need one full-size FFT each, and k_n, k_r never go through a full-size inverse
    kn_small, kr_small = _score_kernels(P_n, P_r, sigma_n, sigma_r, F_r, F_n, 3 * h, ref_noise_kernel)
    pn = fft.rfft2(embed_centred(P_n, shape), workers=workers)
    pr = fft.rfft2(embed_centred(P_r, shape), workers=workers)
    a_n = (pn.real ** 2 + pn.imag ** 2).astype(np.float32)
    a_r = (pr.real ** 2 + pr.imag ** 2).astype(np.float32)
    if ref_noise_kernel is not None:
        hh = fft.rfft2(embed_centred(ref_noise_kernel, shape), workers=workers)
        a_h = (hh.real ** 2 + hh.imag ** 2).astype(np.float32)
        del hh
    else:
        a_h = np.float32(1.0)
    den2 = (sigma_n ** 2 * F_r ** 2) * a_r + (sigma_r ** 2 * F_n ** 2) * a_h * a_n
    den2 = np.maximum(den2, np.float32(1e-12 * (sigma_n ** 2 * F_r ** 2 + sigma_r ** 2 * F_n ** 2))).astype(np.float32)
    nh = fft.rfft2(N, workers=workers)
    rh = fft.rfft2(R, workers=workers)
    D = fft.irfft2((F_r * pr * nh - F_n * pn * rh) / np.sqrt(den2), s=shape, workers=workers)
    S_N = fft.irfft2(((F_n * F_r ** 2) * a_r / den2) * np.conj(pn) * nh, s=shape, workers=workers)
    del nh
    S_R = fft.irfft2(((F_r * F_n ** 2) * a_n / den2) * np.conj(pr) * rh, s=shape, workers=workers)
    del rh, pn, pr, a_n, a_r, a_h, den2
    # V(S_N) + V(S_R) in one inverse FFT (eqs. 26-27)
    kn2, kr2 = kn_small ** 2, kr_small ** 2
    vh = fft.rfft2(V_N, workers=workers) * fft.rfft2(embed_centred(kn2, shape), workers=workers)
    vh += fft.rfft2(V_R, workers=workers) * fft.rfft2(embed_centred(kr2, shape), workers=workers)
    V = fft.irfft2(vh, s=shape, workers=workers)
    del vh
    # FFT rounding can leave tiny negatives far from anything: bound by the blank-sky value
    # (from sigma_n, sigma_r: a median over the padded arrays is the masks' huge variance on small frames)
    floor = 0.5 * (sigma_n ** 2 * float(kn2.sum()) + sigma_r ** 2 * float(kr2.sum()))
    V_S = np.maximum(V, floor).astype(np.float32)
    S = (S_N - S_R).astype(np.float32)
    sx, sy = sigma_ast
    V_tot = V_S.copy()
    if sx > 0 or sy > 0:
        for img in (S_N, S_R):
            _add_gradient_variance(V_tot, img, sx, sy)
    if flux_error > 0:
        V_tot += (flux_error * flux_error) * (S_N * S_N + S_R * S_R)
    S_corr = (S / np.sqrt(V_tot)).astype(np.float32)
    # P_D on a small grid (it is as compact as the PSFs)
    small = (4 * h + 1, 4 * h + 1)
    pn_s = fft.fft2(embed_centred(P_n, small))
    pr_s = fft.fft2(embed_centred(P_r, small))
    den_s = np.sqrt(sigma_n ** 2 * F_r ** 2 * np.abs(pr_s) ** 2 + sigma_r ** 2 * F_n ** 2 * np.abs(pn_s) ** 2)
    pd = np.real(fft.ifft2(F_r * F_n * pr_s * pn_s / (f_d * np.maximum(den_s, 1e-30))))
    pd = np.roll(pd, (2 * h, 2 * h), axis=(0, 1))[h:3 * h + 1, h:3 * h + 1]
    pd = (pd / pd.sum()).astype(np.float32)
    f_s = float(f_d ** 2 * (pd.astype(np.float64) ** 2).sum())
    return ZogyResult(D.astype(np.float32), S, S_corr, V_S, pd, float(f_d), f_s)


# --- masks ----------------------------------------------------------------------------------------
def grow_regions(mask: np.ndarray, radius: float | np.ndarray) -> np.ndarray:
    """Dilate each connected region of ``mask`` by a disc (radius in px, scalar or per label 1..n).

    Works on each region's bounding box, so the cost follows the masked area, not the frame size.
    """
    if not mask.any():
        return mask
    labels, n = ndimage.label(mask)
    radii = np.broadcast_to(np.asarray(radius, float), (n + 1,)) if np.ndim(radius) == 0 else np.asarray(radius)
    out = mask.copy()
    ny, nx = mask.shape
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        r = float(radii[i])
        if sl is None or r <= 0:
            continue
        g = int(np.ceil(r))
        y0, y1 = max(sl[0].start - g, 0), min(sl[0].stop + g, ny)
        x0, x1 = max(sl[1].start - g, 0), min(sl[1].stop + g, nx)
        sub = labels[y0:y1, x0:x1] == i
        out[y0:y1, x0:x1] |= ndimage.distance_transform_edt(~sub) <= r
    return out


def saturation_mask(data: np.ndarray, saturation: float, fwhm: float,
                    config: SubtractConfig = SubtractConfig()) -> np.ndarray:
    """Saturated pixels grown by ``sat_grow_fwhm`` FWHM + ``sat_grow_size`` x their own radius.

    Returns
    -------
    ndarray of bool, shape (ny, nx)
    """
    if not np.isfinite(saturation):
        return np.zeros(data.shape, bool)
    with np.errstate(invalid="ignore"):
        sat = data >= config.saturation_fraction * saturation
    if not sat.any():
        return sat
    labels, n = ndimage.label(sat)
    area = np.bincount(labels.ravel(), minlength=n + 1).astype(float)
    radius = config.sat_grow_fwhm * fwhm + config.sat_grow_size * np.sqrt(area / np.pi)
    radius[0] = 0.0
    return grow_regions(sat, radius)


def _grow(mask: np.ndarray, radius: float) -> np.ndarray:
    """Dilate by a (2r+1)-px square.

    Sparse masks (the usual: a few hundred cosmic-ray holes and saturated cores) are dilated by
    writing each offset of the square at the masked pixels' coordinates, which costs
    n_masked x (2r+1)^2 instead of a frame-wide filter; dense ones use the separable max filter.
    """
    if radius <= 0 or not mask.any():
        return mask
    r = int(np.ceil(radius))
    ys, xs = np.nonzero(mask)
    if len(ys) * (2 * r + 1) ** 2 > mask.size // 4:
        return ndimage.maximum_filter(mask.view(np.uint8), size=2 * r + 1).astype(bool)
    out = mask.copy()
    ny, nx = mask.shape
    for dy in range(-r, r + 1):
        yy = np.clip(ys + dy, 0, ny - 1)
        for dx in range(-r, r + 1):
            out[yy, np.clip(xs + dx, 0, nx - 1)] = True
    return out


def _pixel_scale_arcsec(wcs) -> float:
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(wcs)) * 3600.0)


def reference_sources(reference, config: SubtractConfig = SubtractConfig()) -> StarList:
    """Star catalogue of a reference on its own grid (computed once, cached on the object)."""
    cached = getattr(reference, "sources", None)
    if isinstance(cached, StarList):
        return cached
    img = reference.image
    rms = float(np.sqrt(np.nanmedian(reference.variance)))
    fwhm = measure_fwhm(reference.psf)
    stars = find_stars(img, rms, replace(config.stars, max_stars=SOURCE_MAX_STARS), fwhm=fwhm,
                       threshold_sigma=config.threshold_sigma)
    try:
        reference.sources = stars
    except AttributeError:
        pass
    return stars


def source_variance(N: np.ndarray, rms: np.ndarray, gain: float) -> np.ndarray:
    """Poisson variance of the sources (ADU^2): the 3x3-mean image / gain where it is > 2 sigma.

    The mean (noise sigma/3) is both a less noisy estimate of the source flux than the pixel itself
    and a cleaner cut: thresholding the raw pixel at 2 sigma lets every positive noise excursion
    add variance (S_corr then drops ~1.5 % at a faint transient).
    """
    Ns = ndimage.uniform_filter(np.where(np.isfinite(N), N, 0.0).astype(np.float32), 3, mode="nearest")
    return np.where(Ns > (2.0 / 3.0) * rms, Ns, 0.0).astype(np.float32) / max(gain, 1e-6)


# --- the step -------------------------------------------------------------------------------------
def common_psfs(N: np.ndarray, R: np.ndarray, x: np.ndarray, y: np.ndarray, h: int, min_stars: int
                ) -> tuple[np.ndarray | None, np.ndarray | None, int, np.ndarray]:
    """Science and reference PSFs stacked from the same stars at the same (science) positions, so
    that both share the centring errors, and the stars' reference / science flux ratios.

    Returns
    -------
    P_n, P_r : ndarray, shape (2h+1, 2h+1), or None
        None when fewer than ``min_stars`` stars give clean stamps in both images.
    n : int
        Stars in both stacks.
    ratio : ndarray
        Reference / science flux of each star clean in both.
    """
    _, fs, us = stack_psf(N, x, y, h)
    _, fr, ur = stack_psf(R, x, y, h)
    both = us & ur
    ratio = fr[both] / fs[both]
    if both.sum() < max(min_stars, 1):
        return None, None, int(both.sum()), ratio
    ps, _, _ = stack_psf(N, x[both], y[both], h)
    pr, _, _ = stack_psf(R, x[both], y[both], h)
    return ps, pr, int(both.sum()), ratio


@dataclass
class Tile:
    """A rectangle of the frame (rows y0:y1, columns x0:x1) with its PSFs and ZOGY PSF of D."""

    y0: int
    y1: int
    x0: int
    x1: int
    P_n: np.ndarray
    P_r: np.ndarray
    n_stars: int
    P_D: np.ndarray | None = None
    F_D: float = 1.0
    fwhm_D: float = float("nan")

    @property
    def core(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def _span(values: list[float]) -> float:
    """(max - min) / median of ``values``."""
    return float(np.ptp(values) / np.median(values))


def sky_offset(S_corr: np.ndarray, sky: np.ndarray, box_px: int) -> np.ndarray | None:
    """Smooth blank-sky level of S_corr (sigma), or None (disabled, or too little blank sky).

    Parameters
    ----------
    S_corr : ndarray, shape (ny, nx)
    sky : ndarray of bool, shape (ny, nx)
        Blank-sky pixels (no source, no mask).
    box_px : int
        Mesh size (px); 0 disables.
    """
    if box_px <= 0:
        return None
    try:
        level, _ = estimate_background(np.where(sky, S_corr, np.nan), None,
                                       BackgroundConfig(box_size=box_px))
    except BadPixelFraction:
        return None
    return level


def _tile_boxes(shape: tuple[int, int], tile_px: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of tiles of about ``tile_px`` covering the frame."""
    edges_y = np.linspace(0, shape[0], max(1, round(shape[0] / tile_px)) + 1).astype(int)
    edges_x = np.linspace(0, shape[1], max(1, round(shape[1] / tile_px)) + 1).astype(int)
    return [(int(y0), int(y1), int(x0), int(x1)) for y0, y1 in zip(edges_y[:-1], edges_y[1:])
            for x0, x1 in zip(edges_x[:-1], edges_x[1:])]


def _tile_stars(x: np.ndarray, y: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Indices of the stars within a quarter tile of ``box``."""
    y0, y1, x0, x1 = box
    my, mx = (y1 - y0) // 4, (x1 - x0) // 4
    return np.flatnonzero((x >= x0 - mx) & (x < x1 + mx) & (y >= y0 - my) & (y < y1 + my))


def tile_fwhm_span(N: np.ndarray, R: np.ndarray, x: np.ndarray, y: np.ndarray,
                   boxes: list[tuple[int, int, int, int]]) -> float:
    """Largest spread over tiles, (max - min) / median, of the tiles' median star FWHM in the
    science or the reference image.

    Half-maximum widths of single stars (:func:`broker.psf.star_fwhms`, ~10 us a star) decide
    whether per-tile PSFs are needed at all; stacking them for every tile would cost ~0.15 s of a
    2k x 2k frame whose PSF does not vary. NaN when a tile has fewer than 5 measured stars.
    """
    spans = []
    for img in (N, R):
        fw = star_fwhms(img, x, y)
        per_tile = [np.nanmedian(fw[sel]) if np.isfinite(fw[sel]).sum() >= 5 else np.nan
                    for sel in (_tile_stars(x, y, box) for box in boxes)]
        spans.append(_span(per_tile))
    return max(spans)


def tile_psfs(N: np.ndarray, R: np.ndarray, x: np.ndarray, y: np.ndarray, h: int, whole: Tile,
              config: SubtractConfig) -> list[Tile]:
    """Tiles of about ``config.psf_tile_px`` with PSFs from the stars (x, y: isolated, brightest
    first) within a quarter tile of each; a tile with too few keeps the frame's PSFs."""
    tiles = []
    for box in _tile_boxes(N.shape, config.psf_tile_px):
        sel = _tile_stars(x, y, box)[:config.psf.max_stars]
        P_n, P_r, n, _ = common_psfs(N, R, x[sel], y[sel], h, config.psf.min_stars)
        if P_n is None:
            P_n, P_r, n = whole.P_n, whole.P_r, whole.n_stars
        tiles.append(Tile(*box, P_n, P_r, n))
    return tiles


def subtract_and_detect(frame: Frame, reference, config: SubtractConfig = SubtractConfig(),
                        keep_images: bool = False) -> SubtractionResult:
    """Align the reference onto the frame, ZOGY-subtract, detect >= 5 sigma peaks, cut out.

    Parameters
    ----------
    frame : Frame
        Science exposure (ADU, NaN where invalid).
    reference : broker.reference.Reference
        Background-subtracted co-add of the same (telescope, field, filter).
    keep_images : bool
        Return D, S_corr and the bad mask in ``result.images`` (debugging, benchmarks).

    Raises
    ------
    ReferenceUnavailable
        The reference is for another key or is malformed.
    AlignmentError
        The reference cannot be registered onto the frame.
    PSFError, BadPixelFraction
        No PSF / no sky can be measured on the frame.
    """
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def lap(name: str, t: float) -> float:
        now = time.perf_counter()
        times[f"t_{name}_s"] = now - t
        return now

    if tuple(reference.key) != tuple(frame.meta.reference_key):
        raise ReferenceUnavailable(f"reference {reference.key} does not match frame key {frame.meta.reference_key}")
    if reference.image.ndim != 2 or reference.image.shape != reference.variance.shape:
        raise ReferenceUnavailable("reference image and variance shapes differ")
    if reference.psf.ndim != 2 or reference.psf.shape[0] % 2 == 0 or reference.psf.shape[0] != reference.psf.shape[1]:
        raise ReferenceUnavailable(f"reference PSF has a bad shape {reference.psf.shape}")
    meta = frame.meta
    sci = np.asarray(frame.data, dtype=np.float32)
    shape = sci.shape
    wcs = frame.wcs

    # background + science stars
    t = time.perf_counter()
    raw_sat = saturation_mask(sci, meta.saturation, 2.0, SubtractConfig(sat_grow_fwhm=1.0, sat_grow_size=0.0))
    bkg, rms_map = estimate_background(sci, raw_sat, config.background)
    N = sci - bkg
    sigma_n = float(np.median(rms_map[::4, ::4]))
    t = lap("background", t)
    sci_stars = find_stars(np.where(raw_sat, 0.0, N), sigma_n, config.stars, meta.saturation, bkg)
    ref_stars = reference_sources(reference, config)
    # cosmic rays, hot pixels and the reference's detector defects (found on the reference grid,
    # i.e. on the detector pixels of its first frame: the same pixels of every frame of the camera)
    # interpolated over, as survey pipelines do: masking them would blind S_corr for 2 FWHM
    # around each, and a transient beside or beneath one keeps its other pixels
    fix = np.zeros(shape, bool)
    if config.cosmic_ray_sigma > 0:
        fix |= sharp_outliers(N, rms_map, sci_stars.fwhm, config.cosmic_ray_sigma)
    if config.bad_column_sigma > 0:
        fix |= bad_columns(np.where(raw_sat, np.nan, N), rms_map, nsigma=config.bad_column_sigma)
    if reference.defects is not None and reference.defects.shape == shape:
        fix |= reference.defects
    N, fill_spread = inpaint(N, fix)
    # a fill is trusted where the surface follows the image; elsewhere (a star's core) masked
    unfilled = fix & ~(fill_spread <= FILL_MAX_SPREAD * rms_map)
    fill_spread = np.nan_to_num(fill_spread)
    t = lap("stars", t)

    # alignment
    ali: Alignment = align_reference(reference.image, reference.variance, reference.header, ref_stars,
                                     frame.header, shape, sci_stars, config.align,
                                     prepared=reference.resampleable())
    R = ali.image
    t = lap("align", t)

    # PSFs + flux ratio, from the same (matched, isolated) stars at the same science positions
    fwhm_guess = max(sci_stars.fwhm, measure_fwhm(reference.psf))
    h = half_size_for(fwhm_guess, config.psf)
    matched = sci_stars.subset(ali.sci_index)
    idx = select_psf_stars(matched, shape, h, config.psf)
    P_n = P_r = None
    n_psf = 0
    flux_ratio, fr_fallback = 1.0, 1.0
    if len(idx) >= config.min_flux_ratio_stars:
        P_n, P_r, n_psf, ratio = common_psfs(N, R, matched.x[idx], matched.y[idx], h, config.psf.min_stars)
        if len(ratio) >= config.min_flux_ratio_stars:
            med = np.median(ratio)
            mad = 1.4826 * np.median(np.abs(ratio - med)) + 1e-12
            flux_ratio = float(np.median(ratio[np.abs(ratio - med) < 3 * mad]))
            fr_fallback = 0.0
            if not (np.isfinite(flux_ratio) and flux_ratio > 0):
                flux_ratio, fr_fallback = 1.0, 1.0
    psf_fallback, psf_common = 0.0, 1.0
    if P_n is None:
        # too few common stars: science PSF from its own stars (or the Gaussian fallback)
        psf_common = 0.0
        sci_psf = build_psf(N, sci_stars, config.psf, half_size=h)
        psf_fallback = float(sci_psf.fallback)
        P_n = sci_psf.stamp
        # reference PSF from the stored stamp, resampled with the linear part of the registration
        lin = ali.matrix
        pr_ = ndimage.affine_transform(reference.psf.astype(np.float64), lin[::-1, ::-1],
                                       offset=np.array(reference.psf.shape) // 2 - lin[::-1, ::-1] @ (np.array(reference.psf.shape) // 2),
                                       order=3)
        P_r = resize_stamp(np.clip(pr_, 0, None).astype(np.float32), h)
        n_psf = sci_psf.n_stars
    fwhm_n, fwhm_r = measure_fwhm(P_n), measure_fwhm(P_r)
    t = lap("psf", t)

    # masks: science invalid + saturated (grown) + reference invalid (grown)
    fwhm = max(fwhm_n, fwhm_r)
    bad = ~np.isfinite(sci) | saturation_mask(sci, meta.saturation, fwhm, config)
    bad |= _grow(~np.isfinite(R) | ~np.isfinite(ali.variance) | unfilled, config.ref_bad_grow_fwhm * fwhm)
    var_n = rms_map ** 2 + source_variance(N, rms_map, meta.gain) + fill_spread ** 2
    var_r = np.where(np.isfinite(ali.variance), ali.variance, 0.0).astype(np.float32)
    # frame statistics on every 4th pixel of every 4th row: 260k samples of a 2k x 2k frame
    sub_good = ~bad[::4, ::4]
    sigma_r = float(np.sqrt(np.median(var_r[::4, ::4][sub_good]))) if sub_good.any() else float(np.sqrt(np.nanmedian(reference.variance)))
    big = config.bad_variance_factor * float(np.median(var_n[::4, ::4][sub_good])) if sub_good.any() else 1e30
    # a noise-free (model) template would make k_r a deconvolution kernel with unbounded wings:
    # no real reference is better than 1 % of the science noise
    sigma_r = max(sigma_r, 0.01 * sigma_n * flux_ratio)
    var_r = np.maximum(var_r, np.float32(sigma_r ** 2))
    # pad by two stamps so the circular convolutions do not wrap
    pad = 2 * h
    py, px = fft.next_fast_len(shape[0] + 2 * pad, real=True), fft.next_fast_len(shape[1] + 2 * pad, real=True)

    def padded(img: np.ndarray, fill: float) -> np.ndarray:
        out = np.full((py, px), fill, np.float32)
        out[pad:pad + shape[0], pad:pad + shape[1]] = img
        return out

    Np = padded(np.where(bad, 0.0, N), 0.0)
    Rp = padded(np.where(bad, 0.0, R), 0.0)
    VNp = padded(np.where(bad, big, var_n), big)
    VRp = padded(np.where(bad, big * flux_ratio ** 2, var_r), big * flux_ratio ** 2)
    if ali.n_matched >= 2 and np.isfinite(ali.residual_px):
        nm = np.sqrt(max(ali.n_matched, 1))
        sig_ast = tuple(float(np.clip(r / nm, config.astrometric_floor_px, config.astrometric_max_px))
                        for r in ali.residual_xy)
    else:
        # no star to register (nor to leave a residual): the term would only add gradient noise
        sig_ast = (config.astrometric_floor_px, config.astrometric_floor_px)
    t = lap("masks", t)
    h_ref = interpolation_kernel(ali.matrix, ali.offset, shape) if config.reference_noise_kernel else None
    tiles, fwhm_tiles = [Tile(0, shape[0], 0, shape[1], P_n, P_r, n_psf)], [fwhm_n]
    if config.psf_tile_px > 0 and max(shape) >= 1.5 * config.psf_tile_px and psf_common:
        pool = select_psf_stars(matched, shape, h, replace(config.psf, max_stars=len(matched)))
        px_, py_ = matched.x[pool], matched.y[pool]
        span = tile_fwhm_span(N, R, px_, py_, _tile_boxes(shape, config.psf_tile_px))
        if not span <= config.psf_tile_min_change:  # NaN (a tile short of stars): measure them
            split = tile_psfs(N, R, px_, py_, h, tiles[0], config)
            fw_n = [measure_fwhm(t.P_n) for t in split]
            if max(_span(fw_n), _span([measure_fwhm(t.P_r) for t in split])) > config.psf_tile_min_change:
                tiles, fwhm_tiles = split, fw_n
    D, S_corr, V_S, D_adu = (np.empty(shape, np.float32) for _ in range(4))
    for tile in tiles:
        # the tile and a margin of one pad (the padded frame holds them), to a fast FFT size
        fy = fft.next_fast_len(tile.y1 - tile.y0 + 2 * pad, real=True)
        fx = fft.next_fast_len(tile.x1 - tile.x0 + 2 * pad, real=True)

        def window(a: np.ndarray, fill: float) -> np.ndarray:
            w = a[tile.y0:tile.y0 + fy, tile.x0:tile.x0 + fx]
            if w.shape == (fy, fx):
                return w
            out = np.full((fy, fx), fill, np.float32)
            out[:w.shape[0], :w.shape[1]] = w
            return out

        z = zogy(window(Np, 0.0), window(Rp, 0.0), tile.P_n, tile.P_r, window(VNp, big),
                 window(VRp, big * flux_ratio ** 2), sigma_n, sigma_r, flux_ratio, 1.0, sig_ast,  # type: ignore[arg-type]
                 config.flux_error, ref_noise_kernel=h_ref)
        core, inner = tile.core, (slice(pad, pad + tile.y1 - tile.y0), slice(pad, pad + tile.x1 - tile.x0))
        D[core], S_corr[core], V_S[core] = z.D[inner], z.S_corr[inner], z.V_S[inner]
        D_adu[core] = z.D[inner] / z.F_D
        tile.P_D, tile.F_D, tile.fwhm_D = z.P_D, z.F_D, measure_fwhm(z.P_D)
    good = ~bad
    v0 = float(np.median(V_S[::4, ::4][good[::4, ::4]])) if good[::4, ::4].any() else 1.0
    # blank sky: neither sources nor the masks' huge variance reach these pixels
    sky = good & (V_S < 1.2 * v0)
    offset = sky_offset(S_corr, sky, config.sky_offset_box_px)
    if offset is not None:
        # a constant c in D is F_D c in S, i.e. F_D c / sqrt(V) in S_corr: V_S stands in for V
        S_corr -= offset * np.sqrt(v0 / V_S)
        for tile in tiles:
            D[tile.core] -= offset[tile.core] * (np.sqrt(v0) / tile.F_D)
            D_adu[tile.core] = D[tile.core] / tile.F_D
    S_corr = np.where(bad, 0.0, S_corr).astype(np.float32)
    sky_s = S_corr[::2, ::2][sky[::2, ::2]]
    med = float(np.median(sky_s)) if sky_s.size else 0.0
    scorr_std = float(1.4826 * np.median(np.abs(sky_s - med))) if sky_s.size else float("nan")
    renorm = bool(config.renormalise_scorr or abs(scorr_std - 1.0) > config.renormalise_tolerance)
    if renorm and scorr_std > 0:
        S_corr = S_corr / scorr_std
    t = lap("zogy", t)

    # detection
    xs, ys, vs = find_scorr_peaks(S_corr, config.threshold_sigma, refine=config.detect.subpixel_peak)
    n_cr = 0
    if config.cosmic_ray_sigma > 0 and len(xs):
        # positive peaks on a pixel sharper than the PSF: cosmic rays / hot pixels of the science frame
        cr = (vs > 0) & sharp_peaks(N, rms_map, xs, ys, fwhm_n, config.cosmic_ray_sigma)
        n_cr = int(cr.sum())
        xs, ys, vs = xs[~cr], ys[~cr], vs[~cr]
    cap = min(config.max_candidates, config.detect.max_candidates)
    capped = float(len(xs) > cap)
    xs, ys, vs = xs[:cap], ys[:cap], vs[:cap]
    # blank-sky variance of S: median over good pixels; the ratio inflates errors on sources
    noise_ratio = V_S / v0
    ref_x, ref_y = ali.to_science(ref_stars.x, ref_stars.y)
    ref_xy = np.column_stack([ref_x, ref_y])
    dets: list = [None] * len(xs)
    for tile in tiles:
        inside = np.flatnonzero((ys >= tile.y0) & (ys < tile.y1) & (xs >= tile.x0) & (xs < tile.x1))
        found, kept = measure_candidates(
            xs[inside], ys[inside], vs[inside], D=D, scorr=S_corr, P_D=tile.P_D, F_D=tile.F_D,
            noise_ratio=noise_ratio, bad=bad, wcs=wcs, pixel_scale_arcsec=_pixel_scale_arcsec(wcs),
            ref_xy=ref_xy, ref_flux=ref_stars.flux / flux_ratio, fwhm_D=tile.fwhm_D,
            config=config.detect)
        for i, det in zip(inside[kept], found):
            dets[i] = det
    dets = [d for d in dets if d is not None]  # in the order of the peaks: most significant first
    t = lap("detect", t)

    # cutouts: science and reference background-subtracted in science ADU, D in science ADU
    sci_cut = np.where(np.isfinite(sci), N, np.nan).astype(np.float32)
    ref_cut = (R / flux_ratio).astype(np.float32)
    diff_cut = np.where(bad, np.nan, D_adu).astype(np.float32)
    cands = []
    for i, det in enumerate(dets):
        s, r, d = triplet(sci_cut, ref_cut, diff_cut, det.x, det.y)
        cands.append(Candidate(f"{meta.frame_id}/{i}", det, s, r, d))
    t = lap("cutouts", t)

    diag = {
        "astrometric_residual_px": float(ali.residual_px),
        "n_matched_stars": float(ali.n_matched),
        "fwhm_science_px": float(fwhm_n),
        "fwhm_reference_px": float(fwhm_r),
        "fwhm_difference_px": float(np.median([tile.fwhm_D for tile in tiles])),
        "n_psf_tiles": float(len(tiles)),
        "fwhm_science_tile_range_px": float(np.ptp(fwhm_tiles)),
        "flux_ratio": float(flux_ratio),
        "flux_ratio_fallback": fr_fallback,
        "psf_fallback": psf_fallback,
        "psf_common_stars": psf_common,
        "n_psf_stars": float(n_psf),
        "sigma_ast_x_px": sig_ast[0],
        "sigma_ast_y_px": sig_ast[1],
        "scorr_std": scorr_std,
        "scorr_sky_offset": float(np.median(offset[::16, ::16])) if offset is not None else 0.0,
        "scorr_renormalised": float(renorm and scorr_std > 0),
        "overlap": float(ali.overlap),
        "bad_fraction": float(bad.mean()),
        "n_peaks": float(len(xs)),
        "n_cosmic_rays": float(n_cr),
        "n_interpolated_px": float(fix.sum()),
        "n_unfilled_px": float(unfilled.sum()),
        "n_candidates": float(len(cands)),
        "candidates_capped": capped,
        **times,
        "t_total_s": time.perf_counter() - t0,
    }
    images = {"D": D_adu, "S_corr": S_corr, "bad": bad} if keep_images else {}
    return SubtractionResult(cands, diag, images)
