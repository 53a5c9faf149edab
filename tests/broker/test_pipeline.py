"""One path for a frame: the reference policy, subtraction and scoring (``broker.pipeline``)."""

from __future__ import annotations

import numpy as np
import pytest

from broker.history import ObjectHistory
from broker.pipeline import (
    IN_REFERENCE,
    NO_REFERENCE,
    REFERENCE_BUILDING,
    STATUSES,
    SUBTRACTED,
    FixedReference,
    ScoreModels,
    associate_and_score,
    process_frame,
)
from broker.reference import ReferenceConfig, ReferenceStore, build_reference
from broker.simulate import SimConfig, SkySimulator

SIM = SimConfig(shape=(384, 384), fields=("F001",), filters=("r",), n_stars=200, n_galaxies=10,
                n_transients=8, n_variables=3, n_moving=0, n_cosmic_rays=5.0)


#: The shipped models and OpenNGC, loaded once for the module.
SCORE_MODELS = ScoreModels.load()


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


def test_a_frame_its_reference_left_out_is_subtracted_from_it(tmp_path):
    """The frame that completes a reference but whose flux ratio nothing measures is subtracted, not IN_REFERENCE.

    It was answered as part of the reference, so nothing was ever looked for in it.
    """
    from tests.broker.test_reference import _paired_frames

    f0, f1, f2 = _paired_frames()[0]
    store = ReferenceStore(tmp_path, ReferenceConfig(flux_min_stars=1000))
    assert [process_frame(f, store).status for f in (f0, f1)] == [REFERENCE_BUILDING, REFERENCE_BUILDING]
    done = process_frame(f2, store)
    assert done.status == SUBTRACTED and done.reference_frames == ("P-0",)
    assert process_frame(f0, store).status == IN_REFERENCE


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
    history, models = ObjectHistory(":memory:"), SCORE_MODELS
    seen = []
    for frame, _ in frames[3:]:
        cands = process_frame(frame, store).candidates
        m = frame.meta
        associate_and_score(history, models, m.frame_id, m.mjd_start, m.filter, cands, m.magzp, None, m.telescope)
        assert all(c.obj is not None and c.anomaly is not None and 0 <= c.anomaly <= 1 for c in cands)
        assert all(c.context is not None and c.features and c.classification for c in cands)
        seen.append(cands)
    assert any(c.history for c in seen[1])  # the second frame finds the first one's objects
    again = [c for c in seen[1] if c.history][0]
    assert again.features["ndet"] == len(again.history) + 1 and again.history[0]["telescope"] == "SIM1"
    probs = again.classification["probabilities"]
    assert abs(sum(probs.values()) - 1) < 1e-6 and again.classification["label"] == max(probs, key=probs.get)
    assert history.summary(again.obj.object_id) == (again.features, again.classification)
    associate_and_score(history, models, "none", 60000.0, "r", [])  # nothing to do: no error


