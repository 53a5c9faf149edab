"""What the TAP service publishes: its tables and columns, ``TAP_SCHEMA``, and the VOSI documents.

Two tables of the archive (schema ``broker``), each a flat table of scalar columns:
``broker.alerts``, one row per archived alert (the columns of ``broker query``'s view ``alerts``
without the whole record, and a few of the record's own: flux, errors, pixel position, exposure),
and ``broker.objects``, one row per object over its alerts (as ``/api/v1/objects``), grouped at
each query. The cutouts are not published. ``TAP_SCHEMA`` (schemas, tables, columns, keys,
key_columns) describes them and itself, as TAP 1.1 asks; clients (TOPCAT, pyvo, STILTS) read it
and the VOSI ``tables`` document made from the same :data:`TABLES`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

import pyarrow as pa

from broker.lcclass import CLASS_NAMES
from streams.web.adql import Published


@dataclass(frozen=True)
class TapColumn:
    """A published column: name, ADQL type, unit, UCD, description, and whether it is principal or indexed."""

    name: str
    datatype: str
    unit: str | None
    ucd: str
    description: str
    principal: bool = True
    indexed: bool = False


@dataclass(frozen=True)
class TapTable:
    """A published table: schema, name (``schema.table``), description, columns, and its DuckDB query."""

    schema: str
    name: str
    description: str
    columns: tuple[TapColumn, ...]
    sql: str

    def published(self) -> Published:
        """The table as :func:`streams.web.adql.translate` reads it (its short name too, but for TAP_SCHEMA)."""
        return Published(self.name, self.sql, short=self.schema != "TAP_SCHEMA")


def _c(name: str, datatype: str, unit: str | None, ucd: str, description: str, principal: bool = True,
       indexed: bool = False) -> TapColumn:
    return TapColumn(name, datatype, unit, ucd, description, principal, indexed)


#: Columns of ``broker.alerts``: (column, SQL over the archive's view ``alerts``) pairs.
_ALERT_COLUMNS: tuple[tuple[TapColumn, str], ...] = (
    (_c("alert_id", "BIGINT", None, "meta.id;meta.main", "alert id (the portal's /api/v1/alerts/{alert_id})",
        indexed=True), "alert_id"),
    (_c("object_id", "VARCHAR", None, "meta.id", "object the detection belongs to (broker.objects)", indexed=True),
     "object_id"),
    (_c("night", "VARCHAR", None, "time.epoch",
        "observing night at the telescope, YYYY-MM-DD: the local date of its evening"), "CAST(night AS VARCHAR)"),
    (_c("telescope", "VARCHAR", None, "instr.tel", "telescope that took the frame"), "telescope"),
    (_c("field", "VARCHAR", None, "meta.id;obs.field", "field id of the frame", False), "alert.provenance.field"),
    (_c("frame_id", "VARCHAR", None, "meta.id;obs", "exposure id of the frame"), "frame_id"),
    (_c("candid", "VARCHAR", None, "meta.id", "candidate id <frame_id>/<index>", False), "candid"),
    (_c("mjd", "DOUBLE", "d", "time.epoch", "exposure start (MJD, UTC)", indexed=True), "mjd"),
    (_c("exptime", "DOUBLE", "s", "time.duration;obs.exposure", "exposure length", False), "alert.source.exptime"),
    (_c("ra", "DOUBLE", "deg", "pos.eq.ra;meta.main", "right ascension of the detection (ICRS)"), "ra"),
    (_c("dec", "DOUBLE", "deg", "pos.eq.dec;meta.main", "declination of the detection (ICRS)", indexed=True),
     "dec"),
    (_c("filter", "VARCHAR", None, "meta.id;instr.filter", "band of the frame"), "filter"),
    (_c("snr", "DOUBLE", None, "stat.snr", "signed S/N of the PSF-fit difference flux"), "snr"),
    (_c("flux", "DOUBLE", "adu", "phot.flux", "PSF-fit difference flux (negative when fading)", False),
     "alert.source.flux"),
    (_c("flux_err", "DOUBLE", "adu", "stat.error;phot.flux", "1-sigma error of flux", False),
     "alert.source.flux_err"),
    (_c("magpsf", "DOUBLE", "mag", "phot.mag", "difference magnitude; null without a zero point"), "magpsf"),
    (_c("sigmapsf", "DOUBLE", "mag", "stat.error;phot.mag", "1-sigma error of magpsf"), "alert.source.sigmapsf"),
    (_c("x", "DOUBLE", "pixel", "pos.cartesian.x;instr.det", "column on the science frame (0-based)", False),
     "alert.source.x"),
    (_c("y", "DOUBLE", "pixel", "pos.cartesian.y;instr.det", "row on the science frame (0-based)", False),
     "alert.source.y"),
    (_c("fwhm", "DOUBLE", "pixel", "phys.size;instr.det.psf", "footprint FWHM", False), "alert.source.fwhm"),
    (_c("elongation", "DOUBLE", None, "src.ellipticity", "major/minor axis ratio", False),
     "alert.source.elongation"),
    (_c("rb", "DOUBLE", None, "stat.probability", "real/bogus score [0, 1] (1 = real); null when not scored"),
     "rb"),
    (_c("anomaly", "DOUBLE", None, "stat.probability", "anomaly score [0, 1] (1 = most anomalous)"), "anomaly"),
    (_c("schema_version", "INTEGER", None, "meta.version", "alert schema version of the record", False),
     "schema_version"),
)
#: Columns of ``broker.objects``: (column, aggregate over the archive's alerts of the object).
_OBJECT_COLUMNS: tuple[tuple[TapColumn, str], ...] = (
    (_c("object_id", "VARCHAR", None, "meta.id;meta.main", "object id (the portal's /objects/{object_id})",
        indexed=True), "object_id"),
    (_c("ra", "DOUBLE", "deg", "pos.eq.ra;meta.main", "mean right ascension of its alerts (ICRS, circular mean)"),
     "(degrees(atan2(avg(sin(radians(ra))), avg(cos(radians(ra))))) + 360.0) % 360.0"),
    (_c("dec", "DOUBLE", "deg", "pos.eq.dec;meta.main", "mean declination of its alerts (ICRS)"), "avg(dec)"),
    (_c("n_alerts", "BIGINT", None, "meta.number", "alerts of the object in the archive"), "count(*)"),
    (_c("first_mjd", "DOUBLE", "d", "time.start", "exposure start of its first alert (MJD, UTC)"), "min(mjd)"),
    (_c("last_mjd", "DOUBLE", "d", "time.end", "exposure start of its newest alert (MJD, UTC)"), "max(mjd)"),
    (_c("last_mag", "DOUBLE", "mag", "phot.mag", "difference magnitude of its newest alert"),
     "arg_max(magpsf, mjd)"),
    (_c("last_band", "VARCHAR", None, "meta.id;instr.filter", "band of its newest alert"), "arg_max(filter, mjd)"),
    (_c("max_rb", "DOUBLE", None, "stat.probability", "highest real/bogus score of its alerts"), "max(rb)"),
    (_c("max_anomaly", "DOUBLE", None, "stat.probability", "highest anomaly score of its alerts"), "max(anomaly)"),
)


def _class_columns(at: str) -> tuple[TapColumn, ...]:
    """The columns of a classification (:func:`class_sql`), ``at`` saying which alert's: REST's ``class``, probability.

    ``class_label``, not ``class``: a reserved word of several SQL dialects and clients.
    """
    return (_c("class_label", "VARCHAR", None, "src.class",
               f"most probable light-curve class {at} (broker/lcclass.py: " + ", ".join(CLASS_NAMES)
               + "); null for alerts of schema version 1 or 2, and for an alert not classified"),
            _c("class_probability", "DOUBLE", None, "stat.probability", "probability of class_label"))


#: Name of the (Arrow) DuckDB table ``broker.objects`` reads: :func:`objects_sql`'s rows, grouped once per commit.
OBJECTS_TABLE = "tap_objects"
#: Name of the DuckDB view ``broker.alerts`` reads: :func:`alerts_sql`, made on each TAP connection for its files.
ALERTS_VIEW = "tap_alerts"
#: First alert schema version whose records hold a classification (``alert.classification``).
CLASSIFIED_SINCE = 3


def classified(versions: Iterable[int]) -> bool:
    """Whether an archive of files of these alert schema versions has ``alert.classification`` in its view.

    DuckDB's ``union_by_name`` gives the column to every row once one file holds it (null in the
    older files' rows), and refuses it in a view of older files only.
    """
    return max(versions, default=0) >= CLASSIFIED_SINCE


def class_sql(classification: str | None) -> str:
    """SQL of ``class_label`` and ``class_probability`` from the classification struct ``classification``.

    The struct's ``label`` and the probability of that label (a ``CASE`` over :data:`CLASS_NAMES`,
    the struct's fields); ``classification`` None (the archive has no classification): typed nulls.
    Shared by :func:`objects_sql` (the newest alert's) and :func:`alerts_sql` (each alert's), so
    that an object's class is its newest alert's, to the digit.
    """
    if classification is None:
        return "CAST(NULL AS VARCHAR) AS class_label, CAST(NULL AS DOUBLE) AS class_probability"
    probability = " ".join(f"WHEN '{name}' THEN {classification}.probabilities.\"{name}\"" for name in CLASS_NAMES)
    return f"{classification}.label AS class_label, CASE {classification}.label {probability} END AS class_probability"


def _select(columns: tuple[tuple[TapColumn, str], ...], rest: str) -> str:
    return "SELECT " + ", ".join(f'{sql} AS "{c.name}"' for c, sql in columns) + f" {rest}"


def objects_sql(classified: bool) -> str:
    """DuckDB query grouping the archive's alerts into ``broker.objects``' rows (``streams.web.queries.ObjectTable``).

    Besides the grouped columns, ``class_label`` and ``class_probability``: the newest alert's
    class and that class's probability (:func:`class_sql`; ``classified``: a file of schema version
    3 or later holds the classification, :func:`classified`; else null), which ``/api/v1/objects``
    answers as ``class``. The classification itself (its explanation arrays) is not kept.
    """
    if not classified:
        return f"SELECT *, {class_sql(None)} FROM ({_select(_OBJECT_COLUMNS, 'FROM alerts GROUP BY object_id')})"
    grouped = _select(_OBJECT_COLUMNS, ", arg_max(alert.classification, mjd) AS classification FROM alerts "
                                       "GROUP BY object_id")
    return f"SELECT * EXCLUDE (classification), {class_sql('classification')} FROM ({grouped})"


def alerts_sql(classified: bool) -> str:
    """DuckDB query of ``broker.alerts``' rows over the archive's view ``alerts`` (the view :data:`ALERTS_VIEW`).

    Its columns, then each alert's ``class_label`` and ``class_probability`` (:func:`class_sql` of
    ``alert.classification``, as ``/api/v1/alerts`` answers ``class``; ``classified`` as for
    :func:`objects_sql`: without it, null). A view, not rows: a query's filters and columns reach
    the Parquet scan through it.
    """
    return _select(_ALERT_COLUMNS, f", {class_sql('alert.classification' if classified else None)} FROM alerts")


def _from(columns: tuple[TapColumn, ...], table: str) -> str:
    return "SELECT " + ", ".join(f'"{c.name}"' for c in columns) + f" FROM {table}"


def _meta(name: str, datatype: str, description: str, principal: bool = True) -> TapColumn:
    return TapColumn(name, datatype, None, "", description, principal)


#: The ``TAP_SCHEMA`` tables' columns, as TAP 1.1 (section 4) lists them.
_TAP_SCHEMA: dict[str, tuple[TapColumn, ...]] = {
    "schemas": (_meta("schema_name", "VARCHAR", "schema name"), _meta("utype", "VARCHAR", "utype", False),
                _meta("description", "VARCHAR", "what the schema holds"),
                _meta("schema_index", "INTEGER", "order of the schemas", False)),
    "tables": (_meta("schema_name", "VARCHAR", "schema of the table"), _meta("table_name", "VARCHAR", "its name"),
               _meta("table_type", "VARCHAR", "table or view"), _meta("utype", "VARCHAR", "utype", False),
               _meta("description", "VARCHAR", "what the table holds"),
               _meta("table_index", "INTEGER", "order of the tables", False)),
    "columns": (_meta("table_name", "VARCHAR", "table of the column"), _meta("column_name", "VARCHAR", "its name"),
                _meta("utype", "VARCHAR", "utype", False), _meta("ucd", "VARCHAR", "UCD"),
                _meta("unit", "VARCHAR", "VOUnit"), _meta("description", "VARCHAR", "meaning"),
                _meta("datatype", "VARCHAR", "ADQL type"), _meta("arraysize", "VARCHAR", "array size", False),
                _meta("xtype", "VARCHAR", "extended type", False), _meta("size", "INTEGER", "length", False),
                _meta("principal", "INTEGER", "1: shown by default"), _meta("indexed", "INTEGER", "1: indexed"),
                _meta("std", "INTEGER", "1: defined by a standard", False),
                _meta("column_index", "INTEGER", "order of the columns", False)),
    "keys": (_meta("key_id", "VARCHAR", "key id"), _meta("from_table", "VARCHAR", "table that refers"),
             _meta("target_table", "VARCHAR", "table referred to"), _meta("utype", "VARCHAR", "utype", False),
             _meta("description", "VARCHAR", "meaning")),
    "key_columns": (_meta("key_id", "VARCHAR", "key id"), _meta("from_column", "VARCHAR", "column that refers"),
                    _meta("target_column", "VARCHAR", "column referred to")),
}
#: Name of the registered (Arrow) DuckDB table of each ``TAP_SCHEMA`` table.
REGISTERED = {name: f"tap_schema_{name}" for name in _TAP_SCHEMA}
SCHEMAS = (("broker", "the broker's alert archive"), ("TAP_SCHEMA", "the tables and columns of this service"))
#: Every published table, in the order TAP_SCHEMA lists them.
_ALERTS = (*(c for c, _ in _ALERT_COLUMNS), *_class_columns("of the alert"))
_OBJECTS = (*(c for c, _ in _OBJECT_COLUMNS), *_class_columns("at its newest alert"))
TABLES: tuple[TapTable, ...] = (
    TapTable("broker", "broker.alerts", "archived alerts, one row per alert id (its first archived copy); no cutouts",
             _ALERTS, _from(_ALERTS, ALERTS_VIEW)),
    TapTable("broker", "broker.objects", "objects, one row per object over its archived alerts (grouped once per "
             "archive commit)", _OBJECTS, _from(_OBJECTS, OBJECTS_TABLE)),
    *(TapTable("TAP_SCHEMA", f"TAP_SCHEMA.{name}", f"TAP_SCHEMA {name}", columns,
               f"SELECT * FROM {REGISTERED[name]}") for name, columns in _TAP_SCHEMA.items()),
)
#: The foreign keys: (key id, from table, target table, from column, target column).
KEYS = (("alerts_object", "broker.alerts", "broker.objects", "object_id", "object_id"),
        ("tables_schema", "TAP_SCHEMA.tables", "TAP_SCHEMA.schemas", "schema_name", "schema_name"),
        ("columns_table", "TAP_SCHEMA.columns", "TAP_SCHEMA.tables", "table_name", "table_name"),
        ("keys_from", "TAP_SCHEMA.keys", "TAP_SCHEMA.tables", "from_table", "table_name"),
        ("keys_target", "TAP_SCHEMA.keys", "TAP_SCHEMA.tables", "target_table", "table_name"),
        ("key_columns_key", "TAP_SCHEMA.key_columns", "TAP_SCHEMA.keys", "key_id", "key_id"))
#: VOTable datatype of each column type, as TAP 1.1's TAP_SCHEMA.columns and VOSI tables give them.
VOTABLE_TYPES = {"VARCHAR": "unicodeChar", "INTEGER": "int", "BIGINT": "long", "DOUBLE": "double"}
#: Names that ADQL reserves: TAP_SCHEMA names such a column delimited (``"size"``), as TAP 1.1 does.
_RESERVED = {"size"}


def column_name(column: TapColumn) -> str:
    """The column's name as TAP_SCHEMA and VOSI give it: delimited if ADQL reserves it."""
    return f'"{column.name}"' if column.name in _RESERVED else column.name


