"""Proper co-addition of registered images (Zackay & Ofek 2017, ApJ 836, 188).

For images M_j of one field, each with PSF P_j, white background noise sigma_j and flux zero point
F_j, the co-add

    R^ = sum_j (F_j / sigma_j^2) conj(P_j^) M_j^  /  sqrt(sum_j (F_j^2 / sigma_j^2) |P_j^|^2)

(hats: Fourier transforms) is a sufficient statistic for any measurement of a constant sky: its
point-source S/N^2 is the sum of the inputs' S/N^2, whatever their seeing, while a weighted mean
loses S/N when the seeing differs (the sharp frames are blurred by the broad ones). Its noise is
white with unit variance, its PSF ``P_R^ = sqrt(sum_j (F_j^2/sigma_j^2) |P_j^|^2) / F_R`` and its
zero point ``F_R = sqrt(sum_j F_j^2 / sigma_j^2)``.

Here the inputs are already scaled to one flux scale (F_j = 1 after dividing by the measured flux
ratio, sigma_j the scaled sky noise), and the co-add is returned divided by F_R: the same flux
scale as the inputs, sky noise 1 / F_R.
"""

from __future__ import annotations

import numpy as np
from scipy import fft

from broker.psf import embed_centred


def _kernels(psfs: list[np.ndarray], sigmas: np.ndarray, half: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-input co-addition kernels and the co-add PSF.

    Per-input co-addition kernels k_j (``R = sum_j k_j * M_j``, already divided by F_R) and the
    co-add PSF, on a centred (2 half + 1)^2 grid.
    """
    small = (2 * half + 1, 2 * half + 1)
    ph = [fft.fft2(embed_centred(p, small, np.float64)) for p in psfs]
    w = 1.0 / np.asarray(sigmas, np.float64) ** 2
    den = np.sqrt(sum(wj * np.abs(p) ** 2 for wj, p in zip(w, ph, strict=True)))
    den = np.maximum(den, 1e-12 * den.max())
    f_r = np.sqrt(w.sum())
    kernels = [np.real(np.fft.fftshift(fft.ifft2(wj * np.conj(p) / den))) / f_r for wj, p in zip(w, ph, strict=True)]
    psf = np.real(np.fft.fftshift(fft.ifft2(den / f_r)))
    return kernels, psf / psf.sum()


def proper_coadd(images: list[np.ndarray], variances: list[np.ndarray], psfs: list[np.ndarray],
                 sigmas: list[float], workers: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zackay & Ofek proper co-add of registered, flux-scaled, background-subtracted images.

    Parameters
    ----------
    images, variances : list of ndarray, shape (ny, nx)
        The inputs on one grid in one flux scale (ADU) and their variances (ADU^2, sources
        included); finite everywhere (fill invalid pixels before).
    psfs : list of ndarray, shape (2h+1, 2h+1)
        Centred PSFs, sum 1, one per input.
    sigmas : list of float
        Background noise of each input (ADU, same flux scale).

    Returns
    -------
    image : ndarray, shape (ny, nx), float32
        The co-add in the inputs' flux scale; background noise ``1 / sqrt(sum 1/sigma_j^2)``.
    variance : ndarray, shape (ny, nx), float32
        ``sum_j k_j^2 * V_j``: the inputs' variance maps through the co-addition kernels.
    psf : ndarray, shape (4h+1, 4h+1), float32
        The co-add's PSF (sum 1).
    """
    h = psfs[0].shape[0] // 2
    half = 2 * h  # the kernels are a little wider than the PSFs: room for their wings
    kernels, psf = _kernels([np.pad(p, half - h) for p in psfs], np.asarray(sigmas), half)
    ny, nx = images[0].shape
    # pad so the circular convolution does not wrap the edges onto each other
    shape = (fft.next_fast_len(ny + 2 * half, real=True), fft.next_fast_len(nx + 2 * half, real=True))
    acc = np.zeros((shape[0], shape[1] // 2 + 1), np.complex128)
    vacc = np.zeros_like(acc)
    for img, var, k in zip(images, variances, kernels, strict=True):
        kh = fft.rfft2(embed_centred(k, shape, np.float64), workers=workers)
        acc += fft.rfft2(img, s=shape, workers=workers) * kh
        k2h = fft.rfft2(embed_centred(k * k, shape, np.float64), workers=workers)
        vacc += fft.rfft2(var, s=shape, workers=workers) * k2h
    image = fft.irfft2(acc, s=shape, workers=workers)[:ny, :nx]
    variance = fft.irfft2(vacc, s=shape, workers=workers)[:ny, :nx]
    return image.astype(np.float32), np.maximum(variance, 0.0).astype(np.float32), psf.astype(np.float32)