def test_difference_store_gives_forced_photometry_that_replays_identically(frames, tmp_path):
    """Forced photometry on the stored earlier difference images, the same on every replay.

    A candidate measured by forced photometry on its own (stored) difference image gets its own
    PSF flux and error back: one photometry for detections and forced measurements.
    """
    import numpy as np

    from broker.diffstore import DifferenceStore

    refs = ReferenceStore(tmp_path / "refs", ReferenceConfig(n_frames=3))
    diffs = DifferenceStore(tmp_path / "diffs")
    for frame, _ in frames[:3]:
        assert process_frame(frame, refs, differences=diffs).status != SUBTRACTED
    (f3, _), (f4, _) = frames[3], frames[4]
    key, ids = f3.meta.reference_key, (f3.meta.frame_id, f4.meta.frame_id)
    assert diffs.frame_ids(key) == [] and f3.meta.mjd_start < f4.meta.mjd_start
    r3 = process_frame(f3, refs, differences=diffs)
    assert r3.candidates and all(c.forced == [] for c in r3.candidates)  # nothing earlier
    assert diffs.frame_ids(key) == [ids[0]] and r3.limiting_flux == r3.diagnostics["limiting_flux"] > 0
    assert {"t_forced_s", "t_diffstore_s"} <= set(r3.diagnostics)
    r4 = process_frame(f4, refs, differences=diffs)
    assert diffs.frame_ids(key) == list(ids)
    assert all([f["frame_id"] for f in c.forced] == [ids[0]] for c in r4.candidates)  # all inside its footprint
    # replays: the same forced photometry, before and after the later frame was kept
    assert [c.forced for c in process_frame(f3, refs, differences=diffs).candidates] == [[]] * len(r3.candidates)
    again = process_frame(f4, refs, differences=diffs)
    assert [c.forced for c in again.candidates] == [c.forced for c in r4.candidates]
    assert diffs.frame_ids(key) == list(ids)
    # a detection's own difference image gives its PSF flux back
    d = [c.detection for c in r3.candidates]
    ra, dec = np.array([x.ra for x in d]), np.array([x.dec for x in d])
    own = diffs.forced_photometry(key, f3.meta.mjd_start + 1e-3, ra, dec)
    pairs = [(det, fs[0]) for det, fs in zip(d, own, strict=True) if fs]
    assert len(pairs) >= 0.9 * len(d)
    pull = np.array([(f["flux"] - det.flux) / det.flux_err for det, f in pairs])
    err_ratio = np.array([f["flux_err"] / det.flux_err for det, f in pairs])
    # the same fit; only where the fitted position lies over half a pixel from the S_corr peak does the
    # detection's stamp sit one pixel off the forced one's
    assert np.median(np.abs(pull)) < 1e-4 and np.max(np.abs(pull)) < 0.5
    assert np.median(np.abs(err_ratio - 1)) < 1e-3 and np.max(np.abs(err_ratio - 1)) < 0.1
    assert process_frame(f4, refs).candidates[0].forced == []  # no store: no forced photometry


def test_a_wcs_on_the_negative_side_of_ra_0_gives_positions_in_0_to_360(frames):
    """``CRVAL1 - 360`` is the same sky: the same candidates, at the same RA in [0, 360), hosts included.

    Before, wcslib kept the side of 0 that ``CRVAL1`` is on and alerts went out at RA -210.
    """
    def shifted(frame):
        header = frame.header.copy()
        header["CRVAL1"] = header["CRVAL1"] - 360.0
        return type(frame)(frame.meta, frame.data, header)

    reference = build_reference([f for f, _ in frames[:3]], ReferenceConfig(n_frames=3))
    plain = process_frame(frames[3][0], FixedReference(reference)).candidates
    moved = process_frame(shifted(frames[3][0]), FixedReference(reference)).candidates
    assert len(moved) == len(plain) > 0
    ra = np.array([c.detection.ra for c in moved])
    host_ra = np.array([c.detection.host_ra for c in moved])
    host_ra = host_ra[np.isfinite(host_ra)]  # NaN: no host
    assert len(host_ra) and ((ra >= 0) & (ra < 360)).all() and ((host_ra >= 0) & (host_ra < 360)).all()
    np.testing.assert_allclose(ra, [c.detection.ra for c in plain], atol=1e-9)


def test_quality_flags_are_respected_once_a_reference_exists(frames, tmp_path):
    """A frame flagged few_stars is not subtracted (issue 27: subtract ignored the flags once a reference existed)."""
    from broker.errors import PoorQuality

    store = ReferenceStore(tmp_path, ReferenceConfig(n_frames=3))
    frame = frames[3][0]
    assert process_frame(frame, store, clean=False, skip=["few_stars"]).status == NO_REFERENCE
    assert store.pending(frame.meta.reference_key) == []  # nor kept for a reference
    for f, _ in frames[:3]:
        process_frame(f, store)
    with pytest.raises(PoorQuality, match=r"not subtracted: quality flags \['few_stars'\]") as err:
        process_frame(frame, store, clean=False, skip=["few_stars"])
    assert err.value.reason == "poor_quality"


@pytest.mark.parametrize(("ra", "dec", "mjd"), [(float("nan"), 2.0, 60000.0), (150.0, 95.0, 60000.0),
                                                (150.0, 2.0, float("nan"))])
