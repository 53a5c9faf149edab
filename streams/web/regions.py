"""ADQL's BOX and POLYGON on the sky: their DuckDB macros and a polygon's tangent-plane edges, for ``CONTAINS``.

A region whose edges are great circles is, in the gnomonic (tangent-plane) projection centred
within it, a plane polygon of straight edges: the projection maps every great circle to a straight
line. So a point is inside such a region when it lies on the region's hemisphere (its cosine
of distance to the centre is positive) and inside the projected polygon (the even-odd crossing test).

- ``BOX(ra0, dec0, width, height)`` (ADQL 2.0 §2.4.3, deg): the arms of its cross run along the
  axes from the centre for half the width and height (arc), its sides are the great circles
  through the arms' ends at right angles to them: in the projection at the centre, the rectangle
  ``|x| <= tan(width / 2)``, ``|y| <= tan(height / 2)``; width and height in (0, 180) deg. Its
  parameters may be columns (a box around each uploaded position).
- ``POLYGON(ra1, dec1, ra2, dec2, ...)`` (§2.4.9, deg): vertices joined by great-circle arcs, of
  constant coordinates, within 90 deg of their mean direction (a region larger than a hemisphere
  is refused); projected here (:func:`polygon_edges`) once per query.

Both are first bounded by the cone of the archive's ``in_cone`` around the centre (its declination
band reaches the Parquet scan, and makes a join with uploaded positions a range join, not a
cartesian product).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from broker.errors import InvalidQuery

#: Added to a region's bounding radius (deg): a vertex on the cone's edge stays within it in floating point.
EPSILON_DEG = 1e-9
#: Most vertices of a POLYGON read (its crossing test is one term per edge).
MAX_VERTICES = 200
#: Largest distance (deg) of a POLYGON's vertex from their mean direction: the projection holds a hemisphere.
MAX_RADIUS_DEG = 89.0

#: DuckDB macros of the tangent-plane projection and of BOX (on each TAP connection; ``in_cone`` is the archive's).
MACROS = """
CREATE MACRO tap_cosc(ra, dec, ra0, dec0) AS sin(radians(dec0)) * sin(radians(dec))
    + cos(radians(dec0)) * cos(radians(dec)) * cos(radians(ra - ra0));
CREATE MACRO tap_gx(ra, dec, ra0, dec0) AS cos(radians(dec)) * sin(radians(ra - ra0)) / tap_cosc(ra, dec, ra0, dec0);
CREATE MACRO tap_gy(ra, dec, ra0, dec0) AS (cos(radians(dec0)) * sin(radians(dec))
    - sin(radians(dec0)) * cos(radians(dec)) * cos(radians(ra - ra0))) / tap_cosc(ra, dec, ra0, dec0);
CREATE MACRO tap_in_box(ra, dec, ra0, dec0, w, h) AS w > 0 AND w < 180 AND h > 0 AND h < 180
    AND in_cone(ra, dec, ra0, dec0, degrees(atan(sqrt(pow(tan(radians(w / 2)), 2) + pow(tan(radians(h / 2)), 2))))
        + 1e-9)
    AND tap_cosc(ra, dec, ra0, dec0) > 0
    AND abs(tap_gx(ra, dec, ra0, dec0)) <= tan(radians(w / 2))
    AND abs(tap_gy(ra, dec, ra0, dec0)) <= tan(radians(h / 2));
