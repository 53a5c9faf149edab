"""Tests of broker.normalise: normalisation (ours and real ZTF cutouts) and alert stamps, without torch."""

from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from broker.errors import ConfigError, CutoutError
from broker.normalise import MAX_STAMP_BYTES, NormaliseConfig, alert_triplet, decode_stamp, normalise_triplet
from tests.helpers import gz_fits

ZTF_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ztf_alerts"
RUBIN_DIR = ZTF_DIR.parent / "rubin" / "real"


# --- normalisation --------------------------------------------------------------------------------
def _noise(shape=(63, 63), seed=0, sky=500.0):
    rng = np.random.default_rng(seed)
    return (sky + rng.normal(0, 20, shape)).astype(np.float32)


def test_normalise_shape_range_and_robust_scale():
    sci, ref = _noise(seed=1), _noise(seed=2, sky=900.0)
    diff = _noise(seed=3, sky=0.0)
    diff[31, 31] = 1e7  # one absurd pixel must neither dominate the scale nor escape the clip
    x, flags = normalise_triplet(sci, ref, diff)
    assert x.shape == (3, 63, 63) and x.dtype == np.float32
    assert np.all(np.isfinite(x)) and np.abs(x).max() <= NormaliseConfig().clip
    # median ~0 and robust sigma ~1 per channel regardless of sky level
    for ch in x:
        assert abs(np.median(ch)) < 0.1
        assert 0.8 < 1.4826 * np.median(np.abs(ch - np.median(ch))) < 1.2
    assert flags.n_nan == (0, 0, 0) and flags.n_pad == 0 and not flags.repaired


def test_normalise_keeps_the_brightness_of_bright_reference_stars():
    # Stars of 5e3 and 5e4 robust sigma at the centre of the reference: what tells a change of a
    # few % of a star from a subtraction residual. The old clip (30) made them equal.
    sci, diff = _noise(seed=1), _noise(seed=3, sky=0.0)
    peaks = []
    for amp in (1e5, 1e6):
        ref = _noise(seed=2)
        ref[31, 31] += amp
        x, flags = normalise_triplet(sci, ref, diff)
        assert flags.n_clipped == 0
        peaks.append(x[1, 31, 31])
        old, _ = normalise_triplet(sci, ref, diff, NormaliseConfig(clip=30.0))
        assert old[1, 31, 31] == 30.0  # both flattened
        assert np.array_equal(np.clip(x, -30, 30), old)  # the clip is the last step
    assert peaks[1] - peaks[0] > 10  # ~5 ln 10 apart: asinh is logarithmic there


def test_bad_normalise_settings_are_refused():
    for bad in ({"clip": -1.0}, {"soft_knee": float("nan")}, {"clip": "60"}):
        with pytest.raises(ConfigError, match="NormaliseConfig"):
            NormaliseConfig(**bad)


def test_normalise_fills_and_counts_nans():
    sci, ref, diff = _noise(seed=1), _noise(seed=2), _noise(seed=3, sky=0.0)
    for a in (sci, ref, diff):
        a[:, :10] = np.nan  # frame edge
    diff[5, 40] = np.inf
    x, flags = normalise_triplet(sci, ref, diff)
    assert np.all(np.isfinite(x))
    assert flags.n_nan == (630, 630, 631)
    assert np.all(x[:, :, :10] == 0.0)


def test_normalise_pads_short_cutout_keeping_candidate_centred():
    # a 48x63 stamp cut at the top edge of a CCD: candidate at row 31 - 15 = 16 of the stamp
    sci, ref, diff = _noise((48, 63), 1), _noise((48, 63), 2), _noise((48, 63), 3, sky=0.0)
    diff[16, 31] = sci[16, 31] = 5000.0
    x, flags = normalise_triplet(sci, ref, diff)
    assert x.shape == (3, 63, 63)
    assert flags.n_pad == 15 * 63 and flags.input_shape == (48, 63)
    assert np.unravel_index(np.argmax(x[2]), (63, 63)) == (31, 31)


@pytest.mark.parametrize(
    "arrays, match",
    [
        ((np.zeros((3, 63, 63)),) * 3, "2-D"),
        ((np.full((63, 63), np.nan),) * 3, "NaN"),
        ((np.zeros((64, 63)),) * 3, "over 63"),
        ((np.zeros((10, 63)),) * 3, "under"),
        ((np.zeros((63, 63)), np.zeros((63, 63)), np.zeros((62, 63))), "differ"),
    ],
)
def test_normalise_rejects_unusable_input(arrays, match):
    with pytest.raises(CutoutError, match=match):
        normalise_triplet(*arrays)


