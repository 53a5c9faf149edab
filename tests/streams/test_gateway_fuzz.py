"""Hostile bytes before authentication, against the SASL gateway in front of a real tansu (``streams/gateway.py``).

The gateway parses Kafka request frames itself until a client has authenticated. Each request here
is one a stranger may send: hand-made ones (length prefixes, api keys and versions, client-id
lengths, tagged fields, SCRAM and PLAIN messages, pipelining, dribbling) and seeded mutations of a
real login. Each connection must be answered with a Kafka error or closed, with at most one log line,
no exception out of the gateway's handlers, and a real client must still log in, produce and consume.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import socket
import struct
import threading
import time
import uuid

import pytest

from streams import gateway as gw

pytestmark = pytest.mark.kafka

#: Seconds a client has to authenticate in these tests (a request waiting for bytes is closed after it).
AUTH_TIMEOUT_S = 1.5


class _Records(logging.Handler):
    """The gateway's log records (every thread)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _Running:
    """A :class:`streams.gateway.Gateway` on an event loop of its own thread, before a tansu advertising it."""

    def __init__(self, tmp_path) -> None:
        from streams.embedded import EmbeddedKafka, free_port

        self.password = "s3cret-" + uuid.uuid4().hex[:8]
        gw.write_users(tmp_path / "users.json", {"admin": self.password})
        self.port = free_port()
        self.kafka = EmbeddedKafka(advertised_port=self.port).start()
        self.config = gw.GatewayConfig("127.0.0.1", self.port, "127.0.0.1", self.kafka.port,
                                       users=tmp_path / "users.json", auth_timeout_s=AUTH_TIMEOUT_S)
        self.loop_errors: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, context: self.loop_errors.append(context))
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        started = asyncio.Event()

        async def main() -> None:
            self.task = asyncio.create_task(gw.Gateway(self.config).serve(started))
            await started.wait()
            ready.set()
            await asyncio.gather(self.task, return_exceptions=True)

        try:
            self.loop.run_until_complete(main())
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)
        self.kafka.stop()


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    handler = _Records()
    logger = logging.getLogger("streams.gateway")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    server = _Running(tmp_path_factory.mktemp("gateway-fuzz"))
    server.log = handler  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()
        logger.removeHandler(handler)
        logger.setLevel(level)


def _request(api_key: int, version: int, correlation_id: int, body: bytes, client: bytes = b"c",
             client_len: int | None = None) -> bytes:
    """A size-prefixed request, header v1 (``client_len`` overrides the client id's length field)."""
    n = len(client) if client_len is None else client_len
    payload = struct.pack(">hhih", api_key, version, correlation_id, n) + client + body
    return struct.pack(">i", len(payload)) + payload


def _handshake(mechanism: bytes = b"SCRAM-SHA-512", version: int = 1) -> bytes:
    return _request(gw.API_SASL_HANDSHAKE, version, 1, struct.pack(">h", len(mechanism)) + mechanism)


def _authenticate(data: bytes, version: int = 1, correlation_id: int = 2) -> bytes:
    if version >= 2:  # header v2 (tagged fields), compact bytes
        payload = (struct.pack(">hhih", gw.API_SASL_AUTHENTICATE, version, correlation_id, 1) + b"c\x00"
                   + gw._put_uvarint(len(data) + 1) + data + b"\x00")
        return struct.pack(">i", len(payload)) + payload
    return _request(gw.API_SASL_AUTHENTICATE, version, correlation_id, struct.pack(">i", len(data)) + data)


