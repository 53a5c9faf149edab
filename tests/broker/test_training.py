"""Tests of broker.training: labelling, shards, metrics, split, augmentation, a tiny training run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from broker.candidate import Candidate, Detection
from broker.training import (
    TrainConfig,
    TrainingSetConfig,
    _augment,
    evaluate,
    iter_synthetic_candidates,
    label_candidates,
    load_training_set,
    split_indices,
    synth_triplets,
    train,
    write_training_set,
)


def _cand(x, y, ref_dist=np.inf):
    det = Detection(x, y, 0, 0, 100, 10, 10, 10, 2.5, 1, 0, 0, ref_dist, 0)
    z = np.zeros((63, 63), np.float32)
    return Candidate(f"f/{x}", det, z, z, z)


def test_label_candidates_by_position():
    inj = [SimpleNamespace(kind="transient", x=100.0, y=100.0, source_id="T1"),
           SimpleNamespace(kind="cosmic_ray", x=100.5, y=100.0, source_id="C1"),
           SimpleNamespace(kind="hot_pixel", x=300.0, y=50.0, source_id="H1")]
    cands = [_cand(100.6, 100.0), _cand(301.0, 50.5), _cand(500, 500, ref_dist=0.5),
             _cand(700, 700), _cand(302.0, 50.0)]
    lab = [(l, k) for l, k, _ in label_candidates(cands, inj, match_radius=1.5)]
    # real wins over an artifact within the radius; unmatched -> residual/noise by ref_dist
    assert lab == [(1, "transient"), (0, "hot_pixel"), (0, "residual"), (0, "noise"),
                   (0, "noise")]


def test_evaluate_metrics():
    s = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1])
    y = np.array([1, 1, 1, 0, 0, 0])
    m = evaluate(s, y, 0.5, kinds=["t", "t", "t", "cr", "cr", "hp"])
    assert m["fnr"] == pytest.approx(1 / 3) and m["fpr"] == pytest.approx(1 / 3)
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["per_kind"]["cr"]["misclassified"] == pytest.approx(0.5)


def test_split_by_group_keeps_groups_whole():
    groups = np.repeat([f"F{i}" for i in range(10)], 7)
    tr, va = split_indices(groups, 0.2, seed=1)
    assert len(tr) + len(va) == 70 and not set(groups[tr]) & set(groups[va])
    assert len(set(groups[va])) == 2


def test_augment_is_a_symmetry():
    x = torch.arange(2 * 3 * 63 * 63, dtype=torch.float32).reshape(2, 3, 63, 63)
    y = _augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    for a, b in zip(x, y):
        assert torch.equal(torch.sort(a.flatten()).values, torch.sort(b.flatten()).values)
        assert b[:, 31, 31].tolist() == a[:, 31, 31].tolist()  # the centre stays the centre


def test_synth_is_reproducible():
    a, la, ka = synth_triplets(6, seed=4)
    b, lb, kb = synth_triplets(6, seed=4)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and ka == kb


def test_shards_roundtrip_and_tiny_training(tmp_path):
    cfg = TrainingSetConfig(shard_size=100, seed=2)
    man = write_training_set(tmp_path, iter_synthetic_candidates(240, seed=2), cfg, "synthetic")
    assert man["n"] == man["n_real"] + man["n_bogus"] and len(man["shards"]) >= 2
    assert json.loads((tmp_path / "manifest.json").read_text())["seed"] == 2
    # balanced: at most max_bogus_ratio bogus per real
    assert man["n_bogus"] <= man["n_real"]
    data = load_training_set(tmp_path)
    assert data["x"].shape == (man["n"], 3, 63, 63) and data["x"].dtype == np.float32
    clf, report = train(data, TrainConfig(max_epochs=1, batch_size=32), progress=True)
    assert report["epochs_run"] == 1 and 0 <= report["val"]["auc"] <= 1
    s = clf.score(data["x"][:4])
    assert s.shape == (4,) and np.all((s >= 0) & (s <= 1))


def test_label_extended_artifacts_by_segment():
    trail = SimpleNamespace(kind="satellite", x=500.0, y=500.0, source_id="S",
                            x0=0.0, y0=0.0, x1=1000.0, y1=1000.0)
    col = SimpleNamespace(kind="hot_column", x=20.0, y=600.0, source_id="H",
                          x0=20.0, y0=200.0, x1=20.0, y1=1000.0)
    lab = [k for _, k, _ in label_candidates([_cand(100.5, 100.0), _cand(20.3, 250.0)],
                                              [trail, col])]
    assert lab == ["satellite", "hot_column"]
