"""The portal's reads of the archive (DuckDB) and the object history (SQL): blocking, run in its thread pool.

Each function answers one endpoint's question with plain dicts; :mod:`streams.web.api` runs them
through :meth:`streams.web.app.Portal.run`, so no read holds the event loop.
"""

from __future__ import annotations

import csv
import io
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from broker.archive.bounds import RA_SLACK_DEG, FileFilter, in_time, may_hold_cone
from broker.archive.log import DataFile
from broker.archive.reader import Archive, cone_where
from broker.archive.rows import record_of
from broker.errors import InvalidQuery, NotFound
from broker.forced import check_position as check_sky_position
from broker.history import ObjectHistory
from broker.reference import path_component
from broker.vetting import MAX_ID_CHARS
from broker.watchlist import Watchlist
from streams.alert_expr import AlertFilter
from streams.triplet_png import printable
from streams.web import tap_schema
from streams.web.records import _num, decode_cursor, encode_cursor, summary_of, summary_of_row

#: Columns of an ``AlertSummary`` read by SQL (the struct fields exist in every schema version).
SUMMARY_COLUMNS = ("alert_id, object_id, candid, frame_id, telescope, mjd, ra, dec, filter AS band, magpsf, "
                   "alert.source.sigmapsf AS sigmapsf, snr, rb, anomaly, alert.source.x AS x, alert.source.y AS y")
#: Columns of the CSV answer: the entry's, the distance, then the alert summary's.
CSV_COLUMNS = ("watch_name", "watch_ra", "watch_dec", "watch_radius_arcsec", "distance_arcsec", "alert_id",
               "object_id", "candid", "frame_id", "telescope", "band", "mjd", "ra", "dec", "magpsf", "sigmapsf",
               "snr", "rb", "anomaly", "class", "class_probability")
#: Alerts read at most by one filtered page (count): a rare filter answers a partial page and its cursor.
MAX_SCAN = 2000
#: Alerts read at a time by a filtered page (count).
SCAN_BATCH = 250
#: Time a filtered page may spend reading and filtering (s): a costly filter (within the filter
#: language's bounds, ~3 ms an alert) answers a partial page and its cursor, as a rare one does.
MAX_SCAN_S = 2.0
_NEWEST_FIRST = "ORDER BY mjd DESC, alert_id DESC"
_OBSERVATION_ORDER = "ORDER BY mjd, kafka_topic, kafka_partition, kafka_offset"
_HISTORY_COLUMNS = ("cand_id", "mjd", "filter", "flux", "flux_err", "snr", "rb", "magzp", "limiting_flux",
                    "telescope")


class Queryable(Protocol):
    """What the reads need of an archive: its committed files and SQL over its view ``alerts``."""

    def files(self) -> list[DataFile]:
        """The committed files."""
        ...

    def query(self, sql: str, *, keep: FileFilter | None = None, files: list[DataFile] | None = None) -> pa.Table:
        """The result of ``sql``, over the files ``keep`` keeps (:meth:`broker.archive.reader.Archive.within`).

        ``files``: the committed files, as :meth:`files` gave them to the caller (not read again).
        """
        ...


