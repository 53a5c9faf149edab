"""Tests of broker.training.labels: labels by position, relative changes, dipole lobes."""

from __future__ import annotations

from dataclasses import replace as dataclasses_replace
from types import SimpleNamespace

import numpy as np
import pytest

from broker.candidate import Candidate, Detection
from broker.training.labels import (
    dipole_unseen,
    label_candidates,
    opposite_lobe_snr,
    relative_to_reference,
)
from broker.training.settings import TrainingSetConfig


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
    lab = [(y, k) for y, k, _ in label_candidates(cands, inj, match_radius=1.5)]
    # real wins over an artifact within the radius; unmatched -> residual/noise by ref_dist
    assert lab == [(1, "transient"), (0, "hot_pixel"), (0, "residual"), (0, "noise"),
                   (0, "noise")]


def test_variable_change_is_taken_against_the_reference():
    from broker.simulate import Injection

    def var(flux, snr, sid="V1"):
        return Injection(kind="variable", x=10.0, y=10.0 if sid != "V9" else 90.0, ra=0.0, dec=0.0, flux=flux, snr=snr,
                         on_galaxy=False, source_id=sid)

    # reference epochs at +100 ADU (S/N 10, i.e. sigma 10) and +40 ADU (sigma 20): weights 4:1
    ref = [var(100.0, 10.0), var(40.0, 2.0), var(500.0, 50.0, sid="V2")]
    now = relative_to_reference([var(98.0, 9.8), var(-50.0, -5.0, sid="V9")], ref)
    mean = (4 * 100.0 + 40.0) / 5
    assert now[0].flux == pytest.approx(98.0 - mean)
    assert now[0].snr == pytest.approx((98.0 - mean) / np.hypot(10.0, np.sqrt(400.0 / 5)))
    assert now[1] == var(-50.0, -5.0, sid="V9")  # not in the reference epochs: as given
    # a change too faint to have made the detection does not label it real
    cands = [_cand(10.2, 10.0, ref_dist=0.3)]
    assert label_candidates(cands, now, min_real_snr=3.0)[0][:2] == (0, "residual")
    assert label_candidates(cands, now, min_real_snr=0.0)[0][:2] == (1, "variable")


def test_label_extended_artifacts_by_segment():
    trail = SimpleNamespace(kind="satellite", x=500.0, y=500.0, source_id="S",
                            x0=0.0, y0=0.0, x1=1000.0, y1=1000.0)
    col = SimpleNamespace(kind="hot_column", x=20.0, y=600.0, source_id="H",
                          x0=20.0, y0=200.0, x1=20.0, y1=1000.0)
    lab = [k for _, k, _ in label_candidates([_cand(100.5, 100.0), _cand(20.3, 250.0)],
                                              [trail, col])]
    assert lab == ["satellite", "hot_column"]


def test_opposite_lobe_tells_a_dipole_from_a_blob():
    rng = np.random.default_rng(0)
    yy, xx = np.indices((63, 63))

    def psf(x0, f):
        return f * np.exp(-((xx - x0) ** 2 + (yy - 31) ** 2) / (2 * 1.5**2))

    for _ in range(5):
        noise = rng.normal(0, 1, (63, 63))
        assert opposite_lobe_snr(psf(31, 10) + noise) < 4.0
        assert opposite_lobe_snr(-psf(31, 10) + noise) < 4.0
        assert opposite_lobe_snr(psf(31, 10) - psf(32.5, 10) + noise) > 6.0
        assert opposite_lobe_snr(psf(32.5, 10) - psf(31, 10) + noise) > 6.0


def test_a_dipole_is_bogus_only_when_its_stamp_shows_both_lobes():
    yy, xx = np.indices((63, 63))
    noise = np.random.default_rng(0).normal(0, 1, (63, 63))

    def psf(x0, f):
        return f * np.exp(-((xx - x0) ** 2 + (yy - 31) ** 2) / (2 * 1.5**2))

    lopsided = psf(31, 100) - psf(33.5, 15) + noise  # opposite lobe ~0.15 of the central one
    even = psf(31, 50) - psf(33.5, 50) + noise
    cfg = TrainingSetConfig(min_dipole_lobe_snr=4.0, min_dipole_lobe_ratio=0.4)
    assert dipole_unseen(lopsided, cfg) and not dipole_unseen(even, cfg)
    assert not dipole_unseen(lopsided, dataclasses_replace(cfg, min_dipole_lobe_ratio=0.0))
