"""Avro to Arrow: the Arrow type of an Avro type and the schema of an archive file of one alert version."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import pyarrow as pa

import schemas
from broker.archive.config import ALERT_COLUMN, COLUMNS
from broker.errors import SchemaError

#: Key of the file metadata that names the alert schema version of the file's records.
SCHEMA_KEY = b"broker.schema_version"
_AVRO_KEY = b"broker.avro_schema"

_PRIMITIVES = {"null": pa.null(), "boolean": pa.bool_(), "int": pa.int32(), "long": pa.int64(),
               "float": pa.float32(), "double": pa.float64(), "bytes": pa.binary(), "string": pa.string()}
# logical types that fastavro turns into Python objects (dates, UUIDs, decimals): not in any alert
_CONVERTED = {"decimal", "uuid", "date", "time-millis", "time-micros", "timestamp-millis", "timestamp-micros",
              "local-timestamp-millis", "local-timestamp-micros"}


def arrow_type(avro: Any, named: Mapping[str, Any], seen: tuple[str, ...] = ()) -> tuple[pa.DataType, bool]:
    """The Arrow type of an Avro type (parsed by fastavro) and whether it is nullable.

    Records become structs, arrays lists, maps maps, enums strings, ``["null", T]`` a nullable T.

    Raises
    ------
    SchemaError
        A type with no faithful Arrow column: a union of two non-null types, a recursive record,
        a logical type that fastavro converts to a Python object.
    """
    if isinstance(avro, str):
        if avro in _PRIMITIVES:
            return _PRIMITIVES[avro], avro == "null"
        if avro in seen or avro not in named:
            raise SchemaError(f"Avro type {avro!r} is {'recursive' if avro in seen else 'unknown'}")
        return arrow_type(named[avro], named, (*seen, avro))
    if isinstance(avro, list):
        branches = [b for b in avro if b != "null"]
        if len(branches) != 1:
            raise SchemaError(f"the union {avro} has no Arrow column type (only [null, T] has)")
        return arrow_type(branches[0], named, seen)[0], True
    kind, logical = avro["type"], avro.get("logicalType")
    if logical in _CONVERTED:
        raise SchemaError(f"logical type {logical!r} is not archived")
    if kind == "record":
        inner = (*seen, avro["name"])
        return pa.struct([pa.field(f["name"], *arrow_type(f["type"], named, inner)) for f in avro["fields"]]), False
    if kind == "array":
        return pa.list_(pa.field("item", *arrow_type(avro["items"], named, seen))), False
    if kind == "map":
        return pa.map_(pa.string(), pa.field("value", *arrow_type(avro["values"], named, seen))), False
    if kind == "enum":
        return pa.string(), False
    if kind == "fixed":
        return pa.binary(avro["size"]), False
    return arrow_type(kind, named, seen)


@lru_cache(maxsize=None)
def file_schema(version: int | None = None) -> pa.Schema:
    """The Arrow schema of archive files holding ``alert`` records of ``version`` (default: current).

    Its metadata holds the version and the Avro schema text, so a file describes itself.
    """
    version = schemas.CURRENT["alert"] if version is None else version
    avro = schemas.load("alert", version)
    record_type, _ = arrow_type(avro, avro.get("__named_schemas", {}))
    fields = [pa.field(c.name, c.type, nullable=bool(c.path)) for c in COLUMNS]
    fields.append(pa.field(ALERT_COLUMN, record_type, nullable=False))
    text = (schemas.ROOT / "alert" / f"v{version}.avsc").read_text()
    return pa.schema(fields, metadata={SCHEMA_KEY: str(version).encode(), _AVRO_KEY: text.encode()})