def published() -> tuple[Published, ...]:
    """The tables queries may read (:data:`TABLES`)."""
    return tuple(t.published() for t in TABLES)


def table_of(name: str) -> TapTable:
    """The published table ``name`` (``schema.table``)."""
    return next(t for t in TABLES if t.name == name)


def tap_schema() -> dict[str, pa.Table]:
    """The rows of the ``TAP_SCHEMA`` tables, by their registered name (:data:`REGISTERED`)."""
    rows: dict[str, list[dict]] = {
        "schemas": [{"schema_name": n, "utype": None, "description": d, "schema_index": i}
                    for i, (n, d) in enumerate(SCHEMAS)],
        "tables": [{"schema_name": t.schema, "table_name": t.name, "table_type": "table", "utype": None,
                    "description": t.description, "table_index": i} for i, t in enumerate(TABLES)],
        "columns": [{"table_name": t.name, "column_name": column_name(c), "utype": None, "ucd": c.ucd or None,
                     "unit": c.unit, "description": c.description, "datatype": VOTABLE_TYPES[c.datatype],
                     "arraysize": "*" if c.datatype == "VARCHAR" else None, "xtype": None, "size": None,
                     "principal": int(c.principal),
                     "indexed": int(c.indexed), "std": int(t.schema == "TAP_SCHEMA"), "column_index": i}
                    for t in TABLES for i, c in enumerate(t.columns)],
        "keys": [{"key_id": k, "from_table": f, "target_table": to, "utype": None, "description": f"{fc} of {to}"}
                 for k, f, to, fc, _ in KEYS],
        "key_columns": [{"key_id": k, "from_column": fc, "target_column": tc} for k, _, _, fc, tc in KEYS],
    }
    types = {"VARCHAR": pa.string(), "INTEGER": pa.int32(), "BIGINT": pa.int64(), "DOUBLE": pa.float64()}
    return {REGISTERED[name]: pa.Table.from_pylist(rows[name], schema=pa.schema(
        [(c.name, types[c.datatype]) for c in columns])) for name, columns in _TAP_SCHEMA.items()}


