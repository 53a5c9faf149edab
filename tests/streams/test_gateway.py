"""The SASL/TLS gateway's metrics (``streams/gateway.py``, ``streams.metrics.GatewayMetrics``), on real connections.

Each test runs a :class:`streams.gateway.Gateway` in this process in front of a stand-in for tansu
(or nothing, for an unreachable one) and drives it with raw Kafka requests over TCP (and TLS), as
``tests/streams/test_security.py`` does; the counters are read from the gateway's registry, and
once from its ``/metrics``. The gateway started as ``broker embedded --auth`` starts it is
exercised at the end (marker ``kafka``) and, scraped by a real Prometheus, in ``tests/test_monitoring.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

import streams.gateway as gw
from streams.embedded import check_port_free, free_port
from streams.metrics import GATEWAY_REFUSALS
from tests.streams.test_security import _CountingUpstream, _request

ROOT = Path(__file__).resolve().parents[2]
PLAIN, SCRAM = b"PLAIN", b"SCRAM-SHA-512"

#: Kafka frames (a size prefix, then the bytes): the gateway checks each request's size as it pipes it.
REQUEST = struct.pack(">i", 3) + b"req"
FIRST = struct.pack(">i", 1) + b"f"


def _handshake(mechanism: bytes, correlation_id: int = 1) -> bytes:
    return _request(gw.API_SASL_HANDSHAKE, 1, correlation_id, struct.pack(">h", len(mechanism)) + mechanism)


def _authenticate(message: bytes, correlation_id: int = 2) -> bytes:
    return _request(gw.API_SASL_AUTHENTICATE, 1, correlation_id, struct.pack(">i", len(message)) + message)


def _value(gateway: gw.Gateway, name: str, **labels: str) -> float:
    value = gateway.metrics.registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``check()`` holds (the gateway counts a client's end once it has seen it)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _gateway(tmp_path: Path, upstream_port: int, tls: bool = False, sasl: bool = True,
                   **options: object) -> AsyncIterator[tuple[gw.Gateway, int, object]]:
    """A gateway (user ``alice``, password ``secret``) before ``upstream_port``: itself, its port, a client TLS context.

    The client's ``ssl.SSLContext`` trusts the gateway's certificate (None without ``tls``).
    """
    import ssl

    from streams.certs import LocalCA

    gw.write_users(tmp_path / "users.json", {"alice": "secret"})
    client_tls = None
    cert = None
    if tls:
        ca = LocalCA(tmp_path)
        cert = ca.issue("localhost", ("localhost", "127.0.0.1"))
        client_tls = ssl.create_default_context(cafile=str(ca.cert))
    port = free_port()
    config = gw.GatewayConfig("127.0.0.1", port, "127.0.0.1", upstream_port,
                              users=tmp_path / "users.json" if sasl else None, cert=cert and cert.cert,
                              key=cert and cert.key, **options)  # type: ignore[arg-type]
    gateway = gw.Gateway(config)
    server = asyncio.create_task(gateway.serve(ready := asyncio.Event()))
    await ready.wait()
    try:
        yield gateway, port, client_tls
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


async def _exchange(port: int, *requests: bytes, tls: object = None) -> list[bytes]:
    """Send each request in turn on one connection; the answer to each (b"": closed), then close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                                   server_hostname="localhost" if tls else None)
    answers = []
    for request in requests:
        writer.write(request)
        answers.append(await asyncio.wait_for(reader.read(1 << 16), 10))
    writer.close()
    return answers


def _scram_final(server_first: bytes, nonce: str | None = None) -> bytes:
    """A client-final message with a proof that matches no password (``nonce``: another one than the server's)."""
    server_nonce = re.search(rb"r=([^,]+)", server_first[server_first.index(b"r="):])
    assert server_nonce is not None
    r = nonce or server_nonce.group(1).decode()
    return f"c=biws,r={r},p={base64.b64encode(bytes(64)).decode()}".encode()


