"""Tests of broker.training.trainer: a tiny training run, ensembles, bf16."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from broker.errors import ConfigError
from broker.realbogus import RealBogusClassifier
from broker.training.data import iter_synthetic_candidates, load_training_set
from broker.training.settings import TrainingSetConfig
from broker.training.shards import write_training_set
from broker.training.trainer import TrainConfig, train


def test_shards_roundtrip_and_tiny_training(tmp_path):
    cfg = TrainingSetConfig(shard_size=100, seed=2)
    man = write_training_set(tmp_path, iter_synthetic_candidates(240, seed=2), cfg, "synthetic")
    assert man["n"] == man["n_real"] + man["n_bogus"] and len(man["shards"]) >= 2
    assert json.loads((tmp_path / "manifest.json").read_text())["seed"] == 2
    # balanced: at most max_bogus_ratio bogus per real
    assert man["n_bogus"] <= man["n_real"]
    data = load_training_set(tmp_path)
    assert data["x"].shape == (man["n"], 3, 63, 63) and data["x"].dtype == np.float32
    # one thread throughout: the automatic count follows the machine's load, and the bit-equality
    # of the seed-0 member and the single network below needs the same reduction order
    clf, report = train(data, TrainConfig(max_epochs=1, batch_size=32, members=1, threads=1),
                        progress=True)
    assert report["epochs_run"] == 1 and 0 <= report["val"]["auc"] <= 1
    s = clf.score(data["x"][:4])
    assert s.shape == (4,) and np.all((s >= 0) & (s <= 1))
    # an ensemble: members of other seeds, its logit their mean, saved and loaded as one model
    ens, rep2 = train(data, TrainConfig(max_epochs=1, batch_size=32, members=2, threads=1),
                      progress=False)
    assert [m["seed"] for m in rep2["members"]] == [0, 1] and rep2["epochs_run"] == 2
    # each member held out its own fields; the validation metrics pool them
    n_val = [m["n_val"] for m in rep2["members"]]
    assert rep2["val"]["n_real"] + rep2["val"]["n_bogus"] == sum(n_val)
    shared = train(data, TrainConfig(max_epochs=1, batch_size=32, members=2, member_splits=False,
                                     threads=1), progress=False)[1]
    assert [m["n_val"] for m in shared["members"]] == [n_val[0]] * 2
    assert shared["val"]["n_real"] + shared["val"]["n_bogus"] == n_val[0]
    first = ens.net.members[0]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 clf.net.state_dict().values(), strict=True))  # seed 0 = single
    x = torch.from_numpy(data["x"][:8])
    with torch.no_grad():
        mean = torch.stack([m(x) for m in ens.net.members]).mean(0)
        assert torch.allclose(ens.net(x), mean)
    back = RealBogusClassifier.load(ens.save(tmp_path / "ens"))
    assert np.allclose(back.score(data["x"][:8]), ens.score(data["x"][:8]), atol=2e-3)  # float16 file


def test_bf16_training_is_recorded_and_learns(tmp_path):
    write_training_set(tmp_path, iter_synthetic_candidates(600, seed=3),
                       TrainingSetConfig(shard_size=100, seed=3), "synthetic")
    data = load_training_set(tmp_path)
    fp32 = train(data, TrainConfig(max_epochs=3, batch_size=32, members=1, threads=1,
                                   precision="fp32"), progress=False)[1]
    bf16 = train(data, TrainConfig(max_epochs=3, batch_size=32, members=1, threads=1,
                                   precision="bf16"), progress=False)[1]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    # autocast changes the arithmetic, not what is learnt: both separate the easy synthetic set
    assert fp32["val"]["auc"] > 0.9 and bf16["val"]["auc"] > 0.9
    assert fp32["history"][-1]["train_loss"] != bf16["history"][-1]["train_loss"]
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp16")
