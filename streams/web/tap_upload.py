"""Tables uploaded with a TAP query (TAP 1.1 §2.5.2, DALI ``UPLOAD``): read safely, queried as ``TAP_UPLOAD.name``.

``UPLOAD=name,param:part`` (several joined by ``;``) names a VOTable sent as the part ``part`` of
the multipart form of ``/sync``, ``/async`` or a job's ``/parameters`` (what pyvo's
``run_sync(query, uploads={'name': table})`` and STILTS' ``upload*`` send). The table is read
here (:func:`read_uploads`) and registered on the query's DuckDB connection for that query only
(:meth:`streams.web.tap.TapView.run`), where ADQL reads it as ``TAP_UPLOAD.name`` (e.g. a
cross-match ``JOIN TAP_UPLOAD.mine AS m ON 1 = CONTAINS(POINT('ICRS', a.ra, a.dec), CIRCLE('ICRS',
m.ra, m.dec, 0.001))``). ``UPLOAD=name,https://...`` is refused: this service fetches nothing
over the network.

A VOTable is untrusted XML and a table description astropy would act on, so it is checked before
astropy reads it (:func:`_screen`): UTF-8 only, no DTD (no entity can be declared, so none
expands), at most :data:`MAX_UPLOAD_BYTES` bytes, one TABLE read (the first) of at most
:data:`MAX_UPLOAD_COLUMNS` FIELDs, each a scalar of a type in :data:`ARROW_TYPES` (text of at
most :data:`MAX_TEXT_CHARS` characters), no declared row count over :data:`MAX_UPLOAD_ROWS`
(astropy allocates the rows a TABLE declares), no ``STREAM href`` and no ``FITS`` (astropy would
open the URL or file named), column names ADQL regular identifiers, unique in any case. Each
refusal, and anything astropy cannot read (bad XML, BINARY2 garbage), is an
:class:`~broker.errors.InvalidQuery` naming the table: the ERROR VOTable of the query.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from broker.errors import InvalidQuery
from streams.web.adql import Published

#: Most tables one query uploads.
MAX_UPLOADS = 4
#: Largest uploaded VOTable (bytes), and the most of all of a request's uploads together.
MAX_UPLOAD_BYTES = 16 * 2**20
#: Most rows of an uploaded table: a cross-match of 100,000 positions against a 0.001 deg cone each is a range join.
MAX_UPLOAD_ROWS = 100_000
#: Most columns of an uploaded table.
MAX_UPLOAD_COLUMNS = 100
#: Longest text of a column (characters, a FIELD's ``arraysize``).
MAX_TEXT_CHARS = 4096
#: Most bytes astropy may allocate for the rows (declared or read) at their columns' widths: a fixed
#: ``arraysize`` of text takes its whole width in every row whatever the text (4 bytes a unicodeChar).
MAX_ALLOCATED_BYTES = 256 * 2**20
#: Arrow type of each VOTable datatype read (others, arrays, bits and complex numbers, are refused).
ARROW_TYPES = {"boolean": pa.bool_(), "unsignedByte": pa.int16(), "short": pa.int16(), "int": pa.int32(),
               "long": pa.int64(), "float": pa.float32(), "double": pa.float64(), "char": pa.string(),
               "unicodeChar": pa.string()}
#: ADQL type of each Arrow type of an uploaded column (TAP_SCHEMA's names).
ADQL_TYPES = {pa.bool_(): "BOOLEAN", pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
              pa.float32(): "REAL", pa.float64(): "DOUBLE", pa.string(): "VARCHAR"}
#: An ADQL regular identifier (a table's or column's name), at most 64 characters.
IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
#: Bytes of a cell of each fixed-width datatype in a BINARY or BINARY2 stream (a character of text: per character).
_WIDTHS = {"boolean": 1, "unsignedByte": 1, "short": 2, "int": 4, "long": 8, "float": 4, "double": 8, "char": 1,
           "unicodeChar": 2}
_ENCODING = re.compile(rb"<\?xml[^>]*encoding\s*=\s*[\"']([^\"']*)[\"']")


@dataclass(frozen=True)
class UploadedColumn:
    """A column of an uploaded table: its name, Arrow type, and the FIELD's unit, UCD, description, datatype, xtype."""

    name: str
    kind: pa.DataType
    unit: str | None
    ucd: str
    description: str
    datatype: str
    xtype: str | None