def test_logins_are_counted_by_mechanism_and_failures_by_a_reason_that_hides_whether_the_user_exists(tmp_path):
    """A right PLAIN login is admitted; a wrong password and an unknown user are one reason, a broken message another.

    The gateway exported nothing: failed logins were log lines only.
    """
    upstream = _CountingUpstream()

    async def run() -> gw.Gateway:
        async with upstream as up_port, _gateway(tmp_path, up_port) as (gateway, port, _):
            for login in (b"\0alice\0wrong", b"\0mallory\0secret", b"alice-secret"):
                handshaken, refused = await _exchange(port, _handshake(PLAIN), _authenticate(login))
                assert struct.unpack_from(">h", refused, 8)[0] == gw.ERR_SASL_AUTHENTICATION_FAILED
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for request in (_handshake(PLAIN), _authenticate(b"\0alice\0secret")):
                writer.write(request)
                await asyncio.wait_for(reader.read(1 << 16), 10)
            writer.write(REQUEST)
            await _until(lambda: upstream.received == REQUEST)
            writer.close()
            await _until(lambda: _value(gateway, "broker_gateway_connections_open") == 0)
            return gateway

    gateway = asyncio.run(run())
    failures = {(m, r): _value(gateway, "broker_gateway_auth_failures_total", mechanism=m, reason=r)
                for m in gw.MECHANISMS for r in ("credentials", "malformed")}
    assert failures == {("PLAIN", "credentials"): 2, ("PLAIN", "malformed"): 1,  # a wrong password, an unknown user
                        ("SCRAM-SHA-512", "credentials"): 0, ("SCRAM-SHA-512", "malformed"): 0}
    assert _value(gateway, "broker_gateway_admitted_total", mechanism="PLAIN") == 1
    assert _value(gateway, "broker_gateway_admitted_total", mechanism="SCRAM-SHA-512") == 0
    assert _value(gateway, "broker_gateway_bytes_total", direction="to_upstream") == len(REQUEST)
    assert _value(gateway, "broker_gateway_connections_total") == 4
    assert sum(_value(gateway, "broker_gateway_refused_total", reason=r) for r in GATEWAY_REFUSALS) == 0


def test_a_wrong_scram_proof_and_an_unknown_scram_user_are_one_reason(tmp_path):
    """SCRAM's client-final with a proof matching no password: ``credentials``, whether the user exists or not."""

    async def run() -> gw.Gateway:
        async with _gateway(tmp_path, free_port()) as (gateway, port, _):
            for user, nonce in (("alice", None), ("mallory", None), ("alice", "another-nonce")):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(_handshake(SCRAM))
                await asyncio.wait_for(reader.read(1 << 16), 10)
                writer.write(_authenticate(f"n,,n={user},r=abcdefgh".encode()))
                server_first = await asyncio.wait_for(reader.read(1 << 16), 10)
                writer.write(_authenticate(_scram_final(server_first, nonce), 3))
                refused = await asyncio.wait_for(reader.read(1 << 16), 10)
                assert struct.unpack_from(">h", refused, 8)[0] == gw.ERR_SASL_AUTHENTICATION_FAILED
                assert await asyncio.wait_for(reader.read(), 10) == b""
                writer.close()
            return gateway

    gateway = asyncio.run(run())
    assert _value(gateway, "broker_gateway_auth_failures_total", mechanism="SCRAM-SHA-512", reason="credentials") == 2
    assert _value(gateway, "broker_gateway_auth_failures_total", mechanism="SCRAM-SHA-512", reason="malformed") == 1


def test_refusals_are_counted_by_reason(tmp_path, monkeypatch):
    """Each way a connection is closed before it is admitted moves its own reason, and no other."""
    monkeypatch.setattr(gw, "MAX_UNAUTHENTICATED", 2)
    oversized = struct.pack(">i", gw.MAX_PREAUTH_FRAME + 1) + bytes(16)

    async def run() -> tuple[gw.Gateway, dict[str, float]]:
        async with _gateway(tmp_path, free_port(), auth_timeout_s=0.5) as (gateway, port, _):
            await _exchange(port, _handshake(b"SCRAM-SHA-256"))  # answered 33, then closed
            await _exchange(port, _handshake(PLAIN), _handshake(PLAIN))
            await _exchange(port, _request(3, 1, 1, b""))  # Metadata before authentication
            await _exchange(port, oversized)
            await _exchange(port, _request(gw.API_SASL_AUTHENTICATE, 2, 1, b"\xff\xff\xff\xff\xff\xff"))
            silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            assert await asyncio.wait_for(silent[2][0].read(), 10) == b""  # the third: closed at once
            for reader, _ in silent[:2]:  # the first two: closed after auth_timeout_s
                assert await asyncio.wait_for(reader.read(), 10) == b""
            for _, writer in silent:
                writer.close()
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()  # gone before a byte: a probe, not refused nor abandoned
            await _until(lambda: _value(gateway, "broker_gateway_probes_total") == 1)
            await _until(lambda: _value(gateway, "broker_gateway_connections_open") == 0)
            return gateway, {r: _value(gateway, "broker_gateway_refused_total", reason=r) for r in GATEWAY_REFUSALS}

    gateway, refused = asyncio.run(run())
    assert refused == {"too_many_unauthenticated": 1, "too_many_logins": 0, "tls_handshake": 0, "tls_timeout": 0,
                       "auth_timeout": 2,
                       "second_handshake": 1, "unsupported_mechanism": 1, "out_of_order": 1,
                       "malformed_request": 2}
    assert _value(gateway, "broker_gateway_connections_total") == 9
    assert _value(gateway, "broker_gateway_abandoned_total") == 0
    assert _value(gateway, "broker_gateway_admitted_total", mechanism="PLAIN") == 0


