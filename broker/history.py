"""Object association and detection history: SQLite by default, PostgreSQL by DSN.

Each detection joins the nearest object within ``radius_arcsec`` or starts a new one. Writes are
keyed by candidate id, so re-processing a frame after a crash finds its detections already there
and returns exactly what the first pass returned (the object ids are derived from the first
detection's candidate id, not from a counter). Each detection keeps its frame's zero point and
limiting flux; a file written before they existed gains the columns when opened (:data:`ADDED`).

The association (:class:`ObjectHistory`) is one code path over two stores holding the same tables
(``docs/architecture.md``, "State"): :class:`SqliteStore` (``<state_dir>/history.sqlite``, the
default; a transaction locks the whole file, so one writer at a time) and
:class:`broker.history_pg.PostgresStore` (``[history] dsn``; several score replicas). A frame's
transaction first locks every sky cell (:func:`sky_cells`) that its candidates' search circles
touch, so two transactions that could create, join or move an object at one position run one after
the other, and the second sees what the first committed.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from broker.candidate import Candidate, ObjectSummary
from broker.errors import BadCoordinates, ConfigError


def schema(real: str) -> tuple[str, ...]:
    """The statements that create the tables and indexes, ``real`` being the dialect's 8-byte float type."""
    return (
        f"CREATE TABLE IF NOT EXISTS objects (object_id TEXT PRIMARY KEY, ra {real} NOT NULL, dec {real} NOT NULL, "
        f"ndet INTEGER NOT NULL, first_mjd {real} NOT NULL)",
        "CREATE INDEX IF NOT EXISTS objects_dec ON objects (dec)",
        f"CREATE TABLE IF NOT EXISTS detections (cand_id TEXT PRIMARY KEY, object_id TEXT NOT NULL, "
        f"frame_id TEXT NOT NULL, mjd {real} NOT NULL, filter TEXT NOT NULL, ra {real} NOT NULL, "
        f"dec {real} NOT NULL, flux {real} NOT NULL, flux_err {real} NOT NULL, snr {real} NOT NULL, rb {real}, "
        f"magzp {real}, limiting_flux {real})",
        "CREATE INDEX IF NOT EXISTS detections_object ON detections (object_id, mjd)",
    )


#: Columns added since the first release, as (table, column, type; ``REAL`` is the dialect's 8-byte
#: float): added to an older database when it is opened (NULL for its earlier rows). An object's
#: ``features`` and ``classification`` are the JSON of the records of its latest detection
#: (``summary_mjd``), kept by :meth:`ObjectHistory.keep_summaries`.
ADDED = (("detections", "magzp", "REAL"), ("detections", "limiting_flux", "REAL"), ("detections", "telescope", "TEXT"),
         ("objects", "features", "TEXT"), ("objects", "classification", "TEXT"), ("objects", "summary_mjd", "REAL"))
#: Keys of the history dicts (``Candidate.history``), the columns they are read from.
_HISTORY_KEYS = ("cand_id", "mjd", "filter", "ra", "dec", "flux", "flux_err", "snr", "rb", "magzp", "limiting_flux",
                 "telescope")
#: Every column of the two tables, as :meth:`ObjectHistory.copy_region` copies them.
_OBJECT_COLUMNS = ("object_id", "ra", "dec", "ndet", "first_mjd", "features", "classification", "summary_mjd")
_DETECTION_COLUMNS = ("cand_id", "object_id", "frame_id", "mjd", "filter", "ra", "dec", "flux", "flux_err", "snr",
                      "rb", "magzp", "limiting_flux", "telescope")
#: Side of a sky cell (arcsec) of :func:`sky_cells`. Any size is correct (see there); 1 arcmin keeps
#: a search circle of 1.5 arcsec in one cell, rarely two or four, so a frame takes about one lock
#: per candidate while frames of different fields never share one.
CELL_ARCSEC = 60.0
#: High bits of the cell keys (a namespace against other users of PostgreSQL's advisory locks).
_CELL_KEY_BASE = 0x0B5E << 40


