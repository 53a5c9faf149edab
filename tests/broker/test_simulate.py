"""Tests of the sky simulator on small frames (256-384 px), seeded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.wcs.utils import proj_plane_pixel_scales
from photutils.centroids import centroid_2dg
from photutils.detection import find_peaks

from broker.errors import ConfigError
from broker.frame import decode_fits, encode_fits
from broker.simulate import SimConfig, SkySimulator, Truth, moffat_stamps

SMALL = SimConfig(shape=(256, 256), n_stars=120, n_galaxies=12, n_transients=6, n_variables=4,
                  n_moving=2, n_cosmic_rays=8, n_hot_pixels=5, n_hot_columns=1,
                  satellite_probability=0.5, filters=("r", "g"))
QUIET = dict(n_cosmic_rays=0, n_hot_pixels=0, n_hot_columns=0, satellite_probability=0.0)


@pytest.fixture(scope="module")
def sim() -> SkySimulator:
    return SkySimulator(SMALL, seed=7)


def test_deterministic_for_seed_and_epoch(sim):
    f1, t1 = sim.frame("F001", "r", 4)
    f2, t2 = SkySimulator(SMALL, seed=7).frame("F001", "r", 4)  # fresh instance, no shared cache
    assert np.array_equal(f1.data, f2.data)
    assert t1.to_dict() == t2.to_dict()
    assert f1.header.tostring() == f2.header.tostring()
    f3, _ = SkySimulator(SMALL, seed=8).frame("F001", "r", 4)
    assert not np.array_equal(f1.data, f3.data)
    assert f1.meta.frame_id == "SIM1-F001-r-0004"


def test_frame_format_and_header(sim):
    frame, truth = sim.frame("F002", "g", 1)
    d = frame.data
    assert d.dtype == np.float32 and d.shape == SMALL.shape
    assert np.array_equal(d, np.round(d)) and d.min() >= 0 and d.max() <= SMALL.saturation
    h = frame.header
    for card in ("TELESCOP", "FIELD", "FILTER", "MJD-OBS", "EXPTIME", "GAIN", "RDNOISE",
                 "SATURATE", "MAGZP", "FRAMEID", "SEEING"):
        assert card in h
    assert h["SEEING"] == pytest.approx(truth.fwhm)
    assert SMALL.fwhm_range[0] <= truth.fwhm <= SMALL.fwhm_range[1]
    assert proj_plane_pixel_scales(frame.wcs) * 3600 == pytest.approx(SMALL.pixel_scale, rel=1e-6)
    # distinct fields lie at distinct sky positions
    other, _ = sim.frame("F001", "g", 1)
    assert frame.wcs.wcs.crval[0] != other.wcs.wcs.crval[0]


def test_fits_round_trip_is_lossless(sim):
    frame, _ = sim.frame("F001", "r", 3)
    back = decode_fits(encode_fits(frame))
    assert np.array_equal(back.data, frame.data)
    assert back.meta == frame.meta
    px = np.array([[10.0, 20.0], [200.0, 150.0]])
    assert np.allclose(back.wcs.wcs_pix2world(px, 0), frame.wcs.wcs_pix2world(px, 0), atol=1e-10)


def test_truth_json_round_trip(sim):
    _, truth = sim.frame("F001", "r", 5)
    again = Truth.from_dict(json.loads(json.dumps(truth.to_dict())))
    assert again == truth


def test_stars_stay_on_the_sky_while_pixels_jitter():
    """Bright sources measured on two epochs land at the same RA/Dec through each frame's WCS."""
    sim = SkySimulator(SimConfig(shape=(256, 256), n_stars=300, n_galaxies=5, n_transients=0,
                                 n_moving=0, n_variables=0, **QUIET), seed=7)
    radec = []
    for epoch in (0, 5):
        frame, truth = sim.frame("F001", "r", epoch)
        data = frame.data - np.median(frame.data)
        peaks = find_peaks(data, 20 * np.sqrt(truth.sky / SMALL.gain), box_size=7, border_width=8,
                           centroid_func=centroid_2dg)
        peaks = peaks[peaks["peak_value"] < 0.5 * SMALL.saturation]
        radec.append((np.c_[peaks["x_centroid"], peaks["y_centroid"]], frame.wcs))
    (xy0, w0), (xy5, w5) = radec
    sky0 = w0.wcs_pix2world(xy0, 0)
    xy0_on_5 = w5.wcs_world2pix(sky0, 0)  # where epoch-0 sources must be on epoch 5
    d = np.hypot(*(xy0_on_5[:, None, :] - xy5[None, :, :]).transpose(2, 0, 1))
    best = d.min(axis=1)
    matched = best < 1.0
    assert matched.sum() >= 10
    assert np.median(best[matched]) < 0.06  # px: same sky position (to centroiding accuracy)
    shift = np.median(np.linalg.norm(xy0_on_5 - xy0, axis=1))
    assert shift > 0.3  # the pointing really moved the pixels


