"""Tests of broker.training: labelling, shards, metrics, split, augmentation, a tiny training run."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from broker.candidate import Candidate, Detection
from broker.errors import ConfigError, DatasetError
from broker.realbogus import RealBogusClassifier
from broker.training import (
    REFERENCE_STATES,
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


def test_variable_change_is_taken_against_the_reference():
    from broker.simulate import Injection
    from broker.training import relative_to_reference

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


def test_evaluate_metrics():
    s = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1])
    y = np.array([1, 1, 1, 0, 0, 0])
    m = evaluate(s, y, 0.5, kinds=["t", "t", "t", "cr", "cr", "hp"])
    assert m["fnr"] == pytest.approx(1 / 3) and m["fpr"] == pytest.approx(1 / 3)
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["per_kind"]["cr"]["misclassified"] == pytest.approx(0.5)


def test_by_sign_separates_brightenings_from_fadings():
    from broker.training import by_sign

    s = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3, 0.6, 0.4])
    y = np.array([1, 1, 0, 0, 1, 0, 0, 1])
    snr = np.array([8.0, 9.0, 7.0, 6.0, -8.0, -9.0, -7.0, -6.0])
    b = by_sign(s, y, snr)
    assert b["brightening"] == {"n": 4, "n_real": 2, "n_bogus": 2, "auc": 1.0, "eer": 0.0}
    # fadings: one real below one bogus, so 3 of 4 pairs in order and one error per class
    assert b["fading"]["auc"] == pytest.approx(0.75) and b["fading"]["eer"] == pytest.approx(0.5)
    assert np.isnan(by_sign(s[:2], y[:2], snr[:2])["brightening"]["auc"])  # one class only


def test_held_out_errors_split_by_reference_state_at_the_overall_threshold():
    from broker.training import evaluate_simulated

    s = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3, 0.6, 0.4])
    y = np.array([1, 1, 0, 0, 1, 0, 0, 1])
    ref = np.array(["as_built"] * 4 + ["misaligned"] * 4)
    res = evaluate_simulated(s, y, np.array(["k"] * 8), None, 0.5, ref)
    st = res["by_reference_state"]
    assert set(st) == {"as_built", "misaligned"}
    assert st["as_built"]["eer"] == 0.0 and st["as_built"]["fnr"] == st["as_built"]["fpr"] == 0.0
    # misaligned: the real at 0.4 and the bogus at 0.6 are on the wrong sides of the overall
    # equal-error threshold (all 8 candidates), one error per class
    t = res["eer_threshold"]
    assert 0.4 < t <= 0.6
    assert st["misaligned"]["fnr"] == pytest.approx(0.5) and st["misaligned"]["fpr"] == \
        pytest.approx(0.5)
    assert "by_reference_state" not in evaluate_simulated(s, y, np.array(["k"] * 8))


def test_lobe_ratio_table_counts_errors_by_the_stamps_dipole():
    from broker.realbogus import normalise_triplet
    from broker.training import by_lobe_ratio

    rng = np.random.default_rng(1)
    yy, xx = np.indices((63, 63))

    def psf(x0, f):
        return f * np.exp(-((xx - x0) ** 2 + (yy - 31) ** 2) / (2 * 1.5**2))

    blob, dipole = psf(31, 40), psf(31, 40) - psf(33, 40)  # ratios ~0 and ~1
    stamps = [blob, blob, dipole, dipole]
    x = np.stack([normalise_triplet(rng.normal(0, 1, (63, 63)), rng.normal(0, 1, (63, 63)),
                                    d + rng.normal(0, 1, (63, 63)))[0] for d in stamps])
    s, y = np.array([0.9, 0.2, 0.8, 0.1]), np.array([1, 1, 0, 0])
    bins = by_lobe_ratio(s, y, x, threshold=0.5)
    low, high = bins[0], bins[-1]
    assert (low["lo"], high["hi"]) == (0.0, np.inf)
    assert (low["n_real"], low["err_real"], low["n_bogus"]) == (2, 1, 0)
    assert (high["n_bogus"], high["err_bogus"], high["n_real"]) == (2, 1, 0)


def test_by_reference_brightness_bins_by_the_reference_source():
    from broker.training import by_reference_brightness

    x = np.zeros((6, 3, 63, 63), np.float32)
    x[:, 1, 29:34, 29:34] = np.array([0.5, 1.0, 10.0, 10.0, 30.0, 30.0])[:, None, None]
    x[4, 1, 31, 31] = 100.0  # one pixel of the 5x5 raises its mean from 30 to 32.8: same bin
    s = np.array([0.9, 0.2, 0.8, 0.3, 0.4, 0.6])
    y = np.array([1, 0, 1, 0, 1, 0])
    b = by_reference_brightness(s, y, x, 0.5, edges=(2.0, 20.0))
    assert [(d["lo"], d["hi"], d["n_real"], d["n_bogus"]) for d in b] == [
        (-np.inf, 2.0, 1, 1), (2.0, 20.0, 1, 1), (20.0, np.inf, 1, 1)]
    assert b[0]["pass_real"] == 1.0 and b[0]["pass_bogus"] == 0.0 and b[0]["auc"] == 1.0
    assert b[2]["pass_real"] == 0.0 and b[2]["pass_bogus"] == 1.0 and b[2]["auc"] == 0.0
    one = by_reference_brightness(s[:1], y[:1], x[:1], 0.5, edges=(2.0,))
    assert np.isnan(one[0]["auc"]) and np.isnan(one[1]["pass_real"])  # one class; empty bin


def test_paired_auc_difference():
    from sklearn.metrics import roc_auc_score

    from broker.training import paired_auc_difference

    rng = np.random.default_rng(1)
    y = rng.random(400) < 0.7
    good = rng.random(400) + 0.8 * y
    worse = good + rng.normal(0, 0.4, 400)  # the same model with noise added
    d = paired_auc_difference(y, good, worse, n_boot=500)
    assert d["delta"] == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, worse))
    assert 0 < d["lo"] < d["delta"] < d["hi"]  # clearly better: the interval excludes 0
    same = paired_auc_difference(y, good, good, n_boot=50)
    assert same["delta"] == same["lo"] == same["hi"] == 0
    assert np.isnan(paired_auc_difference(np.ones(5), good[:5], worse[:5])["delta"])


def test_promotion_reads_each_ztf_drop_against_its_own_interval():
    from broker.training import promotion_check

    def res(eer, drb, rb):
        sim = {"eer": eer, "at_threshold": {"auc": 0.99}}
        delta = {k: dict(zip(("delta", "lo", "hi"), v)) for k, v in (("drb", drb), ("rb", rb))}
        return {"sim": sim, "sim_compare": {"model": "old", "eer": 0.02,
                                            "at_threshold": {"auc": 0.99}},
                "ztf_compare": {"model": "old", "delta_auc": delta}}

    # a large drb drop on 9 negatives whose interval reaches 0 is noise; rb resolved and fine
    assert promotion_check(res(0.015, (-0.06, -0.15, 0.01), (0.004, -0.003, 0.012)))["promote"]
    # a small rb drop whose interval lies below 0 is not
    p = promotion_check(res(0.015, (0.0, -0.05, 0.05), (-0.008, -0.014, -0.002)))
    assert p["sim_better"] and not p["ztf_not_worse"] and not p["promote"]
    # worse on the held-out set: never, whatever ZTF says
    assert not promotion_check(res(0.025, (0.05, 0.0, 0.1), (0.02, 0.01, 0.03)))["promote"]
    # a reference without both classes (NaN interval) does not decide
    assert promotion_check(res(0.015, (np.nan,) * 3, (0.0, -0.01, 0.01)))["promote"]
    # a held-out set labelled otherwise than the old model's training data decides nothing
    other = res(0.015, (0.0, -0.05, 0.05), (0.004, -0.003, 0.012))
    other["sim_compare"]["labels_differ"] = ["dipole_lobe_kinds"]
    p = promotion_check(other)
    assert p["labels_differ"] == ["dipole_lobe_kinds"] and not p["promote"]


def test_label_settings_differ_reads_old_cards_by_the_settings_they_predate():
    from broker.training import TrainingSetConfig, label_settings_differ
    from broker.training.generate import _config_dict

    now = _config_dict(TrainingSetConfig())
    old_card = {k: v for k, v in now.items() if k != "dipole_lobe_kinds"}
    assert label_settings_differ(now, old_card) == []  # the added setting's old value is today's
    assert label_settings_differ(now, None) is None and label_settings_differ({}, now) is None
    assert label_settings_differ(now, ["not", "a", "config"]) is None  # a hostile card
    moved = _config_dict(TrainingSetConfig(dipole_lobe_kinds=("variable", "transient"),
                                           faint_trails_per_frame=3.0))  # not a label setting
    assert label_settings_differ(moved, now) == ["dipole_lobe_kinds"]
    assert label_settings_differ(now, {**now, "variable_dipole_lobe": (4, 0.25)}) == []


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
    assert y.is_contiguous(memory_format=torch.channels_last)  # the layout the nets train in


def test_augment_views_are_the_flips_and_rotations_it_draws():
    x = torch.randn(64, 3, 63, 63)
    y = _augment(x, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)  # the same draws, in the same order
    k, flip = torch.randint(0, 4, (64,), generator=gen), torch.rand(64, generator=gen) < 0.5
    for i in range(64):
        want = torch.rot90(x[i].flip(-1) if flip[i] else x[i], int(k[i]), dims=(-2, -1))
        assert torch.equal(y[i], want)
    assert len(set(zip(k.tolist(), flip.tolist()))) == 8  # every view drawn


def test_augment_truncates_and_masks_before_rotating():
    x = torch.ones(400, 3, 63, 63)
    y = _augment(x, torch.Generator().manual_seed(2), p_truncate=0.5, p_mask=0.5)
    assert torch.equal(x, torch.ones_like(x))  # the input is not modified
    zeroed = (y == 0).flatten(1).float().mean(1)
    assert 0.5 < (zeroed > 0).float().mean() < 0.95
    assert torch.all((y == 0).sum(1) % 3 == 0)  # a pixel is zeroed in all channels or none


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
                                                 clf.net.state_dict().values()))  # seed 0 = single
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


def test_label_extended_artifacts_by_segment():
    trail = SimpleNamespace(kind="satellite", x=500.0, y=500.0, source_id="S",
                            x0=0.0, y0=0.0, x1=1000.0, y1=1000.0)
    col = SimpleNamespace(kind="hot_column", x=20.0, y=600.0, source_id="H",
                          x0=20.0, y0=200.0, x1=20.0, y1=1000.0)
    lab = [k for _, k, _ in label_candidates([_cand(100.5, 100.0), _cand(20.3, 250.0)],
                                              [trail, col])]
    assert lab == ["satellite", "hot_column"]


# --- generator (pipeline-driven), shard writer, evaluation report ---------------------------------
def _lc(label, kind, group="F0"):
    from broker.training import LabelledCandidate

    return LabelledCandidate(np.zeros((3, 63, 63), np.float16), label, kind, np.zeros(2),
                             group, 10.0)


def test_shard_writer_balances_and_keeps_rare_bogus_kinds(tmp_path):
    from broker.training import ShardWriter

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


@pytest.fixture(scope="module")
def tiny_field():
    """Labelled candidates of one seeded 512x512 field, 2 science epochs, through the pipeline."""
    pytest.importorskip("broker.subtract")
    from broker.training import field_candidates

    cfg = TrainingSetConfig(shape=(512, 512), epochs_per_field=2, n_transients=40,
                            n_cosmic_rays=60.0, p_misalign=0.5, seed=3)
    return cfg, field_candidates(cfg, 0)


def test_residual_flux_scales_with_the_shift_and_the_star():
    from broker.training import residual_flux

    sigma_fwhm = 2.3548  # sigma = 1 px
    assert residual_flux(0.5, sigma_fwhm, 1e5) == pytest.approx(1e5 * 0.5 * np.exp(-0.5))
    assert residual_flux(5.0, sigma_fwhm, 1e5) == 1e5  # capped at the star
    assert residual_flux(0.0, sigma_fwhm, 1e5) == 0.0


def test_opposite_lobe_tells_a_dipole_from_a_blob():
    from broker.training import opposite_lobe_snr

    rng = np.random.default_rng(0)
    yy, xx = np.indices((63, 63))

    def psf(x0, f):
        return f * np.exp(-((xx - x0) ** 2 + (yy - 31) ** 2) / (2 * 1.5**2))

    for k in range(5):
        noise = rng.normal(0, 1, (63, 63))
        assert opposite_lobe_snr(psf(31, 10) + noise) < 4.0
        assert opposite_lobe_snr(-psf(31, 10) + noise) < 4.0
        assert opposite_lobe_snr(psf(31, 10) - psf(32.5, 10) + noise) > 6.0
        assert opposite_lobe_snr(psf(32.5, 10) - psf(31, 10) + noise) > 6.0


def test_variables_swamped_by_a_broken_reference_are_relabelled():
    from broker.training import field_candidates

    by_ratio = {}
    # every frame's reference misaligned; no faint trails, which relabel some variables too
    for ratio in ((0.0, 0.0), (0.5, 1.65)):
        cfg = TrainingSetConfig(shape=(512, 512), epochs_per_field=1, n_transients=40,
                                n_variables=150, p_misalign=1.0, seed=3, swamped_ratio=ratio,
                                min_dipole_lobe_snr=0.0, faint_trails_per_frame=0.0)
        by_ratio[ratio] = Counter((it.label, it.kind) for it in field_candidates(cfg, 0))
    old, new = by_ratio[(0.0, 0.0)], by_ratio[(0.5, 1.65)]
    assert new[(-1, "ambiguous_variable")] > 0 and old[(-1, "ambiguous_variable")] == 0
    moved = old[(1, "variable")] - new[(1, "variable")]
    assert moved == new[(-1, "ambiguous_variable")] + new[(0, "dipole")] - old[(0, "dipole")] \
        + new[(0, "saturated_residual")] - old[(0, "saturated_residual")]
    assert new[(1, "variable")] > 0, new  # clear changes on stars stay real
    assert new[(0, "dipole")] > old[(0, "dipole")], (old, new)
    # a blurred reference's residual looks like a change of the star: variables stay real
    cfg = TrainingSetConfig(shape=(512, 512), epochs_per_field=1, n_transients=40,
                            n_variables=150, p_misalign=0.0, p_psf_error=1.0, seed=3,
                            swamped_ratio=(0.5, 1.65))
    blurred = Counter((it.label, it.kind) for it in field_candidates(cfg, 0))
    assert blurred[(1, "variable")] > 10 and blurred[(-1, "ambiguous_variable")] == 0, blurred


def test_a_displacement_wave_makes_dipoles_a_global_shift_does_not():
    # the reference PSF is measured on the same stars at their science positions, so a global
    # shift moves it with them and ZOGY subtracts cleanly; a varying displacement cannot be
    from broker.training import field_candidates, lobe_snrs

    two_lobed = {}
    for wave in ((0.0, 0.0), (500.0, 1000.0)):
        cfg = TrainingSetConfig(shape=(512, 512), epochs_per_field=1, n_transients=40,
                                n_variables=0, p_misalign=1.0, misalign_px=(1.5, 2.0),
                                misalign_wavelength_px=wave, seed=3)
        dips = [it for it in field_candidates(cfg, 0) if it.kind == "dipole"]
        # the stamps are normalised (robust sigma units), so lobes read directly as sigma
        two_lobed[wave] = sum(lobe_snrs(it.triplet[2].astype(np.float32))[1] >= 4 for it in dips)
    assert two_lobed[(500.0, 1000.0)] >= 20 and two_lobed[(0.0, 0.0)] <= 2, two_lobed


def test_variables_showing_a_dipole_are_bogus_by_the_image_rule():
    from broker.training import field_candidates

    by_rule = {}
    for rule in ((0.0, 0.0), (4.0, 0.25)):
        cfg = TrainingSetConfig(shape=(512, 512), epochs_per_field=1, n_transients=40,
                                n_variables=300, p_misalign=1.0, misalign_px=(1.0, 2.0),
                                misalign_wavelength_px=(500.0, 1000.0), seed=3,
                                variable_dipole_lobe=rule, min_dipole_lobe_ratio=0.0,
                                faint_trails_per_frame=0.0)  # trails relabel variables too
        by_rule[rule] = Counter((it.label, it.kind) for it in field_candidates(cfg, 0))
    old, new = by_rule[(0.0, 0.0)], by_rule[(4.0, 0.25)]
    moved = old[(1, "variable")] - new[(1, "variable")]
    assert moved > 0 and new[(1, "variable")] > 0, (old, new)
    assert moved == new[(0, "dipole")] - old[(0, "dipole")] \
        + new[(0, "saturated_residual")] - old[(0, "saturated_residual")]
    # a lobe-ratio floor leaves the lopsided dipoles out, as ambiguous, and nothing else moves
    cfg = dataclasses_replace(cfg, variable_dipole_lobe=(4.0, 0.25), min_dipole_lobe_ratio=0.4)
    band = Counter((it.label, it.kind) for it in field_candidates(cfg, 0))
    left_out = band[(-1, "ambiguous_dipole")] - new[(-1, "ambiguous_dipole")]
    assert left_out > 0, (new, band)
    assert left_out == sum(new[(0, k)] - band[(0, k)] for k in ("dipole", "saturated_residual"))
    assert band[(1, "variable")] == new[(1, "variable")]


def test_transients_showing_a_dipole_follow_the_image_rule_when_asked():
    from broker.training import field_candidates

    by_kinds = {}
    for kinds in (("variable",), ("variable", "transient")):
        cfg = TrainingSetConfig(shape=(512, 512), epochs_per_field=1, n_transients=400,
                                transient_on_galaxy=1.0, n_variables=0, p_misalign=1.0, seed=3,
                                dipole_lobe_kinds=kinds, faint_trails_per_frame=0.0)
        by_kinds[kinds] = Counter((it.label, it.kind) for it in field_candidates(cfg, 0))
    old, new = by_kinds[("variable",)], by_kinds[("variable", "transient")]
    moved = old[(1, "transient")] - new[(1, "transient")]
    assert moved > 0 and new[(1, "transient")] > moved, (old, new)
    assert moved == sum(new[(0, k)] - old[(0, k)] for k in ("dipole", "saturated_residual"))


def test_a_dipole_is_bogus_only_when_its_stamp_shows_both_lobes():
    from broker.training.generate import _dipole_unseen

    yy, xx = np.indices((63, 63))
    noise = np.random.default_rng(0).normal(0, 1, (63, 63))

    def psf(x0, f):
        return f * np.exp(-((xx - x0) ** 2 + (yy - 31) ** 2) / (2 * 1.5**2))

    lopsided = psf(31, 100) - psf(33.5, 15) + noise  # opposite lobe ~0.15 of the central one
    even = psf(31, 50) - psf(33.5, 50) + noise
    cfg = TrainingSetConfig(min_dipole_lobe_snr=4.0, min_dipole_lobe_ratio=0.4)
    assert _dipole_unseen(lopsided, cfg) and not _dipole_unseen(even, cfg)
    assert not _dipole_unseen(lopsided, dataclasses_replace(cfg, min_dipole_lobe_ratio=0.0))


def test_trail_flux_is_what_a_psf_fit_sees_of_a_rendered_trail():
    from broker.simulate import render
    from broker.training import trail_flux

    fwhm = 3.0
    s = fwhm / 2.3548
    flat, vals = render.line_profile((101, 101), 0.0, 30.0, 100.0, 70.0, s, 200.0)
    img = np.zeros(101 * 101)
    np.add.at(img, flat, vals)
    img = img.reshape(101, 101)
    trail = SimpleNamespace(x0=0.0, y0=30.0, x1=100.0, y1=70.0, flux=float(vals.sum()))
    yy, xx = np.indices(img.shape)
    for d in (0.0, 1.5, 3.0):  # perpendicular offsets from the trail's middle
        x, y = 50.0 - d * 0.371, 50.0 + d * 0.928
        psf = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
        fit = float((psf * img).sum() / (psf * psf).sum() * psf.sum())  # flux of the fitted PSF
        assert trail_flux(x, y, [trail], fwhm) == pytest.approx(fit, rel=0.03)
    assert trail_flux(50.0, 0.0, [trail], fwhm) < 1e-6 * fit


def test_faint_trails_are_drawn_at_the_detection_limit():
    from broker.training.generate import (FAINT_TRAIL_BRIGHTNESS, TRAIL_BRIGHTNESS,
                                          add_science_artifacts)

    sky, fwhm = 400.0, 2.5
    for per_frame, faint, want in ((3.0, 0.0, TRAIL_BRIGHTNESS), (0.0, 3.0, FAINT_TRAIL_BRIGHTNESS)):
        cfg = TrainingSetConfig(hot_pixels_per_frame=0.0, bad_columns_per_frame=0.0,
                                trails_per_frame=per_frame, faint_trails_per_frame=faint)
        b = []
        for seed in range(4):
            frame = SimpleNamespace(data=np.zeros((300, 300), np.float32),
                                    meta=SimpleNamespace(saturation=6e4))
            for t in add_science_artifacts(frame, fwhm, sky, cfg, np.random.default_rng(seed)):
                assert t.kind == "satellite"
                # ADU per px of length in units of sky sigma * FWHM
                b.append(t.flux / np.hypot(t.x1 - t.x0, t.y1 - t.y0) / (np.sqrt(sky) * fwhm))
        assert len(b) >= 5
        assert want[0] * 0.95 <= min(b) and max(b) <= want[1] * 1.05, (want, b)


def test_training_set_config_rejects_negative_artifact_rates():
    from broker.errors import ConfigError

    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match="faint_trails_per_frame"):
            TrainingSetConfig(faint_trails_per_frame=bad)
    with pytest.raises(ConfigError, match="trails_per_frame"):
        TrainingSetConfig(trails_per_frame=-0.5)
    with pytest.raises(ConfigError, match="dipole_lobe_kinds"):
        TrainingSetConfig(dipole_lobe_kinds=("variable", "cosmic_ray"))


def test_transients_on_trails_are_labelled_by_the_trail_share():
    from broker.training import field_candidates

    by_share = {}
    for share in ((1.0, 1.0), (0.33, 0.67)):
        cfg = TrainingSetConfig(shape=(512, 512), epochs_per_field=1, n_transients=3000,
                                n_variables=0, trails_per_frame=6.0, p_misalign=0.0, seed=4,
                                trail_share=share)
        by_share[share] = Counter((it.label, it.kind) for it in field_candidates(cfg, 0))
    old, new = by_share[(1.0, 1.0)], by_share[(0.33, 0.67)]
    assert old[(-1, "ambiguous_trail")] == 0
    moved = old[(1, "transient")] - new[(1, "transient")]
    assert moved > 0, (old, new)  # some transients sit on a brighter trail
    assert moved == new[(-1, "ambiguous_trail")] + new[(0, "satellite")] - old[(0, "satellite")]
    assert new[(1, "transient")] > moved  # most are nowhere near one


def test_generator_labels_on_tiny_seeded_run(tiny_field):
    cfg, items = tiny_field
    kinds = {it.kind for it in items}
    # the detection rejects most cosmic rays and hot pixels itself; what passes is labelled
    assert "transient" in kinds and kinds - set(cfg.real_kinds), kinds
    for it in items:
        assert it.triplet.shape == (3, 63, 63) and it.triplet.dtype == np.float16
        # ambiguous ones (a lone blob beside a star of a misaligned reference, ...) are
        # counted, not written
        want = -1 if it.kind.startswith("ambiguous_") else int(it.kind in cfg.real_kinds)
        assert it.label == want, it.kind
        assert it.reference in REFERENCE_STATES.values()
    # the stars of a misaligned reference leave dipoles, and only there
    assert {it.reference for it in items if it.kind == "dipole"} <= {"misaligned"}
    c = 31
    # brightening transients: a positive difference at the centre; cosmic rays: science well
    # above the reference at the centre (no counterpart in the reference)
    tr = [it for it in items if it.kind == "transient" and it.snr > 8]
    assert np.median([it.triplet[2, c - 1:c + 2, c - 1:c + 2].max() for it in tr]) > 3
    crs = [it for it in items if it.kind in ("cosmic_ray", "hot_pixel") and it.snr > 8]
    if crs:
        assert np.median([float(it.triplet[0, c - 1:c + 2, c - 1:c + 2].max()
                                - it.triplet[1, c - 1:c + 2, c - 1:c + 2].max())
                          for it in crs]) > 2
    # artifacts the generator added to the science frame are labelled by their kind
    from broker.training import SCIENCE_ARTIFACT_KINDS

    assert kinds & (set(SCIENCE_ARTIFACT_KINDS) | {"dipole", "noise", "edge"}), kinds


def test_generator_is_reproducible_and_writes_manifest(tiny_field, tmp_path):
    cfg, items = tiny_field
    man = write_training_set(tmp_path, iter(items), dataclasses_replace(cfg, shard_size=64))
    assert man["complete"] and man["n_real"] == man["n_bogus"] > 0
    assert man["config"]["seed"] == 3 and man["counts_by_kind_before_balancing"]
    data = load_training_set(tmp_path)
    assert set(data) >= {"x", "y", "kind", "group", "snr", "reference", "features"}
    assert len(data["reference"]) == man["n"]
    assert set(data["reference"].tolist()) <= set(REFERENCE_STATES.values())
    # a generation that stopped half-way is refused, not trained on as if it were the set
    (tmp_path / "manifest.json").write_text(json.dumps({**man, "complete": False}))
    with pytest.raises(DatasetError, match="incomplete"):
        load_training_set(tmp_path)
    with pytest.raises(DatasetError, match="no readable manifest"):
        load_training_set(tmp_path / "absent")
    # same seed -> same first candidates (labels and pixels)
    from broker.training import field_candidates

    again = field_candidates(dataclasses_replace(cfg, epochs_per_field=1), 0)
    n = len(again)
    assert [it.kind for it in again] == [it.kind for it in items[:n]]
    assert np.array_equal(again[0].triplet, items[0].triplet)


def test_equal_error_threshold():
    from broker.training import equal_error

    rng = np.random.default_rng(0)
    s = np.r_[rng.uniform(0.3, 1, 500), rng.uniform(0, 0.7, 500)]
    y = np.r_[np.ones(500), np.zeros(500)]
    t, rate = equal_error(s, y)
    assert 0.45 < t < 0.55 and 0.2 < rate < 0.35
    assert abs(np.mean(s[y == 1] < t) - np.mean(s[y == 0] >= t)) < 0.01


def test_eval_command_end_to_end_on_small_subset(tmp_path):
    """main_eval on a few synthetic held-out triplets and (when present) five real ZTF alerts."""
    from broker.realbogus import RealBogusNetV2
    from broker.training import main_eval

    sim = tmp_path / "sim"
    write_training_set(sim, iter_synthetic_candidates(120, seed=5),
                       TrainingSetConfig(shard_size=64, seed=5), "synthetic")
    clf = RealBogusClassifier(RealBogusNetV2(), "test-v0")
    weights = clf.save(tmp_path / "test-v0")
    ztf = None
    src = Path(__file__).resolve().parents[2].parent / "shared/data/ztf_alerts/ztf-avro-alert"
    if src.is_dir():
        ztf = tmp_path / "ztf"
        ztf.mkdir()
        for f in sorted(src.rglob("*.avro"))[:5]:
            (ztf / f.name).symlink_to(f)
    other = RealBogusClassifier(RealBogusNetV2(), "test-v1").save(tmp_path / "test-v1")
    res = main_eval(weights, tmp_path / "report", sim, ztf, max_sim=100, compare=str(other))
    rep = (tmp_path / "report" / "report.md").read_text()
    assert res["sim"]["n"] == 100 and "FNR = FPR" in rep
    assert 0 <= res["sim"]["eer"] <= 1 and res["sim"]["at_threshold"]["per_kind"]
    assert sum(d["n_real"] + d["n_bogus"] for d in res["sim"]["by_reference"]) == 100
    assert "By brightness of the reference source" in rep
    # synthetic stamps have no reference state; the split and the limits section still hold
    assert res["sim"]["by_reference_state"]["unknown"]["n"] == 100
    errs = res["sim"]["errors_by_state"]["unknown"]
    assert sum(n for _, n in errs.values()) == 100 and all(0 <= e <= n for e, n in errs.values())
    assert "What limits the targets" in rep
    root = Path(__file__).resolve().parents[2]  # paths recorded relative to the repository
    assert not Path(res["sim"]["dir"]).is_absolute()
    assert (root / res["sim"]["dir"]).resolve() == sim.resolve()
    for name in res["files"].values():
        assert (tmp_path / "report" / name).stat().st_size > 1000
    if ztf is not None:
        assert res["ztf"]["n"] > 0 and "Spearman" in rep
        assert sum(d["n_real"] + d["n_bogus"] for d in res["ztf"]["by_reference"]) == \
            res["ztf"]["rb"]["n"]
        assert set(res["ztf_compare"]["delta_auc"]) == {"drb", "rb"} and "paired bootstrap" in rep
    assert "Promote to default" in rep


def test_reproduce_command_names_every_setting_that_is_not_the_default():
    from broker.training import TrainingSetConfig, reproduce_command

    cli = reproduce_command(0, 1000, "v", TrainingSetConfig(seed=0), TrainConfig(max_seconds=60))
    assert cli.startswith("broker train-realbogus --seed 0 --target-n 1000 --version v")
    py = reproduce_command(3, 1000, "v", TrainingSetConfig(p_bleed=0.5),
                           TrainConfig(seed=3, member_splits=False))
    assert "set_config=TrainingSetConfig(**{'p_bleed': 0.5})" in py
    assert "train_config=TrainConfig(**{'seed': 3, 'member_splits': False})" in py
    # a training seed other than the generator's is only reproduced by naming it
    assert "TrainConfig(**{'seed': 5})" in reproduce_command(3, 1000, "v", TrainingSetConfig(),
                                                              TrainConfig(seed=5))


def test_old_sets_are_reused_and_the_bright_cap_reaches_the_simulator(tmp_path, monkeypatch):
    from broker import simulate as sim_mod
    from broker.training import main as main_mod
    from broker.training.generate import _config_dict, field_sim_config

    def regenerate(*args, **kwargs):
        raise AssertionError("a complete set was not reused")
    monkeypatch.setattr(main_mod, "generate_training_set", regenerate)
    # a complete set whose manifest predates the settings added since is the config that has
    # their old values (SET_SETTINGS_ADDED)
    then = TrainingSetConfig(**main_mod.SET_SETTINGS_ADDED)
    old = {k: v for k, v in _config_dict(then).items() if k not in main_mod.SET_SETTINGS_ADDED}
    (tmp_path / "manifest.json").write_text(json.dumps({"complete": True, "config": old, "n": 7}))
    assert main_mod._ensure_set(tmp_path, then, progress=False)["n"] == 7
    for changed in ({"min_dipole_lobe_ratio": 0.4}, {"faint_trails_per_frame": 2.0}):
        with pytest.raises(AssertionError, match="not reused"):
            main_mod._ensure_set(tmp_path, dataclasses_replace(then, **changed), progress=False)
    cfg = TrainingSetConfig(variable_bright_cap=(17.5, 0.1))
    sim = field_sim_config(sim_mod, cfg, np.random.default_rng(0))
    assert sim.variable_bright_cap == (17.5, 0.1)
    assert field_sim_config(sim_mod, TrainingSetConfig(), np.random.default_rng(0)).variable_bright_cap is None