_NS = ('xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
       'xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1" xmlns:vr="http://www.ivoa.net/xml/VOResource/v1.0"')


def _text(tag: str, value: str | None) -> str:
    return f"<{tag}>{escape(value)}</{tag}>" if value else ""


def _column_xml(column: TapColumn) -> str:
    flags = "<flag>indexed</flag>" if column.indexed else ""
    flags += "<flag>primary</flag>" if column.principal else ""
    size = ' arraysize="*"' if column.datatype == "VARCHAR" else ""
    return (f"<column>{_text('name', column_name(column))}{_text('description', column.description)}"
            f"{_text('unit', column.unit)}{_text('ucd', column.ucd)}"
            f'<dataType xsi:type="vs:VOTableType"{size}>{VOTABLE_TYPES[column.datatype]}</dataType>{flags}</column>')


def tables_xml() -> bytes:
    """The VOSI ``tables`` document (VOSI 1.1): every schema, table and column, with units and UCDs."""
    parts = [f'<?xml version="1.0" encoding="UTF-8"?>\n<vosi:tableset '
             f'xmlns:vosi="http://www.ivoa.net/xml/VOSITables/v1.0" {_NS}>']
    for schema, description in SCHEMAS:
        parts.append(f"<schema>{_text('name', schema)}{_text('description', description)}")
        for table in (t for t in TABLES if t.schema == schema):
            parts.append(f'<table type="output">{_text("name", table.name)}'
                         f'{_text("description", table.description)}')
            parts.extend(_column_xml(c) for c in table.columns)
            parts.extend(f"<foreignKey>{_text('targetTable', to)}<fkColumn>{_text('fromColumn', fc)}"
                         f"{_text('targetColumn', tc)}</fkColumn></foreignKey>"
                         for _, f, to, fc, tc in KEYS if f == table.name)
            parts.append("</table>")
        parts.append("</schema>")
    parts.append("</vosi:tableset>")
    return "".join(parts).encode()


