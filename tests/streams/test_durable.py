"""The embedded broker on PostgreSQL (``broker embedded --durable``): stopped or killed, it loses nothing.

A PostgreSQL 15 server is started for the session (``postgres`` in tests/conftest.py).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import fastavro
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from streams.durable import ObjectServer
from streams.embedded import EmbeddedKafka, free_port

pytestmark = [pytest.mark.kafka]


@pytest.fixture
def dsn(postgres):
    return postgres.create_database("kafka")


def _client(endpoint: str):
    """A keep-alive HTTP client of the endpoint: ``call(path, method, body, **headers) -> (status, headers, body)``."""
    import http.client

    conn = http.client.HTTPConnection(endpoint.split("//")[1], timeout=10)

    def call(path: str, method: str = "GET", body: bytes | None = None, **headers: str) -> tuple[int, dict, bytes]:
        conn.request(method, path, body, {k.replace("_", "-"): v for k, v in headers.items()})
        res = conn.getresponse()
        return res.status, dict(res.headers), res.read()

    return conn, call


def test_the_object_server_keeps_s3_semantics_in_postgres(dsn):
    with ObjectServer(dsn) as server:
        conn, call = _client(server.endpoint)
        status, head, _ = call("/b/k/1", "PUT", b"one", If_None_Match="*")
        assert status == 200 and head["ETag"]
        assert call("/b/k/1", "PUT", b"again", If_None_Match="*")[0] == 412  # create: only if absent
        assert call("/b/k/1", "PUT", b"two", If_Match='"stale"')[0] == 412  # update: only over its ETag
        status, head2, _ = call("/b/k/1", "PUT", b"two", If_Match=head["ETag"])
        assert status == 200 and head2["ETag"] != head["ETag"]
        status, got, body = call("/b/k/1")
        assert (status, body) == (200, b"two") and got["Last-Modified"].endswith("GMT")
        assert call("/b/k/1", If_None_Match=head2["ETag"])[0] == 304
        assert call("/b/k/1", Range="bytes=1-")[2] == b"wo"
        for i in range(2, 1203):  # two pages of ListObjectsV2
            call(f"/b/k/{i:05d}", "PUT", b"x")
        call("/b/other/1", "PUT", b"x")
        keys, token = [], ""
        while True:
            _, _, xml = call("/b?list-type=2&prefix=k/" + (f"&continuation-token={token}" if token else ""))
            text = xml.decode()
            keys += [k.split("</Key>")[0] for k in text.split("<Key>")[1:]]
            if "<NextContinuationToken>" not in text:
                break
            token = text.split("<NextContinuationToken>")[1].split("<")[0]
        assert len(keys) == 1202 and keys == sorted(keys) and all(k.startswith("k/") for k in keys)
        _, _, xml = call("/b?list-type=2&delimiter=/&max-keys=1")  # a common prefix counts once
        assert b"<Prefix>k/</Prefix>" in xml and b"<IsTruncated>true" in xml
        token = xml.decode().split("<NextContinuationToken>")[1].split("<")[0]
        _, _, xml = call(f"/b?list-type=2&delimiter=/&continuation-token={token}")
        assert b"<Prefix>other/</Prefix>" in xml and b"<IsTruncated>false" in xml and b"<Contents>" not in xml
        assert call("/b/k/1", "DELETE")[0] == 204 and call("/b/k/1")[0] == 404
        conn.close()
    with ObjectServer(dsn) as again:  # a new server on the same database: the objects are there
        conn, call = _client(again.endpoint)
        assert call("/b/other/1")[2] == b"x"
        conn.close()


def _produce(bootstrap: str, values: list[bytes]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": "durable-test"})
    p.init_transactions(30)
    for v in values:
        p.begin_transaction()
        p.produce("t", v)
        p.commit_transaction(30)


def _consume(bootstrap: str, group: str, n: int) -> list[bytes]:
    """``n`` values of ``t`` from the group's committed position, committed in turn."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                  "isolation.level": "read_committed", "enable.auto.commit": False})
    c.assign([TopicPartition("t", 0)])  # from the group's committed offset, without a group join
    got, deadline = [], time.monotonic() + 30
    while len(got) < n and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            got.append(m)
    if got:
        c.commit(offsets=[TopicPartition("t", 0, got[-1].offset() + 1)], asynchronous=False)
    c.close()
    return [m.value() for m in got]


