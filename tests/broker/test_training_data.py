"""Tests of broker.training.data: synthetic triplets and the split by field."""

from __future__ import annotations

import numpy as np

from broker.training.data import split_indices, synth_triplets


def test_split_by_group_keeps_groups_whole():
    groups = np.repeat([f"F{i}" for i in range(10)], 7)
    tr, va = split_indices(groups, 0.2, seed=1)
    assert len(tr) + len(va) == 70 and not set(groups[tr]) & set(groups[va])
    assert len(set(groups[va])) == 2


def test_synth_is_reproducible():
    a, la, ka = synth_triplets(6, seed=4)
    b, lb, kb = synth_triplets(6, seed=4)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and ka == kb
