"""Pixel neighbourhoods: index arrays of the boxes around a set of pixels."""

from __future__ import annotations

import numpy as np


def box_indices(shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, half: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices, shape (n, (2 half + 1)^2), of the box around each pixel (clipped)."""
    d = np.arange(-half, half + 1)
    dy, dx = (a.ravel() for a in np.meshgrid(d, d, indexing="ij"))
    return (np.clip(ys[:, None] + dy, 0, shape[0] - 1), np.clip(xs[:, None] + dx, 0, shape[1] - 1))
