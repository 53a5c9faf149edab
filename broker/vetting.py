"""Vetting labels: operators' real / bogus / interesting / not-interesting verdicts on alerts.

The portal's vetting page (:mod:`streams.web.vetting`) shows one candidate after another; the
operator answers with a key and :class:`LabelStore` keeps the answer in SQLite with who gave it,
when, and the model version and score that were on the screen. Real/bogus labels are the
telescope's own training data (:func:`export_labels` turns them into the vetted labels file of
:mod:`broker.labelsfile` for ``broker train-realbogus --labels``); "interesting" / "not
interesting" are the anomaly model's active-learning feedback and go to a
:class:`broker.feedback.FeedbackStore` (its labels ``interesting`` / ``not``), by default
``feedback.sqlite`` beside the labels file: in a state folder, the file ``broker feedback`` records
to and ``broker feedback --export`` reads.

Every row is kept (a changed mind is a new row); the latest row of an alert is its label.

>>> store = LabelStore(":memory:")
>>> store.record(Verdict(7, "OBJ0000000000001", "F1/0", "real", "ana", "rb-v3", 0.91), now=1.8e9)
1
>>> [(v.alert_id, v.label, v.who) for v in store.latest()]
[(7, 'real', 'ana')]
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from broker.errors import CutoutError, InvalidLabel
from broker.feedback import FeedbackStore
from broker.labelsfile import VettedLabel
from broker.sqlitedb import open_database

if TYPE_CHECKING:
    from broker.archive.reader import Archive

__all__ = ["LABELS", "REALBOGUS", "ANOMALY", "MAX_ID_CHARS", "MAX_NAME_CHARS", "Verdict", "check_verdict",
           "LabelStore", "ExportResult", "export_labels", "archived_records"]

#: Labels of the real/bogus model (exported for training).
REALBOGUS: tuple[str, ...] = ("real", "bogus")
#: Labels of the anomaly model (stored as :class:`broker.feedback.FeedbackStore` feedback).
ANOMALY: tuple[str, ...] = ("interesting", "not_interesting")
#: Every label the vetting page can give.
LABELS: tuple[str, ...] = REALBOGUS + ANOMALY
#: Largest alert id: alert ids are non-negative Avro longs (the first 63 bits of a SHA-1).
MAX_ALERT_ID = 2**63 - 1
#: Longest object or candidate id a label takes (characters). The pipeline's own are shorter: an
#: object id is 16 characters (``OBJ`` and 13 hex digits); a candidate id is ``<frame_id>/<index>``,
#: and a frame id is a file name in the reference and difference stores (percent-encoded, so at most
#: 255 bytes, NAME_MAX: a longer one fails there), so a candidate id is at most 255 + 1 + 19 = 275.
#: The alert schema and the archive bound neither (Avro and Arrow strings): 1024 takes every id the
#: pipeline makes, and those of alerts other producers of the alert topic had archived, and refuses
#: a hostile megabyte (the labels file keeps ids as fixed-width strings: at most 4 kB a label).
MAX_ID_CHARS = 1024
#: Longest operator name or model version a label takes (characters).
MAX_NAME_CHARS = 128
#: The longest value of each text field of a :class:`Verdict` (characters).
_TEXT_LIMITS = {"object_id": MAX_ID_CHARS, "candid": MAX_ID_CHARS, "who": MAX_NAME_CHARS,
                "model_version": MAX_NAME_CHARS}
#: Refused in every text field: control characters (C0, DEL, C1) and lone surrogates (no UTF-8 holds them).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_FEEDBACK = {"interesting": "interesting", "not_interesting": "not"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vetting (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_id INTEGER NOT NULL,
    object_id TEXT NOT NULL,
    candid TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('real', 'bogus')),
    who TEXT NOT NULL,
    at REAL NOT NULL,
    model_version TEXT NOT NULL,
    score REAL
);
CREATE INDEX IF NOT EXISTS vetting_alert ON vetting (alert_id);
"""


