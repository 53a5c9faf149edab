"""Which committed files a query of ``alerts`` may read: the bounds its ``WHERE`` sets on ``mjd``, ``ra`` and ``dec``.

A query of the view ``alerts`` alone (one ``SELECT``, one table, no subquery, no ``WITH``) whose
``WHERE`` ANDs at its top a comparison of ``mjd`` with a number, ``mjd BETWEEN`` two numbers or
``in_cone(ra, dec, ra0, dec0, r)`` of numbers reads rows that all meet them: so only the files
whose bounds (:class:`~broker.archive.log.DataFile`) may hold such a row need to be read
(:meth:`broker.archive.reader.Archive.within`), and the answer is that of every file. The query is
read by DuckDB's own parser (``json_serialize_sql``); anything else it finds (an ``OR`` at the
top, a subquery, a second table, an output column named ``mjd``, ``ra`` or ``dec``) bounds no
file, and every file is read, as before.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from broker.archive.log import DataFile

#: Name of the DuckDB view the bounds are read from (:data:`broker.archive.reader.VIEW`).
VIEW = "alerts"
#: Which committed files a query reads: True for those that may hold a row of its answer.
FileFilter = Callable[[DataFile], bool]

#: Slack (days) on each side of an ``mjd`` bound: DuckDB compares a decimal literal (``60000.1``)
#: with the ``mjd`` column as the double of its cast, which may differ from Python's ``float`` of
#: its text by an ulp (~1e-11 days at MJD 60000); a file is left out only beyond it.
MJD_SLACK_DAYS = 1e-6
#: The columns whose bounds prune: an output column of one of these names makes a query unbounded
#: (a ``WHERE`` might be read as naming it, not the table's column).
_BOUNDED = ("mjd", "ra", "dec")
_LOWER = {"COMPARE_GREATERTHAN", "COMPARE_GREATERTHANOREQUALTO"}
_UPPER = {"COMPARE_LESSTHAN", "COMPARE_LESSTHANOREQUALTO"}
_FLIPPED = {"COMPARE_GREATERTHAN": "COMPARE_LESSTHAN", "COMPARE_GREATERTHANOREQUALTO": "COMPARE_LESSTHANOREQUALTO",
            "COMPARE_LESSTHAN": "COMPARE_GREATERTHAN", "COMPARE_LESSTHANOREQUALTO": "COMPARE_GREATERTHANOREQUALTO",
            "COMPARE_EQUAL": "COMPARE_EQUAL"}


#: Slack (deg) added to each side of :func:`broker.archive.reader.cone_where`'s RA range, far above the rounding of the
#: haversine (~1e-12 deg): a row ``in_cone`` holds is never outside the range.
RA_SLACK_DEG = 1e-6


def ra_range(ra0: float, dec0: float, radius: float) -> tuple[float, float] | None:
    """The range (lo, hi) of RA (deg) of every row in [0, 360) within ``radius`` of (``ra0``, ``dec0``).

    ``lo`` below 0 or ``hi`` at or above 360: the range crosses RA 0/360 (it is [lo + 360, 360) and
    [0, hi], or [lo, 360) and [0, hi - 360]). None where no range bounds the circle
    (see :func:`broker.archive.reader.cone_where`).
    """
    if not abs(dec0) + radius < 90.0:  # NaN too
        return None
    half = math.sin(math.radians(radius)) / math.cos(math.radians(dec0))
    if not half < 0.999 or not math.isfinite(ra0):
        return None
    width = math.degrees(math.asin(half)) + RA_SLACK_DEG
    return ra0 % 360.0 - width, ra0 % 360.0 + width


def may_hold_cone(f: DataFile, ra0: float, dec0: float, radius: float) -> bool:
    """Whether file ``f`` may hold a row of ``cone_where`` (deg), from its bounds: False only when it cannot.

    Its declination range must meet ``in_cone``'s band [dec0 - r, dec0 + r] (widened by
    :data:`RA_SLACK_DEG`), and its RA range the cone's (:func:`ra_range`, two across RA 0/360;
    none at a pole or for a cone half as wide as the sky). A file without bounds (written before
    them, or holding a NaN or an infinity) may hold any; so may one with an RA outside [0, 360),
    which the haversine still matches, as far as RA goes.
    """
    if f.dec_min is not None and f.dec_max is not None and (
            f.dec_max < dec0 - radius - RA_SLACK_DEG or f.dec_min > dec0 + radius + RA_SLACK_DEG):
        return False
    ra_bounds = ra_range(ra0, dec0, radius)
    if ra_bounds is None or f.ra_min is None or f.ra_max is None or f.ra_min < 0.0 or f.ra_max >= 360.0:
        return True
    lo, hi = ra_bounds
    if lo < 0.0:
        return f.ra_max >= lo + 360.0 or f.ra_min <= hi
    if hi >= 360.0:
        return f.ra_max >= lo or f.ra_min <= hi - 360.0
    return f.ra_max >= lo and f.ra_min <= hi


def in_time(low: float | None, high: float | None) -> FileFilter:
    """The files that may hold an MJD in [``low``, ``high``] (days; None: unbounded) by their bounds, or have none."""
    def keep(f: DataFile) -> bool:
        return not ((low is not None and f.mjd_max is not None and f.mjd_max < low)
                    or (high is not None and f.mjd_min is not None and f.mjd_min > high))
    return keep


@dataclass(frozen=True)
class Bounds:
    """What a query's ``WHERE`` holds its rows to: an MJD range (days) and cones (deg), each ANDed.

    Attributes
    ----------
    low, high : float or None
        Least and greatest ``mjd`` a row may have (None: unbounded), widened by :data:`MJD_SLACK_DAYS`.
    cones : tuple of (float, float, float)
        (ra0, dec0, radius) of each ``in_cone`` (deg): a row lies in every one.
    """

    low: float | None = None
    high: float | None = None
    cones: tuple[tuple[float, float, float], ...] = ()

    def keep(self, f: DataFile) -> bool:
        """Whether file ``f`` may hold a row within the bounds (:func:`in_time`, :func:`may_hold_cone`)."""
        return in_time(self.low, self.high)(f) and all(may_hold_cone(f, *c) for c in self.cones)


def _number(node: Any) -> float | None:
    """The value of a numeric literal of the parse tree (finite), else None."""
    if not isinstance(node, dict) or node.get("class") != "CONSTANT":
        return None
    literal = node.get("literal") or {}
    if literal.get("kind") not in ("INTEGER", "NUMERIC"):
        return None
    try:
        value = float(literal["text"])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _column(node: Any, names: set[str]) -> str | None:
    """The name of the table's column that ``node`` names (unqualified, or by one of ``names``), else None."""
    if not isinstance(node, dict) or node.get("class") != "COLUMN_REF":
        return None
    parts = [str(p).lower() for p in node.get("column_names", [])]
    if len(parts) == 1 or (len(parts) == 2 and parts[0] in names):
        return parts[-1]
    return None


