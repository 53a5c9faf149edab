"""Whether two frames hold one exposure: the same pixels, re-sent, re-compressed, offset or scaled.

A reference made of the frame's own exposure measures nothing: their difference has no noise.
The subtraction refuses such a pair from its statistics (:func:`broker.subtract.check_independent_noise`),
but only when the reference is that exposure alone; a reference keeps a :class:`Fingerprint` of each
of its frames, so that a frame re-sent under another id is known as one of them
(:func:`broker.pipeline.process_frame`), and two copies of one exposure never build one reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Pixels an exposure's fingerprint keeps (count), on a regular grid: 4096 float32 (16 KiB). Two
#: exposures differ by more than :data:`SAME_WITHIN_SIGMA` at ~70 % of the pixels (their noise
#: differs by sqrt(2) sigma rms), so a few hundred would tell them apart.
FINGERPRINT_PIXELS = 4096

#: Two frames are one exposure when a straight line (gain, pedestal) maps one's pixels onto the
#: other's to within this many sigma of the pixel noise at every compared pixel (sigma). fpack's
#: default quantisation keeps each pixel to ~1/16 sigma.
SAME_WITHIN_SIGMA = 0.5


def pixel_noise(data: np.ndarray) -> float:
    """Pixel-to-pixel noise of an image (ADU): 1.4826 MAD of horizontal neighbour differences / sqrt(2).

    Taken on every 4th row; sky gradients and sources change little from one pixel to the next, so
    this is the noise even of a vignetted or crowded frame. NaN when no pair of neighbours is finite.
    """
    rows = np.asarray(data, np.float64)[::4]
    d = (rows[:, 1:] - rows[:, :-1]).ravel()
    d = d[np.isfinite(d)]
    if not d.size:
        return float("nan")
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def same_exposure(a: np.ndarray, b: np.ndarray, noise: float, within: float = SAME_WITHIN_SIGMA) -> bool:
    """Whether ``b`` is ``a`` up to a gain and a pedestal and ``within`` sigma of noise at every pixel.

    Parameters
    ----------
    a, b : ndarray, same shape
        Pixels of two frames (ADU), NaN where invalid (left out).
    noise : float
        Pixel noise of ``a`` (ADU; :func:`pixel_noise`).
    within : float
        Largest residual allowed (sigma).

    Returns
    -------
    bool
        False for other shapes, fewer than 16 pixels finite in both, or a noise that is not a
        positive number (a constant frame is no exposure to recognise).
    """
    if a.shape != b.shape or not (noise > 0):
        return False
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    both = np.isfinite(x) & np.isfinite(y)
    if both.sum() < 16:
        return False
    x, y = x[both], y[both]
    if np.array_equal(x, y):
        return True
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    if not sxx > 0:
        return False
    gain = float(((x - xm) * (y - ym)).sum()) / sxx
    if not gain > 0:
        return False
    # residuals in the units of a: b / gain against a
    resid = (y - ym) / gain - (x - xm)
    return float(np.max(np.abs(resid))) < within * noise


@dataclass(frozen=True)
class Fingerprint:
    """An exposure's pixels on a regular grid, enough to recognise it again.

    Attributes
    ----------
    shape : (int, int)
        The frame's shape (ny, nx).
    step : int
        Grid step (px) in both axes, from pixel (0, 0).
    pixels : ndarray, shape (ceil(ny / step) * ceil(nx / step),), float32
        The pixels (ADU), NaN where invalid.
    noise : float
        The frame's pixel noise (ADU; :func:`pixel_noise`).
    """

    shape: tuple[int, int]
    step: int
    pixels: np.ndarray
    noise: float

    @classmethod
    def of(cls, data: np.ndarray, points: int = FINGERPRINT_PIXELS) -> Fingerprint:
        """The fingerprint of a frame's pixels ``data`` (ny, nx), at most about ``points`` of them."""
        ny, nx = data.shape
        step = max(1, int(np.ceil(np.sqrt(ny * nx / points))))
        return cls((ny, nx), step, np.asarray(data, np.float32)[::step, ::step].ravel().copy(), pixel_noise(data))

    def matches(self, data: np.ndarray) -> bool:
        """Whether a frame's pixels ``data`` are this exposure (:func:`same_exposure` on the grid)."""
        if tuple(data.shape) != tuple(self.shape):
            return False
        return same_exposure(self.pixels, np.asarray(data, np.float32)[::self.step, ::self.step].ravel(), self.noise)
