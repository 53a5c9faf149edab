import math

import numpy as np
import pytest

from broker.errors import ConfigError
from broker.history import ObjectHistory
from broker.moving import MovingConfig, link_from_history, link_tracklet, tangent_plane
from tests.helpers import candidate


def _track(ra0, dec0, speed_arcsec_day, angle_deg, mjds):
    """Positions (deg) of uniform motion from (ra0, dec0) on the tangent plane."""
    t = np.asarray(mjds) - mjds[0]
    dx = speed_arcsec_day * t * math.sin(math.radians(angle_deg)) / 3600.0
    dy = speed_arcsec_day * t * math.cos(math.radians(angle_deg)) / 3600.0
    return ra0 + dx / math.cos(math.radians(dec0)), dec0 + dy


def test_three_epochs_on_a_line_are_linked_with_their_speed():
    mjd = np.array([60000.0, 60001.02, 60002.05])
    ra, dec = _track(150.0, 2.0, 120.0, 30.0, mjd)
    rng = np.random.default_rng(1)
    # distractors: single detections scattered over the search area at the same epochs
    d_ra, d_dec = 150.0 + rng.uniform(-0.1, 0.1, 40), 2.0 + rng.uniform(-0.1, 0.1, 40)
    d_mjd = rng.choice(mjd[:2], 40)
    o_ra, o_dec = np.concatenate([ra[:2], d_ra]), np.concatenate([dec[:2], d_dec])
    o_mjd = np.concatenate([mjd[:2], d_mjd])
    ids = ["a", "b"] + [f"x{i}" for i in range(40)]
    tr = link_tracklet(float(ra[2]), float(dec[2]), float(mjd[2]), o_ra, o_dec, o_mjd, ids)
    assert tr is not None
    assert tr.cand_ids == ("a", "b")
    assert abs(tr.speed_arcsec_day - 120.0) < 1.0 and tr.rms_arcsec < 0.1


def test_no_tracklet_from_too_few_or_simultaneous_or_out_of_range_detections():
    mjd = np.array([60000.0, 60001.0, 60002.0])
    ra, dec = _track(10.0, -30.0, 100.0, 200.0, mjd)
    # one earlier detection only
    assert link_tracklet(ra[2], dec[2], mjd[2], ra[:1], dec[:1], mjd[:1], ["a"]) is None
    # two earlier ones at the same time
    assert link_tracklet(ra[2], dec[2], mjd[2], ra[:2], dec[:2], np.array([mjd[0], mjd[0]]), ["a", "b"]) is None
    # too slow (2"/day < 5"/day) and too fast (2 deg/day)
    for speed in (2.0, 7200.0):
        r, d = _track(10.0, -30.0, speed, 200.0, mjd)
        assert link_tracklet(r[2], d[2], mjd[2], r[:2], d[:2], mjd[:2], ["a", "b"]) is None
    # not on a line: the middle point 10" off
    assert link_tracklet(ra[2], dec[2], mjd[2], ra[:2], dec[:2] + np.array([0, 10 / 3600]), mjd[:2], ["a", "b"]) is None


def test_linking_across_ra_zero_and_with_more_epochs():
    mjd = np.array([60000.0, 60000.5, 60001.0, 60001.5])
    ra, dec = _track(359.99, 10.0, 300.0, 90.0, mjd)  # eastwards across RA 0
    ra = ra % 360.0
    tr = link_tracklet(ra[3], dec[3], mjd[3], ra[:3], dec[:3], mjd[:3], ["a", "b", "c"])
    assert tr is not None and tr.cand_ids == ("a", "b", "c")
    assert abs(tr.speed_arcsec_day - 300.0) < 1.0