@dataclass(frozen=True)
class UploadedTable:
    """An uploaded table: its ADQL name (``TAP_UPLOAD.name``), its rows, and its columns' metadata."""

    name: str
    rows: pa.Table
    columns: tuple[UploadedColumn, ...]
    registered: str

    def published(self) -> Published:
        """The table as :func:`streams.web.adql.translate` reads it: ``TAP_UPLOAD.name`` (never without its schema)."""
        return Published(f"TAP_UPLOAD.{self.name}", f"SELECT * FROM {self.registered}", short=False)


def upload_pairs(value: str) -> list[tuple[str, str]]:
    """The (table name, part name) pairs of an ``UPLOAD`` value: ``name,param:part`` joined by ``;``.

    Raises
    ------
    InvalidQuery
        A pair without a comma, a name not an ADQL regular identifier or given twice (in any
        case), more than :data:`MAX_UPLOADS` tables, or a URI (``http:``, ``https:``, ``ftp:``,
        ``file:``...): the service reads only tables sent with the request.
    """
    pairs: list[tuple[str, str]] = []
    for item in (i.strip() for i in value.split(";") if i.strip()):
        name, comma, source = (s.strip() for s in item.partition(","))
        if not comma or not IDENTIFIER.fullmatch(name):
            raise InvalidQuery(f"UPLOAD={item[:80]!r}: each upload is name,param:part with the name an ADQL "
                               "identifier (letters, digits and _, a letter first)")
        if not source.lower().startswith("param:") or not source[6:]:
            raise InvalidQuery(f"UPLOAD {name}: {source[:80]!r} is not read: this service has no network access "
                               "and reads no URL; send the table with the request (name,param:part and the "
                               "VOTable as the multipart part 'part')")
        if name.lower() in {n.lower() for n, _ in pairs}:
            raise InvalidQuery(f"UPLOAD names the table {name!r} twice")
        pairs.append((name, source[6:]))
    if not pairs or len(pairs) > MAX_UPLOADS:
        raise InvalidQuery(f"UPLOAD names {len(pairs)} tables: this service reads 1 to {MAX_UPLOADS} per query")
    return pairs


class Deadline:
    """The end of the time the uploads of a query may take to read: its time limit, from when the reading starts.

    Parameters
    ----------
    limit_s : float or None
        The query's time limit (s; ``WebConfig.tap_timeout_s`` or a job's execution duration);
        None: no limit.
    """

    def __init__(self, limit_s: float | None) -> None:
        self.limit_s = limit_s
        self.end = None if limit_s is None else time.monotonic() + limit_s

    def check(self, name: str) -> None:
        """InvalidQuery once the time is past its end, naming the upload ``name`` being read."""
        if self.end is not None and time.monotonic() > self.end:
            raise InvalidQuery(f"UPLOAD {name}: reading the uploaded tables ran past this service's time limit of "
                               f"{self.limit_s:g} s: upload fewer rows or columns (BINARY2 is read fastest, "
                               "TABLEDATA slowest)")


#: XML events the screen reads between two looks at the clock (~4 ms of reading).
_EVENTS_PER_CHECK = 1024