def _conjuncts(node: Any) -> Iterator[dict]:
    """The terms ANDed at the top of a condition of the parse tree (through nested ANDs)."""
    if isinstance(node, dict) and node.get("class") == "CONJUNCTION" and node.get("type") == "CONJUNCTION_AND":
        for child in node.get("children", []):
            yield from _conjuncts(child)
    elif isinstance(node, dict):
        yield node


def _term_bounds(term: dict, names: set[str]) -> Bounds:
    """What one ANDed term holds the rows to (:class:`Bounds`; none where it is not of the forms read)."""
    kind = term.get("class")
    if kind == "COMPARISON" and term.get("type") in _FLIPPED:
        op, left, right = term["type"], term.get("left"), term.get("right")
        if _column(right, names) == "mjd":
            op, left, right = _FLIPPED[op], right, left
        value = _number(right)
        if _column(left, names) == "mjd" and value is not None:
            low = value if op in _LOWER or op == "COMPARE_EQUAL" else None
            high = value if op in _UPPER or op == "COMPARE_EQUAL" else None
            return Bounds(low, high)
    if kind == "BETWEEN" and term.get("type") == "COMPARE_BETWEEN" and _column(term.get("input"), names) == "mjd":
        return Bounds(_number(term.get("lower")), _number(term.get("upper")))
    if kind == "FUNCTION" and str(term.get("function_name", "")).lower() == "in_cone" and not term.get("schema") \
            and not term.get("catalog"):
        args = [a.get("expression") for a in term.get("arguments", [])]
        if len(args) == 5 and _column(args[0], names) == "ra" and _column(args[1], names) == "dec":
            numbers = [_number(a) for a in args[2:]]
            if all(n is not None for n in numbers):
                return Bounds(cones=((numbers[0], numbers[1], numbers[2]),))  # type: ignore[arg-type]
    return Bounds()


