"""Method-independent scoring of a difference image against the synthetic pair's truth.

Every method hands in a difference image ``D`` (any flux scale, any PSF) and, when it makes one, a
significance image (``S_corr``). Methods without one are detected by the same matched filter:
``D`` correlated with the PSF of ``D`` and normalised by a noise map (its robust blank-sky value,
modulated by the input variance smoothed with the PSF^2). All methods are scored with the same mask
(our saturated/invalid mask) and the same matching radii.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats
from scipy.spatial import cKDTree

from broker.detect import DetectConfig, find_scorr_peaks

#: A detection within this distance (px) of an injection recovers it.
MATCH_RADIUS_PX = 2.0
#: A detection farther than this (px) from every injection is false.
FALSE_RADIUS_PX = 4.0
#: Bins of nominal S/N for the completeness table.
SNR_BINS = (3, 4, 5, 6, 7, 8, 10, 12, 15, 20)


def robust_std(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    if not a.size:
        return float("nan")
    return float(1.4826 * np.median(np.abs(a - np.median(a))))


def _convolve(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Same-size FFT correlation with a centred kernel (zero-padded)."""
    from scipy.signal import fftconvolve

    return fftconvolve(img, kernel[::-1, ::-1], mode="same").astype(np.float32)


def noise_shape(var_in: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """Relative noise (1 on blank sky) of an image whose input variance map is ``var_in``."""
    k = psf ** 2 / (psf ** 2).sum()
    vs = _convolve(var_in, k)
    return np.sqrt(np.clip(vs, 1e-12, None) / np.median(vs))


def significance(D: np.ndarray, psf: np.ndarray, var_in: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Matched-filter S/N of D: (D (x) psf) / (robust blank-sky std x noise_shape)."""
    Dz = np.where(bad | ~np.isfinite(D), 0.0, D).astype(np.float32)
    S = _convolve(Dz, psf)
    shape = noise_shape(var_in, psf)
    z = S / shape
    sky = (~bad) & (shape < 1.05)
    z = z / robust_std(z[sky])
    return np.where(bad, 0.0, z).astype(np.float32)


def detections_from_significance(S: np.ndarray, bad: np.ndarray, threshold: float = 5.0):
    """(x, y, value) of >= threshold peaks (positive and negative), outside ``bad``."""
    S = np.where(bad | ~np.isfinite(S), 0.0, S)
    x, y, v = find_scorr_peaks(S, threshold, refine=DetectConfig().subpixel_peak)  # ours's statistic
    return x.astype(float), y.astype(float), v


@dataclass
class Score:
    """Scores of one difference image: completeness against theory, false detections and residual RMS."""

    completeness: np.ndarray      # per SNR_BINS bin
    theory: np.ndarray            # per bin, mean Phi(snr_eff - 5)
    n_per_bin: np.ndarray
    snr50: float
    snr50_theory: float
    n_false: int
    n_false_pos: int
    n_false_neg: int
    rms_all: float
    rms_stars: float
    std_stars: float              # plain (non-robust) std near stars, clipped at 20 sigma
    recovered: np.ndarray


def _fit_snr50(snr: np.ndarray, p: np.ndarray) -> float:
    """S/N where a Phi((snr - m) / w) fit to detection outcomes (or probabilities) p crosses 0.5."""
    def nll(par):
        m, lw = par
        q = np.clip(stats.norm.cdf((snr - m) / np.exp(lw)), 1e-9, 1 - 1e-9)
        return -np.sum(p * np.log(q) + (1 - p) * np.log(1 - q))

    res = optimize.minimize(nll, [5.0, 0.0], method="Nelder-Mead")
    return float(res.x[0])


def match(pair, det_x, det_y, det_v) -> tuple[np.ndarray, int, int, int]:
    """Injections recovered and false detections: all, positive, negative.

    An injection is recovered by a positive detection within ``MATCH_RADIUS_PX``; a false detection is
    farther than ``FALSE_RADIUS_PX`` from every injection.
    """
    inj = np.column_stack([pair.inj_x, pair.inj_y])
    rec = np.zeros(len(inj), bool)
    if not len(det_x):
        return rec, 0, 0, 0
    d, j = cKDTree(inj).query(np.column_stack([det_x, det_y]))
    pos = np.asarray(det_v) > 0
    rec[j[(d <= MATCH_RADIUS_PX) & pos]] = True
    false = d > FALSE_RADIUS_PX
    return rec, int(false.sum()), int((false & pos).sum()), int((false & ~pos).sum())


def score(pair, D, det_x, det_y, det_v, bad, var_in, psf_d, fwhm) -> Score:
    """Completeness, false detections and residual RMS of one method."""
    inj = np.column_stack([pair.inj_x, pair.inj_y])
    rec, n_false, n_fp, n_fn = match(pair, det_x, det_y, det_v)
    edges = np.asarray(SNR_BINS, float)
    b = np.digitize(pair.inj_snr, edges) - 1
    theo_p = stats.norm.cdf(pair.inj_snr_eff - 5.0)
    nb = len(edges) - 1
    comp = np.array([rec[b == i].mean() if (b == i).any() else np.nan for i in range(nb)])
    theo = np.array([theo_p[b == i].mean() if (b == i).any() else np.nan for i in range(nb)])
    nper = np.array([(b == i).sum() for i in range(nb)])
    # residual RMS in units of the difference's own noise
    Dz = np.where(bad, np.nan, D)
    shape = noise_shape(var_in, psf_d)
    yy, xx = np.indices(D.shape)
    near_inj = np.zeros(D.shape, bool)
    for x, y in inj:
        near_inj[max(0, int(y) - 10):int(y) + 11, max(0, int(x) - 10):int(x) + 11] = True
    ok = ~bad & ~near_inj & np.isfinite(Dz)
    sky = ok & (shape < 1.05)
    z = Dz / (robust_std(Dz[sky]) * shape)
    stars = np.zeros(D.shape, bool)
    sel = (pair.star_flux > 2e4)
    r = int(np.ceil(2 * fwhm))
    for x, y in zip(pair.star_x[sel], pair.star_y[sel], strict=True):
        ix, iy = int(round(x)), int(round(y))
        stars[max(0, iy - r):iy + r + 1, max(0, ix - r):ix + r + 1] = True
    zs = z[ok & stars]
    zs_c = np.clip(zs, -20, 20)
    return Score(comp, theo, nper, _fit_snr50(pair.inj_snr, rec.astype(float)),
                 _fit_snr50(pair.inj_snr, theo_p), n_false, n_fp, n_fn,
                 robust_std(z[ok]), robust_std(zs), float(np.std(zs_c)), rec)