#: ADQL geometry the service computes (TAPRegExt's adqlgeo features).
GEOMETRY = ("POINT", "CIRCLE", "BOX", "POLYGON", "CONTAINS", "INTERSECTS", "DISTANCE", "COORD1", "COORD2")


def capabilities_xml(base: str, default_maxrec: int, max_maxrec: int, retention_s: tuple[float, float] = (3600, 86400),
                     execution_s: float = 30, upload_bytes: int = 16 * 2**20) -> bytes:
    """The VOSI ``capabilities`` document: TAP 1.1 (``/sync`` and ``/async``), ADQL 2.0, VOTable and CSV, the limits.

    Beside TAP, the VOSI resources and the DALI examples (``/examples``, :mod:`streams.web.tap_examples`).

    ``base`` is the service's URL (``.../api/v1/tap``); ``retention_s`` the default and longest
    life of an asynchronous job (s), ``execution_s`` the longest a query runs (s); ``upload_bytes``
    the largest table uploaded inline (``UPLOAD=name,param:part``; the only upload method: this
    service reads no URL).
    """
    def interface(url: str, role: str = "", use: str = "full") -> str:
        extra = f' role="{role}" version="1.1"' if role else ""
        return f'<interface xsi:type="vs:ParamHTTP"{extra}><accessURL use="{use}">{escape(url)}</accessURL></interface>'

    features = "".join(f"<feature><form>{f}</form></feature>" for f in GEOMETRY)
    vosi = "".join(f'<capability standardID={quoteattr(sid)}>{interface(f"{base}/{path}")}</capability>'
                   for sid, path in (("ivo://ivoa.net/std/VOSI#capabilities", "capabilities"),
                                     ("ivo://ivoa.net/std/VOSI#availability", "availability"),
                                     ("ivo://ivoa.net/std/VOSI#tables-1.1", "tables"),
                                     ("ivo://ivoa.net/std/DALI#examples", "examples")))
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<vosi:capabilities '
            f'xmlns:vosi="http://www.ivoa.net/xml/VOSICapabilities/v1.0" {_NS} '
            f'xmlns:tr="http://www.ivoa.net/xml/TAPRegExt/v1.0">'
            f'<capability standardID="ivo://ivoa.net/std/TAP" xsi:type="tr:TableAccess">'
            "<description>Tables are uploaded inline (UPLOAD=name,param:part, a VOTable sent as a part of the "
            "multipart request, queried as TAP_UPLOAD.name). upload-http is declared as TAPRegExt requires of a "
            "service taking uploads, but an UPLOAD of a URL (http, https, ftp, file) is refused with an error: "
            "this service has no network access.</description>"
            f'{interface(base, "std", "base")}'
            '<language><name>ADQL</name><version ivo-id="ivo://ivoa.net/std/ADQL#v2.0">2.0</version>'
            "<description>ADQL 2.0 (with LOWER, UPPER, COALESCE, CAST, ILIKE and OFFSET of 2.1). "
            "BOX (its sides great circles, ADQL 2.0) and POLYGON (constant vertices, less than a hemisphere) "
            "in CONTAINS and INTERSECTS; REGION, AREA and CENTROID are not computed.</description>"
            f'<languageFeatures type="ivo://ivoa.net/std/TAPRegExt#features-adqlgeo">{features}</languageFeatures>'
            "</language>"
            "<outputFormat><mime>application/x-votable+xml</mime><alias>votable</alias></outputFormat>"
            '<outputFormat><mime>text/csv;header=present</mime><alias>csv</alias></outputFormat>'
            '<uploadMethod ivo-id="ivo://ivoa.net/std/TAPRegExt#upload-inline"/>'
            '<uploadMethod ivo-id="ivo://ivoa.net/std/TAPRegExt#upload-http"/>'
            f'<retentionPeriod><default>{retention_s[0]:.0f}</default><hard>{retention_s[1]:.0f}</hard>'
            f"</retentionPeriod><executionDuration><default>{execution_s:.0f}</default><hard>{execution_s:.0f}</hard>"
            "</executionDuration>"
            f'<outputLimit><default unit="row">{default_maxrec}</default><hard unit="row">{max_maxrec}</hard>'
            f'</outputLimit><uploadLimit><hard unit="byte">{upload_bytes}</hard></uploadLimit>'
            f"</capability>{vosi}</vosi:capabilities>").encode()


def availability_xml(available: bool, note: str) -> bytes:
    """The VOSI ``availability`` document."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<vosi:availability '
            f'xmlns:vosi="http://www.ivoa.net/xml/VOSIAvailability/v1.0">'
            f"<vosi:available>{'true' if available else 'false'}</vosi:available>"
            f"<vosi:note>{escape(note)}</vosi:note></vosi:availability>").encode()