@dataclass(frozen=True)
class Verdict:
    """One operator's label of one alert.

    Attributes
    ----------
    alert_id : int
        The alert (``alertId``), 0 <= id < 2**63.
    object_id : str
        Its object (``objectId``).
    candid : str
        Its candidate id (``<frame_id>/<index>``).
    label : str
        One of :data:`LABELS`.
    who : str
        The operator (the token's name on the portal).
    model_version : str
        The model whose score was shown: the real/bogus model for ``real``/``bogus``, the anomaly
        model for ``interesting``/``not_interesting`` ("unknown" when the alert named none).
    score : float or None
        That score in [0, 1] (None when the alert had none).
    at : float
        When [Unix s, UTC]; set by :meth:`LabelStore.record`.
    """

    alert_id: int
    object_id: str
    candid: str
    label: str
    who: str
    model_version: str = "unknown"
    score: float | None = None
    at: float = field(default=float("nan"), compare=False)


def check_verdict(v: Verdict) -> Verdict:
    """``v`` with its score normalised (NaN -> None), or :class:`InvalidLabel` saying what is wrong.

    Raises
    ------
    InvalidLabel
        An unknown label, an alert id that is not an integer in [0, 2**63), an object or candidate
        id empty or blank, over :data:`MAX_ID_CHARS` (1024) characters or with a control character,
        an operator or model version the same over :data:`MAX_NAME_CHARS` (128), a score outside
        [0, 1].
    """
    if not isinstance(v.label, str) or v.label not in LABELS:
        raise InvalidLabel(f"label must be one of {LABELS}, got {str(v.label)[:40]!r}")
    if isinstance(v.alert_id, bool) or not isinstance(v.alert_id, int) or not 0 <= v.alert_id <= MAX_ALERT_ID:
        raise InvalidLabel(f"alert_id must be an integer in [0, 2**63), got {str(v.alert_id)[:40]!r}")
    for name, most in _TEXT_LIMITS.items():
        value = getattr(v, name)
        if not isinstance(value, str) or not value.strip() or len(value) > most or _CONTROL.search(value):
            got = f"{value[:40]!r} ({len(value)} characters)" if isinstance(value, str) else repr(value)[:40]
            raise InvalidLabel(f"{name} must be 1-{most} characters, not blank, without control characters; got {got}")
    score = v.score
    if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)):
        raise InvalidLabel(f"score must be a number or null, got {str(score)[:40]!r}")
    if score is not None and math.isnan(score):
        score = None
    if score is not None and not 0.0 <= score <= 1.0:
        raise InvalidLabel(f"score must be in [0, 1], got {score!r}")
    return replace(v, score=None if score is None else float(score))


