"""Tests of broker.simulate.lightcurves: seeded objects, alert streams, per-class behaviour."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from broker.alert import upper_limits
from broker.lcclass import CLASS_NAMES
from broker.lightcurve import CONTEXT_FEATURE_NAMES, FEATURE_NAMES, lc_features, light_curve
from broker.simulate.lightcurves import (
    ORDINARY_CLASSES,
    RARE_CLASSES,
    LCSimConfig,
    alert_stream,
    simulate_object,
    simulate_objects,
)

KEYS = {"cand_id", "mjd", "filter", "ra", "dec", "flux", "flux_err", "snr", "rb", "magzp",
        "limiting_flux", "telescope"}
NIGHTLY = LCSimConfig(surveys=(("nightly", 1.0),))
SEASON = LCSimConfig(surveys=(("season", 1.0),))
FORCED_KEYS = {"frame_id", "mjd", "exptime", "filter", "flux", "flux_err", "magzp",
               "limiting_flux"}


@pytest.fixture(scope="module")
def objects():
    return simulate_objects(60, seed=5, classes=ORDINARY_CLASSES + RARE_CLASSES)


def test_seeded_and_extensible(objects):
    again = simulate_objects(20, seed=5, classes=ORDINARY_CLASSES + RARE_CLASSES)
    assert [o.detections for o in again] == [o.detections for o in objects[:20]]
    assert simulate_objects(5, seed=6)[0].detections != objects[0].detections


def test_inputs_have_the_score_stage_shape(objects):
    assert ORDINARY_CLASSES == CLASS_NAMES and not set(RARE_CLASSES) & set(CLASS_NAMES)
    for o in objects:
        assert o.detections and tuple(o.context) == CONTEXT_FEATURE_NAMES
        for d in o.detections:
            assert set(d) == KEYS and abs(d["snr"]) >= 5.0
            assert d["limiting_flux"] > 0 and np.isfinite(d["magzp"])
        for f in o.frames:
            assert set(f) == FORCED_KEYS
        assert {d["telescope"] for d in o.detections} <= {"simcam-a", "simcam-b", "nightly-0", "nightly-1"}


def test_alert_stream_is_causal(objects):
    alerts = alert_stream(objects)
    assert len(alerts) == sum(len(o.detections) for o in objects)
    assert all(a.current["mjd"] <= b.current["mjd"] for a, b in pairwise(alerts))
    for a in alerts[:300]:
        t = a.current["mjd"]
        assert all(h["mjd"] < t for h in a.history) and all(f["mjd"] < t for f in a.forced)
        ul = upper_limits(a.current["cand_id"].rpartition("/")[0], a.forced, a.history)
        lc = light_curve(a.current, a.history, a.forced)
        assert int((~lc.detected).sum()) == len(ul)


def _last_features(kind: str, n: int = 12) -> np.ndarray:
    """Features of the last alert of ``n`` objects of a season survey (long multi-band histories)."""
    rows = []
    for i in range(n):
        o = simulate_object(kind, np.random.default_rng([11, i]), SEASON)
        if o.detections:
            a = list(o.alerts())[-1]
            rows.append(lc_features(light_curve(a.current, a.history, a.forced)))
    return np.array(rows)


def _col(x: np.ndarray, name: str) -> np.ndarray:
    return x[:, FEATURE_NAMES.index(name)]


def test_class_behaviour():
    sn, var, mover = _last_features("SN"), _last_features("variable_star"), _last_features("mover")
    assert np.nanmedian(_col(sn, "colour_rate")) > 0  # SNe redden
    assert np.nanmedian(_col(_last_features("colour_inverted"), "colour_rate")) < 0
    assert np.nanmedian(_col(var, "frac_negative")) > 0.1 and np.all(_col(sn, "frac_negative") < 0.2)
    assert np.all(_col(mover, "ndet") == 1)
    assert np.nanmedian(_col(_last_features("nuclear_flare"), "colour")) < 0  # blue


def test_bogus_includes_one_off_detections_of_either_sign_anywhere():
    """A third of the bogus objects are single detections (noise peaks, cosmic rays), not on stars."""
    bogus = [simulate_object("bogus", np.random.default_rng([4, i]), NIGHTLY) for i in range(300)]
    single = [b for b in bogus if len(b.detections) == 1]
    many = [b for b in bogus if len(b.detections) > 1]
    assert 0.3 < len(single) / len(bogus) < 0.6
    signs = np.sign([b.detections[0]["snr"] for b in single])
    assert 0.2 < np.mean(signs < 0) < 0.6  # either sign
    assert np.mean([b.context["on_star"] for b in single]) < 0.3 < np.mean([b.context["on_star"] for b in many])
    assert np.mean([b.context["moving"] for b in single]) < 0.1


def test_context_per_class():
    ctx = {k: [simulate_object(k, np.random.default_rng([3, i])).context for i in range(40)]
           for k in ("mover", "AGN", "variable_star")}
    assert np.mean([c["moving"] for c in ctx["mover"]]) > 0.6
    assert np.mean([c["nuclear"] for c in ctx["AGN"]]) > 0.7
    assert np.mean([c["on_star"] for c in ctx["variable_star"]]) > 0.8
    with pytest.raises(ValueError):
        simulate_object("kilonova", np.random.default_rng(0))


def test_nightly_surveys_cover_what_a_small_pipeline_produces():
    objs = simulate_objects(150, seed=8, cfg=NIGHTLY)
    assert all(d["telescope"].startswith("nightly-") for o in objs for d in o.detections)
    bands = [len({f["filter"] for f in o.frames}) for o in objs]
    assert np.mean(np.array(bands) == 1) > 0.4 and max(bands) > 1  # one band or several
    # detected in the first science frame: no earlier frame, so no upper limit
    first = [o for o in objs if o.detections[0]["mjd"] == o.frames[0]["mjd"]]
    assert len(first) > 20 and all(not list(o.alerts())[0].forced for o in first)
    gaps = [b["mjd"] - a["mjd"] for o in objs for a, b in pairwise(o.frames)
            if a["filter"] == b["filter"]]
    assert min(gaps) < 0.11  # intra-night revisits
    assert np.median([len(o.frames) for o in objs]) < 40  # short histories


def test_nightly_variables_are_measured_against_the_reference():
    objs = simulate_objects(60, seed=9, classes=("variable_star",), cfg=NIGHTLY)
    signs = [np.sign(d["flux"]) for o in objs for d in o.detections]
    assert 0.2 < np.mean(np.array(signs) < 0) < 0.8  # brighter or fainter than the reference
    assert all(abs(d["snr"]) >= 5.0 for o in objs for d in o.detections)


def test_surveys_are_drawn_per_object_and_checked():
    tel = {o.detections[0]["telescope"].split("-")[0] for o in simulate_objects(40, seed=4)}
    assert tel == {"simcam", "nightly"}
    assert all(d["telescope"].startswith("simcam") for o in simulate_objects(20, seed=4, cfg=SEASON)
               for d in o.detections)
    with pytest.raises(ValueError):
        simulate_object("SN", np.random.default_rng(0), LCSimConfig(surveys=(("monthly", 1.0),)))