def test_positions_off_the_sky_never_reach_the_history(ra, dec, mjd):
    """NaN coordinates were ``unexpected:IntegrityError: NOT NULL constraint failed`` in the score stage."""
    from broker.errors import BadCoordinates
    from tests.helpers import candidate

    history, model = ObjectHistory(":memory:"), SCORE_MODELS
    good, bad = candidate("F-1/0", seed=1), candidate("F-1/1", ra=ra, dec=dec)
    with pytest.raises(BadCoordinates, match="not a position on the sky|MJD nan is not finite") as err:
        associate_and_score(history, model, "F-1", mjd, "r", [good, bad])
    assert err.value.reason == "bad_coordinates"
    later = candidate("F-2/0", seed=1)  # where F-1's good candidate was
    associate_and_score(history, model, "F-2", 60001.0, "r", [later])
    assert good.obj is None and later.obj is not None and later.obj.ndet == 1  # nothing of F-1 was written


def test_a_series_normalised_to_one_finds_the_transients_of_the_adu_series(frames, tmp_path):
    """Siril / PixInsight floats in [0, 1] with the camera's GAIN: 4 of 60 injections found before `adu_scale`."""
    from broker.frame import Frame, decode_fits, encode_fits, meta_from_header

    def normalised(frame: Frame) -> Frame:
        h = frame.header.copy()
        h["SATURATE"] = float(h["SATURATE"]) / 65535.0
        return Frame(meta_from_header(h), (frame.data / 65535.0).astype(np.float32), h)

    found = {}
    for name, convert in (("adu", lambda f: f), ("normalised", normalised)):
        store, hits = ReferenceStore(tmp_path / name, ReferenceConfig(n_frames=3)), 0
        for frame, truth in frames:
            result = process_frame(decode_fits(encode_fits(convert(frame))), store)
            xy = np.array([(c.detection.x, c.detection.y) for c in result.candidates]).reshape(-1, 2)
            hits += sum(bool(len(xy)) and np.hypot(*(xy - (i.x, i.y)).T).min() < 2 for i in truth.of_kind("transient"))
        found[name] = hits
    assert found["adu"] >= 8 and found["normalised"] >= found["adu"] - 1, found


def test_candidates_in_a_line_carry_their_trail_in_the_context():
    """The score stage marks a frame's row of candidates (a satellite trail) in their context's matches."""
    from dataclasses import replace

    from tests.helpers import candidate

    cands = [candidate(f"F-1/{i}", ra=150.0 + 30.0 * i / 3600.0, dec=2.0, seed=i) for i in range(10)]
    cands.append(candidate("F-1/10", ra=150.1, dec=2.1, seed=20))
    for i, c in enumerate(cands):
        c.detection = replace(c.detection, x=100.0 + 30.0 * i if i < 10 else 600.0, y=50.0 if i < 10 else 700.0)
    associate_and_score(ObjectHistory(":memory:"), SCORE_MODELS, "F-1", 60000.0, "r", cands, shape=(1024, 1024))
    assert all(c.context["matches"][-1]["name"] == "trail 1" for c in cands[:10])
    assert all(m["kind"] != "trail" for m in cands[10].context["matches"])
    again = [candidate(f"F-2/{i}", ra=150.0 + 30.0 * i / 3600.0, dec=2.0, seed=i) for i in range(10)]
    for i, c in enumerate(again):
        c.detection = replace(c.detection, x=100.0 + 30.0 * i, y=50.0)
    associate_and_score(ObjectHistory(":memory:"), SCORE_MODELS, "F-2", 60001.0, "r", again)  # no frame shape
    assert all(m["kind"] != "trail" for c in again for m in c.context["matches"])


