"""Frame-level idempotence: a frame sent again is named a duplicate; the same message again is not."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from broker.errors import DuplicateFrame
from broker.ledger import FrameLedger, pixel_checksum
from tests.helpers import star_frame


def test_a_frame_sent_again_is_a_duplicate_by_id_or_by_pixels(tmp_path):
    frame = star_frame()
    ledger = FrameLedger(tmp_path / "frames.sqlite")
    checksum = pixel_checksum(frame.data)
    ledger.check(frame.meta, checksum, "ingested:0:7")
    ledger.record(frame.meta, checksum, "ingested:0:7", "SUBTRACTED")
    ledger.check(frame.meta, checksum, "ingested:0:7")  # the same message after a restart: processed again
    with pytest.raises(DuplicateFrame, match=r"already processed \(SUBTRACTED\) from ingested:0:7: same frame id "
                                             r"and pixels") as err:
        ledger.check(frame.meta, checksum, "ingested:0:9")
    assert err.value.reason == "duplicate_frame"
    renamed = replace(frame.meta, frame_id="TEST-F1-r-0002")  # the same exposure under another id
    with pytest.raises(DuplicateFrame, match="same pixels as frame TEST-F1-r-0001"):
        FrameLedger(tmp_path / "frames.sqlite").check(renamed, checksum, "ingested:1:0")  # kept on disk
    with pytest.raises(DuplicateFrame, match="same frame id"):  # other pixels, the same telescope and id
        ledger.check(frame.meta, pixel_checksum(frame.data + 1), "ingested:0:9")
    other = star_frame(seed=1, FRAMEID="TEST-F1-r-0003")
    ledger.check(other.meta, pixel_checksum(other.data), "ingested:0:9")  # a new frame passes
    assert len(ledger) == 1
    ledger.close()


def test_the_pixel_checksum_ignores_encoding_and_sees_one_pixel():
    data = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    assert pixel_checksum(data) == pixel_checksum(data.astype(">f4")) == pixel_checksum(np.asfortranarray(data))
    changed = data.copy()
    changed[3, 5] += 1e-3
    assert pixel_checksum(changed) != pixel_checksum(data) != pixel_checksum(data.reshape(32, 128))
