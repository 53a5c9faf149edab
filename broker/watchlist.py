"""Watchlists: an astronomer's own list of positions, matched against alerts.

Lasair and ALeRCE let an astronomer upload a list of targets (host galaxies, known variables, a
follow-up programme's fields) and learn which alerts fall near them. Here the list is a CSV file
that :func:`read_watchlist` reads once, refusing with its row and column anything that is not a
position; :meth:`Watchlist.match` pairs alert positions with the entries whose radius holds them.
The same list filters a live stream (``broker subscribe --watchlist``) and searches the archive
(``broker crossmatch``, ``POST /api/v1/crossmatch``; ``docs/architecture.md``, "Watchlists").

The file
--------
A header row, then one entry per row; ``,``, tab, ``;`` or ``|`` separated (as the header uses);
``#`` lines and blank lines skipped; UTF-8 (a byte-order mark is dropped). Columns, by name in
any case (other columns are ignored):

============ ============================================================================
column       meaning
============ ============================================================================
``ra``       right ascension: decimal degrees in [0, 360], or sexagesimal hours
             (``12:34:56.7``, ``12 34 56.7``, ``12h34m56.7s``). Also ``ra_deg``,
             ``raj2000``, ``_raj2000``.
``dec``      declination: decimal degrees in [-90, 90], or sexagesimal degrees
             (``-05:06:07.8``, ``-5d06m07.8s``). Also ``decl``, ``dec_deg``, ``dej2000``,
             ``decj2000``, ``_dej2000``.
``name``     the entry's name (optional; default ``row N``, the file's row number), at
             most 128 characters without control characters. Also ``id``, ``objname``,
             ``object``, ``target``.
``radius``   match radius in arcsec (optional; default the reader's, 2 arcsec), in
             (0, 3600]. Also ``radius_arcsec``.
============ ============================================================================
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from broker.errors import InvalidWatchlist
from broker.sphere import chord, unit_vectors

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_RADIUS_ARCSEC", "MAX_RADIUS_ARCSEC", "Matches", "Watchlist", "WatchlistFile", "load_watchlist",
           "read_watchlist", "parse_angle"]

#: Match radius of an entry without one (arcsec): a few times the positional error of an alert
#: (``source.ra_err``, ``dec_err``), so a point source's alerts match and its neighbours' rarely do.
DEFAULT_RADIUS_ARCSEC = 2.0
#: Largest radius an entry may ask (arcsec): 1 deg, the Simple Cone Search's limit here.
MAX_RADIUS_ARCSEC = 3600.0
#: Entries a file may hold unless the reader is told otherwise (the portal asks fewer).
MAX_ENTRIES = 100_000
#: (entry, position) pairs within the largest radius that :meth:`Watchlist.match` makes at most (~24 bytes
#: each): 10,000 entries of 1 deg over a dense archive would otherwise make 10^9.
MAX_PAIRS = 2_000_000
#: Largest watchlist file :func:`load_watchlist` reads (bytes): 100,000 rows of up to ~600 bytes.
MAX_FILE_BYTES = 64 * 1024 * 1024
#: Longest text of an angle (characters): ``-359:59:59.999999999`` and room.
MAX_ANGLE_CHARS = 32
#: Longest entry name (characters).
MAX_NAME = 128

_COLUMNS = {
    "ra": ("ra", "ra_deg", "raj2000", "_raj2000", "ra_j2000"),
    "dec": ("dec", "decl", "dec_deg", "dej2000", "decj2000", "_dej2000", "dec_j2000"),
    "name": ("name", "id", "objname", "object", "target"),
    "radius": ("radius", "radius_arcsec"),
}
_SEXAGESIMAL = re.compile(r"^([+-]?)\s*(\d{1,3})\s*[:hd°\s]\s*(\d{1,2})\s*[:m'′\s]\s*(\d{1,2}(?:\.\d*)?)\s*[s\"″]?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True)
class Matches:
    """Pairs of (alert, entry) within the entry's radius, ordered by alert, then separation.

    Attributes
    ----------
    alert : ndarray of int, shape (n,)
        Index of the alert in the positions given to :meth:`Watchlist.match`.
    entry : ndarray of int, shape (n,)
        Index of the watchlist entry.
    separation_arcsec : ndarray of float, shape (n,)
        Angle between the two [arcsec].
    """

    alert: np.ndarray
    entry: np.ndarray
    separation_arcsec: np.ndarray

    def __len__(self) -> int:
        return len(self.alert)


@dataclass(frozen=True, eq=False)
class Watchlist:
    """Named positions with a match radius each.

    Attributes
    ----------
    names : tuple of str, length n
    ra, dec : ndarray of float, shape (n,)
        Position [deg, ICRS].
    radius_arcsec : ndarray of float, shape (n,)
        Match radius [arcsec], in (0, :data:`MAX_RADIUS_ARCSEC`].
    """

    names: tuple[str, ...]
    ra: np.ndarray
    dec: np.ndarray
    radius_arcsec: np.ndarray
    _tree: cKDTree | None = field(init=False, repr=False)
    _reach: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_tree", cKDTree(unit_vectors(self.ra, self.dec)) if len(self.ra) else None)
        object.__setattr__(self, "_reach", chord(float(self.radius_arcsec.max())) if len(self.ra) else 0.0)

    def __len__(self) -> int:
        return len(self.names)

    def entry(self, i: int) -> dict:
        """Entry ``i`` as ``{"name", "ra", "dec", "radius_arcsec"}``."""
        return {"name": self.names[i], "ra": float(self.ra[i]), "dec": float(self.dec[i]),
                "radius_arcsec": float(self.radius_arcsec[i])}

    def near(self, ra: float, dec: float) -> list[dict]:
        """The entries whose radius holds one position (deg): ``[{"name", "distance_arcsec"}]``, nearest first."""
        found = self.match(np.array([ra], float), np.array([dec], float))
        return [{"name": self.names[e], "distance_arcsec": round(float(d), 3)}
                for e, d in zip(found.entry, found.separation_arcsec, strict=True)]

    def match(self, ra: np.ndarray, dec: np.ndarray, max_pairs: int | None = None) -> Matches:
        """The entries within their radius of each position (``ra``, ``dec``: deg, shape (m,)).

        A position that is not finite matches nothing.

        Raises
        ------
        InvalidWatchlist
            More than ``max_pairs`` (default :data:`MAX_PAIRS`) (entry, position) pairs within the
            largest radius (counted before any is made, so wide radii over a dense archive cannot
            exhaust the memory).
        """
        ra, dec = np.asarray(ra, float).ravel(), np.asarray(dec, float).ravel()
        ok = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90.0))
        empty = Matches(np.zeros(0, int), np.zeros(0, int), np.zeros(0))
        if self._tree is None or not len(ok):
            return empty
        positions = cKDTree(unit_vectors(ra[ok], dec[ok]))
        max_pairs = MAX_PAIRS if max_pairs is None else max_pairs
        if (n := int(self._tree.count_neighbors(positions, self._reach))) > max_pairs:
            raise InvalidWatchlist(f"the watchlist's radii hold {n:,} (entry, position) pairs, more than "
                                   f"{max_pairs:,}: use smaller radii, fewer entries or fewer positions")
        pairs = self._tree.sparse_distance_matrix(positions, self._reach, output_type="ndarray")  # (i, j, chord)
        entry, alert = pairs["i"].astype(int), ok[pairs["j"].astype(int)]
        sep = np.degrees(2.0 * np.arcsin(np.clip(pairs["v"] / 2.0, 0.0, 1.0))) * 3600.0
        keep = sep <= self.radius_arcsec[entry]
        order = np.lexsort((sep[keep], alert[keep]))
        return Matches(alert[keep][order], entry[keep][order], sep[keep][order])


def load_watchlist(path: str | Path, default_radius_arcsec: float = DEFAULT_RADIUS_ARCSEC,
                   max_entries: int = MAX_ENTRIES) -> Watchlist:
    """The watchlist in file ``path`` (:func:`read_watchlist`); InvalidWatchlist naming the file.

    A file over :data:`MAX_FILE_BYTES`, or one that cannot be read (missing, a folder, no
    permission), is refused by name.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidWatchlist(f"cannot read the watchlist {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise InvalidWatchlist(f"the watchlist {path} is over {MAX_FILE_BYTES} bytes")
    try:
        return read_watchlist(data, default_radius_arcsec, max_entries)
    except InvalidWatchlist as exc:
        raise InvalidWatchlist(f"{path}: {exc}") from None


class WatchlistFile:
    """A watchlist file, read again when it changes (its size, modification time or inode).

    The file is looked at most every ``check_s`` seconds (:meth:`current`), so an astronomer's
    edited list reaches a running alert stage without a restart. A change that does not read (a
    half-written file, a bad row, the file gone) keeps the last good list, with a warning logged.

    Parameters
    ----------
    path : str or Path
    default_radius_arcsec : float
        Radius of entries without one [arcsec]. Default :data:`DEFAULT_RADIUS_ARCSEC`.
    check_s : float
        Seconds between looks at the file. Default 30.
    clock : callable
        Monotonic seconds (a test's own clock). Default :func:`time.monotonic`.

    Raises
    ------
    InvalidWatchlist
        The file cannot be read at start.
    """

    def __init__(self, path: str | Path, default_radius_arcsec: float = DEFAULT_RADIUS_ARCSEC,
                 check_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.radius, self.check_s, self._clock = Path(path), default_radius_arcsec, check_s, clock
        self._stamp = self._stat()
        self.watchlist = load_watchlist(self.path, self.radius)
        self._checked = clock()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> Watchlist:
        """The list as the file now holds it (the last good one when it does not read)."""
        now = self._clock()
        if now - self._checked < self.check_s:
            return self.watchlist
        self._checked, stamp = now, self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self.watchlist = load_watchlist(self.path, self.radius)
                log.info("watchlist %s read again: %d entries", self.path, len(self.watchlist))
            except InvalidWatchlist as exc:
                log.warning("%s; keeping the previous list of %d entries", exc, len(self.watchlist))
        return self.watchlist


def parse_angle(text: str, hours: bool) -> float:
    """An angle in degrees from decimal degrees or sexagesimal text (hours when ``hours``).

    Raises
    ------
    ValueError
        Text that is neither (the message says what was read).
    """
    text = text.strip()
    if len(text) > MAX_ANGLE_CHARS:  # before any regular expression sees it: long runs of spaces backtrack
        raise ValueError(f"{text[:40]!r}... is longer than {MAX_ANGLE_CHARS} characters")
    try:
        value = float(text)
    except ValueError:
        m = _SEXAGESIMAL.match(text)
        if m is None:
            raise ValueError(f"{text[:40]!r} is neither decimal degrees nor sexagesimal") from None
        sign, a, b, c = m.group(1), int(m.group(2)), int(m.group(3)), float(m.group(4))
        if b >= 60 or c >= 60:
            raise ValueError(f"{text[:40]!r}: minutes and seconds must be under 60") from None
        value = (a + b / 60.0 + c / 3600.0) * (15.0 if hours else 1.0) * (-1.0 if sign == "-" else 1.0)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]!r} is not a finite number")
    return value