@dataclass(frozen=True)
class HistoryConfig:
    """Association settings and where the history lives (``[history]`` in the TOML file).

    Attributes
    ----------
    radius_arcsec : float
        Association radius (arcsec, at most 3600); 1.5 as ZTF's object association. The search
        takes a lock per 1 arcmin sky cell the circle touches: a simulated 6-frame field took 1.7 s
        at 3600 arcsec, 23 s at 36000, and did not finish at 1e308.
    max_history : int
        Most previous detections attached to a candidate (newest kept), bounding alert size
        (ZTF attaches 30 days of history; 100 detections is more than that for nightly cadence).
    dsn : str or None
        PostgreSQL connection string (``postgresql://user@host:5432/db?sslmode=require``, or libpq
        ``key=value`` form) of a shared history, so that the score stage can run several replicas
        (``broker/history_pg.py``; needs ``pip install 'transient-broker[postgres]'``). Default None:
        SQLite at ``<state_dir>/history.sqlite``, one writer at a time. Give the password by
        libpq's ``PGPASSWORD`` or ``PGPASSFILE`` rather than in the string; the repr leaves the
        string out either way.
    connect_timeout_s : float
        How long (s) the PostgreSQL store tries to (re)connect before giving up: at start-up the
        stage then fails with a ``ConfigError``; in a frame, the frame is dead-lettered as
        ``history_unavailable``. Default 60: a database restart or fail-over takes seconds to tens
        of seconds.
    """

    radius_arcsec: float = 1.5
    max_history: int = 100
    dsn: str | None = field(default=None, repr=False)
    connect_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.radius_arcsec <= 3600.0:
            raise ConfigError(f"radius_arcsec must be 0 to 3600, not {self.radius_arcsec}")


@dataclass(frozen=True)
class _FrameInfo:
    """A batch's frame: id, exposure start (MJD), band, zero point, limiting flux (ADU), telescope."""

    frame_id: str
    mjd: float
    band: str
    magzp: float | None
    limiting_flux: float | None
    telescope: str | None = None


class HistoryStore(Protocol):
    """The SQL database under :class:`ObjectHistory` (statements use ``?`` placeholders)."""

    #: The DB-API connection (for tests and inspection).
    db: Any

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; the cursor (``fetchone``, ``fetchall``)."""
        ...

    def transaction(self, cells: list[int], work: Callable[[], None]) -> None:
        """Run ``work`` in one transaction holding the locks of ``cells`` (sorted keys); all or nothing."""
        ...

    def close(self) -> None:
        """Close the connection."""
        ...


class SqliteStore:
    """The history in one SQLite file (``":memory:"`` for tests); a transaction locks the whole file.

    Parameters
    ----------
    path : str or Path
        The file (created with its tables when absent).
    statements, added : optional
        The tables (:func:`schema` and :data:`ADDED` by default: the history's; the frame ledger
        passes its own, :func:`broker.ledger.schema`).
    """

    def __init__(self, path: str | Path, statements: Sequence[str] | None = None,
                 added: Sequence[tuple[str, str, str]] = ADDED) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(";\n".join(schema("REAL") if statements is None else statements) + ";")
        for table, name, kind in added:
            if name not in {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; the cursor."""
        return self.db.execute(sql, tuple(params))

    def transaction(self, cells: list[int], work: Callable[[], None]) -> None:
        """Run ``work`` under ``BEGIN IMMEDIATE`` (the file's write lock stands for every cell's)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            work()
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # SQLite rolls back by itself on some errors (SQLITE_FULL)
                self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the database."""
        self.db.close()


def _object_id(cand_id: str) -> str:
    return "OBJ" + hashlib.sha1(cand_id.encode()).hexdigest()[:13]


def _separation_arcsec(ra1: float, dec1: float, ra2: np.ndarray, dec2: np.ndarray) -> np.ndarray:
    """Haversine separation (arcsec) between one point and arrays of points (deg)."""
    r1, d1, r2, d2 = np.radians(ra1), np.radians(dec1), np.radians(ra2), np.radians(dec2)
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))) * 3600.0


def _mean_position(ra: float, dec: float, n: int, new_ra: float, new_dec: float) -> tuple[float, float]:
    """The mean direction (deg) of ``n`` detections at mean (``ra``, ``dec``) and one more at (``new_ra``, ``new_dec``).

    Unit vectors are averaged, so that an object on RA 0 or at a pole stays where its detections
    are (an average of the angles would put 359.9999 and 0.0001 at RA 180).
    """
    def unit(r: float, d: float) -> np.ndarray:
        r, d = math.radians(r), math.radians(d)
        return np.array([math.cos(d) * math.cos(r), math.cos(d) * math.sin(r), math.sin(d)])

    x, y, z = n * unit(ra, dec) + unit(new_ra, new_dec)
    return math.degrees(math.atan2(y, x)) % 360.0, math.degrees(math.atan2(z, math.hypot(x, y)))