def read_uploads(value: str | None, parts: Mapping[str, bytes], limit_s: float | None = None
                 ) -> tuple[UploadedTable, ...]:
    """The tables an ``UPLOAD`` value names, read from the request's ``parts`` (none without ``UPLOAD``).

    Reading them takes at most ``limit_s`` (s; the query's time limit, of which the query has what
    is left): the screen and astropy's reading of TABLEDATA look at the clock as they go (every
    ~4 ms and every 16 KiB read), the conversions between their steps. Astropy's reading of a
    BINARY or BINARY2 stream, once decoded, is one loop that cannot be stopped: up to ~10 s for
    the 10^7 cells of 12.7 MiB of booleans, so a limit below that may be overrun by it.

    Raises
    ------
    InvalidQuery
        See :func:`upload_pairs` and :func:`read_votable`; a part named and not sent; the
        uploads over :data:`MAX_UPLOAD_BYTES` together; their reading past ``limit_s``.
    """
    if not value or not value.strip():
        return ()
    deadline = Deadline(limit_s)
    tables = []
    for index, (name, part) in enumerate(upload_pairs(value)):
        data = parts.get(part)
        if data is None:
            raise InvalidQuery(f"UPLOAD {name}: the request has no part {part[:60]!r} (the VOTable of "
                               f"param:{part[:60]})")
        tables.append(read_votable(name, data, f"tap_upload_{index}", deadline))
    if sum(len(parts[p]) for _, p in upload_pairs(value)) > MAX_UPLOAD_BYTES:
        raise InvalidQuery(f"the uploaded tables are over {MAX_UPLOAD_BYTES >> 20} MiB together")
    return tuple(tables)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _screen(name: str, data: bytes, deadline: Deadline) -> tuple[str, bytes] | None:
    """InvalidQuery unless ``data`` is a VOTable astropy may read safely (see the module's notes).

    Returns the first TABLE's serialization and its stream, decoded (``BINARY`` or ``BINARY2``),
    None for ``TABLEDATA``.
    """
    if len(data) > MAX_UPLOAD_BYTES:
        raise InvalidQuery(f"UPLOAD {name}: {len(data)} bytes, over the {MAX_UPLOAD_BYTES >> 20} MiB read")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidQuery(f"UPLOAD {name}: the VOTable is not UTF-8") from None
    declared = _ENCODING.search(data[:200])
    if declared and declared.group(1).lower().replace(b"_", b"-") not in (b"utf-8", b"utf8", b"us-ascii", b"ascii"):
        encoding = declared.group(1)[:20].decode(errors="replace")
        raise InvalidQuery(f"UPLOAD {name}: encoding {encoding!r}: UTF-8 is read")
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise InvalidQuery(f"UPLOAD {name}: the VOTable declares a DTD or entities, which are not read")
    return _screen_elements(name, data, deadline)


def _screen_elements(name: str, data: bytes, deadline: Deadline) -> tuple[str, bytes] | None:
    """Check the first TABLE's FIELDs and size, and refuse ``STREAM href`` and ``FITS`` (see the module's notes)."""
    fields, rows, tables, declared, width = 0, 0, 0, 0, 0
    serialization, stream = "TABLEDATA", None
    try:
        for count, (event, element) in enumerate(ET.iterparse(io.BytesIO(data), events=("start", "end"))):
            if count % _EVENTS_PER_CHECK == 0:
                deadline.check(name)
            tag = _local(element.tag)
            if event == "end":
                if tag == "STREAM" and tables == 1 and stream is None:
                    stream = _decoded(name, element.text or "")
                if tag in ("TR", "STREAM"):
                    element.clear()
                continue
            if tag in ("BINARY", "BINARY2") and tables == 1:
                serialization = tag
            if tag == "TABLE":
                tables += 1
                nrows = element.get("nrows", "0").strip()
                if tables == 1 and (not nrows.isdigit() or int(nrows) > MAX_UPLOAD_ROWS):
                    raise InvalidQuery(f"UPLOAD {name}: the TABLE declares {nrows[:20]!r} rows; at most "
                                       f"{MAX_UPLOAD_ROWS:,} are read")
                declared = int(nrows) if tables == 1 else declared
            elif tag == "FIELD" and tables == 1:
                fields += 1
                width += _check_field(name, element.attrib)
            elif tag == "TR" and tables == 1:
                rows += 1
            elif tag == "FITS" or (tag == "STREAM" and element.get("href") is not None):
                raise InvalidQuery(f"UPLOAD {name}: {tag} with a reference to another file or URL is not read: "
                                   "send the rows inline (TABLEDATA, BINARY or BINARY2)")
            if fields > MAX_UPLOAD_COLUMNS or rows > MAX_UPLOAD_ROWS:
                raise InvalidQuery(f"UPLOAD {name}: over {MAX_UPLOAD_COLUMNS} columns or {MAX_UPLOAD_ROWS:,} rows")
            if max(rows, declared) * width > MAX_ALLOCATED_BYTES:
                raise InvalidQuery(f"UPLOAD {name}: its rows would take over {MAX_ALLOCATED_BYTES >> 20} MiB at their "
                                   "columns' widths: declare text of variable length (arraysize '*')")
    except ET.ParseError as exc:
        raise InvalidQuery(f"UPLOAD {name}: not well-formed XML ({str(exc)[:200]})") from None
    if tables == 0 or fields == 0:
        raise InvalidQuery(f"UPLOAD {name}: the VOTable has no TABLE with a FIELD")
    return None if stream is None else (serialization, stream)