def _talk(port: int, chunks: list[bytes], pause_s: float = 0.0, wait_s: float = 4.0,
          half_close: bool = False) -> tuple[bytes, bool, float]:
    """Send ``chunks`` (``pause_s`` apart), then read until the gateway closes or ``wait_s`` passes.

    ``half_close``: end the sending side once the chunks are sent (the gateway sees the end of its input).

    Returns what came back, whether the gateway closed the connection, and the seconds until then.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        t0 = time.monotonic()
        try:
            for chunk in chunks:
                s.sendall(chunk)
                if pause_s:
                    time.sleep(pause_s)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:  # BrokenPipe, ConnectionReset, or not connected (shutdown): the gateway closed it first
            return b"", True, time.monotonic() - t0
        answer = b""
        while True:
            try:
                data = s.recv(1 << 16)
            except TimeoutError:
                return answer, False, time.monotonic() - t0
            except ConnectionResetError:
                return answer, True, time.monotonic() - t0
            if not data:
                return answer, True, time.monotonic() - t0
            answer += data


def _responses(answer: bytes) -> list[bytes]:
    """The response frames (size prefix removed) of ``answer``."""
    out, pos = [], 0
    while pos + 4 <= len(answer):
        (size,) = struct.unpack_from(">i", answer, pos)
        out.append(answer[pos + 4:pos + 4 + size])
        pos += 4 + size
    return out


def _client_first(user: str = "admin", nonce: str = "fyko+d2lbbFgONRv9qkxdawL") -> bytes:
    return f"n,,n={user},r={nonce}".encode()


def _scram_final(server_first: bytes, password: str, client_first_bare: bytes, channel: bytes = b"biws",
                 proof: bytes | None = None) -> bytes:
    """The client-final message answering ``server_first`` (RFC 5802), ``proof`` overriding the right one."""
    import hashlib
    import hmac

    attrs = dict(p.split(b"=", 1) for p in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(attrs[b"s"]), int(attrs[b"i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha512).digest()
    without_proof = b"c=" + channel + b",r=" + attrs[b"r"]
    auth = client_first_bare + b"," + server_first + b"," + without_proof
    signature = hmac.new(hashlib.sha512(client_key).digest(), auth, hashlib.sha512).digest()
    right = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))
    return without_proof + b",p=" + (right if proof is None else proof)


def _sasl_data(frame: bytes) -> tuple[int, bytes]:
    """(error code, SASL bytes) of a SaslAuthenticate v1 response frame (size prefix removed)."""
    (error,) = struct.unpack_from(">h", frame, 4)
    (msg_len,) = struct.unpack_from(">h", frame, 6)
    pos = 8 + max(msg_len, 0)
    (size,) = struct.unpack_from(">i", frame, pos)
    return error, frame[pos + 4:pos + 4 + size]


def _assert_healthy(running, since: int, connections: int) -> None:
    """No exception reached the loop, at most one log line per connection since record ``since``."""
    assert running.loop_errors == []
    lines = [r for r in running.log.records[since:] if r.levelno >= logging.INFO]
    assert len(lines) <= connections, [r.getMessage() for r in lines]
    assert not any(r.exc_info for r in running.log.records[since:])
    assert running.thread.is_alive() and running.kafka.pid is not None


# --- length prefixes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, -1, -(2 ** 31), 2 ** 31 - 1, gw.MAX_PREAUTH_FRAME + 1])
def test_a_length_prefix_out_of_bounds_closes_at_once_before_any_byte_is_read(running, size):
    since = len(running.log.records)
    answer, closed, elapsed = _talk(running.port, [struct.pack(">i", size) + b"\x00" * 16])
    assert answer == b"" and closed and elapsed < AUTH_TIMEOUT_S  # not waiting for 2 GiB, nor the timeout
    _assert_healthy(running, since, 1)


def test_a_length_prefix_longer_than_the_body_waits_only_until_the_authentication_timeout(running):
    since = len(running.log.records)
    frame = _handshake()
    answer, closed, elapsed = _talk(running.port, [struct.pack(">i", len(frame) + 100) + frame[4:]], wait_s=8)
    assert answer == b"" and closed and AUTH_TIMEOUT_S * 0.8 < elapsed < AUTH_TIMEOUT_S + 3
    _assert_healthy(running, since, 1)


def test_a_request_dribbled_one_byte_at_a_time_is_answered(running):
    request = _handshake()
    answer, closed, _ = _talk(running.port, [request[i:i + 1] for i in range(len(request))], pause_s=0.01,
                              wait_s=1)
    (response,) = _responses(answer)
    assert struct.unpack_from(">ih", response) == (1, 0) and not closed


# --- api keys, versions, headers ------------------------------------------------------------------------
@pytest.mark.parametrize("api_key,version", [(0, 9), (3, 12), (-1, 0), (32767, 0), (gw.API_SASL_HANDSHAKE, -1),
                                             (gw.API_SASL_AUTHENTICATE, 0)])
def test_a_request_out_of_the_sasl_exchange_closes_the_connection(running, api_key, version):
    since = len(running.log.records)
    answer, closed, _ = _talk(running.port, [_request(api_key, version, 9, b"\x00" * 8)])
    assert answer == b"" and closed
    _assert_healthy(running, since, 1)


@pytest.mark.parametrize("version", [5, 100, 32767, -1, -32768])
def test_api_versions_of_a_version_tansu_lacks_is_answered_unsupported_without_asking_tansu(running, version):
    """ApiVersions of a version tansu lacks closed the client, with a warning blaming tansu.

    ApiVersions v100 was forwarded to tansu, which closes such a connection: the client was closed and the
    gateway logged a warning blaming the upstream, one per connection (and opened one to tansu each time).

    Kafka answers UNSUPPORTED_VERSION (35) in ApiVersions v0, naming the versions it serves, so that the client
    can ask again in one of them; the gateway does the same, from tansu's own v0 answer.
    """
    since = len(running.log.records)
    answer, closed, _ = _talk(running.port, [_request(gw.API_API_VERSIONS, version, 77, b""),
                                             _request(gw.API_API_VERSIONS, 0, 78, b"")], wait_s=1)
    unsupported, supported = _responses(answer)
    assert struct.unpack_from(">ih", unsupported) == (77, 35) and struct.unpack_from(">ih", supported) == (78, 0)
    assert unsupported[6:] == supported[6:]  # the same list of api keys and versions
    assert not closed
    _assert_healthy(running, since, 0)


@pytest.mark.parametrize("client_len", [-1, -32768, 32767, 200])
def test_a_client_id_length_past_the_frame_is_a_closed_connection_or_an_answer(running, client_len):
    since = len(running.log.records)
    answer, closed, _ = _talk(running.port, [_request(gw.API_SASL_HANDSHAKE, 1, 3, struct.pack(">h", 13)
                                                      + b"SCRAM-SHA-512", client=b"", client_len=client_len)],
                              wait_s=1)
    if client_len < 0:  # a null client id: the body follows at once
        assert struct.unpack_from(">ih", _responses(answer)[0]) == (3, 0)
    else:
        assert answer == b"" and closed
    _assert_healthy(running, since, 1)


@pytest.mark.parametrize("tags", [b"\xff\xff\xff\xff\x0f", b"\xff\xff\xff\xff\xff\xff", b"\x7f",
                                  b"\x01\x00\xff\xff\xff\x07", b"\x02\x00\x00", b"\x01" + b"\x80" * 5 + b"\x00"])
def test_hostile_tagged_fields_of_sasl_authenticate_v2_close_the_connection(running, tags):
    since = len(running.log.records)
    header = struct.pack(">hhih", gw.API_SASL_AUTHENTICATE, 2, 5, 1) + b"c" + tags
    answer, closed, _ = _talk(running.port, [_handshake(), struct.pack(">i", len(header)) + header])
    assert len(_responses(answer)) == 1 and closed  # the handshake's answer, then closed
    _assert_healthy(running, since, 1)


@pytest.mark.parametrize("body", [b"", b"\xff\xff\xff\xff\x0f", b"\x02c\xff\xff\xff\x7f", b"\x80" * 100,
                                  b"\x02c\x021\x05" + b"\x00" * 10, b"\x7f" + b"a" * 10])
def test_hostile_api_versions_v3_bodies_are_answered_by_tansu_or_closed(running, body):
    """ApiVersions v3 (compact strings, tagged fields) is tansu's to parse: answered, or closed; tansu lives on."""
    since = len(running.log.records)
    payload = struct.pack(">hhih", gw.API_API_VERSIONS, 3, 11, 1) + b"c\x00" + body
    answer, closed, _ = _talk(running.port, [struct.pack(">i", len(payload)) + payload], wait_s=1)
    if answer:
        assert struct.unpack_from(">i", _responses(answer)[0])[0] == 11
    else:
        assert closed
    _assert_healthy(running, since, 1)


