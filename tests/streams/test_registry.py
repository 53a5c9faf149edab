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


def _raw(url: str, request: bytes, timeout: float = 10.0, half_close: bool = False) -> bytes:
    """The server's answer to ``request`` sent as it is (bytes no HTTP client writes), until it closes.

    ``half_close``: end the sending side after the request (the server reads the end of its input).
    """
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as conn:
        conn.sendall(request)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
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


# --- hostile requests ---------------------------------------------------------------------------------------
def _post(path: bytes, body: bytes, headers: bytes = b"") -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\nContent-Length: %d\r\n" % len(body) + headers + b"\r\n" + body


def _nested_array_schema(depth: int) -> bytes:
    return json.dumps({"schema": '{"type": "array", "items": ' * depth + '"long"' + "}" * depth}).encode()


HOSTILE = {  # request -> (status, error_code)
    "garbage_line": (b"GARBAGE\r\n\r\n", 400, 400),
    "http_9_9": (b"GET /subjects HTTP/9.9\r\n\r\n", 400, 400),
    "http_0_9_post": (b"POST /subjects\r\n\r\n", 400, 400),
    "line_over_64k": (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, 414),
    "200_headers": (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(200)) + b"\r\n", 431, 431),
    "header_over_64k": (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431, 431),
    "put": (b"PUT /config HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, 405),
    "delete": (b"DELETE /subjects/x-value HTTP/1.1\r\n\r\n", 405, 405),
    "unknown_method": (b"BREW /subjects HTTP/1.1\r\n\r\n", 405, 405),
    "chunked": (b"POST /subjects/x-value/versions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n", 411, 41101),
    "chunked_and_length": (b"POST /subjects/x-value/versions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                           b"Content-Length: 2\r\n\r\n{}", 411, 41101),
    "two_lengths": (b"POST /subjects/x-value/versions HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 100\r\n\r\n{}",
                    400, 40001),
    "over_max_body": (b"POST /subjects/x-value/versions HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n{}", 413, 41301),
    "invalid_json": (_post(b"/subjects/x-value/versions", b"{{{"), 422, 42201),
    "json_not_object": (_post(b"/subjects/x-value/versions", b"[1, 2]"), 422, 42201),
    "schema_not_string": (_post(b"/subjects/x-value/versions", b'{"schema": {"type": "long"}}'), 422, 42201),
    "not_avro": (_post(b"/subjects/x-value/versions", b'{"schema": "{\\"type\\": \\"nope\\"}"}'), 422, 42201),
    "protobuf": (_post(b"/subjects/x-value/versions", b'{"schema": "syntax = \\"proto3\\";", '
                       b'"schemaType": "PROTOBUF"}'), 422, 42201),
    "not_utf8": (_post(b"/subjects/x-value/versions", b'{"schema": "\xff\xfe"}'), 422, 42201),
    "nan": (_post(b"/subjects/x-value", b'{"schema": NaN}'), 422, 42201),
    "deep_body": (_post(b"/subjects/x-value/versions", b"[" * 100000 + b"]" * 100000), 422, 42201),
    "deep_schema_text": (_post(b"/subjects/x-value/versions", json.dumps({"schema": "[" * 50000 + "]" * 50000})
                               .encode()), 422, 42201),
    "schema_nested_980": (_post(b"/subjects/x-value/versions", _nested_array_schema(980)), 422, 42201),
    "schema_nested_982": (_post(b"/subjects/x-value", _nested_array_schema(982)), 422, 42201),
    "unknown_path": (b"GET /../../etc/passwd HTTP/1.1\r\n\r\n", 404, 404),
    "nul_in_path": (b"GET /subjects/\x00/versions HTTP/1.1\r\n\r\n", 404, 40401),
    "post_on_ids": (_post(b"/schemas/ids/1", b"{}"), 404, 404),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_request_is_a_4xx_in_the_registrys_error_format_and_the_registry_serves_on(name):
    """A malformed request is a 4xx with an ``error_code``, and the registry goes on serving.

    Malformed requests got Python's HTML error page (400, 414, 431), 501 for a method not served, 505 for
    HTTP/9.9, a 422 "KeyError: 'schema'" for a chunked body (read as empty), the first of two Content-Lengths,
    and a 500 for an Avro schema nested 981-982 levels deep (RecursionError writing its compact form).
    """
    request, status, code = HOSTILE[name]
    with EmbeddedRegistry() as registry:
        answer = _raw(registry.url, request)
        assert SchemaRegistryClient({"url": registry.url}).register_schema("alerts-value", Schema(OTHER, "AVRO"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[:2] == [b"HTTP/1.0", str(status).encode()], answer[:300]
    assert b"Content-Type: application/vnd.schemaregistry.v1+json" in head
    assert json.loads(body)["error_code"] == code and json.loads(body)["message"]


def test_a_schema_nested_deep_but_within_the_limit_is_registered_and_served_back():
    from streams.registry import MAX_SCHEMA_DEPTH

    with EmbeddedRegistry() as registry:
        client = SchemaRegistryClient({"url": registry.url})
        sid = client.register_schema("deep-value", Schema(json.loads(_nested_array_schema(MAX_SCHEMA_DEPTH - 1))
                                                          ["schema"], "AVRO"))
        assert json.loads(client.get_schema(sid).schema_str)["type"] == "array"


def test_a_client_gone_before_its_answer_costs_no_traceback(capfd):
    """A client that closed before reading its answer printed socketserver's traceback (BrokenPipeError), ~40 lines."""
    import socket
    from urllib.parse import urlsplit

    with EmbeddedRegistry() as registry:
        url = urlsplit(registry.url)
        for _ in range(5):
            with socket.create_connection((url.hostname, url.port)) as conn:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
                conn.sendall(b"GET /schemas/ids/" + b"1" * 60000 + b" HTTP/1.1\r\n\r\n")
        assert SchemaRegistryClient({"url": registry.url}).get_subjects() == []
    assert "Traceback" not in capfd.readouterr().err


def test_seeded_mutations_of_a_registration_are_never_a_5xx():
    import random

    rng = random.Random(20261207)
    valid = _post(b"/subjects/alerts-value/versions", json.dumps({"schema": OTHER}).encode())
    statuses = []
    with EmbeddedRegistry() as registry:
        for _ in range(300):
            data = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(data))
                op = rng.randrange(3)
                if op == 0:
                    data[i] = rng.randrange(256)
                elif op == 1:
                    del data[i:i + rng.randint(1, 8)]
                else:
                    data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            answer = _raw(registry.url, bytes(data), timeout=5, half_close=True)
            if answer:  # nothing back: the request line itself cut (an empty request is no request)
                head, _, body = answer.partition(b"\r\n\r\n")
                statuses.append(int(head.split(b" ")[1]))
                assert statuses[-1] < 500 and "error_code" in json.loads(body) or statuses[-1] == 200, answer[:300]
        client = SchemaRegistryClient({"url": registry.url})
        sid = client.register_schema("after-value", Schema(OTHER, "AVRO"))
        assert client.get_latest_version("after-value").schema_id == sid
    assert len(set(statuses)) >= 4  # the mutations reach several answers, not one


@pytest.mark.parametrize("stage", ["request_line", "headers", "body"])
def test_a_client_dribbling_its_request_is_cut_off_at_the_request_timeout_in_all(monkeypatch, stage):
    """The timeout was per read: a byte every 29 s held a thread for ever (any number of such clients).

    Now the request line, headers and body must all arrive within ``REQUEST_TIMEOUT_S`` of the
    request's first byte being awaited.
    """
    import socket
    import time
    from urllib.parse import urlsplit

    from streams.registry import _Handler

    monkeypatch.setattr(_Handler, "timeout", 0.6)
    start = {"request_line": b"", "headers": b"GET /subjects HTTP/1.1\r\n",
             "body": b"POST /subjects/x-value/versions HTTP/1.1\r\nContent-Length: 1000\r\n\r\n"}[stage]
    with EmbeddedRegistry() as registry:
        url = urlsplit(registry.url)
        with socket.create_connection((url.hostname, url.port), timeout=10) as conn:
            conn.sendall(start)
            t0, answer = time.monotonic(), b""
            try:
                while time.monotonic() - t0 < 4:  # a byte every 0.2 s, each within the per-read timeout
                    conn.sendall(b"X" if stage != "headers" else b"X-A: b\r\n")
                    time.sleep(0.2)
            except OSError:  # closed by the registry
                pass
            while chunk := conn.recv(65536):
                answer += chunk
            elapsed = time.monotonic() - t0
        assert SchemaRegistryClient({"url": registry.url}).get_subjects() == []  # still serving
    assert elapsed < 2.5, elapsed
    if stage == "body":
        assert answer.split(b" ")[1] == b"408" and json.loads(answer.partition(b"\r\n\r\n")[2])["error_code"] == 40801


def test_connections_beyond_max_connections_are_503_in_the_registrys_format_not_a_thread_each(monkeypatch):
    """With ``MAX_CONNECTIONS`` held by silent clients, a request is 503 (``Retry-After``); served again once they go.

    Each connection was a thread of its own, with no bound: silent clients held as many threads as
    they opened connections, each for up to ``REQUEST_TIMEOUT_S``.
    """
    import socket
    import threading
    import time
    from urllib.parse import urlsplit

    import streams.registry as registry_module

    monkeypatch.setattr(registry_module, "MAX_CONNECTIONS", 2, raising=False)
    monkeypatch.setattr(registry_module, "IDLE_EVICT_S", 60.0)  # none old enough to give its place, however slow
    with EmbeddedRegistry() as registry:
        url = urlsplit(registry.url)
        before = threading.active_count()
        silent = [socket.create_connection((url.hostname, url.port), timeout=10) for _ in range(2)]
        answers = [_raw(registry.url, b"GET /subjects HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(20)]
        assert threading.active_count() <= before + 2  # a thread for each silent one, none for the refused
        for sock in silent:
            sock.close()
        deadline = time.monotonic() + 10
        while (answer := _raw(registry.url, b"GET /subjects HTTP/1.0\r\n\r\n")).split(b" ")[1] == b"503":
            assert time.monotonic() < deadline, "the silent connections' threads were not freed"
            time.sleep(0.05)
    assert answer.split(b" ")[1] == b"200" and json.loads(answer.partition(b"\r\n\r\n")[2]) == []
    for refused in answers:
        head, _, body = refused.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"503" and b"\r\nRetry-After: 1" in head, refused[:200]
        assert json.loads(body)["error_code"] == 503


def _record(n: int) -> Schema:
    return Schema(json.dumps({"type": "record", "name": f"R{n}", "fields": [{"name": "a", "type": "long"}]}), "AVRO")


def test_schemas_subjects_and_schema_bytes_past_their_bounds_are_422_42205(monkeypatch):
    """A new schema past ``MAX_SCHEMAS`` or ``MAX_SCHEMA_BYTES``, a new subject past ``MAX_SUBJECTS``: 422, 42205.

    Nothing bounded them: every registration of a new schema (up to 4 MiB) or subject was kept for the
    registry's life. What is kept already is registered, looked up and served as before.
    """
    import streams.registry as registry_module

    with EmbeddedRegistry() as registry:
        client = SchemaRegistryClient({"url": registry.url})
        monkeypatch.setattr(registry_module, "MAX_SCHEMAS", len(registry.store.schemas) + 2, raising=False)
        monkeypatch.setattr(registry_module, "MAX_SUBJECTS", 3, raising=False)
        first, second = (client.register_schema("a-value", _record(n)) for n in (1, 2))
        refused = []
        for call in (lambda: client.register_schema("a-value", _record(3)),  # a third new schema
                     lambda: client.register_schema("b-value", _record(1)),  # kept: a second subject
                     lambda: client.register_schema("c-value", Schema(schema_json(), "AVRO")),  # known from start
                     lambda: client.register_schema("d-value", _record(2))):  # a fourth subject
            try:
                call()
            except SchemaRegistryError as err:
                refused.append((err.http_status_code, err.error_code))
            else:
                refused.append(None)
        assert refused == [(422, 42205), None, None, (422, 42205)]
        assert client.lookup_schema("a-value", _record(2)).schema_id == second
        assert sorted(client.get_subjects()) == ["a-value", "b-value", "c-value"]
        monkeypatch.setattr(registry_module, "MAX_SCHEMAS", 10_000)
        monkeypatch.setattr(registry_module, "MAX_SCHEMA_BYTES", registry.store.schema_bytes + 100)
        with pytest.raises(SchemaRegistryError) as err:
            client.register_schema("a-value", _record(4))  # ~140 bytes, twice
        assert err.value.error_code == 42205 and "bytes of schemas" in err.value.error_message
        assert client.get_schema(first).schema_str == _record(1).schema_str


def test_silent_connections_at_the_cap_do_not_shut_a_real_client_out():
    """``MAX_CONNECTIONS`` (64) silent connections, then a real client: answered at once, the oldest silent one closed.

    The cap was first come, first served: 64 connections that never sent a request held every slot for
    ``REQUEST_TIMEOUT_S`` (30 s, and for ever if reopened), and every other client was answered 503
    (Confluent's client, retrying 3 times, failed after 2.3 s). A connection waiting for its request's
    head for ``IDLE_EVICT_S`` (1 s) or more is now closed to make room for a new one at the cap; a busy
    or younger one is not, and the new one is refused 503 then, as before.
    """
    import contextlib
    import select
    import socket
    import time
    from urllib.parse import urlsplit

    import httpx

    import streams.registry as registry_module

    with EmbeddedRegistry() as registry, contextlib.ExitStack() as held, httpx.Client(timeout=10) as client:
        url = urlsplit(registry.url)
        t0 = time.monotonic()
        silent = [held.enter_context(socket.create_connection((url.hostname, url.port), timeout=10))
                  for _ in range(registry_module.MAX_CONNECTIONS)]
        young = client.get(f"{registry.url}/subjects")  # every silent one younger than IDLE_EVICT_S
        assert time.monotonic() - t0 < registry_module.IDLE_EVICT_S
        time.sleep(registry_module.IDLE_EVICT_S + 0.2)
        confluent = SchemaRegistryClient({"url": registry.url})
        t0 = time.monotonic()
        subjects = confluent.get_subjects()
        elapsed = time.monotonic() - t0
        registered = confluent.register_schema("a-value", _record(1))  # on the same connection, kept alive
        time.sleep(0.2)
        closed = [s.recv(1) for s in select.select(silent, [], [], 0)[0]]  # one of them, for the client
    assert young.status_code == 503 and young.headers["Retry-After"] == "1"
    assert subjects == [] and registered > 0
    assert elapsed < 0.5, elapsed
    # the oldest silent one closed for the client; a second where the client opened another connection for its
    # second request (CI on 703e4d4 closed 2): never more, and never a refused client
    assert closed in ([b""], [b"", b""])


def test_a_connection_whose_request_head_is_in_keeps_its_place_at_the_cap(monkeypatch):
    """At ``MAX_CONNECTIONS``, a connection sending its body (head in) for over ``IDLE_EVICT_S`` is not closed: 503.

    Only a connection waiting for its request's line and headers gives its place to a new one.
    """
    import select
    import socket
    import time
    from urllib.parse import urlsplit

    import streams.registry as registry_module

    monkeypatch.setattr(registry_module, "MAX_CONNECTIONS", 1)
    monkeypatch.setattr(registry_module, "IDLE_EVICT_S", 0.2)
    with EmbeddedRegistry() as registry:
        url = urlsplit(registry.url)
        with socket.create_connection((url.hostname, url.port), timeout=10) as sending:
            sending.sendall(b"POST /subjects/x-value/versions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(0.5)
            refused = _raw(registry.url, b"GET /subjects HTTP/1.0\r\n\r\n")
            assert select.select([sending], [], [], 0.2)[0] == []  # still open
    assert refused.split(b" ")[1] == b"503", refused[:100]


def test_a_burst_of_connections_is_accepted_without_the_clients_retrying():
    """64 connections opened at once (``MAX_CONNECTIONS``) all connect within a second.

    The listen backlog was socketserver's 5: past 6 connections not yet accepted the kernel dropped
    the next connect, which the client's TCP sent again a second later (64 at once: 9.2 s).
    """
    import contextlib
    import socket
    import time
    from urllib.parse import urlsplit

    import streams.registry as registry_module

    with EmbeddedRegistry() as registry, contextlib.ExitStack() as held:
        url = urlsplit(registry.url)
        t0 = time.monotonic()
        for _ in range(registry_module.MAX_CONNECTIONS):
            held.enter_context(socket.create_connection((url.hostname, url.port), timeout=10))
        elapsed = time.monotonic() - t0
    assert elapsed < 0.9, elapsed
