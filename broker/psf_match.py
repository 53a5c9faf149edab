"""PSF matching of a science frame and its aligned reference: PSFs stacked from the same stars.

:func:`common_psfs` stacks both PSFs from the same matched stars at the same (science) positions,
so that they share the centring errors, and gives the stars' flux ratios. When the PSF varies
across the field, :func:`tile_psfs` does the same per tile (:class:`Tile`), after
:func:`tile_fwhm_span` has measured the variation cheaply on single stars.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from broker.psf import resize_stamp, stack_psf
from broker.stars import star_fwhms


@dataclass(frozen=True)
class StackPlan:
    """How the science and reference PSFs are stacked (:func:`common_psfs`).

    Attributes
    ----------
    half_sizes : (int, int)
        Half-sizes (px) of the science and reference stacks, each from its own FWHM and at most the
        common stamp's: a PSF stacked on a stamp sized for the other image's much wider one is
        mostly noise.
    neighbours : (ndarray, ndarray) or None
        Positions (x, y; px) of every catalogued star, masked out of the stamps
        (:func:`broker.psf.star_stamps`); None: no masks.
    mask_px : (float, float)
        The masks' radii in the science and the reference (px).
    """

    half_sizes: tuple[int, int]
    neighbours: tuple[np.ndarray, np.ndarray] | None = None
    mask_px: tuple[float, float] = (0.0, 0.0)


def common_psfs(N: np.ndarray, R: np.ndarray, x: np.ndarray, y: np.ndarray, h: int, min_stars: int,
                plan: StackPlan | None = None) -> tuple[np.ndarray | None, np.ndarray | None, int, np.ndarray]:
    """Science and reference PSFs stacked from the same stars, and the stars' flux ratios.

    Science and reference PSFs stacked from the same stars at the same (science) positions, so
    that both share the centring errors, and the stars' reference / science flux ratios from
    PSF fits with them (:func:`broker.psf.stack_psf`).

    Parameters
    ----------
    N, R : ndarray, shape (ny, nx)
        Background-subtracted science and aligned reference (ADU).
    x, y : ndarray, shape (n,)
        Star positions (px), isolated within ``h``.
    h : int
        Half-size of the returned stamps (px); stars need a clean stamp of it in both images.
    min_stars : int
        Stars clean in both below which no PSF is returned (count).
    plan : StackPlan, optional
        The stacks' half-sizes and masks; both at ``h`` without masks when omitted.

    Returns
    -------
    P_n, P_r : ndarray, shape (2h+1, 2h+1), or None
        None when fewer than ``min_stars`` stars give clean stamps in both images.
    n : int
        Stars in both stacks.
    ratio : ndarray
        Reference / science PSF-fit flux of each star in both stacks (empty when no PSF is returned).
    """
    plan = plan if plan is not None else StackPlan((h, h))
    _, _, us = stack_psf(N, x, y, h)
    _, _, ur = stack_psf(R, x, y, h)
    both = us & ur
    if both.sum() < max(min_stars, 1):
        return None, None, int(both.sum()), np.zeros(0)
    (h_n, h_r), (m_n, m_r) = plan.half_sizes, plan.mask_px
    ps, fs, us = stack_psf(N, x[both], y[both], min(h_n, h), plan.neighbours, m_n)
    pr, fr, ur = stack_psf(R, x[both], y[both], min(h_r, h), plan.neighbours, m_r)
    if ps is None or pr is None:
        return None, None, int(both.sum()), np.zeros(0)
    ok = us & ur & (fs > 0) & (fr > 0)
    return resize_stamp(ps, h), resize_stamp(pr, h), int(both.sum()), fr[ok] / fs[ok]


@dataclass(frozen=True)
class Tile:
    """A rectangle of the frame (rows y0:y1, columns x0:x1) with its PSFs and ZOGY PSF of D.

    ``P_D``, ``F_D`` and ``fwhm_D`` (px) are set once ZOGY has run on the tile.
    """

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
        """The tile's rows and columns, as slices of the frame."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def relative_span(values: list[float]) -> float:
    """(max - min) / median of ``values`` (NaN if any is NaN)."""
    return float(np.ptp(values) / np.median(values))


def tile_boxes(shape: tuple[int, int], tile_px: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of tiles of about ``tile_px`` covering the frame."""
    edges_y = np.linspace(0, shape[0], max(1, round(shape[0] / tile_px)) + 1).astype(int)
    edges_x = np.linspace(0, shape[1], max(1, round(shape[1] / tile_px)) + 1).astype(int)
    return [(int(y0), int(y1), int(x0), int(x1)) for y0, y1 in zip(edges_y[:-1], edges_y[1:], strict=True)
            for x0, x1 in zip(edges_x[:-1], edges_x[1:], strict=True)]


def tile_stars(x: np.ndarray, y: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Indices of the stars within a quarter tile of ``box``."""
    y0, y1, x0, x1 = box
    my, mx = (y1 - y0) // 4, (x1 - x0) // 4
    return np.flatnonzero((x >= x0 - mx) & (x < x1 + mx) & (y >= y0 - my) & (y < y1 + my))


def tile_fwhm_span(N: np.ndarray, R: np.ndarray, x: np.ndarray, y: np.ndarray,
                   boxes: list[tuple[int, int, int, int]]) -> float:
    """Largest spread over tiles of the tiles' median star FWHM, in either image.

    Largest spread over tiles, (max - min) / median, of the tiles' median star FWHM in the
    science or the reference image.

    Half-maximum widths of single stars (:func:`broker.stars.star_fwhms`, ~10 us a star) decide
    whether per-tile PSFs are needed at all; stacking them for every tile would cost ~0.15 s of a
    2k x 2k frame whose PSF does not vary. NaN when a tile has fewer than 5 measured stars.
    """
    spans = []
    for img in (N, R):
        fw = star_fwhms(img, x, y)
        per_tile = [np.nanmedian(fw[sel]) if np.isfinite(fw[sel]).sum() >= 5 else np.nan
                    for sel in (tile_stars(x, y, box) for box in boxes)]
        spans.append(relative_span(per_tile))
    return max(spans)


def tile_psfs(N: np.ndarray, R: np.ndarray, x: np.ndarray, y: np.ndarray, h: int, whole: Tile,
              tile_px: int, max_stars: int, min_stars: int, plan: StackPlan | None = None) -> list[Tile]:
    """Tiles of about ``tile_px`` with PSFs from the stars in and around each.

    Tiles of about ``tile_px`` (px) with PSFs from the stars (x, y: isolated, brightest first)
    within a quarter tile of each, at most ``max_stars`` of them; a tile with fewer than
    ``min_stars`` clean stars keeps the frame's PSFs (``whole``); ``plan`` as in :func:`common_psfs`.
    """
    tiles = []
    for box in tile_boxes(N.shape, tile_px):
        sel = tile_stars(x, y, box)[:max_stars]
        P_n, P_r, n, _ = common_psfs(N, R, x[sel], y[sel], h, min_stars, plan)
        if P_n is None or P_r is None:
            P_n, P_r, n = whole.P_n, whole.P_r, whole.n_stars
        tiles.append(Tile(*box, P_n, P_r, n))
    return tiles