@pytest.mark.parametrize("size", [b"\x00", b"\xff\xff\xff\xff\x0f", b"\xff\xff\xff\xff\xff", b"\x05"])
def test_a_hostile_compact_length_of_sasl_authenticate_v2_is_refused(running, size):
    since = len(running.log.records)
    payload = (struct.pack(">hhih", gw.API_SASL_AUTHENTICATE, 2, 5, 1) + b"c\x00" + size + b"n,,n=admin,r=x\x00")
    answer, closed, _ = _talk(running.port, [_handshake(), struct.pack(">i", len(payload)) + payload])
    assert closed and len(_responses(answer)) <= 2
    _assert_healthy(running, since, 1)


# --- SCRAM and PLAIN messages ------------------------------------------------------------------------------
BAD_CLIENT_FIRST = [b"", b"n", b"n,", b"n,,", b"p=tls-unique,,n=admin,r=abc", b"x,,n=admin,r=abc", b"n,,r=abc",
                    b"n,,n=admin", b"n,a=root,n=admin,r=abc", b"n,,n=\xff\xfe,r=abc", b"n,,n=admin,r=" + b"A" * 60000,
                    b"n,,n=" + b"\x00" * 1000 + b",r=abc", b"n,,n=admin,r=abc,m=ext", b"\xc3\x28", b"," * 5000,
                    b"n,,n=" + "é".encode() * 20000 + b",r=x"]