def _ra_cells(band: int, cell_deg: float) -> int:
    """Cells in declination band ``band``: each at least ``cell_deg`` wide at the band's edge nearest the pole."""
    lo, hi = band * cell_deg - 90.0, min(90.0, (band + 1) * cell_deg - 90.0)
    return max(1, int(360.0 * math.cos(math.radians(max(abs(lo), abs(hi)))) / cell_deg))


def sky_cells(ra: float, dec: float, radius_deg: float, cell_deg: float = CELL_ARCSEC / 3600.0) -> set[int]:
    """Keys of the sky cells that the circle of ``radius_deg`` around (``ra``, ``dec``) touches (deg).

    The sphere is cut into declination bands of ``cell_deg``, each cut in RA into cells at least
    ``cell_deg`` wide. Every point lies in exactly one cell, so two transactions whose circles hold
    the same point (an object one creates and the other could join, or an object's position before
    and after a detection moves it, which stays inside the moving detection's circle) lock a cell in
    common: the lock is correct for any cell size, which only sets how many locks a frame takes.

    Raises
    ------
    BadCoordinates
        ``ra`` or ``dec`` not finite, or ``dec`` outside [-90, 90].
    """
    if not (math.isfinite(ra) and math.isfinite(dec) and -90.0 <= dec <= 90.0):
        raise BadCoordinates(f"candidate at RA {ra!r}, Dec {dec!r} (deg) cannot be associated")
    n_bands = math.ceil(180.0 / cell_deg)
    first = max(0, math.floor((dec - radius_deg + 90.0) / cell_deg))
    last = min(n_bands - 1, math.floor((dec + radius_deg + 90.0) / cell_deg))
    pole = abs(dec) + radius_deg >= 90.0
    # the largest RA offset (deg) of a point of the circle: asin(sin r / cos dec) on the sphere
    half = 180.0 if pole else math.degrees(math.asin(min(1.0, math.sin(math.radians(radius_deg))
                                                         / math.cos(math.radians(dec)))))
    keys: set[int] = set()
    for band in range(first, last + 1):
        n_ra = _ra_cells(band, cell_deg)
        width = 360.0 / n_ra
        lo, hi = math.floor(((ra % 360.0) - half) / width), math.floor(((ra % 360.0) + half) / width)
        cells = range(n_ra) if hi - lo + 1 >= n_ra else (i % n_ra for i in range(lo, hi + 1))
        keys.update(_CELL_KEY_BASE | (band << 16) | i for i in cells)
    return keys