def _held_plain_steps(monkeypatch) -> tuple[threading.Event, threading.Event, list[bool]]:
    """Make each PLAIN step wait for a release (5 s at most): (started, release, whether each step was released)."""
    started, release, released = threading.Event(), threading.Event(), []
    step = gw.PlainServer.step

    def held(self: gw.PlainServer, message: bytes) -> tuple[bool, bytes | None]:
        started.set()
        released.append(release.wait(5))
        return step(self, message)

    monkeypatch.setattr(gw.PlainServer, "step", held)
    return started, release, released


async def _plain_login(port: int, password: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has sent a PLAIN login of ``alice`` (its answer not read)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_handshake(PLAIN))
    await asyncio.wait_for(reader.read(1 << 16), 10)
    writer.write(_authenticate(b"\0alice\0" + password))
    return reader, writer


def test_a_plain_login_derives_its_key_off_the_event_loop(tmp_path, monkeypatch):
    """While a PLAIN login's key is derived, an admitted client's request gets its answer through the gateway.

    PBKDF2 ran on the event loop: 50 connections logging in in a loop made every other client's round
    trip 278 ms (median; 0.27 ms idle). Here the derivation is held until the other client's round
    trip is done: on the loop, the round trip waited for it (the hold's 5 s), and the hold timed out.
    """
    upstream = _CountingUpstream()

    async def run() -> tuple[bytes, list[bool]]:
        async with upstream as up_port, _gateway(tmp_path, up_port) as (gateway, port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for request in (_handshake(PLAIN), _authenticate(b"\0alice\0secret")):
                writer.write(request)
                await asyncio.wait_for(reader.read(1 << 16), 10)
            started, release, released = _held_plain_steps(monkeypatch)
            held_reader, held_writer = await _plain_login(port, b"secret")
            await _until(started.is_set)
            writer.write(_request(gw.API_API_VERSIONS, 0, 9, b""))  # through the gateway to the stand-in and back
            assert struct.unpack_from(">i", await asyncio.wait_for(reader.readexactly(14), 10), 4)[0] == 9
            release.set()
            answer = await asyncio.wait_for(held_reader.read(1 << 16), 10)
            for w in (writer, held_writer):
                w.close()
            return answer, released

    answer, released = asyncio.run(run())
    assert released == [True]  # the round trip came while the derivation was held
    assert struct.unpack_from(">h", answer, 8)[0] == 0  # the held login, admitted once released


def test_plain_logins_beyond_the_bound_are_closed_and_counted(tmp_path, monkeypatch, caplog):
    """A PLAIN login while ``MAX_PENDING_DERIVATIONS`` others are derived is closed unanswered: ``too_many_logins``.

    Nothing bounded the derivations: a flood of logins queued as much work as it sent. The login
    held is admitted once released; a SCRAM login is not bounded (the server derives no key).
    """
    monkeypatch.setattr(gw, "MAX_PENDING_DERIVATIONS", 1)

    async def run() -> tuple[gw.Gateway, list[bytes], bytes]:
        async with _gateway(tmp_path, free_port()) as (gateway, port, _):
            started, release, _released = _held_plain_steps(monkeypatch)
            held_reader, held_writer = await _plain_login(port, b"wrong")
            await _until(started.is_set)
            closed = []
            for _ in range(3):
                reader, writer = await _plain_login(port, b"secret")
                closed.append(await asyncio.wait_for(reader.read(), 10))
                writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_handshake(SCRAM))
            await asyncio.wait_for(reader.read(1 << 16), 10)
            writer.write(_authenticate(b"n,,n=alice,r=abcdefgh"))
            server_first = await asyncio.wait_for(reader.read(1 << 16), 10)
            writer.close()
            release.set()
            answer = await asyncio.wait_for(held_reader.read(1 << 16), 10)
            held_writer.close()
            return gateway, closed, answer + server_first

    with caplog.at_level("WARNING", logger="streams.gateway"):
        gateway, closed, answers = asyncio.run(run())
    assert closed == [b"", b"", b""]
    assert b"r=abcdefgh" in answers  # SCRAM's server-first, while the PLAIN login was held
    assert _value(gateway, "broker_gateway_refused_total", reason="too_many_logins") == 3
    assert _value(gateway, "broker_gateway_auth_failures_total", mechanism="PLAIN", reason="credentials") == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "1 PLAIN logins are deriving their keys" in lines[0], lines


