"""The embedded schema registry answers Confluent's client as Confluent's registry does."""

from __future__ import annotations

import json

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from streams.framing import schema_json
from streams.registry import EmbeddedRegistry

OTHER = json.dumps({"type": "record", "name": "Other", "fields": [{"name": "a", "type": "long"}]})


@pytest.fixture(scope="module")
def client():
    with EmbeddedRegistry() as registry:
        yield SchemaRegistryClient({"url": registry.url})


def test_register_dedups_schemas_across_subjects_and_versions_them_per_subject(client):
    alert = Schema(schema_json(), "AVRO")
    first = client.register_schema("alerts-value", alert)
    assert client.register_schema("alerts-rubin-value", alert) == first  # one schema, one id
    other = client.register_schema("alerts-value", Schema(OTHER, "AVRO"))
    assert other != first
    assert client.get_versions("alerts-value") == [1, 2]
    latest = client.get_latest_version("alerts-value")
    assert (latest.version, latest.schema_id) == (2, other)
    assert client.get_version("alerts-value", 1).schema_id == first
    assert json.loads(client.get_schema(first).schema_str) == json.loads(schema_json())
    assert client.lookup_schema("alerts-rubin-value", alert).version == 1
    assert set(client.get_subjects()) >= {"alerts-value", "alerts-rubin-value"}


@pytest.mark.parametrize("call,code", [
    (lambda c: c.get_schema(999), 40403),
    (lambda c: c.get_latest_version("no-such-value"), 40401),
    (lambda c: c.get_version("alerts-value", 99), 40402),
    (lambda c: c.lookup_schema("alerts-value", Schema('{"type": "string"}', "AVRO")), 40403),
    (lambda c: c.register_schema("bad-value", Schema('{"type": "recordd"}', "AVRO")), 42201),
])
def test_errors_carry_confluent_error_codes(client, call, code):
    client.register_schema("alerts-value", Schema(schema_json(), "AVRO"))
    with pytest.raises(SchemaRegistryError) as err:
        call(client)
    assert err.value.error_code == code


@pytest.mark.parametrize("length", ["abc", "-5", "1_0", "\u0663", "1e3"])
def test_a_content_length_that_is_not_a_count_is_400(length):
    import http.client
    from urllib.parse import urlsplit

    with EmbeddedRegistry() as registry:
        url = urlsplit(registry.url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        conn.putrequest("POST", "/subjects/x-value/versions")
        conn.putheader("Content-Length", length.encode())
        conn.endheaders()
        res = conn.getresponse()
        assert res.status == 400 and json.loads(res.read())["error_code"] == 40001
        conn.close()
        assert SchemaRegistryClient({"url": registry.url}).get_subjects() == []  # still serving


def _raw(url: str, request: bytes, timeout: float = 10.0) -> bytes:
    """The server's answer to ``request`` sent as it is (bytes no HTTP client writes), until it closes."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("path", [b"/schemas/ids/" + b"9" * 5000, b"/schemas/ids/" + b"9" * 5000 + b"/schema",
                                  b"/subjects/alerts-value/versions/" + b"9" * 5000,
                                  b"/subjects/alerts-value/versions/\xb2"])
def test_an_id_or_version_of_thousands_of_digits_or_not_ascii_is_404_not_500(path):
    """``int()`` refused them (over 4300 digits; ``²`` passes ``isdigit``) with ValueError: a 500."""
    with EmbeddedRegistry() as registry:
        SchemaRegistryClient({"url": registry.url}).register_schema("alerts-value", Schema(OTHER, "AVRO"))
        answer = _raw(registry.url, b"GET " + path + b" HTTP/1.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"404", answer[:200]
    assert json.loads(body)["error_code"] in (40402, 40403)


def test_a_client_that_stops_sending_gets_408_or_a_closed_connection_not_a_thread_for_ever(monkeypatch):
    """Without a socket timeout, a request whose body never came or a connection sending nothing held a thread for ever.

    Each such connection kept a thread of the server waiting in a read: any number of them, never freed.
    """
    from streams.registry import REQUEST_TIMEOUT_S, _Handler

    assert _Handler.timeout == REQUEST_TIMEOUT_S > 0  # StreamRequestHandler's default is None: no timeout
    monkeypatch.setattr(_Handler, "timeout", 0.5)
    with EmbeddedRegistry() as registry:
        partial = _raw(registry.url, b"POST /subjects/x-value/versions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        silent = _raw(registry.url, b"")
        assert SchemaRegistryClient({"url": registry.url}).get_subjects() == []  # still serving
    head, _, body = partial.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"408" and json.loads(body)["error_code"] == 40801
    assert silent == b""


def test_a_subject_is_kept_as_named_not_as_the_client_quoted_it_in_the_path(client):
    """The client sends ``subjects/a%2Fb%20value``; the registry kept that text, and listed it back, as the subject."""
    sid = client.register_schema("a/b value", Schema(OTHER, "AVRO"))
    assert "a/b value" in client.get_subjects()
    latest = client.get_latest_version("a/b value")
    assert (latest.subject, latest.schema_id) == ("a/b value", sid)


def test_confluent_alerts_written_before_a_restart_still_decode_with_rubins_deserializer():
    """A restarted registry knows the ids of the confluent alerts written before its restart.

    Ids were counted from 1 in each life: after ``broker embedded`` restarted (its topics kept
    with ``--durable``), the alerts written before had ids it did not know (404), or, once the alert stage
    registered v4 again as id 1, the v3 alerts of id 1 named v4.
    """
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    from streams.framing import AlertEncoder, FramingConfig, register
    from tests.streams.test_framing import _sample

    context = SerializationContext("alerts-rubin", MessageField.VALUE)
    with EmbeddedRegistry() as first:  # the topic's alerts of v3, then of v4 after an upgrade
        old = SchemaRegistryClient({"url": first.url})
        v3_id = register(old, "alerts-rubin", 3)
        v3_alert = _sample(3)
        v3_message = b"\x00" + v3_id.to_bytes(4, "big") + _body(3, v3_alert)
        encoder = AlertEncoder(FramingConfig("confluent"), "alerts-rubin", registry=old)
        v4_message = encoder.encode(_sample(), None).value
    with EmbeddedRegistry() as second:  # restarted
        deserialize = AvroDeserializer(SchemaRegistryClient({"url": second.url}))
        assert deserialize(v3_message, context) == v3_alert and deserialize(v4_message, context) == _sample()
        new = SchemaRegistryClient({"url": second.url})  # the alert stage registers v4 again: the same id
        assert AlertEncoder(FramingConfig("confluent"), "alerts-rubin", registry=new).schema_id == encoder.schema_id
        assert new.get_versions("alerts-rubin-value") == [1] and new.get_subjects() == ["alerts-rubin-value"]


def _body(version: int, record: dict) -> bytes:
    """The schemaless Avro body of ``record`` with alert schema ``version``."""
    import io

    import fastavro

    import schemas

    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schemas.load("alert", version), record)
    return buf.getvalue()
