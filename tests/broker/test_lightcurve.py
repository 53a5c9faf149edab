"""Tests of broker.lightcurve: light curves from alert inputs, features, hostile inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from broker.lightcurve import (
    ALL_FEATURE_NAMES,
    CONTEXT_FEATURE_NAMES,
    FEATURE_NAMES,
    band_order,
    lc_features,
    light_curve,
    model_inputs,
)


def _ujy_to_adu(f_ujy: float, magzp: float) -> float:
    return f_ujy / 10 ** (-0.4 * (magzp - 23.9))


def _det(mjd, band, f_ujy, magzp=26.0, tel="A", err_ujy=5.0, i=0):
    fid = f"{tel}-{mjd:.4f}-{band}"
    return {"cand_id": f"{fid}/{i}", "mjd": mjd, "filter": band, "ra": 1.0, "dec": 2.0,
            "flux": _ujy_to_adu(f_ujy, magzp), "flux_err": _ujy_to_adu(err_ujy, magzp),
            "snr": f_ujy / err_ujy, "rb": 0.9, "magzp": magzp,
            "limiting_flux": _ujy_to_adu(5 * err_ujy, magzp), "telescope": tel}


def _forced(d):
    return {"frame_id": d["cand_id"].rpartition("/")[0], "mjd": d["mjd"], "exptime": 30.0,
            "filter": d["filter"], "flux": d["flux"], "flux_err": d["flux_err"],
            "magzp": d["magzp"], "limiting_flux": d["limiting_flux"]}


def _feats(lc) -> dict[str, float]:
    return dict(zip(FEATURE_NAMES, lc_features(lc), strict=True))


def _sn_like():
    """Rise to 100 uJy at day 10, then fading, g fading faster; limits before."""
    dets = []
    for t in np.arange(2.0, 40.0, 2.0):
        for band, extra in (("g", 0.0), ("r", 0.03)):
            tau = 12.0 if band == "g" else 20.0
            f = 100 * (np.exp(-(10 - t) / 3) if t < 10 else np.exp(-(t - 10) / tau))
            if f > 25:
                dets.append(_det(60000 + t + extra, band, f, tel="A" if t % 4 else "B",
                                 magzp=26.0 if t % 4 else 24.5))
    limits = [_forced(_det(60000 + t, "g", 1.0)) for t in (-4.0, -2.0, 0.0)]
    return dets, limits


def test_photometry_common_scale_across_telescopes():
    a = _det(60000.0, "r", 100.0, magzp=26.0, tel="A")
    b = _det(60001.0, "r", 100.0, magzp=24.0, tel="B")
    lc = light_curve(b, [a], [])
    assert lc.calibrated and len(lc) == 2
    np.testing.assert_allclose(lc.flux, [100.0, 100.0])  # uJy, whatever the zero point
    assert _feats(lc)["peak_mag"] == pytest.approx(23.9 - 2.5 * math.log10(100.0))


def test_without_zero_point_only_the_same_telescope_in_adu():
    cur = {**_det(60002.0, "r", 100.0, tel="A"), "magzp": None}
    same = _det(60001.0, "r", 50.0, tel="A")
    old = {**_det(60000.5, "r", 50.0), "telescope": None}  # rows before multi-telescope
    other = _det(60000.0, "r", 80.0, tel="B")
    lc = light_curve(cur, [other, same, old], [])
    assert not lc.calibrated and len(lc) == 3
    f = _feats(lc)
    assert math.isnan(f["peak_mag"]) and math.isnan(f["colour"])
    assert f["amplitude"] > 0


def test_sn_like_features():
    dets, limits = _sn_like()
    forced = limits + [_forced(d) for d in dets[:-1]]  # detection frames are not upper limits
    lc = light_curve(dets[-1], dets[:-1], forced)
    f = _feats(lc)
    assert f["ndet"] == len(dets) and f["nulim"] == 3 and f["nbands"] == 2
    assert f["frac_negative"] == 0.0
    assert f["rise_rate"] > 0 and f["decline_rate"] > 0
    assert f["colour_rate"] > 0  # g fades faster: redder with time
    assert f["duration"] == pytest.approx(dets[-1]["mjd"] - dets[0]["mjd"])
    for name in ("skew", "kurtosis", "stetson_k", "eta_e", "reduced_chi2", "excess_variance",
                 "period", "period_power", "beyond_1std", "linear_trend"):
        assert math.isfinite(f[name]), name


def test_rise_rate_from_last_upper_limit_when_first_detection_is_the_peak():
    lim = _forced(_det(59999.5, "r", 1.0, err_ujy=2.0))  # 5-sigma limit 10 uJy, half a day before
    cur = _det(60000.0, "r", 1000.0)
    f = _feats(light_curve(cur, [], [lim]))
    assert f["rise_rate"] == pytest.approx(2.5 * math.log10(100.0) / 0.5)
    assert f["nulim"] == 1 and f["ndet"] == 1 and math.isnan(f["amplitude"])


def test_periodic_variable_period_and_negative_fraction():
    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(0, 60, 80))
    f = 200 * np.sin(2 * np.pi * t / 3.7)
    dets = [_det(60000 + ti, "r", fi, i=k) for k, (ti, fi) in enumerate(zip(t, f, strict=True))
            if abs(fi) > 25]
    feats = _feats(light_curve(dets[-1], dets[:-1], []))
    assert 0.3 < feats["frac_negative"] < 0.7
    assert feats["period"] == pytest.approx(3.7, rel=0.05)


def test_colour_needs_two_bands_within_a_day():
    g = _det(60000.0, "g", 100.0)
    r = _det(60003.0, "r", 50.0)
    f = _feats(light_curve(r, [g], []))
    assert math.isnan(f["colour"]) and math.isnan(f["colour_rate"]) and f["nbands"] == 2
    r2 = _det(60000.2, "r", 50.0)
    f2 = _feats(light_curve(r2, [g], []))
    assert f2["colour"] == pytest.approx(-2.5 * math.log10(2.0))  # g brighter: blue, negative


@pytest.mark.parametrize("patch", [
    {"flux": math.inf}, {"flux": 1e30}, {"flux": 0.0}, {"flux_err": -1.0}, {"flux_err": 0.0},
    {"mjd": math.nan}, {"magzp": math.nan}, {"magzp": "junk"}, {"filter": None}, {"flux": None},
    {"telescope": None},
])
def test_hostile_points_never_crash(patch):
    dets, limits = _sn_like()
    hist = [{**d, **patch} if i % 3 == 0 else d for i, d in enumerate(dets[:-1])]
    for cur in (dets[-1], {**dets[-1], **patch}):
        x = lc_features(light_curve(cur, hist, limits))
        assert x.shape == (len(FEATURE_NAMES),)
        assert not np.isinf(x).any()


def test_single_point_and_empty_inputs():
    x = lc_features(light_curve(_det(60000.0, "r", 100.0)))
    f = dict(zip(FEATURE_NAMES, x, strict=True))
    assert f["ndet"] == 1 and f["nulim"] == 0 and f["duration"] == 0.0
    assert all(math.isnan(f[k]) for k in ("amplitude", "rise_rate", "decline_rate", "colour",
                                          "skew", "period"))
    empty = lc_features(light_curve({"mjd": math.nan, "flux": math.nan}, [], []))
    assert empty[0] == 0 and np.isnan(empty[2:]).all()
    assert lc_features(light_curve({}, [], [])).shape == (len(FEATURE_NAMES),)


def test_duplicate_times_are_accepted():
    dets = [_det(60000.0, "r", 100.0 + i, i=i, tel=f"T{i}") for i in range(8)]
    x = lc_features(light_curve(dets[-1], dets[:-1], []))
    assert x[0] == 8 and math.isfinite(x[FEATURE_NAMES.index("skew")])


def test_band_order_and_model_inputs():
    assert sorted(["r", "zz", "g", "I", "u", "K", "R"], key=band_order) == \
        ["u", "g", "r", "R", "I", "K", "zz"]
    x = model_inputs(np.zeros(len(FEATURE_NAMES)), {"host": 1, "moving": "junk", "extra": 3})
    assert x.shape == (len(ALL_FEATURE_NAMES),)
    ctx = dict(zip(CONTEXT_FEATURE_NAMES, x[len(FEATURE_NAMES):], strict=True))
    assert ctx["host"] == 1.0 and math.isnan(ctx["moving"]) and math.isnan(ctx["nuclear"])
    with pytest.raises(ValueError):
        model_inputs(np.zeros(3), {})


def test_a_history_row_with_an_absurd_zero_point_is_left_out_not_an_overflow():
    """A zero point of -800 mag (written before the score stage checked them) overflowed 10 ** (-0.4 zp)."""
    cur = _det(60002.0, "r", 100.0, magzp=26.0, tel="A")
    poisoned = {**_det(60001.0, "r", 100.0, tel="A"), "magzp": -800.0}
    lc = light_curve(cur, [poisoned], [])
    assert np.isfinite(lc.flux).all() and 60001.0 not in lc.mjd
    assert len(lc_features(lc)) == len(FEATURE_NAMES)
