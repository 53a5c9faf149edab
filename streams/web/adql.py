"""ADQL 2.0 to DuckDB SQL: one SELECT over the published tables, checked node by node, for the TAP service.

A query of the IVOA Astronomical Data Query Language (``SELECT TOP 10 ... WHERE CONTAINS(POINT('ICRS',
ra, dec), CIRCLE('ICRS', 150, 2, 0.1)) = 1``) is parsed by sqlglot into a syntax tree, which is read
against allow-lists before anything runs (:func:`translate`):

- one statement, a ``SELECT`` or a ``UNION``/``INTERSECT``/``EXCEPT`` of them (no ``WITH``, no ``INTO``);
- every node of the tree of a type in :data:`ALLOWED_NODES` (clauses, operators, literals, the
  functions of ADQL 2.0 and a few of 2.1), or a function by name in :data:`ADQL_FUNCTIONS`
  (``POINT``, ``CIRCLE``, ``DISTANCE``...); any other is refused by name;
- every table one of the published tables (:class:`Published`), named by its own name, never a table
  function (``read_csv``, ``read_parquet``, ``glob``...) nor another schema (``information_schema``,
  DuckDB's catalog, the archive's own views).

String matching plays no part: ``'read_parquet'`` in a literal is a string, ``/* ; DROP */`` a
comment (comments are left out of the SQL made). The tree is then rewritten for DuckDB: ``TOP n`` to
``LIMIT``, ``CONTAINS(POINT, CIRCLE) = 1`` to the archive's ``in_cone`` macro (its declination band
reaches the Parquet scan), ``DISTANCE`` to ``ang_sep_deg`` (deg), ``LOG`` to ``ln``; each published
table to a subquery of its scalar columns (:attr:`Published.sql`), so nothing else of a view (the
records' cutouts) can be named. Every identifier is written quoted, so DuckDB reads each as the
name sqlglot read (``$1`` unquoted would be a prepared statement's parameter). The SQL made is
parsed again as DuckDB's and must be one ``SELECT`` over those subqueries' sources alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel, SqlglotError

from broker.errors import InvalidQuery
from streams.web import regions

#: Longest query read (characters): a polygon of thousands of vertices fits; a larger text is refused unread.
MAX_QUERY_CHARS = 32 * 1024
#: Deepest syntax tree read (nodes from the root): ``((((...))))`` nested past it is refused, as a
#: chain of ORs past ~500 terms (use ``IN (...)``). sqlglot's recursion ran out past ~1,000 levels.
MAX_DEPTH = 600

#: Node types a query may hold: clauses, operators, literals and the functions ADQL names.
ALLOWED_NODES: tuple[type[exp.Expression], ...] = (
    exp.Select, exp.Union, exp.Intersect, exp.Except, exp.From, exp.Join, exp.Where, exp.Group, exp.Having,
    exp.Order, exp.Ordered, exp.Limit, exp.Offset, exp.Distinct, exp.Subquery, exp.Table, exp.TableAlias,
    exp.Alias, exp.Column, exp.Identifier, exp.Star, exp.Literal, exp.Null, exp.Paren, exp.Neg, exp.Not,
    exp.And, exp.Or, exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Add, exp.Sub, exp.Mul, exp.Div,
    exp.Mod, exp.DPipe, exp.Between, exp.In, exp.Is, exp.Like, exp.ILike, exp.Exists, exp.Case, exp.If,
    exp.Cast, exp.DataType, exp.DataTypeParam, exp.Coalesce, exp.Lower, exp.Upper,
    exp.Count, exp.Avg, exp.Min, exp.Max, exp.Sum,
    exp.Abs, exp.Ceil, exp.Floor, exp.Degrees, exp.Radians, exp.Exp, exp.Ln, exp.Log, exp.Sqrt, exp.Pow,
    exp.Pi, exp.Rand, exp.Round, exp.Trunc, exp.Acos, exp.Asin, exp.Atan, exp.Atan2, exp.Cos, exp.Cot,
    exp.Sin, exp.Tan, exp.Contains,
)
#: ADQL functions sqlglot reads by name (unknown to it), and how each is taken.
ADQL_FUNCTIONS = {"POINT": "inside CONTAINS, INTERSECTS and DISTANCE", "CIRCLE": "inside CONTAINS and INTERSECTS",
                  "BOX": "inside CONTAINS and INTERSECTS", "POLYGON": "inside CONTAINS and INTERSECTS",
                  "DISTANCE": "degrees", "INTERSECTS": "with a POINT", "COORD1": "of a POINT", "COORD2": "of a POINT"}
#: The regions a POINT may be tested against (CONTAINS, INTERSECTS).
REGIONS = ("CIRCLE", "BOX", "POLYGON")
#: ADQL geometry this service does not compute: refused with this reason.
UNSUPPORTED_GEOMETRY = ("REGION", "AREA", "CENTROID", "COORDSYS")
#: Types a CAST may make (ADQL 2.1's numeric and character types).
CAST_TYPES = {exp.DataType.Type.SMALLINT, exp.DataType.Type.INT, exp.DataType.Type.BIGINT, exp.DataType.Type.FLOAT,
              exp.DataType.Type.DOUBLE, exp.DataType.Type.CHAR, exp.DataType.Type.VARCHAR,
              exp.DataType.Type.NCHAR, exp.DataType.Type.NVARCHAR}
#: Arguments of a SELECT node a query may set (``INTO``, ``WITH``, locks, hints... are refused).
SELECT_ARGS = {"expressions", "from_", "from", "joins", "where", "group", "having", "order", "limit", "offset",
               "distinct"}
_TABLE_ARGS = {"this", "db", "alias"}


@dataclass(frozen=True)
class Published:
    """A table the service publishes: its ADQL name and the DuckDB query of its rows.

    Attributes
    ----------
    name : str
        Its name in queries, ``schema.table`` (``broker.alerts``, ``TAP_SCHEMA.columns``).
    sql : str
        DuckDB ``SELECT`` of its columns; the query reads it as a subquery in its place.
    short : bool
        Whether the name without its schema (``alerts``) names it too.
    """

    name: str
    sql: str
    short: bool = True


@dataclass(frozen=True)
class Translation:
    """A checked query: the DuckDB SQL to run, the tables it reads, and its plain output columns.

    Attributes
    ----------
    sql : str
        DuckDB SQL of at most ``maxrec + 1`` rows (one more than answered, to tell an overflow).
    tables : tuple of str
        Names of the published tables read (:attr:`Published.name`).
    plain : frozenset of str or None
        Output columns that are a published column as it is (their metadata applies); None: all
        of them (``SELECT *``).
    top : int or None
        The query's own ``TOP`` (count), None without.
    cone : tuple of float or None
        (RA, Dec, radius) (deg) of a circle that holds every row the query reads (:func:`_cone_of`):
        its one table's ``ra`` and ``dec`` must be in it. None where no such circle is known.
    newest : Newest or None
        Of a query whose rows are the newest of its one table's that meet its WHERE
        (:func:`_is_newest_first`): how to find the least MJD it answers. None otherwise.
    """

    sql: str
    tables: tuple[str, ...]
    plain: frozenset[str] | None
    top: int | None
    cone: tuple[float, float, float] | None = None
    newest: Newest | None = None


@dataclass(frozen=True)
class Newest:
    """How to find the least MJD a newest-first query of one table answers (:func:`_newest_of`).

    Attributes
    ----------
    probe : str
        DuckDB SQL of the ``mjd`` of the rows the query may answer: its source and WHERE, its
        first ORDER BY key (``mjd DESC``) alone, ``LIMIT rows`` (:func:`streams.web.queries.lowest_sql`).
    rows : int
        The query's LIMIT (its TOP, or MAXREC + 1) plus its OFFSET (count).
    """

    probe: str
    rows: int


def sql_literal(text: str) -> str:
    """``text`` as a SQL string literal (quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"


def _refuse(message: str) -> InvalidQuery:
    return InvalidQuery(message)


def parse(adql: str) -> exp.Query:
    """The one statement of ``adql``, a SELECT or a set operation of them (InvalidQuery otherwise)."""
    if len(adql) > MAX_QUERY_CHARS:
        raise _refuse(f"the query is {len(adql)} characters; at most {MAX_QUERY_CHARS} are read")
    if "\x00" in adql:
        raise _refuse("the query holds a NUL character")
    if not adql.strip():
        raise _refuse("QUERY is empty")
    try:
        statements = [s for s in sqlglot.parse(adql, read="tsql", error_level=ErrorLevel.RAISE) if s is not None]
    except SqlglotError as exc:
        raise _refuse(f"the query is not ADQL this service reads: {str(exc).splitlines()[0][:300]}") from None
    except RecursionError:
        raise _refuse("the query is nested too deeply") from None
    if len(statements) != 1:
        raise _refuse(f"one SELECT statement is read, not {len(statements)} statements")
    (tree,) = statements
    if not isinstance(tree, (exp.Select, exp.SetOperation)):
        raise _refuse(f"only SELECT is read, not {tree.key.upper()}")
    return tree


def _table_key(table: exp.Table) -> str:
    """``schema.table`` of a table reference, lower case (without schema: the name)."""
    return ".".join(part.lower() for part in (table.db, table.name) if part)


def _check_table(table: exp.Table, names: Mapping[str, Published]) -> None:
    if not isinstance(table.this, exp.Identifier):
        raise _refuse(f"table functions are not read ({table.this.sql(dialect='tsql')[:80]}): only the published "
                      f"tables {_listing(names)}")
    extra = sorted(k for k, v in table.args.items() if v and k not in _TABLE_ARGS)
    if extra:
        raise _refuse(f"table {table.name!r}: {', '.join(extra)} not read")
    if _table_key(table) not in names:
        raise _refuse(f"table {table.sql(dialect='tsql')[:80]!r} is not published here; the tables are "
                      f"{_listing(names)}")


def _listing(names: Mapping[str, Published]) -> str:
    return ", ".join(sorted({p.name for p in names.values()}))


def _check_node(node: exp.Expr, names: Mapping[str, Published]) -> None:
    """InvalidQuery unless ``node`` is allowed here (:data:`ALLOWED_NODES`, a function or table named)."""
    if isinstance(node, exp.Anonymous):
        name = node.name.upper()
        if name in UNSUPPORTED_GEOMETRY:
            raise _refuse(f"{name} is not supported by this service: select with CONTAINS(POINT, CIRCLE, BOX or "
                          "POLYGON)")
        if name not in ADQL_FUNCTIONS:
            raise _refuse(f"function {node.name[:60]}() is not an ADQL function this service runs")
        return
    if not isinstance(node, ALLOWED_NODES):
        raise _refuse(f"{node.key.upper()} is not read here ({node.sql(dialect='tsql')[:80]!r}): one SELECT over "
                      "the published tables, with ADQL's functions")
    if isinstance(node, exp.Select):
        extra = sorted(k for k, v in node.args.items() if v and k not in SELECT_ARGS)
        if extra:
            raise _refuse(f"SELECT with {', '.join(extra)} is not read")
    elif isinstance(node, exp.Table):
        _check_table(node, names)
    elif isinstance(node, exp.DataType) and node.this not in CAST_TYPES:
        raise _refuse(f"CAST to {node.sql(dialect='tsql')} is not read: to SMALLINT, INTEGER, BIGINT, REAL, "
                      "DOUBLE PRECISION, CHAR or VARCHAR")
    elif isinstance(node, (exp.Limit, exp.Offset)) and not _count(node.expression):
        raise _refuse(f"{node.key.upper()} takes a whole number, not {node.expression.sql(dialect='tsql')[:40]}")
    elif isinstance(node, exp.Rand) and node.this is not None:
        raise _refuse("RAND takes no seed here")


def _count(node: exp.Expression | None) -> bool:
    return isinstance(node, exp.Literal) and not node.is_string and node.this.isdigit()


def check(tree: exp.Query, names: Mapping[str, Published]) -> None:
    """InvalidQuery unless every node of ``tree`` is allowed (see the module's notes)."""
    for node in tree.walk():
        if node.depth > MAX_DEPTH:
            raise _refuse(f"the query is nested more than {MAX_DEPTH} levels deep")
        _check_node(node, names)


def _is_call(node: exp.Expression | None, name: str) -> bool:
    return isinstance(node, exp.Anonymous) and node.name.upper() == name


def _frame(args: list[exp.Expression], what: str, count: int) -> list[exp.Expression]:
    """The coordinates of a POINT or CIRCLE: ``args`` without its leading coordinate system (ICRS or empty)."""
    if len(args) == count + 1:
        system = args[0]
        text = system.this if isinstance(system, exp.Literal) and system.is_string else None
        if text is None and not isinstance(system, exp.Null):
            raise _refuse(f"{what}: the coordinate system is a string ('ICRS'), not {system.sql(dialect='tsql')[:40]}")
        if text and text.split()[0].upper() != "ICRS":
            raise _refuse(f"{what}: coordinate system {text[:40]!r}: positions here are ICRS")
        args = args[1:]
    if len(args) != count:
        raise _refuse(f"{what} takes {count} coordinates, after an optional coordinate system ('ICRS')")
    return args


def _point(node: exp.Expression, where: str) -> list[exp.Expression]:
    """RA and Dec (deg) of a ``POINT(...)`` argument of ``where``."""
    if not _is_call(node, "POINT"):
        raise _refuse(f"{where} takes a POINT here, not {node.sql(dialect='tsql')[:60]}")
    return _frame(list(node.expressions), "POINT", 2)


def _circle(node: exp.Expression, where: str) -> list[exp.Expression]:
    """RA, Dec and radius (deg) of a ``CIRCLE(...)`` argument of ``where``."""
    args = list(node.expressions)
    if args and _is_call(args[-2] if len(args) >= 2 else None, "POINT") and len(args) in (2, 3):
        return [*_point(args[-2], "CIRCLE"), args[-1]]
    return _frame(args, "CIRCLE", 3)


def _box(ra: exp.Expression, dec: exp.Expression, node: exp.Expression) -> exp.Expression:
    """``tap_in_box(ra, dec, ra0, dec0, width, height)`` of a ``BOX(...)`` (deg; :mod:`streams.web.regions`)."""
    args = list(node.expressions)
    if len(args) in (3, 4) and _is_call(args[-3], "POINT"):
        args = [*_point(args[-3], "BOX"), *args[-2:]]
    else:
        args = _frame(args, "BOX", 4)
    for size in args[2:]:
        value = _number(size)
        if value is not None and not 0 < value < 180:
            raise _refuse(f"BOX: width and height are in (0, 180) deg, not {value:g}")
    return exp.Anonymous(this="tap_in_box", expressions=[ra, dec, *args])


def _number(node: exp.Expression) -> float | None:
    """The value of a numeric literal (or its negation), else None."""
    if isinstance(node, exp.Neg):
        inner = _number(node.this)
        return None if inner is None else -inner
    if isinstance(node, exp.Paren):
        return _number(node.this)
    if isinstance(node, exp.Literal) and not node.is_string:
        try:
            return float(node.this)
        except ValueError:
            return None
    return None


def _polygon(ra: exp.Expression, dec: exp.Expression, node: exp.Expression) -> exp.Expression:
    """The condition of a point within a ``POLYGON(...)`` of constant vertices (:func:`regions.polygon_sql`)."""
    args = list(node.expressions)
    if args and all(_is_call(a, "POINT") for a in args[-3:]) and len(args) >= 3:
        system = args[:1] if not _is_call(args[0], "POINT") else []
        _frame([*system, exp.Null(), exp.Null()], "POLYGON", 2)  # its coordinate system, if given
        args = [c for a in args[len(system):] for c in _point(a, "POLYGON")]
    elif len(args) % 2 == 1:
        args = _frame(args, "POLYGON", len(args) - 1)
    values = [_number(a) for a in args]
    if any(v is None for v in values) or len(values) % 2:
        raise _refuse("POLYGON takes the (RA, Dec) of its vertices as numbers (deg) here, after an optional "
                      "coordinate system ('ICRS')")
    numbers = [float(v) for v in values if v is not None]
    polygon = regions.polygon_edges(list(zip(numbers[::2], numbers[1::2], strict=True)))
    condition = sqlglot.parse_one(regions.polygon_sql(polygon, '"__point_ra"', '"__point_dec"'), read="duckdb")
    coordinates = {"__point_ra": ra, "__point_dec": dec}
    return condition.transform(lambda n: coordinates[n.name].copy()
                               if isinstance(n, exp.Column) and n.name in coordinates else n)


def _cone(first: exp.Expression, second: exp.Expression, where: str) -> exp.Expression:
    """The condition of a POINT within a CIRCLE, BOX or POLYGON (either order for INTERSECTS)."""
    if where == "INTERSECTS" and _is_call(second, "POINT"):
        first, second = second, first
    if isinstance(second, exp.Anonymous) and second.name.upper() in UNSUPPORTED_GEOMETRY:
        raise _refuse(f"{where}({second.name.upper()}) is not supported by this service: use a CIRCLE, BOX or "
                      "POLYGON")
    ra, dec = _point(first, where)
    if _is_call(second, "BOX"):
        return _box(ra, dec, second)
    if _is_call(second, "POLYGON"):
        return _polygon(ra, dec, second)
    if not _is_call(second, "CIRCLE"):
        raise _refuse(f"{where} takes a CIRCLE, BOX or POLYGON here, not {second.sql(dialect='tsql')[:60]}")
    return exp.Anonymous(this="in_cone", expressions=[ra, dec, *_circle(second, where)])


def _region(node: exp.Expression) -> exp.Expression | None:
    """The condition of a CONTAINS or INTERSECTS call, else None."""
    if isinstance(node, exp.Contains):
        return _cone(node.this, node.expression, "CONTAINS")
    if _is_call(node, "INTERSECTS"):
        if len(node.expressions) != 2:
            raise _refuse("INTERSECTS takes two regions")
        first, second = node.expressions
        return _cone(first, second, "INTERSECTS")
    return None


def _geometry(node: exp.Expression) -> exp.Expression:
    """``node`` with ADQL's geometry made DuckDB's (see the module's notes); other nodes as they are."""
    if isinstance(node, (exp.EQ, exp.NEQ)):
        for region, other in ((node.this, node.expression), (node.expression, node.this)):
            cond = _region(region)
            if cond is not None and isinstance(other, exp.Literal) and other.this in ("0", "1"):
                holds = (other.this == "1") == isinstance(node, exp.EQ)
                return exp.Paren(this=cond) if holds else exp.Not(this=exp.Paren(this=cond))
    cond = _region(node)
    if cond is not None:
        return exp.Case(ifs=[exp.If(this=cond, true=exp.Literal.number(1))], default=exp.Literal.number(0))
    if _is_call(node, "DISTANCE"):
        args = list(node.expressions)
        if len(args) == 2:
            args = [*_point(args[0], "DISTANCE"), *_point(args[1], "DISTANCE")]
        if len(args) != 4:
            raise _refuse("DISTANCE takes two POINTs, or four coordinates")
        return exp.Anonymous(this="ang_sep_deg", expressions=args)
    for index, name in enumerate(("COORD1", "COORD2")):
        if _is_call(node, name):
            if len(node.expressions) != 1:
                raise _refuse(f"{name} takes one POINT")
            return _point(node.expressions[0], name)[index]
    return node


def _conjuncts(node: exp.Expression) -> list[exp.Expression]:
    """The terms of ``node`` as a chain of ANDs (through parentheses): ``node`` itself if it is none."""
    if isinstance(node, exp.And):
        return _conjuncts(node.this) + _conjuncts(node.expression)
    if isinstance(node, exp.Paren) and isinstance(node.this, (exp.And, exp.Paren)):
        return _conjuncts(node.this)
    return [node]


def _one_table(tree: exp.Query) -> bool:
    """Whether ``tree`` is one SELECT over one table: no subquery, no join, no set operation."""
    return isinstance(tree, exp.Select) and len(list(tree.find_all(exp.Table))) == 1 and \
        len(list(tree.find_all(exp.Select))) == 1


def _cone_of(tree: exp.Query) -> tuple[float, float, float] | None:
    """(RA, Dec, radius) (deg) of ``CONTAINS(POINT(ra, dec), CIRCLE(...)) = 1`` ANDed at the top of ``tree``'s WHERE.

    Only of one SELECT over one table, with no subquery, no join and no set operation, its circle
    of numbers and its point the table's own columns ``ra`` and ``dec``: every row the query
    reads, aggregated or not, is then in the circle. ``tree`` is the query with its geometry made
    DuckDB's (:func:`_geometry`: such a term is ``(in_cone(ra, dec, ra0, dec0, r))``). None otherwise
    (an OR, a NOT, ``= 0``, a BOX or POLYGON, a circle of expressions).
    """
    if not _one_table(tree) or tree.args.get("where") is None:
        return None
    for term in _conjuncts(tree.args["where"].this):
        call = term.this if isinstance(term, exp.Paren) else None
        if not (isinstance(call, exp.Anonymous) and call.name == "in_cone" and len(call.expressions) == 5):
            continue
        ra, dec, *circle = call.expressions
        ra0, dec0, radius = (_number(v) for v in circle)
        point = [c.name.lower() if isinstance(c, exp.Column) else None for c in (ra, dec)]
        if point == ["ra", "dec"] and ra0 is not None and dec0 is not None and radius is not None:
            return ra0, dec0, radius
    return None


def _is_newest_first(tree: exp.Query) -> bool:
    """Whether ``tree``'s answer is the first rows of its one table's rows meeting its WHERE, ``mjd`` descending.

    One SELECT over one table (:func:`_one_table`), its first ORDER BY key the table's ``mjd``
    descending (not an output column of that name made of anything else), without DISTINCT, GROUP
    BY, HAVING, an aggregate or RAND (ADQL has no window functions): its WHERE is then a condition
    on each row alone, and its rows (after its OFFSET) are the newest of those that meet it.
    """
    order = tree.args.get("order")
    if not _one_table(tree) or order is None or any(tree.args.get(k) for k in ("distinct", "group", "having")) or \
            next(tree.find_all(exp.AggFunc, exp.Rand), None) is not None:
        return False
    first = order.expressions[0]
    if not (first.args.get("desc") and isinstance(first.this, exp.Column) and first.this.name.lower() == "mjd"):
        return False
    return all(e.alias_or_name.lower() != "mjd" or (isinstance(e.unalias(), exp.Column) and
                                                   e.unalias().name.lower() == "mjd") for e in tree.expressions)


def _newest_of(tree: exp.Select, sources: frozenset[str]) -> Newest:
    """The probe of a newest-first query (:func:`_is_newest_first`), its tables made subqueries and its LIMIT set."""
    probe = tree.copy()
    key = probe.args["order"].expressions[0].this
    offset = probe.args.get("offset")
    rows = int(probe.args["limit"].expression.this) + (int(offset.expression.this) if offset is not None else 0)
    probe.set("expressions", [exp.alias_(key.copy(), "mjd")])
    probe.set("order", exp.Order(expressions=[exp.Ordered(this=key.copy(), desc=True, nulls_first=False)]))
    probe.set("limit", exp.Limit(expression=exp.Literal.number(rows)))
    probe.set("offset", None)
    return Newest(_generate(probe, sources), rows)


def _published_subquery(table: exp.Table, names: Mapping[str, Published]) -> exp.Expression:
    """The subquery that reads a published table in place of its name, under its alias (or its name)."""
    published = names[_table_key(table)]
    alias = table.alias or table.name
    inner = sqlglot.parse_one(published.sql, read="duckdb")
    return exp.Subquery(this=inner, alias=exp.TableAlias(this=exp.to_identifier(alias, quoted=True)))


def _plain_columns(tree: exp.Query) -> frozenset[str] | None:
    """The output columns of ``tree`` that are a column as it is (None: ``*``, every one)."""
    select = tree
    while isinstance(select, exp.SetOperation):
        select = select.this
    if not isinstance(select, exp.Select):
        return frozenset()
    if any(isinstance(e, exp.Star) or (isinstance(e, exp.Column) and isinstance(e.this, exp.Star))
           for e in select.expressions):
        return None
    return frozenset(e.alias_or_name.lower() for e in select.expressions
                     if isinstance(e.unalias(), exp.Column) and e.alias_or_name.lower() == e.unalias().name.lower())


def _limit(tree: exp.Query, maxrec: int) -> int | None:
    """Limit ``tree`` to ``maxrec + 1`` rows, or its own TOP when smaller; its own TOP (None without)."""
    held = tree.args.get("limit")
    top = int(held.expression.this) if held is not None else None
    tree.set("limit", exp.Limit(expression=exp.Literal.number(min(maxrec + 1, top if top is not None else maxrec + 1))))
    return top


def _generate(tree: exp.Query, sources: frozenset[str]) -> str:
    """DuckDB SQL of ``tree``, parsed again: one SELECT over ``sources`` alone (InvalidQuery otherwise)."""
    try:
        sql = tree.sql(dialect="duckdb", comments=False, identify=True, unsupported_level=ErrorLevel.RAISE)
    except SqlglotError as exc:
        raise _refuse(f"the query cannot be run here: {str(exc).splitlines()[0][:300]}") from None
    again = [s for s in sqlglot.parse(sql, read="duckdb") if s is not None]
    if len(again) != 1 or not isinstance(again[0], (exp.Select, exp.SetOperation)) or any(
            _table_key(t) not in sources for t in again[0].find_all(exp.Table)):
        raise _refuse("the query could not be translated faithfully")  # a translation fault: never run
    return sql


def translate(adql: str, published: tuple[Published, ...], maxrec: int) -> Translation:
    """The DuckDB SQL of ``adql`` over ``published``, of at most ``maxrec + 1`` rows.

    Parameters
    ----------
    adql : str
        The query (ADQL 2.0; ``LOWER``, ``UPPER``, ``COALESCE``, ``CAST``, ``ILIKE`` and ``OFFSET``
        of 2.1; ``CASE``).
    published : tuple of Published
        The tables it may read.
    maxrec : int
        Most rows answered (count); one more is asked for, to tell an overflow.

    Raises
    ------
    InvalidQuery
        Anything but one SELECT over the published tables with ADQL's functions, with what was
        refused and why.
    """
    try:
        return _translate(adql, published, maxrec)
    except RecursionError:
        raise _refuse("the query is nested too deeply (an OR chain: use IN)") from None


def _translate(adql: str, published: tuple[Published, ...], maxrec: int) -> Translation:
    names = {p.name.lower(): p for p in published} | {p.name.split(".")[-1].lower(): p for p in published if p.short}
    tree = parse(adql)
    check(tree, names)
    for ordered in tree.find_all(exp.Ordered):
        ordered.set("nulls_first", False)  # DuckDB's order of nulls (last), as `broker query` has it
    transformed = tree.transform(_geometry, copy=False)
    assert isinstance(transformed, exp.Query)  # the root is a SELECT: _geometry changes calls and comparisons
    tree = transformed
    left = next((n for n in tree.find_all(exp.Anonymous) if n.name.upper() in ("POINT", *REGIONS)), None)
    if left is not None:
        raise _refuse(f"{left.name.upper()} is only read {ADQL_FUNCTIONS[left.name.upper()]}")
    tables = tuple(dict.fromkeys(names[_table_key(t)].name for t in tree.find_all(exp.Table)))
    cone = _cone_of(tree)
    newest_first = _is_newest_first(tree)
    for column in tree.find_all(exp.Column):
        if column.args.get("db") is not None:  # TAP_SCHEMA.tables.table_name: the table's alias is its name
            column.set("db", None)
            column.set("catalog", None)
    sources = frozenset(_table_key(t) for p in published for t in sqlglot.parse_one(p.sql, read="duckdb")
                        .find_all(exp.Table))
    plain = _plain_columns(tree)
    for table in list(tree.find_all(exp.Table)):
        table.replace(_published_subquery(table, names))
    top = _limit(tree, maxrec)
    newest = _newest_of(tree, sources) if newest_first and isinstance(tree, exp.Select) else None
    return Translation(_generate(tree, sources), tables, plain, top, cone, newest)
