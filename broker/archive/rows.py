"""Alerts in, records out: archive rows of alerts, exact records back, schema versions, nights and times."""

from __future__ import annotations

import datetime as dt
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import fastavro
import pyarrow as pa

import schemas
from broker.archive.arrow import file_schema
from broker.archive.config import ALERT_COLUMN, COLUMNS
from broker.errors import ArchiveError, SchemaError

_MJD_ZERO = dt.date(1858, 11, 17)
_UNIX_EPOCH_MJD = 40587.0
_FROM_RECORD = tuple(c for c in COLUMNS if c.path)


@dataclass(frozen=True)
class Archived:
    """One alert to archive and where it was read.

    Attributes
    ----------
    record : dict
        The alert record, as decoded with its writer schema.
    version : int
        The alert schema version of ``record`` (:func:`version_of`).
    topic, partition, offset
        Kafka coordinates of the message that carried it.
    """

    record: dict
    version: int
    topic: str
    partition: int
    offset: int


def night_of(mjd: float, longitude: float = 0.0) -> dt.date:
    """The observing night of an exposure: the local date of the evening on which its night began.

    The date changes at local noon (mean solar time at the telescope), so one night has one date
    and the files of a night sit in one folder.

    Parameters
    ----------
    mjd : float
        Exposure start (MJD, days UTC).
    longitude : float
        Telescope longitude (deg, east positive; 0-360 as the MPC writes it, or -180-180: 204.53
        and -155.47 are both Mauna Kea, whose dates are those of 155.47 deg W).

    Raises
    ------
    SchemaError
        ``mjd`` is not a finite date.
    """
    east = (longitude + 180.0) % 360.0 - 180.0  # in [-180, 180): 204.53 east is 155.47 west, as civil dates
    try:
        return _MJD_ZERO + dt.timedelta(days=math.floor(float(mjd) + east / 360.0 - 0.5))
    except (TypeError, ValueError, OverflowError) as exc:
        raise SchemaError(f"alert time {mjd!r} (MJD) is not a date: the alert has no night") from exc


def _get(record: dict, path: tuple[str, ...]) -> Any:
    value: Any = record
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def to_batch(alerts: Sequence[Archived], longitudes: Mapping[str, float] | None = None) -> pa.RecordBatch:
    """The archive rows of ``alerts`` (all of one schema version), as a record batch of :func:`file_schema`.

    Raises
    ------
    SchemaError
        No alerts or alerts of several versions, an alert without a finite ``source.mjd`` (it has
        no night), or a record whose values do not fit its schema's columns.
    """
    if not alerts or len({a.version for a in alerts}) != 1:
        raise SchemaError(f"a batch holds alerts of one schema version, not {sorted({a.version for a in alerts})}")
    schema = file_schema(alerts[0].version)
    lons = longitudes or {}
    cols: dict[str, list] = {c.name: [_get(a.record, c.path) for a in alerts] for c in _FROM_RECORD}
    cols["night"] = [night_of(m, lons.get(t, 0.0)) for m, t in zip(cols["mjd"], cols["telescope"], strict=True)]
    cols["schema_version"] = [a.version for a in alerts]
    cols["kafka_topic"] = [a.topic for a in alerts]
    cols["kafka_partition"] = [a.partition for a in alerts]
    cols["kafka_offset"] = [a.offset for a in alerts]
    try:  # NaN as null in the columns one filters on: DuckDB orders NaN above every number ('rb > 0.9' held it)
        arrays = [pa.array(cols[c.name], c.type, from_pandas=True) for c in COLUMNS]
        arrays.append(pa.array([a.record for a in alerts], schema.field(ALERT_COLUMN).type))
        return pa.RecordBatch.from_arrays(arrays, schema=schema)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        raise SchemaError(f"alert(s) do not fit the archive columns of alert/{alerts[0].version}: {exc}") from exc


def _identity(value: Any) -> Any:
    return value


def _converter(avro: Any, named: Mapping[str, Any]) -> Callable[[Any], Any]:
    """A function from the Python value of an Arrow column of ``avro`` to the Avro value."""
    if isinstance(avro, str):
        return _converter(named[avro], named) if avro in named else _identity
    if isinstance(avro, list):
        inner = _converter(next(b for b in avro if b != "null"), named)
        return inner if inner is _identity else (lambda v: None if v is None else inner(v))
    kind = avro["type"]
    if kind == "record":  # also drops the fields other versions added to a unified struct
        parts = [(f["name"], _converter(f["type"], named)) for f in avro["fields"]]
        return lambda v: {name: conv(v.get(name)) for name, conv in parts}
    if kind == "array":
        item = _converter(avro["items"], named)
        return _identity if item is _identity else (lambda v: [item(x) for x in v])
    if kind == "map":  # Arrow maps come back as (key, value) pairs
        value = _converter(avro["values"], named)
        return lambda v: {k: value(x) for k, x in v}
    return _identity if kind in ("enum", "fixed") else _converter(kind, named)


