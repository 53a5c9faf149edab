"""Tests of broker.training.ztf: real alerts read into normalised triplets with ZTF's scores."""

from __future__ import annotations

import gzip

import fastavro
import numpy as np

from broker.training.ztf import ztf_triplets
from tests.helpers import gz_fits, write_avro, ztf_packet

#: Rubin's packets (and Palomar Gattini-IR's) hold their stamps as bytes, not as ZTF's records.
BYTES_SCHEMA = {"type": "record", "name": "alert", "fields": [
    {"name": "diaSourceId", "type": "long"},
    *({"name": k, "type": ["null", "bytes"]} for k in ("cutoutScience", "cutoutTemplate", "cutoutDifference"))]}


def _stamps(side: int, seed: int) -> list[np.ndarray]:
    """Science, reference, difference of ``side`` px with a source at the centre pixel ``side // 2``."""
    rng = np.random.default_rng(seed)
    sci, ref = rng.normal(300, 10, (side, side)), rng.normal(300, 10, (side, side))
    sci[side // 2, side // 2] += 3000
    return [sci, ref, sci - ref]


def test_alerts_of_any_stamp_layout_are_read_and_bad_ones_rejected_with_their_file(tmp_path):
    rubin = {"diaSourceId": 9, **dict(zip(("cutoutScience", "cutoutTemplate", "cutoutDifference"),
                                          (gz_fits(a) for a in _stamps(30, 1)), strict=True))}
    with open(tmp_path / "rubin.avro", "wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(BYTES_SCHEMA), [rubin])
    header = "".join(c.ljust(80) for c in ("SIMPLE  =                    T", "BITPIX  =                  -32",
                                           "NAXIS   =                    2", "NAXIS1  =                 4096",
                                           "NAXIS2  =                 4096", "END")).ljust(2880).encode()
    bomb = gzip.compress(header + bytes(4096 * 4096 * 4), 9)  # 64 MiB of zeros in 65 kB
    write_avro(tmp_path / "ztf.avro", [ztf_packet(1, [gz_fits(a) for a in _stamps(63, 2)]),
                                       ztf_packet(2, [bomb] + [gz_fits(a) for a in _stamps(63, 3)[1:]])])
    x, meta, rejected = ztf_triplets(tmp_path)
    assert x.shape == (2, 3, 63, 63) and list(meta["file"]) == ["rubin.avro", "ztf.avro"]
    for trip in x:  # both candidates at the centre of the network's input
        assert np.unravel_index(np.argmax(trip[2]), (63, 63)) == (31, 31)
    assert np.isnan(meta["drb"]).all() and meta["n_pad"].tolist() == [63 * 63 - 30 * 30, 0]
    assert len(rejected) == 1 and rejected[0].startswith("ztf.avro: gzip stamp: ")
    assert "inflate beyond 16.8 MB" in rejected[0]