def test_empty_sky_noise_statistics():
    cfg = SimConfig(shape=(256, 256), n_stars=0, n_galaxies=0, n_transients=0, n_variables=0,
                    n_moving=0, sky_gradient=0.0, **QUIET)
    frame, truth = SkySimulator(cfg, seed=3).frame("F001", "r", 0)
    expected_rms = np.sqrt(truth.sky * cfg.gain + cfg.read_noise ** 2) / cfg.gain
    expected_rms = np.sqrt(expected_rms ** 2 + 1 / 12)  # ADC rounding
    assert frame.data.mean() == pytest.approx(truth.sky, abs=0.1)
    assert frame.data.std() == pytest.approx(expected_rms, rel=0.02)
    assert not truth.injections


def test_noise_matches_model_on_a_full_frame(sim):
    frame, _ = sim.frame("F001", "r", 4)
    model = sim.model("F001", "r", 4).astype(np.float64)
    ok = model < 0.8 * SMALL.saturation
    z = (frame.data - model)[ok] / (np.sqrt(model[ok] * SMALL.gain + SMALL.read_noise ** 2) / SMALL.gain)
    assert abs(np.mean(z)) < 0.05 and np.std(z) == pytest.approx(1.0, abs=0.05)


def test_transients_only_after_reference_epochs(sim):
    ids = {}
    for epoch in range(7):
        _, truth = sim.frame("F001", "r", epoch)
        tr = truth.of_kind("transient")
        assert len(tr) == (0 if epoch < SMALL.reference_epochs else SMALL.n_transients)
        ids[epoch] = {t.source_id for t in tr}
        assert len(truth.of_kind("moving")) == SMALL.n_moving
        assert len(truth.of_kind("variable")) <= SMALL.n_variables
    assert ids[3] & ids[4]  # transients live several epochs with stable ids
    assert any(t.on_galaxy for e in range(3, 7) for t in sim.frame("F001", "r", e)[1].of_kind("transient"))


def test_variables_and_moving_objects_keep_ids(sim):
    (_, a), (_, b) = sim.frame("F001", "r", 1), sim.frame("F001", "r", 2)
    va, vb = ({v.source_id: v for v in t.of_kind("variable")} for t in (a, b))
    common = set(va) & set(vb)
    assert common
    for k in common:
        assert (va[k].ra, va[k].dec) == pytest.approx((vb[k].ra, vb[k].dec), abs=1e-9)
    assert any(np.sign(v.flux) < 0 for t in (a, b) for v in t.of_kind("variable"))
    ma, mb = ({m.source_id: m for m in t.of_kind("moving")} for t in (a, b))
    assert set(ma) == set(mb)
    for k in ma:
        assert abs(ma[k].ra - mb[k].ra) + abs(ma[k].dec - mb[k].dec) > 1e-5