@lru_cache(maxsize=None)
def _record_converter(version: int) -> Callable[[Any], Any]:
    avro = schemas.load("alert", version)
    return _converter(avro, avro.get("__named_schemas", {}))


def record_of(value: dict, version: int) -> dict:
    """The alert record (schema ``alert/<version>``) of an ``alert`` column value read back from the archive."""
    return _record_converter(version)(value)


def to_current(record: dict, version: int) -> dict:
    """``record`` (schema ``alert/<version>``) in the current alert schema, by Avro schema resolution.

    Raises
    ------
    SchemaError
        The current schema cannot read records of ``version`` (``schemas/README.md`` forbids that).
    """
    current = schemas.CURRENT["alert"]
    if version == current:
        return record
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, schemas.load("alert", version), record)
        buf.seek(0)
        out = fastavro.schemaless_reader(buf, schemas.load("alert", version), schemas.load("alert", current))
    except Exception as exc:  # fastavro raises SchemaResolutionError, ValueError, ... on incompatible schemas
        raise SchemaError(f"an alert/{version} record does not resolve to alert/{current}: {exc}") from exc
    if not isinstance(out, dict):
        raise SchemaError(f"alert/{current} read a record of alert/{version} as {type(out).__name__}")
    return out


# the record fields of a schema, nested: (field names, ((field, is array, shape of that record), ...))
_Shape = tuple[frozenset, tuple]


def _shape(avro: Any, named: Mapping[str, Any]) -> tuple[bool, _Shape] | None:
    """(is an array, shape) of the records of an Avro type, or None when it holds none."""
    avro = named.get(avro, avro) if isinstance(avro, str) else avro
    if isinstance(avro, list):
        branches = [b for b in avro if b != "null"]
        return _shape(branches[0], named) if len(branches) == 1 else None
    if not isinstance(avro, dict):
        return None
    if avro["type"] == "array":
        inner = _shape(avro["items"], named)
        return (True, inner[1]) if inner and not inner[0] else None
    if avro["type"] != "record":
        return None
    children = tuple((f["name"], *sub) for f in avro["fields"] if (sub := _shape(f["type"], named)))
    return False, (frozenset(f["name"] for f in avro["fields"]), children)


@lru_cache(maxsize=1)
def _alert_versions() -> tuple[int, ...]:
    return tuple(schemas.versions("alert"))  # a directory listing: once per process


@lru_cache(maxsize=None)
def _version_shape(version: int) -> _Shape:
    avro = schemas.load("alert", version)
    shape = _shape(avro, avro.get("__named_schemas", {}))
    assert shape is not None  # schemas.load returns records only
    return shape[1]


def _fits(value: Any, shape: _Shape) -> bool:
    """Whether ``value`` has exactly the record fields of ``shape``, nested (types are not checked)."""
    names, children = shape
    if not isinstance(value, dict) or value.keys() != names:
        return False
    for name, is_array, inner in children:
        v = value[name]
        if v is None:
            continue
        if is_array:
            if not isinstance(v, list) or (v and not _fits(v[0], inner)):
                return False
        elif not _fits(v, inner):
            return False
    return True


def version_of(record: dict, tag: str | None = None) -> int:
    """The alert schema version ``record`` was written with.

    The version whose record fields (recursively) are exactly the record's: the one its ``schema``
    header names (``alert/<N>``) when that fits, else the newest that does.

    Raises
    ------
    SchemaError
        No kept alert schema version has exactly the record's fields.
    """
    versions = _alert_versions()
    kind, _, ver = (tag or "").partition("/")
    preferred = [int(ver)] if kind == "alert" and ver.isdigit() and int(ver) in versions else []
    for version in preferred + sorted(versions, reverse=True):
        if _fits(record, _version_shape(version)):
            return version
    raise SchemaError(f"the record fits no alert schema version {versions} (fields {sorted(record)[:8]}...)")


def mjd_of(iso: str) -> float:
    """MJD (days UTC) of an ISO 8601 time; a time without a zone is UTC.

    Raises
    ------
    ArchiveError
        Not an ISO time.
    """
    try:
        t = dt.datetime.fromisoformat(iso)
    except ValueError as exc:
        raise ArchiveError(f"{iso!r} is not an ISO 8601 time (e.g. 2025-03-14T03:00:00)") from exc
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp() / 86400.0 + _UNIX_EPOCH_MJD
