"""BOX and POLYGON (ADQL 2.0) in CONTAINS: the tangent-plane test against an independent great-circle test.

A convex region whose edges are great circles holds exactly the points on the inner side of every
edge's plane (the sign of ``p . (v_i x v_i+1)``): that test, in 3-D vectors and numpy, is compared
with the macros and conditions DuckDB runs, over seeded random points around each region.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from broker.archive.reader import _MACROS
from broker.errors import InvalidQuery
from streams.web import regions
from tests.streams.web.test_tap import _status, _votable


def _unit(ra, dec):
    ra, dec = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _inside_convex(points: np.ndarray, vertices: list[tuple[float, float]]) -> np.ndarray:
    """Whether each point is inside the convex spherical polygon of ``vertices`` (great-circle edges)."""
    v = _unit(*np.array(vertices).T)
    sides = np.stack([points @ np.cross(a, b) for a, b in zip(v, np.roll(v, -1, axis=0), strict=True)])
    return np.all(sides > 0, axis=0) | np.all(sides < 0, axis=0)


def _box_corners(ra0: float, dec0: float, w: float, h: float) -> list[tuple[float, float]]:
    """The corners of a BOX: the tangent-plane points (+-tan(w/2), +-tan(h/2)) at its centre, back on the sky."""
    corners = []
    for x, y in ((1, 1), (-1, 1), (-1, -1), (1, -1)):
        gx, gy = x * np.tan(np.radians(w / 2)), y * np.tan(np.radians(h / 2))
        d0, rho = np.radians(dec0), np.hypot(gx, gy)
        c = np.arctan(rho)
        dec = np.arcsin(np.cos(c) * np.sin(d0) + gy * np.sin(c) * np.cos(d0) / rho)
        ra = ra0 + np.degrees(np.arctan2(gx * np.sin(c), rho * np.cos(d0) * np.cos(c) - gy * np.sin(d0) * np.sin(c)))
        corners.append((float(ra), float(np.degrees(dec))))
    return corners


def _connection(points: tuple[np.ndarray, np.ndarray]):
    con = duckdb.connect()
    con.execute(_MACROS)
    con.execute(regions.MACROS)
    con.register("points", pa.table({"ra": points[0], "dec": points[1]}))
    return con


def _around(ra0: float, dec0: float, spread: float, seed: int, n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (ra0 + rng.uniform(-spread, spread, n) / max(np.cos(np.radians(dec0)), 0.05)) % 360, \
        np.clip(dec0 + rng.uniform(-spread, spread, n), -90, 90)


POLYGONS = [
    [(149.99, 1.99), (150.03, 1.99), (150.03, 2.03), (149.99, 2.03)],
    [(359.5, -0.5), (0.5, -0.5), (0.2, 0.7)],  # across RA 0
    [(0, 80), (90, 80), (180, 80), (270, 80)],  # around the pole: its edges rise above dec 80
    [(10, -30), (40, -35), (45, -10), (25, 5), (5, -10)],
]


@pytest.mark.parametrize("vertices", POLYGONS)
def test_a_polygon_holds_the_points_inside_its_great_circle_edges(vertices):
    polygon = regions.polygon_edges(vertices)
    spread = polygon.radius_deg * 1.3
    ra, dec = _around(polygon.ra0, polygon.dec0, spread, seed=len(vertices))
    con = _connection((ra, dec))
    got = con.sql(f"SELECT {regions.polygon_sql(polygon, 'ra', 'dec')} AS inside FROM points").fetchnumpy()["inside"]
    expected = _inside_convex(_unit(ra, dec), vertices)
    assert expected.sum() > 500 and (~expected).sum() > 500  # both sides tested
    assert np.array_equal(np.asarray(got, dtype=bool), expected)


@pytest.mark.parametrize(("ra0", "dec0", "w", "h"), [(150, 2, 0.02, 0.01), (0.1, -45, 3, 1), (200, 89, 2, 2),
                                                     (10, 0, 100, 60)])
def test_a_box_is_the_polygon_of_its_corners(ra0, dec0, w, h):
    ra, dec = _around(ra0, dec0, max(w, h) * 0.9, seed=int(w * 100))
    con = _connection((ra, dec))
    got = con.sql(f"SELECT tap_in_box(ra, dec, {ra0}, {dec0}, {w}, {h}) AS inside FROM points").fetchnumpy()["inside"]
    expected = _inside_convex(_unit(ra, dec), _box_corners(ra0, dec0, w, h))
    assert expected.sum() > 500 and (~expected).sum() > 500
    assert np.array_equal(np.asarray(got, dtype=bool), expected)


def test_regions_it_cannot_hold_are_refused():
    for vertices, reason in (([(0, 0), (1, 1)], "3 to"), ([(0, 0), (120, 0), (240, 0)], "mean direction"),
                             ([(0, 0), (150, 0), (150, 10)], "hemisphere"), ([(0, 0), (1, 95), (2, 0)], "[-90, 90]")):
        with pytest.raises(InvalidQuery, match=reason.replace("[", r"\[").replace("]", r"\]")):
            regions.polygon_edges(vertices)
    con = _connection((np.array([150.0]), np.array([2.0])))
    assert con.sql("SELECT tap_in_box(ra, dec, 150, 2, 200, 1) FROM points").fetchall() == [(False,)]


def test_box_and_polygon_select_the_alerts_within_them(client):
    def ids(region: str) -> list[int]:
        votable = _votable(client.post("/api/v1/tap/sync", data={
            "QUERY": f"SELECT alert_id FROM alerts WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), {region}) "
                     "ORDER BY alert_id"}).content)
        assert _status(votable)[0] == "OK", _status(votable)
        return [int(i) for i in votable.get_first_table().array["alert_id"]]

    # objects 0 (150, 2), 1 (150.01, 2), 2 (150, 2.01) and 3 (150.02, 2.02): alerts 1000-1001, 1010-1011, 1020-1021
    assert ids("BOX('ICRS', 150.0, 2.0, 0.025, 0.025)") == [1000, 1001, 1010, 1011, 1020]
    assert ids("BOX('ICRS', 150.02, 2.02, 0.001, 0.001)") == [1021]
    assert ids("POLYGON('ICRS', 149.99, 1.99, 150.015, 1.99, 150.0, 2.015)") == [1000, 1010, 1011, 1020]
    assert ids("POLYGON(POINT(149.99, 1.99), POINT(150.03, 1.99), POINT(150.03, 2.03), POINT(149.99, 2.03))") == [
        1000, 1001, 1010, 1011, 1020, 1021]
    for bad, reason in (("BOX('ICRS', 150, 2, 200, 1)", "(0, 180)"), ("POLYGON('ICRS', 1, 2, 3, 4)", "3 to"),
                        ("POLYGON('ICRS', ra, 2, 3, 4, 5, 6)", "numbers"),
                        ("POLYGON('ICRS', 0, 0, 120, 0, 240, 0)", "mean direction"),
                        ("POLYGON('ICRS', 0, 0, 150, 0, 150, 10)", "hemisphere"),
                        ("POLYGON('GALACTIC', 0, 0, 1, 0, 1, 1)", "ICRS")):
        answer = _votable(client.post("/api/v1/tap/sync", data={
            "QUERY": f"SELECT alert_id FROM alerts WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), {bad})"}).content)
        assert _status(answer)[0] == "ERROR" and reason in _status(answer)[1], (bad, _status(answer))
    capabilities = client.get("/api/v1/tap/capabilities").text
    assert "<form>BOX</form>" in capabilities and "<form>POLYGON</form>" in capabilities