class LabelStore:
    """Vetting labels in an SQLite file (or ``":memory:"``), beside the anomaly feedback.

    Parameters
    ----------
    path : str or Path
        Database of the real/bogus labels (table ``vetting``); created when absent.
    feedback : str or Path, optional
        Database of the interesting / not interesting labels (:class:`broker.feedback.FeedbackStore`).
        Default ``feedback.sqlite`` in the folder of ``path`` (``":memory:"`` for an in-memory store).

    Notes
    -----
    One store per thread: SQLite connections are not shared between threads (the portal opens
    one per request).
    """

    def __init__(self, path: str | Path, feedback: str | Path | None = None) -> None:
        self.path = str(path)
        if feedback is None:
            feedback = ":memory:" if self.path == ":memory:" else Path(self.path).with_name("feedback.sqlite")
        self.feedback = FeedbackStore(feedback)
        self._db = open_database(path, _SCHEMA, "a labels database of the portal")

    def record(self, verdict: Verdict, now: float | None = None) -> int:
        """Store one label (checked with :func:`check_verdict`); returns its row id in its table.

        Parameters
        ----------
        verdict : Verdict
        now : float, optional
            When [Unix s]; default the current time.

        Raises
        ------
        InvalidLabel
            See :func:`check_verdict`.
        """
        v = check_verdict(verdict)
        at = time.time() if now is None else float(now)
        if v.label in ANOMALY:
            return self.feedback.record(v.object_id, str(v.alert_id), _FEEDBACK[v.label], v.who,
                                        v.model_version, v.score, now=at)
        with self._db:
            cur = self._db.execute(
                "INSERT INTO vetting (alert_id, object_id, candid, label, who, at, model_version, score)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (v.alert_id, v.object_id, v.candid, v.label, v.who, at, v.model_version, v.score))
        return int(cur.lastrowid or 0)

    def realbogus(self) -> list[Verdict]:
        """Every real/bogus label, oldest first."""
        rows = self._db.execute("SELECT alert_id, object_id, candid, label, who, model_version, score, at"
                                " FROM vetting ORDER BY at, id").fetchall()
        return [Verdict(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], float(r[7])) for r in rows]

    def anomaly(self) -> list[Verdict]:
        """Every interesting / not-interesting label, oldest first (candid unknown: ``"-"``)."""
        out = []
        for row in self.feedback.export():
            if not str(row["alert_id"]).isdigit():  # a `broker feedback` label keyed by candid
                continue
            label = "interesting" if row["label"] == "interesting" else "not_interesting"
            out.append(Verdict(int(row["alert_id"]), row["object_id"], "-", label, row["who"],
                               row["model_version"], row["score"], float(row["at"])))
        return out

    def all(self) -> list[Verdict]:
        """Every label of both kinds, oldest first."""
        return sorted(self.realbogus() + self.anomaly(), key=lambda v: v.at)

    def latest(self, kinds: tuple[str, ...] = REALBOGUS) -> list[Verdict]:
        """The latest label of each alert among ``kinds`` (:data:`REALBOGUS` or :data:`ANOMALY`), by alert id."""
        rows = self.realbogus() if kinds == REALBOGUS else self.anomaly() if kinds == ANOMALY else self.all()
        last = {v.alert_id: v for v in rows}
        return [last[k] for k in sorted(last)]

    def labelled(self) -> set[int]:
        """Ids of the alerts with a label of either kind."""
        return {v.alert_id for v in self.realbogus()} | {v.alert_id for v in self.anomaly()}

    def counts(self) -> dict[str, int]:
        """Labels given, per label (every row; a changed mind counts twice)."""
        return dict(Counter(v.label for v in self.all()))

    def close(self) -> None:
        """Close both databases."""
        self._db.close()
        self.feedback.close()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ExportResult:
    """What :func:`export_labels` found: the labels to write and what it had to leave out.

    Attributes
    ----------
    labels : list of VettedLabel
        One per real/bogus-labelled alert found in the archive with usable cutouts.
    skipped : dict
        Alert id -> reason (``not_archived``, or the cutout's error) of each label left out.
    """

    labels: list[VettedLabel] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)


def export_labels(verdicts: Iterable[Verdict], records: Iterable[dict]) -> ExportResult:
    """Vetted labels of the training set's format from real/bogus verdicts and the alerts' records.

    Parameters
    ----------
    verdicts : iterable of Verdict
        Real/bogus labels (e.g. :meth:`LabelStore.latest`); other labels are ignored.
    records : iterable of dict
        Alert records (from the archive) holding at least those alerts; the raw cutouts are
        decoded from them (:func:`broker.normalise.alert_triplet`).

    Returns
    -------
    ExportResult
    """
    from broker.normalise import alert_triplet

    wanted = {v.alert_id: v for v in verdicts if v.label in REALBOGUS}
    out = ExportResult()
    for rec in records:
        key = rec.get("alertId") if isinstance(rec, dict) else None
        v = wanted.pop(key, None) if isinstance(key, int) else None
        if v is None:
            continue
        try:
            sci, ref, diff = alert_triplet(rec)
        except CutoutError as exc:
            out.skipped[v.alert_id] = f"cutout: {exc}"
            continue
        source, prov = rec.get("source") or {}, rec.get("provenance") or {}
        snr = source.get("snr")
        out.labels.append(VettedLabel(
            candidate_id=v.candid, object_id=v.object_id, label=int(v.label == "real"), science=sci,
            reference=ref, difference=diff, labeller=v.who, labelled_at=v.at, model_version=v.model_version,
            score=float("nan") if v.score is None else v.score,
            snr=float(snr) if isinstance(snr, int | float) else float("nan"),
            telescope=str(prov.get("telescope") or "unknown")))
    out.skipped.update(dict.fromkeys(wanted, "not_archived"))
    return out


def archived_records(archive: Archive, alert_ids: Iterable[int]) -> Iterator[dict]:
    """The archived records of ``alert_ids``, in observation order, their files verified first.

    Raises
    ------
    ArchiveError
        The archive cannot be read, or a file holding one of them fails its SHA-256.
    """
    ids = sorted({int(i) for i in alert_ids})
    if not ids:
        return
    _, records = archive.select(f"alert_id IN ({', '.join(map(str, ids))})", verify=True)
    for _, rec in records:
        yield rec
