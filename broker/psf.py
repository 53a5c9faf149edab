"""Point-spread functions: empirical PSF stamps stacked from stars, and stamp utilities.

:func:`build_psf` stacks bright, isolated, unsaturated stars (:func:`select_psf_stars`,
:func:`stack_psf`: stamps of :func:`star_stamps`, other stars optionally masked, scaled by their
PSF-fit flux and sky, the wings the stack does not measure cut by :func:`significant_psf`) into a
normalised stamp, with a flagged Gaussian fallback
(:func:`gaussian_psf`) when too few stars qualify; :func:`measure_fwhm`, :func:`embed_centred`
and :func:`resize_stamp` work on such stamps. Positions are 0-based pixel coordinates
(x = column, y = row).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike
from scipy import ndimage, optimize
from scipy.spatial import cKDTree

from broker.errors import ConfigError, PSFError
from broker.stars import StarList

#: FWHM of a Gaussian in units of its sigma.
GAUSS_FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))

#: Significance (sigma) under which an annulus of a stacked PSF is not measured and the PSF is
#: zero from there out (:func:`significant_psf`).
WING_SIGMA = 3.0

#: Radius (FWHM) within which a stacked PSF is never cut (:func:`significant_psf`): 1.5, where a
#: Gaussian keeps 0.2 % of its light. 2 left 9 px PSFs stacked from ~15 stars with 2-4 % of
#: noise in their wings (S_corr's blank-sky std 1.12-1.28); 0 cut 3 px PSFs at 1.2 FWHM.
WING_MIN_FWHM = 1.5


@dataclass(frozen=True)
class PSFConfig:
    """Settings of the empirical PSF.

    Attributes
    ----------
    max_stars : int
        Stars stacked (count); 50 gives a PSF noise well below that of any single star while
        keeping the cost at a few ms.
    min_stars : int
        Below this many usable stars (count) the Gaussian fallback is used and flagged. 3: the
        median of three stamps already rejects one bad stamp, and even that beats a Gaussian on a
        real PSF (DECam 256^2 pair: 4 usable stars; robust RMS/sigma near stars 1.12 with them,
        1.23 with the fallback).
    half_size_fwhm : float
        Stamp half-size (FWHM); 3 FWHM holds > 98 % of a Moffat(beta=2.5) flux.
    min_half_size, max_half_size : int
        Bounds on the stamp half-size (px; ``max_half_size`` 1 or more: 0, a 1 px stamp, was a
        ValueError of every subtraction); 7 and 25: the 3 FWHM stamps of 2.3 to 8.3 px seeing.
    isolation_fwhm : float
        No other catalogue star within this many FWHM (nor within the stamp half-size), so that
        neighbours do not enter the stack; 3, like the stamp.
    fallback_fwhm_px : float
        FWHM of the fallback Gaussian (px) when not even a rough FWHM can be measured; 3, as
        ``StarConfig.fwhm_guess_px``.
    allow_fallback : bool
        True: too few stars give the flagged Gaussian fallback; False: they raise :class:`PSFError`.
    neighbour_mask_fwhm : float
        Radius (FWHM of the image's PSF) around every other catalogued star masked out of the
        stamps of every PSF stack (:func:`star_stamps`): a frame's or a reference's own PSF
        (:func:`build_psf`), the reference co-add's flux ratios and a subtraction's science and
        reference PSFs; 0: none. 2: a Gaussian's light there is 2e-5 of its peak. Stars isolated
        within 25 px on a 256^2 field of 9 px seeing still had neighbours' light in their 51 x 51
        stamps: their sums were 1.6x the stars' fluxes and the stack 23 % too peaked; masked, the
        PSF-fit fluxes are within 2 % of the stars' and the stack's peak within 2 % of the PSF's
        (unmasked: 0.83-0.85x, 7-12 % too peaked). Unmasked, :func:`build_psf` on 256^2 fields
        of 60-120 stars at 9 px seeing was 8-14 % too peaked (FWHM 8.6-8.9 px), masked
        0.98-1.04; the reference co-add's flux ratios at 6-7 px seeing were 0.90-1.00 of the truth
        (0.981 at the median of 40 frames), masked 0.98-1.03 (1.002). At 3 px seeing, and on the
        simulator's fields of 1.8-2.5 px at up to 10x its star density, masking changed either
        by under 1 %.
    """

    max_stars: int = 50
    min_stars: int = 3
    half_size_fwhm: float = 3.0
    min_half_size: int = 7
    max_half_size: int = 25
    isolation_fwhm: float = 3.0
    fallback_fwhm_px: float = 3.0
    allow_fallback: bool = True
    neighbour_mask_fwhm: float = 2.0

    def __post_init__(self) -> None:
        if self.max_half_size < 1:
            raise ConfigError(f"max_half_size must be 1 px or more, not {self.max_half_size}")


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


def _neighbour_mask(xc: float, yc: float, h: int, neighbours: tuple[np.ndarray, np.ndarray],
                    mask_px: float) -> np.ndarray | None:
    """Pixels of a stamp centred on (xc, yc) within ``mask_px`` of another star (bool), or None if none."""
    dx, dy = neighbours[0] - xc, neighbours[1] - yc
    near = (np.abs(dx) < h + mask_px) & (np.abs(dy) < h + mask_px) & (np.hypot(dx, dy) > 0.5)
    if not near.any():
        return None
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    mask = np.zeros(xx.shape, bool)
    for ox, oy in zip(dx[near], dy[near], strict=True):
        mask |= (xx - ox) ** 2 + (yy - oy) ** 2 < mask_px * mask_px
    return mask


def star_stamps(data: np.ndarray, x: np.ndarray, y: np.ndarray, half_size: int,
                neighbours: tuple[np.ndarray, np.ndarray] | None = None, mask_px: float = 0.0
                ) -> Iterator[tuple[int, np.ndarray]]:
    """Stamps of stars re-centred with sub-pixel (cubic spline) shifts, less their local sky.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Background-subtracted image (ADU).
    x, y : ndarray, shape (n,)
        Star centroids (px).
    half_size : int
        Stamp half-size h (px); stamps are (2h+1, 2h+1).
    neighbours : (ndarray, ndarray), optional
        Positions (x, y; px) of every catalogued star: pixels within ``mask_px`` of any but the
        stamp's own star are NaN, so that the light of a neighbour outside the isolation radius
        (the wings of a wide PSF) enters neither the local sky nor the stack.
    mask_px : float
        Radius of those masks (px); 0: none.

    Yields
    ------
    i : int
        Index of the star into ``x, y``; stars within h + 2 px of an edge, with a non-finite pixel
        within h / 3 px of their centre (its core: one FWHM at the default ``half_size_fwhm``), or
        with no unmasked pixel on the stamp's outer ring are skipped. Non-finite pixels further out
        (a cosmic ray, hot pixel or bad column the frame's cleaning set to NaN) are NaN in the
        stamp, 2 px around, as masked neighbours are.
    stamp : ndarray, shape (2h+1, 2h+1), float64
        The star centred on the central pixel, less the median of the stamp's unmasked outer ring
        (ADU); NaN where masked.
    """
    h = half_size
    ny, nx = data.shape
    for i, (xc, yc) in enumerate(zip(x, y, strict=True)):
        ix, iy = int(np.round(xc)), int(np.round(yc))
        if ix - h - 2 < 0 or iy - h - 2 < 0 or ix + h + 3 > nx or iy + h + 3 > ny:
            continue
        big = data[iy - h - 2:iy + h + 3, ix - h - 2:ix + h + 3].astype(np.float64)
        invalid = _invalid_pixels(big, h)
        if invalid is None:
            continue
        shifted = ndimage.shift(np.where(np.isfinite(big), big, 0.0), (iy - yc, ix - xc), order=3, mode="nearest")
        st = shifted[2:-2, 2:-2]
        mask = _neighbour_mask(xc, yc, h, neighbours, mask_px) if neighbours is not None and mask_px > 0 else None
        if invalid.any():
            mask = invalid if mask is None else mask | invalid
        if mask is not None:
            st = np.where(mask, np.nan, st)
        ring = _ring(st)
        ring = ring[np.isfinite(ring)]
        if ring.size:
            yield i, st - np.median(ring)  # residual local sky


def _invalid_pixels(big: np.ndarray, h: int) -> np.ndarray | None:
    """Stamp pixels (2h+1 square) too near a non-finite pixel of ``big`` (its 2 px wider box), or None.

    None when a non-finite pixel lies within h / 3 px of the box's centre, the star's core. The
    others are grown by 2 px: the cubic-spline shift spreads the 0 put in their place over its
    neighbours (by ~0.27 a pixel), so a stamp pixel 3 px away takes under 2 % of the error.
    Returns an all-False mask when every pixel is finite.
    """
    bad = ~np.isfinite(big)
    if not bad.any():
        return np.zeros((2 * h + 1, 2 * h + 1), bool)
    c = h + 2
    yy, xx = np.nonzero(bad)
    if np.min(np.hypot(yy - c, xx - c)) <= h / 3.0:
        return None
    return ndimage.binary_dilation(bad, iterations=2)[2:-2, 2:-2]


def _ring(stamp: np.ndarray) -> np.ndarray:
    """The outer ring of pixels of a square stamp."""
    return np.concatenate([stamp[0], stamp[-1], stamp[1:-1, 0], stamp[1:-1, -1]])


def _fit_flux_sky(stamp: np.ndarray, psf: np.ndarray) -> tuple[float, float]:
    """Least-squares flux and sky of a stamp, ``stamp = flux P + sky``, over its unmasked pixels (ADU).

    The sky rests on all the stamp's unmasked pixels, not on its outer ring alone
    (:func:`star_stamps`): the noise of the ring's median, times a wide stamp's area, was a
    pedestal of up to 7 % of the flux of a 9 px PSF stacked on 51 x 51 stamps. NaN flux when the
    fit is degenerate.
    """
    ok = np.isfinite(stamp)
    p, d = psf[ok].astype(np.float64), stamp[ok]
    n, sp, spp = float(ok.sum()), float(p.sum()), float((p * p).sum())
    det = n * spp - sp * sp
    if not det > 0:
        return float("nan"), 0.0
    sd, spd = float(d.sum()), float((p * d).sum())
    return (n * spd - sp * sd) / det, (spp * sd - sp * spd) / det


def significant_psf(psf: np.ndarray, stack: np.ndarray, nsigma: float = WING_SIGMA,
                    min_fwhm: float = WING_MIN_FWHM) -> np.ndarray:
    """A stacked PSF set to 0 from the first 1 px annulus, ``min_fwhm`` FWHM out or more, it does not measure.

    Parameters
    ----------
    psf : ndarray, shape (2h+1, 2h+1)
        The per-pixel median of ``stack``.
    stack : ndarray, shape (n, 2h+1, 2h+1)
        The flux-scaled star stamps (NaN where masked).
    nsigma : float
        An annulus whose mean is under ``nsigma`` times its error (sigma) is not measured.
    min_fwhm : float
        Annuli within this many FWHM of the centre (measured on ``psf``) are always kept.

    Returns
    -------
    ndarray, shape (2h+1, 2h+1)
        ``psf``, zero from that annulus outwards (not renormalised).

    Notes
    -----
    The error of a pixel of the median is 1.2533 x the stamps' robust spread there / sqrt(n). A
    9 px PSF on a 51 x 51 stamp stacked from 15 stars had ~1e-4 of noise per pixel beyond 1.5
    FWHM, where a Gaussian has < 0.2 % of its light: summed over ~1,500 pixels, 3-7 % of the flux
    moved from the core to noise, which left every star a residual in the difference.
    """
    h = psf.shape[0] // 2
    n = np.isfinite(stack).sum(axis=0)
    spread = np.zeros_like(psf)
    ok = n >= 2
    spread[ok] = 1.2533 * 1.4826 * np.nanmedian(np.abs(stack[:, ok] - psf[ok]), axis=0) / np.sqrt(n[ok])
    r = np.rint(np.hypot(*np.mgrid[-h:h + 1, -h:h + 1])).astype(int)
    for k in range(max(1, int(np.ceil(min_fwhm * measure_fwhm(psf)))), h + 1):
        ring = r == k
        if psf[ring].mean() < nsigma * np.sqrt((spread[ring] ** 2).sum()) / ring.sum():
            return np.where(r < k, psf, 0.0)
    return psf


def _scaled_stamps(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stamps less their fitted sky over their fitted flux (:func:`_fit_flux_sky` against a first stack).

    The first stack scales each stamp by its sum. Returns the scaled stamps with a positive flux
    and their rows in ``raw``.
    """
    first = _median_stack(raw / np.nansum(raw, axis=(1, 2))[:, None, None])
    fits = np.array([_fit_flux_sky(st, first / first.sum()) for st in raw])
    rows = np.flatnonzero(fits[:, 0] > 0)
    return (raw[rows] - fits[rows, 1, None, None]) / fits[rows, 0, None, None], rows


def _median_stack(stack: np.ndarray) -> np.ndarray:
    """Per-pixel median over stamps of the finite values (0 where every stamp is masked)."""
    finite = np.isfinite(stack)
    if finite.all():
        return np.median(stack, axis=0)
    out = np.zeros(stack.shape[1:])
    some = finite.any(axis=0)
    out[some] = np.nanmedian(stack[:, some], axis=0)
    return out


def stack_psf(
    data: np.ndarray, x: np.ndarray, y: np.ndarray, half_size: int,
    neighbours: tuple[np.ndarray, np.ndarray] | None = None, mask_px: float = 0.0,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Stack of star stamps (:func:`star_stamps`), and the stars' PSF-fit fluxes.

    Each stamp is scaled by its flux and the scaled stamps median-combined, twice: first with the
    stamp sums, then with PSF fits to that first stack over the unmasked pixels. Stamps far from
    the median stamp (cosmic ray, neighbour) are dropped.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Background-subtracted image (ADU).
    x, y : ndarray, shape (n,)
        Star centroids (px).
    half_size : int
        Stamp half-size h (px); stamps are (2h+1, 2h+1).
    neighbours, mask_px :
        Other stars' light masked out of the stamps (:func:`star_stamps`).

    Returns
    -------
    stamp : ndarray or None
        Normalised PSF (None when no star gives a clean stamp).
    flux : ndarray, shape (n,)
        PSF-fit flux of each star with the returned stamp (ADU; NaN where rejected). The fit weighs
        each pixel by the PSF, so a neighbour's light or an error of the local sky enter in
        proportion to the PSF's effective area (4 pi sigma^2 of a Gaussian), not the stamp's.
    used : ndarray of bool, shape (n,)
    """
    idx, stamps = [], []
    for i, st in star_stamps(data, x, y, half_size, neighbours, mask_px):
        if np.nansum(st) > 0:
            idx.append(i)
            stamps.append(st)
    flux, used = np.full(len(x), np.nan), np.zeros(len(x), bool)
    if not stamps:
        return None, flux, used
    raw = np.asarray(stamps)
    stack, rows = _scaled_stamps(raw)
    psf = _median_stack(stack)
    if not psf.sum() > 0:  # a neighbour's light in unmasked stamps raised their fitted skies: scale by the sums
        rows = np.arange(len(raw))
        stack = raw / np.nansum(raw, axis=(1, 2))[:, None, None]
        psf = _median_stack(stack)
    if len(stack) >= 5:
        # drop stamps unlike the median (a cosmic ray or a neighbour on the star) and re-stack.
        # The median, not an S/N^2-weighted mean: the brightest "stars" include blends and compact
        # galaxies, which broaden a weighted PSF.
        dev = np.nansum(np.abs(stack - psf), axis=(1, 2))
        ok = dev <= 3.0 * np.median(dev)
        if ok.sum() >= 3:
            stack, rows = stack[ok], rows[ok]
            psf = _median_stack(stack)
    if not rows.size or not psf.sum() > 0:
        return None, flux, used
    psf = significant_psf(psf, stack)
    psf /= psf.sum()
    kept = np.asarray(idx)[rows]
    used[kept] = True
    flux[kept] = [_fit_flux_sky(raw[r], psf)[0] for r in rows]
    return psf.astype(np.float32), flux, used


def select_psf_stars(stars: StarList, shape: tuple[int, int], half_size: int, config: PSFConfig = PSFConfig(),
                     neighbours: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Indices (into ``stars``) of isolated stars away from the edges, brightest first.

    Isolated: no other star within ``isolation_fwhm`` FWHM or the stamp half-size, among
    ``neighbours`` (positions x, y, px, of every catalogued star; ``stars`` themselves when
    omitted). A subtraction picks its PSF stars among the stars matched in both images, but masks
    every catalogued star out of the stamps (:func:`star_stamps`): a neighbour seen only in the
    sharper image, 10 px from a star isolated among the matched ones, masked the star's own core in
    the 9 px image, and its flux there came out 0.3-0.6 of the truth.
    """
    if len(stars) == 0:
        return np.zeros(0, int)
    pts = np.column_stack([stars.x, stars.y])
    tree = cKDTree(pts if neighbours is None else np.column_stack(neighbours))
    r = max(config.isolation_fwhm * stars.fwhm, half_size)
    # others within r: a star at the same position (itself, in its own catalogue) is not one
    counts = tree.query_ball_point(pts, r, return_length=True) - tree.query_ball_point(pts, 0.5, return_length=True)
    ny, nx = shape
    edge = half_size + 3
    ok = (counts == 0) & (stars.x > edge) & (stars.x < nx - edge) & (stars.y > edge) & (stars.y < ny - edge)
    return np.flatnonzero(ok)[: config.max_stars]


def build_psf(data: np.ndarray, stars: StarList, config: PSFConfig = PSFConfig(),
              half_size: int | None = None) -> PSFModel:
    """Empirical PSF from bright, isolated, unsaturated stars (stacked), or a flagged fallback.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Background-subtracted image (ADU), NaN where invalid.
    stars : StarList
        Catalogue from :func:`find_stars` (saturated stars already removed); every other star of
        it is masked out of each stamp to ``config.neighbour_mask_fwhm`` (:func:`star_stamps`).
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
        stamp, _, used = stack_psf(data, stars.x[idx], stars.y[idx], h, (stars.x, stars.y),
                                   config.neighbour_mask_fwhm * fwhm0)
        if used.sum() < config.min_stars:
            stamp = None
    if stamp is None:
        if not config.allow_fallback:
            raise PSFError(f"only {len(idx)} usable PSF stars (need {config.min_stars})")
        return PSFModel(gaussian_psf(fwhm0, h), float(fwhm0), 0, True)
    return PSFModel(stamp, measure_fwhm(stamp), int(used.sum()), False)


def embed_centred(stamp: np.ndarray, shape: tuple[int, int], dtype: DTypeLike = np.float32) -> np.ndarray:
    """Place a centred stamp in an array of ``shape``, centred on pixel (0, 0) as FFT convolution wants.

    Place a centred stamp in an array of ``shape`` with its centre at pixel (0, 0) (wrapped), as
    FFT convolution wants a kernel. The four quadrants are written straight to the corners (no
    full-frame ``np.roll``).
    """
    out = np.zeros(shape, dtype)
    h = stamp.shape[0] // 2
    st = np.asarray(stamp, dtype)
    out[:h + 1, :h + 1] = st[h:, h:]
    out[:h + 1, -h:] = st[h:, :h]
    out[-h:, :h + 1] = st[:h, h:]
    out[-h:, -h:] = st[:h, :h]
    return out


def resize_stamp(stamp: np.ndarray, half_size: int) -> np.ndarray:
    """Crop or zero-pad a centred stamp to half-size ``half_size`` and renormalise."""
    h0 = stamp.shape[0] // 2
    out = np.zeros((2 * half_size + 1,) * 2, np.float32)
    m = min(h0, half_size)
    out[half_size - m:half_size + m + 1, half_size - m:half_size + m + 1] = stamp[h0 - m:h0 + m + 1, h0 - m:h0 + m + 1]
    return out / out.sum()
