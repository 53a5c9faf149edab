"""Operator feedback on anomalous alerts: the active-learning hook of the anomaly model.

An operator who looks at a high-scored alert records whether it was ``interesting`` or ``not``;
:class:`FeedbackStore` keeps these labels in SQLite with the anomaly model version and the score
the alert had. ``broker train-anomaly --feedback <state_dir>/feedback.sqlite`` reads them with
their alerts from the archive and re-weights the anomaly model's terms
(:mod:`broker.anomaly_feedback`); nothing here changes scores at run time.

>>> store = FeedbackStore(":memory:")
>>> store.record("ZTF21abc", "F001/17", "interesting", "ana", "anomaly-v2", 0.998, now=1.8e9)
1
>>> store.export()[0]["label"]
'interesting'
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from broker.errors import InvalidLabel
from broker.sqlitedb import open_database

__all__ = ["LABELS", "FeedbackStore"]

#: Allowed labels.
LABELS: tuple[str, ...] = ("interesting", "not")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    object_id TEXT NOT NULL,
    alert_id TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('interesting', 'not')),
    who TEXT NOT NULL,
    at REAL NOT NULL,
    model_version TEXT NOT NULL,
    score REAL
);
CREATE INDEX IF NOT EXISTS feedback_object ON feedback (object_id);
"""
_COLUMNS = ("id", "object_id", "alert_id", "label", "who", "at", "model_version", "score")


class FeedbackStore:
    """Operator labels of alerts in an SQLite file (or ``":memory:"``).

    Parameters
    ----------
    path : str or Path
        Database file; created with its table when absent.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db = open_database(path, _SCHEMA, "a feedback database")

    def record(self, object_id: str, alert_id: str, label: str, who: str, model_version: str,
               score: float | None, now: float | None = None) -> int:
        """Store one label; returns its row id.

        Parameters
        ----------
        object_id, alert_id : str
            The object and the alert the operator looked at (non-empty).
        label : str
            ``"interesting"`` or ``"not"``.
        who : str
            Operator name (non-empty).
        model_version : str
            Anomaly model that scored the alert (e.g. ``anomaly-v2``).
        score : float or None
            Its anomaly score in [0, 1] (None or NaN when unknown; stored as NULL).
        now : float, optional
            Unix time of the label [s]; default the current time.

        Raises
        ------
        InvalidLabel
            Unknown label, empty ids or operator, or a score outside [0, 1].
        """
        if label not in LABELS:
            raise InvalidLabel(f"label must be one of {LABELS}, got {label!r}")
        for name, value in (("object_id", object_id), ("alert_id", alert_id), ("who", who),
                            ("model_version", model_version)):
            if not isinstance(value, str) or not value.strip():
                raise InvalidLabel(f"{name} must be a non-empty string, got {value!r}")
        s = None if score is None or (isinstance(score, float) and math.isnan(score)) \
            else float(score)
        if s is not None and not 0.0 <= s <= 1.0:
            raise InvalidLabel(f"score must be in [0, 1], got {score!r}")
        with self._db:
            cur = self._db.execute(
                "INSERT INTO feedback (object_id, alert_id, label, who, at, model_version, score)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (object_id, alert_id, label, who, time.time() if now is None else float(now),
                 model_version, s))
        return int(cur.lastrowid or 0)

    def export(self, model_version: str | None = None) -> list[dict[str, Any]]:
        """Every label (optionally of one model version), oldest first.

        Returns
        -------
        list of dict
            Keys ``id, object_id, alert_id, label, who, at`` (Unix time, s), ``model_version,
            score`` (None when unknown).
        """
        sql = f"SELECT {', '.join(_COLUMNS)} FROM feedback"
        args: tuple[str, ...] = ()
        if model_version is not None:
            sql += " WHERE model_version = ?"
            args = (model_version,)
        rows = self._db.execute(sql + " ORDER BY at, id", args).fetchall()
        return [dict(zip(_COLUMNS, r, strict=True)) for r in rows]

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
