"""A Kafka Produce request written by hand: records librdkafka's producer cannot write (header names not UTF-8).

Any other client (Go's, a hand-made one) can write header names of any bytes; confluent-kafka's
producer takes names as text. :func:`produce_raw` sends one record in a Produce v3 request (record
batch v2, no transaction, no idempotence) and returns its offset.
"""

from __future__ import annotations

import socket
import struct
import time

from streams.gateway import _put_uvarint

_CRC32C_POLY = 0x82F63B78
_CRC32C_TABLE = []
for _n in range(256):
    for _ in range(8):
        _n = (_n >> 1) ^ _CRC32C_POLY if _n & 1 else _n >> 1
    _CRC32C_TABLE.append(_n)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, as a record batch carries it."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _varint(n: int) -> bytes:
    """Zig-zag varint (the record format's lengths and deltas)."""
    return _put_uvarint((n << 1) ^ (n >> 63))


def _bytes(data: bytes | None) -> bytes:
    return _varint(-1) if data is None else _varint(len(data)) + data


def record_batch(key: bytes | None, value: bytes | None, headers: list[tuple[bytes, bytes | None]]) -> bytes:
    """A record batch (v2) of one record."""
    body = b"\x00" + _varint(0) + _varint(0) + _bytes(key) + _bytes(value) + _varint(len(headers))
    body += b"".join(_varint(len(name)) + name + _bytes(v) for name, v in headers)
    now = int(time.time() * 1000)
    after_crc = struct.pack(">hiqqqhii", 0, 0, now, now, -1, -1, -1, 1) + _varint(len(body)) + body
    tail = struct.pack(">ibI", -1, 2, crc32c(after_crc)) + after_crc
    return struct.pack(">qi", 0, len(tail)) + tail


def produce_raw(bootstrap: str, topic: str, value: bytes | None, headers: list[tuple[bytes, bytes | None]],
                key: bytes | None = None, partition: int = 0) -> int:
    """Send one record to ``topic`` (acks all) and return its offset; ``headers`` names are raw bytes."""
    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    batch, name = record_batch(key, value, headers), topic.encode()
    request = struct.pack(">hhih", 0, 3, 1, 3) + b"raw" + struct.pack(">hhi", -1, -1, 10_000)
    request += struct.pack(">ih", 1, len(name)) + name + struct.pack(">iii", 1, partition, len(batch)) + batch
    with socket.create_connection((host, int(port)), timeout=15) as conn:
        conn.sendall(struct.pack(">i", len(request)) + request)
        response = _read(conn, struct.unpack(">i", _read(conn, 4))[0])
    (size,) = struct.unpack_from(">h", response, 8)  # correlation id, topic count, then the topic name
    _, error, offset = struct.unpack_from(">ihq", response, 10 + size + 4)
    if error:
        raise RuntimeError(f"the broker refused the record: error {error}")
    return offset


def _read(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        buf += chunk
    return buf