@pytest.mark.parametrize("message", BAD_CLIENT_FIRST, ids=range(len(BAD_CLIENT_FIRST)))
def test_a_malformed_client_first_is_refused_or_answered_then_fails(running, message):
    since = len(running.log.records)
    answer, closed, _ = _talk(running.port, [_handshake(), _authenticate(message)], wait_s=1)
    responses = _responses(answer)
    assert len(responses) == 2
    error, data = _sasl_data(responses[1])
    if error:
        assert error == gw.ERR_SASL_AUTHENTICATION_FAILED and data == b"" and closed
    else:  # a message of some user, however odd: the server-first (the exchange fails at its proof)
        assert data.startswith(b"r=") and not closed
    _assert_healthy(running, since, 1)


@pytest.mark.parametrize("final", ["wrong_channel", "bad_base64", "short_proof", "long_proof", "no_proof",
                                   "wrong_nonce", "not_utf8", "empty", "huge"])
def test_a_malformed_client_final_is_refused(running, final):
    since = len(running.log.records)
    first = _client_first()
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as s:
        s.sendall(_handshake() + _authenticate(first))
        answer = b""
        while len(_responses(answer)) < 2:
            answer += s.recv(1 << 16)
        server_first = _sasl_data(_responses(answer)[1])[1]
        message = {
            "wrong_channel": _scram_final(server_first, running.password, first[3:], channel=b"eSws"),
            "bad_base64": _scram_final(server_first, running.password, first[3:], proof=b"!!!*"),
            "short_proof": _scram_final(server_first, running.password, first[3:], proof=base64.b64encode(b"x")),
            "long_proof": _scram_final(server_first, running.password, first[3:],
                                       proof=base64.b64encode(b"x" * 40000)),
            "no_proof": b"c=biws,r=" + server_first.split(b",")[0][2:],
            "wrong_nonce": b"c=biws,r=abc,p=" + base64.b64encode(b"x" * 64),
            "not_utf8": b"c=biws,r=\xff\xfe,p=AAAA",
            "empty": b"",
            "huge": b"c=biws,r=" + b"A" * 60000 + b",p=AAAA",
        }[final]
        s.sendall(_authenticate(message, correlation_id=3))
        while (data := s.recv(1 << 16)) != b"":
            answer += data
    assert _sasl_data(_responses(answer)[2]) == (gw.ERR_SASL_AUTHENTICATION_FAILED, b"")
    _assert_healthy(running, since, 1)


@pytest.mark.parametrize("message", [b"", b"\0", b"\0admin", b"admin\0" + b"x" * 10, b"\0\0\0", b"\0admin\0\0",
                                     b"\0admin\0" + b"\xff" * 100, b"\0" + b"a" * 60000 + b"\0x",
                                     b"\0admin\0" + b"p" * 60000])
