"""Avro container files of alert packets, read within bounds (:func:`read_records`).

ZTF's public alerts, ALeRCE's and Fink's copies and most archives ship one or many packets per
container file, uncompressed or deflated. A deflated block expands up to ~1,000 times, so a
10 MB file can claim 10 GB: :func:`inflated_size` walks the blocks and inflates them in chunks,
counting, before fastavro reads anything. Used by ``broker explain`` and the real-data
evaluation (:mod:`broker.training.devset`); the alert stream's own container reader
(:func:`streams.framing.decode_ocf`) shares its block framing (:func:`read_long`,
:func:`snappy_length`).
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import fastavro

from broker.errors import DecodeError

#: Largest total of a file's decompressed blocks (bytes): 256 MiB, ~2,000 ZTF packets with their
#: three stamps (60-130 kB each). A file over it is refused before it is decompressed.
MAX_INFLATED_BYTES = 256 * 1024 * 1024
#: Codecs whose blocks are inflated in bounded chunks. Snappy blocks state their length (ALeRCE's
#: and Fink's files use it); zstandard and lz4 are refused.
_DECOMPRESSORS: dict[str, Callable[[], Any]] = {
    "deflate": lambda: zlib.decompressobj(-15), "bzip2": bz2.BZ2Decompressor,
    "xz": lzma.LZMADecompressor}
#: The first bytes of an Avro container file.
OCF_MAGIC = b"Obj\x01"
#: The header of an Avro container file (the Avro specification's schema), parsed.
OCF_HEADER: dict = fastavro.parse_schema({  # type: ignore[assignment]  # a record schema parses to a dict
    "type": "record", "name": "org.apache.avro.file.Header", "fields": [
        {"name": "magic", "type": {"type": "fixed", "name": "Magic", "size": 4}},
        {"name": "meta", "type": {"type": "map", "values": "bytes"}},
        {"name": "sync", "type": {"type": "fixed", "name": "Sync", "size": 16}},
    ]})
_CHUNK = 1 << 20
_ZLIB = type(zlib.decompressobj())


def not_a_container(head: bytes) -> str | None:
    """Why a file starting with ``head`` (its first 5 bytes) is not an Avro container file; None if it is one."""
    if head[:4] == OCF_MAGIC:
        return None
    if head[:2] == b"\x1f\x8b":
        return "gzip-compressed (a .tar.gz of alerts?), not an Avro container file"
    if len(head) == 5 and head[0] == 0:
        return (f"one message in the Confluent wire framing (magic byte 0, schema id "
                f"{int.from_bytes(head[1:5], 'big')}): its Avro body needs the writer schema from the "
                "registry, not an Avro container file")
    return f"not an Avro container file (starts with {head[:4]!r})"


def read_long(fh: IO[bytes]) -> int | None:
    """One Avro ``long`` (zig-zag varint) from ``fh``; None at the end of the file, before any byte.

    Raises
    ------
    DecodeError
        The file ends inside the number, or it runs over 64 bits.
    """
    shift = acc = 0
    while True:
        b = fh.read(1)
        if not b:
            if shift:
                raise DecodeError("truncated Avro long in a container file")
            return None
        acc |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return (acc >> 1) ^ -(acc & 1)
        shift += 7
        if shift > 63:
            raise DecodeError("malformed Avro long in a container file")


def snappy_length(data: bytes) -> int:
    """Uncompressed length (bytes) a raw snappy block states: the unsigned varint it opens with."""
    n = shift = 0
    for b in data[:10]:
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n
        shift += 7
    raise DecodeError("malformed snappy block length")


def inflated_size(fh: IO[bytes], limit: int = MAX_INFLATED_BYTES) -> int:
    """Total decompressed bytes of the blocks of the container file ``fh`` (read from its start).

    Raises
    ------
    DecodeError
        A malformed header or block, a codec not in :data:`_DECOMPRESSORS` (other than null), or
        a total over ``limit`` bytes (counted while inflating, so a bomb costs ``limit`` at most).
    """
    try:
        header = fastavro.schemaless_reader(fh, OCF_HEADER)
    except Exception as exc:  # fastavro raises many types on a truncated header
        raise DecodeError(f"unreadable Avro file header: {type(exc).__name__}: {exc}") from exc
    assert isinstance(header, dict)
    codec = bytes(header["meta"].get("avro.codec", b"null")).decode("ascii", "replace")
    if codec not in ("null", "snappy", *_DECOMPRESSORS):
        raise DecodeError(f"Avro codec {codec!r} is not read (null, snappy, {', '.join(_DECOMPRESSORS)})")
    total = 0
    while (count := read_long(fh)) is not None:
        size = read_long(fh)
        if size is None or count < 0 or size < 0:
            raise DecodeError("malformed Avro block header")
        data = fh.read(size)
        if len(data) != size or fh.read(16) != header["sync"]:
            raise DecodeError("truncated Avro block or wrong sync marker")
        total += _block_size(codec, data, limit - total)
        if total > limit:
            raise DecodeError(f"Avro blocks expand to over {limit} bytes")
    return total


def _block_size(codec: str, data: bytes, room: int) -> int:
    """Decompressed size (bytes) of one block of ``codec``; past ``room`` it may stop counting."""
    if codec == "null":
        return len(data)
    if codec == "snappy":  # raw snappy + CRC32: bounded by the length it states
        return snappy_length(data)
    return _inflate(data, _DECOMPRESSORS[codec](), room)


def _inflate(data: bytes, decompressor: Any, room: int) -> int:
    """Decompressed size of one block, in chunks of :data:`_CHUNK`, stopping once past ``room`` bytes."""
    n, pending = 0, data
    while n <= room and not decompressor.eof:
        n += len(decompressor.decompress(pending, _CHUNK))
        if isinstance(decompressor, _ZLIB):  # the rest of the input waits in a tail
            pending = decompressor.unconsumed_tail
            if not pending and not decompressor.eof:
                return n + len(decompressor.flush())
        else:  # bz2, lzma: the rest of the output waits inside; b"" asks for more of it
            pending = b""
            if decompressor.needs_input:
                return n
    return n


def read_records(path: str | Path, limit: int = MAX_INFLATED_BYTES) -> list:
    """The records of the Avro container file ``path``.

    Raises
    ------
    DecodeError
        Not a container file (:func:`not_a_container`), blocks that inflate past ``limit`` bytes,
        or a file fastavro cannot read; the message names the file.
    """
    p = Path(path)
    try:
        fh = open(p, "rb")
    except OSError as exc:  # a folder, a device, no permission
        raise DecodeError(f"{p.name} cannot be read: {exc.strerror or exc}") from exc
    with fh:
        problem = not_a_container(fh.read(5))
        if problem:
            raise DecodeError(f"{p.name}: {problem}")
        try:
            fh.seek(0)
            inflated_size(fh, limit)
            fh.seek(0)
            return list(fastavro.reader(fh))
        except DecodeError as exc:
            raise DecodeError(f"{p.name} is not a readable Avro container file: {exc}") from exc
        except Exception as exc:  # fastavro raises many types on a truncated or foreign file
            raise DecodeError(f"{p.name} is not a readable Avro container file: "
                              f"{type(exc).__name__}: {exc}") from exc
