"""Message (de)serialisation: schemaless Avro inside the pipeline, framed Avro for subscribers.

Internal topics carry schemaless Avro bodies with the schema name and version in the ``schema``
header (e.g. ``candidates/1``), so a reader can pick the writer schema. Alert topics carry one Avro
Object Container File per message with the header ``_format: avro`` (what ZTF publishes and
hop-client reads).
"""

from __future__ import annotations

import io
import math
import operator
from dataclasses import asdict as dataclass_asdict
from dataclasses import fields as dataclass_fields

import fastavro
import numpy as np
from confluent_kafka import Message

import schemas
from broker.candidate import CUTOUT_SIZE, Candidate, Detection, ObjectSummary
from broker.errors import DecodeError, SchemaError

SCHEMA_HEADER = "schema"


def schema_tag(name: str, version: int | None = None) -> str:
    """The ``schema`` header value of record ``name`` (current version by default)."""
    return f"{name}/{schemas.CURRENT[name] if version is None else version}"


def encode(name: str, record: dict) -> bytes:
    """Schemaless Avro body of ``record`` with the current ``name`` schema."""
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, schemas.load(name), record)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SchemaError(f"record does not fit schema {name}: {exc}") from exc
    return buf.getvalue()


def decode(name: str, payload: bytes | None, headers: dict[str, bytes] | None = None) -> dict:
    """Decode a schemaless Avro body written with the version named in its ``schema`` header.

    Raises
    ------
    DecodeError
        Empty payload, a header naming another record type or an unknown version, or bytes
        that are not a valid record.
    """
    if not payload:
        raise DecodeError(f"empty {name} message")
    tag = (headers or {}).get(SCHEMA_HEADER)
    version = None
    if tag is not None:
        tag_s = tag.decode(errors="replace") if isinstance(tag, bytes) else str(tag)
        kind, _, ver = tag_s.partition("/")
        known = ver.isascii() and ver.isdigit() and len(ver) <= 6 and int(ver) in schemas.versions(name)
        if kind != name or not known:  # not int() of any digits: '²', or 5 MB of them, raise ValueError
            raise DecodeError(f"schema header {tag_s[:80]!r} is not a known {name} schema version")
        version = int(ver)
    writer = schemas.load(name, version)
    reader = schemas.load(name)
    buf = io.BytesIO(payload)
    try:
        record = fastavro.schemaless_reader(buf, writer, reader)
    except Exception as exc:  # fastavro raises EOFError, ValueError, UnicodeDecodeError, ... on garbage
        raise DecodeError(f"bytes are not a valid {name} record: {type(exc).__name__}: {exc}") from exc
    if buf.tell() != len(payload):
        raise DecodeError(f"{len(payload) - buf.tell()} trailing bytes after the {name} record")
    if not isinstance(record, dict):  # the schemas are records; a foreign writer schema may not be
        raise DecodeError(f"the {name} payload is not a record")
    return record


#: ``msg.headers()`` through a C call that checks for a pending exception (:func:`message_headers`).
_read_headers = operator.methodcaller("headers")


def message_headers(msg: Message) -> dict[str, bytes]:
    """The headers of a consumed message: text names, byte values (null as empty; a repeated name: its last value).

    Call it once per message. A header name that is not UTF-8 (any producer but librdkafka's can
    write one) makes confluent-kafka build a list holding a NULL name, raise the decode error with
    it, and hand the same list back without error on the next call: touching that name crashes
    the process. ``msg.headers()`` written in Python code is not safe either: once CPython has
    specialised the call site, it returns that list without raising, so the call goes through
    :func:`operator.methodcaller`, which checks for the pending exception.

    Raises
    ------
    DecodeError
        Headers the client cannot hand over (a name that is not UTF-8: it raised ``SystemError``
        out of every stage, which stopped on the message at each restart).
    """
    try:
        raw = _read_headers(msg) or []
    except (SystemError, UnicodeDecodeError) as exc:
        cause = exc.__cause__ or exc
        raise DecodeError(f"headers that cannot be read (a name that is not UTF-8): {type(cause).__name__}: "
                          f"{cause}") from exc
    pairs = raw.items() if isinstance(raw, dict) else raw
    return {k: v.encode() if isinstance(v, str) else (v or b"") for k, v in pairs}


