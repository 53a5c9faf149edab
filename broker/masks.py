"""Bad-pixel masks: saturated regions and the dilation of masked regions.

:func:`saturated_mask` marks pixels above a fraction of the saturation level and grows each
saturated region by a margin plus a multiple of its own size (bleed, non-linear wings);
:func:`grow_regions` and :func:`grow_square` dilate masks at a cost that follows the masked area
rather than the frame size.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def grow_regions(mask: np.ndarray, radius: float | np.ndarray) -> np.ndarray:
    """Dilate each connected region of ``mask`` by a disc (radius in px, scalar or per label 1..n).

    Works on each region's bounding box, so the cost follows the masked area, not the frame size.

    Parameters
    ----------
    mask : ndarray of bool, shape (ny, nx)
    radius : float or ndarray, shape (n + 1,)
        Disc radius (px), one for all regions or one per label (index 0, the background, unused).

    Returns
    -------
    ndarray of bool, shape (ny, nx)
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
        g = int(np.ceil(min(r, ny + nx)))  # a disc that wide covers the frame (inf was an OverflowError)
        y0, y1 = max(sl[0].start - g, 0), min(sl[0].stop + g, ny)
        x0, x1 = max(sl[1].start - g, 0), min(sl[1].stop + g, nx)
        sub = labels[y0:y1, x0:x1] == i
        out[y0:y1, x0:x1] |= ndimage.distance_transform_edt(~sub) <= r
    return out


def saturated_mask(data: np.ndarray, saturation: float, fraction: float, grow_px: float,
                   grow_size: float) -> np.ndarray:
    """Saturated pixels, each region grown by ``grow_px`` + ``grow_size`` x its own radius.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Raw image (ADU), NaN where invalid.
    saturation : float
        Saturation level (ADU); not finite: nothing is saturated.
    fraction : float
        Pixels at or above ``fraction x saturation`` are saturated (dimensionless).
    grow_px : float
        Margin added around every saturated region (px).
    grow_size : float
        Further margin in units of the region's equivalent radius sqrt(area / pi) (dimensionless):
        brighter stars have bigger wings.

    Returns
    -------
    ndarray of bool, shape (ny, nx)
    """
    if not np.isfinite(saturation):
        return np.zeros(data.shape, bool)
    with np.errstate(invalid="ignore"):
        sat = data >= fraction * saturation
    if not sat.any():
        return sat
    labels, n = ndimage.label(sat)
    area = np.bincount(labels.ravel(), minlength=n + 1).astype(float)
    radius = grow_px + grow_size * np.sqrt(area / np.pi)
    radius[0] = 0.0
    return grow_regions(sat, radius)


def grow_square(mask: np.ndarray, radius: float) -> np.ndarray:
    """Dilate by a (2r+1)-px square, r = ceil(radius) (px).

    Sparse masks (the usual: a few hundred cosmic-ray holes and saturated cores) are dilated by
    writing each offset of the square at the masked pixels' coordinates, which costs
    n_masked x (2r+1)^2 instead of a frame-wide filter; dense ones use the separable max filter.

    Parameters
    ----------
    mask : ndarray of bool, shape (ny, nx)
    radius : float
        Half-side of the square (px); <= 0 leaves the mask as it is, at least the frame's larger side
        (inf included) masks it all.

    Returns
    -------
    ndarray of bool, shape (ny, nx)
    """
    if radius <= 0 or not mask.any():
        return mask
    r = int(np.ceil(min(radius, max(mask.shape))))  # a wider square covers the frame from any pixel
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
