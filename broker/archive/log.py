"""The commit log: committed files, offset ranges, commit records and checkpoints (the state after a commit)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from broker.errors import ArchiveCorrupt

#: Folder of the commit records under the archive root.
COMMITS = "_commits"
#: Folder of the checkpoints (the state after a commit) under the archive root.
CHECKPOINTS = "_checkpoints"
#: Version of the commit-record format.
LOG_FORMAT = 1
_T = TypeVar("_T")


#: The Python types a field of each annotation may hold in a record (a bound: JSON's numbers, or null).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float | None": (float, int, type(None))}


def _typed(cls: type[_T], values: Any) -> _T:
    """``cls(**values)`` for a dataclass of ``str``, ``int`` and optional ``float`` fields, each of its type.

    A record whose ``rows`` is null or whose ``path`` is a number otherwise failed later, in a
    reader's sum or listing, with no word of which record it came from (TypeError).
    """
    if not isinstance(values, dict):
        raise TypeError(f"{cls.__name__} is not an object: {type(values).__name__}")
    out = cls(**values)
    for f in fields(out):  # type: ignore[arg-type]  # cls is a dataclass
        value = getattr(out, f.name)
        if type(value) not in _FIELD_TYPES[str(f.type)]:
            raise TypeError(f"{cls.__name__}.{f.name} is {type(value).__name__}, not {f.type}")
    return out


def _items(value: Any) -> list:
    """A JSON list of the log (TypeError if it is none: an object would read as its keys)."""
    if not isinstance(value, list):
        raise TypeError(f"expected a list, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class DataFile:
    """One committed Parquet file.

    Attributes
    ----------
    path : str
        Path relative to the archive root, ``/``-separated.
    rows : int
        Alerts in it.
    size : int
        Bytes.
    sha256 : str
        Hex SHA-256 of its bytes.
    schema_version : int
        Alert schema version of its records.
    night : str
        ``YYYY-MM-DD`` (:func:`night_of`).
    telescope : str
    ra_min, ra_max, dec_min, dec_max, mjd_min, mjd_max : float or None
        Least and greatest ``ra``, ``dec`` (deg) and ``mjd`` (days) of its rows, nulls left out, so
        that a read skips the files that cannot hold a match (:func:`broker.archive.reader.may_hold_cone`).
        None (the default) where the column holds a NaN or an infinity, or no value, and in the records
        written before the bounds were: such a file is always read.
    """

    path: str
    rows: int
    size: int
    sha256: str
    schema_version: int
    night: str
    telescope: str
    ra_min: float | None = None
    ra_max: float | None = None
    dec_min: float | None = None
    dec_max: float | None = None
    mjd_min: float | None = None
    mjd_max: float | None = None


@dataclass(frozen=True)
class OffsetRange:
    """Offsets ``[first, next)`` of one topic partition that a commit covers (``next``: where to resume)."""

    topic: str
    partition: int
    first: int
    next: int


@dataclass(frozen=True)
class Commit:
    """One commit record: the files of one batch and the Kafka offsets they cover, or one compaction.

    Attributes
    ----------
    seq : int
        Position in the log, from 1, without gaps.
    created : str
        When it was written (ISO 8601, UTC).
    files : tuple of DataFile
        Files it adds.
    offsets : tuple of OffsetRange
        Offsets it covers (none for a compaction).
    dead_letters : int
        Messages of the batch that went to the dead-letter topic instead (count).
    removed : tuple of str
        Paths of files it retires (a compaction: their rows are in ``files``).
    """

    seq: int
    created: str
    files: tuple[DataFile, ...]
    offsets: tuple[OffsetRange, ...]
    dead_letters: int = 0
    removed: tuple[str, ...] = ()

    def to_json(self) -> bytes:
        """The record's bytes."""
        return json.dumps({"format": LOG_FORMAT, **asdict(self)}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, name: str) -> Commit:
        """Parse a commit record; raise :class:`ArchiveCorrupt` when it is not one."""
        try:
            rec = json.loads(data)
            if rec.pop("format") != LOG_FORMAT:
                raise ValueError("unknown format")
            files = tuple(_typed(DataFile, f) for f in _items(rec.pop("files")))
            offsets = tuple(_typed(OffsetRange, o) for o in _items(rec.pop("offsets")))
            removed = tuple(str(p) for p in _items(rec.pop("removed", [])))
            return cls(files=files, offsets=offsets, removed=removed, **rec)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ArchiveCorrupt(f"commit record {name} is not readable: {type(exc).__name__}: {exc}") from exc


@dataclass
class Snapshot:
    """The state of an archive after its commits up to ``seq``: what readers and the writer need.

    Attributes
    ----------
    seq : int
        Last commit applied (0: none).
    live : dict of str to DataFile
        Committed files that no compaction retired, by path, in the order they were added.
    positions : dict of (str, int) to int
        Where each (topic, partition) stands: the offset after the last one archived.
    retired : dict of str to str
        Files retired by compactions (path -> ISO time of the commit that retired them).
    """

    seq: int = 0
    live: dict[str, DataFile] = field(default_factory=dict)
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    retired: dict[str, str] = field(default_factory=dict)

    def apply(self, commit: Commit) -> None:
        """The state after ``commit`` (the next one)."""
        self.seq = commit.seq
        self.live.update((f.path, f) for f in commit.files)
        for path in commit.removed:
            self.live.pop(path, None)
            self.retired[path] = commit.created
        for o in commit.offsets:
            key = (o.topic, o.partition)
            self.positions[key] = max(self.positions.get(key, 0), o.next)

    def to_json(self) -> bytes:
        """The checkpoint's bytes."""
        return json.dumps({"format": LOG_FORMAT, "seq": self.seq, "live": [asdict(f) for f in self.live.values()],
                           "positions": [[t, p, n] for (t, p), n in self.positions.items()],
                           "retired": sorted(self.retired.items())}).encode()

    @classmethod
    def from_json(cls, data: bytes, name: str) -> Snapshot:
        """Parse a checkpoint; raise :class:`ArchiveCorrupt` when it is not one."""
        try:
            rec = json.loads(data)
            if rec["format"] != LOG_FORMAT:
                raise ValueError("unknown format")
            live = {f.path: f for f in (_typed(DataFile, f) for f in _items(rec["live"]))}
            return cls(int(rec["seq"]), live, {(str(t), int(p)): int(n) for t, p, n in rec["positions"]},
                       {str(p): str(c) for p, c in rec["retired"]})
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ArchiveCorrupt(f"checkpoint {name} is not readable: {type(exc).__name__}: {exc}") from exc


def positions(log: Sequence[Commit]) -> dict[tuple[str, int], int]:
    """Where each (topic, partition) stands in ``log``: the offset after the last one archived."""
    out: dict[tuple[str, int], int] = {}
    for commit in log:
        for o in commit.offsets:
            out[(o.topic, o.partition)] = max(out.get((o.topic, o.partition), 0), o.next)
    return out
