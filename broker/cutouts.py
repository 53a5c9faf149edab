"""Square cutouts around candidates, NaN-padded at frame edges."""

from __future__ import annotations

import numpy as np
from astropy.nddata import Cutout2D
from astropy.nddata.utils import NoOverlapError

from broker.candidate import CUTOUT_SIZE


def cutout(image: np.ndarray, x: float, y: float, size: int = CUTOUT_SIZE) -> np.ndarray:
    """``size`` x ``size`` float32 stamp centred on the pixel nearest to (x, y).

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
    x, y : float
        Centre (px, 0-based).

    Returns
    -------
    ndarray, shape (size, size), float32
        NaN where the stamp falls outside ``image``.
    """
    pos = (int(np.round(x)), int(np.round(y)))
    try:
        c = Cutout2D(np.asarray(image, dtype=np.float32), pos, (size, size), mode="partial",
                     fill_value=np.nan, copy=True)
        return np.asarray(c.data, dtype=np.float32)
    except NoOverlapError:
        return np.full((size, size), np.nan, np.float32)


def triplet(science: np.ndarray, reference: np.ndarray, difference: np.ndarray, x: float, y: float,
            size: int = CUTOUT_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Science, reference and difference cutouts at one position (same pixel grid)."""
    return cutout(science, x, y, size), cutout(reference, x, y, size), cutout(difference, x, y, size)