def read_watchlist(data: bytes | str, default_radius_arcsec: float = DEFAULT_RADIUS_ARCSEC,
                   max_entries: int = MAX_ENTRIES) -> Watchlist:
    """Read a watchlist CSV (the module's table of columns).

    Parameters
    ----------
    data : bytes or str
        The file's content (bytes are decoded as UTF-8).
    default_radius_arcsec : float
        Radius of entries without one [arcsec]. Default :data:`DEFAULT_RADIUS_ARCSEC`.
    max_entries : int
        Entries allowed at most. Default :data:`MAX_ENTRIES`.

    Raises
    ------
    InvalidWatchlist
        Not UTF-8, no ``ra`` or ``dec`` column, no entries, more than ``max_entries``, or a value
        out of range (naming its row and column).
    """
    _check_radius(default_radius_arcsec, "the default radius")
    text = _decode(data)
    rows = csv.reader(io.StringIO(text, newline=""), dialect=_dialect(text))
    names: list[str] = []
    pos: list[tuple[float, float, float]] = []
    cols: dict[str, int] | None = None
    try:
        for row in rows:
            if not any(c.strip() for c in row) or row[0].lstrip().startswith("#"):
                continue
            if cols is None:
                cols = _columns(row)
                continue
            if len(pos) >= max_entries:
                raise InvalidWatchlist(f"the watchlist holds more than {max_entries} entries")
            name, entry = _entry(row, cols, rows.line_num, default_radius_arcsec)
            names.append(name)
            pos.append(entry)
    except csv.Error as exc:
        raise InvalidWatchlist(f"row {rows.line_num}: {exc}") from None
    if cols is None:
        raise InvalidWatchlist("the watchlist is empty: a header row with ra and dec, then one row per entry")
    if not pos:
        raise InvalidWatchlist("the watchlist has a header but no entries")
    ra, dec, radius = (np.array(c, float) for c in zip(*pos, strict=True))
    return Watchlist(tuple(names), ra, dec, radius)