def test_tls_handshakes_that_fail_or_never_come_are_counted_apart(tmp_path):
    """No TLS spoken to a TLS gateway: ``tls_handshake``; silence past ``auth_timeout_s``: ``tls_timeout``.

    And a login over TLS is counted as one without.
    """

    async def run() -> gw.Gateway:
        async with _gateway(tmp_path, free_port(), tls=True, auth_timeout_s=0.5) as (gateway, port, tls):
            assert await _exchange(port, _handshake(PLAIN)) == [b""]  # plaintext Kafka: refused in the handshake
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            handshaken, _ = await _exchange(port, _handshake(PLAIN), _authenticate(b"\0alice\0wrong"), tls=tls)
            assert b"PLAIN" in handshaken
            await _until(lambda: _value(gateway, "broker_gateway_connections_open") == 0)
            return gateway

    gateway = asyncio.run(run())
    assert _value(gateway, "broker_gateway_refused_total", reason="tls_handshake") == 1
    assert _value(gateway, "broker_gateway_refused_total", reason="tls_timeout") == 1
    assert _value(gateway, "broker_gateway_auth_failures_total", mechanism="PLAIN", reason="credentials") == 1


@pytest.mark.parametrize(("tls", "sasl"), [(True, True), (True, False), (False, True), (False, False)],
                         ids=["tls-sasl", "tls", "sasl", "plain"])
def test_a_tcp_probe_is_counted_as_a_probe_not_a_refusal(tmp_path, tls, sasl):
    """A connection closed (FIN) or reset (RST) before its first byte: ``broker_gateway_probes_total``, nothing else.

    A load balancer's or Kubernetes' ``tcpSocket`` health check connects and closes without a byte: on a
    TLS gateway each was counted as a refused TLS handshake (``refused_total{reason="tls_handshake"}``), so
    the probes of one pod (every 10 s, liveness and readiness) fired ``BrokerGatewayRefusing``. A client
    that closes after some bytes is still counted as before (a failed TLS handshake, or abandoned).
    """
    import ssl
    import struct as struct_module

    def probe(port: int, reset: bool) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            if reset:  # SO_LINGER 0: close() sends RST, as some load balancers' checks end
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct_module.pack("ii", 1, 0))

    def late_hello(port: int, client: ssl.SSLContext) -> bytes:
        """A TLS client whose ClientHello comes 0.5 s after it connects (the gateway waits for it): its answer."""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            time.sleep(0.5)
            with client.wrap_socket(raw, server_hostname="localhost") as conn:
                conn.sendall(_handshake(PLAIN))
                return conn.recv(1 << 16)

    async def run() -> tuple[gw.Gateway, dict[str, float]]:
        async with _gateway(tmp_path, free_port(), tls=tls, sasl=sasl, auth_timeout_s=5) as (gateway, port, client):
            for reset in (False, True, False):
                await asyncio.to_thread(probe, port, reset)
            await _until(lambda: _value(gateway, "broker_gateway_connections_open") == 0)
            if tls:  # bytes that are no TLS (a Kafka request): still a failed handshake
                assert await _exchange(port, _handshake(PLAIN)) == [b""]
                _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
                writer.close()  # TLS made, then gone before a Kafka byte: abandoned
            if tls and sasl:  # a late ClientHello is waited for, and served
                assert b"PLAIN" in await asyncio.to_thread(late_hello, port, client)
            await _until(lambda: _value(gateway, "broker_gateway_connections_open") == 0)
            return gateway, {r: _value(gateway, "broker_gateway_refused_total", reason=r) for r in GATEWAY_REFUSALS}

    gateway, refused = asyncio.run(run())
    assert _value(gateway, "broker_gateway_probes_total") == 3
    assert refused == {r: float(tls and r == "tls_handshake") for r in GATEWAY_REFUSALS}
    late = tls and sasl
    assert _value(gateway, "broker_gateway_abandoned_total") == tls + late  # the TLS one, the late hello
    assert _value(gateway, "broker_gateway_connections_total") == 3 + 2 * tls + late


