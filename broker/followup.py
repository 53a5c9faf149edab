"""Follow-up requests: rules that pick objects, the per-object request state, the request record.

A rule of ``[[followup.rules]]`` (:class:`FollowupRule`) names a condition over the alert, in the
subscriber's filter language (``scores.anomaly > 0.99 and scores.rb > 0.9``), and the observation
to ask for: band, exposure, cadence, visits, priority and how long the request stays open. The
score stage evaluates the rules (``streams.followup.FollowupRules``; the expressions need
:mod:`streams.alert_expr`, and ``broker/`` never imports ``streams/``), asks
:class:`FollowupStore` for a request, and the alert stage writes the ``followup/v1`` record
(:func:`request_record`) on the topic ``followup`` in its transaction. A telescope checks every
request with :func:`validate_request` before it schedules anything.

Exactly once (``docs/architecture.md``, "Exactly once"): the store keeps one open request per
object, keyed by object id, and remembers the candidate that opened it, so the same candidate
processed again after a crash gets the same answer (``is_new`` true again, the same request id),
and the alert stage emits the request again inside the transaction that commits it.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from broker.errors import ConfigError, InvalidRequest
from broker.history import HistoryStore, SqliteStore

#: Version of the ``followup`` record :func:`request_record` builds (``schemas/followup/v1.avsc``).
SCHEMA_VERSION = 1
#: Unix time (s) of MJD 0.
_MJD_UNIX_0 = -40587 * 86400.0
#: Largest number of visits a request may ask for.
MAX_VISITS = 100
#: Lowest priority (1 is the highest).
MAX_PRIORITY = 10
#: Longest exposure of one visit (s), as the ingest plausibility bound ``exptime_max``.
MAX_EXPOSURE_S = 1e5
#: Longest cadence and expiry (days): a year.
MAX_DAYS = 365.0
#: How far in the future of the telescope's clock a request may say it was made (days): an hour of
#: clock skew. A later ``created_mjd`` would let a request that expires centuries from now pass.
CLOCK_SKEW_DAYS = 1.0 / 24.0
#: Longest name accepted in a request (characters): ``schemavsn``, ``requester``.
MAX_TEXT = 128
#: Longest id accepted in a request (characters): ``request_id``, ``object_id``, ``candid``,
#: ``target``. Candidate ids carry their frame's id, which a telescope's ``FRAMEID`` sets (a FITS
#: long string can exceed one card); the portal's labels take the same (``broker.vetting.MAX_ID_CHARS``).
MAX_ID = 1024
#: Longest band name (characters), as a FITS ``FILTER`` value in a topic name (``streams.topics``).
MAX_BAND = 32
#: States of a request (alert ``followup.state``).
STATES = ("requested", "observed")


def mjd_now() -> float:
    """The wall clock as MJD (UTC days)."""
    return time.time() / 86400.0 + 40587.0


def unix_of_mjd(mjd: float) -> float:
    """Unix seconds of ``mjd`` (UTC days)."""
    return mjd * 86400.0 + _MJD_UNIX_0


# --- rules and configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class FollowupRule:
    """One rule of ``[[followup.rules]]``: when to ask for follow-up, and what to ask for.

    Attributes
    ----------
    name : str
        Rule name (1-64 characters), in the request's ``reason.rule`` and the alert's
        ``followup.rule``.
    when : str
        Condition over the alert in the subscriber's filter language (``docs/architecture.md``,
        "Subscribing"; dotted paths of the alert schema, e.g. ``scores.rb``,
        ``classification.probabilities.SN``, ``object.ndet``). Compiled at start-up by
        ``streams.followup.FollowupRules``: a bad expression stops the stage there.
    filter : str or None
        Band to observe in; None (default): the band of the triggering alert.
    exposure_s : float
        Exposure of each visit (s), in (0, 1e5]. Default 300: a 1 m-class telescope reaches
        ~1 mag deeper than a 60 s survey frame.
    cadence_days : float
        Days between visits, in [0, 365]. Default 0.5: twice a night where the site allows.
    n_visits : int
        Visits asked for, 1 to :data:`MAX_VISITS`. Default 3.
    priority : int
        1 (highest) to :data:`MAX_PRIORITY`. Default 5.
    expiry_days : float
        Days after the triggering detection that the request stays open, in (0, 365]; while it is
        open the object gets no other request. Default 3: young transients change within days.
    """

    name: str
    when: str
    filter: str | None = None
    exposure_s: float = 300.0
    cadence_days: float = 0.5
    n_visits: int = 3
    priority: int = 5
    expiry_days: float = 3.0

    def __post_init__(self) -> None:
        problems = _rule_problems(self)
        if problems:
            raise ConfigError(f"invalid [[followup.rules]] {self.name!r}: {'; '.join(problems)}")


def _is_real(x: object) -> TypeGuard[float]:
    """Whether ``x`` is a finite int or float (not a bool; an int too large for a float is not)."""
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _rule_problems(rule: FollowupRule) -> list[str]:
    """What is wrong with the fields of ``rule`` (empty when nothing)."""
    out = []
    if not isinstance(rule.name, str) or not 1 <= len(rule.name) <= 64 or not rule.name.isprintable():
        out.append("name must be 1-64 printable characters")
    if not isinstance(rule.when, str) or not rule.when.strip():
        out.append("when must be a non-empty expression")
    if rule.filter is not None and not _good_band(rule.filter):
        out.append(f"filter must be 1-{MAX_BAND} printable characters or absent")
    if not (_is_real(rule.exposure_s) and 0 < rule.exposure_s <= MAX_EXPOSURE_S):
        out.append(f"exposure_s must be in (0, {MAX_EXPOSURE_S:g}] s")
    if not (_is_real(rule.cadence_days) and 0 <= rule.cadence_days <= MAX_DAYS):
        out.append(f"cadence_days must be in [0, {MAX_DAYS:g}] d")
    if not (_is_int(rule.n_visits) and 1 <= rule.n_visits <= MAX_VISITS):
        out.append(f"n_visits must be an integer 1 to {MAX_VISITS}")
    if not (_is_int(rule.priority) and 1 <= rule.priority <= MAX_PRIORITY):
        out.append(f"priority must be an integer 1 to {MAX_PRIORITY}")
    if not (_is_real(rule.expiry_days) and 0 < rule.expiry_days <= MAX_DAYS):
        out.append(f"expiry_days must be in (0, {MAX_DAYS:g}] d")
    return out


def _good_band(band: object) -> bool:
    return isinstance(band, str) and 1 <= len(band) <= MAX_BAND and band.isprintable() and band.strip() == band


#: Not on a trail of its frame's candidates (a glinting satellite's knots pass the real/bogus model).
NOT_ON_TRAIL = "'trail' not in context.matches.kind"
#: The default rules: an unusual alert that is surely real, and a young supernova candidate.
DEFAULT_RULES = (
    FollowupRule("anomalous", f"scores.anomaly > 0.99 and scores.rb > 0.9 and {NOT_ON_TRAIL}", priority=2),
    FollowupRule("young_sn", "classification.probabilities.SN > 0.8 and object.ndet <= 3 and scores.rb > 0.9 "
                 f"and {NOT_ON_TRAIL}", priority=3),
)


@dataclass(frozen=True)
class FollowupConfig:
    """Follow-up requests (``[followup]``, with ``[[followup.rules]]``).

    Attributes
    ----------
    enabled : bool
        Whether the score stage issues requests (default true).
    rules : tuple of FollowupRule
        Evaluated in order; the first that matches an alert issues the request. Default
        :data:`DEFAULT_RULES`: ``anomalous`` (``scores.anomaly > 0.99 and scores.rb > 0.9``, priority
        2) and ``young_sn`` (``classification.probabilities.SN > 0.8 and object.ndet <= 3 and
        scores.rb > 0.9``, priority 3), both only off a trail (:data:`NOT_ON_TRAIL`: telescope time
        is not spent on satellites). Names are distinct.
    """

    enabled: bool = True
    rules: tuple[FollowupRule, ...] = DEFAULT_RULES

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"[followup] enabled must be true or false, not {self.enabled!r}")
        if not all(isinstance(r, FollowupRule) for r in self.rules):
            raise ConfigError("[[followup.rules]] must be tables")
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ConfigError(f"[[followup.rules]] names must be distinct, not {names}")

    def rule(self, name: str) -> FollowupRule | None:
        """The rule called ``name`` (None: no such rule, e.g. removed since a request was made)."""
        return next((r for r in self.rules if r.name == name), None)


# --- the request state ------------------------------------------------------------------------


@dataclass(frozen=True)
class FollowupStatus:
    """The follow-up request of an object, as the alert carries it (alert v3 ``followup``).

    Attributes
    ----------
    request_id : str
        Id of the request on the ``followup`` topic.
    rule : str
        Name of the rule that issued it.
    requested_mjd : float
        Exposure start of the detection that triggered it (MJD, d).
    state : str
        ``requested`` (no detection since) or ``observed`` (detected again since the request).
    n_since : int
        Detections of the object after the request.
    """

    request_id: str
    rule: str
    requested_mjd: float
    state: str
    n_since: int

    def to_record(self) -> dict:
        """The alert's ``followup`` record."""
        return {"request_id": self.request_id, "rule": self.rule, "requested_mjd": float(self.requested_mjd),
                "state": self.state, "n_since": int(self.n_since)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> FollowupStatus:
        """Inverse of :meth:`to_record`."""
        return cls(str(record["request_id"]), str(record["rule"]), float(record["requested_mjd"]),
                   str(record["state"]), int(record["n_since"]))


def request_id(object_id: str, cand_id: str, rule: str) -> str:
    """The id of the request ``rule`` opens for ``object_id`` on candidate ``cand_id``.

    ``FU`` and 16 hex digits of the SHA-256 of the three: the same inputs (a replay) give the same id.
    """
    digest = hashlib.sha256("\x1f".join((object_id, cand_id, rule)).encode("utf-8", "surrogatepass")).hexdigest()
    return f"FU{digest[:16]}"


def table_statements(real: str) -> tuple[str, ...]:
    """The statements that create the ``followups`` table, ``real`` being the dialect's 8-byte float type."""
    return (
        f"CREATE TABLE IF NOT EXISTS followups (object_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, "
        f"cand_id TEXT NOT NULL, rule TEXT NOT NULL, requested_mjd {real} NOT NULL, expiry_mjd {real} NOT NULL)",
    )


class FollowupStore:
    """One open follow-up request per object, in the history's database (table ``followups``).

    Parameters
    ----------
    store : HistoryStore
        The object history's store (:class:`broker.history.SqliteStore` or
        :class:`broker.history_pg.PostgresStore`); the table is created if missing.

    Notes
    -----
    :meth:`request` is one upsert then one read, so it is safe on its own; called inside the
    frame's history transaction (``store.transaction``) it commits with the association, and the
    sky-cell locks serialise replicas on one object.
    """

    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        real = "REAL" if isinstance(store, SqliteStore) else "DOUBLE PRECISION"
        for statement in table_statements(real):
            store.execute(statement)

    def request(self, object_id: str, cand_id: str, rule: FollowupRule, mjd: float
                ) -> tuple[FollowupStatus, bool]:
        """Open a request of ``rule`` for ``object_id`` at candidate ``cand_id`` (exposure start ``mjd``).

        Returns
        -------
        (FollowupStatus, bool)
            The object's request and whether this candidate opened it (``is_new``: emit the
            ``followup`` record). While an earlier request of the object is open (``mjd`` before its
            expiry) that one is returned with false; after it expired a new one replaces it. The
            candidate that opened a request gets it again with true when processed again (a
            replay after a crash).
        """
        if not math.isfinite(mjd):
            raise InvalidRequest(f"follow-up of {object_id} at MJD {mjd!r}: not a finite time")
        rid = request_id(object_id, cand_id, rule.name)
        self.store.execute(
            "INSERT INTO followups (object_id, request_id, cand_id, rule, requested_mjd, expiry_mjd) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT (object_id) DO UPDATE SET request_id = excluded.request_id, "
            "cand_id = excluded.cand_id, rule = excluded.rule, requested_mjd = excluded.requested_mjd, "
            "expiry_mjd = excluded.expiry_mjd WHERE followups.expiry_mjd <= excluded.requested_mjd "
            "AND followups.cand_id <> excluded.cand_id",
            (object_id, rid, cand_id, rule.name, float(mjd), float(mjd) + rule.expiry_days))
        row = self._row(object_id)
        assert row is not None  # inserted or kept just now
        return _status(row, 0), row[1] == cand_id

    def for_candidate(self, object_id: str, cand_id: str, mjd: float, history: list[dict],
                      rule: FollowupRule | None) -> FollowupStatus | None:
        """The object's follow-up status for one candidate: what the score stage puts in the alert.

        Opens a request when ``rule`` (the first rule the alert matched, or None) is given and
        the object has none open (:meth:`request`), then gives the status as of ``mjd`` with the
        detections since the request counted in ``history`` (the candidate's previous detections,
        dicts with ``mjd``) and this one. Whether this candidate opened the request (so the alert
        stage emits it): :func:`opened_by`.
        """
        if rule is not None:
            self.request(object_id, cand_id, rule, mjd)
        row = self._row(object_id)
        if row is None:
            return None
        return self.status(object_id, mjd, detections_since(history, float(row[3]), mjd))

    def status(self, object_id: str, mjd: float, n_since: int) -> FollowupStatus | None:
        """The request of ``object_id`` as of ``mjd`` (an alert's exposure start), or None.

        None when the object never had one, or its request was made after ``mjd`` (an alert
        processed late). ``n_since`` (detections of the object after the request, which the caller
        counts in its history: :func:`detections_since`) sets the state: ``observed`` when > 0.
        """
        row = self._row(object_id)
        if row is None or mjd < row[3]:
            return None
        return _status(row, n_since)

    def _row(self, object_id: str) -> tuple | None:
        return self.store.execute("SELECT request_id, cand_id, rule, requested_mjd, expiry_mjd FROM followups "
                                  "WHERE object_id = ?", (object_id,)).fetchone()


def _status(row: tuple, n_since: int) -> FollowupStatus:
    request, _, rule, requested_mjd, _ = row
    return FollowupStatus(request, rule, float(requested_mjd), STATES[1] if n_since > 0 else STATES[0],
                          int(n_since))


def opened_by(status: FollowupStatus | None, object_id: str, cand_id: str) -> bool:
    """Whether candidate ``cand_id`` of ``object_id`` opened the request of ``status``.

    True for the candidate that opened it, also when it is processed again after a crash: the
    alert stage then writes the ``followup`` record in the transaction that commits the alert. The
    request id is derived from (object, candidate, rule), so nothing else need travel with the alert.
    """
    return status is not None and status.request_id == request_id(object_id, cand_id, status.rule)


def detections_since(history: list[dict], requested_mjd: float, current_mjd: float | None = None) -> int:
    """Detections after ``requested_mjd`` among ``history`` (dicts with ``mjd``) and the current one."""
    n = sum(1 for h in history if _is_real(h.get("mjd")) and h["mjd"] > requested_mjd)
    return n + int(current_mjd is not None and current_mjd > requested_mjd)


# --- the request record ---------------------------------------------------------------------------


def _get(view: Mapping[str, Any], path: str) -> Any:
    value: Any = view
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _num_or_none(x: object) -> float | None:
    return float(x) if _is_real(x) else None


def _wrapped_ra(ra: object) -> float:
    """``ra`` (deg) in [0, 360); NaN when it is not a finite number."""
    if not _is_real(ra):
        return float("nan")
    wrapped = float(ra) % 360.0
    return 0.0 if wrapped >= 360.0 else wrapped  # -1e-20 % 360 is 360.0 in floating point


def request_record(status: FollowupStatus, rule: FollowupRule, alert_view: Mapping[str, Any], requester: str,
                   created_unix: float | None = None) -> dict:
    """The ``followup/v1`` record of ``status`` issued by ``rule`` on the alert ``alert_view``.

    Parameters
    ----------
    status : FollowupStatus
        What :meth:`FollowupStore.request` returned (with ``is_new``).
    rule : FollowupRule
        The rule that matched.
    alert_view : mapping
        The alert, or the alert-shaped dict the rules were evaluated on; reads ``objectId``,
        ``candid``, ``object.ra``/``object.dec`` (else ``source.ra``/``source.dec``), ``source.filter``,
        ``scores.rb``, ``scores.anomaly``, ``classification.label`` and
        ``classification.probabilities.<label>`` (deg, probabilities in [0, 1]).
    requester : str
        The issuing broker's application id.
    created_unix : float, optional
        When the request is issued (Unix s); default now.
    """
    ra = _get(alert_view, "object.ra")
    dec = _get(alert_view, "object.dec")
    if not (_is_real(ra) and _is_real(dec)):
        ra, dec = _get(alert_view, "source.ra"), _get(alert_view, "source.dec")
    label = _get(alert_view, "classification.label")
    prob = _get(alert_view, f"classification.probabilities.{label}") if isinstance(label, str) else None
    object_id = str(_get(alert_view, "objectId"))
    return {
        "schemavsn": f"{SCHEMA_VERSION}.0", "request_id": status.request_id, "object_id": object_id,
        "candid": str(_get(alert_view, "candid")), "target": object_id,
        "ra": _wrapped_ra(ra), "dec": float(dec) if _is_real(dec) else float("nan"),
        "filter": rule.filter if rule.filter is not None else str(_get(alert_view, "source.filter")),
        "exposure_s": float(rule.exposure_s), "cadence_days": float(rule.cadence_days), "n_visits": rule.n_visits,
        "priority": rule.priority,
        "reason": {"rule": rule.name, "expression": rule.when, "rb": _num_or_none(_get(alert_view, "scores.rb")),
                   "anomaly": _num_or_none(_get(alert_view, "scores.anomaly")),
                   "class_label": label if isinstance(label, str) else None, "class_probability": _num_or_none(prob)},
        "created_mjd": float(status.requested_mjd), "created_unix": time.time() if created_unix is None
        else float(created_unix), "expiry_mjd": float(status.requested_mjd) + float(rule.expiry_days),
        "requester": requester,
    }


# --- checking a request (telescope side) ------------------------------------------------------------

#: The text fields of a request and the longest value of each (characters).
_TEXT_FIELDS = {"schemavsn": MAX_TEXT, "request_id": MAX_ID, "object_id": MAX_ID, "candid": MAX_ID,
                "target": MAX_ID, "requester": MAX_TEXT}


def validate_request(record: Mapping[str, Any], now_mjd: float | None = None,
                     filters: Collection[str] | None = None) -> list[str]:
    """Why a telescope must not schedule ``record`` (a decoded ``followup`` record); empty when it may.

    Each reason is ``<what>: <detail>``, ``<what>`` one of ``ids``, ``coordinates``, ``filter``,
    ``exposure``, ``cadence``, ``n_visits``, ``priority``, ``time``, ``expired``.

    Parameters
    ----------
    record : mapping
    now_mjd : float, optional
        The telescope's time (MJD); a request whose ``expiry_mjd`` is not after it is ``expired``,
        one made more than :data:`CLOCK_SKEW_DAYS` after it (``created_mjd``) is refused (``time``).
        None: not checked.
    filters : collection of str, optional
        The bands the telescope has; another band is refused. None: any band of 1-32 printable
        characters.
    """
    out = [f"ids: {k} is not 1-{n} printable characters" for k, n in _TEXT_FIELDS.items()
           if not (isinstance(record.get(k), str) and 1 <= len(record[k]) <= n and record[k].isprintable())]
    ra, dec = record.get("ra"), record.get("dec")
    if not (_is_real(ra) and 0.0 <= ra < 360.0):
        out.append(f"coordinates: ra {ra!r} is not in [0, 360) deg")
    if not (_is_real(dec) and -90.0 <= dec <= 90.0):
        out.append(f"coordinates: dec {dec!r} is not in [-90, 90] deg")
    band = record.get("filter")
    if not _good_band(band):
        out.append(f"filter: {str(band)[:40]!r} is not a band (1-{MAX_BAND} printable characters)")
    elif filters is not None and band not in filters:
        out.append(f"filter: {band!r} is not one of this telescope's bands {sorted(filters)}")
    out += _range_problems(record)
    out += _time_problems(record, now_mjd)
    return out


def _range_problems(record: Mapping[str, Any]) -> list[str]:
    out = []
    exposure, cadence, visits, priority = (record.get(k) for k in ("exposure_s", "cadence_days", "n_visits",
                                                                       "priority"))
    if not (_is_real(exposure) and 0.0 < exposure <= MAX_EXPOSURE_S):
        out.append(f"exposure: {exposure!r} is not in (0, {MAX_EXPOSURE_S:g}] s")
    if not (_is_real(cadence) and 0.0 <= cadence <= MAX_DAYS):
        out.append(f"cadence: {cadence!r} is not in [0, {MAX_DAYS:g}] d")
    if not (_is_int(visits) and 1 <= visits <= MAX_VISITS):
        out.append(f"n_visits: {visits!r} is not 1 to {MAX_VISITS}")
    if not (_is_int(priority) and 1 <= priority <= MAX_PRIORITY):
        out.append(f"priority: {priority!r} is not 1 to {MAX_PRIORITY}")
    return out


def _time_problems(record: Mapping[str, Any], now_mjd: float | None) -> list[str]:
    created, expiry, unix = record.get("created_mjd"), record.get("expiry_mjd"), record.get("created_unix")
    if not (_is_real(created) and _is_real(expiry) and _is_real(unix) and unix >= 0.0):
        return [f"time: created_mjd {created!r}, expiry_mjd {expiry!r}, created_unix {unix!r} are not all finite"]
    if not created < expiry <= created + MAX_DAYS:
        return [f"time: expiry_mjd {expiry!r} is not within {MAX_DAYS:g} d after created_mjd {created!r}"]
    if now_mjd is not None and created > now_mjd + CLOCK_SKEW_DAYS:
        return [f"time: created_mjd {created!r} is after now ({now_mjd:.5f}) by more than {CLOCK_SKEW_DAYS * 24:g} h"]
    if now_mjd is not None and expiry <= now_mjd:
        return [f"expired: expiry_mjd {expiry:.5f} is not after now ({now_mjd:.5f})"]
    return []
