"""Tests of broker.training.generate: the per-field pipeline run and its labels (seeded, small fields)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace as dataclasses_replace

import numpy as np
import pytest

from broker.errors import DatasetError
from broker.training.data import load_training_set
from broker.training.generate import field_candidates
from broker.training.labels import lobe_snrs
from broker.training.settings import REFERENCE_STATES, TrainingSetConfig
from broker.training.shards import write_training_set
from broker.training.stress import SCIENCE_ARTIFACT_KINDS


@pytest.fixture(scope="module")
def tiny_field():
    """Labelled candidates of one seeded 512x512 field, 2 science epochs, through the pipeline."""
    pytest.importorskip("broker.subtract")
    cfg = TrainingSetConfig(shape=(512, 512), epochs_per_field=2, n_transients=40,
                            n_cosmic_rays=60.0, p_misalign=0.5, seed=3)
    return cfg, field_candidates(cfg, 0)


def test_variables_swamped_by_a_broken_reference_are_relabelled():
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


def test_transients_on_trails_are_labelled_by_the_trail_share():
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

    assert kinds & (set(SCIENCE_ARTIFACT_KINDS) | {"dipole", "noise", "edge"}), kinds


def test_generator_is_reproducible_and_writes_manifest(tiny_field, tmp_path):
    cfg, items = tiny_field
    man = write_training_set(tmp_path, iter(items), dataclasses_replace(cfg, shard_size=64))
    assert man["complete"] and man["n_real"] == man["n_bogus"] > 0
    assert man["config"]["seed"] == 3 and man["counts_by_kind_before_balancing"]
    data = load_training_set(tmp_path)
    assert set(data) >= {"x", "y", "kind", "group", "snr", "reference"}
    assert len(data["reference"]) == man["n"]
    assert set(data["reference"].tolist()) <= set(REFERENCE_STATES.values())
    # a generation that stopped half-way is refused, not trained on as if it were the set
    (tmp_path / "manifest.json").write_text(json.dumps({**man, "complete": False}))
    with pytest.raises(DatasetError, match="incomplete"):
        load_training_set(tmp_path)
    with pytest.raises(DatasetError, match="no readable manifest"):
        load_training_set(tmp_path / "absent")
    # same seed -> same first candidates (labels and pixels)

    again = field_candidates(dataclasses_replace(cfg, epochs_per_field=1), 0)
    n = len(again)
    assert [it.kind for it in again] == [it.kind for it in items[:n]]
    assert np.array_equal(again[0].triplet, items[0].triplet)


def test_frames_go_through_the_pipelines_one_path(monkeypatch, capsys):
    from broker import pipeline
    from broker.training import generate

    calls = []

    def not_subtracted(frame, references, config, clean=True):
        calls.append((type(references).__name__, references.get(frame.meta.reference_key) is not None))
        return pipeline.FrameResult(pipeline.REFERENCE_BUILDING)

    monkeypatch.setattr(generate, "process_frame", not_subtracted)
    cfg = TrainingSetConfig(shape=(256, 256), epochs_per_field=2, n_transients=10, n_variables=20,
                            seed=1)
    assert field_candidates(cfg, 0) == []  # a frame that is not subtracted gives no candidates
    assert calls == [("FixedReference", True)] * 2  # each epoch, with the field's own reference
    assert capsys.readouterr().out.count("not subtracted (REFERENCE_BUILDING)") == 2


def test_frame_level_artifacts_go_through_the_pipeline_and_are_labelled():
    """Spikes on every epoch, glints on the science frame and a reference gap: real subtractions."""
    from broker.training.generate import field_sim_config

    cfg = TrainingSetConfig(shape=(512, 512), epochs_per_field=2, n_transients=40, seed=3,
                            glints_per_frame=3.0, p_reference_gap=1.0,
                            spike_strength_range=(0.005, 0.02), trails_per_frame=0.0,
                            faint_trails_per_frame=0.0)
    sim = field_sim_config(cfg, np.random.default_rng([3, 0]))
    assert 0.005 <= sim.spike_strength <= 0.02 and 0 <= sim.spike_angle <= 90
    items = field_candidates(cfg, 0)
    kinds = Counter((it.label, it.kind) for it in items)
    assert kinds[(0, "satellite")] >= 10, kinds  # the glints' knots, bogus
    assert kinds[(1, "transient")] >= 20, kinds  # the gap and the spikes leave the reals alone
    # candidates beside the reference gap: a blank (0) block in the reference channel only
    beside = [it for it in items if (it.triplet[1] == 0).mean() > 0.1 and (it.triplet[0] == 0).mean() < 0.01]
    assert beside, "no candidate beside the reference gap"
