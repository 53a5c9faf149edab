"""Frame-level idempotence: the frames the subtract stage has processed, and where each came from.

A telescope (or an operator) that sends a frame again must not get its alerts again. The subtract
stage, which owns the per-field state (references, difference images), keeps one row per processed
frame in ``<state_dir>/frames.sqlite``, or in the history's PostgreSQL (``[history] dsn``: subtract
replicas then share it without SQLite over a network volume): the telescope and frame id, a SHA-256
of the decoded pixels (:func:`pixel_checksum`: the same exposure re-encoded, or renamed, has the same
one) and the Kafka
position of the message it came from (``topic:partition:offset``). A later message with the same
telescope and frame id, or the same pixels, from *another* position is a re-send: the stage
dead-letters it with reason ``duplicate_frame`` (:class:`~broker.errors.DuplicateFrame`), naming the
first position and what became of it. The same message delivered again (a restart after a crash
before its transaction committed) has the same position and is processed again, as exactly-once
requires; see ``docs/architecture.md`` ("Frame-level idempotence").

A frame kept to build its field's reference (``REFERENCE_BUILDING``) that the co-add then left out
is searched against the reference later, once, in the transaction of another message: the table
``searches`` records the position of that message (:meth:`FrameLedger.record_search`), so that its
redelivery searches the frame again and no other message does (:meth:`FrameLedger.entry`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from broker.errors import DuplicateFrame
from broker.frame import FrameMeta
from broker.history import HistoryConfig, HistoryStore, SqliteStore


def schema(real: str) -> tuple[str, ...]:
    """The statements that create the ledger's table and index, ``real`` being the dialect's 8-byte float type."""
    return (
        f"CREATE TABLE IF NOT EXISTS frames (telescope TEXT NOT NULL, frame_id TEXT NOT NULL, checksum TEXT NOT NULL, "
        f"field TEXT NOT NULL, filter TEXT NOT NULL, mjd {real} NOT NULL, source TEXT NOT NULL, status TEXT NOT NULL, "
        f"recorded {real} NOT NULL, PRIMARY KEY (telescope, frame_id))",
        "CREATE INDEX IF NOT EXISTS frames_by_checksum ON frames (checksum)",
        f"CREATE TABLE IF NOT EXISTS searches (telescope TEXT NOT NULL, frame_id TEXT NOT NULL, source TEXT NOT NULL, "
        f"status TEXT NOT NULL, recorded {real} NOT NULL, PRIMARY KEY (telescope, frame_id))",
    )


@dataclass(frozen=True)
class LedgerEntry:
    """What the ledger holds of one frame (:meth:`FrameLedger.entry`).

    Attributes
    ----------
    status : str or None
        Its batch status when it was processed (``REFERENCE_BUILDING``, ...); None when the ledger
        holds no row of it.
    source : str or None
        ``topic:partition:offset`` of the message it came from; None likewise.
    searched_from : str or None
        ``topic:partition:offset`` of the message in whose transaction it was searched against the
        reference its co-add left it out of; None when it was not.
    """

    status: str | None
    source: str | None
    searched_from: str | None


def pixel_checksum(data: np.ndarray) -> str:
    """Hex SHA-256 of a frame's pixels as native float32, with its shape (~10 ms for 2048^2)."""
    pixels = np.ascontiguousarray(data, dtype=np.float32)
    digest = hashlib.sha256(f"{pixels.shape}".encode())
    digest.update(pixels.data)
    return digest.hexdigest()


class FrameLedger:
    """The processed frames of a pipeline (one row per frame, ~200 bytes).

    Parameters
    ----------
    store : HistoryStore, Path or str
        Where the rows are: a SQLite file (created with its table when absent), or an open store
        (:meth:`open` picks the history's PostgreSQL when ``[history] dsn`` is set, so that subtract
        replicas share one ledger without SQLite over a network volume).
    """

    def __init__(self, store: HistoryStore | Path | str) -> None:
        self.store = SqliteStore(store, schema("REAL"), added=()) if isinstance(store, (str, Path)) else store

    @classmethod
    def open(cls, state_dir: Path, config: HistoryConfig) -> FrameLedger:
        """The ledger a configuration names: in the history's PostgreSQL, else ``<state_dir>/frames.sqlite``.

        Raises
        ------
        ConfigError
            PostgreSQL named but psycopg is missing or the database cannot be reached.
        """
        if config.dsn:
            from broker.history_pg import PostgresStore

            return cls(PostgresStore(config.dsn, config.connect_timeout_s, schema("DOUBLE PRECISION"), added=()))
        return cls(Path(state_dir) / "frames.sqlite")

    def _run(self, sql: str, params: tuple) -> list[tuple]:
        """Run one statement in a transaction of its own (a lost PostgreSQL is reopened); its rows."""
        rows: list[tuple] = []

        def work() -> None:
            cur = self.store.execute(sql, params)
            if cur.description is not None:
                rows.extend(cur.fetchall())

        self.store.transaction([], work)
        return rows

    def check(self, meta: FrameMeta, checksum: str, source: str) -> None:
        """Raise :class:`DuplicateFrame` if this frame was processed from a position other than ``source``.

        Parameters
        ----------
        meta : FrameMeta
            The frame's metadata (telescope and frame id).
        checksum : str
            :func:`pixel_checksum` of its pixels.
        source : str
            ``topic:partition:offset`` of the message being processed.
        """
        rows = self._run("SELECT frame_id, checksum, source, status FROM frames WHERE (telescope = ? AND frame_id = ?) "
                         "OR checksum = ? LIMIT 2", (meta.telescope, meta.frame_id, checksum))
        for frame_id, their_checksum, their_source, status in rows:
            if their_source == source:
                continue  # the same message again (a restart): process it again
            same = "frame id" if frame_id == meta.frame_id else f"pixels as frame {frame_id}"
            if frame_id == meta.frame_id and their_checksum == checksum:
                same = "frame id and pixels"
            raise DuplicateFrame(f"frame {meta.frame_id} of {meta.telescope} was already processed ({status}) "
                                 f"from {their_source}: same {same}; no new alerts")

    def record(self, meta: FrameMeta, checksum: str, source: str, status: str) -> None:
        """Remember that the frame was processed from ``source`` with batch status ``status`` (a first record stays)."""
        self._run("INSERT INTO frames VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                  (meta.telescope, meta.frame_id, checksum, meta.field, meta.filter, meta.mjd_start, source, status,
                   time.time()))

    def entry(self, meta: FrameMeta) -> LedgerEntry:
        """What the ledger holds of the frame of ``meta`` (telescope and frame id): its row and its search."""
        key = (meta.telescope, meta.frame_id)
        row = self._run("SELECT status, source FROM frames WHERE telescope = ? AND frame_id = ?", key)
        search = self._run("SELECT source FROM searches WHERE telescope = ? AND frame_id = ?", key)
        status, source = row[0] if row else (None, None)
        return LedgerEntry(status, source, search[0][0] if search else None)

    def record_search(self, meta: FrameMeta, source: str, status: str) -> None:
        """Remember that the frame was searched in the transaction of ``source`` with ``status`` (a first one stays).

        ``status`` is the search's batch status, or the reason of the error that dead-lettered it.
        """
        self._run("INSERT INTO searches VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                  (meta.telescope, meta.frame_id, source, status, time.time()))

    def __len__(self) -> int:
        """Frames recorded."""
        return int(self._run("SELECT COUNT(*) FROM frames", ())[0][0])

    def close(self) -> None:
        """Close the database."""
        self.store.close()
