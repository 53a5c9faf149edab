"""Frame-level idempotence: a frame sent again is named a duplicate; the same message again is not."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from broker.errors import DuplicateFrame
from broker.history import HistoryConfig
from broker.ledger import FrameLedger, pixel_checksum
from tests.helpers import star_frame


@pytest.fixture(params=["sqlite", "postgres"])
def config(request):
    """Where the ledger lives: ``<state_dir>/frames.sqlite``, or the history's PostgreSQL (subtract replicas)."""
    if request.param == "sqlite":
        return HistoryConfig()
    return HistoryConfig(dsn=request.getfixturevalue("postgres").create_database("ledger"))


def test_a_frame_sent_again_is_a_duplicate_by_id_or_by_pixels(tmp_path, config):
    frame = star_frame()
    ledger = FrameLedger.open(tmp_path, config)
    checksum = pixel_checksum(frame.data)
    ledger.check(frame.meta, checksum, "ingested:0:7")
    ledger.record(frame.meta, checksum, "ingested:0:7", "SUBTRACTED")
    ledger.check(frame.meta, checksum, "ingested:0:7")  # the same message after a restart: processed again
    with pytest.raises(DuplicateFrame, match=r"already processed \(SUBTRACTED\) from ingested:0:7: same frame id "
                                             r"and pixels") as err:
        ledger.check(frame.meta, checksum, "ingested:0:9")
    assert err.value.reason == "duplicate_frame"
    renamed = replace(frame.meta, frame_id="TEST-F1-r-0002")  # the same exposure under another id
    other_replica = FrameLedger.open(tmp_path, config)
    with pytest.raises(DuplicateFrame, match="same pixels as frame TEST-F1-r-0001"):
        other_replica.check(renamed, checksum, "ingested:1:0")  # kept: another process sees it
    other_replica.close()
    with pytest.raises(DuplicateFrame, match="same frame id"):  # other pixels, the same telescope and id
        ledger.check(frame.meta, pixel_checksum(frame.data + 1), "ingested:0:9")
    other = star_frame(seed=1, FRAMEID="TEST-F1-r-0003")
    ledger.check(other.meta, pixel_checksum(other.data), "ingested:0:9")  # a new frame passes
    assert len(ledger) == 1
    ledger.close()


def test_the_search_of_a_left_out_frame_is_recorded_once_with_its_position(tmp_path, config):
    """What :func:`broker.pipeline.search_left_out` reads: the frame's status and where it was searched."""
    from broker.ledger import LedgerEntry

    frame = star_frame()
    ledger = FrameLedger.open(tmp_path, config)
    assert ledger.entry(frame.meta) == LedgerEntry(None, None, None)
    ledger.record(frame.meta, pixel_checksum(frame.data), "ingested:0:1", "REFERENCE_BUILDING")
    assert ledger.entry(frame.meta) == LedgerEntry("REFERENCE_BUILDING", "ingested:0:1", None)
    ledger.record_search(frame.meta, "ingested:0:2", "SUBTRACTED")
    ledger.record_search(frame.meta, "ingested:0:5", "SUBTRACTED")  # a first record stays
    reopened = FrameLedger.open(tmp_path, config)
    assert reopened.entry(frame.meta) == LedgerEntry("REFERENCE_BUILDING", "ingested:0:1", "ingested:0:2")
    reopened.close()
    other = replace(frame.meta, frame_id="TEST-F1-r-0002")
    ledger.record_search(other, "ingested:0:2", "poor_quality")  # a search of a frame the ledger lost
    assert ledger.entry(other) == LedgerEntry(None, None, "ingested:0:2")
    ledger.close()


def test_the_pixel_checksum_ignores_encoding_and_sees_one_pixel():
    data = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    assert pixel_checksum(data) == pixel_checksum(data.astype(">f4")) == pixel_checksum(np.asfortranarray(data))
    changed = data.copy()
    changed[3, 5] += 1e-3
    assert pixel_checksum(changed) != pixel_checksum(data) != pixel_checksum(data.reshape(32, 128))


def test_a_ledger_file_of_the_previous_release_opens_with_its_rows(tmp_path):
    """Files written before the ledger shared the history's stores (rollback journal, ``INSERT OR IGNORE``)."""
    import sqlite3

    frame = star_frame()
    old = sqlite3.connect(tmp_path / "frames.sqlite")
    old.executescript("CREATE TABLE frames (telescope TEXT NOT NULL, frame_id TEXT NOT NULL, checksum TEXT NOT NULL, "
                      "field TEXT NOT NULL, filter TEXT NOT NULL, mjd REAL NOT NULL, source TEXT NOT NULL, "
                      "status TEXT NOT NULL, recorded REAL NOT NULL, PRIMARY KEY (telescope, frame_id));"
                      "CREATE INDEX frames_by_checksum ON frames (checksum);")
    with old:
        old.execute("INSERT INTO frames VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (frame.meta.telescope, frame.meta.frame_id,
                    pixel_checksum(frame.data), "F1", "r", 60000.0, "ingested:0:3", "SUBTRACTED", 1.7e9))
    old.close()
    ledger = FrameLedger.open(tmp_path, HistoryConfig())
    with pytest.raises(DuplicateFrame, match="from ingested:0:3"):
        ledger.check(frame.meta, pixel_checksum(frame.data), "ingested:0:8")
    assert ledger.entry(frame.meta).searched_from is None  # the searches table is added to an old file
    ledger.close()