def _decoded(name: str, text: str) -> bytes:
    """A base64 STREAM, decoded as astropy decodes it (InvalidQuery: not base64)."""
    try:
        return base64.b64decode(text.encode("ascii"))
    except (ValueError, binascii.Error):
        raise InvalidQuery(f"UPLOAD {name}: its STREAM is not base64") from None


def _check_stream(name: str, table: Any, stream: tuple[str, bytes]) -> None:
    """InvalidQuery when a BINARY or BINARY2 stream is not whole rows of the table's FIELDs, no more, no less.

    Astropy reads the whole rows a stream holds and silently drops a row cut short (a text's length
    past the stream's end) and any garbage after the rows.
    """
    serialization, buffer = stream
    cells = [(_WIDTHS[f.datatype], _count(f)) for f in table.fields]
    mask = (len(cells) + 7) // 8 if serialization == "BINARY2" else 0
    if all(count is not None for _, count in cells):
        row = mask + sum(width * (count or 0) for width, count in cells)
        rows = len(buffer) // row if len(buffer) % row == 0 else -1
    else:
        rows = _walk(buffer, cells, mask)
    if rows != len(table.array):
        raise InvalidQuery(f"UPLOAD {name}: its {serialization} stream of {len(buffer)} bytes is not the "
                           f"{len(table.array)} rows its FIELDs read: cut, or garbage after the rows")


def _count(field: Any) -> int | None:
    """Values of a FIELD in a stream's row: 1, a fixed text's length, None for text of variable length."""
    size = str(field.arraysize or "").strip()
    if field.datatype not in ("char", "unicodeChar") or size in ("", "1"):
        return 1
    return int(size) if size.isdigit() else None


def _walk(buffer: bytes, cells: list[tuple[int, int | None]], mask: int) -> int:
    """Whole rows of ``buffer`` (each ``mask`` bytes of nulls, then its cells), -1 when it ends inside one."""
    pos, rows, size = 0, 0, len(buffer)
    while pos < size:
        pos += mask
        for width, count in cells:
            if count is None:  # a 4-byte length, then the text
                count = int.from_bytes(buffer[pos:pos + 4], "big") if pos + 4 <= size else size
                pos += 4
            pos += width * count
            if pos > size:
                return -1
        rows += 1
    return rows


def _check_field(name: str, attrib: Mapping[str, str]) -> int:
    """Bytes a row of the FIELD takes in astropy's arrays; InvalidQuery unless it is a scalar of :data:`ARROW_TYPES`.

    Text may have ``arraysize`` ``n``, ``n*`` or ``*`` (``n`` at most :data:`MAX_TEXT_CHARS`).
    """
    column, datatype = attrib.get("name", attrib.get("ID", ""))[:80], attrib.get("datatype", "")
    if datatype not in ARROW_TYPES:
        raise InvalidQuery(f"UPLOAD {name}: column {column!r} is of datatype {datatype[:30]!r}; this service reads "
                           f"{', '.join(ARROW_TYPES)}")
    size = attrib.get("arraysize", "").strip()
    if datatype in ("char", "unicodeChar"):
        digits = size.rstrip("*")
        if size and size != "*" and not (digits.isdigit() and int(digits) <= MAX_TEXT_CHARS):
            raise InvalidQuery(f"UPLOAD {name}: column {column!r} has arraysize {size[:30]!r}; text of at most "
                               f"{MAX_TEXT_CHARS} characters is read ('*', 'n*' or n)")
        fixed = int(size) if size.isdigit() else 1 if not size else 0
        return 1 + (8 if not fixed else fixed * (4 if datatype == "unicodeChar" else 1))  # mask, pointer or text
    if size not in ("", "1"):
        raise InvalidQuery(f"UPLOAD {name}: column {column!r} is an array (arraysize {size[:30]!r}); this service "
                           "reads scalar columns")
    return 1 + _WIDTHS[datatype]