def _cli(port: int, dsn: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "embedded", "--port", str(port), "--no-registry",
                             "--no-create"], env={**os.environ, "BROKER_EMBEDDED_DURABLE": dsn},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("bootstrap:"), line + proc.stdout.read()
    return proc


def test_broker_embedded_durable_keeps_records_and_offsets_across_sigterm_and_sigkill(dsn):
    from streams.topics import TopicSpec, create_topics

    port = free_port()
    cli = _cli(port, dsn)  # the command an observatory runs
    bootstrap = f"127.0.0.1:{port}"
    create_topics(bootstrap, [TopicSpec("t", 1)])
    _produce(bootstrap, [b"a0", b"a1", b"a2"])
    assert _consume(bootstrap, "g", 2) == [b"a0", b"a1"]
    cli.send_signal(signal.SIGTERM)
    assert cli.wait(30) == 0
    cli.stdout.close()
    with EmbeddedKafka(port, storage=dsn) as kafka:  # the same database, again
        _produce(bootstrap, [b"b0"])
        assert _consume(bootstrap, "g", 2) == [b"a2", b"b0"]  # the group's offset survived
        kafka.kill()  # SIGKILL
    with EmbeddedKafka(port, storage=dsn):
        _produce(bootstrap, [b"c0"])
        assert _consume(bootstrap, "g", 1) == [b"c0"]
        assert _consume(bootstrap, "fresh", 5) == [b"a0", b"a1", b"a2", b"b0", b"c0"]  # nothing lost, nothing twice


