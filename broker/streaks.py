"""Satellite trails among the detections of one image: dense runs of collinear sources.

A bright satellite trail, a glinting satellite's train of knots or a bleed column breaks into a
row of local maxima, each of which a star finder reports as a source. In a simulated frame at
5.7 px seeing crossed by four bright trails, 27 of the 30 brightest "stars" were trail segments,
and the star list's seeing read 8.1 px (5.9 px without them). :func:`collinear_runs` finds such
rows: at least ``min_points`` sources, each within ``tolerance`` px of one line and within a gap
of the next along it, the gap set by the density of the sources so that stars rarely line up
that way by chance (see the function). The star lists of :func:`broker.stars.find_stars` leave
them out.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

#: Most sources searched (count): the pipeline cuts a frame's candidates at 500 and star lists at
#: 400; beyond this the search's cost (pairs times sources) is not bounded, and none is made.
MAX_SOURCES = 5000


def collinear_runs(x: np.ndarray, y: np.ndarray, area: float, tolerance: float = 1.0, max_gap: float = 100.0,
                   min_points: int = 8, chance_step: float = 0.05) -> np.ndarray:
    """Which sources belong to a dense run of collinear sources.

    Pairs of sources between ``gap / 3`` and ``gap`` apart define lines (a run of ``min_points``
    holds such pairs whenever its members are spaced under ``gap / 3``). Along each line, the
    sources within ``2 tolerance`` are split where consecutive ones lie more than ``gap`` apart,
    the line is refitted to the piece holding the pair (its principal axis) and the sources
    within ``tolerance`` of the fit taken, twice; the piece is a run with ``min_points`` or more.

    By chance: with n sources over an area A, the next source of a run lies in the band ahead
    (``2 tolerance`` wide, ``gap`` long) with probability p = 2 tolerance gap n / A. The gap is
    ``max_gap``, or less where needed to keep p at ``chance_step``; a chance run of 8 then needs 6
    such steps, p^6 = 1.6e-8 per pair. A is ``area``, or the sources' bounding box grown by
    ``max_gap`` when that is smaller: 2,000 sources crowded in 300^2 px of a frame claimed to be
    huge took 78 s and gave 68 chance runs; the gap is now 2 px there, none in 0.1 s. More than
    :data:`MAX_SOURCES` sources are not searched. On 400 sources over 1024^2 px the gap is 66 px, over
    2048^2 px ``max_gap``; on a crowded 256^2 px stamp it is 4 px, and only unbroken trails are found.

    Parameters
    ----------
    x, y : ndarray, shape (n,)
        Source positions (px).
    area : float
        Area the sources were searched on (px^2; the image's pixel count).
    tolerance : float
        Largest distance of a run's member from its line (px). Default 1.0: the trail segments of
        ``find_stars`` lie within 0.8 px of their trail's centre line (bright trails at 5.7 px
        seeing); those of faint trails scatter more and some are kept.
    max_gap : float
        Largest distance between consecutive members along the line (px). Default 100:
        ``find_stars`` reports a bright trail's local maxima every 5-30 px, and the cut to the
        brightest sources leaves gaps of up to ~100 px.
    min_points : int
        Least members of a run. Default 8.
    chance_step : float
        Largest chance p of one step (above). Default 0.05.

    Returns
    -------
    ndarray of bool, shape (n,)
        True for members of a run.
    """
    member = np.zeros(len(x), bool)
    for run in find_runs(x, y, area, tolerance, max_gap, min_points, chance_step):
        member[run] = True
    return member


def find_runs(x: np.ndarray, y: np.ndarray, area: float, tolerance: float = 1.0, max_gap: float = 100.0,
              min_points: int = 8, chance_step: float = 0.05) -> list[np.ndarray]:
    """The dense runs of collinear sources, each as its sources' indices (see :func:`collinear_runs`).

    Returns
    -------
    list of ndarray of int
        Disjoint runs, each sorted along its line. A run found again from another pair joins the
        one it shares most sources with; where two lines cross, the shared sources stay with the
        first run found. Sources at non-finite positions are in none.
    """
    xy = np.column_stack([np.asarray(x, float), np.asarray(y, float)])
    finite = np.flatnonzero(np.isfinite(xy).all(axis=1))
    if len(finite) < len(xy):  # a position that is not a number is on no line
        return [finite[r] for r in find_runs(xy[finite, 0], xy[finite, 1], area, tolerance, max_gap, min_points,
                                             chance_step)]
    owner = np.full(len(xy), -1)
    if not min_points <= len(xy) <= MAX_SOURCES or not area > 0:
        return []
    spread = float(np.prod(np.ptp(xy, axis=0) + 2.0 * max_gap))  # their bounding box, grown by max_gap
    gap = min(max_gap, chance_step * min(area, spread) / (2.0 * tolerance * len(xy)))
    pairs = cKDTree(xy).query_pairs(gap, output_type="ndarray")
    length = np.hypot(*(xy[pairs[:, 1]] - xy[pairs[:, 0]]).T) if len(pairs) else np.zeros(0)
    pairs = pairs[length >= gap / 3.0]
    runs: list[np.ndarray] = []
    for i, j in pairs[_enough_near(xy, pairs, 2.0 * tolerance, min_points * gap, min_points)]:
        if owner[i] >= 0 and owner[i] == owner[j]:
            continue  # already in a run found from another pair
        run = _run_through(xy, i, j, tolerance, gap)
        if len(run) < min_points:
            continue
        shared = owner[run][owner[run] >= 0]
        if len(shared) * 2 >= len(run):  # the same line again: extend the run that holds most of it
            k = int(np.bincount(shared).argmax())
            runs[k] = np.union1d(runs[k], run[owner[run] < 0])
        else:  # a new line (it may cross others)
            k, runs = len(runs), runs + [run[owner[run] < 0]]
        owner[runs[k]] = k
    return [_along(xy, r) for r in runs]


def _along(xy: np.ndarray, run: np.ndarray) -> np.ndarray:
    """``run`` sorted along its principal axis."""
    pts = xy[run] - xy[run].mean(axis=0)
    return run[np.argsort(pts @ np.linalg.svd(pts, full_matrices=False)[2][0], kind="stable")]


def _enough_near(xy: np.ndarray, pairs: np.ndarray, width: float, reach: float, min_points: int,
                 chunk: int = 256) -> np.ndarray:
    """Whether ``min_points`` sources lie within ``width`` of each pair's line and ``reach`` of its first source.

    A necessary condition for a run through the pair, tested for all pairs at once so that only
    the few that pass are searched one by one.
    """
    keep = np.zeros(len(pairs), bool)
    for s in range(0, len(pairs), chunk):
        i, j = pairs[s:s + chunk, 0], pairs[s:s + chunk, 1]
        d = xy[j] - xy[i]
        u = d / np.hypot(d[:, 0], d[:, 1])[:, None]
        rel = xy[None, :, :] - xy[i][:, None, :]  # (pairs, n, 2)
        along = rel[..., 0] * u[:, None, 0] + rel[..., 1] * u[:, None, 1]
        perp = rel[..., 0] * u[:, None, 1] - rel[..., 1] * u[:, None, 0]
        keep[s:s + chunk] = np.count_nonzero((np.abs(perp) <= width) & (np.abs(along) <= reach), axis=1) >= min_points
    return keep


def _run_through(xy: np.ndarray, i: int, j: int, tolerance: float, gap: float) -> np.ndarray:
    """Indices of the sources on the line through sources i and j, in the gap-free piece holding i."""
    centre, u = xy[i], (xy[j] - xy[i]) / np.hypot(*(xy[j] - xy[i]))
    run = _piece(xy, i, centre, u, 2.0 * tolerance, gap)
    for _ in range(2):
        if len(run) < 3:
            break
        centre = xy[run].mean(axis=0)
        u = np.linalg.svd(xy[run] - centre, full_matrices=False)[2][0]  # the principal axis
        run = _piece(xy, i, centre, u, tolerance, gap)
    return run


def _piece(xy: np.ndarray, i: int, centre: np.ndarray, u: np.ndarray, width: float, gap: float) -> np.ndarray:
    """The sources within ``width`` of the line (centre, direction u), in the gap-free piece holding i.

    Empty when source i itself is not within ``width``.
    """
    rel = xy - centre
    along = rel @ u
    near = np.flatnonzero(np.abs(rel[:, 0] * u[1] - rel[:, 1] * u[0]) <= width)
    order = near[np.argsort(along[near], kind="stable")]
    pieces = np.split(order, np.flatnonzero(np.diff(along[order]) > gap) + 1)
    return next((p for p in pieces if i in p), np.zeros(0, int))