def test_cutout_error_has_reason():
    with pytest.raises(CutoutError) as info:
        normalise_triplet(np.zeros(5), np.zeros(5), np.zeros(5))
    assert info.value.reason == "cutout"


@pytest.mark.parametrize("n", [30, 32, 41, 51, 61])
def test_a_smaller_square_stamp_is_centred(n):
    """Rubin's 30-41 px, DECam's 51 px and ATLAS's 61 px stamps are cut around the candidate.

    Its pixel n // 2 must land at 31: the placements of a ZTF CCD-edge stamp (at 0 or 63 - n)
    put DECam's candidate 6 px off the centre on both axes and Rubin's 16 px.
    """
    sci, ref, diff = _noise((n, n), 1), _noise((n, n), 2), _noise((n, n), 3, sky=0.0)
    diff[n // 2, n // 2] = sci[n // 2, n // 2] = 5000.0
    x, flags = normalise_triplet(sci, ref, diff)
    assert np.unravel_index(np.argmax(x[2]), (63, 63)) == (31, 31)
    assert flags.n_pad == 63 * 63 - n * n


@pytest.mark.parametrize("bad, match", [
    (np.zeros((63, 63), complex), "not real numbers"),  # astype would drop the imaginary part
    (np.zeros((63, 63), "datetime64[s]"), "not real numbers"),  # would become seconds
    (np.full((63, 63), "1.0"), "not real numbers"),
])
def test_normalise_refuses_values_that_are_not_real_numbers(bad, match):
    with pytest.raises(CutoutError, match=match):
        normalise_triplet(bad, _noise(), _noise())


def test_masked_pixels_are_treated_as_missing_not_as_values():
    sci, ref, diff = _noise(seed=1), _noise(seed=2), _noise(seed=3, sky=0.0)
    bad = np.zeros((63, 63), bool)
    bad[:, :10] = True
    hot = np.where(bad, 1e6, diff)  # a masked column of garbage values (e.g. a bleed trail)
    x, flags = normalise_triplet(sci, ref, np.ma.masked_array(hot, mask=bad))
    clean, _ = normalise_triplet(sci, ref, np.where(bad, np.nan, diff))
    assert flags.n_nan == (0, 0, 630) and np.array_equal(x, clean)


def test_a_huge_stamp_is_refused_before_it_is_converted():
    # a 1e5 x 1e5 view of one float32 (no memory): as float64 it would need 75 GiB first
    huge = np.broadcast_to(np.float32(1.0), (100_000, 100_000))
    with pytest.raises(CutoutError, match="over 63"):
        normalise_triplet(huge, huge, huge)


# --- stamps ---------------------------------------------------------------------------------------
def _fits_header(*cards: str) -> bytes:
    return "".join(c.ljust(80) for c in (*cards, "END")).ljust(2880).encode()


def test_decode_stamp_refuses_a_gzip_bomb_and_a_cut_gzip_stream():
    header = _fits_header("SIMPLE  =                    T", "BITPIX  =                  -32",
                          "NAXIS   =                    2", "NAXIS1  =                 2100",
                          "NAXIS2  =                 2100")
    bomb = gzip.compress(header + bytes(2100 * 2100 * 4), 9)  # 17.6 MB of zeros in ~17 kB
    assert len(bomb) < 100_000 and 2100 * 2100 * 4 > MAX_STAMP_BYTES
    with pytest.raises(CutoutError, match="inflate beyond 16.8 MB"):
        decode_stamp(bomb)
    good = gz_fits(_noise())
    with pytest.raises(CutoutError, match="cut short"):
        decode_stamp(good[: len(good) // 2])
    with pytest.raises(CutoutError, match="not FITS"):  # gzip in gzip: one layer is undone, no more
        decode_stamp(gzip.compress(gzip.compress(good)))


@pytest.mark.parametrize("stamp, match", [
    # NAXIS 3 without NAXIS3: astropy raises KeyError
    (_fits_header("SIMPLE  =                    T", "BITPIX  =                  -32",
                  "NAXIS   =                    3", "NAXIS1  =                    4",
                  "NAXIS2  =                    4") + bytes(2880), "unreadable"),
    # a cube is not a stamp
    (_fits_header("SIMPLE  =                    T", "BITPIX  =                  -32",
                  "NAXIS   =                    3", "NAXIS1  =                    4",
                  "NAXIS2  =                    4", "NAXIS3  =                    2") + bytes(2880), "2-D"),
    # a FITS bomb: 1e10 pixels announced, none there
    (_fits_header("SIMPLE  =                    T", "BITPIX  =                  -32",
                  "NAXIS   =                    2", "NAXIS1  =               100000",
                  "NAXIS2  =               100000") + bytes(2880), "unreadable"),
])
def test_decode_stamp_turns_a_corrupt_header_into_a_cutout_error(stamp, match):
    with pytest.raises(CutoutError, match=match):
        decode_stamp(stamp)
    with pytest.raises(CutoutError, match=match):
        decode_stamp(gzip.compress(stamp))


def test_alert_triplet_reads_stamps_held_as_bytes():
    """Rubin's, Palomar Gattini-IR's and WINTER's packets hold the stamp bytes, not a record."""
    stamps = [_noise((30, 30), i) for i in range(3)]
    rubin = dict(zip(("cutoutScience", "cutoutTemplate", "cutoutDifference"),
                     (gz_fits(a) for a in stamps), strict=True))
    trip = alert_triplet(rubin)
    assert all(np.array_equal(t, a.astype(np.float32)) for t, a in zip(trip, stamps, strict=True))
    with pytest.raises(CutoutError, match="not stamp bytes"):
        alert_triplet({**rubin, "cutoutTemplate": "a string"})
    with pytest.raises(CutoutError, match="no cutoutDifference stamp"):
        alert_triplet({**rubin, "cutoutDifference": None})
    with pytest.raises(CutoutError, match="no cutoutScience stamp"):
        alert_triplet({"candidate": ["not", "a", "record"]})


@pytest.mark.shared_data
@pytest.mark.skipif(not RUBIN_DIR.is_dir(), reason=f"real Rubin alerts absent ({RUBIN_DIR})")
def test_the_real_rubin_alerts_are_read_and_centred():
    fastavro = pytest.importorskip("fastavro")
    n = 0
    for path in sorted(RUBIN_DIR.glob("*.avro")):
        with open(path, "rb") as fh:
            for rec in fastavro.reader(fh):
                sci, ref, diff = alert_triplet(rec)
                assert sci.shape == ref.shape == diff.shape and 30 <= sci.shape[0] <= 41
                x, flags = normalise_triplet(sci, ref, diff)
                assert np.isfinite(x).all() and flags.n_pad > 0
                side = sci.shape[0]
                y0 = 31 - side // 2  # the stamp's centre pixel lands at (31, 31)
                inside = np.zeros((63, 63), bool)
                inside[y0 : y0 + side, y0 : y0 + side] = True
                assert np.all(x[:, ~inside] == 0) and np.all(x[:, inside].std(axis=1) > 0.5)
                n += 1
    assert n == 8


def test_decode_stamp_rejects_jpeg_and_garbage():
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(100)
    with pytest.raises(CutoutError, match="JPEG"):
        decode_stamp(jpeg)
    with pytest.raises(CutoutError, match="JPEG"):
        decode_stamp(gzip.compress(jpeg))
    with pytest.raises(CutoutError, match="not FITS"):
        decode_stamp(b"hello world")
    with pytest.raises(CutoutError, match="empty"):
        decode_stamp(b"")


def _ztf_records(predicate, n=1):
    """First n (record, index row) pairs of the real ZTF alerts whose index row matches."""
    fastavro = pytest.importorskip("fastavro")
    if not (ZTF_DIR / "index.csv").is_file():
        pytest.skip(f"real ZTF alerts absent ({ZTF_DIR}); see shared/data/README.md")
    with open(ZTF_DIR / "index.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if predicate(r)]
    out = []
    for r in rows:
        path = ZTF_DIR.parent / r["file"]
        try:
            with open(path, "rb") as fh:
                for i, rec in enumerate(fastavro.reader(fh)):
                    if i == int(r["record_index"]):
                        out.append((rec, r))
                        break
        except (OSError, ValueError):  # e.g. snappy-coded files without cramjam
            continue
        if len(out) >= n:
            break
    if len(out) < n:
        pytest.skip("no readable ZTF record matches")
    return out


def _ztf_triplet(rec):
    return [decode_stamp(rec[k]["stampData"])
            for k in ("cutoutScience", "cutoutTemplate", "cutoutDifference")]


@pytest.mark.shared_data
def test_ztf_full_cutouts_normalise():
    for rec, _ in _ztf_records(lambda r: r["cutoutScience_shape"] == "63x63"
                               and r["cutoutScience_nnan"] == "0.0", n=5):
        x, flags = normalise_triplet(*_ztf_triplet(rec))
        assert x.shape == (3, 63, 63) and np.all(np.isfinite(x)) and not flags.repaired


@pytest.mark.shared_data
def test_ztf_fading_difference_is_turned_to_science_minus_reference():
    """ZTF cuts a fading's difference stamp from reference - science (source positive)."""
    for flag, sign in (("f", -1), ("t", 1)):
        for rec, _ in _ztf_records(lambda r, flag=flag: r["isdiffpos"] == flag and
                                   r["cutoutScience_nnan"] == "0.0" and
                                   r["cutoutScience_shape"] == "63x63", n=3):
            as_sent = _ztf_triplet(rec)[2]
            diff = alert_triplet(rec)[2]
            assert np.array_equal(diff, sign * as_sent)
            assert np.median(as_sent[29:34, 29:34]) > 0  # ZTF's stamp: the source positive
    # our own packets carry isdiffpos as a boolean and are science - reference already
    ours = {**rec, "candidate": {**rec["candidate"], "isdiffpos": False}}
    assert np.array_equal(alert_triplet(ours)[2], _ztf_triplet(rec)[2])


@pytest.mark.shared_data
def test_ztf_edge_truncated_cutout_is_padded():
    (rec, row), = _ztf_records(lambda r: r["cutoutScience_shape"] not in ("63x63", ""))
    trip = _ztf_triplet(rec)
    assert trip[0].shape != (63, 63)
    x, flags = normalise_triplet(*trip)
    assert x.shape == (3, 63, 63) and flags.n_pad > 0 and np.all(np.isfinite(x))
    # the candidate (a > 5 sigma difference source) stays at the centre after padding
    assert np.abs(x[2, 29:34, 29:34]).max() > 5.0


@pytest.mark.shared_data
def test_ztf_nan_cutout_is_filled_and_counted():
    (rec, row), = _ztf_records(lambda r: r["cutoutScience_nnan"] not in ("0.0", "")
                               and float(r["cutoutScience_nnan"]) < 1000)
    x, flags = normalise_triplet(*_ztf_triplet(rec))
    assert np.all(np.isfinite(x))
    assert flags.n_nan[0] == int(float(row["cutoutScience_nnan"]))


def test_the_generator_path_does_not_import_torch():
    """The generator's modules and the stream stages but classify do not import torch.

    The training-set generator runs in worker processes, and the stream stages but classify run
    without torch: none of these modules may import it.
    """
    code = ("import sys, broker.normalise, broker.pipeline, broker.subtract, broker.anomaly, "
            "broker.alert, broker.training, broker.training.generate; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False", out.stderr


def test_fill_values_are_read_as_missing_like_nan():
    """ZTF fills uncovered reference strips with 0 and masked ones with -3.4e38; ours leave NaN."""
    from broker.normalise import fill_pixels

    rng = np.random.default_rng(4)
    sci, diff = rng.normal(300, 10, (63, 63)), rng.normal(0, 10, (63, 63))
    ref = rng.normal(300, 10, (63, 63))
    as_nan = ref.copy()
    as_nan[:, :12] = np.nan
    for fill in (0.0, -3.4028235e38):
        filled = ref.copy()
        filled[:, :12] = fill
        assert fill_pixels(filled).sum() == 63 * 12
        got, flags = normalise_triplet(sci, filled, diff)
        want, _ = normalise_triplet(sci, as_nan, diff)
        assert np.array_equal(got, want) and flags.n_nan[1] == 63 * 12
        as_data, _ = normalise_triplet(sci, filled, diff, NormaliseConfig(blank_fill=False))
        assert as_data[1, :, :12].max() < -10  # read as data: a block far below the sky


def test_zeros_that_are_data_are_kept():
    from broker.normalise import fill_pixels

    rng = np.random.default_rng(5)
    noisy = np.round(rng.normal(0, 3, (63, 63)))  # an integer stamp: ~13 % exact zeros, scattered
    assert (noisy == 0).mean() > 0.1 and not fill_pixels(noisy).any()
    template = np.zeros((63, 63))
    template[30:33, 30:33] = 5.0  # all zero but a few pixels: not fill (nothing would be left)
    assert not fill_pixels(template).any()
    x, _ = normalise_triplet(noisy + 100, template, noisy)
    assert np.isfinite(x).all()
