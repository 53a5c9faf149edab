"""Object association and detection history, in SQLite.

Each detection joins the nearest object within ``radius_arcsec`` or starts a new one. Writes are
keyed by candidate id, so re-processing a frame after a crash finds its detections already there
and returns exactly what the first pass returned (the object ids are derived from the first
detection's candidate id, not from a counter). Each detection keeps its frame's zero point and
limiting flux; a file written before they existed gains the columns when opened (:data:`_ADDED`).
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from broker.candidate import Candidate, ObjectSummary

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    object_id TEXT PRIMARY KEY, ra REAL NOT NULL, dec REAL NOT NULL, ndet INTEGER NOT NULL,
    first_mjd REAL NOT NULL);
CREATE INDEX IF NOT EXISTS objects_dec ON objects (dec);
CREATE TABLE IF NOT EXISTS detections (
    cand_id TEXT PRIMARY KEY, object_id TEXT NOT NULL, frame_id TEXT NOT NULL, mjd REAL NOT NULL,
    filter TEXT NOT NULL, ra REAL NOT NULL, dec REAL NOT NULL, flux REAL NOT NULL,
    flux_err REAL NOT NULL, snr REAL NOT NULL, rb REAL, magzp REAL, limiting_flux REAL);
CREATE INDEX IF NOT EXISTS detections_object ON detections (object_id, mjd);
"""
#: Columns of ``detections`` added since the first release, with their SQL types: added to an older
#: file when it is opened (NULL for its earlier rows).
_ADDED = (("magzp", "REAL"), ("limiting_flux", "REAL"))
#: Keys of the history dicts (``Candidate.history``), the columns they are read from.
_HISTORY_KEYS = ("cand_id", "mjd", "filter", "ra", "dec", "flux", "flux_err", "snr", "rb", "magzp", "limiting_flux")


@dataclass(frozen=True)
class HistoryConfig:
    """Association settings.

    Attributes
    ----------
    radius_arcsec : float
        Association radius (arcsec); 1.5 as ZTF's object association.
    max_history : int
        Most previous detections attached to a candidate (newest kept), bounding alert size
        (ZTF attaches 30 days of history; 100 detections is more than that for nightly cadence).
    """

    radius_arcsec: float = 1.5
    max_history: int = 100


@dataclass(frozen=True)
class _FrameInfo:
    """The frame of a batch of detections: id, exposure start (MJD), band, zero point, limiting flux (ADU)."""

    frame_id: str
    mjd: float
    band: str
    magzp: float | None
    limiting_flux: float | None


def _object_id(cand_id: str) -> str:
    return "OBJ" + hashlib.sha1(cand_id.encode()).hexdigest()[:13]


def _separation_arcsec(ra1: float, dec1: float, ra2: np.ndarray, dec2: np.ndarray) -> np.ndarray:
    """Haversine separation (arcsec) between one point and arrays of points (deg)."""
    r1, d1, r2, d2 = np.radians(ra1), np.radians(dec1), np.radians(ra2), np.radians(dec2)
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))) * 3600.0


class ObjectHistory:
    """The object store (SQLite file; ``":memory:"`` for tests)."""

    def __init__(self, path: str | Path, config: HistoryConfig = HistoryConfig()) -> None:
        self.config = config
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns of :data:`_ADDED` that an older file lacks."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(detections)")}
        for name, kind in _ADDED:
            if name not in have:
                self.db.execute(f"ALTER TABLE detections ADD COLUMN {name} {kind}")

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def associate(self, frame_id: str, mjd: float, band: str, candidates: list[Candidate],
                  magzp: float | None = None, limiting_flux: float | None = None) -> None:
        """Set ``obj`` (the object summary) and ``history`` on each candidate.

        One SQLite transaction per frame; idempotent per candidate id. ``magzp`` (mag of 1 ADU) and
        ``limiting_flux`` (5-sigma limit of the difference image, ADU) are the frame's, kept with
        each detection and returned in later histories (None when unknown).
        """
        frame = _FrameInfo(frame_id, mjd, band, magzp, limiting_flux)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for cand in candidates:
                self._associate_one(frame, cand)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _associate_one(self, frame: _FrameInfo, cand: Candidate) -> None:
        det, mjd = cand.detection, frame.mjd
        row = self.db.execute("SELECT object_id FROM detections WHERE cand_id = ?", (cand.cand_id,)).fetchone()
        if row is not None:  # re-processed after a crash: same answer as the first time
            object_id = row[0]
        else:
            object_id = self._nearest(det.ra, det.dec) or _object_id(cand.cand_id)
            self._insert(frame, cand, object_id)
        prior = self.db.execute(
            f"SELECT {', '.join(_HISTORY_KEYS)} FROM detections "
            "WHERE object_id = ? AND mjd < ? ORDER BY mjd DESC LIMIT ?",
            (object_id, mjd, self.config.max_history)).fetchall()
        cand.history = [dict(zip(_HISTORY_KEYS, r, strict=True)) for r in reversed(prior)]
        ra, dec, first = self.db.execute("SELECT ra, dec, first_mjd FROM objects WHERE object_id = ?",
                                         (object_id,)).fetchone()
        cand.obj = ObjectSummary(object_id, ra, dec, len(cand.history) + 1, min(first, mjd))

    def _nearest(self, ra: float, dec: float) -> str | None:
        r_deg = self.config.radius_arcsec / 3600.0
        rows = self.db.execute("SELECT object_id, ra, dec FROM objects WHERE dec BETWEEN ? AND ?",
                               (dec - r_deg, dec + r_deg)).fetchall()
        if not rows:
            return None
        sep = _separation_arcsec(ra, dec, np.array([r[1] for r in rows]), np.array([r[2] for r in rows]))
        best = int(np.argmin(sep))
        return rows[best][0] if sep[best] <= self.config.radius_arcsec else None

    def _insert(self, frame: _FrameInfo, cand: Candidate, object_id: str) -> None:
        det, mjd = cand.detection, frame.mjd
        self.db.execute("INSERT INTO detections (cand_id, object_id, frame_id, mjd, filter, ra, dec, flux, flux_err, "
                        "snr, rb, magzp, limiting_flux) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (cand.cand_id, object_id, frame.frame_id, mjd, frame.band, det.ra, det.dec, det.flux,
                         det.flux_err, det.snr, cand.rb, frame.magzp, frame.limiting_flux))
        # the object position is the running mean of its detections
        self.db.execute(
            "INSERT INTO objects VALUES (?,?,?,1,?) ON CONFLICT(object_id) DO UPDATE SET "
            "ra = (ra * ndet + excluded.ra) / (ndet + 1), dec = (dec * ndet + excluded.dec) / (ndet + 1), "
            "ndet = ndet + 1, first_mjd = MIN(first_mjd, excluded.first_mjd)",
            (object_id, det.ra, det.dec, mjd))
