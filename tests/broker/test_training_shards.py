"""Tests of broker.training.shards: the balanced shard writer."""

from __future__ import annotations

import numpy as np

from broker.training.labels import LabelledCandidate
from broker.training.shards import ShardWriter


def _lc(label, kind, group="F0"):
    return LabelledCandidate(np.zeros((3, 63, 63), np.float16), label, kind, group, 10.0)


def test_shard_writer_balances_and_keeps_rare_bogus_kinds(tmp_path):
    w = ShardWriter(tmp_path, shard_size=40, seed=0)
    items = [_lc(1, "transient") for _ in range(60)] + [_lc(0, "cosmic_ray") for _ in range(200)]
    items += [_lc(0, "satellite") for _ in range(5)] + [_lc(0, "dipole") for _ in range(3)]
    for i in np.random.default_rng(1).permutation(len(items)):
        w.add(items[i])
    w.close()
    assert w.n_real == w.n_bogus == 60
    # round-robin over kinds: every rare bogus candidate is written, cosmic rays fill the rest
    assert w.written["satellite"] == 5 and w.written["dipole"] == 3
    assert sum(np.load(tmp_path / s)["y"].size for s in w.shards) == 120
