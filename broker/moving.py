"""Moving objects: linking single detections that move in a straight line between epochs.

An asteroid is a new object at every epoch: each of its detections lands away from the last and
starts an object of one detection (an "orphan"). :func:`link_tracklet` takes a new detection and
the recent orphans around it (:meth:`broker.history.ObjectHistory.recent_orphans`) and looks for a
tracklet: this detection plus at least two earlier ones at distinct times, on one line travelled
at constant speed (within ``MovingConfig.tolerance_arcsec``) and at a speed in the configured range.

:func:`link_from_history` does both for the score stage: after the frame's association, for a
detection whose object has one detection (``Candidate.obj.ndet == 1``; one that joined a known
object is not moving). The current frame's own detections are never among the orphans (only
earlier MJDs are), and a tracklet stays a set of one-detection objects: each later detection of the
mover links to the earlier ones again.

Pure numpy; positions are projected on the tangent plane at the new detection (gnomonic), where a
great circle is a straight line and uniform motion along it is close to uniform for short arcs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from broker.errors import ConfigError

if TYPE_CHECKING:
    from broker.history import ObjectHistory


@dataclass(frozen=True)
class MovingConfig:
    """Settings of tracklet linking.

    Attributes
    ----------
    min_speed_arcsec_day : float
        Slowest motion linked (arcsec/day); 5: below, a few arcsec in a night, the detections
        associate with one object instead (the association radius is 1.5") and the motion is
        lost in the position errors. Main-belt asteroids at opposition move ~900"/day, TNOs ~3"/day.
    max_speed_arcsec_day : float
        Fastest motion linked (arcsec/day); 3600 (1 deg/day): near-Earth objects faster than this
        trail within a 60 s exposure anyway, and the search area grows as its square.
    tolerance_arcsec : float
        Largest distance of a detection from the fitted uniform motion (arcsec); 2: position errors
        (<~0.3" at S/N > 5 and 1"/px) plus the curvature of real orbits over a few days.
    window_days : float
        Orphans older than this (days before the new detection) are not considered; 3 epochs of a
        nightly cadence. Also the ``days`` to give ``recent_orphans``.
    min_dt_days : float
        Two detections closer in time than this (days, above 0) are not distinct epochs (0.01 =
        14 min); epochs are counted in its units (0 was a ZeroDivisionError on every candidate).
    max_orphans : int
        At most this many orphans (the most recent) enter the pair search, which grows as their
        square (count); 400.
    """

    min_speed_arcsec_day: float = 5.0
    max_speed_arcsec_day: float = 3600.0
    tolerance_arcsec: float = 2.0
    window_days: float = 3.0
    min_dt_days: float = 0.01
    max_orphans: int = 400

    def __post_init__(self) -> None:
        if not self.min_dt_days > 0.0:
            raise ConfigError(f"min_dt_days must be above 0, not {self.min_dt_days}")

    def search_radius_deg(self) -> float:
        """Radius around the new detection holding every orphan it could link to (deg)."""
        return self.max_speed_arcsec_day * self.window_days / 3600.0


@dataclass(frozen=True)
class Tracklet:
    """A linked tracklet.

    Attributes
    ----------
    speed_arcsec_day : float
        Fitted sky speed (arcsec/day).
    cand_ids : tuple of str
        The earlier detections linked to the new one, oldest first.
    rms_arcsec : float
        RMS distance of the detections (the new one included) from the fitted motion (arcsec).
    """

    speed_arcsec_day: float
    cand_ids: tuple[str, ...]
    rms_arcsec: float


def tangent_plane(ra0: float, dec0: float, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic projection of (ra, dec) (deg) about (ra0, dec0): (xi, eta) in arcsec (east, north).

    Points 90 deg or more away (and non-finite inputs) come out NaN.
    """
    a0, d0 = math.radians(ra0), math.radians(dec0)
    a, d = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    cosc = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a - a0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = cosc > 0
        cosc = np.where(ok, cosc, np.nan)
        xi = np.cos(d) * np.sin(a - a0) / cosc
        eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc
    scale = 180.0 / math.pi * 3600.0
    return xi * scale, eta * scale


def _fit(t: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares uniform motion through (t, x, y): (speed arcsec/day, rms residual arcsec)."""
    design = np.column_stack([np.ones_like(t), t - t.mean()])
    cx, *_ = np.linalg.lstsq(design, x, rcond=None)
    cy, *_ = np.linalg.lstsq(design, y, rcond=None)
    res = np.hypot(x - design @ cx, y - design @ cy)
    return float(np.hypot(cx[1], cy[1])), float(np.sqrt(np.mean(res ** 2)))


def _candidates(mjd: float, x: np.ndarray, y: np.ndarray, t: np.ndarray, config: MovingConfig) -> np.ndarray:
    """Indices of the orphans reachable from the new detection (at the origin, time ``mjd``)."""
    dt = mjd - t
    with np.errstate(invalid="ignore", divide="ignore"):
        speed = np.hypot(x, y) / dt
    slack = config.tolerance_arcsec / np.maximum(dt, config.min_dt_days)
    ok = (np.isfinite(speed) & (dt >= config.min_dt_days) & (dt <= config.window_days)
          & (speed >= config.min_speed_arcsec_day - slack) & (speed <= config.max_speed_arcsec_day + slack))
    idx = np.flatnonzero(ok)
    return idx[np.argsort(dt[idx], kind="stable")][: config.max_orphans]


def link_tracklet(ra: float, dec: float, mjd: float, orphan_ra: np.ndarray, orphan_dec: np.ndarray,
                  orphan_mjd: np.ndarray, orphan_ids: list[str] | tuple[str, ...],
                  config: MovingConfig = MovingConfig()) -> Tracklet | None:
    """The tracklet a new detection completes with earlier orphans, or None.

    Every pair of orphans (i, j) at distinct times, with the new detection, predicts j from the
    motion new -> i; pairs predicted within ``tolerance_arcsec`` are fitted with a uniform motion
    (least squares). The best fit (smallest RMS) whose points all lie within the tolerance and
    whose speed is in range wins, with every other orphan on that motion added to it.

    Parameters
    ----------
    ra, dec : float
        The new detection (deg).
    mjd : float
        Its time (MJD, days).
    orphan_ra, orphan_dec, orphan_mjd : ndarray, shape (n,)
        Earlier single detections (deg, deg, MJD); later or simultaneous ones are ignored.
    orphan_ids : sequence of str, length n
        Their candidate ids.
    config : MovingConfig

    Returns
    -------
    Tracklet or None
        None when nothing links (fewer than 2 usable orphans, non-finite inputs included).
    """
    if not (math.isfinite(ra) and math.isfinite(dec) and math.isfinite(mjd) and -90.0 <= dec <= 90.0):
        return None
    t_all = np.asarray(orphan_mjd, float)
    if len(t_all) < 2 or not (len(orphan_ra) == len(orphan_dec) == len(t_all) == len(orphan_ids)):
        return None
    x_all, y_all = tangent_plane(ra, dec, orphan_ra, orphan_dec)
    idx = _candidates(mjd, x_all, y_all, t_all, config)
    if len(idx) < 2:
        return None
    x, y, t = x_all[idx], y_all[idx], t_all[idx] - mjd  # the new detection at (0, 0, 0)
    vx, vy = x / t, y / t  # velocity of the motion new -> i
    # position of j predicted by the motion through i: (n_i, n_j)
    px, py = vx[:, None] * t[None, :], vy[:, None] * t[None, :]
    miss = np.hypot(px - x[None, :], py - y[None, :])
    distinct = np.abs(t[:, None] - t[None, :]) >= config.min_dt_days
    pairs = np.argwhere(distinct & (miss <= config.tolerance_arcsec))
    best: Tracklet | None = None
    for i in np.unique(pairs[:, 0]):  # the motion depends on i alone; j only confirms it
        members = _members(x, y, t, vx[i], vy[i], config)
        if len(members) < 2 or len({round(v / config.min_dt_days) for v in t[members]}) < 2:
            continue
        tt, xx, yy = np.append(t[members], 0.0), np.append(x[members], 0.0), np.append(y[members], 0.0)
        speed, rms = _fit(tt, xx, yy)
        if not config.min_speed_arcsec_day <= speed <= config.max_speed_arcsec_day or rms > config.tolerance_arcsec:
            continue
        if best is None or len(members) > len(best.cand_ids) or (
                len(members) == len(best.cand_ids) and rms < best.rms_arcsec):
            order = members[np.argsort(t[members], kind="stable")]
            best = Tracklet(speed, tuple(str(orphan_ids[int(idx[k])]) for k in order), rms)
    return best


def _members(x: np.ndarray, y: np.ndarray, t: np.ndarray, vx: float, vy: float, config: MovingConfig) -> np.ndarray:
    """Orphans on the motion (vx, vy) through the origin, one per epoch (the nearest), as indices."""
    miss = np.hypot(x - vx * t, y - vy * t)
    near = np.flatnonzero(miss <= config.tolerance_arcsec)
    keep: dict[int, int] = {}
    for k in near[np.argsort(miss[near], kind="stable")]:
        keep.setdefault(round(float(t[k]) / config.min_dt_days), int(k))
    return np.array(sorted(keep.values()), int)


def link_from_history(history: ObjectHistory, ra: float, dec: float, mjd: float,
                      config: MovingConfig = MovingConfig()) -> Tracklet | None:
    """The tracklet of a new detection at (ra, dec) (deg), ``mjd`` (MJD) among the history's recent orphans.

    :meth:`~broker.history.ObjectHistory.recent_orphans` within :meth:`MovingConfig.search_radius_deg`
    and ``config.window_days``, then :func:`link_tracklet`. None for non-finite input.
    """
    o_ra, o_dec, o_mjd, o_ids = history.recent_orphans(ra, dec, mjd, config.search_radius_deg(), config.window_days)
    return link_tracklet(ra, dec, mjd, o_ra, o_dec, o_mjd, o_ids, config)