def test_a_durable_broker_without_a_database_says_so():
    res = subprocess.run([sys.executable, "-m", "streams.cli", "embedded", "--durable",
                          "postgresql://u:s3cret@127.0.0.1:1/none"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "cannot use" in res.stdout and "s3cret" not in res.stdout + res.stderr


@pytest.mark.slow
def test_the_pipeline_loses_nothing_when_the_broker_stops_and_is_killed(dsn, tmp_path):
    """Frames in, the broker SIGTERMed and restarted, more frames, the broker SIGKILLed mid-run and restarted.

    About 210 s on 2 cores (over 60 s): six stage processes, six 512x512 frames and two broker
    restarts, each costing the stages a reconnection and a group rejoin. Stages that exit on the
    lost broker are restarted, as a supervisor would. librdkafka can block a transaction for good
    on the restarted coordinator: the stages run with a 30 s ``transaction_deadline_s`` (exit 4,
    restarted). Every candidate must come out as an alert. A copy can reach ``alerts`` (seen: one
    alert twice after the SIGKILL in one run: a restarted stage's guard did not read its progress
    partition to the end within 10 s on the S3-backed storage); ``broker subscribe`` drops
    repeated ``alertId``s, so the subscriber sees each alert once.
    """
    from streams import serde, topics
    from streams.demo import start_stages, stop_stages
    from streams.framestore import FrameStore
    from streams.monitor import read_all
    from streams.producer import FrameProducer
    from streams.settings import KafkaSettings
    from streams.stages import STAGE_NAMES, pipeline_topics
    from tests.streams.test_pipeline import SIM, _frames

    port = free_port()
    settings = KafkaSettings(f"127.0.0.1:{port}", app_id="durable-test")
    frames = _frames(6, seed=11)  # 3 build the reference, 3 are subtracted
    kafka = EmbeddedKafka(port, storage=dsn).start()
    topics.create_topics(settings.bootstrap, pipeline_topics(SIM.filters))
    config = tmp_path / "pipeline.toml"
    config.write_text("transaction_deadline_s = 30\n")
    procs = start_stages(settings.bootstrap, settings.app_id, tmp_path, config)
    restarts = Counter()

    def supervise() -> None:  # restart a stage that exited (a lost broker can be fatal to a transaction)
        for i, p in enumerate(procs):
            if p.poll() is not None:
                restarts[STAGE_NAMES[i]] += 1
                (procs[i],) = start_stages(settings.bootstrap, settings.app_id, tmp_path, config, (STAGE_NAMES[i],))

    def wait_for(topic: str, n: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while len(read_all(settings, [topic], timeout=5)) < n:
            assert time.monotonic() < deadline, f"fewer than {n} messages on {topic}"
            supervise()
            time.sleep(0.5)

    def send(batch) -> None:
        producer = FrameProducer(settings, FrameStore(str(tmp_path / "frames")), 8 << 20, 1 << 30)
        for frame, _ in batch:
            producer.publish_frame(frame, time.time())
        producer.flush()

    try:
        send(frames[:3])
        wait_for(topics.INGESTED, 2)
        kafka.stop()  # SIGTERM, mid-run
        kafka = EmbeddedKafka(port, storage=dsn).start()
        send(frames[3:])
        wait_for(topics.ALERTS, 1)
        kafka.kill()  # SIGKILL, mid-run: the other subtracted frames are in flight
        kafka.stop()
        kafka = EmbeddedKafka(port, storage=dsn).start()
        from streams.demo import wait_until_drained

        deadline = time.monotonic() + 400
        while True:
            supervise()
            try:
                wait_until_drained(settings, procs, timeout=10)
                break
            except (RuntimeError, TimeoutError):
                assert time.monotonic() < deadline, "the pipeline did not drain"
        batches = {}
        for m in read_all(settings, [topics.CANDIDATES]):
            b = serde.decode("candidates", m.value(), dict(m.headers()))
            batches[b["frame_id"]] = b
        alerts = [a for m in read_all(settings, [topics.ALERTS]) for a in fastavro.reader(io.BytesIO(m.value()))]
    finally:
        stop_stages(procs)
        kafka.stop()
    assert set(batches) == {t.frame_id for _, t in frames}  # every frame got through
    expected = {c["cand_id"] for b in batches.values() for c in b["candidates"]}
    assert expected and {a["candid"] for a in alerts} == expected  # nothing lost
    assert len({a["alertId"] for a in alerts}) == len(expected)  # one alertId per candidate


def test_the_object_server_refuses_oversized_and_malformed_bodies_unread(dsn):
    """A Content-Length over ``MAX_BODY_BYTES`` or not a number is answered at once, the body unread."""
    import socket

    from streams.durable import MAX_BODY_BYTES

    with ObjectServer(dsn) as server:
        host, port = server.endpoint.split("//")[1].split(":")
        for length, status in ((str(MAX_BODY_BYTES + 1), b"413"), ("-5", b"400"), ("\xb2", b"400")):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(f"PUT /b/big HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode("latin-1"))
                reply = sock.recv(4096)  # answered without the body being sent
                assert reply.split(b" ")[1] == status, reply
        chunk = hex(MAX_BODY_BYTES + 1)[2:].encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"PUT /b/big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + b"\r\n")
            assert sock.recv(4096).split(b" ")[1] == b"413"
        conn, call = _client(server.endpoint)
        assert call("/b/big")[0] == 404 and call("/b/ok", "PUT", b"fine")[0] == 200  # nothing stored; still serving
        conn.close()


MALFORMED = {  # request -> status; each was a ValueError or a database error, answered 503 (a client retries those)
    "range_not_a_number": (b"GET /b/k HTTP/1.1\r\nRange: bytes=abc\r\n\r\n", 200),
    "range_of_several": (b"GET /b/k HTTP/1.1\r\nRange: bytes=0-1,3-4\r\n\r\n", 200),
    "range_empty": (b"GET /b/k HTTP/1.1\r\nRange: bytes=-\r\n\r\n", 200),
    "range_of_5000_digits": (b"GET /b/k HTTP/1.1\r\nRange: bytes=0-" + b"9" * 5000 + b"\r\n\r\n", 200),
    "key_with_nul": (b"PUT /b/a%00b HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", 400),
    "bucket_with_nul": (b"GET /%00/x HTTP/1.1\r\n\r\n", 400),
    "key_over_1024_bytes": (b"PUT /b/" + b"k" * 1025 + b" HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", 400),
    "chunk_size_not_hex": (b"PUT /b/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    "chunk_size_negative": (b"PUT /b/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nabc\r\n0\r\n\r\n", 400),
    "chunk_cut": (b"PUT /b/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc", 400),
    "delete_not_xml": (b"POST /b?delete HTTP/1.1\r\nContent-Length: 5\r\n\r\n<<<<<", 400),
    "max_keys_not_a_number": (b"GET /b?list-type=2&max-keys=abc HTTP/1.1\r\n\r\n", 400),
    "token_not_utf8": (b"GET /b?list-type=2&continuation-token=__79 HTTP/1.1\r\n\r\n", 400),
    "prefix_with_nul": (b"GET /b?list-type=2&prefix=%00 HTTP/1.1\r\n\r\n", 400),
    "copy_source_with_nul": (b"PUT /b/x HTTP/1.1\r\nx-amz-copy-source: /b/%00\r\nContent-Length: 0\r\n\r\n", 400),
}


def test_malformed_requests_are_4xx_not_a_503_to_retry_and_the_server_serves_on(dsn, caplog):
    """Bad ranges, NULs (which PostgreSQL's TEXT cannot hold), long keys, bad chunks, XML, max-keys and tokens."""
    import logging
    import socket

    with ObjectServer(dsn) as server:
        host, port = server.endpoint.split("//")[1].split(":")
        conn, call = _client(server.endpoint)
        assert call("/b/k", "PUT", b"0123456789")[0] == 200
        answers = {}
        with caplog.at_level(logging.WARNING, logger="streams.durable"):
            for name, (request, _) in MALFORMED.items():
                with socket.create_connection((host, int(port)), timeout=10) as sock:
                    sock.sendall(request)
                    sock.shutdown(socket.SHUT_WR)
                    answers[name] = int(sock.recv(4096).split(b" ")[1])
        assert answers == {name: status for name, (_, status) in MALFORMED.items()}
        assert caplog.text == ""  # nothing taken for a failure of the database
        assert call("/b/k", Range="bytes=2-4") == (206, call("/b/k", Range="bytes=2-4")[1], b"234")  # still serving
        assert call("/b/" + "k" * 1024, "PUT", b"x")[0] == 200  # S3's longest key
        conn.close()


def test_an_unknown_method_or_a_malformed_request_line_is_an_s3_xml_error(dsn):
    """``PATCH``, ``OPTIONS``, ``BREW``: 405 ``MethodNotAllowed`` in S3's XML, with ``Allow``; a bad line 400 in XML.

    They got Python's 501 HTML page (``Error code: 501``), which no S3 client reads as an error.
    """
    import socket
    from xml.etree import ElementTree

    with ObjectServer(dsn) as server:
        host, port = server.endpoint.split("//")[1].split(":")
        answers = {}
        for request in (b"PATCH /b/k HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"OPTIONS /b/k HTTP/1.1\r\n\r\n",
                        b"BREW /b/k HTTP/1.1\r\n\r\n", b"GET /b/k HTTP/1.1 extra\r\n\r\n"):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(request)
                reply = b""
                while chunk := sock.recv(4096):  # the connection is closed after the answer
                    reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:])
            error = ElementTree.fromstring(body)
            answers[request.split(b" ")[0].decode()] = (int(lines[0].split(" ")[1]), error.findtext("Code"),
                                                        headers["Content-Type"], headers.get("Allow"))
        allowed = "GET, HEAD, PUT, DELETE, POST"
        assert answers == {"PATCH": (405, "MethodNotAllowed", "application/xml", allowed),
                           "OPTIONS": (405, "MethodNotAllowed", "application/xml", allowed),
                           "BREW": (405, "MethodNotAllowed", "application/xml", allowed),
                           "GET": (400, "BadRequest", "application/xml", None)}
        conn, call = _client(server.endpoint)
        try:  # serving on (two calls' headers differ by their Date when a second passes between them)
            assert call("/b/k", "PUT", b"x")[0] == 200 and call("/b/k")[::2] == (200, b"x")
        finally:
            conn.close()
