"""One path for a frame: the reference policy, subtraction and scoring (``broker.pipeline``)."""

from __future__ import annotations

import pytest

from broker.anomaly import AnomalyModel
from broker.history import ObjectHistory
from broker.pipeline import (
    IN_REFERENCE,
    NO_REFERENCE,
    REFERENCE_BUILDING,
    STATUSES,
    SUBTRACTED,
    FixedReference,
    associate_and_score,
    process_frame,
)
from broker.reference import ReferenceConfig, ReferenceStore
from broker.simulate import SimConfig, SkySimulator

SIM = SimConfig(shape=(384, 384), fields=("F001",), filters=("r",), n_stars=200, n_galaxies=10,
                n_transients=8, n_variables=3, n_moving=0, n_cosmic_rays=5.0)


@pytest.fixture(scope="module")
def frames():
    sim = SkySimulator(SIM, seed=5)
    return [sim.frame("F001", "r", e) for e in range(5)]


def test_statuses_follow_the_reference_policy(frames, tmp_path):
    """Statuses follow the reference policy.

    Flagged frames never build a reference; clean ones do, the third completes it, a frame of the
    reference is never subtracted, and a later one is.
    """
    store = ReferenceStore(tmp_path, ReferenceConfig(n_frames=3))
    (f0, _), (f1, _), (f2, _), (f3, _), _ = frames
    assert process_frame(f0, store, clean=False).status == NO_REFERENCE
    assert store.pending(f0.meta.reference_key) == []
    assert process_frame(f0, store).status == REFERENCE_BUILDING
    assert process_frame(f1, store).status == REFERENCE_BUILDING
    done = process_frame(f2, store)
    assert done.status == IN_REFERENCE and done.candidates == []
    assert done.reference_frames == tuple(f.meta.frame_id for f in (f0, f1, f2))
    assert process_frame(f0, store).status == IN_REFERENCE  # re-delivered: part of the reference
    res = process_frame(f3, store)
    assert res.status == SUBTRACTED and res.reference_frames == done.reference_frames
    assert len(res.candidates) > 0 and all(isinstance(v, float) for v in res.diagnostics.values())
    assert [c.cand_id for c in res.candidates] == [f"{f3.meta.frame_id}/{i}" for i in range(len(res.candidates))]
    assert res.diagnostics["n_candidates"] == len(res.candidates)
    assert set(STATUSES) == {NO_REFERENCE, REFERENCE_BUILDING, IN_REFERENCE, SUBTRACTED}


def test_a_fixed_reference_subtracts_its_key_and_builds_nothing(frames, tmp_path):
    store = ReferenceStore(tmp_path, ReferenceConfig(n_frames=3))
    for frame, _ in frames[:3]:
        reference = store.offer(frame)
    assert reference is not None
    fixed = FixedReference(reference)
    frame = frames[3][0]
    via_store = process_frame(frame, store)
    via_fixed = process_frame(frame, fixed)
    assert via_fixed.status == SUBTRACTED
    assert [c.cand_id for c in via_fixed.candidates] == [c.cand_id for c in via_store.candidates]
    other = SkySimulator(SIM, seed=6).frame("F002", "r", 0)[0]
    assert process_frame(other, fixed).status == REFERENCE_BUILDING and fixed.offer(other) is None


def test_associate_and_score_sets_objects_histories_and_scores(frames, tmp_path):
    store = ReferenceStore(tmp_path, ReferenceConfig(n_frames=3))
    for frame, _ in frames[:3]:
        process_frame(frame, store)
    history, model = ObjectHistory(":memory:"), AnomalyModel.load()
    seen = []
    for frame, _ in frames[3:]:
        cands = process_frame(frame, store).candidates
        m = frame.meta
        associate_and_score(history, model, m.frame_id, m.mjd_start, m.filter, cands)
        assert all(c.obj is not None and c.anomaly is not None and 0 <= c.anomaly <= 1 for c in cands)
        seen.append(cands)
    assert any(c.history for c in seen[1])  # the second frame finds the first one's objects
    associate_and_score(history, model, "none", 60000.0, "r", [])  # nothing to do: no error
