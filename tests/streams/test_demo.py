"""The demo's scoring of alerts against the simulator's truth (no broker needed)."""

from __future__ import annotations

import numpy as np

from broker.simulate import SimConfig, SkySimulator
from streams.demo import DemoResult, _saturated_sky


def _alert(frame_id: str, x: float, y: float) -> dict:
    return {"provenance": {"frame_id": frame_id}, "source": {"x": x, "y": y}, "scores": {"rb": 0.9}}


def test_recovery_counts_transients_outside_saturation_masks_and_lists_the_rest():
    sim = SkySimulator(SimConfig(shape=(256, 256), fields=("F001",), n_stars=20, n_galaxies=5,
                                 n_transients=3, n_variables=0, n_moving=0, n_cosmic_rays=0.0,
                                 transient_snr_range=(12.0, 13.0)), seed=5)
    res = DemoResult()
    frames = list(sim.frames(4))
    for (frame, truth), status in zip(frames, ["REFERENCE_BUILDING"] * 2 + ["IN_REFERENCE", "SUBTRACTED"], strict=True):
        res.truths[truth.frame_id], res.statuses[truth.frame_id] = truth, status
        res.wcs[truth.frame_id] = frame.wcs
        res.saturated[truth.frame_id] = _saturated_sky(frame)
    science, truth = frames[3]
    t = [i for i in truth.injections if i.kind == "transient"]
    assert len(t) == 3
    # a star saturated in one reference frame, 5 px from the first transient
    ref_frame, ref_truth = frames[1]
    x, y = ref_frame.wcs.wcs_world2pix([t[0].ra], [t[0].dec], 0)
    ref_frame.data[int(round(y[0])), int(round(x[0])) + 5] = ref_frame.meta.saturation
    res.saturated[ref_truth.frame_id] = _saturated_sky(ref_frame)
    res.alerts = [_alert(truth.frame_id, t[1].x + 0.3, t[1].y)]

    assert res.in_saturation_mask(truth.frame_id, t[0]) and not res.in_saturation_mask(truth.frame_id, t[1])
    assert [row for row in res.recovery() if row[2]] == [("10-20", 1, 2)]
    assert res.masked(10.0) == (0, 1)
    missed = res.missed(10.0)
    assert sorted((m[1], m[4]) for m in missed) == sorted([(t[0].source_id, True), (t[2].source_id, False)])
    assert np.isfinite(missed[0][3])


def test_classes_are_checked_against_what_was_injected():
    sim = SkySimulator(SimConfig(shape=(256, 256), fields=("F001",), n_stars=20, n_galaxies=5,
                                 n_transients=2, n_variables=1, n_moving=0, n_cosmic_rays=0.0), seed=6)
    res = DemoResult()
    frame, truth = list(sim.frames(4))[3]  # the transients have started
    res.truths[truth.frame_id] = truth
    tr = [i for i in truth.injections if i.kind == "transient"]
    var = [i for i in truth.injections if i.kind == "variable"]
    hot = next(i for i in truth.injections if i.kind == "hot_pixel")

    def alert(x: float, y: float, label: str, rb: float = 0.9) -> dict:
        return {**_alert(truth.frame_id, x, y), "classification": {"label": label}, "scores": {"rb": rb}}

    res.alerts = [alert(tr[0].x, tr[0].y, "SN"), alert(tr[1].x, tr[1].y, "mover"),
                  alert(var[0].x, var[0].y, "variable_star"), alert(3.0, 3.0, "mover"),
                  alert(hot.x, hot.y, "bogus"), alert(tr[0].x, tr[0].y, "SN", rb=0.1)]
    assert res.classes_vs_truth(0.5) == {"SN": (1, 2), "variable_star": (1, 1), "bogus": (1, 2)}
    assert res.classes_vs_truth()["SN"] == (2, 3)


def test_anomaly_top_ranks_the_alerts_above_the_rb_cut():
    res = DemoResult()

    def alert(anomaly: float, rb: float | None) -> dict:
        return {**_alert("F", 1.0, 1.0), "scores": {"rb": rb, "anomaly": anomaly}}

    res.alerts = [alert(0.5, 0.9), alert(1.0, 0.02), alert(0.8, 0.6), alert(0.99, None), alert(0.7, 0.5)]
    assert [a["scores"]["anomaly"] for a, _ in res.anomaly_top(2, 0.5)] == [0.8, 0.7]
    assert [a["scores"]["anomaly"] for a, _ in res.anomaly_top(2)] == [1.0, 0.99]
