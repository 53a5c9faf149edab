"""Tests of broker.realbogus: normalisation (ours and real ZTF cutouts), stamps, shipped weights."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from broker.candidate import Candidate, Detection
from broker.errors import ConfigError, CutoutError, ModelError
from broker.realbogus import (
    DEFAULT_VERSION,
    MODELS_DIR,
    NormaliseConfig,
    RealBogusClassifier,
    RealBogusNet,
    RealBogusNetV2,
    alert_triplet,
    decode_stamp,
    normalise_triplet,
)

ZTF_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ztf_alerts"
#: Every shipped version must keep loading and scoring (v3 to v10 stay for comparison).
SHIPPED = ("realbogus-v3", "realbogus-v4", "realbogus-v5", "realbogus-v6", "realbogus-v10",
           "realbogus-v11")


def _noise(shape=(63, 63), seed=0, sky=500.0):
    rng = np.random.default_rng(seed)
    return (sky + rng.normal(0, 20, shape)).astype(np.float32)


# --- normalisation --------------------------------------------------------------------------------
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


def test_bad_normalise_settings_are_refused(tmp_path):
    for bad in ({"clip": -1.0}, {"soft_knee": float("nan")}, {"clip": "60"}):
        with pytest.raises(ConfigError, match="NormaliseConfig"):
            NormaliseConfig(**bad)
    clf = RealBogusClassifier(RealBogusNetV2(), "t")
    path = clf.save(tmp_path / "m")
    side = path.with_suffix(".json")
    for bad in ({"clip": -1.0}, {"bogus_key": 1}):
        meta = json.loads(side.read_text())
        meta["normalise"] = bad
        side.write_text(json.dumps(meta))
        with pytest.raises(ModelError, match="normalise"):
            RealBogusClassifier.load(path)


def test_a_model_clamps_its_input_to_its_own_clip():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 20, (8, 3, 63, 63)).astype(np.float32)  # many values beyond 30
    net = RealBogusNetV2()
    old = RealBogusClassifier(net, "t", norm_config=NormaliseConfig(clip=30.0))
    new = RealBogusClassifier(net, "t")
    assert np.array_equal(old.score(x), new.score(np.clip(x, -30, 30)))
    assert not np.array_equal(old.score(x), new.score(x))


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


# --- stamps ---------------------------------------------------------------------------------------
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
    rows = [r for r in csv.DictReader(open(ZTF_DIR / "index.csv")) if predicate(r)]
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
        for rec, _ in _ztf_records(lambda r: r["isdiffpos"] == flag and r["cutoutScience_nnan"]
                                   == "0.0" and r["cutoutScience_shape"] == "63x63", n=3):
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


# --- classifier -----------------------------------------------------------------------------------
def test_missing_and_corrupt_weights_raise_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        RealBogusClassifier.load(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    (tmp_path / "bad.json").write_text('{"version": "bad"}')
    with pytest.raises(ModelError, match="corrupt"):
        RealBogusClassifier.load(tmp_path / "bad.pt")


@pytest.mark.parametrize("net", [RealBogusNet, RealBogusNetV2])
def test_save_load_roundtrip(tmp_path, net):
    clf = RealBogusClassifier(net().eval(), "test-v0", {"note": "untrained"})
    clf.save(tmp_path / "test-v0")
    back = RealBogusClassifier.load(tmp_path / "test-v0.pt")
    x = np.random.default_rng(0).normal(size=(5, 3, 63, 63)).astype(np.float32)
    assert back.version == "test-v0" and type(back.net) is net
    # stored as float16: the weights come back exactly as rounded, the scores within 2e-3
    for k, v in clf.net.state_dict().items():
        want = v.half().float() if v.is_floating_point() else v
        assert torch.equal(back.net.state_dict()[k], want), k
    np.testing.assert_allclose(back.score(x), clf.score(x), atol=2e-3)


def test_dihedral_views_make_the_score_rotation_invariant():
    from broker.realbogus import ScoreConfig

    torch.manual_seed(0)
    net = RealBogusNetV2().eval()
    x = np.random.default_rng(1).normal(size=(6, 3, 63, 63)).astype(np.float32)
    rot = np.ascontiguousarray(np.rot90(x, 1, axes=(2, 3)))
    mirror = np.ascontiguousarray(x[..., ::-1])
    plain = RealBogusClassifier(net, "t")
    assert np.max(np.abs(plain.score(rot) - plain.score(x))) > 1e-4  # an untrained net is not
    four = RealBogusClassifier(net, "t", config=ScoreConfig(views=4))
    np.testing.assert_allclose(four.score(rot), four.score(x), atol=1e-5)
    eight = RealBogusClassifier(net, "t", config=ScoreConfig(views=8))
    np.testing.assert_allclose(eight.score(mirror), eight.score(x), atol=1e-5)
    with pytest.raises(ConfigError, match="views"):
        ScoreConfig(views=3)


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    weights = MODELS_DIR / f"{request.param}.pt"
    if not weights.is_file():
        pytest.fail(f"shipped weights missing: {weights}")
    return RealBogusClassifier.load(request.param)


def test_default_version_is_shipped():
    assert DEFAULT_VERSION in SHIPPED and RealBogusClassifier.load().version == DEFAULT_VERSION


def test_shipped_weights_load_and_score(shipped):
    assert shipped.version in SHIPPED
    x = np.random.default_rng(0).normal(size=(7, 3, 63, 63)).astype(np.float32)
    s = shipped.score(x)
    assert s.shape == (7,) and np.all((s >= 0) & (s <= 1))
    assert (MODELS_DIR / f"{shipped.version}.pt").stat().st_size < 1.5e6


@pytest.fixture(scope="module")
def pipeline_candidates():
    """Candidates of one small simulated frame through the project's reference + subtraction,
    labelled from the truth: {kind: [Candidate]} (the data the shipped model is trained on)."""
    pytest.importorskip("broker.subtract")
    from broker.reference import ReferenceConfig, build_reference
    from broker.simulate import SimConfig, SkySimulator
    from broker.subtract import SubtractConfig, subtract_and_detect
    from broker.training import label_candidates

    # many cosmic rays, subtracted without interpolating them (as when the cleaning misses some
    # on a real frame: the training set has such frames too)
    sim = SkySimulator(SimConfig(shape=(512, 512), n_transients=20, n_cosmic_rays=400), seed=11)
    ref = build_reference([sim.frame("F001", "r", e)[0] for e in range(3)], ReferenceConfig())
    frame, truth = sim.frame("F001", "r", 3)
    cands = subtract_and_detect(frame, ref, SubtractConfig(cosmic_ray_sigma=0.0)).candidates
    out: dict[str, list] = {}
    for c, (_, kind, inj) in zip(cands, label_candidates(cands, truth.injections)):
        out.setdefault(kind, []).append((c, inj))
    return out


def test_known_real_and_cosmic_ray_on_the_right_sides(shipped, pipeline_candidates):
    transients = [c for c, inj in pipeline_candidates.get("transient", []) if abs(inj.snr) > 15]
    crs = sorted((c for c, inj in pipeline_candidates.get("cosmic_ray", [])),
                 key=lambda c: -c.detection.snr)
    assert transients and crs, {k: len(v) for k, v in pipeline_candidates.items()}
    real = shipped.score_candidates(transients[:1])[0]
    cr = shipped.score_candidates(crs[:1])[0]  # the brightest: unmistakable
    assert real > 0.5 > cr, (real, cr)


def test_score_candidates_sets_rb_and_skips_bad_cutouts(shipped):
    det = Detection(0, 0, 0, 0, 1, 1, 1, 1, 2, 1, 0, 0, np.inf, 0)
    good = Candidate("f/0", det, _noise(seed=1), _noise(seed=2), _noise(seed=3, sky=0))
    bad = Candidate("f/1", det, *(np.full((63, 63), np.nan, np.float32),) * 3)
    s = shipped.score_candidates([good, bad])
    assert 0 <= good.rb <= 1 and bad.rb is None and np.isnan(s[1])


def test_pipeline_frame_mostly_right(shipped, pipeline_candidates):
    """On a fresh simulated frame (seed unseen in training) most reals pass and most artifacts
    fail the 0.5 cut; the held-out numbers are in the model cards (models/realbogus-v*.md)."""
    real = [c for k in ("transient", "variable", "moving") for c, _ in pipeline_candidates.get(k, [])]
    bogus = [c for k in ("cosmic_ray", "hot_pixel", "hot_column")
             for c, _ in pipeline_candidates.get(k, [])]
    assert np.mean(shipped.score_candidates(real) >= 0.5) > 0.8
    assert np.mean(shipped.score_candidates(bogus) < 0.5) > 0.8
