"""Tests of broker.training.finetune and broker.training.adapt on small seeded synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from broker.errors import ConfigError, InvalidLabel, ModelError
from broker.labelsfile import VettedLabel, write_labels
from broker.normalise import normalise_triplet
from broker.realbogus import RealBogusClassifier, RealBogusEnsemble, build_net
from broker.training.adapt import MIN_TRIPLETS, adapt_batchnorm
from broker.training.data import iter_synthetic_candidates, synth_triplets
from broker.training.finetune import FineTuneConfig, fine_tune, main_finetune
from broker.training.settings import TrainingSetConfig
from broker.training.shards import write_training_set
from tests.helpers import gz_fits, write_avro, ztf_packet

FAST = FineTuneConfig(epochs=2, batch_size=16, lr=1e-3)


def _clf(seed: int = 0) -> RealBogusClassifier:
    torch.manual_seed(seed)
    net = RealBogusEnsemble([build_net({"name": "RealBogusNetV2", "width": 4, "dense": 8})
                             for _ in range(2)])
    return RealBogusClassifier(net, "rb-test", {"note": "tiny"})


def _data(n: int, seed: int) -> dict[str, np.ndarray]:
    raw, y, kinds = synth_triplets(n, seed)
    x = np.stack([normalise_triplet(*t)[0] for t in raw]).astype(np.float16)
    return {"x": x, "y": y.astype(np.uint8), "kind": np.array(kinds)}


def _params(clf: RealBogusClassifier) -> list[torch.Tensor]:
    return [p.detach().clone() for p in clf.net.parameters()]


def test_fine_tune_moves_the_weights_and_l2sp_holds_them_back():
    clf, new, sim = _clf(), _data(48, 1), _data(48, 2)
    before = _params(clf)
    free, rep = fine_tune(clf, new, sim, FineTuneConfig(epochs=2, batch_size=16, lr=1e-3, l2sp=0))
    held, rep_held = fine_tune(clf, new, sim, FineTuneConfig(epochs=2, batch_size=16, lr=1e-3,
                                                            l2sp=10.0))
    assert all(torch.equal(a, b) for a, b in zip(before, _params(clf), strict=True))  # copy
    assert rep["l2sp_distance"] > 0 and rep_held["l2sp_distance"] < rep["l2sp_distance"]
    assert free.version == "rb-test-ft" and free.metadata["fine_tune"]["n_new"] == 48
    assert len(rep["loss"]) == 2 and np.isfinite(rep["loss"]).all()
    s = free.score(new["x"].astype(np.float32))
    assert s.shape == (48,) and np.isfinite(s).all()


def test_fine_tune_refuses_one_class_or_missing_rehearsal_data():
    clf, d = _clf(), _data(32, 1)
    one = {"x": d["x"][d["y"] == 1], "y": d["y"][d["y"] == 1]}
    with pytest.raises(ModelError, match="real and bogus"):
        fine_tune(clf, one, d, FAST)
    with pytest.raises(ModelError, match="simulated"):
        fine_tune(clf, d, {"x": d["x"][:0], "y": d["y"][:0]}, FAST)
    for bad in ({"epochs": 0}, {"sim_fraction": 1.0}, {"l2sp": -1.0}, {"lr": 0.0}):
        with pytest.raises(ConfigError):
            FineTuneConfig(**bad)


def test_adapt_batchnorm_sets_statistics_not_weights():
    clf = _clf()
    x = _data(MIN_TRIPLETS, 3)["x"].astype(np.float32) * 3 + 1  # another "telescope"
    ad = adapt_batchnorm(clf, x, "rb-adapted")
    assert all(torch.equal(a, b) for a, b in zip(_params(clf), _params(ad), strict=True))
    bn0 = next(m for m in clf.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn1 = next(m for m in ad.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(bn0.running_var, bn1.running_var)
    assert ad.metadata["adapted"]["n_triplets"] == MIN_TRIPLETS and not ad.net.training
    with pytest.raises(ModelError, match=">= 200"):
        adapt_batchnorm(clf, x[:10])


def _labels_file(path, n: int = 60, seed: int = 5) -> None:
    raw, y, _ = synth_triplets(n, seed)
    write_labels(path, [VettedLabel(f"c{i}", f"obj{i // 2}", int(y[i]), *raw[i], labeller="op",
                                    labelled_at=1.8e9 + i, telescope="T1") for i in range(n)])


def _set(path, n: int, seed: int) -> None:
    write_training_set(path, iter_synthetic_candidates(n, seed),
                       TrainingSetConfig(target_n=n, seed=seed, shard_size=64), source="synthetic")


def test_main_finetune_on_a_labels_file_writes_weights_and_a_card(tmp_path):
    _labels_file(tmp_path / "labels.npz")
    _set(tmp_path / "mix", 64, 0)
    _set(tmp_path / "test", 64, 1)
    _clf().save(tmp_path / "base")
    res = main_finetune(tmp_path / "labels.npz", base=str(tmp_path / "base.pt"), version="rb-t1",
                        out_dir=tmp_path / "out", mix_dir=tmp_path / "mix",
                        test_dir=tmp_path / "test", dev_dir=tmp_path / "no-dev", config=FAST)
    assert set(res["before"]) == {"sim", "labels"} == set(res["after"])
    assert res["source"]["labels"]["telescopes"] == ["T1"]
    assert 0 < res["source"]["labels"]["n_held_out"] < 60
    card = (tmp_path / "out" / "rb-t1.md").read_text()
    assert "held-out simulated FNR = FPR" in card and "held-out labels AUC" in card
    assert "--labels labels.npz" in card
    loaded = RealBogusClassifier.load(tmp_path / "out" / "rb-t1.pt")
    side = json.loads((tmp_path / "out" / "rb-t1.json").read_text())
    assert loaded.version == "rb-t1" and "after" in side["evaluation_guard"]


def test_main_finetune_refuses_a_bad_labels_file_and_nothing_to_do(tmp_path):
    _set(tmp_path / "mix", 64, 0)
    _set(tmp_path / "test", 64, 1)
    _clf().save(tmp_path / "base")
    kw = dict(base=str(tmp_path / "base.pt"), out_dir=tmp_path / "out", mix_dir=tmp_path / "mix",
              test_dir=tmp_path / "test", dev_dir=tmp_path / "no-dev", config=FAST)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(InvalidLabel):
        main_finetune(tmp_path / "bad.npz", **kw)
    with pytest.raises(ModelError, match="nothing to adapt"):
        main_finetune(None, **kw)


def test_main_finetune_never_adapts_on_the_dev_set(tmp_path):
    _set(tmp_path / "mix", 64, 0)
    _set(tmp_path / "test", 64, 1)
    _clf().save(tmp_path / "base")
    (tmp_path / "dev").mkdir()
    with pytest.raises(ModelError, match="evaluation only"):
        main_finetune(None, base=str(tmp_path / "base.pt"), out_dir=tmp_path / "out",
                      mix_dir=tmp_path / "mix", test_dir=tmp_path / "test",
                      dev_dir=tmp_path / "dev", adapt_dir=tmp_path / "dev", config=FAST)


def test_main_finetune_adapting_to_alerts_guards_their_real_pixels(tmp_path):
    """With --adapt, the card gives the telescope's real-pixel figures before and after."""
    from broker.training.realpixels import moffat

    rng = np.random.default_rng(9)
    packets = []
    for i in range(MIN_TRIPLETS):
        ref = rng.normal(300.0, 10.0, (63, 63)) + 3e4 * moffat((63, 63), 15, 45, 2.5)
        sci = ref + rng.normal(0.0, 10.0, (63, 63)) + 2e3 * moffat((63, 63), 31, 31, 2.5)
        packets.append(ztf_packet(i, [gz_fits(a) for a in (sci, ref, sci - ref)]))
    (tmp_path / "alerts").mkdir()
    write_avro(tmp_path / "alerts" / "night.avro", packets)
    _set(tmp_path / "mix", 64, 0)
    _set(tmp_path / "test", 64, 1)
    _clf().save(tmp_path / "base")
    res = main_finetune(None, base=str(tmp_path / "base.pt"), version="rb-t2",
                        out_dir=tmp_path / "out", mix_dir=tmp_path / "mix",
                        test_dir=tmp_path / "test", dev_dir=tmp_path / "no-dev",
                        adapt_dir=tmp_path / "alerts", config=FAST)
    for when in ("before", "after"):
        rp = res[when]["real_pixels"]
        assert rp["n_stamps"] == MIN_TRIPLETS and rp["n_injected"] == 2 * MIN_TRIPLETS
    card = (tmp_path / "out" / "rb-t2.md").read_text()
    assert "real pixels: injections kept, S/N 5-10" in card and "--adapt" in card
