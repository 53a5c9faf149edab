"""A small in-memory schema registry speaking the Confluent REST API, for local work and the tests.

Deployments run Confluent's registry (``docker-compose.yml``, ``k8s/``). Neither it nor karapace
can run on the development and CI machines (no JVM service, no package), so ``broker embedded``
and the tests that read a pipeline run with real clients (Rubin's ``DeserializingConsumer`` +
``AvroDeserializer``) use this one, on 127.0.0.1, the way tansu stands in for Kafka.

It serves the part of the API that producers and deserializers call (``docs/architecture.md``,
"Alert framings"): register a schema under a subject (``POST /subjects/{s}/versions``; the same
schema gets the same id, in any subject), look it up (``POST /subjects/{s}``), fetch a schema by id
(``GET /schemas/ids/{id}``) and a subject's versions (``GET /subjects/{s}/versions[/{v}|latest]``),
list subjects, read the global compatibility level. Errors, those of the HTTP layer too, are JSON
with Confluent's ``error_code`` (40401 subject, 40402 version, 40403 schema not found, 42201 invalid
schema, 405 method, 41101 chunked body, 41301 body too large, 42205 no room for a new schema or
subject, 503 over :data:`MAX_CONNECTIONS` connections when none has waited :data:`IDLE_EVICT_S` for its
request's head). It checks no compatibility between versions
and keeps nothing on disk.

Its ids do not depend on its history: a schema's id is drawn from the SHA-256 of its compact JSON
(:func:`stable_id`), and every alert schema version of the repository is known by id from the start
(in no subject until registered). A ``confluent`` alert names its schema by id for ever, so one
written before a restart (``broker embedded --durable`` keeps the topics) still decodes: with ids
counted from 1 again, its id was unknown, or another version's after the alert stage registered.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterable
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import unquote

import fastavro

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
#: Largest request body accepted (bytes); an alert schema is ~15 kB.
MAX_BODY = 4 * 1024 * 1024
#: Longest time a request's line, headers and body may take to arrive, in all (s), from the moment the server
#: awaits it: a client that stops sending, or sends a byte at a time, frees its thread.
REQUEST_TIMEOUT_S = 30.0
#: Deepest nesting of a schema's JSON (levels of objects and arrays) accepted; an alert schema has 6. Python's own
#: recursion limit stopped deeper ones at whichever step of a request ran out of stack first: a schema 981-982
#: levels deep was parsed, then its compact form raised RecursionError, a 500.
MAX_SCHEMA_DEPTH = 64
#: Most connections served at once (count), a thread each. One beyond takes the place of the connection that has
#: waited longest for its request's line and headers, if that is :data:`IDLE_EVICT_S` or more (closed: a silent
#: client, a slow one, an idle keep-alive); else it is answered 503 (``error_code`` 503, with ``Retry-After``)
#: from the accepting thread and closed, unread. The pipeline's stages ask a few at a time.
MAX_CONNECTIONS = 64
#: Least time a connection has waited for its request's line and headers before a new connection may take its
#: place at :data:`MAX_CONNECTIONS` (s). Without it, 64 silent connections held every place for
#: :data:`REQUEST_TIMEOUT_S` and every other client was refused; a client's head arrives in milliseconds.
IDLE_EVICT_S = 1.0
#: Longest time the accepting thread waits for the place of a connection it closed (s): its thread sees the
#: close at once and ends.
EVICT_WAIT_S = 2.0
#: Most schemas kept (count), the repository's alert versions (known from the start) among them: a new one
#: beyond is refused 422 (``error_code`` 42205, Confluent's "operation not permitted"); one already kept is
#: registered as before. A pipeline registers a handful.
MAX_SCHEMAS = 1000
#: Most subjects (count): a registration under a new subject beyond is refused 422 (42205).
MAX_SUBJECTS = 1000
#: Most bytes of schema text kept, all schemas together (each is kept as sent and compacted): a new schema beyond
#: is refused 422 (42205). :data:`MAX_SCHEMAS` bodies of :data:`MAX_BODY` would be 8 GiB; an alert schema is ~15 kB.
MAX_SCHEMA_BYTES = 64 * 1024 * 1024


def stable_id(key: str) -> int:
    """The id of a schema of compact JSON ``key``: 31 bits of its SHA-256 (never 0), the same in every registry."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") & 0x7FFFFFFF or 1


