"""Square cutouts around candidates, NaN-padded at frame edges."""

from __future__ import annotations

import numpy as np

from broker.candidate import CUTOUT_SIZE


def cutout(image: np.ndarray, x: float, y: float, size: int = CUTOUT_SIZE) -> np.ndarray:
    """``size`` x ``size`` float32 stamp centred on the pixel nearest to (x, y).

    A plain slice pasted into a NaN stamp: ``astropy.nddata.Cutout2D`` gives the same pixels
    but costs ~0.1 ms of bookkeeping per call, 0.2 s for the ~900 triplets of a crowded frame.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
    x, y : float
        Centre (px, 0-based). For even ``size`` the centre pixel is at index ``size // 2``.

    Returns
    -------
    ndarray, shape (size, size), float32
        NaN where the stamp falls outside ``image``.
    """
    out = np.full((size, size), np.nan, np.float32)
    if not (np.isfinite(x) and np.isfinite(y)):
        return out
    ny, nx = image.shape
    x0 = int(np.round(x)) - size // 2
    y0 = int(np.round(y)) - size // 2
    xa, xb, ya, yb = max(x0, 0), min(x0 + size, nx), max(y0, 0), min(y0 + size, ny)
    if xa < xb and ya < yb:
        out[ya - y0:yb - y0, xa - x0:xb - x0] = image[ya:yb, xa:xb]
    return out


def triplet(science: np.ndarray, reference: np.ndarray, difference: np.ndarray, x: float, y: float,
            size: int = CUTOUT_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Science, reference and difference cutouts at one position (same pixel grid)."""
    return cutout(science, x, y, size), cutout(reference, x, y, size), cutout(difference, x, y, size)