class ObjectHistory:
    """The object store: association and histories over a :class:`HistoryStore`.

    Parameters
    ----------
    source : str, Path or HistoryStore
        A SQLite file (``":memory:"`` for tests), or an open store (:func:`open_history` opens
        the one a configuration names).
    config : HistoryConfig
        Association radius and history length.
    """

    def __init__(self, source: str | Path | HistoryStore, config: HistoryConfig = HistoryConfig()) -> None:
        self.config = config
        self.store: HistoryStore = SqliteStore(source) if isinstance(source, (str, Path)) else source

    @property
    def db(self) -> Any:
        """The store's DB-API connection (``execute(sql).fetchone()``; for tests and inspection)."""
        return self.store.db

    def close(self) -> None:
        """Close the database."""
        self.store.close()

    def associate(self, frame_id: str, mjd: float, band: str, candidates: list[Candidate],
                  magzp: float | None = None, limiting_flux: float | None = None,
                  telescope: str | None = None) -> None:
        """Set ``obj`` (the object summary) and ``history`` on each candidate.

        One transaction per frame, holding the locks of the sky cells around its candidates;
        idempotent per candidate id. ``magzp`` (mag of 1 ADU) and ``limiting_flux`` (5-sigma limit
        of the difference image, ADU) are the frame's, kept with each detection and returned in
        later histories (None when unknown), as is ``telescope`` (light curves across telescopes).

        Raises
        ------
        BadCoordinates
            A candidate without finite coordinates (nothing is written for the frame).
        """
        frame = _FrameInfo(frame_id, mjd, band, magzp, limiting_flux, telescope)
        r_deg = self.config.radius_arcsec / 3600.0
        cells = sorted({k for c in candidates for k in sky_cells(c.detection.ra, c.detection.dec, r_deg)})

        def work() -> None:
            for cand in candidates:
                self._associate_one(frame, cand)

        self.store.transaction(cells, work)

    def _associate_one(self, frame: _FrameInfo, cand: Candidate) -> None:
        det, mjd = cand.detection, frame.mjd
        row = self.store.execute("SELECT object_id FROM detections WHERE cand_id = ?", (cand.cand_id,)).fetchone()
        if row is not None:  # re-processed after a crash: same answer as the first time
            object_id = row[0]
        else:
            object_id = self._nearest(det.ra, det.dec) or _object_id(cand.cand_id)
            self._insert(frame, cand, object_id)
        prior = self.store.execute(
            f"SELECT {', '.join(_HISTORY_KEYS)} FROM detections "
            "WHERE object_id = ? AND mjd < ? ORDER BY mjd DESC LIMIT ?",
            (object_id, mjd, self.config.max_history)).fetchall()
        cand.history = [dict(zip(_HISTORY_KEYS, r, strict=True)) for r in reversed(prior)]
        ra, dec, first = self.store.execute("SELECT ra, dec, first_mjd FROM objects WHERE object_id = ?",
                                            (object_id,)).fetchone()
        cand.obj = ObjectSummary(object_id, ra, dec, len(cand.history) + 1, min(first, mjd))

    def _nearest(self, ra: float, dec: float) -> str | None:
        r_deg = self.config.radius_arcsec / 3600.0
        rows = self.store.execute("SELECT object_id, ra, dec FROM objects WHERE dec BETWEEN ? AND ?",
                                  (dec - r_deg, dec + r_deg)).fetchall()
        if not rows:
            return None
        sep = _separation_arcsec(ra, dec, np.array([r[1] for r in rows]), np.array([r[2] for r in rows]))
        best = int(np.argmin(sep))
        return rows[best][0] if sep[best] <= self.config.radius_arcsec else None

    def _insert(self, frame: _FrameInfo, cand: Candidate, object_id: str) -> None:
        det, mjd = cand.detection, frame.mjd
        self.store.execute(
            "INSERT INTO detections (cand_id, object_id, frame_id, mjd, filter, ra, dec, flux, flux_err, "
            "snr, rb, magzp, limiting_flux, telescope) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (cand.cand_id, object_id, frame.frame_id, mjd, frame.band, det.ra, det.dec, det.flux,
             det.flux_err, det.snr, cand.rb, frame.magzp, frame.limiting_flux, frame.telescope))
        row = self.store.execute("SELECT ra, dec, ndet, first_mjd FROM objects WHERE object_id = ?",
                                 (object_id,)).fetchone()
        if row is None:
            self.store.execute("INSERT INTO objects (object_id, ra, dec, ndet, first_mjd) VALUES (?,?,?,1,?)",
                               (object_id, det.ra, det.dec, mjd))
            return
        ra, dec = _mean_position(row[0], row[1], int(row[2]), det.ra, det.dec)
        self.store.execute("UPDATE objects SET ra = ?, dec = ?, ndet = ?, first_mjd = ? WHERE object_id = ?",
                           (ra, dec, int(row[2]) + 1, min(float(row[3]), mjd), object_id))


    def keep_summaries(self, summaries: Sequence[tuple[str, float, dict | None, dict | None]]) -> None:
        """Store objects' light-curve features and classification, each as of its detection at an MJD.

        ``summaries`` holds ``(object_id, mjd, features, classification)`` (the records of the
        alert), written in one transaction. The records of an object's latest detection win (a frame
        re-processed after a crash, or an earlier frame arriving late, does not overwrite a later
        one's); :meth:`summary` reads them back.
        """
        def work() -> None:
            for object_id, mjd, features, classification in summaries:
                self.store.execute(
                    "UPDATE objects SET features = ?, classification = ?, summary_mjd = ? "
                    "WHERE object_id = ? AND (summary_mjd IS NULL OR summary_mjd <= ?)",
                    (json.dumps(features), json.dumps(classification), mjd, object_id, mjd))

        if summaries:
            self.store.transaction([], work)

    def summary(self, object_id: str) -> tuple[dict | None, dict | None]:
        """(features, classification) records last kept for ``object_id`` (None, None when none)."""
        row = self.store.execute("SELECT features, classification FROM objects WHERE object_id = ?",
                                 (object_id,)).fetchone()
        if row is None:
            return None, None
        return tuple(json.loads(v) if v else None for v in row)  # type: ignore[return-value]

    def recent_orphans(self, ra: float, dec: float, mjd: float, radius_deg: float, days: float
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """Single detections (objects with ``ndet == 1``) seen within ``days`` before ``mjd`` near (ra, dec).

        The input of moving-object linking (:func:`broker.moving.link_tracklet`): detections of
        objects that have one detection, at MJD in [mjd - days, mjd) and within ``radius_deg`` of
        (``ra``, ``dec``) (deg). One query on the objects' declination index (an object of one
        detection sits where that detection is), then the exact separation.

        Returns
        -------
        ra, dec, mjd : ndarray, shape (n,)
            Their positions (deg) and times (MJD), oldest first.
        cand_ids : list of str
            Their candidate ids. Empty arrays for non-finite or off-sky input.
        """
        empty: tuple[np.ndarray, np.ndarray, np.ndarray, list[str]] = (np.zeros(0), np.zeros(0), np.zeros(0), [])
        if not all(math.isfinite(v) for v in (ra, dec, mjd, radius_deg, days)) or abs(dec) > 90.0:
            return empty
        rows = self.store.execute(
            "SELECT d.cand_id, d.ra, d.dec, d.mjd FROM detections d JOIN objects o ON o.object_id = d.object_id "
            "WHERE o.dec BETWEEN ? AND ? AND o.ndet = 1 AND d.mjd >= ? AND d.mjd < ? ORDER BY d.mjd, d.cand_id",
            (dec - radius_deg, dec + radius_deg, mjd - days, mjd)).fetchall()
        if not rows:
            return empty
        r_ra, r_dec = np.array([r[1] for r in rows], float), np.array([r[2] for r in rows], float)
        near = _separation_arcsec(ra, dec, r_ra, r_dec) <= radius_deg * 3600.0
        return (r_ra[near], r_dec[near], np.array([r[3] for r in rows], float)[near],
                [str(r[0]) for r, k in zip(rows, near, strict=True) if k])

    def copy_region(self, into: ObjectHistory, ra: float, dec: float, radius_deg: float,
                    max_objects: int = 20_000) -> int:
        """Copy the objects within ``radius_deg`` of (``ra``, ``dec``) (deg), with their detections, into ``into``.

        Reads this history only: what ``into`` then associates and scores (the portal's predictions
        on an uploaded frame, :mod:`streams.web.upload`) sees the objects known here and writes
        nothing here. ``max_objects`` bounds the copy in crowded regions (the nearest are kept).
        Returns the number of objects copied (0 for non-finite or off-sky input).
        """
        if not all(math.isfinite(v) for v in (ra, dec, radius_deg)) or abs(dec) > 90.0:
            return 0
        rows = self.store.execute(f"SELECT {', '.join(_OBJECT_COLUMNS)} FROM objects WHERE dec BETWEEN ? AND ?",
                                  (dec - radius_deg, dec + radius_deg)).fetchall()
        if not rows:
            return 0
        sep = _separation_arcsec(ra, dec, np.array([r[1] for r in rows], float), np.array([r[2] for r in rows], float))
        keep = [rows[i] for i in np.argsort(sep, kind="stable")[:max_objects] if sep[i] <= radius_deg * 3600.0]
        ids = [str(r[0]) for r in keep]
        detections = [d for k in range(0, len(ids), 500) for d in self.store.execute(
            f"SELECT {', '.join(_DETECTION_COLUMNS)} FROM detections WHERE object_id IN "
            f"({', '.join('?' * len(ids[k:k + 500]))})", ids[k:k + 500]).fetchall()]

        def work() -> None:
            for table, columns, values in (("objects", _OBJECT_COLUMNS, keep),
                                           ("detections", _DETECTION_COLUMNS, detections)):
                for row in values:
                    into.store.execute(f"INSERT INTO {table} ({', '.join(columns)}) "
                                       f"VALUES ({', '.join('?' * len(columns))})", tuple(row))

        into.store.transaction([], work)
        return len(keep)


def open_history(state_dir: Path, config: HistoryConfig = HistoryConfig()) -> ObjectHistory:
    """The history a configuration names: PostgreSQL at ``config.dsn``, else ``<state_dir>/history.sqlite``.

    Raises
    ------
    ConfigError
        PostgreSQL named but psycopg is missing or the database cannot be reached.
    """
    if config.dsn:
        from broker.history_pg import PostgresStore

        return ObjectHistory(PostgresStore(config.dsn, config.connect_timeout_s), config)
    return ObjectHistory(Path(state_dir) / "history.sqlite", config)