def test_detector_defects_fixed_in_pixels(sim):
    _, a = sim.frame("F001", "r", 0)
    _, b = sim.frame("F002", "g", 3)
    hot = lambda t: sorted((i.x, i.y) for i in t.of_kind("hot_pixel", "hot_column"))  # noqa: E731
    assert hot(a) == hot(b) and len(hot(a)) == SMALL.n_hot_pixels + SMALL.n_hot_columns


def test_recorded_transient_snr_matches_forced_photometry():
    cfg = SimConfig(shape=(384, 384), n_stars=150, n_galaxies=15, n_transients=30,
                    transient_lifetime=1, n_variables=0, n_moving=0, **QUIET)
    sim = SkySimulator(cfg, seed=11)
    rec, meas, flux_ratio = [], [], []
    for epoch in (3, 4, 5):
        frame, truth = sim.frame("F001", "r", epoch)
        model = sim.model("F001", "r", epoch).astype(np.float64)
        diff = frame.data - sim.static_model("F001", "r", epoch)
        var = (model * cfg.gain + cfg.read_noise ** 2) / cfg.gain ** 2
        size, h = cfg.stamp_size, cfg.stamp_size // 2
        others = np.array([(i.x, i.y) for i in truth.injections])
        for t in truth.of_kind("transient"):
            if np.sum(np.hypot(others[:, 0] - t.x, others[:, 1] - t.y) < 12) > 1:
                continue  # blended with another injection: not a clean forced measurement
            ix, iy = int(round(t.x)), int(round(t.y))
            if not (h <= ix < cfg.shape[1] - h and h <= iy < cfg.shape[0] - h):
                continue
            p = moffat_stamps([t.x - ix], [t.y - iy], size, truth.fwhm, truth.beta,
                              truth.psf_ellip, truth.psf_theta)[0]
            win = np.s_[iy - h:iy + h + 1, ix - h:ix + h + 1]
            if model[win].max() > 0.8 * cfg.saturation:
                continue
            w = p / var[win]
            f_hat = np.sum(w * diff[win]) / np.sum(w * p)
            err = 1 / np.sqrt(np.sum(w * p))
            rec.append(t.snr)
            meas.append(f_hat / err)
            flux_ratio.append(f_hat / t.flux)
    rec, meas = np.array(rec), np.array(meas)
    assert len(rec) >= 50
    assert rec.min() > 2 and rec.max() < 80
    resid = meas - rec  # unit-variance Gaussian when the recorded S/N is right
    assert abs(np.mean(resid)) < 0.4 and np.std(resid) == pytest.approx(1.0, abs=0.3)
    assert np.median(flux_ratio) == pytest.approx(1.0, abs=0.05)


def test_saturated_stars_are_flat_topped():
    cfg = SimConfig(shape=(128, 128), n_stars=5, star_mag_range=(9.0, 10.0), n_galaxies=0,
                    n_transients=0, n_variables=0, n_moving=0, **QUIET)
    frame, _ = SkySimulator(cfg, seed=1).frame("F001", "r", 0)
    assert frame.data.max() == cfg.saturation
    assert (frame.data == cfg.saturation).sum() >= 10  # plateaus, not single pixels


