"""Alert framings: how an alert record travels in a Kafka message, per topic.

Real clients differ in what they expect on an alert topic (``docs/architecture.md``, "Alert
framings"):

- ``ocf`` (default): one Avro Object Container File per message and the header ``_format: avro``
  (what ZTF publishes; hop-client, gcn-kafka users and plain ``fastavro.reader`` read it);
- ``confluent``: byte 0, the 4-byte big-endian schema id, then the schemaless Avro body; the schema
  is registered under the subject ``<topic>-value`` (TopicNameStrategy, as Rubin) of a
  Confluent-compatible schema registry, which assigns the id (what Rubin publishes; read with
  ``DeserializingConsumer`` + ``AvroDeserializer``);
- ``fink``: the schemaless Avro body as the value and the writer schema as JSON text in the key
  (what fink-client's ``AlertConsumer`` reads).

Every framing also carries the ``schema`` header (``alert/<version>``). An :class:`AlertEncoder` is
built once per topic (a ``confluent`` one registers the schema then) and encodes each alert;
:func:`decode_alert` reads any of the three, telling them apart by their bytes. It accepts only
writer schemas that are one of the repository's alert versions (``schemas/alert/``), so a hostile
or foreign writer schema can neither hang nor exhaust the reader: every failure is a
:class:`~broker.errors.DecodeError`.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Union

import fastavro
from fastavro.schema import to_parsing_canonical_form

import schemas
from broker.avrofile import OCF_HEADER, OCF_MAGIC, read_long, snappy_length
from broker.config import ALERT_FRAMINGS, OCF_CODECS
from broker.errors import ConfigError, DecodeError, RegistryError, RegistryUnavailable
from streams import serde, topics

if TYPE_CHECKING:
    from confluent_kafka.schema_registry import SchemaRegistryClient

#: First byte of a Confluent-framed message (then the 4-byte big-endian schema id).
CONFLUENT_MAGIC = 0
#: Largest total of the decompressed Avro blocks of an ``ocf`` message (bytes): the topics' largest
#: message (64 MiB); an alert is ~0.1 MB, so only a decompression bomb comes near it. A total, not a
#: bound per block: 16 deflated blocks of 64 MiB of zeros fit in a message of 1.1 MB.
MAX_BLOCK_BYTES = topics.MAX_MESSAGE_BYTES
#: Most alert records read from one ``ocf`` message (the alert stage writes one). An alert of 213 zero
#: bytes is valid (empty strings, zeros, nulls) and takes 3.4 kB decoded: 64 MiB of them were 315,000
#: records, 1.1 GB and 10 s from a deflated block of 65 kB.
MAX_RECORDS = 10_000
#: A registry given to :func:`decode_alert`: a URL or a client.
Registry = Union[str, "SchemaRegistryClient", None]



@dataclass(frozen=True)
class FramingConfig:
    """How one alert topic frames its alerts.

    Attributes
    ----------
    framing : str
        One of :data:`broker.config.ALERT_FRAMINGS`. Default ``ocf``: readable by every Avro tool without a registry.
    codec : str
        Block codec of ``ocf`` containers, one of ``null``, ``deflate``, ``snappy`` (needs cramjam, which
        only the ``train`` extra installs: a ``ConfigError`` here without it). Default ``null``: a single
        alert is mostly gzipped cutouts that no codec shrinks further.
    registry_url : str or None
        Schema registry of a ``confluent`` topic (``http(s)://host:port``, or ``mock://`` for an
        in-process registry in tests). Default None (required by ``confluent``).
    """

    framing: str = "ocf"
    codec: str = "null"
    registry_url: str | None = None

    def __post_init__(self) -> None:
        if self.framing not in ALERT_FRAMINGS:
            raise ConfigError(f"unknown alert framing {self.framing!r}; one of {list(ALERT_FRAMINGS)}")
        if self.codec not in OCF_CODECS:
            raise ConfigError(f"unknown Avro codec {self.codec!r}; one of {list(OCF_CODECS)}")
        if self.codec == "snappy" and importlib.util.find_spec("cramjam") is None:
            # found here, when the alert stage starts: at the first alert, every alert was dead-lettered
            raise ConfigError("the snappy codec needs cramjam, which this install lacks (pip install cramjam, "
                              "or the train extra)")


@dataclass(frozen=True)
class Framed:
    """One alert ready to produce: key, value and headers."""

    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


@lru_cache(maxsize=None)
def schema_json(version: int | None = None) -> str:
    """The ``alert`` schema of ``version`` (current by default) as compact JSON text, docs included."""
    version = schemas.CURRENT["alert"] if version is None else version
    return json.dumps(json.loads((schemas.ROOT / "alert" / f"v{version}.avsc").read_text()), separators=(",", ":"))


def subject(topic: str) -> str:
    """Registry subject of ``topic``'s values (Confluent's TopicNameStrategy, as Rubin uses)."""
    return f"{topic}-value"


_clients: dict[str, SchemaRegistryClient] = {}
_clients_lock = threading.Lock()


def registry_client(url: str) -> SchemaRegistryClient:
    """The (cached, one per URL and process) client of the registry at ``url``; ``mock://`` is in-process.

    Raises
    ------
    ConfigError
        confluent-kafka was installed without its ``schemaregistry`` extra.
    """
    try:
        from confluent_kafka.schema_registry import SchemaRegistryClient
    except ImportError as exc:
        raise ConfigError(f"a schema registry needs confluent-kafka[schemaregistry] ({exc})") from exc

    with _clients_lock:
        if url not in _clients:
            _clients[url] = SchemaRegistryClient.new_client({"url": url})
        return _clients[url]


def register(client: SchemaRegistryClient, topic: str, version: int | None = None) -> int:
    """Register the alert schema under ``<topic>-value`` and return the id the registry assigns.

    Registering a schema the subject already holds returns its id, so every start-up may call it.

    Raises
    ------
    RegistryError
        The registry cannot be reached or refuses the schema (e.g. incompatible with the
        subject's latest version).
    """
    from confluent_kafka.schema_registry import Schema

    try:
        return int(client.register_schema(subject(topic), Schema(schema_json(version), "AVRO")))
    except Exception as exc:  # SchemaRegistryError, connection errors of the HTTP client, ...
        raise RegistryError(f"cannot register the alert schema as {subject(topic)}: {type(exc).__name__}: {exc}") \
            from exc


class AlertEncoder:
    """Encode alert records for one topic in one framing (built once, called per alert).

    Parameters
    ----------
    config : FramingConfig
    topic : str
        The topic written to: a ``confluent`` encoder registers the schema under ``<topic>-value``.
    registry : SchemaRegistryClient, optional
        Client to register with instead of one for ``config.registry_url``.

    Raises
    ------
    ConfigError
        A ``confluent`` framing without a registry.
    RegistryError
        The registry cannot be reached or refuses the schema.
    """

    def __init__(self, config: FramingConfig = FramingConfig(), topic: str = topics.ALERTS,
                 registry: SchemaRegistryClient | None = None) -> None:
        self.config = config
        self.headers = {serde.SCHEMA_HEADER: serde.schema_tag("alert").encode()}
        self._key: bytes | None = None
        self._prefix = b""
        self.schema_id: int | None = None
        if config.framing == "confluent":
            if registry is None and not config.registry_url:
                raise ConfigError(f"alert topic {topic} is confluent-framed but no schema registry is configured")
            self.schema_id = register(registry or registry_client(str(config.registry_url)), topic)
            self._prefix = struct.pack(">bI", CONFLUENT_MAGIC, self.schema_id)
        elif config.framing == "fink":
            self._key = schema_json().encode()
        else:
            self.headers["_format"] = b"avro"
            self._sync = os.urandom(16)
            self._prefix = ocf_header(schema_json(), config.codec, self._sync)

    def encode(self, record: dict, key: bytes | None) -> Framed:
        """The message of ``record`` (an ``alert`` record of the current schema) keyed ``key``.

        ``fink`` replaces the key with the writer schema, as fink-client expects.
        """
        body = serde.encode("alert", record)
        if self.config.framing == "ocf":  # the header is made once: only the one block is new
            block = _deflate(body) if self.config.codec == "deflate" else \
                _snappy(body) if self.config.codec == "snappy" else body
            return Framed(key, b"".join((self._prefix, _zigzag(1), _zigzag(len(block)), block, self._sync)),
                          self.headers)
        if self.config.framing == "fink":
            return Framed(self._key, body, self.headers)
        return Framed(key, self._prefix + body, self.headers)


def ocf_header(schema_text: str, codec: str, sync: bytes) -> bytes:
    """The header of an Avro Object Container File: magic, metadata (schema, codec), sync marker."""
    buf = io.BytesIO()
    meta = {"avro.schema": schema_text.encode(), "avro.codec": codec.encode()}
    fastavro.schemaless_writer(buf, OCF_HEADER, {"magic": OCF_MAGIC, "meta": meta, "sync": sync})
    return buf.getvalue()


def _zigzag(n: int) -> bytes:
    """An Avro ``long`` (zig-zag varint)."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _deflate(data: bytes) -> bytes:
    """A raw deflate block (RFC 1951), as Avro's ``deflate`` codec stores it."""
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def _snappy(data: bytes) -> bytes:
    """A raw snappy block followed by the big-endian CRC-32 of the data, as Avro's ``snappy`` codec stores it."""
    try:
        import cramjam
    except ImportError as exc:
        raise ConfigError("the snappy codec needs cramjam: pip install cramjam") from exc
    return bytes(cramjam.snappy.compress_raw(data)) + struct.pack(">I", zlib.crc32(data) & 0xFFFFFFFF)


# --- decoding -------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _known_canonical() -> dict[str, int]:
    """Parsing Canonical Form of each alert schema version in the repository -> version."""
    return {to_parsing_canonical_form(schemas.load("alert", v)): v for v in schemas.versions("alert")}


@lru_cache(maxsize=1)
def _versions() -> tuple[int, ...]:
    """The repository's alert schema versions, newest first."""
    return tuple(sorted(schemas.versions("alert"), reverse=True))


_writer_cache: dict[bytes, dict] = {}


def known_schema(text: bytes | str) -> dict:
    """The parsed alert schema that the writer schema ``text`` (JSON) is, by its canonical form.

    Raises
    ------
    DecodeError
        ``text`` is not JSON, not a schema, or not one of the repository's alert versions.
    """
    raw = text.encode() if isinstance(text, str) else bytes(text)
    cached = _writer_cache.get(raw)
    if cached is not None:
        return cached
    try:
        canonical = to_parsing_canonical_form(fastavro.parse_schema(json.loads(raw)))
    except Exception as exc:  # JSONDecodeError, SchemaParseException, RecursionError, ...
        raise DecodeError(f"writer schema is not a valid Avro schema: {type(exc).__name__}: {exc}") from exc
    version = _known_canonical().get(canonical)
    if version is None:
        raise DecodeError("writer schema is not an alert schema of this broker (a foreign record)")
    if len(_writer_cache) < 64:  # only known schemas get here: a handful of spellings at most
        _writer_cache[raw] = schemas.load("alert", version)
    return schemas.load("alert", version)


def _read(buf: io.BytesIO, schema: dict, end: int) -> dict:
    """One record of ``schema`` from ``buf`` that must end at or before ``end``."""
    try:
        record = fastavro.schemaless_reader(buf, schema, None)
    except Exception as exc:  # fastavro raises EOFError, ValueError, UnicodeDecodeError, ... on garbage
        raise DecodeError(f"bytes are not a valid alert record: {type(exc).__name__}: {exc}") from exc
    if buf.tell() > end or not isinstance(record, dict):
        raise DecodeError("bytes are not a valid alert record")
    return record


def _body(schema: dict, body: bytes) -> dict:
    """The one record of a schemaless body, which it must fill exactly."""
    buf = io.BytesIO(body)
    record = _read(buf, schema, len(body))
    if buf.tell() != len(body):
        raise DecodeError(f"{len(body) - buf.tell()} trailing bytes after the alert record")
    return record


def _long(buf: io.BytesIO) -> int:
    """An Avro ``long`` (zig-zag varint) from ``buf``; the container must not end before it."""
    value = read_long(buf)
    if value is None:
        raise DecodeError("truncated Avro container file")
    return value


def _inflate(codec: str, data: bytes, limit: int) -> bytes:
    """An OCF block's bytes decompressed, at most ``limit`` (what is left of :data:`MAX_BLOCK_BYTES`)."""
    if codec == "null":
        return data
    try:
        if codec == "deflate":
            inflater = zlib.decompressobj(-15)
            out = inflater.decompress(data, max(limit, 1))  # max_length 0 would be no bound at all
            if inflater.unconsumed_tail or len(out) > limit:
                raise DecodeError(f"the Avro blocks of a container inflate beyond {MAX_BLOCK_BYTES} bytes")
            return out
        if codec == "snappy":
            import cramjam

            declared = snappy_length(data)
            if declared > limit:
                raise DecodeError(f"the Avro blocks of a container declare over {MAX_BLOCK_BYTES} bytes "
                                  f"({declared} in one)")
            out = bytes(cramjam.snappy.decompress_raw(data[:-4]))
            if zlib.crc32(out) & 0xFFFFFFFF != struct.unpack(">I", data[-4:])[0]:
                raise DecodeError("CRC mismatch in a snappy Avro block")
            return out
    except DecodeError:
        raise
    except Exception as exc:  # zlib.error, cramjam errors, struct.error, ImportError (no cramjam)
        raise DecodeError(f"cannot decompress a {codec} Avro block: {type(exc).__name__}: {exc}") from exc
    raise DecodeError(f"unsupported Avro container codec {codec!r}")


def decode_ocf(payload: bytes) -> list[dict]:
    """The alert records of an Avro Object Container File whose writer schema is an alert version.

    Raises
    ------
    DecodeError
        Truncated, corrupt or foreign container, a codec other than null/deflate/snappy, blocks
        inflating beyond :data:`MAX_BLOCK_BYTES` in all, or over :data:`MAX_RECORDS` records.
    """
    buf = io.BytesIO(payload)
    header = _read(buf, OCF_HEADER, len(payload))
    meta = header["meta"]
    schema = known_schema(meta.get("avro.schema", b""))
    codec = bytes(meta.get("avro.codec", b"null")).decode(errors="replace")
    records: list[dict] = []
    inflated = 0
    while buf.tell() < len(payload):
        count, size = _long(buf), _long(buf)
        if count < 0 or size < 0 or size > len(payload) - buf.tell():
            raise DecodeError(f"Avro block of {count} records in {size} bytes overruns the message")
        if len(records) + count > MAX_RECORDS:
            raise DecodeError(f"an Avro container of over {MAX_RECORDS} records (at least {len(records) + count})")
        data = _inflate(codec, buf.read(size), MAX_BLOCK_BYTES - inflated)
        inflated += len(data)
        if buf.read(16) != header["sync"]:
            raise DecodeError("Avro container sync marker missing or wrong")
        block = io.BytesIO(data)
        for _ in range(count):  # every alert record takes bytes: a false count stops at the block's end
            records.append(_read(block, schema, len(data)))
        if block.tell() != len(data):
            raise DecodeError(f"{len(data) - block.tell()} trailing bytes in an Avro block")
    if not records:
        raise DecodeError("Avro container file without records")
    return records


@lru_cache(maxsize=256)
def _schema_of_id(client: SchemaRegistryClient, schema_id: int) -> dict:
    """The alert schema of registry id ``schema_id`` (cached per client; failures are not).

    Raises
    ------
    DecodeError
        The registry does not know the id (HTTP 404), or its schema is no alert version.
    RegistryUnavailable
        The registry cannot be reached or answers another error: the message is not at fault.
    """
    try:
        text = client.get_schema(schema_id).schema_str
    except Exception as exc:  # SchemaRegistryError (unknown id, server error), connection errors, ...
        if getattr(exc, "http_status_code", None) == 404:
            raise DecodeError(f"schema id {schema_id} not found in the registry: {type(exc).__name__}: {exc}") \
                from exc
        raise RegistryUnavailable(f"the schema registry did not give schema id {schema_id}: {type(exc).__name__}: "
                                  f"{exc}") from exc
    return known_schema(text or "")


def _confluent(value: bytes, headers: dict[str, bytes] | None, registry: Registry) -> dict:
    """The record of a Confluent-framed message: by the registry, else the ``schema`` header, else by trial."""
    (schema_id,) = struct.unpack(">I", value[1:5])
    body = value[5:]
    if registry is not None:
        client = registry_client(registry) if isinstance(registry, str) else registry
        return _body(_schema_of_id(client, schema_id), body)
    tag = (headers or {}).get(serde.SCHEMA_HEADER)
    if tag is not None:
        kind, _, ver = (tag.decode(errors="replace") if isinstance(tag, bytes) else str(tag)).partition("/")
        if kind != "alert" or not (ver.isascii() and ver.isdigit() and len(ver) <= 6 and int(ver) in _versions()):
            raise DecodeError(f"schema header {tag[:80]!r} is not a known alert schema version")
        return _body(schemas.load("alert", int(ver)), body)
    errors = []
    for version in _versions():  # the body must fill the record exactly
        try:
            return _body(schemas.load("alert", version), body)
        except DecodeError as exc:
            errors.append(f"v{version}: {exc}")
    raise DecodeError(f"Confluent-framed body is no alert version ({'; '.join(errors)})")


def decode_alert(key: bytes | None, value: bytes | None, headers: dict[str, bytes] | None = None,
                 registry: Registry = None) -> list[dict]:
    """The alert records of one message in any framing, told apart by their bytes.

    Records come as written (any alert version of ``schemas/alert/``).

    Parameters
    ----------
    key, value : bytes or None
        The message's key and value.
    headers : dict, optional
        The message's headers (``schema`` names the version of a ``confluent`` body when no
        registry is given).
    registry : str or SchemaRegistryClient, optional
        Registry to look ``confluent`` schema ids up in; without one, the ``schema`` header or the
        repository's versions tell the writer schema.

    Raises
    ------
    DecodeError
        Empty, truncated or foreign bytes, a foreign writer schema, an unknown schema id.
    RegistryUnavailable
        ``registry`` given, it did not answer a schema id's look-up (or answered a server error).
    """
    if not value:
        raise DecodeError("empty alert message")
    value = bytes(value)
    if value.startswith(OCF_MAGIC):
        return decode_ocf(value)
    confluent = value[0] == CONFLUENT_MAGIC and len(value) > 5
    if key and key.lstrip()[:1] == b"{":
        try:
            schema = known_schema(key)
        except DecodeError:
            if not confluent:
                raise
        else:  # a key that is an alert schema: Fink's framing
            return [_body(schema, value)]
    if confluent:  # a JSON key that is no schema (an id of the producer's) does not make it Fink's
        return [_confluent(value, headers, registry)]
    raise DecodeError("not an alert in a known framing (Avro container file, Confluent or Fink framing)")
