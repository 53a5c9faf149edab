"""Stamp-level artifacts modelled on the real ZTF failures, for fine-tuning.

The dev-set analysis (``docs/realbogus-report/``, "Real ZTF dev set") found the bogus that the
simulation-trained model passes: satellite and aircraft streaks crossing the stamp, and
subtraction residuals of bright, often saturated stars (rings and dipoles with a masked core).
:func:`artifact_set` composes such stamps onto simulated ones (normalised shards of
:mod:`broker.training.shards`): the streak or the residual is added in units of each channel's
noise (the normaliser's inverse, :func:`to_sigma`) and the stamp normalised again. Every stamp
made here is bogus. No real pixels are used.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from broker.candidate import CUTOUT_SIZE
from broker.normalise import NormaliseConfig

_NORM = NormaliseConfig()
_C = (CUTOUT_SIZE - 1) / 2  # the stamp's centre pixel


def to_sigma(y: np.ndarray, config: NormaliseConfig = _NORM) -> np.ndarray:
    """Normalised values back to robust sigmas: the inverse of ``k * asinh(z / k)``."""
    k = config.soft_knee
    return k * np.sinh(np.asarray(y, np.float32) / k)


def from_sigma(z: np.ndarray, config: NormaliseConfig = _NORM) -> np.ndarray:
    """Robust sigmas to normalised values (soft knee and clip of ``config``), float32."""
    k = config.soft_knee
    return np.clip(k * np.arcsinh(z / k), -config.clip, config.clip).astype(np.float32)


def streak(rng: np.random.Generator) -> np.ndarray:
    """A straight streak through (near) the centre, in sigmas: shape (63, 63).

    Gaussian cross-section of sigma 0.7-2.5 px at a random angle, passing within 2 px of the
    centre. With probability 0.7 it is a train of knots (a tumbling satellite's glints, as all
    three streaks ZTF's dev set passes): PSF-wide blobs every 4-10 px, one within 1.5 px of
    the centre, over a continuous part of 0-30 % of their peak; else continuous. Peak 1.5-12
    sigma (log-uniform: the ZTF ones are faint).
    """
    yy, xx = np.mgrid[:CUTOUT_SIZE, :CUTOUT_SIZE].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    off = rng.uniform(-2, 2)
    across = (xx - _C) * np.sin(theta) - (yy - _C) * np.cos(theta) - off
    width = rng.uniform(0.7, 2.5)
    profile = np.exp(-0.5 * (across / width) ** 2)
    if rng.random() < 0.7:
        along = (xx - _C) * np.cos(theta) + (yy - _C) * np.sin(theta) - rng.uniform(-1.5, 1.5)
        period = rng.uniform(4, 10)
        phase = (along + period / 2) % period - period / 2  # distance to the nearest knot
        knots = np.exp(-0.5 * (phase / (width * rng.uniform(0.8, 1.3))) ** 2)
        profile = profile * (rng.uniform(0, 0.3) + knots)
        profile /= max(float(profile.max()), 1e-6)
    peak = np.exp(rng.uniform(np.log(1.5), np.log(12)))
    return (peak * profile).astype(np.float32)


def star_residual(reference_sigma: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Subtraction residual of the star in a reference stamp, in difference sigmas: (63, 63).

    A dipole (the star shifted by 0.2-1 px minus itself: astrometric error) and / or a ring
    (the star blurred minus itself: PSF mismatch), both zero-sum, scaled to a peak of 5-150
    sigma (log-uniform).
    """
    star = np.clip(reference_sigma, 0, None)
    star = star / max(float(star.max()), 1e-6)
    out = np.zeros_like(star)
    kind = rng.integers(3)  # 0 dipole, 1 ring, 2 both
    if kind in (0, 2):
        shift = rng.uniform(0.2, 1.0) * np.array([np.cos(a := rng.uniform(0, 2 * np.pi)),
                                                   np.sin(a)])
        out += ndimage.shift(star, shift, order=1) - star
    if kind in (1, 2):
        out += rng.choice([-1, 1]) * (ndimage.gaussian_filter(star, rng.uniform(0.5, 1.5)) - star)
    peak = np.exp(rng.uniform(np.log(5), np.log(150)))
    return (out * peak / max(float(np.abs(out).max()), 1e-6)).astype(np.float32)


def _mask_core(x: np.ndarray, rng: np.random.Generator) -> None:
    """Zero a disk of radius 1.5-3.5 px at the centre of science and difference (in place).

    As the normaliser fills the NaNs of a masked saturated core.
    """
    yy, xx = np.mgrid[:CUTOUT_SIZE, :CUTOUT_SIZE]
    disk = (yy - _C) ** 2 + (xx - _C) ** 2 <= rng.uniform(1.5, 3.5) ** 2
    x[0][disk] = 0.0
    x[2][disk] = 0.0


def artifact_set(sim: dict[str, np.ndarray], n: int, seed: int = 0,
                 bright_centre: float = 15.0) -> dict[str, np.ndarray]:
    """``n`` bogus triplets: half streaks, half bright-star residuals, on simulated stamps.

    Parameters
    ----------
    sim : dict of ndarray
        A loaded simulated set (``x``, ``y``, ``kind``).
    n : int
    seed : int
    bright_centre : float
        Stamps whose reference has a central 5 x 5 px mean above this (normalised units; 15 is
        ~40 sigma a pixel) carry the star residuals.

    Returns
    -------
    dict
        ``x`` (n, 3, 63, 63) float16, ``y`` zeros, ``kind`` (``"streak"`` / ``"star_residual"``),
        ``group``.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(sim["x"])
    c = CUTOUT_SIZE // 2
    centre = x[:, 1, c - 2 : c + 3, c - 2 : c + 3].astype(np.float32).mean(axis=(1, 2))
    noise = np.flatnonzero((sim["y"] == 0) & (sim["kind"] == "noise"))
    noise = noise if len(noise) else np.flatnonzero(sim["y"] == 0)
    bright = np.flatnonzero(centre > bright_centre)
    bright = bright if len(bright) else np.arange(len(x))
    out = np.zeros((n, 3, CUTOUT_SIZE, CUTOUT_SIZE), np.float16)
    kinds = []
    for i in range(n):
        if i % 2 == 0:  # a streak over a noise peak, in science and difference
            z = to_sigma(x[rng.choice(noise)])
            s = streak(rng)
            z[0] += s
            z[2] += s
            kinds.append("streak")
        else:  # a bright star of the set, its difference a residual over a noise peak's
            z = to_sigma(x[rng.choice(bright)])
            z[2] = to_sigma(x[rng.choice(noise), 2]) + star_residual(z[1], rng)
            kinds.append("star_residual")
        t = from_sigma(z)
        if kinds[-1] == "star_residual" and rng.random() < 0.4:
            _mask_core(t, rng)
        out[i] = t
    return {"x": out, "y": np.zeros(n, np.uint8), "kind": np.array(kinds),
            "group": np.array([f"A{i // 256}" for i in range(n)])}