class ObjectTable:
    """The archive's objects, one row each (:func:`streams.web.tap_schema.objects_sql`), grouped once per commit.

    Shared by the portal's threads, REST (``/api/v1/objects``, ``/api/v1/scs/objects``) and TAP
    (``broker.objects``): the first read after a commit groups every alert of the archive (~0.1 s
    at 100,000 alerts, ``bench/portal.py``), the others wait for it, then read the same Arrow table.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: tuple[tuple, pa.Table] | None = None
        #: Times the alerts were grouped: once per commit that a read saw.
        self.groupings = 0

    def rows(self, con: Any, files: list[DataFile]) -> pa.Table:
        """The objects of ``files`` (the commit ``con``'s view reads), grouped by ``con`` unless held."""
        key = tuple((f.path, f.rows) for f in files)
        with self._lock:  # one thread groups, the others wait for its rows
            if self._held is None or self._held[0] != key:
                sql = tap_schema.objects_sql(tap_schema.classified(f.schema_version for f in files))
                self._held = (key, con.sql(sql).to_arrow_table())
                self.groupings += 1
            return self._held[1]


class ArchiveView:
    """An archive's DuckDB view kept open per thread, and opened again when a commit changes its files.

    Opening the view costs ~25 ms at the demo's size (DuckDB reads every file's footer), a query on
    an open one a few ms (``bench/portal.py``); the commit log is read once a request (~0.3 ms;
    its queries take those files, ``files=``), so a request sees every commit made before it.
    Files a compaction retires stay readable for ``ArchiveConfig.retain_removed_seconds``, so an
    open view never reads a missing file.

    Parameters
    ----------
    archive : Archive
    objects : ObjectTable, optional
        The objects of the archive's current commit, as the table ``tap_objects`` (default: its own).
    """

    def __init__(self, archive: Archive, objects: ObjectTable | None = None) -> None:
        self.archive = archive
        self.objects = objects if objects is not None else ObjectTable()
        self._local = threading.local()

    def files(self) -> list[DataFile]:
        """The committed files (from the commit log)."""
        return self.archive.files()

    def count(self) -> int:
        """Alerts in the archive."""
        return self.archive.count()

    def _connection(self, files: list[DataFile] | None = None) -> tuple[Any, list[DataFile]]:
        """The connection of this thread over ``files`` (default: the commit log's now), and them."""
        files = self.archive.files() if files is None else files
        key = tuple((f.path, f.rows) for f in files)
        held = getattr(self._local, "held", None)
        if held is None or held[0] != key:
            if held is not None:
                held[1].close()
            con = self.archive.connect(files=files)
            con.execute("SET enable_object_cache = true")  # Parquet footers read once per view, not per query
            self._opened(con, files)
            held = self._local.held = (key, con, files)
        return held[1], held[2]

    def _opened(self, con: Any, files: list[DataFile]) -> None:
        """Set up a connection just opened over ``files`` (a subclass's settings; nothing here)."""

    def _forget(self) -> None:
        """Close this thread's connection: the next query opens another."""
        held = getattr(self._local, "held", None)
        if held is not None:
            held[1].close()
            self._local.held = None

    def _register_objects(self, con: Any, files: list[DataFile]) -> None:
        """Make ``con``'s ``tap_objects`` the objects of the archive's current commit (an Arrow table, not copied)."""
        table = self.objects.rows(con, files)
        registered = getattr(self._local, "objects", None)
        if registered is None or registered[0] is not con or registered[1] is not table:
            con.register(tap_schema.OBJECTS_TABLE, table)
            self._local.objects = (con, table)

    def query(self, sql: str, objects: bool = False, keep: FileFilter | None = None,
              files: list[DataFile] | None = None) -> pa.Table:
        """The result of ``sql`` over the view ``alerts`` (errors as :meth:`Archive.query`).

        With ``objects``, ``sql`` may also read ``tap_objects``: :class:`ObjectTable`'s rows. With
        ``keep``, ``alerts`` reads only the files it keeps (:meth:`Archive.within`), of the commit
        this thread's view reads (so a compaction in between never hides a row). ``files``: the
        committed files a caller read from the log for this request (:meth:`files`), so that it is
        read once (default: read here).
        """
        import duckdb

        con, files = self._connection(files)
        try:
            if objects:
                self._register_objects(con, files)
            rel = con.sql(self.archive.within(files, keep) + sql)
            return rel.to_arrow_table() if rel is not None else pa.table({})
        except duckdb.Error as exc:
            raise self.archive._error(exc, files) from exc


def sql_str(text: str) -> str:
    """``text`` as a SQL string literal (quotes doubled); InvalidQuery for an id no alert can have.

    Ids are taken up to :data:`broker.vetting.MAX_ID_CHARS` (1024), as labels take them: a frame id
    (``FRAMEID``, continued over cards) and so a candidate id may be longer than a file name.
    """
    if len(text) > MAX_ID_CHARS or "\x00" in text:
        raise InvalidQuery(f"an id is at most {MAX_ID_CHARS} characters, without NUL")
    return "'" + text.replace("'", "''") + "'"


def _summary_select(files: list[DataFile]) -> str:
    """``SELECT`` of the summary columns, with the classification where a v3+ file of ``files`` holds one."""
    classified = tap_schema.classified(f.schema_version for f in files)
    classification = "alert.classification" if classified else "NULL"
    return f"SELECT {SUMMARY_COLUMNS}, {classification} AS classification"


def summaries(archive: Queryable, where: str, order: str, limit: int, extra: str = "",
              keep: FileFilter | None = None, files: list[DataFile] | None = None) -> list[dict]:
    """``AlertSummary`` of the alerts matching ``where``, in ``order``, at most ``limit``.

    Only the files ``keep`` keeps are read (:meth:`broker.archive.reader.Archive.within`), of
    ``files`` (the committed files the caller read; default: the commit log is read here, once).
    """
    files = archive.files() if files is None else files
    sql = f"{_summary_select(files)}{extra} FROM alerts WHERE {where} {order} LIMIT {int(limit)}"
    return [summary_of_row(r) for r in archive.query(sql, keep=keep, files=files).to_pylist()]


def _after(cursor: str | None) -> str:
    """The SQL condition of the alerts after ``cursor`` in newest-first order (``true`` without one)."""
    if not cursor:
        return "true"
    mjd, alert_id = decode_cursor(cursor)
    return f"(mjd < {mjd!r} OR (mjd = {mjd!r} AND alert_id < {alert_id}))"


def _newest_files(files: list[DataFile], keep: FileFilter, rows: int) -> FileFilter:
    """The files ``keep`` keeps of the newest ``mjd_max`` that hold ``rows`` rows between them (``keep`` if all do)."""
    timed = sorted(((f.mjd_max, f.path, f.rows) for f in files if keep(f) and f.mjd_max is not None), reverse=True)
    chosen, held = set(), 0
    for _, path, n in timed:
        if held >= rows:
            return lambda f: f.path in chosen
        chosen.add(path)
        held += n
    return keep


#: Times a newest-first top-N's count of rows the files of a second look for its bound hold, where
#: every file is not looked in (:func:`newest_bound`): TAP's ``WHERE rb > 0.9`` (a tenth of the
#: alerts) found its bound there (36 ms, 96 unbounded), where a rare match costs one look more.
WIDER_LOOK = 16


def lowest_sql(newest: str) -> str:
    """SQL of the least MJD (``low``) of the rows of ``newest``, their count (``n``) and those with an MJD (``timed``).

    ``newest`` is a query of the ``mjd`` of the newest rows of a selection, newest first (nulls
    last), with a ``LIMIT``: REST's page (:func:`_newest`) or a TAP query's (``adql.Newest.probe``).
    """
    return f"SELECT min(mjd) AS low, count(*) AS n, count(mjd) AS timed FROM ({newest})"


def newest_bound(files: list[DataFile], rows: int, lowest: Callable[[FileFilter], dict], keep: FileFilter,
                 every: bool = True) -> tuple[float | None, FileFilter]:
    """The least MJD of the ``rows`` newest rows of a selection (None: no bound), and the files that may hold them.

    A newest-first top-N (``ORDER BY mjd DESC ... LIMIT rows``) is then the same with ``mjd >=``
    that bound added to its WHERE (every row of it is at or above the bound, and at least ``rows``
    rows are), over the files whose MJD bounds reach it; DuckDB checks the comparison against
    each row group's statistics, so only the row groups of the newest alerts are read. The
    selection must be a condition on each row alone (one table, no aggregate, nothing random).
    The bound is first looked for in the files of the newest MJDs that hold ``rows`` rows (the
    ``rows``-th newest of some alerts is at most that of all of them, so it bounds the top-N
    too), in all of them if those match fewer (with ``every``; without, in those that hold
    :data:`WIDER_LOOK` times ``rows``, if not all). None when no row matches, the newest include a
    null MJD (a null sorts last: the top-N holds rows of no MJD), or, without ``every``, the files
    looked in match fewer than ``rows``.

    Parameters
    ----------
    files : list of DataFile
        The committed files the selection reads.
    rows : int
        The top-N's count (its LIMIT, plus its OFFSET).
    lowest : callable
        The row of :func:`lowest_sql` of the selection's newest ``rows`` over the files a
        :data:`~broker.archive.reader.FileFilter` keeps.
    keep : FileFilter
        The files the selection may read at all (those of a cone, of MJDs up to a cursor's).
    every : bool
        Whether to look in every file ``keep`` keeps when the newest match fewer than ``rows``.
        Default True: REST's pages, whose selection is a cursor at most. A TAP query's ``WHERE``
        may match a few alerts anywhere, which that look reads every file for, as the query
        does: such a query took twice as long (``object_id = ...``, 155 ms where it took 82 with
        no bound, ``bench/pruning.py``'s archive).
    """
    newest = _newest_files(files, keep, rows)
    row = lowest(newest)
    if row["n"] < rows and newest is not keep:
        newest = keep if every else _newest_files(files, keep, WIDER_LOOK * rows)
        if newest is keep and not every:
            return None, keep
        row = lowest(newest)
    if (row["n"] < rows and newest is not keep) or row["n"] == 0 or row["timed"] < row["n"] or \
            not math.isfinite(row["low"]):
        return None, keep
    low = float(row["low"])
    return low, lambda f: keep(f) and in_time(low, None)(f)


def _newest(archive: Queryable, where: str, limit: int, files: list[DataFile],
            high: float | None = None) -> tuple[str, FileFilter]:
    """``where`` and ``mjd`` at least the ``limit``-th newest MJD of the alerts matching it; the files to read.

    A newest-first page is a top-N, for which DuckDB read the page's columns in every row group:
    230 ms p50 for the newest 100 of 10^6 alerts, 1.8 s for a filtered page (its batches of whole
    records). The bound (:func:`newest_bound`), found from ``mjd`` alone, lets the page read only
    the row groups of the newest alerts, of the files whose MJDs reach it, of those that may hold
    an MJD up to ``high`` (``where`` holds none above it: a cursor's), of ``files`` (the committed
    files the caller read from the log).
    """
    sql = lowest_sql(f"SELECT mjd FROM alerts WHERE {where} ORDER BY mjd DESC LIMIT {int(limit)}")
    low, keep = newest_bound(files, limit, lambda kept: dict(archive.query(sql, keep=kept, files=files).to_pylist()[0]),
                             in_time(None, high))
    return (where, keep) if low is None else (f"({where}) AND mjd >= {low!r}", keep)


def latest(archive: Queryable, limit: int, cursor: str | None) -> dict:
    """A newest-first page of alert summaries: ``{"items", "next"}`` (``next`` null on the last page)."""
    files = archive.files()
    where, keep = _newest(archive, _after(cursor), limit + 1, files, decode_cursor(cursor)[0] if cursor else None)
    rows = summaries(archive, where, _NEWEST_FIRST, limit + 1, keep=keep, files=files)
    items = rows[:limit]
    more = len(rows) > limit
    return {"items": items, "next": encode_cursor(items[-1]["mjd"], items[-1]["alert_id"]) if more else None}


def records_of(archive: Queryable, sql: str, keep: FileFilter | None = None,
               files: list[DataFile] | None = None) -> list[dict]:
    """The alert records of ``sql``, a query of ``schema_version, alert`` over the archive, in its order.

    Only the files ``keep`` keeps are read (:meth:`broker.archive.reader.Archive.within`), of
    ``files`` (the committed files the caller read; default: read from the log by the query).
    """
    table = archive.query(sql, keep=keep, files=files)
    versions, values = table.column(0).to_pylist(), table.column(1).to_pylist()
    return [record_of(value, version) for version, value in zip(versions, values, strict=True)]


def latest_filtered(archive: Queryable, flt: AlertFilter, limit: int, cursor: str | None) -> dict:
    """A newest-first page of the alerts that pass ``flt`` (evaluated on whole records).

    A page reads at most :data:`MAX_SCAN` alerts, for at most :data:`MAX_SCAN_S` s (and at least one
    alert): a filter that few alerts pass, or a costly one, returns fewer than ``limit`` items with
    a ``next`` cursor to read on from (null once the archive is read).
    """
    items: list[dict] = []
    where, scanned = _after(cursor), 0
    high = decode_cursor(cursor)[0] if cursor else None
    last: tuple[float, int] | None = None
    deadline = time.monotonic() + MAX_SCAN_S
    while len(items) < limit and scanned < MAX_SCAN:
        batch = min(SCAN_BATCH, MAX_SCAN - scanned)
        files = archive.files()
        bounded, keep = _newest(archive, where, batch, files, high)
        records = records_of(archive, f"SELECT schema_version, alert FROM alerts WHERE {bounded} {_NEWEST_FIRST} "
                                      f"LIMIT {batch}", keep, files)
        if not records:
            return {"items": items, "next": None}
        for record in records:
            scanned += 1
            last = (record["source"]["mjd"], int(record["alertId"]))
            if flt(record):
                items.append(summary_of(record))
                if len(items) == limit:
                    break
            if time.monotonic() >= deadline:
                break
        if time.monotonic() >= deadline:
            break
        if last is not None:
            where, high = _after(encode_cursor(last[0], last[1])), last[0]
    return {"items": items, "next": encode_cursor(last[0], last[1]) if last is not None else None}


def alert_record(archive: Queryable, alert_id: int) -> dict:
    """The whole record of alert ``alert_id``. NotFound when the archive does not hold it."""
    if not -2 ** 63 <= alert_id < 2 ** 63:
        raise NotFound(f"no alert {alert_id}: alert ids are 64-bit integers")
    records = records_of(archive, f"SELECT schema_version, alert FROM alerts WHERE alert_id = {int(alert_id)} LIMIT 1")
    if records:
        return records[0]
    raise NotFound(f"no alert {alert_id} in the archive")


def object_records(archive: Queryable | None, object_id: str) -> list[dict]:
    """Every archived alert record of ``object_id``, oldest first (empty without an archive).

    Read in two steps: the files that hold its alerts, from the ``object_id`` column alone (each
    file's footer is still opened), then the records from those files only (reading the records
    column across every file cost ~3 times as much, ``bench/pruning.py``). No position is assumed:
    an object's alerts may lie anywhere (association follows the object's moving mean position,
    and the archive holds what was published, whatever the history holds). Both steps read the
    files of one read of the commit log, so a commit between them (a compaction, an earlier copy)
    changes neither; should fewer rows come back all the same, the records are read again from
    every file.
    """
    if archive is None:
        return []
    where = f"object_id = {sql_str(object_id)}"
    files = archive.files()
    held = archive.query(f"SELECT filename, count(*) AS n FROM alerts_files WHERE {where} GROUP BY filename",
                         files=files)
    if held.num_rows == 0:
        return []
    names = held.column(0).to_pylist()
    sql = f"SELECT schema_version, alert FROM alerts WHERE {where} {_OBSERVATION_ORDER}"
    records = records_of(archive, sql, keep=lambda f: any(n.endswith("/" + f.path) for n in names), files=files)
    if len(records) == sum(held.column(1).to_pylist()):
        return records
    return records_of(archive, sql)


def history_of(history: ObjectHistory | None, object_id: str) -> tuple[dict | None, list[dict]]:
    """The history's row of ``object_id`` (ra, dec, ndet, first_mjd, features, classification) and its detections."""
    if history is None:
        return None, []
    row = history.store.execute("SELECT ra, dec, ndet, first_mjd FROM objects WHERE object_id = ?",
                                (object_id,)).fetchone()
    if row is None:
        return None, []
    features, classification = history.summary(object_id)
    obj = {"ra": row[0], "dec": row[1], "ndet": row[2], "first_mjd": row[3], "features": features,
           "classification": classification}
    dets = history.store.execute(f"SELECT {', '.join(_HISTORY_COLUMNS)} FROM detections WHERE object_id = ? "
                                 "ORDER BY mjd, cand_id", (object_id,)).fetchall()
    return obj, [dict(zip(_HISTORY_COLUMNS, d, strict=True)) for d in dets]


def cone(archive: Queryable, ra: float, dec: float, radius_arcsec: float, limit: int) -> list[dict]:
    """Alert summaries within ``radius_arcsec`` of (``ra``, ``dec``) (deg), nearest first, with ``distance_arcsec``.

    Reads only the files whose bounds may hold such an alert (:func:`broker.archive.reader.may_hold_cone`).
    """
    radius = radius_arcsec / 3600.0
    extra = f", ang_sep_deg(ra, dec, {ra!r}, {dec!r}) * 3600.0 AS distance_arcsec"
    return summaries(archive, cone_where(ra, dec, radius), "ORDER BY distance_arcsec, mjd DESC", limit, extra,
                     keep=lambda f: may_hold_cone(f, ra, dec, radius))


#: Columns of :func:`object_cone`'s rows, in their order.
_OBJECT_CONE_COLUMNS = "object_id, n_alerts, first_mjd, last_mjd, ra, dec, last_mag, last_band, max_rb, max_anomaly"


def object_cone(archive: ArchiveView, ra: float, dec: float, radius_arcsec: float, limit: int) -> list[dict]:
    """The objects whose mean alert position lies within ``radius_arcsec`` of (``ra``, ``dec``), nearest first.

    One row per object, over all its archived alerts: ``object_id``, mean ``ra`` and ``dec`` (the
    circular mean of RA), ``distance_arcsec``, ``n_alerts``, ``first_mjd``, ``last_mjd``, the
    newest alert's ``last_mag`` and ``last_band``, ``max_rb``, ``max_anomaly``, and the newest
    ``class`` with its ``class_probability``. Read from :class:`ObjectTable`, the objects grouped
    once per commit (as TAP's ``broker.objects``), not from the alerts at each request.
    """
    band = radius_arcsec / 3600.0 + RA_SLACK_DEG  # |dec - dec0| <= separation: a band to skip the others by
    sql = (f"SELECT * FROM (SELECT {_OBJECT_CONE_COLUMNS}, ang_sep_deg(ra, dec, {ra!r}, {dec!r}) * 3600.0 AS "
           f'distance_arcsec, class_label AS "class", class_probability FROM {tap_schema.OBJECTS_TABLE} '
           f"WHERE dec BETWEEN {dec - band!r} AND {dec + band!r}) "
           f"WHERE distance_arcsec <= {radius_arcsec!r} ORDER BY distance_arcsec, object_id LIMIT {int(limit)}")
    return [_object_row(r) for r in archive.query(sql, objects=True).to_pylist()]


def _object_row(row: dict) -> dict:
    """A row of :func:`object_cone`, its non-finite numbers null."""
    return {k: (_num(v) if isinstance(v, float) else v) for k, v in row.items()}


#: Most (entry, file) pairs whose bounds :func:`crossmatch` compares (count): past it, the files of a
#: large watchlist are chosen by time alone. 50,000 (500 entries over 100 files): ~60 ms at worst,
#: measured 0.25 s for 200,000 pairs of entries within each file's band of declination and outside
#: its RA (1.2 us a pair), 1.3 ms for entries outside every file's band (numpy alone).
MATCH_FILE_PAIRS = 50_000


def _watched_files(files: list[DataFile], watchlist: Watchlist, since_mjd: float | None) -> FileFilter:
    """The files that may hold an alert within an entry's radius at or after ``since_mjd`` (:func:`may_hold_cone`).

    A file within no entry's band of declination is left out without the RA test; by time alone
    past :data:`MATCH_FILE_PAIRS` pairs.
    """
    timed = in_time(since_mjd, None)
    if len(watchlist) * len(files) > MATCH_FILE_PAIRS:
        return timed
    radius = watchlist.radius_arcsec / 3600.0 + RA_SLACK_DEG

    def keep(f: DataFile) -> bool:
        if not timed(f):
            return False
        near = np.ones(len(watchlist), bool)
        if f.dec_min is not None and f.dec_max is not None:
            near = (watchlist.dec + radius >= f.dec_min) & (watchlist.dec - radius <= f.dec_max)
        return any(may_hold_cone(f, float(watchlist.ra[i]), float(watchlist.dec[i]),
                                 float(watchlist.radius_arcsec[i]) / 3600.0) for i in np.flatnonzero(near))
    return keep


def _holding(ra: np.ndarray, dec: np.ndarray, mjd: np.ndarray) -> FileFilter:
    """The files whose bounds hold one of the positions and times (deg, days; NaN: any), or have none."""
    def inside(low: float | None, high: float | None, values: np.ndarray) -> np.ndarray:
        if low is None or high is None:
            return np.ones(len(values), bool)
        return np.isnan(values) | ((values >= low) & (values <= high))

    def keep(f: DataFile) -> bool:
        return bool((inside(f.ra_min, f.ra_max, ra) & inside(f.dec_min, f.dec_max, dec)
                     & inside(f.mjd_min, f.mjd_max, mjd)).any())
    return keep


def crossmatch(archive: Queryable, watchlist: Watchlist, limit: int, since_mjd: float | None = None) -> dict:
    """Archived alerts within the radius of a watchlist's entries: ``{"items", "matched", "entries_matched"}``.

    ``items`` (at most ``limit``) are ``AlertSummary`` objects, each with its ``watch`` entry
    (name, ra, dec, radius_arcsec) and ``distance_arcsec``, ordered by the entry's row, then newest
    first; ``matched`` counts every (entry, alert) pair found, ``entries_matched`` the entries with
    one or more. The alerts' positions are read once (one column scan) and matched in memory
    (:meth:`broker.watchlist.Watchlist.match`); only the summaries shown are read in full. The
    positions are read from the files that may hold an entry's cone at or after ``since_mjd``
    (:func:`_watched_files`), the summaries from those whose bounds hold a shown alert's position
    and time (its first copy's row, in its file's bounds).
    """
    where = "ra IS NOT NULL AND dec IS NOT NULL"
    if since_mjd is not None:
        if not math.isfinite(since_mjd):  # its repr, nan or inf, would be read as a column name
            raise InvalidQuery(f"since_mjd={since_mjd} is not a finite MJD")
        where += f" AND mjd >= {float(since_mjd)!r}"
    files = archive.files()
    keep = _watched_files(files, watchlist, None if since_mjd is None else float(since_mjd))
    table = archive.query(f"SELECT alert_id, mjd, ra, dec FROM alerts WHERE {where}", keep=keep, files=files)
    ids, mjd = table.column(0).to_numpy(), table.column(1).to_numpy(zero_copy_only=False)
    ra, dec = table.column(2).to_numpy(zero_copy_only=False), table.column(3).to_numpy(zero_copy_only=False)
    found = watchlist.match(ra, dec)
    order = np.lexsort((~ids[found.alert], -np.nan_to_num(mjd[found.alert], nan=-np.inf), found.entry))[:limit]
    at = found.alert[order]
    shown = ids[at]
    rows = summaries(archive, f"alert_id IN ({', '.join(str(int(i)) for i in set(shown))})", "",
                     len(shown), keep=_holding(ra[at], dec[at], mjd[at]), files=files) if len(shown) else []
    by_id = {r["alert_id"]: r for r in rows}
    items = [{**by_id[int(i)], "watch": watchlist.entry(int(e)), "distance_arcsec": float(d)}
             for i, e, d in zip(shown, found.entry[order], found.separation_arcsec[order], strict=True)]
    return {"items": items, "matched": len(found), "entries_matched": int(np.unique(found.entry).size)}


def csv_text(keys: tuple[str, ...] | list[str], rows: list[dict]) -> str:
    """``rows`` as CSV with the header ``keys``: null cells empty, text escaped as :func:`printable` does."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(keys)
    for row in rows:
        writer.writerow(["" if row.get(k) is None else printable(str(row[k])) for k in keys])
    return out.getvalue()


def matches_csv(items: list[dict]) -> str:
    """The matches of :func:`crossmatch` as CSV (:data:`CSV_COLUMNS`: the entry's columns, then the alert's)."""
    return csv_text(CSV_COLUMNS, [{"watch_name": i["watch"]["name"], "watch_ra": i["watch"]["ra"],
                                   "watch_dec": i["watch"]["dec"], "watch_radius_arcsec": i["watch"]["radius_arcsec"],
                                   **i} for i in items])


def diff_dir(state_dir: Path | None, summary: dict, field: str | None) -> Path | None:
    """Folder of a frame's kept difference image (``<state_dir>/diffs/<telescope>/<field>/<band>/<frame>``)."""
    if state_dir is None or field is None:
        return None
    parts = (summary["telescope"], field, summary["band"], summary["frame_id"])
    return Path(state_dir, "diffs", *(path_component(str(p)) for p in parts))


def frame_view(archive: Queryable, state_dir: Path | None, frame_id: str) -> tuple[dict, Path | None]:
    """A frame's metadata and candidates (``frame_id``, ``telescope``, ``mjd``, ``band``, ``shape``), and its folder.

    Raises
    ------
    NotFound
        No archived alert comes from this frame.
    """
    items = summaries(archive, f"frame_id = {sql_str(frame_id)}", "ORDER BY candid", 10_000)
    if not items:
        raise NotFound(f"no alert of frame {frame_id!r} in the archive")
    first = items[0]
    field = archive.query(f"SELECT alert.provenance.field AS f FROM alerts WHERE alert_id = {first['alert_id']}"
                          ).column(0).to_pylist()[0]
    folder = diff_dir(state_dir, first, field)
    shape = None
    if folder is not None and (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        shape = [int(meta["ny"]), int(meta["nx"])]
    view = {"frame_id": frame_id, "telescope": first["telescope"], "mjd": first["mjd"], "band": first["band"],
            "shape": shape, "candidates": items}
    return view, folder if shape is not None else None


def frame_image(folder: Path | None, frame_id: str) -> np.ndarray:
    """The kept difference image of a frame (float32 ADU, NaN where masked, memory-mapped).

    Raises
    ------
    NotFound
        The pipeline no longer keeps it (the difference store keeps the newest frames of each field).
    """
    if folder is None or not (folder / "diff.npy").is_file():
        raise NotFound(f"the difference image of frame {frame_id!r} is no longer kept (the difference store "
                       "keeps the newest frames of each field)")
    return np.load(folder / "diff.npy", mmap_mode="r")


def check_position(ra: float, dec: float, radius_arcsec: float) -> None:
    """InvalidQuery unless RA in [0, 360), Dec in [-90, 90] (deg) and the radius in (0, 3600] arcsec."""
    check_sky_position(ra, dec)
    if not (math.isfinite(radius_arcsec) and 0 < radius_arcsec <= 3600):
        raise InvalidQuery(f"radius_arcsec={radius_arcsec} out of range (0, 3600]")


def history_count(history: ObjectHistory | None) -> Any:
    """Objects in the history (None without one)."""
    if history is None:
        return None
    return int(history.store.execute("SELECT count(*) FROM objects").fetchone()[0])


@dataclass
class _Held:
    """A record of the cache: the archive's (``archived``), or provisional, with the files last searched for it."""

    record: dict
    archived: bool
    searched: tuple[str, ...] | None = None  # the archive's files when it last did not hold the id


class RecordCache:
    """The newest-used alert records by id, safe to share between threads: the archive's, else the first seen live.

    The archive is the record of what was published: an id it holds is answered with its record
    (the first archived copy, :data:`broker.archive.reader.COPY_ORDER`), whatever was read live.
    An alert read from the live stream before the archive commits it (:meth:`put`) is kept as
    provisional: answered while the archive does not hold its id, then replaced by the archive's
    record. The first record seen for an id wins: a later one with that id (a producer repeating or
    forging an id) never replaces a record held, archived or provisional.

    Parameters
    ----------
    archive : Archive
    size : int
        Records kept (count; ~50 kB each with cutouts). Default 256: the cutouts of a page of
        alerts are drawn from one read each.

    Notes
    -----
    An archived record is never read again while it is kept (archived alerts never change). For
    a provisional one the archive is searched again only once its files changed (a commit): one
    look-up by id per commit while the archive does not hold it, not one per request.
    """

    #: Locks that serialise the look-ups of one id (striped by id): the three cutouts of a card,
    #: asked at once, read the archive once, not three times.
    _STRIPES = 64

    def __init__(self, archive: Queryable, size: int = 256) -> None:
        self.archive, self.size = archive, size
        self._records: OrderedDict[int, _Held] = OrderedDict()
        self._lock = threading.Lock()
        self._reading = [threading.Lock() for _ in range(self._STRIPES)]

    def get(self, alert_id: int) -> dict:
        """The record of ``alert_id``: the archive's (:func:`alert_record`), else the provisional one held.

        Raises
        ------
        NotFound
            Neither the archive nor the live stream has it.
        """
        return self.lookup(alert_id)[0]

    def lookup(self, alert_id: int) -> tuple[dict, bool]:
        """The record of ``alert_id`` (as :meth:`get`) and whether it is the archive's (final) or provisional."""
        with self._reading[alert_id % self._STRIPES]:
            return self._lookup(alert_id)

    def _lookup(self, alert_id: int) -> tuple[dict, bool]:
        with self._lock:
            held = self._records.get(alert_id)
            if held is not None:
                self._records.move_to_end(alert_id)
                if held.archived:
                    return held.record, True
        files = tuple(f.path for f in self.archive.files()) if held is not None else None
        if held is not None and held.searched == files:
            return held.record, False  # not archived at the last look-up, and nothing committed since
        try:
            record = alert_record(self.archive, alert_id)
        except NotFound:
            if held is None:
                raise
            held.searched = files
            return held.record, False
        self._keep(alert_id, _Held(record, archived=True))
        return record, True

    def put(self, record: dict) -> bool:
        """Keep ``record``, read elsewhere (the live stream), as provisional, unless its id is held already.

        Returns whether it was kept: False when a record of that id is held (the first seen wins).
        """
        return self._keep(int(record["alertId"]), _Held(record, archived=False))

    def _keep(self, alert_id: int, held: _Held) -> bool:
        """Hold ``held`` as the newest used: an archived record in place of any, a provisional one of none.

        Returns whether it is held.
        """
        with self._lock:
            if not held.archived and alert_id in self._records:
                return False
            self._records[alert_id] = held
            self._records.move_to_end(alert_id)
            while len(self._records) > self.size:
                self._records.popitem(last=False)
            return True