def test_bright_stars_carry_diffraction_spikes_along_the_telescopes_axes():
    angle = 30.0
    cfg = SimConfig(shape=(256, 256), n_stars=1, star_mag_range=(9.0, 9.0), n_galaxies=0,
                    n_transients=0, n_variables=0, n_moving=0, spike_strength=0.01,
                    spike_angle=angle, **QUIET)
    spiked = SkySimulator(cfg, seed=7).static_model("F001", "r", 0)
    plain = SkySimulator(SimConfig(**{**cfg.__dict__, "spike_strength": 0.0}), seed=7
                         ).static_model("F001", "r", 0)
    arms = spiked - plain
    y0, x0 = np.unravel_index(np.argmax(plain), plain.shape)
    def at(r, a):  # the pixel r px from the star at position angle a (deg), or None off the frame
        y, x = int(round(y0 + r * np.sin(np.deg2rad(a)))), int(round(x0 + r * np.cos(np.deg2rad(a))))
        return arms[y, x] if 0 <= y < arms.shape[0] and 0 <= x < arms.shape[1] else None

    for r in (15, 40):  # on the four arms, and halfway between them
        on = [v for k in range(4) if (v := at(r, angle + 90 * k)) is not None]
        off = [v for k in range(4) if (v := at(r, angle + 45 + 90 * k)) is not None]
        assert len(on) >= 2 and min(on) > 20 * max(max(off), 1e-3), (r, on, off)
    assert arms[y0, x0] < 0.05 * plain[y0, x0]  # the star itself is barely touched
    assert plain[y0, x0] > 1e6  # the star is on the frame (seed 7: at x, y = 199, 162)


def test_frames_are_epoch_major(sim):
    keys = [(t.epoch, t.field, t.filter) for _, t in sim.frames(5)]
    assert keys == [(0, "F001", "r"), (0, "F001", "g"), (0, "F002", "r"), (0, "F002", "g"),
                    (1, "F001", "r")]


def test_live_transients_never_share_a_host_galaxy():
    sim = SkySimulator(SimConfig(shape=(512, 512), n_galaxies=20, n_transients=9, host_max_mag=30.0,
                                 transient_on_galaxy=1.0, **QUIET), seed=2)
    for epoch in range(3, 9):
        xy = np.array([(t.x, t.y) for t in sim.frame("F001", "r", epoch)[1].of_kind("transient")])
        d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
        assert np.min(d[np.triu_indices(len(xy), 1)]) > 3.0, epoch


def test_truth_snr_leaves_out_pixels_without_information():
    from broker.simulate.render import optimal_snr

    psf = moffat_stamps([0.0], [0.0], 15, 3.0, 3.0)[0].ravel()
    signal, model = 1000.0 * psf[None], 1000.0 * psf[None] + 300.0
    lost = np.zeros_like(signal, bool)
    lost[0, np.argmax(psf)] = True  # a cosmic ray on the brightest pixel
    full = optimal_snr(signal, model, 1.5, 5.0)[0]
    left = optimal_snr(signal, model, 1.5, 5.0, lost)[0]
    assert 0.8 * full < left < full
    # in the simulator: saturated pixels carry nothing either
    def snrs(saturation):
        cfg = SimConfig(shape=(256, 256), n_stars=30, n_galaxies=0, n_transients=3, n_variables=0,
                        n_moving=0, saturation=saturation, **QUIET)
        return np.array([t.snr for t in SkySimulator(cfg, seed=4).frame("F001", "r", 3)[1].of_kind("transient")])

    high, low = snrs(1e9), snrs(SimConfig().sky_level * 1.3)
    assert np.all(low <= high) and np.any(low < 0.9 * high), (low, high)


def test_variable_bright_cap_keeps_most_bright_stars_constant():
    from broker.simulate.population import static_sky

    base = SimConfig(n_stars=3000, n_variables=500, variable_mag_range=(14.0, 20.0),
                     star_mag_range=(10.0, 22.5))
    free = static_sky(base, 3, "F0")
    capped = static_sky(SimConfig(**{**base.__dict__, "variable_bright_cap": (17.5, 0.1)}), 3, "F0")
    n_bright = np.sum(free.star_mag < 17.5)
    share = {k: np.sum(s.star_mag[s.var_index] < 17.5) / n_bright for k, s in
             (("free", free), ("capped", capped))}
    assert share["free"] > 0.3  # the uniform draw: a third or more of the bright stars vary
    assert 0.05 < share["capped"] <= 0.1
    mags = capped.star_mag[capped.var_index]
    assert np.all((mags >= 14.0) & (mags <= 20.0))
    # the rest come from the fainter stars of the range, as many as there are (no fallback)
    n_faint = np.sum((capped.star_mag >= 17.5) & (capped.star_mag <= 20.0))
    nb = np.sum(mags < 17.5)
    assert len(np.unique(capped.var_index)) == len(mags) == nb + min(500 - nb, n_faint)
    assert np.array_equal(free.star_mag, capped.star_mag)  # same sky, other variables
    for bad in ((17.5, -0.1), (17.5, 1.5), (float("nan"), 0.1)):
        with pytest.raises(ConfigError, match="variable_bright_cap"):
            static_sky(SimConfig(**{**base.__dict__, "variable_bright_cap": bad}), 3, "F0")


