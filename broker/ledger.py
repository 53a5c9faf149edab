"""Frame-level idempotence: the frames the subtract stage has processed, and where each came from.

A telescope (or an operator) that sends a frame again must not get its alerts again. The subtract
stage, which owns the per-field state (references, difference images), keeps one row per processed
frame in ``<state_dir>/frames.sqlite``: the telescope and frame id, a SHA-256 of the decoded pixels
(:func:`pixel_checksum`: the same exposure re-encoded, or renamed, has the same one) and the Kafka
position of the message it came from (``topic:partition:offset``). A later message with the same
telescope and frame id, or the same pixels, from *another* position is a re-send: the stage
dead-letters it with reason ``duplicate_frame`` (:class:`~broker.errors.DuplicateFrame`), naming the
first position and what became of it. The same message delivered again (a restart after a crash
before its transaction committed) has the same position and is processed again, as exactly-once
requires; see ``docs/architecture.md`` ("Frame-level idempotence").
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import numpy as np

from broker.errors import DuplicateFrame
from broker.frame import FrameMeta

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    telescope TEXT NOT NULL,
    frame_id TEXT NOT NULL,
    checksum TEXT NOT NULL,
    field TEXT NOT NULL,
    filter TEXT NOT NULL,
    mjd REAL NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    recorded REAL NOT NULL,
    PRIMARY KEY (telescope, frame_id)
);
CREATE INDEX IF NOT EXISTS frames_by_checksum ON frames (checksum);
"""


def pixel_checksum(data: np.ndarray) -> str:
    """Hex SHA-256 of a frame's pixels as native float32, with its shape (~10 ms for 2048^2)."""
    pixels = np.ascontiguousarray(data, dtype=np.float32)
    digest = hashlib.sha256(f"{pixels.shape}".encode())
    digest.update(pixels.data)
    return digest.hexdigest()


class FrameLedger:
    """The processed frames of one state directory (SQLite; one row per frame, ~200 bytes).

    Parameters
    ----------
    path : Path
        The SQLite file (created with its table when absent).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0)
        self._db.executescript(_SCHEMA)

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
        rows = self._db.execute(
            "SELECT frame_id, checksum, source, status FROM frames WHERE (telescope = ? AND frame_id = ?) "
            "OR checksum = ? LIMIT 2", (meta.telescope, meta.frame_id, checksum)).fetchall()
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
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO frames VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (meta.telescope, meta.frame_id, checksum, meta.field, meta.filter, meta.mjd_start, source, status,
                 time.time()))

    def __len__(self) -> int:
        """Frames recorded."""
        return int(self._db.execute("SELECT COUNT(*) FROM frames").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        self._db.close()