def test_a_malformed_plain_login_is_refused(running, message):
    since = len(running.log.records)
    answer, closed, _ = _talk(running.port, [_handshake(b"PLAIN"), _authenticate(message)])
    assert closed and _sasl_data(_responses(answer)[1]) == (gw.ERR_SASL_AUTHENTICATION_FAILED, b"")
    _assert_healthy(running, since, 1)


def test_requests_pipelined_in_one_packet_and_sent_after_a_refusal(running):
    """A refused login's connection is closed: what the client sends after it is never read as a request."""
    since = len(running.log.records)
    login = _authenticate(b"\0admin\0" + running.password.encode(), correlation_id=4)
    packet = (_request(gw.API_API_VERSIONS, 0, 1, b"") * 20 + _handshake(b"PLAIN") + _authenticate(b"\0admin\0no")
              + login + _request(0, 9, 5, b"\x00" * 100))
    answer, closed, _ = _talk(running.port, [packet, login])
    responses = _responses(answer)
    assert len(responses) == 22 and closed
    assert _sasl_data(responses[-1])[0] == gw.ERR_SASL_AUTHENTICATION_FAILED
    # the same requests in one packet with the right password: every one answered, then relayed to tansu
    answer, closed, _ = _talk(running.port, [_request(gw.API_API_VERSIONS, 0, 1, b"") * 20 + _handshake(b"PLAIN")
                                             + login], wait_s=1)
    assert len(_responses(answer)) == 22 and _sasl_data(_responses(answer)[-1]) == (0, b"") and not closed
    _assert_healthy(running, since, 1)


# --- seeded mutations of a real login ----------------------------------------------------------------------
def _mutants(password: str, n: int, seed: int) -> list[list[bytes]]:
    """``n`` request sequences: a PLAIN or SCRAM login, its bytes flipped, cut, repeated or spliced."""
    rng = random.Random(seed)
    valid = [[_request(gw.API_API_VERSIONS, 0, 1, b""), _handshake(b"PLAIN"),
              _authenticate(b"\0admin\0" + password.encode())],
             [_request(gw.API_API_VERSIONS, 3, 1, b"\x02c\x021\x00"), _handshake(), _authenticate(_client_first())],
             [_handshake(b"PLAIN", 0), _authenticate(b"\0admin\0x", 2)]]
    out = []
    for _ in range(n):
        data = bytearray(b"".join(rng.choice(valid)))
        for _ in range(rng.randint(1, 4)):
            op, i = rng.randrange(5), rng.randrange(len(data))
            if op == 0:
                data[i] = rng.randrange(256)
            elif op == 1:
                data[i:i + 4] = struct.pack(">i", rng.choice([0, -1, 2 ** 31 - 1, rng.randrange(1 << 17)]))
            elif op == 2:
                del data[i:i + rng.randint(1, 8)]
            elif op == 3:
                data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            else:
                data[i:i] = data[i:i + rng.randint(1, 64)] * rng.randint(1, 8)
        cut = rng.randint(1, 3)  # in one packet, or in a few
        bounds = sorted(rng.sample(range(1, len(data)), min(cut - 1, len(data) - 1)))
        out.append([bytes(data[a:b]) for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)])
    return out


def test_seeded_mutations_of_a_login_never_break_the_gateway(running):
    since = len(running.log.records)
    mutants = _mutants(running.password, 150, seed=20261207)
    for chunks in mutants:
        _talk(running.port, chunks, wait_s=AUTH_TIMEOUT_S + 2, half_close=True)
    _assert_healthy(running, since, len(mutants))


def test_request_sizes_are_followed_across_any_chunking():
    """The relay's check of size prefixes, fed a stream of requests cut at seeded random points."""
    rng = random.Random(7)
    requests = [_request(0, 9, i, bytes(rng.randrange(256) for _ in range(rng.randrange(200)))) for i in range(50)]
    stream = b"".join(requests)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(stream)), 30))
        sizes = gw.RequestSizes(limit=300)
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            sizes.check(stream[a:b])  # every request within the limit: none refused
    for bad in (0, -1, 301, 2 ** 31 - 1):
        at = rng.randrange(len(requests))
        hostile = b"".join(requests[:at]) + struct.pack(">i", bad) + b"x" * 400
        sizes, refused = gw.RequestSizes(limit=300), None
        for i in range(len(hostile)):  # one byte at a time: refused at the prefix's last byte
            try:
                sizes.check(hostile[i:i + 1])
            except ValueError:
                refused = i
                break
        assert refused == len(b"".join(requests[:at])) + 3, bad