def _decode(data: bytes | str) -> str:
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidWatchlist(f"the watchlist is not UTF-8 text (byte {exc.start})") from None
    return data.removeprefix("\ufeff")


def _dialect(text: str) -> type[csv.Dialect]:
    """The CSV dialect whose delimiter the header row uses (``,`` when it uses none of them)."""
    header = next((line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")), "")
    delimiter = max(",\t;|", key=header.count) if any(d in header for d in ",\t;|") else ","

    class Dialect(csv.excel):
        pass

    Dialect.delimiter = delimiter
    return Dialect


def _columns(header: list[str]) -> dict[str, int]:
    """Index of each known column in ``header``; InvalidWatchlist without ``ra`` and ``dec``."""
    lowered = [h.strip().lower() for h in header]
    cols: dict[str, int] = {}
    for key, aliases in _COLUMNS.items():
        found = [i for i, h in enumerate(lowered) if h in aliases]
        if len(found) > 1:
            raise InvalidWatchlist(f"the header names the {key} column twice ({', '.join(header[i] for i in found)})")
        if found:
            cols[key] = found[0]
    missing = [k for k in ("ra", "dec") if k not in cols]
    if missing:
        shown = ", ".join(repr(h[:40]) for h in header[:10])
        raise InvalidWatchlist(f"the header has no {' or '.join(missing)} column (it has {shown}); "
                               "a watchlist needs ra and dec, and may have name and radius")
    return cols


def _entry(row: list[str], cols: dict[str, int], line: int,
           default_radius: float) -> tuple[str, tuple[float, float, float]]:
    """One row's name and (ra, dec, radius); InvalidWatchlist naming the row and column at fault."""
    def cell(key: str) -> str | None:
        i = cols.get(key)
        return row[i].strip() if i is not None and i < len(row) and row[i].strip() else None

    values: dict[str, float] = {}
    for key, hours, low, high in (("ra", True, 0.0, 360.0), ("dec", False, -90.0, 90.0)):
        text = cell(key)
        if text is None:
            raise InvalidWatchlist(f"row {line}: no {key}")
        try:
            values[key] = parse_angle(text, hours and not _decimal(text))
        except ValueError as exc:
            raise InvalidWatchlist(f"row {line}, {key}: {exc}") from None
        if not low <= values[key] <= high:
            raise InvalidWatchlist(f"row {line}, {key}: {values[key]:g} deg is outside [{low:g}, {high:g}]")
    radius = cell("radius")
    try:
        r = default_radius if radius is None else float(radius)
    except ValueError:
        raise InvalidWatchlist(f"row {line}, radius: {str(radius)[:40]!r} is not a number (arcsec)") from None
    _check_radius(r, f"row {line}, radius")
    return _name(cell("name"), line), (values["ra"] % 360.0, values["dec"], r)


def _decimal(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _name(text: str | None, line: int) -> str:
    if text is None:
        return f"row {line}"
    if len(text) > MAX_NAME or _CONTROL.search(text):
        raise InvalidWatchlist(f"row {line}, name: at most {MAX_NAME} characters, without control characters")
    return text


def _check_radius(r: float, what: str) -> None:
    if not (math.isfinite(r) and 0.0 < r <= MAX_RADIUS_ARCSEC):
        raise InvalidWatchlist(f"{what}: {r!r} arcsec is outside (0, {MAX_RADIUS_ARCSEC:g}]")