@pytest.mark.parametrize("kind", ["renamed", "quantised"])
def test_an_exposure_of_the_reference_resent_under_another_id_is_in_the_reference(frames, tmp_path, kind):
    """A reference frame re-sent under another id (or fpacked) is one of the reference's frames.

    It was subtracted from a co-add holding it: its noise partly cancelled (S_corr std 0.77,
    renormalised: 19 candidates on a copy of a frame of the reference).
    """
    from dataclasses import replace

    from broker.frame import Frame

    store = ReferenceStore(tmp_path, ReferenceConfig(n_frames=3))
    for frame, _ in frames[:3]:
        reference = store.offer(frame)
    assert reference is not None
    f1 = frames[1][0]
    q = 1.0 if kind == "quantised" else 0.0
    data = np.round(f1.data / q) * q if q else f1.data.copy()
    again = Frame(replace(f1.meta, frame_id="resent-1", mjd_start=f1.meta.mjd_start + 10), data, f1.header)
    res = process_frame(again, store)
    assert res.status == IN_REFERENCE and res.candidates == []
    assert res.reference_frames == reference.frame_ids


def test_a_pending_frame_that_cannot_serve_is_set_aside_and_the_others_wait(frames, tmp_path):
    """A frame two thirds of one value is no part of a reference: the build goes on without it.

    A readout that lost its data that way passes ingest's 95 % mode check. Every pending frame was
    set aside in ``rejected/`` and the frame in hand refused (``reference``); now that frame alone
    waits in ``omitted/``, with its reason, to be searched once the next frame completes the reference.
    """
    from broker.frame import Frame

    store = ReferenceStore(tmp_path, ReferenceConfig(n_frames=3))
    (f0, _), (f1, _), (f2, _), (f3, _), (f4, _) = frames
    lost = f1.data.copy()
    lost[: 2 * lost.shape[0] // 3] = 0.0
    key = f0.meta.reference_key
    assert process_frame(f0, store).status == REFERENCE_BUILDING
    assert process_frame(Frame(f1.meta, lost, f1.header), store).status == REFERENCE_BUILDING
    assert process_frame(f2, store).status == REFERENCE_BUILDING
    assert store.pending(key) == sorted([f0.meta.frame_id, f2.meta.frame_id])
    reason = (store._dir(key) / "omitted" / f"{f1.meta.frame_id}.txt").read_text()
    assert f"frame {f1.meta.frame_id} cannot serve" in reason and "constant 67%" in reason
    done = process_frame(f3, store)
    assert done.status == IN_REFERENCE
    assert done.reference_frames == (f0.meta.frame_id, f2.meta.frame_id, f3.meta.frame_id)
    assert [f.meta.frame_id for f in store.left_out(key)] == [f1.meta.frame_id]


def test_a_frame_whose_flux_ratio_nothing_measures_is_refused(monkeypatch):
    """A subtraction at F_r = 1 for want of a measurement is no alert source: ``poor_quality`` with its reason.

    It is refused once F_r is measured, before ZOGY: it was refused only after the whole
    subtraction and detection (1.3 s of a 1024^2 frame, 3.4 s of a 2048^2 one, wasted).
    """
    import broker.subtract
    from broker.errors import PoorQuality
    from broker.subtract import SubtractConfig
    from tests.broker.test_subtract import _paired_pair

    sci, ref = _paired_pair(9, 1.0)
    assert process_frame(sci, FixedReference(ref)).status == SUBTRACTED
    zogy = broker.subtract._zogy_images

    def spy(*args, **kwargs):
        ran.append(True)
        return zogy(*args, **kwargs)

    ran: list[bool] = []
    monkeypatch.setattr(broker.subtract, "_zogy_images", spy)
    with pytest.raises(PoorQuality, match=r"frame s not subtracted: no flux ratio of the reference to frame s") as err:
        process_frame(sci, FixedReference(ref), SubtractConfig(min_flux_ratio_stars=1000))
    assert err.value.reason == "poor_quality" and "min_flux_ratio_stars = 1000" in str(err.value)
    assert ran == []  # refused before ZOGY
    assert process_frame(sci, FixedReference(ref)).status == SUBTRACTED and ran == [True]
    # outside the pipeline the subtraction still runs at F_r = 1 and says so
    fallback = broker.subtract.subtract_and_detect(sci, ref, SubtractConfig(min_flux_ratio_stars=1000))
    assert fallback.diagnostics["flux_ratio_fallback"] == 1.0 and not fallback.flux_ratio.measured
