"""The archive as an IVOA Table Access Protocol service (TAP 1.1) at ``/api/v1/tap``: synchronous queries.

TOPCAT, pyvo (``TAPService(url).run_sync(adql)``), astroquery and STILTS (``tapquery sync=true``)
query the archive in ADQL: ``GET|POST /api/v1/tap/sync`` with ``QUERY``, ``LANG=ADQL``
(``REQUEST=doQuery``, optional in TAP 1.1), ``MAXREC`` and ``FORMAT``/``RESPONSEFORMAT``
(``votable``, the default, or ``csv``), parameter names in any case (DALI). The VOSI resources
``/capabilities``, ``/availability`` and ``/tables`` describe it, ``/examples`` gives example queries
(DALI, :mod:`streams.web.tap_examples`), and the ``TAP_SCHEMA`` tables
are queryable (:mod:`streams.web.tap_schema`). The same queries run as asynchronous jobs (UWS 1.1)
at ``/async`` (:mod:`streams.web.tap_async`), through :func:`execute` as here.

A query is checked and translated by :mod:`streams.web.adql` (one SELECT over the published
tables), then run on a DuckDB connection of its own per pool thread (:class:`TapView`) with a
memory limit (``WebConfig.tap_memory_mb``), without access to any file but the archive's (a local
archive: ``enable_external_access`` off, the archive's folder allowed, the settings locked), and
interrupted after ``WebConfig.tap_timeout_s``. At most ``MAXREC`` rows are answered (default
``tap_maxrec``, at most ``tap_max_maxrec``), with ``QUERY_STATUS`` ``OVERFLOW`` when there were
more. Every error of the query is a VOTable with ``QUERY_STATUS`` ``ERROR`` and its reason,
answered with HTTP 200 as DALI and SCS do (pyvo raises ``DALQueryError``); tokens and the limits
on costly work are those of the other archive reads (401, 403, 429, 503 with the portal's JSON).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from fastapi import APIRouter, Request
from fastapi.responses import Response

from broker.archive.log import DataFile
from broker.archive.reader import FileFilter, may_hold_cone
from broker.errors import ArchiveError, BrokerError, InvalidQuery
from streams.triplet_png import printable
from streams.web import adql, queries, regions, tap_examples, tap_schema, tap_upload, vo
from streams.web.api import LIMITED, CostlyReader, Reader, portal_of
from streams.web.app import Portal
from streams.web.config import WebConfig
from streams.web.queries import ArchiveView, ObjectTable
from streams.web.tap_upload import UploadedTable
from streams.web.upload import read_form

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/tap", tags=["virtual observatory"])
#: Media types of the answers.
VOTABLE_TYPE, CSV_TYPE, XML_TYPE = "application/x-votable+xml", "text/csv; header=present", "text/xml"
#: ``FORMAT`` values read as VOTable (DALI's names and TAP 1.0's), and as CSV.
VOTABLE_FORMATS = {"votable", "application/x-votable+xml", "text/xml", "votable/td", "application/x-votable"}
CSV_FORMATS = {"csv", "text/csv", "text/csv;header=present"}
#: VOTable datatype of each Arrow type id of a result column (others: text).
_DATATYPES = {pa.int8(): "short", pa.int16(): "short", pa.uint8(): "short", pa.int32(): "int",
              pa.uint16(): "int", pa.int64(): "long", pa.uint32(): "long", pa.float32(): "float",
              pa.float64(): "double", pa.bool_(): "boolean"}


#: Most columns a result may have: astropy writes the VOTable's FIELDs at ~1 ms each, outside the time limit.
MAX_COLUMNS = 1000
#: Most cells (rows x columns) and bytes (Arrow's, of the rows answered) written: 50,000 rows of
#: broker.alerts' 26 columns (~0.7 s); a result wider or of longer text is cut, answered with OVERFLOW.
MAX_CELLS, MAX_BYTES = 1_300_000, 256 * 2**20


@dataclass(frozen=True)
class TapQuery:
    """A TAP request (synchronous or a job's): the ADQL, the most rows answered, and the answer's format."""

    query: str
    maxrec: int
    csv: bool = False


def _one(params: Mapping[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


def parse_request(params: Mapping[str, list[str]], config: WebConfig) -> TapQuery:
    """The query of a request's parameters (names upper-cased, each with its values).

    Raises
    ------
    InvalidQuery
        REQUEST other than doQuery, LANG other than ADQL, no QUERY, MAXREC not a whole number
        >= 0, or a FORMAT not VOTable or CSV (an ``UPLOAD`` is read by :func:`streams.web.tap_upload.read_uploads`).
    """
    request = _one(params, "REQUEST")
    if request is not None and request.lower() != "doquery":
        raise InvalidQuery(f"REQUEST={request[:40]!r}: this service answers REQUEST=doQuery")
    lang = _one(params, "LANG")
    if lang is not None and lang.upper().split("-")[0] != "ADQL":
        raise InvalidQuery(f"LANG={lang[:40]!r}: this service reads LANG=ADQL")
    query = _one(params, "QUERY")
    if query is None:
        raise InvalidQuery("QUERY is required (an ADQL SELECT)")
    maxrec, text = config.tap_maxrec, _one(params, "MAXREC")
    if text is not None:
        if not text.strip().isdigit():
            raise InvalidQuery(f"MAXREC={text[:40]!r} is not a whole number >= 0")
        maxrec = int(text.strip()) if len(text.strip()) < 12 else config.tap_max_maxrec
    fmt = (_one(params, "RESPONSEFORMAT") or _one(params, "FORMAT") or "votable").strip().lower().replace(" ", "")
    if fmt not in VOTABLE_FORMATS | CSV_FORMATS:
        raise InvalidQuery(f"FORMAT={fmt[:60]!r}: this service answers votable (default) or csv")
    return TapQuery(query, min(maxrec, config.tap_max_maxrec), fmt in CSV_FORMATS)


class Stop:
    """The abort of a running query from another thread (``PHASE=ABORT`` of an asynchronous job).

    :meth:`TapView.run` attaches its interrupt while the query runs; :meth:`request` calls it, at
    once if the query runs, or as soon as it starts.
    """

    def __init__(self) -> None:
        self.requested = False
        self._interrupt: Any = None
        self._lock = threading.Lock()

    def attach(self, interrupt: Any) -> None:
        """Hold the running query's ``interrupt()``, called now if an abort was already requested."""
        with self._lock:
            self._interrupt = interrupt
            if self.requested:
                interrupt()

    def detach(self) -> None:
        """Forget the query's interrupt (it ended)."""
        with self._lock:
            self._interrupt = None

    def request(self) -> None:
        """Abort: interrupt the query if one runs, and any started later."""
        with self._lock:
            self.requested = True
            if self._interrupt is not None:
                self._interrupt()


class TapView(ArchiveView):
    """The archive's DuckDB view for TAP queries: a connection per thread, limited, with ``TAP_SCHEMA`` registered.

    Parameters
    ----------
    archive : Archive
    config : WebConfig
        Its ``tap_memory_mb`` and ``tap_timeout_s``.
    objects : ObjectTable, optional
        ``broker.objects``' rows, shared with the portal's REST view (default: its own).
    """

    def __init__(self, archive: Any, config: WebConfig, objects: ObjectTable | None = None) -> None:
        super().__init__(archive, objects)
        self.config = config

    def _opened(self, con: Any, files: list[DataFile]) -> None:
        """Limit memory (no spilling to disk), make ``broker.alerts``' view of ``files``, register ``TAP_SCHEMA``, lock.

        The view (:data:`~streams.web.tap_schema.ALERTS_VIEW`) has a class where a file of ``files``
        holds one (:func:`~streams.web.tap_schema.classified`); every file but the archive's is shut off.
        """
        con.execute(f"SET memory_limit = '{int(self.config.tap_memory_mb)}MB'")
        con.execute("SET temp_directory = ''")  # no spilling: DuckDB's own bound is 90% of the free disk
        con.execute(regions.MACROS)
        classified = tap_schema.classified(f.schema_version for f in files)
        con.execute(f"CREATE VIEW {tap_schema.ALERTS_VIEW} AS {tap_schema.alerts_sql(classified)}")
        for name, table in tap_schema.tap_schema().items():
            con.register(name, table)
        if self.archive.local:
            root = self.archive.root.rstrip("/") + "/"
            con.execute("SET allowed_directories = [" + adql.sql_literal(root) + "]")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")

    def run(self, sql: str, tables: tuple[str, ...] = (), stop: Stop | None = None,
            timeout_s: float | None = None, uploads: tuple[UploadedTable, ...] = (), spent_s: float = 0.0,
            cone: tuple[float, float, float] | None = None, newest: adql.Newest | None = None) -> pa.Table:
        """The result of ``sql``, interrupted after ``timeout_s`` (InvalidQuery then, or ArchiveError).

        ``tables`` are the published tables it reads: with ``broker.objects``, its rows are those of
        the archive's current commit, grouped once per commit (:class:`ObjectTable`, under the time limit).
        ``timeout_s`` is at most ``tap_timeout_s`` (the default; :func:`time_limit`), of which
        ``spent_s`` (s) are already spent (reading the uploads); ``stop`` interrupts it from another
        thread (an asynchronous job aborted), which is InvalidQuery too. ``uploads`` are registered
        on the connection for this query only (``TAP_UPLOAD.name``), under the same limits.
        ``cone`` (RA, Dec, radius, deg; :attr:`streams.web.adql.Translation.cone`) holds every row a
        query of ``broker.alerts`` alone reads: it reads only the files whose bounds may hold one;
        ``newest`` (:attr:`streams.web.adql.Translation.newest`) makes such a newest-first query
        read only the newest alerts it may answer (:meth:`_within`).
        """
        import duckdb

        con, files = self._connection()
        fired = threading.Event()
        limit_s = time_limit(self.config, timeout_s)

        def interrupt() -> None:
            fired.set()
            con.interrupt()

        timer = threading.Timer(max(limit_s - spent_s, 0.0), interrupt)
        timer.start()
        try:
            if stop is not None:
                stop.attach(interrupt)
                if stop.requested:
                    raise InvalidQuery("the job was aborted before its query ran")
            if "broker.objects" in tables:
                self._register_objects(con, files)
            for upload in uploads:
                con.register(upload.registered, upload.rows)
            return con.sql(self._within(con, files, tables, cone, newest) + sql).to_arrow_table()
        except duckdb.InterruptException:
            if stop is not None and stop.requested:
                raise InvalidQuery("the job was aborted while its query ran") from None
            raise InvalidQuery(f"the query ran past this service's time limit of {limit_s:g} s: "
                               "select fewer rows (a CONTAINS cone, a narrower WHERE) or join less") from None
        except duckdb.OutOfMemoryException:
            raise InvalidQuery(f"the query needed more than this service's {self.config.tap_memory_mb} MiB of "
                               "memory: select fewer rows or columns, or group less") from None
        except duckdb.Error as exc:
            raise self.archive._error(exc, files) from None
        finally:
            timer.cancel()
            for upload in uploads:
                with contextlib.suppress(duckdb.Error):
                    con.unregister(upload.registered)
            if stop is not None:
                stop.detach()
            if fired.is_set():  # an interrupt may outlive its query: this connection is not used again
                self._forget()

    def _within(self, con: Any, files: list[DataFile], tables: tuple[str, ...],
                cone: tuple[float, float, float] | None, newest: adql.Newest | None = None) -> str:
        """The ``WITH`` that makes ``broker.alerts``' view read the rows a query may answer, as REST's reads, or "".

        Only for a query of ``broker.alerts`` alone: the files ``cone`` may reach (as REST's cone);
        for a newest-first query (``newest``), those whose MJDs reach the least MJD it may answer,
        and ``mjd >=`` it (:func:`streams.web.queries.newest_bound`, as REST's newest-first page;
        found on ``con``, under the query's time limit). The first copy of each alert is still that
        of every file (:meth:`broker.archive.reader.Archive.within`).
        """
        if (cone is None and newest is None) or tables != (tap_schema.table_of("broker.alerts").name,):
            return ""
        keep: FileFilter = (lambda f: True) if cone is None else (lambda f: may_hold_cone(f, *cone))
        low = None
        if newest is not None:
            def lowest(kept: FileFilter) -> dict:
                sql = self._with(files, kept) + queries.lowest_sql(newest.probe)
                return dict(con.sql(sql).to_arrow_table().to_pylist()[0])
            low, keep = queries.newest_bound(files, newest.rows, lowest, keep, every=False)
        return self._with(files, keep, None if low is None else f"mjd >= {low!r}")

    def _with(self, files: list[DataFile], keep: FileFilter, where: str | None = None) -> str:
        """:meth:`broker.archive.reader.Archive.within` of ``keep`` and ``where``, ``broker.alerts``' view over it."""
        classified = tap_schema.classified(f.schema_version for f in files)
        return self.archive.within(files, keep, ((tap_schema.ALERTS_VIEW, tap_schema.alerts_sql(classified)),), where)


def time_limit(config: WebConfig, timeout_s: float | None = None) -> float:
    """A query's time limit (s): ``timeout_s`` (a job's execution duration), at most ``tap_timeout_s`` (the default)."""
    return min(timeout_s or config.tap_timeout_s, config.tap_timeout_s)


def tap_view(portal: Portal) -> TapView:
    """The portal's :class:`TapView`, made at first use (Unavailable without an archive)."""
    portal.require_archive()
    view = portal.extras.get("tap")
    if view is None or view.archive is not portal.archive:
        view = portal.extras["tap"] = TapView(portal.archive, portal.config, portal.require_archive().objects)
    return view


def _known(translation: adql.Translation, uploads: tuple[UploadedTable, ...]) -> dict[str, Any]:
    """The columns of the tables a query reads by name (published or uploaded: a unit, UCD and description each)."""
    uploaded = {f"TAP_UPLOAD.{u.name}".lower(): u.columns for u in uploads}
    return {c.name.lower(): c for name in translation.tables
            for c in (uploaded[name.lower()] if name.lower() in uploaded else tap_schema.table_of(name).columns)}


def _fields(table: pa.Table, translation: adql.Translation, uploads: tuple[UploadedTable, ...] = ()) -> list[vo.Column]:
    """The VOTable columns of a result: names made unique, with the read column's unit and UCD where plain."""
    known = _known(translation, uploads)
    fields: list[vo.Column] = []
    seen: set[str] = set()
    suffix: dict[str, int] = {}  # the next number to try after each repeated name
    for name, kind in zip(table.column_names, table.schema.types, strict=True):
        key = name
        if key in seen:
            i = suffix.get(name, 2)
            while f"{name}_{i}" in seen:
                i += 1
            key, suffix[name] = f"{name}_{i}", i + 1
        seen.add(key)
        column = known.get(name.lower()) if translation.plain is None or name.lower() in translation.plain else None
        datatype = _DATATYPES.get(kind, "double" if pa.types.is_decimal(kind) else "unicodeChar")
        if datatype == "unicodeChar" and getattr(column, "datatype", None) == "char" and _ascii(table.column(len(
                fields))):
            datatype = "char"  # an uploaded column of ASCII text, answered as it came
        fields.append(vo.Column(key, datatype, column.unit if column else None, column.ucd if column else "",
                                column.description if column else "", getattr(column, "xtype", None)))
    return fields


def _ascii(column: pa.ChunkedArray) -> bool:
    """Whether every text of ``column`` is ASCII (a VOTable ``char`` may hold no other)."""
    import pyarrow.compute as pc

    return pa.types.is_string(column.type) and bool(pc.all(pc.string_is_ascii(column)).as_py() is not False)


def _rows(table: pa.Table, fields: list[vo.Column]) -> list[dict]:
    """The result's rows keyed by the fields' names, cells the CSV writer can hold (text for other types)."""
    columns = []
    for column, field in zip(table.columns, fields, strict=True):
        values = column.to_pylist()
        if field.datatype == "unicodeChar" and not pa.types.is_string(column.type):
            values = [None if v is None else str(v) for v in values]
        elif field.datatype in ("double", "float"):
            values = [None if v is None else float(v) for v in values]
        columns.append(values)
    return [dict(zip((f.key for f in fields), row, strict=True)) for row in zip(*columns, strict=True)]


def answered(table: pa.Table, maxrec: int) -> tuple[int, str]:
    """Rows of ``table`` answered (at most ``maxrec``, :data:`MAX_CELLS`, :data:`MAX_BYTES`), and why cut ('' if not).

    Raises
    ------
    InvalidQuery
        More than :data:`MAX_COLUMNS` columns.
    """
    if table.num_columns > MAX_COLUMNS:
        raise InvalidQuery(f"the query selects {table.num_columns} columns: this service answers at most "
                           f"{MAX_COLUMNS}")
    rows = min(table.num_rows, maxrec, MAX_CELLS // max(table.num_columns, 1))
    width = table.slice(0, rows).nbytes / rows if rows else 0.0
    if width and rows * width > MAX_BYTES:
        rows = max(1, int(MAX_BYTES // width))
    if rows >= table.num_rows:
        return table.num_rows, ""
    if rows == maxrec:
        return rows, f"more than MAXREC={maxrec} rows"
    return rows, (f"cut at {rows} rows: this service writes at most {MAX_CELLS:,} cells and {MAX_BYTES >> 20} MiB "
                  "per result; select fewer columns or rows")


def result_votable(table: pa.Table, translation: adql.Translation, maxrec: int,
                   uploads: tuple[UploadedTable, ...] = ()) -> bytes:
    """The VOTable of a result: QUERY_STATUS OK, or OVERFLOW past ``maxrec`` rows or the bounds (:func:`answered`).

    Its rows are written column by column with Arrow (:func:`streams.web.vo.votable`).
    """
    n, cut = answered(table, maxrec)
    status = ("QUERY_STATUS", "OVERFLOW", cut) if cut else ("QUERY_STATUS", "OK", "")
    return vo.votable([status], tuple(_fields(table, translation, uploads)), table.slice(0, n), "result")


def result_csv(table: pa.Table, translation: adql.Translation, maxrec: int,
               uploads: tuple[UploadedTable, ...] = ()) -> bytes:
    """The CSV of a result (a header line; null cells empty), cut as :func:`answered` says without a mark."""
    n, _ = answered(table, maxrec)
    fields = _fields(table, translation, uploads)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([f.key for f in fields])
    for row in _rows(table.slice(0, n), fields):
        writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else
                         (printable(v) if isinstance(v, str) else v) for v in row.values()])
    return out.getvalue().encode()


@dataclass(frozen=True)
class TapAnswer:
    """The answer to a TAP query: its body, media type, and the error's message (None: a result)."""

    body: bytes
    media_type: str
    error: str | None = None


def execute(portal: Portal, params: Mapping[str, list[str]], stop: Stop | None = None,
            timeout_s: float | None = None, parts: Mapping[str, bytes] | None = None) -> TapAnswer:
    """The answer to a TAP query, synchronous or a job's: its result, or its error as a VOTable.

    ``stop`` and ``timeout_s`` are those of :meth:`TapView.run` (an asynchronous job's abort and
    execution duration); ``parts`` the files of the request's form, by part name, read as the
    tables ``UPLOAD`` names (:func:`streams.web.tap_upload.read_uploads`), within the query's time
    limit: the query has what their reading left of it.
    """
    try:
        request = parse_request(params, portal.config)
        started = time.monotonic()
        uploads = tap_upload.read_uploads(_one(params, "UPLOAD"), parts or {}, time_limit(portal.config, timeout_s))
        translation = adql.translate(request.query, tap_schema.published() + tuple(u.published() for u in uploads),
                                     request.maxrec)
        table = tap_view(portal).run(translation.sql, translation.tables, stop, timeout_s, uploads,
                                     time.monotonic() - started, translation.cone,
                                     translation.newest)
        if request.csv:
            return TapAnswer(result_csv(table, translation, request.maxrec, uploads), CSV_TYPE)
        return TapAnswer(result_votable(table, translation, request.maxrec, uploads), VOTABLE_TYPE)
    except BrokerError as exc:
        return TapAnswer(error_votable(exc), VOTABLE_TYPE, error_message(exc))
    except Exception as exc:  # a fault of ours: logged, and the client told so, never a trace
        log.exception("TAP query failed")
        message = f"internal error of the service ({type(exc).__name__}); it is logged"
        return TapAnswer(vo.votable([("QUERY_STATUS", "ERROR", message)]), VOTABLE_TYPE, message)


def error_message(exc: BrokerError) -> str:
    """The message of a query's error as the client reads it: one printable line of at most 2,000 characters."""
    message = printable(" ".join(str(exc).split()))[:2000]
    if isinstance(exc, ArchiveError) and message.startswith("query failed: "):
        message = "DuckDB refused the translated query: " + message.removeprefix("query failed: ")
    return message


def error_votable(exc: BrokerError) -> bytes:
    """The DALI error document of ``exc``: ``QUERY_STATUS`` ``ERROR`` with its message."""
    return vo.votable([("QUERY_STATUS", "ERROR", error_message(exc))])


def _openapi() -> dict:
    """The OpenAPI parameters of ``/sync`` (DALI's names; any case is read)."""
    return {"parameters": [
        {"name": n, "in": "query", "required": n == "QUERY", "schema": {"type": "string"}, "description": d}
        for n, d in (("QUERY", "the ADQL query: one SELECT over the tables of /api/v1/tap/tables"),
                     ("LANG", "ADQL (the default)"), ("REQUEST", "doQuery (optional in TAP 1.1)"),
                     ("MAXREC", "most rows answered (default and most: the server's tap_maxrec, tap_max_maxrec)"),
                     ("FORMAT", "votable (default) or csv; RESPONSEFORMAT too"))]}


#: Most fields of a posted TAP form (DALI's parameters are a handful).
MAX_FORM_FIELDS = 64


async def request_form(request: Request) -> tuple[dict[str, list[str]], dict[str, bytes]]:
    """The request's parameters (query string and form, names upper-cased: DALI) and its form's parts by name.

    The parts are the files of a multipart form (the tables of ``UPLOAD``, each at most
    :data:`~streams.web.tap_upload.MAX_UPLOAD_BYTES`), and any plain field ``UPLOAD`` names as a part.

    Raises
    ------
    InvalidQuery
        A malformed form, a part given twice or over its bound, more than
        :data:`~streams.web.tap_upload.MAX_UPLOADS` files.
    """
    items = list(request.query_params.multi_items())
    fields: dict[str, str] = {}
    parts: dict[str, bytes] = {}
    if request.method == "POST":
        multipart = request.headers.get("content-type", "").lower().startswith("multipart/")
        # a multipart form through upload.read_form: Starlette's own parser left a part cut short open
        opened = read_form(request, max_files=tap_upload.MAX_UPLOADS, max_fields=MAX_FORM_FIELDS) if multipart \
            else request.form(max_files=0, max_fields=MAX_FORM_FIELDS)
        async with opened as form:
            for name, value in form.multi_items():
                if isinstance(value, str):
                    items.append((name, value))
                    fields.setdefault(name, value)
                    continue
                data = await value.read(tap_upload.MAX_UPLOAD_BYTES + 1)
                if name in parts or len(data) > tap_upload.MAX_UPLOAD_BYTES:
                    raise InvalidQuery(f"the form's part {name[:60]!r} is given twice or over "
                                       f"{tap_upload.MAX_UPLOAD_BYTES >> 20} MiB")
                parts[name] = data
    params: dict[str, list[str]] = {}
    for name, value in items:
        params.setdefault(name.upper(), []).append(value)
    for _, part in _named_parts(_one(params, "UPLOAD")):
        if part not in parts and part in fields:  # a table sent as a plain field (no file name)
            parts[part] = fields[part].encode()
    return params, parts


def _named_parts(upload: str | None) -> list[tuple[str, str]]:
    """The (name, part) pairs of an ``UPLOAD`` value; none when absent or malformed (refused later, in execute)."""
    try:
        return tap_upload.upload_pairs(upload) if upload else []
    except InvalidQuery:
        return []


async def request_params(request: Request) -> dict[str, list[str]]:
    """The request's parameters, query string and form body, names upper-cased (DALI); its files are not read."""
    return (await request_form(request))[0]


_SYNC_ANSWERS: dict[int | str, dict[str, Any]] = {**LIMITED, 200: {"content": {VOTABLE_TYPE: {}, CSV_TYPE: {}}}}


@router.get("/sync", response_class=Response, openapi_extra=_openapi(), responses=_SYNC_ANSWERS)
async def sync(request: Request, who: CostlyReader) -> Response:
    """TAP 1.1 synchronous query: the result of the ADQL ``QUERY`` as a VOTable (or CSV), or its error as one."""
    return await _sync(request)


@router.post("/sync", response_class=Response, responses=_SYNC_ANSWERS)
async def sync_post(request: Request, who: CostlyReader) -> Response:
    """TAP 1.1 synchronous query posted as a form (``application/x-www-form-urlencoded`` or multipart), as GET."""
    return await _sync(request)


async def _sync(request: Request) -> Response:
    portal = portal_of(request)
    try:
        params, parts = await request_form(request)
    except Exception as exc:  # a body the form parser refuses (a broken multipart)
        return Response(error_votable(InvalidQuery(f"the request body is not a form: {exc}")), media_type=VOTABLE_TYPE)
    answer = await portal.run(execute, portal, params, None, None, parts)
    return Response(answer.body, media_type=answer.media_type)


def _base(request: Request) -> str:
    return str(request.url_for("sync")).removesuffix("/sync")


@router.get("", response_class=Response, responses={200: {"content": {XML_TYPE: {}}}})
async def base(request: Request, who: Reader) -> Response:
    """The service's URL, what clients are given: its VOSI capabilities, as at ``/capabilities``."""
    return await capabilities(request, who)


@router.get("/capabilities", response_class=Response, responses={200: {"content": {XML_TYPE: {}}}})
async def capabilities(request: Request, who: Reader) -> Response:
    """VOSI capabilities: TAP 1.1 (sync and async), ADQL 2.0 and its geometry, VOTable and CSV, the limits."""
    cfg = portal_of(request).config
    return Response(tap_schema.capabilities_xml(_base(request), cfg.tap_maxrec, cfg.tap_max_maxrec,
                                                (cfg.tap_job_destruction_s, cfg.tap_job_max_destruction_s),
                                                cfg.tap_timeout_s, tap_upload.MAX_UPLOAD_BYTES), media_type=XML_TYPE)


@router.get("/availability", response_class=Response, responses={200: {"content": {XML_TYPE: {}}}})
async def availability(request: Request, who: Reader) -> Response:
    """VOSI availability: whether the service has an archive to query."""
    has = portal_of(request).archive is not None
    note = "the alert archive is served" if has else "this server has no alert archive (broker serve --archive)"
    return Response(tap_schema.availability_xml(has, note), media_type=XML_TYPE)


@router.get("/tables", response_class=Response, responses={200: {"content": {XML_TYPE: {}}}})
async def tables(request: Request, who: Reader) -> Response:
    """VOSI tables: the schemas, tables and columns (units, UCDs, types) queries may read; ``detail`` is ignored."""
    return Response(tap_schema.tables_xml(), media_type=XML_TYPE)


@router.get("/examples", response_class=Response, responses={200: {"content": {tap_examples.XHTML_TYPE: {}}}})
async def examples(request: Request, who: Reader) -> Response:
    """DALI examples: ADQL queries of the archive as XHTML with RDFa (TOPCAT's *Service-provided examples*)."""
    return Response(tap_examples.examples_xhtml(_base(request)), media_type=tap_examples.XHTML_TYPE)
