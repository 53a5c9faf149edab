"""API tokens: random secrets stored only as salted hashes, each with a name and scopes.

A token reads ``<id>.<secret>``: the id (8 hex digits) finds its row, the secret (32 random bytes,
URL-safe base64) is checked against ``sha256(salt || secret)`` in constant time. The clear token is
shown once, by ``broker token add``; the file holds no secret a reader could replay.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from broker.errors import ConfigError, Forbidden, Unauthenticated
from broker.sqlitedb import open_database

#: The scopes a token can hold: read the API, upload frames, label candidates.
SCOPES = ("read", "upload", "vet")
_SCHEMA = ("CREATE TABLE IF NOT EXISTS tokens (token_id TEXT PRIMARY KEY, name TEXT NOT NULL, "
           "salt BLOB NOT NULL, digest BLOB NOT NULL, scopes TEXT NOT NULL, created REAL NOT NULL, "
           "revoked REAL)")


@dataclass(frozen=True)
class Principal:
    """Who makes a request: the token's name (``public`` without one) and its scopes."""

    name: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class TokenInfo:
    """A stored token as listed: id, name, scopes, creation and revocation times (Unix s; None: active)."""

    token_id: str
    name: str
    scopes: tuple[str, ...]
    created: float
    revoked: float | None


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """``scopes`` sorted and deduplicated; ConfigError for an unknown or empty set."""
    chosen = tuple(sorted(set(scopes)))
    unknown = [s for s in chosen if s not in SCOPES]
    if unknown or not chosen:
        raise ConfigError(f"token scopes must be some of {list(SCOPES)}, not {list(chosen)}")
    return chosen


class TokenStore:
    """The tokens in one SQLite file, safe to share between threads.

    Parameters
    ----------
    path : Path
        The SQLite file (created with its folder; ``":memory:"`` for tests).

    Raises
    ------
    ConfigError
        ``path`` cannot be opened or created as a token database (a folder, another file, no access).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = open_database(path, _SCHEMA, "a token database", isolation_level=None, check_same_thread=False)

    def add(self, name: str, scopes: Iterable[str]) -> str:
        """Create a token; return it in clear (the only time it exists outside the caller)."""
        chosen = check_scopes(scopes)
        if not name.strip():
            raise ConfigError("a token needs a name (who or what uses it)")
        token_id, secret, salt = secrets.token_hex(4), secrets.token_urlsafe(32), secrets.token_bytes(16)
        with self._lock:
            self._db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, NULL)",
                             (token_id, name.strip(), salt, _digest(salt, secret), ",".join(chosen), time.time()))
        return f"{token_id}.{secret}"

    def list(self) -> list[TokenInfo]:
        """Every token, oldest first (no secrets: there are none to show)."""
        with self._lock:
            rows = self._db.execute("SELECT token_id, name, scopes, created, revoked FROM tokens "
                                    "ORDER BY created").fetchall()
        return [TokenInfo(r[0], r[1], tuple(r[2].split(",")), r[3], r[4]) for r in rows]

    def revoke(self, key: str) -> int:
        """Revoke the token whose id is ``key``, or else every active token named ``key``; return how many.

        The id is tried first: a token whose name happened to be another token's id revoked both.
        """
        with self._lock:
            column = "token_id" if self._db.execute("SELECT 1 FROM tokens WHERE token_id = ?", (key,)).fetchone() \
                else "name"
            cur = self._db.execute(f"UPDATE tokens SET revoked = ? WHERE {column} = ? AND revoked IS NULL",
                                   (time.time(), key))
        return int(cur.rowcount)

    def verify(self, token: str) -> Principal:
        """The principal of a clear token.

        Raises
        ------
        Unauthenticated
            A malformed, unknown or revoked token.
        """
        token_id, _, secret = token.partition(".")
        with self._lock:
            row = self._db.execute("SELECT name, salt, digest, scopes, revoked FROM tokens WHERE token_id = ?",
                                   (token_id,)).fetchone()
        if row is None or not secret or not hmac.compare_digest(_digest(row[1], secret), row[2]):
            raise Unauthenticated("unknown or malformed token")
        if row[4] is not None:
            raise Unauthenticated(f"token {token_id} was revoked")
        return Principal(row[0], frozenset(row[3].split(",")))

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()


def bearer(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None without one)."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must read 'Bearer <token>'")
    return token.strip()


def require(scope: str) -> Callable[[Request], Principal]:
    """A FastAPI dependency: the request's :class:`Principal`, which must hold ``scope``.

    Read endpoints answer without a token when ``WebConfig.public_read`` is set (the principal is
    then ``public``, unless a valid token is given).

    Raises
    ------
    Unauthenticated
        No token where one is needed, or a bad one (HTTP 401).
    Forbidden
        A valid token without ``scope`` (HTTP 403).
    """
    check_scopes([scope])

    def dependency(request: Request) -> Principal:
        portal = request.app.state.portal
        token = bearer(request)
        if token is None:
            if scope == "read" and portal.config.public_read:
                return Principal("public", frozenset({"read"}))
            raise Unauthenticated(f"this endpoint needs a token with scope {scope!r} (Authorization: Bearer ...)")
        principal = portal.tokens.verify(token)
        if scope not in principal.scopes:
            raise Forbidden(f"token {principal.name!r} lacks scope {scope!r} (it has {sorted(principal.scopes)})")
        return principal

    return dependency