def test_an_unreachable_or_silent_upstream_is_counted(tmp_path):
    """An upstream gone, or one that closes without answering ApiVersions, is counted by its reason.

    With tansu gone, a client authenticated (or asking ApiVersions first) is closed and ``unreachable``
    counted; a tansu that takes the connection and closes it unanswered is ``no_answer``.
    """

    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def run() -> tuple[gw.Gateway, gw.Gateway]:
        async with _gateway(tmp_path, free_port()) as (gone, port, _):
            *_, closed = await _exchange(port, _handshake(PLAIN), _authenticate(b"\0alice\0secret"), b"request")
            assert closed == b""
            assert await _exchange(port, _request(gw.API_API_VERSIONS, 0, 1, b"")) == [b""]
        upstream = await asyncio.start_server(closing, "127.0.0.1", 0)
        async with _gateway(tmp_path, upstream.sockets[0].getsockname()[1]) as (silent, port, _):
            assert await _exchange(port, _request(gw.API_API_VERSIONS, 0, 1, b"")) == [b""]
        upstream.close()
        return gone, silent

    gone, silent = asyncio.run(run())
    assert _value(gone, "broker_gateway_upstream_failures_total", reason="unreachable") == 2
    assert _value(gone, "broker_gateway_admitted_total", mechanism="PLAIN") == 1  # admitted, then closed
    assert _value(silent, "broker_gateway_upstream_failures_total", reason="no_answer") == 1
    assert _value(silent, "broker_gateway_upstream_failures_total", reason="unreachable") == 0