class RegistryStore:
    """Schemas by id and subjects' versions, guarded by one lock.

    Parameters
    ----------
    known : iterable of str
        Schemas known by id from the start, in no subject (default: the repository's alert versions).
    """

    def __init__(self, known: Iterable[str] | None = None) -> None:
        self.lock = threading.Lock()
        self.ids: dict[str, int] = {}  # compact schema JSON -> id
        self.schemas: dict[int, str] = {}  # id -> schema text as registered first
        self.subjects: dict[str, list[int]] = {}  # subject -> schema id of each version (version = index + 1)
        self.schema_bytes = 0  # characters of the schemas' texts and compact forms (MAX_SCHEMA_BYTES)
        for text in _alert_schemas() if known is None else known:
            self._id(_compact(text), text)

    def _id(self, key: str, text: str) -> int:
        """The id of the schema of compact JSON ``key``, ``text`` kept under a new one (call with the lock held)."""
        sid = self.ids.get(key)
        if sid is None:
            sid = stable_id(key)
            while sid in self.schemas:  # two schemas of one 31-bit hash: the next free id
                sid = sid % 0x7FFFFFFF + 1
            self.ids[key], self.schemas[sid] = sid, text
            self.schema_bytes += len(key) + len(text)
        return sid

    def _check_room(self, subject: str, key: str, text: str) -> None:
        """Refuse (422, 42205) a registration the registry has no room for (call with the lock held).

        ``text`` (compact form ``key``) a new schema past :data:`MAX_SCHEMAS` or :data:`MAX_SCHEMA_BYTES`, or
        ``subject`` a new subject past :data:`MAX_SUBJECTS`.
        """
        if key not in self.ids:
            if len(self.schemas) >= MAX_SCHEMAS:
                raise _Error(422, 42205, f"the registry keeps {MAX_SCHEMAS} schemas at most: no new one")
            if self.schema_bytes + len(key) + len(text) > MAX_SCHEMA_BYTES:
                raise _Error(422, 42205, f"the registry keeps {MAX_SCHEMA_BYTES} bytes of schemas at most: "
                             "no new one")
        if subject not in self.subjects and len(self.subjects) >= MAX_SUBJECTS:
            raise _Error(422, 42205, f"the registry keeps {MAX_SUBJECTS} subjects at most: no new one")

    def register(self, subject: str, text: str) -> int:
        """Id of ``text`` (:func:`stable_id` for a new schema), added to ``subject`` unless it holds it.

        Raises ``_Error`` 422 (42205) past :data:`MAX_SCHEMAS`, :data:`MAX_SCHEMA_BYTES` or :data:`MAX_SUBJECTS`.
        """
        key = _compact(text)
        with self.lock:
            self._check_room(subject, key, text)
            sid = self._id(key, text)
            versions = self.subjects.setdefault(subject, [])
            if sid not in versions:
                versions.append(sid)
            return sid

    def version(self, subject: str, text: str) -> tuple[int, int] | None:
        """(version, id) of ``text`` in ``subject``, or None."""
        with self.lock:
            sid = self.ids.get(_compact(text))
            versions = self.subjects.get(subject, [])
            return (versions.index(sid) + 1, sid) if sid in versions else None


def _alert_schemas() -> list[str]:
    """Each alert schema version of the repository, as a ``confluent`` alert topic registers it."""
    import schemas
    from streams.framing import schema_json

    return [schema_json(v) for v in schemas.versions("alert")]


def _compact(text: str) -> str:
    """The schema as compact JSON: two spellings of one schema get one id (ValueError if not JSON)."""
    return json.dumps(json.loads(text), separators=(",", ":"), sort_keys=True)