def _walk(node: Any) -> Iterator[dict]:
    """Every object of the parse tree under ``node``."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _select_of(tree: dict) -> dict | None:
    """The one ``SELECT`` of ``alerts`` alone of a parse tree (no ``WITH``, subquery or other table), else None."""
    statements = tree.get("statements") or []
    if tree.get("error") or len(statements) != 1:
        return None
    node = statements[0].get("node") or {}
    source = node.get("from_table") or {}
    if node.get("type") != "SELECT_NODE" or (node.get("cte_map") or {}).get("map") or node.get("sample") or \
            source.get("type") != "BASE_TABLE" or str(source.get("table_name", "")).lower() != VIEW or \
            source.get("schema_name") or source.get("catalog_name") or source.get("sample") or source.get("at_clause"):
        return None
    rest = {k: v for k, v in node.items() if k != "from_table"}
    if any("subquery" in n or "from_table" in n or "table_name" in n for n in _walk(rest)):
        return None
    if any(str(e.get("alias", "")).lower() in _BOUNDED for e in node.get("select_list", []) if isinstance(e, dict)):
        return None
    return node


def _parsed(con: Any, sql: str) -> dict | None:
    """The one ``SELECT`` of ``alerts`` that ``sql`` is, parsed by DuckDB (:func:`_select_of`), else None."""
    import duckdb

    try:
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    except (duckdb.Error, TypeError, ValueError):
        return None
    return _select_of(tree) if isinstance(tree, dict) else None


def _bounds_of(node: dict) -> Bounds | None:
    """What the ``WHERE`` of a parsed ``SELECT`` of ``alerts`` holds its rows to; None: nothing."""
    source = node["from_table"]
    names = {str(source.get("alias") or source.get("table_name")).lower()}
    low: float | None = None
    high: float | None = None
    cones: list[tuple[float, float, float]] = []
    for term in _conjuncts(node.get("where_clause")):
        b = _term_bounds(term, names)
        if b.low is not None and (low is None or b.low > low):
            low = b.low
        if b.high is not None and (high is None or b.high < high):
            high = b.high
        cones.extend(b.cones)
    if low is None and high is None and not cones:
        return None
    return Bounds(None if low is None else low - MJD_SLACK_DAYS, None if high is None else high + MJD_SLACK_DAYS,
                  tuple(cones))


def query_files(con: Any, sql: str) -> FileFilter | None:
    """The files that may hold a row ``sql`` reads, by the bounds of its ``WHERE``; None: every file.

    Parameters
    ----------
    con : duckdb.DuckDBPyConnection
        Any DuckDB connection: only its parser is used.
    sql : str
        A query over the view ``alerts`` (:mod:`broker.archive.reader`).
    """
    node = _parsed(con, sql)
    bounds = None if node is None else _bounds_of(node)
    return None if bounds is None else bounds.keep


def where_files(con: Any, where: str) -> FileFilter | None:
    """The files that may hold a row of ``alerts`` meeting the SQL condition ``where``; None: every file.

    A ``where`` followed by more (an ``ORDER BY``, a ``LIMIT``) holds the rows to nothing here.
    """
    node = _parsed(con, f"SELECT * FROM {VIEW} WHERE {where}")
    bounds = None if node is None or node.get("modifiers") else _bounds_of(node)
    return None if bounds is None else bounds.keep
