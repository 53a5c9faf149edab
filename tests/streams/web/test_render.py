"""Cutouts served from an alert's stamps: bounded inflation, clear refusals."""

from __future__ import annotations

import gzip

import pytest

from broker.errors import CutoutError
from streams.web.render import MAX_CUTOUT_BYTES, cutout_fits, cutout_png

HEADER = "".join(c.ljust(80) for c in ("SIMPLE  =                    T", "BITPIX  =                  -32",
                                       "NAXIS   =                    2", "NAXIS1  =                 2100",
                                       "NAXIS2  =                 2100", "END")).ljust(2880).encode()


def _alert(stamp: bytes) -> dict:
    return {"alertId": 1, "cutoutScience": {"fileName": "s.fits.gz", "stampData": stamp}}


def test_a_cutout_is_served_inflated_and_a_plain_one_as_it_is():
    plain = HEADER + bytes(2880)
    assert cutout_fits(_alert(gzip.compress(plain[:3000]) + gzip.compress(plain[3000:])), "science") == plain
    assert cutout_fits(_alert(plain), "science") == plain


@pytest.mark.parametrize("stamp, reason", [
    (gzip.compress(HEADER + bytes(2100 * 2100 * 4), 9), "inflate beyond 4.2 MB"),  # 17.6 MB in 17 kB
    (gzip.compress(HEADER + bytes(1000))[:-20], "cut short"),
    (b"\x1f\x8b" + bytes(100), "corrupt gzip stream"),
])
def test_a_bomb_a_cut_or_a_corrupt_stamp_is_refused_with_its_reason(stamp, reason):
    assert 2100 * 2100 * 4 > 4 * MAX_CUTOUT_BYTES  # over the PNG path's 16 MiB too
    with pytest.raises(CutoutError, match=reason):
        cutout_fits(_alert(stamp), "science")
    with pytest.raises(CutoutError, match="cannot be read"):
        cutout_png(_alert(stamp), "science")