def test_bytes_are_counted_each_way_without_sasl(tmp_path):
    """Without SASL a client is admitted on its first bytes (mechanism ``none``); both directions are counted."""
    upstream = _CountingUpstream()

    async def run() -> gw.Gateway:
        async with upstream as up_port, _gateway(tmp_path, up_port, sasl=False) as (gateway, port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(FIRST)
            await _until(lambda: upstream.received == FIRST)
            writer.write(_request(gw.API_API_VERSIONS, 0, 9, b""))  # the stand-in answers it: 14 bytes back
            answer = await asyncio.wait_for(reader.readexactly(14), 10)
            assert struct.unpack_from(">i", answer, 4)[0] == 9
            writer.close()
            await _until(lambda: _value(gateway, "broker_gateway_connections_open") == 0)
            return gateway

    gateway = asyncio.run(run())
    assert _value(gateway, "broker_gateway_admitted_total", mechanism="none") == 1
    assert _value(gateway, "broker_gateway_bytes_total", direction="to_upstream") == 5 + 4 + 11
    assert _value(gateway, "broker_gateway_bytes_total", direction="to_client") == 14


def test_the_metrics_are_served_on_the_metrics_port_and_let_go_with_the_gateway(tmp_path):
    """``metrics_port`` 0: a free port, on ``/metrics``; every series from the start, with no address or user label."""

    async def run() -> tuple[str, int]:
        async with _gateway(tmp_path, free_port(), metrics_port=0) as (gateway, port, _):
            await _exchange(port, _handshake(PLAIN), _authenticate(b"\0mallory\0wrong"))
            assert gateway.metrics_port
            url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
            return body, gateway.metrics_port

    body, metrics_port = asyncio.run(run())
    assert 'broker_gateway_auth_failures_total{mechanism="PLAIN",reason="credentials"} 1.0' in body
    assert 'broker_gateway_refused_total{reason="tls_timeout"} 0.0' in body
    assert "process_start_time_seconds" in body
    assert "mallory" not in body and "127.0.0.1" not in body
    check_port_free(metrics_port)  # listened on no more once the gateway stopped


def test_a_taken_metrics_port_is_one_line_and_exit_code_2():
    """``python -m streams.gateway --metrics-port P`` with P taken: ``error: cannot serve /metrics ...``, exit 2.

    A port out of range is argparse's usage error, which names the range (not 65,537 choices).
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "streams.gateway", "--listen", f"127.0.0.1:{free_port()}",
                              "--upstream", "127.0.0.1:1", "--metrics-port", str(port)],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2 and res.stdout == "", (res.stdout, res.stderr)
    assert res.stderr.strip() == f"error: cannot serve /metrics on 127.0.0.1:{port}: Address already in use", res.stderr
    res = subprocess.run([sys.executable, "-m", "streams.gateway", "--listen", "127.0.0.1:1", "--upstream",
                          "127.0.0.1:2", "--metrics-port", "70000"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert res.returncode == 2 and res.stderr.splitlines()[-1].endswith("'70000' is not -1 (none), 0 (a free port) "
                                                                         "or a port up to 65535"), res.stderr[-2000:]


def test_broker_embedded_serves_gateway_metrics_only_with_auth(monkeypatch):
    import signal

    from typer.testing import CliRunner

    from streams.cli import app

    monkeypatch.setattr(signal, "signal", lambda *args: None)
    res = CliRunner().invoke(app, ["embedded", "--metrics-port", "9464", "--no-create", "--no-registry"])
    assert res.exit_code == 2 and "needs --auth" in res.output, res.output


@pytest.mark.kafka
def test_broker_embedded_auth_refuses_a_taken_metrics_port_in_one_line(monkeypatch):
    """``broker embedded --auth --metrics-port P``, P taken: the gateway's reason, exit 2, no bootstrap line."""
    import signal

    from typer.testing import CliRunner

    from streams.cli import app

    monkeypatch.setattr(signal, "signal", lambda *args: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = CliRunner().invoke(app, ["embedded", "--auth", "--metrics-port", str(port), "--no-create",
                                       "--no-registry"])
    assert res.exit_code == 2 and "bootstrap:" not in res.output, (res.output, res.exception)
    assert f"the gateway did not start: cannot serve /metrics on 127.0.0.1:{port}: Address already in use" in \
        res.output.replace("\n", " "), res.output


@pytest.mark.kafka
def test_librdkafka_logins_through_broker_embedded_auth_move_the_counters():
    """The gateway as ``broker embedded --auth`` runs it (a process, TLS): librdkafka's logins, right and wrong."""
    from broker.errors import KafkaAuthError
    from streams.secure_embedded import SecureEmbeddedKafka
    from streams.security import KafkaSecurity
    from streams.settings import KafkaSettings

    with SecureEmbeddedKafka(users=("admin", "subscriber"), metrics_port=0) as kafka:
        assert kafka.metrics_url and f"gateway metrics: {kafka.metrics_url}" in kafka.describe()
        wrong = KafkaSecurity("SASL_SSL", username="subscriber", password="wrong-pw-1", ca=str(kafka.ca))
        with pytest.raises(KafkaAuthError):
            KafkaSettings(kafka.bootstrap, security=wrong).verify_login()
        kafka.settings("subscriber").verify_login()
        body = urllib.request.urlopen(kafka.metrics_url, timeout=10).read().decode()
    values = dict(re.findall(r"^(broker_gateway_\w+(?:\{[^}]*\})?) (\S+)$", body, re.M))
    assert float(values['broker_gateway_auth_failures_total{mechanism="SCRAM-SHA-512",reason="credentials"}']) >= 1
    assert float(values['broker_gateway_admitted_total{mechanism="SCRAM-SHA-512"}']) >= 2  # start-up check, login
    assert float(values['broker_gateway_bytes_total{direction="to_client"}']) > 0
    assert "wrong-pw-1" not in body and "subscriber" not in body


@pytest.mark.kafka
def test_broker_embedded_auth_on_a_taken_port_says_why(monkeypatch):
    """``broker embedded --auth --port P``, P taken: "the gateway did not start; log: <file>", a file already removed.

    The gateway's traceback (``OSError: [Errno 98]``) went to a log in the temporary folder the command
    removes as it exits; the reason is now its one line, ``cannot listen on 127.0.0.1:P: ...``, exit code 2.
    """
    import signal

    from typer.testing import CliRunner

    from streams.cli import app

    monkeypatch.setattr(signal, "signal", lambda *args: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = CliRunner().invoke(app, ["embedded", "--auth", "--port", str(port), "--no-create", "--no-registry"])
    assert res.exit_code == 2 and "bootstrap:" not in res.output, (res.output, res.exception)
    assert f"the gateway did not start: cannot listen on 127.0.0.1:{port}: " in res.output.replace("\n", " "), \
        res.output
