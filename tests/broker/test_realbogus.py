"""Tests of broker.realbogus: the network, loading and scoring, the shipped weights.

Normalisation is tested in test_normalise.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from broker import MODELS_DIR
from broker.candidate import Candidate, Detection
from broker.errors import ConfigError, CutoutError, ModelError
from broker.normalise import NormaliseConfig
from broker.realbogus import DEFAULT_VERSION, RealBogusClassifier, RealBogusNet, RealBogusNetV2

#: Every shipped version must keep loading and scoring: the default, the previous one kept for
#: comparison, and the default adapted to ZTF (``realbogus-v12``, batch-norm statistics only).
SHIPPED = ("realbogus-v10", "realbogus-v11", "realbogus-v12")


def _noise(shape=(63, 63), seed=0, sky=500.0):
    rng = np.random.default_rng(seed)
    return (sky + rng.normal(0, 20, shape)).astype(np.float32)


# --- input ----------------------------------------------------------------------------------------
def test_bad_normalise_settings_in_a_sidecar_are_refused(tmp_path):
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


def test_raw_triplets_with_nan_or_inf_are_refused_not_scored_nan():
    clf = RealBogusClassifier(RealBogusNetV2(), "t")
    x = np.zeros((4, 3, 63, 63), np.float32)
    assert np.isfinite(clf.score(x)).all()
    for bad in (np.nan, np.inf):
        x[2, 0, 10, 10] = bad  # a raw stamp's masked pixel: the network would answer NaN
        with pytest.raises(CutoutError, match="1 triplet.*number 2"):
            clf.score(x)


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
    """Candidates of one small simulated frame through the project's reference + subtraction.

    Labelled from the truth: {kind: [Candidate]} (the data the shipped model is trained on).
    """
    pytest.importorskip("broker.subtract")
    from broker.reference import ReferenceConfig, build_reference
    from broker.simulate import SimConfig, SkySimulator
    from broker.subtract import SubtractConfig, subtract_and_detect
    from broker.training.labels import label_candidates

    # many cosmic rays, subtracted without interpolating them (as when the cleaning misses some
    # on a real frame: the training set has such frames too)
    sim = SkySimulator(SimConfig(shape=(512, 512), n_transients=20, n_cosmic_rays=400), seed=11)
    ref = build_reference([sim.frame("F001", "r", e)[0] for e in range(3)], ReferenceConfig())
    frame, truth = sim.frame("F001", "r", 3)
    cands = subtract_and_detect(frame, ref, SubtractConfig(cosmic_ray_sigma=0.0)).candidates
    out: dict[str, list] = {}
    for c, (_, kind, inj) in zip(cands, label_candidates(cands, truth.injections), strict=True):
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
    """On a fresh simulated frame (seed unseen in training) most reals pass, most artifacts fail the 0.5 cut.

    The held-out numbers are in the model cards (broker/models/realbogus-v*.md).
    """
    real = [c for k in ("transient", "variable", "moving") for c, _ in pipeline_candidates.get(k, [])]
    bogus = [c for k in ("cosmic_ray", "hot_pixel", "hot_column")
             for c, _ in pipeline_candidates.get(k, [])]
    assert np.mean(shipped.score_candidates(real) >= 0.5) > 0.8
    assert np.mean(shipped.score_candidates(bogus) < 0.5) > 0.8


def test_the_ztf_adaptation_differs_from_its_base_only_in_batch_norm_statistics():
    base, adapted = RealBogusClassifier.load("realbogus-v11"), RealBogusClassifier.load("realbogus-v12")
    b, a = base.net.state_dict(), adapted.net.state_dict()
    assert b.keys() == a.keys()
    stats = [k for k in b if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(b[k], a[k]) for k in stats)
    assert all(torch.equal(b[k], a[k]) for k in b if k not in stats and "num_batches" not in k)
    assert adapted.metadata["adapted"]["base"] == "realbogus-v11"