def test_hostile_input_gives_no_tracklet():
    o = np.array([150.0, 150.001]), np.array([2.0, 2.0]), np.array([60000.0, 60001.0])
    for ra, dec, mjd in ((math.nan, 2.0, 60002.0), (150.0, 95.0, 60002.0), (150.0, 2.0, math.inf)):
        assert link_tracklet(ra, dec, mjd, *o, ["a", "b"]) is None
    # NaN orphans are skipped, mismatched lengths refused
    assert link_tracklet(150.002, 2.0, 60002.0, np.array([math.nan, math.nan]), o[1], o[2], ["a", "b"]) is None
    assert link_tracklet(150.002, 2.0, 60002.0, *o, ["a"]) is None
    assert link_tracklet(150.0, 2.0, 60002.0, np.zeros(0), np.zeros(0), np.zeros(0), []) is None


def test_tangent_plane_is_arcsec_east_and_north():
    xi, eta = tangent_plane(150.0, 0.0, np.array([150.0 + 1 / 3600, 150.0]), np.array([0.0, 1 / 3600]))
    assert np.allclose(xi, [1.0, 0.0], atol=1e-6) and np.allclose(eta, [0.0, 1.0], atol=1e-6)
    xi, _ = tangent_plane(150.0, 0.0, np.array([330.0]), np.array([0.0]))  # the far side: NaN
    assert np.isnan(xi[0])


def test_recent_orphans_are_single_detections_in_the_window_and_circle():
    h = ObjectHistory(":memory:")
    h.associate("f0", 60000.0, "r", [candidate("f0/0", ra=150.0, dec=2.0),
                                     candidate("f0/1", ra=150.05, dec=2.0),
                                     candidate("f0/2", ra=152.0, dec=2.0)])
    h.associate("f1", 60001.0, "r", [candidate("f1/0", ra=150.0, dec=2.0),  # joins f0/0: ndet 2
                                     candidate("f1/1", ra=150.0, dec=2.03)])
    h.associate("f2", 59990.0, "r", [candidate("f2/0", ra=150.01, dec=2.01)])  # too old
    ra, dec, mjd, ids = h.recent_orphans(150.0, 2.0, 60002.0, radius_deg=0.1, days=3.0)
    assert ids == ["f0/1", "f1/1"]
    assert np.allclose(mjd, [60000.0, 60001.0]) and np.allclose(ra, [150.05, 150.0]) and np.allclose(dec, [2.0, 2.03])
    # only detections before mjd; hostile input gives nothing
    assert h.recent_orphans(150.0, 2.0, 60001.0, 0.1, 3.0)[3] == ["f0/1"]
    for bad in ((math.nan, 2.0), (150.0, 91.0)):
        assert h.recent_orphans(*bad, 60002.0, 0.1, 3.0)[3] == []
    cfg = MovingConfig()
    assert cfg.search_radius_deg() == cfg.max_speed_arcsec_day * cfg.window_days / 3600.0


def test_a_mover_in_the_history_links_at_its_third_detection():
    h = ObjectHistory(":memory:")
    mjd = [60000.0, 60001.1, 60002.0]
    ra, dec = _track(150.0, 2.0, 80.0, 120.0, mjd)
    for k in range(3):
        h.associate(f"f{k}", mjd[k], "r", [candidate(f"f{k}/0", ra=float(ra[k]), dec=float(dec[k])),
                                           candidate(f"f{k}/1", ra=150.2, dec=2.1)])  # a constant source
    tr = link_from_history(h, float(ra[2]), float(dec[2]), mjd[2])
    assert tr is not None and tr.cand_ids == ("f0/0", "f1/0") and abs(tr.speed_arcsec_day - 80.0) < 0.5
    assert link_from_history(h, 150.2, 2.1, mjd[2]) is None  # the constant source: ndet 3, no orphans on a line
    assert link_from_history(h, float(ra[1]), float(dec[1]), mjd[1]) is None  # only one earlier detection
    assert link_from_history(h, math.nan, 2.0, mjd[2]) is None


def test_epochs_of_no_duration_are_a_config_error():
    """``min_dt_days = 0`` loaded, then every candidate with orphans nearby was a ZeroDivisionError."""
    with pytest.raises(ConfigError, match="min_dt_days must be above 0"):
        MovingConfig(min_dt_days=0.0)