"""


@dataclass(frozen=True)
class ProjectedPolygon:
    """A POLYGON in the gnomonic projection at its centre.

    Attributes
    ----------
    ra0, dec0 : float
        Centre of the projection: the vertices' mean direction (deg, ICRS).
    radius_deg : float
        Largest distance of a vertex from the centre (deg), with :data:`EPSILON_DEG`: the edges lie within it.
    edges : tuple of (x1, y1, x2, y2)
        The projected edges (tangent-plane units), horizontal ones left out (they cross no ray).
    """

    ra0: float
    dec0: float
    radius_deg: float
    edges: tuple[tuple[float, float, float, float], ...]


def _unit(ra: float, dec: float) -> tuple[float, float, float]:
    r, d = math.radians(ra), math.radians(dec)
    return math.cos(d) * math.cos(r), math.cos(d) * math.sin(r), math.sin(d)


def project(ra: float, dec: float, ra0: float, dec0: float) -> tuple[float, float]:
    """The gnomonic projection (x, y) of (ra, dec) at (ra0, dec0) (deg; x to the east, y to the north)."""
    d, d0, dr = math.radians(dec), math.radians(dec0), math.radians(ra - ra0)
    cosc = math.sin(d0) * math.sin(d) + math.cos(d0) * math.cos(d) * math.cos(dr)
    return (math.cos(d) * math.sin(dr) / cosc,
            (math.cos(d0) * math.sin(d) - math.sin(d0) * math.cos(d) * math.cos(dr)) / cosc)


def polygon_edges(vertices: list[tuple[float, float]]) -> ProjectedPolygon:
    """The projected edges of a POLYGON of ``vertices`` ((ra, dec) pairs, deg).

    Raises
    ------
    InvalidQuery
        Fewer than 3 or more than :data:`MAX_VERTICES` vertices, a declination outside [-90, 90],
        or a vertex more than :data:`MAX_RADIUS_DEG` from the vertices' mean direction.
    """
    if not 3 <= len(vertices) <= MAX_VERTICES:
        raise InvalidQuery(f"POLYGON takes 3 to {MAX_VERTICES} vertices, not {len(vertices)}")
    if any(not (-90 <= dec <= 90 and math.isfinite(ra)) for ra, dec in vertices):
        raise InvalidQuery("POLYGON: a vertex's declination is outside [-90, 90] deg or its RA not finite")
    units = [_unit(ra, dec) for ra, dec in vertices]
    sx, sy, sz = (sum(u[i] for u in units) for i in range(3))
    norm = math.sqrt(sx * sx + sy * sy + sz * sz)
    if norm < 1e-9:
        raise InvalidQuery("POLYGON: its vertices have no mean direction (they surround the sphere)")
    ra0, dec0 = math.degrees(math.atan2(sy, sx)) % 360.0, math.degrees(math.asin(max(-1.0, min(1.0, sz / norm))))
    centre = (sx / norm, sy / norm, sz / norm)
    radius = max(math.degrees(math.acos(max(-1.0, min(1.0, sum(a * b for a, b in zip(u, centre, strict=True))))))
                 for u in units)
    if radius > MAX_RADIUS_DEG:
        raise InvalidQuery(f"POLYGON: a vertex lies {radius:.1f} deg from the polygon's centre; this service "
                           f"reads polygons within {MAX_RADIUS_DEG:g} deg of it (less than a hemisphere)")
    points = [project(ra, dec, ra0, dec0) for ra, dec in vertices]
    edges = tuple((*a, *b) for a, b in zip(points, points[1:] + points[:1], strict=True) if a[1] != b[1])
    return ProjectedPolygon(ra0, dec0, radius + EPSILON_DEG, edges)


def polygon_sql(polygon: ProjectedPolygon, ra: str, dec: str) -> str:
    """DuckDB condition: the point (``ra``, ``dec``: SQL of its coordinates, deg) inside ``polygon``.

    The even-odd crossing test of the projected point against the projected edges, after the
    bounding cone and the hemisphere.
    """
    centre = f"{ra}, {dec}, {polygon.ra0!r}, {polygon.dec0!r}"
    gx, gy = f"tap_gx({centre})", f"tap_gy({centre})"
    crossings = " + ".join(
        f"(CASE WHEN {gy} >= {min(y1, y2)!r} AND {gy} < {max(y1, y2)!r} AND "
        f"{gx} < {x1!r} + ({gy} - {y1!r}) * {(x2 - x1) / (y2 - y1)!r} THEN 1 ELSE 0 END)"
        for x1, y1, x2, y2 in polygon.edges)
    return (f"(in_cone({centre}, {polygon.radius_deg!r}) AND tap_cosc({centre}) > 0 "
            f"AND ({crossings or '0'}) % 2 = 1)")