def encode_ocf(name: str, record: dict, codec: str = "null") -> bytes:
    """One Avro Object Container File holding ``record`` (the writer schema travels inside)."""
    buf = io.BytesIO()
    try:
        fastavro.writer(buf, schemas.load(name), [record], codec=codec)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SchemaError(f"record does not fit schema {name}: {exc}") from exc
    return buf.getvalue()


def decode_ocf(payload: bytes) -> list[dict]:
    """All records of an Avro Object Container File (any writer schema)."""
    try:
        records = list(fastavro.reader(io.BytesIO(payload)))
    except Exception as exc:
        raise DecodeError(f"not an Avro container file: {type(exc).__name__}: {exc}") from exc
    if not all(isinstance(r, dict) for r in records):
        raise DecodeError("the Avro container file holds values that are not records")
    return records  # type: ignore[return-value]  # fastavro's stubs do not narrow by all()


# --- candidate batches ----------------------------------------------------------------------------
#: Detection fields that may be unknown: NaN on :class:`Detection`, null in the record.
_OPTIONAL_FIELDS = ("x_err", "y_err", "ra_err", "dec_err", "ref_extended", "host_ra", "host_dec", "host_dist",
                    "host_size", "host_flux")
#: What the score stage adds to a candidate, each as its record (``candidates/v3``; null before).
_SCORE_RECORDS = ("context", "features", "classification", "followup")
_DETECTION_FIELDS = tuple(f.name for f in dataclass_fields(Detection) if f.name not in _OPTIONAL_FIELDS)


def _or_none(value: float) -> float | None:
    """``value``, or None when it is not a finite number (an unknown error)."""
    return float(value) if math.isfinite(value) else None


def candidate_to_record(cand: Candidate) -> dict:
    """``candidates`` Candidate record of ``cand`` (cutouts as raw little-endian float32).

    Unknown position errors (NaN) are written as null.
    """
    det = cand.detection
    return {
        "cand_id": cand.cand_id,
        **{name: getattr(det, name) for name in _DETECTION_FIELDS},
        **{name: _or_none(getattr(det, name)) for name in _OPTIONAL_FIELDS},
        "cutouts": cand.triplet().astype("<f4").tobytes(),
        "rb": cand.rb, "anomaly": cand.anomaly, "history": cand.history, "forced": cand.forced,
        "object": None if cand.obj is None else dataclass_asdict(cand.obj),
        **{name: getattr(cand, name) for name in _SCORE_RECORDS},
    }


def record_to_candidate(rec: dict) -> Candidate:
    """Inverse of :func:`candidate_to_record`; raises :class:`DecodeError` on a bad cutout block.

    A record read from a ``candidates/v1`` batch (resolved to the current schema) has null position
    errors (NaN on the detection) and no forced photometry; one of v1 or v2 has no host measurements
    (NaN) and no context, features, classification or follow-up (None).
    """
    size = 3 * CUTOUT_SIZE * CUTOUT_SIZE * 4
    if len(rec["cutouts"]) != size:
        raise DecodeError(f"candidate {rec['cand_id']}: cutouts hold {len(rec['cutouts'])} bytes, expected {size}")
    sci, ref, diff = np.frombuffer(rec["cutouts"], dtype="<f4").reshape(3, CUTOUT_SIZE, CUTOUT_SIZE).astype(np.float32)
    values = {name: rec[name] for name in _DETECTION_FIELDS}
    values.update({name: float("nan") if rec.get(name) is None else float(rec[name]) for name in _OPTIONAL_FIELDS})
    det = Detection(**values)
    obj = ObjectSummary(**rec["object"]) if rec.get("object") else None
    return Candidate(rec["cand_id"], det, sci, ref, diff, rec.get("rb"), rec.get("anomaly"), obj,
                     list(rec.get("history") or []), list(rec.get("forced") or []),
                     **{name: rec.get(name) for name in _SCORE_RECORDS})