class _Error(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _depth(value: object) -> int:
    """Levels of nested JSON arrays and objects in ``value`` (0 for a scalar), counted without recursion."""
    deepest, level = 0, [(value, 0)]
    while level:
        item, depth = level.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth + 1)
            level.extend((child, depth + 1) for child in children)
    return deepest


def _schema_text(body: bytes) -> str:
    """The Avro schema of a register or lookup request body, checked to parse, :data:`MAX_SCHEMA_DEPTH` deep at most."""
    try:
        request = json.loads(body or b"{}")
        text = request["schema"]
        if request.get("schemaType", "AVRO") != "AVRO" or not isinstance(text, str):
            raise ValueError("only AVRO schemas given as a string")
        schema = json.loads(text)
        if _depth(schema) > MAX_SCHEMA_DEPTH:
            raise ValueError(f"nested over {MAX_SCHEMA_DEPTH} levels")
        fastavro.parse_schema(schema)
    except Exception as exc:  # JSON, KeyError, SchemaParseException, ...
        raise _Error(422, 42201, f"Invalid schema: {type(exc).__name__}: {exc}") from exc
    return text


def _content_length(headers: Message) -> int:
    """The request's Content-Length (0 when absent); 400 when it is not one count of bytes, 411 when chunked.

    A ``Transfer-Encoding`` body was read as empty (a 422 naming a missing ``schema``) and two
    Content-Lengths as the first: the body is not read then, and the connection closed.
    """
    if headers.get("Transfer-Encoding") is not None:
        raise _Error(411, 41101, "Transfer-Encoding is not served: send the body with a Content-Length")
    values = {v.strip() for v in headers.get_all("Content-Length", [])}
    if len(values) > 1:
        raise _Error(400, 40001, f"{len(values)} different Content-Lengths")
    value = values.pop() if values else ""
    if not value:
        return 0
    if not (value.isascii() and value.isdigit()):  # int() takes "-5", "1_0", "\u0663"
        raise _Error(400, 40001, f"Content-Length {value[:40]!r} is not a number of bytes")
    return int(value)


def _count(text: str) -> int:
    """A schema id or version of a path (0, which none is, for any other text).

    Not ``int()`` of whatever ``isdigit()`` holds: it refuses ``²`` (a byte 0xB2 of the request
    line) and over 4300 digits with ``ValueError``, which was a 500.
    """
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else 0


