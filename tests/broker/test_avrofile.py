"""Avro container files read within bounds: every codec counted, bombs and broken blocks refused."""

from __future__ import annotations

import io

import fastavro
import pytest

from broker.avrofile import inflated_size, read_records
from broker.errors import DecodeError

SCHEMA = {"type": "record", "name": "A", "fields": [{"name": "s", "type": "bytes"}]}


def _container(records, codec="null") -> bytes:
    buf = io.BytesIO()
    fastavro.writer(buf, SCHEMA, records, codec=codec)
    return buf.getvalue()


@pytest.mark.parametrize("codec", ["null", "deflate", "bzip2", "xz", "snappy"])
def test_the_decompressed_size_is_counted_for_each_codec(codec):
    data = _container([{"s": bytes(1 << 20)} for _ in range(3)], codec)
    assert inflated_size(io.BytesIO(data)) == pytest.approx(3 << 20, rel=1e-3)


@pytest.mark.parametrize("codec", ["deflate", "bzip2", "xz"])
def test_a_compression_bomb_is_refused_before_it_is_decompressed(tmp_path, codec):
    path = tmp_path / "bomb.avro"
    path.write_bytes(_container([{"s": bytes(8 << 20)}], codec))
    assert path.stat().st_size < 100_000
    with pytest.raises(DecodeError, match=r"bomb.avro .*Avro blocks expand to over 1048576 bytes"):
        read_records(path, limit=1 << 20)
    assert read_records(path, limit=16 << 20)[0]["s"] == bytes(8 << 20)  # under the bound: read


def test_a_bomb_is_a_rejection_of_the_evaluation_and_an_error_of_explain(tmp_path, monkeypatch):
    from broker import avrofile
    from broker.explain import load_triplet
    from broker.training.devset import packets

    monkeypatch.setattr(avrofile, "MAX_INFLATED_BYTES", 1 << 20)
    monkeypatch.setattr(avrofile.read_records, "__defaults__", (1 << 20,))
    (tmp_path / "bomb.avro").write_bytes(_container([{"s": bytes(4 << 20)}], "deflate"))
    rejected: list[str] = []
    assert list(packets(tmp_path, rejected)) == [] and "expand to over" in rejected[0]
    with pytest.raises(DecodeError, match="expand to over"):
        load_triplet(tmp_path / "bomb.avro")


@pytest.mark.parametrize("damage", ["truncated", "sync", "codec", "header"])
def test_broken_containers_are_decode_errors(tmp_path, damage):
    data = _container([{"s": b"x" * 100}], "deflate")
    if damage == "truncated":
        data = data[:-30]
    elif damage == "sync":
        data = data[:-1] + bytes([data[-1] ^ 0xFF])
    elif damage == "codec":
        data = data.replace(b"deflate", b"zzzzzzz")
    else:
        data = data[:12]
    (tmp_path / "x.avro").write_bytes(data)
    with pytest.raises(DecodeError, match="x.avro"):
        read_records(tmp_path / "x.avro")
