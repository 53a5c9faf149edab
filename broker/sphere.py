"""Positions on the celestial sphere as unit vectors: the arithmetic of sky cross-matches.

A KD-tree over unit vectors finds neighbours by chord length (:func:`chord`), which is monotonic in
the angle, so the matchers (:mod:`broker.context`, :mod:`broker.watchlist`) search by chord and
measure the angle (:func:`separation_arcsec`) of what they find.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["unit_vectors", "chord", "separation_arcsec"]


def unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Unit vectors, shape (n, 3), of positions (``ra``, ``dec``: deg, shape (n,))."""
    a, d = np.radians(ra), np.radians(dec)
    return np.column_stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])


def chord(arcsec: float) -> float:
    """Chord length on the unit sphere of an angle [arcsec] (angles past 180 deg as 180 deg)."""
    return 2.0 * math.sin(min(math.radians(arcsec / 3600.0), math.pi) / 2.0)


def separation_arcsec(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Angles [arcsec] between unit vectors, shape (n, 3) and (3,) or (n, 3)."""
    return np.degrees(2.0 * np.arcsin(np.clip(np.linalg.norm(u - v, axis=-1) / 2.0, 0.0, 1.0))) * 3600.0