class _Deadline(io.RawIOBase):
    """A socket read against one deadline for a whole request, not a timeout per read.

    ``StreamRequestHandler.timeout`` bounds each ``recv``: a client sending a byte within each held a
    thread for ever. Each read here waits at most until :meth:`start`'s deadline.
    """

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock, self.seconds = sock, seconds
        self.deadline = time.monotonic() + seconds

    def start(self) -> None:
        """Give the next request ``seconds`` to arrive, from now."""
        self.deadline = time.monotonic() + self.seconds

    def readable(self) -> bool:
        """A socket is read."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Bytes received into ``buffer``; ``TimeoutError`` once the deadline has passed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"request not received within {self.seconds:g} s")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    store: RegistryStore  # set on the subclass of each server
    timeout = REQUEST_TIMEOUT_S  # the time a request has to arrive in all (_Deadline); also the socket's timeout
    default_request_version = "HTTP/1.0"  # a malformed request line is answered with a status line (0.9 has none)

    def setup(self) -> None:
        """The connection's streams (StreamRequestHandler's), reading against one deadline per request (_Deadline)."""
        super().setup()
        self.rfile.close()  # the socket's own reader, replaced
        self._deadline = _Deadline(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._deadline)

    def handle_one_request(self) -> None:
        """Serve one request, which must arrive within :attr:`timeout` from now (waiting, :meth:`_Server.waiting`)."""
        self._deadline.start()
        self._server().waiting(self.connection)
        super().handle_one_request()

    def parse_request(self) -> bool:
        """Read the request's headers (BaseHTTPRequestHandler's), then no longer waiting: served, not evicted."""
        try:
            return super().parse_request()
        finally:
            self._server().served(self.connection)

    def finish(self) -> None:
        """End the connection (StreamRequestHandler's), no longer waiting."""
        self._server().served(self.connection)
        super().finish()

    def _server(self) -> _Server:
        assert isinstance(self.server, _Server)
        return self.server

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request log lines of :class:`BaseHTTPRequestHandler`."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """An error of the HTTP layer (request line, headers, method) in the registry's JSON, and the connection closed.

        :class:`BaseHTTPRequestHandler` wrote an HTML page, 501 for a method not served and 505 for
        an HTTP version over 1: those are 405 (as Confluent's registry answers) and 400 here.
        """
        code = {501: 405, 505: 400}.get(int(code), int(code))  # NOT_IMPLEMENTED, HTTP_VERSION_NOT_SUPPORTED
        self.close_connection = True
        self._reply(code, {"error_code": code, "message": message or HTTPStatus(code).phrase},
                    {"Allow": "GET, POST"} if code == 405 else {})

    def _reply(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serve(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            body = self._body(self._length())
            self._reply(200, self._route(method, path, body))
        except _Error as exc:
            self._reply(exc.status, {"error_code": exc.code, "message": str(exc)})
        except Exception as exc:  # a bug here must not kill the server thread
            self._reply(500, {"error_code": 50001, "message": f"{type(exc).__name__}: {exc}"})

    def _length(self) -> int:
        """The body's length, checked before any of it is read (refused: left unread, the connection closed)."""
        try:
            length = _content_length(self.headers)
            if length > MAX_BODY:
                raise _Error(413, 41301, f"request body over {MAX_BODY} bytes")
        except _Error:
            self.close_connection = True
            raise
        return length

    def _body(self, length: int) -> bytes:
        """The request body of ``length`` bytes; 408 when the client stops sending it for :attr:`timeout` s."""
        try:
            return self.rfile.read(length) if length > 0 else b""
        except TimeoutError as exc:
            self.close_connection = True
            raise _Error(408, 40801, f"request body of {length} bytes not sent within {self.timeout:g} s") from exc

    def do_GET(self) -> None:  # noqa: N802  # BaseHTTPRequestHandler's naming
        """Serve a GET request."""
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        """Serve a POST request."""
        self._serve("POST")

    def _route(self, method: str, path: str, body: bytes) -> object:
        store = self.store
        if method == "GET" and path in ("", "/subjects", "/config", "/schemas/types"):
            with store.lock:
                return {"": {}, "/subjects": sorted(store.subjects), "/config": {"compatibilityLevel": "NONE"},
                        "/schemas/types": ["AVRO"]}[path]
        if method == "GET" and (m := re.fullmatch(r"/schemas/ids/([0-9]+)(/schema)?", path)):
            with store.lock:
                text = store.schemas.get(_count(m.group(1)))
            if text is None:
                raise _Error(404, 40403, f"Schema {m.group(1)} not found")
            return json.loads(text) if m.group(2) else {"schema": text}
        m = re.fullmatch(r"/subjects/([^/]+)(/versions(?:/([^/]+))?)?", path)
        if m is None:
            raise _Error(404, 404, f"no such resource: {method} {path}")
        # the client quotes the subject (urllib.parse.quote, safe=''): 'a/b value' arrives as a%2Fb%20value
        return self._subject(method, unquote(m.group(1)), m.group(2), m.group(3), body)

    def _subject(self, method: str, subject: str, versions: str | None, version: str | None, body: bytes) -> object:
        store = self.store
        if method == "POST" and versions and version is None:
            return {"id": store.register(subject, _schema_text(body))}
        if method == "POST" and not versions:
            found = store.version(subject, _schema_text(body))
            if found is None:
                raise _Error(404, 40403, "Schema not found")
            return {"subject": subject, "version": found[0], "id": found[1], "schema": store.schemas[found[1]]}
        with store.lock:
            ids = list(store.subjects.get(subject, []))
        if not ids:
            raise _Error(404, 40401, f"Subject '{subject}' not found.")
        if version is None:
            return list(range(1, len(ids) + 1))
        n = len(ids) if version == "latest" else _count(version)
        if not 1 <= n <= len(ids):
            raise _Error(404, 40402, f"Version {version} not found.")
        return {"subject": subject, "version": n, "id": ids[n - 1], "schema": store.schemas[ids[n - 1]]}


class _Server(ThreadingHTTPServer):
    """The HTTP server: a thread per connection, :data:`MAX_CONNECTIONS` at once.

    One more takes the place of the connection waiting longest for its request's head, if for
    :data:`IDLE_EVICT_S` or more (:meth:`evict_idle`), else is answered 503.
    """

    daemon_threads = True
    #: The listen backlog (connections not yet accepted): socketserver's 5 dropped the connects of a burst beyond
    #: 6, each then retried by its client's TCP a second later (64 connections at once: 9.2 s to connect).
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._lock = threading.Lock()
        self._waiting: dict[socket.socket, float] = {}  # connection -> when it began to wait for a request head

    def waiting(self, conn: socket.socket) -> None:
        """``conn`` waits for its next request's line and headers from now."""
        with self._lock:
            self._waiting[conn] = time.monotonic()

    def served(self, conn: socket.socket) -> None:
        """``conn`` has its request's head (or is ending): no longer one to evict."""
        with self._lock:
            self._waiting.pop(conn, None)

    def evict_idle(self) -> bool:
        """Shut down the connection waiting longest for its request's head, if for :data:`IDLE_EVICT_S` or more.

        Its thread reads the end at once and frees its place. False when none has waited as long.
        """
        with self._lock:
            oldest = min(self._waiting.items(), key=lambda item: item[1], default=None)
            if oldest is None or time.monotonic() - oldest[1] < IDLE_EVICT_S:
                return False
            del self._waiting[oldest[0]]
        with contextlib.suppress(OSError):
            oldest[0].shutdown(socket.SHUT_RDWR)
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve ``request`` on a thread of its own in one of :data:`MAX_CONNECTIONS` places, else refuse it (503).

        At the bound, the place of a connection waiting for its request's head for :data:`IDLE_EVICT_S`
        or more is taken (:meth:`evict_idle`; waited for up to :data:`EVICT_WAIT_S`).
        """
        if not self.slots.acquire(blocking=False) and not (self.evict_idle()
                                                           and self.slots.acquire(timeout=EVICT_WAIT_S)):
            _refuse(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve ``request`` (on its thread), then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: socket.socket | tuple[bytes, socket.socket], client_address: object) -> None:
        """A client gone before its answer is no error of the server: socketserver printed a traceback for each."""
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def _refuse(sock: socket.socket) -> None:
    """Answer 503 (the registry's JSON, ``Retry-After: 1``) on ``sock`` without waiting (the accepting thread's call).

    What the client has sent already is read first (not answered): closing a socket over unread bytes
    resets the connection, and a client could lose the answer.
    """
    body = json.dumps({"error_code": 503, "message": f"the registry serves {MAX_CONNECTIONS} connections at "
                       "once: try again"}).encode()
    head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n"
            "Retry-After: 1\r\nConnection: close\r\n\r\n").encode()
    try:
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.recv(1 << 16)
        sock.send(head + body)  # a fresh socket's send buffer takes it whole
    except OSError:
        pass


class EmbeddedRegistry:
    """The registry on 127.0.0.1 in a background thread; a context manager.

    Parameters
    ----------
    port : int
        Port to listen on (0: a free one).

    Attributes
    ----------
    url : str
        ``http://127.0.0.1:<port>``, the ``schema_registry_url`` of the pipeline config.
    """

    def __init__(self, port: int = 0) -> None:
        self.store = RegistryStore()
        handler = type("Handler", (_Handler,), {"store": self.store})
        self._server = _Server(("127.0.0.1", port), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="registry", daemon=True)

    def start(self) -> EmbeddedRegistry:
        """Serve requests in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> EmbeddedRegistry:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