def _timed_read(name: str, data: bytes, deadline: Deadline) -> Callable[[int], bytes]:
    """A read function of ``data`` that looks at ``deadline`` at each read (astropy reads 16 KiB at a time)."""
    buffer = io.BytesIO(data)

    def read(size: int = -1) -> bytes:
        deadline.check(name)
        return buffer.read(size)

    return read


def read_votable(name: str, data: bytes, registered: str, deadline: Deadline | None = None) -> UploadedTable:
    """The first table of the VOTable ``data``, uploaded as ``TAP_UPLOAD.name``, registered in DuckDB as ``registered``.

    Raises
    ------
    InvalidQuery
        Anything :func:`_screen` refuses, anything astropy cannot read, more than
        :data:`MAX_UPLOAD_ROWS` rows, a column name not an ADQL regular identifier or repeated
        (in any case); the time past ``deadline`` (:func:`read_uploads`; default: no limit).
    """
    from astropy.io.votable import parse

    deadline = deadline or Deadline(None)
    stream = _screen(name, data, deadline)
    try:
        table = parse(_timed_read(name, data, deadline), verify="ignore", table_number=0).get_first_table()
    except InvalidQuery:
        raise
    except Exception as exc:  # astropy's errors are of many types: each is the upload's fault
        raise InvalidQuery(f"UPLOAD {name}: not a VOTable this service reads ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:200]})") from None
    deadline.check(name)
    if stream is not None:
        _check_stream(name, table, stream)
        deadline.check(name)
    if len(table.array) > MAX_UPLOAD_ROWS:
        raise InvalidQuery(f"UPLOAD {name}: {len(table.array):,} rows; at most {MAX_UPLOAD_ROWS:,} are read")
    columns, arrays, seen = [], [], set()
    for index, field in enumerate(table.fields):
        column = field.name or field.ID or ""
        if not IDENTIFIER.fullmatch(column) or column.lower() in seen:
            why = "repeated (names are read in any case)" if column.lower() in seen else \
                "not an ADQL regular identifier (letters, digits and _, a letter first, at most 64)"
            raise InvalidQuery(f"UPLOAD {name}: column name {column[:80]!r} is {why}: rename it")
        seen.add(column.lower())
        kind = ARROW_TYPES[field.datatype]
        deadline.check(name)
        arrays.append(_arrow(table.array[table.array.dtype.names[index]], kind))
        columns.append(UploadedColumn(column, kind, str(field.unit) if field.unit is not None else None,
                                      field.ucd or "", (field.description or "")[:500], field.datatype,
                                      (field.xtype or None) and str(field.xtype)[:64]))
    rows = pa.Table.from_arrays(arrays, names=[c.name for c in columns])
    return UploadedTable(name, rows, tuple(columns), registered)


def _arrow(values: np.ma.MaskedArray, kind: pa.DataType) -> pa.Array:
    """An uploaded column as Arrow, masked cells null (text decoded; NaN stays NaN)."""
    mask = np.ma.getmaskarray(values)
    data = np.ma.getdata(values)
    if pa.types.is_string(kind):
        cells = [None if m else (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
                 for v, m in zip(data.tolist(), mask.tolist(), strict=True)]
        return pa.array(cells, type=kind)
    return pa.array(np.asarray(data).astype(kind.to_pandas_dtype()), mask=mask, type=kind)
