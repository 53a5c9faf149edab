"""API tokens: random secrets stored only as salted hashes, each with a name, scopes and telescopes.

A token reads ``<id>.<secret>``: the id (8 hex digits) finds its row, the secret (32 random bytes,
URL-safe base64) is checked against ``sha256(salt || secret)`` in constant time. The clear token is
shown once, by ``broker token add``; the file holds no secret a reader could replay.

A token with scope ``upload`` may be bound to telescopes (``broker token add NAME --scope upload
--telescope LSST``): it may publish (``POST /api/v1/frames?mode=publish``) only frames whose
telescope, as the pipeline records it, is one of them (:func:`check_publish`). A token bound to
none may only predict (``mode=predict``, which writes nothing to the pipeline's state). Token
files written before bindings existed gain the column on open (:data:`ADDED`); their tokens are
bound to none.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from broker.errors import ConfigError, Forbidden, Unauthenticated
from broker.sqlitedb import open_database
from broker.telescopes import TelescopeProfile, find_profile

#: The scopes a token can hold: read the API, upload frames, label candidates.
SCOPES = ("read", "upload", "vet")
_SCHEMA = ("CREATE TABLE IF NOT EXISTS tokens (token_id TEXT PRIMARY KEY, name TEXT NOT NULL, "
           "salt BLOB NOT NULL, digest BLOB NOT NULL, scopes TEXT NOT NULL, created REAL NOT NULL, "
           "revoked REAL, telescopes TEXT)")
#: Columns added to the first schema, (name, SQL type), added to an older file when it is opened.
#: ``telescopes``: a JSON array of the telescopes an upload token may publish; NULL: none.
ADDED = (("telescopes", "TEXT"),)
#: The longest telescope name: a FITS string value (``TELESCOP``) holds at most 68 characters.
MAX_TELESCOPE_CHARS = 68


@dataclass(frozen=True)
class Principal:
    """Who makes a request: the token's name (``public`` without one), its scopes and its telescopes.

    Attributes
    ----------
    name : str
        The token's name (``public`` for a request without a token).
    scopes : frozenset of str
        Some of :data:`SCOPES`.
    telescopes : frozenset of str
        The telescopes whose frames it may publish, as given to ``broker token add --telescope``;
        empty: none (an upload token then only predicts).
    """

    name: str
    scopes: frozenset[str]
    telescopes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class TokenInfo:
    """A stored token as listed: id, name, scopes, times (Unix s; revoked None: active), telescopes bound."""

    token_id: str
    name: str
    scopes: tuple[str, ...]
    created: float
    revoked: float | None
    telescopes: tuple[str, ...] = ()


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """``scopes`` sorted and deduplicated; ConfigError for an unknown or empty set."""
    chosen = tuple(sorted(set(scopes)))
    unknown = [s for s in chosen if s not in SCOPES]
    if unknown or not chosen:
        raise ConfigError(f"token scopes must be some of {list(SCOPES)}, not {list(chosen)}")
    return chosen


def check_telescopes(names: Iterable[str]) -> tuple[str, ...]:
    """Telescope names to bind a token to: stripped, sorted, deduplicated.

    Names are kept as given (``ESO/VLT`` holds a ``/``; case matters, as it does to the pipeline),
    only blanks around them dropped, as a FITS header's ``TELESCOP`` is read.

    Raises
    ------
    ConfigError
        An empty name, one over :data:`MAX_TELESCOPE_CHARS` characters, or one holding a control
        or non-ASCII character (no FITS header can carry it, so no frame could ever match).
    """
    chosen: set[str] = set()
    for raw in names:
        name = raw.strip(" ")
        if not name:
            raise ConfigError("--telescope needs a telescope name (as the frames' TELESCOP names it), not an empty one")
        if not all(" " <= c <= "~" for c in name):
            raise ConfigError(f"telescope {raw!r}: only printable ASCII characters can be in a FITS header "
                              "(no control characters, tabs or line breaks)")
        if len(name) > MAX_TELESCOPE_CHARS:
            raise ConfigError(f"telescope {name!r}: over {MAX_TELESCOPE_CHARS} characters, the most a FITS "
                              "header value holds")
        chosen.add(name)
    return tuple(sorted(chosen))


def bound_names(telescopes: Iterable[str], profiles: tuple[TelescopeProfile, ...] = ()) -> frozenset[str]:
    """The telescope names, as the pipeline records them, that a binding to ``telescopes`` covers.

    Each name covers itself (a frame whose header carries every canonical card keeps its
    ``TELESCOP``, stripped) and the name that ingest gives a header naming it when it normalises
    one: the name of the profile it selects (compared case-insensitively, as
    :meth:`~broker.telescopes.TelescopeProfile.matches` does), else the name cleaned
    (:func:`broker.headers.clean_name`: ``ESO/VLT`` -> ``ESO_VLT``).
    """
    from broker.headers import clean_name  # astropy: not for `broker token` alone

    covered: set[str] = set()
    for name in telescopes:
        profile = find_profile(profiles, name, "")
        covered |= {name, profile.name if profile is not None else clean_name(name)}
    return frozenset(covered - {""})


def check_publish(principal: Principal, telescope: str, profiles: tuple[TelescopeProfile, ...] = ()) -> None:
    """Forbidden (HTTP 403) unless ``principal`` may publish frames of ``telescope``.

    Parameters
    ----------
    principal : Principal
        The request's token.
    telescope : str
        The frame's telescope as the pipeline records it (``frame.meta.telescope`` after decoding
        with the pipeline's telescope profiles), never a raw header value: names are compared
        exactly, so ``lsst`` is not ``LSST`` unless a profile makes them one.
    profiles : tuple of TelescopeProfile
        The pipeline's telescope profiles (``[ingest] telescopes_dir``), for :func:`bound_names`.
    """
    if not principal.telescopes:
        raise Forbidden(unbound_message(principal.name, telescope))
    if telescope not in bound_names(principal.telescopes, profiles):
        raise Forbidden(f"token {principal.name!r} may not publish frames of telescope {telescope!r}: it is bound "
                        f"to {sorted(principal.telescopes)} (broker token add NAME --scope upload --telescope NAME)")


def unbound_message(name: str, telescope: str | None = None) -> str:
    """Why a token bound to no telescope may not publish (naming the frame's telescope when known)."""
    frame = f" (this frame's telescope is {telescope!r})" if telescope is not None else ""
    return (f"token {name!r} is bound to no telescope, so it may only predict (mode=predict){frame}; "
            "publishing needs a token bound to the frame's telescope: broker token add NAME --scope upload "
            "--telescope TELESCOPE")


def _migrate(db: sqlite3.Connection, path: str) -> None:
    """Add the columns of :data:`ADDED` that an older token file lacks (its tokens: NULL, bound to none).

    Raises
    ------
    ConfigError
        The file cannot be altered (read-only): named, with what to do.
    """
    for column, kind in ADDED:
        if column in {row[1] for row in db.execute("PRAGMA table_info(tokens)")}:
            continue
        try:
            db.execute(f"ALTER TABLE tokens ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" in str(exc):  # another process migrated it in between
                continue
            raise ConfigError(f"cannot add column {column!r} to the token database {path} (written by an older "
                              f"version): {exc}; open it once where it is writable") from exc


def _bound(text: str | None) -> tuple[str, ...]:
    """The telescopes of a stored ``telescopes`` value (NULL: none)."""
    return tuple(str(t) for t in json.loads(text)) if text else ()


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
        try:
            _migrate(self._db, self.path)
        except ConfigError:
            self._db.close()
            raise

    def add(self, name: str, scopes: Iterable[str], telescopes: Iterable[str] = ()) -> str:
        """Create a token; return it in clear (the only time it exists outside the caller).

        Parameters
        ----------
        name : str
            Who or what uses it.
        scopes : iterable of str
            Some of :data:`SCOPES`.
        telescopes : iterable of str
            The telescopes whose frames it may publish (:func:`check_telescopes`); scope ``upload``
            only. None: an upload token that may only predict.

        Raises
        ------
        ConfigError
            No name, an unknown scope, a bad telescope name, or telescopes without scope ``upload``.
        """
        chosen, bound = check_scopes(scopes), check_telescopes(telescopes)
        if not name.strip():
            raise ConfigError("a token needs a name (who or what uses it)")
        if bound and "upload" not in chosen:
            raise ConfigError(f"--telescope binds what a token may publish: it needs scope 'upload' "
                              f"(not {list(chosen)})")
        token_id, secret, salt = secrets.token_hex(4), secrets.token_urlsafe(32), secrets.token_bytes(16)
        with self._lock:
            self._db.execute("INSERT INTO tokens (token_id, name, salt, digest, scopes, created, revoked, telescopes) "
                             "VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                             (token_id, name.strip(), salt, _digest(salt, secret), ",".join(chosen), time.time(),
                              json.dumps(list(bound)) if bound else None))
        return f"{token_id}.{secret}"

    def list(self) -> list[TokenInfo]:
        """Every token, oldest first (no secrets: there are none to show)."""
        with self._lock:
            rows = self._db.execute("SELECT token_id, name, scopes, created, revoked, telescopes FROM tokens "
                                    "ORDER BY created").fetchall()
        return [TokenInfo(r[0], r[1], tuple(r[2].split(",")), r[3], r[4], _bound(r[5])) for r in rows]

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
            row = self._db.execute("SELECT name, salt, digest, scopes, revoked, telescopes FROM tokens "
                                   "WHERE token_id = ?", (token_id,)).fetchone()
        if row is None or not secret or not hmac.compare_digest(_digest(row[1], secret), row[2]):
            raise Unauthenticated("unknown or malformed token")
        if row[4] is not None:
            raise Unauthenticated(f"token {token_id} was revoked")
        return Principal(row[0], frozenset(row[3].split(",")), frozenset(_bound(row[5])))

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