# --- follow-up visits ------------------------------------------------------------------------------


def test_a_follow_up_visit_is_the_same_epoch_later_with_its_own_draws(sim):
    f0, t0 = sim.frame("F001", "r", 4)
    f1, t1 = sim.frame("F001", "r", 4, visit=1, request_id="FU0123456789abcdef")
    f2, t2 = sim.frame("F001", "r", 4, visit=2)
    assert (t0.frame_id, t1.frame_id, t2.frame_id) == ("SIM1-F001-r-0004", "SIM1-F001-r-0004-v1", "SIM1-F001-r-0004-v2")
    assert f1.meta.frame_id == t1.frame_id and (t0.visit, t1.visit, t1.epoch) == (0, 1, 4)
    assert t1.mjd == pytest.approx(t0.mjd + SMALL.followup_gap_days, abs=1e-9)
    assert t2.mjd == pytest.approx(t0.mjd + 2 * SMALL.followup_gap_days, abs=1e-9)
    assert f1.header["FOLLOWUP"] == "FU0123456789abcdef" and f1.header["VISIT"] == 1
    assert "FOLLOWUP" not in f0.header and "VISIT" not in f0.header and "FOLLOWUP" not in f2.header
    assert t1.fwhm != t0.fwhm and not np.array_equal(f1.data, f0.data)  # seeing and noise of its own
    f1b, t1b = SkySimulator(SMALL, seed=7).frame("F001", "r", 4, visit=1, request_id="FU0123456789abcdef")
    assert np.array_equal(f1b.data, f1.data) and t1b == t1  # deterministic
    with pytest.raises(ValueError):
        sim.frame("F001", "r", 4, visit=-1)

    def by_id(truth, kind):
        return {i.source_id: i for i in truth.of_kind(kind)}

    tr0, tr1 = by_id(t0, "transient"), by_id(t1, "transient")
    assert tr0.keys() == tr1.keys() and tr0
    for sid, inj in tr0.items():  # transients: the epoch's brightness and position
        assert (tr1[sid].ra, tr1[sid].dec, tr1[sid].flux) == (inj.ra, inj.dec, inj.flux)
    mv0, mv1 = by_id(t0, "moving"), by_id(t1, "moving")
    assert mv0.keys() == mv1.keys() and all((mv0[k].ra, mv0[k].dec) != (mv1[k].ra, mv1[k].dec) for k in mv0)
    var0, var1 = by_id(t0, "variable"), by_id(t1, "variable")
    assert var0 and all(var0[k].flux != var1[k].flux for k in var0)  # the stars' phase moved on


def test_visit_zero_is_todays_frame(sim):
    f0, t0 = sim.frame("F002", "g", 3)
    fz, tz = sim.frame("F002", "g", 3, visit=0, request_id="ignored")
    assert np.array_equal(f0.data, fz.data) and t0 == tz and "FOLLOWUP" not in fz.header


def test_the_field_that_holds_a_position(sim):
    frame, truth = sim.frame("F002", "r", 4)
    inj = truth.of_kind("transient")[0]
    assert sim.field_at(inj.ra, inj.dec) == "F002"
    assert sim.field_at(inj.ra + 90.0, -inj.dec) is None