TLS_GARBAGE = [b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b"\x16\x03\x01\xff\xff" + b"\x01" * 100,
               b"\x00" * 10, bytes(random.Random(3).randrange(256) for _ in range(500)), b"\x16\x03\x03\x00\x00",
               b"\x80\x2e\x01\x00\x02" + b"\x00" * 50, b"\x16\x03\x01", _handshake()]


def test_bytes_that_are_no_tls_handshake_close_the_connection_quietly(tmp_path, caplog):
    """Over TLS, garbage in place of a ClientHello (HTTP, cut records, a Kafka request) ends its connection."""
    from tests.streams.test_security import _gateway_before_a_silent_broker

    async def run() -> tuple[list[bytes], list[dict]]:
        loop_errors: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: loop_errors.append(context))
        answers = []
        async with _gateway_before_a_silent_broker(tmp_path, tls=True, auth_timeout_s=AUTH_TIMEOUT_S) as port:
            for garbage in TLS_GARBAGE:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(garbage)
                writer.write_eof()
                answers.append(await asyncio.wait_for(reader.read(), AUTH_TIMEOUT_S + 3))
                writer.close()
        return answers, loop_errors

    with caplog.at_level(logging.DEBUG, logger="streams.gateway"):
        answers, loop_errors = asyncio.run(run())
    assert answers == [b""] * len(TLS_GARBAGE) and loop_errors == []
    lines = [r for r in caplog.records if r.name == "streams.gateway"]
    assert len(lines) <= len(TLS_GARBAGE) and all(r.levelno == logging.DEBUG for r in lines)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_an_authenticated_request_over_the_limit_is_refused_before_tansu_buffers_it(running):
    """A request over ``MAX_REQUEST_BYTES`` closes its connection before its size prefix reaches tansu.

    tansu buffers a request of the size its prefix declares: one connection declaring 2 GiB made it
    hold the 300 MB it sent (in 0.2 s).
    """
    since = len(running.log.records)
    login = _handshake(b"PLAIN") + _authenticate(b"\0admin\0" + running.password.encode())
    before = _rss_kib(running.kafka.pid)
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as s:
        s.sendall(login)
        answer = b""
        while len(_responses(answer)) < 2:
            answer += s.recv(1 << 16)
        assert _sasl_data(_responses(answer)[1]) == (0, b"")
        sent, chunk = 0, b"\0" * (1 << 20)
        try:
            s.sendall(struct.pack(">i", 2 ** 31 - 1) + struct.pack(">hhih", 0, 9, 1, -1))
            while sent < 64 << 20:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            closed = s.recv(1) == b""
        except ConnectionResetError:
            closed = True
    assert closed and sent < 64 << 20
    assert _rss_kib(running.kafka.pid) - before < 16 * 1024  # tansu held none of it
    (line,) = [r.getMessage() for r in running.log.records[since:] if r.levelno >= logging.INFO]
    assert line.startswith(f"request of {2 ** 31 - 1} bytes from ") and line.endswith("connection closed")
    _assert_healthy(running, since, 1)


def test_a_real_client_produces_and_consumes_after_the_hostile_requests(running):
    """Run last in the module: the gateway still serves a real client after every request above."""
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    conf = {"bootstrap.servers": f"127.0.0.1:{running.port}", "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "admin", "sasl.password": running.password}
    topic = f"fuzz-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(conf)
    for future in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        future.result(timeout=10)
    producer, delivered = Producer(conf), []
    producer.produce(topic, b"still-here", on_delivery=lambda err, msg: delivered.append(err))
    assert producer.flush(10) == 0 and delivered == [None]
    consumer = Consumer({**conf, "group.id": topic})
    consumer.assign([TopicPartition(topic, 0, 0)])
    try:
        deadline, got = time.monotonic() + 20, None
        while got is None and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got = msg.value()
    finally:
        consumer.close()
    assert got == b"still-here"
    assert running.loop_errors == []
