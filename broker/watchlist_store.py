r"""Saved watchlists: each astronomer's named lists of targets, kept in SQLite for the portal.

A watchlist posted once (``POST /api/v1/crossmatch``, :mod:`broker.watchlist`) is forgotten after
its answer; one saved here (``PUT /api/v1/watchlists/{name}``, :mod:`streams.web.saved_watchlists`)
stays with its owner, the name of the API token that saved it, so that the archive's new alerts
near its targets can be asked again at any time (``since_mjd``) without posting the list again.
An owner sees and changes only their own lists: every method takes the owner, and a list of
another owner is, to them, a list that does not exist.

Lists are kept as their checked entries (name, ra, dec, radius: what
:func:`~broker.watchlist.read_watchlist` made of the CSV, default radius applied), in the file's
row order. Saving a name again replaces the list (keeping when it was first saved). Bounds, each
refused with its reason: a list's name (:func:`check_list_name`), the entries of one list
(``max_entries``), the lists of one owner (``max_lists``) and the entries of all their lists
(``max_owner_entries``), so one token cannot fill the disk.

>>> from broker.watchlist import read_watchlist
>>> store = WatchlistStore(":memory:")
>>> saved, created = store.save("ana", "hosts", read_watchlist("name,ra,dec\nNGC 4993,197.45,-23.38\n"), now=1.8e9)
>>> (saved.name, saved.entries, created), [s.name for s in store.lists("ana")], store.lists("ben")
(('hosts', 1, True), ['hosts'], [])
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from broker.errors import InvalidWatchlist, InvalidWatchlistName, NotFound, WatchlistQuota
from broker.sqlitedb import open_database
from broker.watchlist import Watchlist

__all__ = ["MAX_ENTRIES", "MAX_LISTS", "MAX_LIST_NAME", "MAX_OWNER_ENTRIES", "SavedList", "WatchlistStore",
           "check_list_name"]

#: Entries one saved list may hold (count): those the portal reads from one posted watchlist.
MAX_ENTRIES = 10_000
#: Lists one owner may keep (count).
MAX_LISTS = 100
#: Entries of all one owner's lists together (count): ten full lists, ~10 MB of SQLite at most.
MAX_OWNER_ENTRIES = 100_000
#: Longest name of a list (characters).
MAX_LIST_NAME = 64
#: A list's name: ASCII letters, digits, ``.``, ``_``, ``-``, starting with a letter or a digit, so that
#: it is one segment of a URL as written (no ``/``, no ``..``, nothing to escape) and reads the same everywhere.
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_LIST_NAME - 1}}}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS watchlists (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    entries INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (owner, name)
);
CREATE TABLE IF NOT EXISTS watchlist_entries (
    list_id INTEGER NOT NULL,
    row INTEGER NOT NULL,
    name TEXT NOT NULL,
    ra REAL NOT NULL,
    dec REAL NOT NULL,
    radius_arcsec REAL NOT NULL,
    PRIMARY KEY (list_id, row)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class SavedList:
    """A saved list as listed.

    Attributes
    ----------
    name : str
        Its name (:func:`check_list_name`).
    entries : int
        Entries it holds (count).
    created : float
        When it was first saved [Unix s, UTC].
    updated : float
        When it was last saved [Unix s, UTC]; ``created`` until it is replaced.
    """

    name: str
    entries: int
    created: float
    updated: float


def check_list_name(name: str) -> str:
    """``name`` when it can name a list; :class:`~broker.errors.InvalidWatchlistName` otherwise.

    A name is 1 to :data:`MAX_LIST_NAME` (64) ASCII letters, digits, ``.``, ``_`` or ``-``, the
    first a letter or a digit (so never ``..`` or a hidden name). Case matters: ``M31`` and ``m31``
    are two lists.
    """
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        shown = repr(name[:40]) + ("..." if len(name) > 40 else "") if isinstance(name, str) else repr(name)[:40]
        raise InvalidWatchlistName(f"watchlist name {shown}: 1-{MAX_LIST_NAME} ASCII letters, digits, '.', '_' "
                                   "or '-', starting with a letter or a digit")
    return name


class WatchlistStore:
    """Saved watchlists in an SQLite file (or ``":memory:"``), by owner and name.

    Parameters
    ----------
    path : str or Path
        The database; created with its folder when absent.
    max_entries : int
        Entries one list may hold (count). Default :data:`MAX_ENTRIES`.
    max_lists : int
        Lists one owner may keep (count). Default :data:`MAX_LISTS`.
    max_owner_entries : int
        Entries of all one owner's lists (count). Default :data:`MAX_OWNER_ENTRIES`.

    Raises
    ------
    ConfigError
        ``path`` cannot be opened as a watchlists database (a folder, another kind of file).

    Notes
    -----
    One store per thread (the portal opens one per request). A save or a delete is one
    transaction taken before it reads (``BEGIN IMMEDIATE``), so two saves of one owner at once
    cannot both pass the bounds.
    """

    def __init__(self, path: str | Path, max_entries: int = MAX_ENTRIES, max_lists: int = MAX_LISTS,
                 max_owner_entries: int = MAX_OWNER_ENTRIES) -> None:
        self.path = str(path)
        self.max_entries, self.max_lists, self.max_owner_entries = max_entries, max_lists, max_owner_entries
        self._db = open_database(path, _SCHEMA, "a watchlists database of the portal", isolation_level=None)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def save(self, owner: str, name: str, watchlist: Watchlist, now: float | None = None) -> tuple[SavedList, bool]:
        """Save ``watchlist`` as ``owner``'s list ``name``, replacing a list of that name.

        Parameters
        ----------
        owner : str
            Whose list (the portal: the token's name).
        name : str
            The list's name (:func:`check_list_name`).
        watchlist : Watchlist
            Its entries, in order (1 to ``max_entries``).
        now : float, optional
            When [Unix s]; default the current time.

        Returns
        -------
        SavedList, bool
            The list as saved, and whether it is new (False: it replaced one).

        Raises
        ------
        InvalidWatchlistName
            A bad name.
        InvalidWatchlist
            No entries, or more than ``max_entries``.
        WatchlistQuota
            A new list past ``max_lists``, or entries past ``max_owner_entries`` (the list it
            replaces not counted).
        """
        check_list_name(name)
        if not 0 < len(watchlist) <= self.max_entries:
            raise InvalidWatchlist(f"a saved watchlist holds 1 to {self.max_entries} entries, not {len(watchlist)}")
        at = time.time() if now is None else float(now)
        with self._transaction():
            old = self._db.execute("SELECT id, entries, created FROM watchlists WHERE owner = ? AND name = ?",
                                   (owner, name)).fetchone()
            self._check_room(owner, len(watchlist), old[1] if old else None)
            if old is None:
                list_id = self._db.execute("INSERT INTO watchlists (owner, name, entries, created, updated) "
                                           "VALUES (?, ?, ?, ?, ?)", (owner, name, len(watchlist), at, at)).lastrowid
            else:
                list_id = old[0]
                self._db.execute("UPDATE watchlists SET entries = ?, updated = ? WHERE id = ?",
                                 (len(watchlist), at, list_id))
                self._db.execute("DELETE FROM watchlist_entries WHERE list_id = ?", (list_id,))
            self._db.executemany(
                "INSERT INTO watchlist_entries (list_id, row, name, ra, dec, radius_arcsec) VALUES (?, ?, ?, ?, ?, ?)",
                ((list_id, i, n, float(r), float(d), float(rad)) for i, (n, r, d, rad) in enumerate(zip(
                    watchlist.names, watchlist.ra, watchlist.dec, watchlist.radius_arcsec, strict=True))))
        return SavedList(name, len(watchlist), old[2] if old else at, at), old is None

    def _check_room(self, owner: str, entries: int, replaced: int | None) -> None:
        """WatchlistQuota unless ``owner`` may keep a list of ``entries`` (replacing one of ``replaced``)."""
        lists, held = self._db.execute("SELECT count(*), coalesce(sum(entries), 0) FROM watchlists WHERE owner = ?",
                                       (owner,)).fetchone()
        if replaced is None and lists >= self.max_lists:
            raise WatchlistQuota(f"you keep {lists} watchlists, the most allowed ({self.max_lists}): delete one first")
        if held - (replaced or 0) + entries > self.max_owner_entries:
            raise WatchlistQuota(f"your watchlists would hold {held - (replaced or 0) + entries:,} entries, more than "
                                 f"the {self.max_owner_entries:,} allowed in all: delete or shorten one first")

    def lists(self, owner: str) -> list[SavedList]:
        """``owner``'s lists, by name."""
        rows = self._db.execute("SELECT name, entries, created, updated FROM watchlists WHERE owner = ? ORDER BY name",
                                (owner,)).fetchall()
        return [SavedList(r[0], int(r[1]), float(r[2]), float(r[3])) for r in rows]

    def load(self, owner: str, name: str) -> tuple[SavedList, Watchlist]:
        """``owner``'s list ``name`` and its entries, in the order saved.

        Raises
        ------
        InvalidWatchlistName
            A bad name.
        NotFound
            ``owner`` has no list of that name (whoever else may have one).
        """
        check_list_name(name)
        row = self._db.execute("SELECT id, entries, created, updated FROM watchlists WHERE owner = ? AND name = ?",
                               (owner, name)).fetchone()
        if row is None:
            raise NotFound(f"you have no watchlist named {name!r}")
        entries = self._db.execute("SELECT name, ra, dec, radius_arcsec FROM watchlist_entries WHERE list_id = ? "
                                   "ORDER BY row", (row[0],)).fetchall()
        names, ra, dec, radius = zip(*entries, strict=True) if entries else ((), (), (), ())
        watchlist = Watchlist(tuple(names), np.array(ra, float), np.array(dec, float), np.array(radius, float))
        return SavedList(name, int(row[1]), float(row[2]), float(row[3])), watchlist

    def delete(self, owner: str, name: str) -> None:
        """Delete ``owner``'s list ``name`` and its entries.

        Raises
        ------
        InvalidWatchlistName
            A bad name.
        NotFound
            ``owner`` has no list of that name.
        """
        check_list_name(name)
        with self._transaction():
            row = self._db.execute("SELECT id FROM watchlists WHERE owner = ? AND name = ?", (owner, name)).fetchone()
            if row is None:
                raise NotFound(f"you have no watchlist named {name!r}")
            self._db.execute("DELETE FROM watchlist_entries WHERE list_id = ?", (row[0],))
            self._db.execute("DELETE FROM watchlists WHERE id = ?", (row[0],))

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> WatchlistStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
