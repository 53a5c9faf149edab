"""Detector defects and cosmic rays."""

from __future__ import annotations

import numpy as np

from broker.defects import bad_columns
from broker.simulate.render import line_profile


def test_bad_columns_finds_weak_defect_columns_but_not_trails():
    rng = np.random.default_rng(3)
    img = rng.normal(0.0, 20.0, (1024, 1024)).astype(np.float32)
    img[300:, 400] += 80.0  # hot column from row 300: 4 sigma per pixel, below any per-pixel cut
    img[:, 700] -= 60.0  # a cold one
    flat, vals = line_profile(img.shape, 100.0, 0.0, 190.0, 1023.0, 1.3, 3000.0)  # steep trail
    img.reshape(-1)[flat] += vals.astype(np.float32)
    m = bad_columns(img, 20.0)
    assert m[384:, 400].all() and m[:, 700].all()
    assert not m[:, 90:200].any()  # the trail is not a column
    assert m.sum() <= 1024 + 1024 - 256  # nothing else
