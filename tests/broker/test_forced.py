"""Forced photometry at any position, on every kept difference image that covers it."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from broker.diffstore import DifferenceStore
from broker.errors import InvalidQuery
from broker.forced import forced_light_curve, with_magnitudes
from tests.broker.test_diffstore import _header, _image, _meta, _sky


@pytest.fixture
def store(tmp_path):
    """Two telescopes over one field: a source of 800 ADU at (60.3, 50.6) px of T1's frame b, nothing elsewhere."""
    store = DifferenceStore(tmp_path)
    store.put(_meta("a", 1.0), _header(), _image(1))
    store.put(_meta("b", 2.0), _header(), _image(2, [(60.3, 50.6, 800.0)]))
    other = replace(_meta("c", 1.5), telescope="T2", field="F9", filter="g", magzp=None)
    store.put(other, _header(dx=20.0), _image(3))  # shifted 20 px: the position is still on it
    return store


def test_every_frame_of_every_telescope_that_covers_the_position_oldest_first(store):
    ra, dec = (float(v[0]) for v in _sky(np.array([[60.3, 50.6]])))
    points = forced_light_curve(store, ra, dec)
    assert [(p["telescope"], p["field"], p["frame_id"], p["filter"]) for p in points] == [
        ("T1", "F1", "a", "r"), ("T2", "F9", "c", "g"), ("T1", "F1", "b", "r")]
    a, c, b = points
    assert abs(b["flux"] - 800.0) < 3 * b["flux_err"] and abs(a["flux"]) < 4 * a["flux_err"]
    assert b["mag"] == pytest.approx(27.0 - 2.5 * math.log10(b["flux"])) and b["mag_err"] == pytest.approx(
        1.0857 / b["snr"], rel=1e-3)
    assert a["mag_limit"] == pytest.approx(27.0 - 2.5 * math.log10(a["limiting_flux"]))
    assert c["magzp"] is None and c["mag"] is None and c["mag_limit"] is None  # no zero point: fluxes only
    assert [p["frame_id"] for p in forced_light_curve(store, ra, dec, start_mjd=1.2, end_mjd=2.0)] == ["c"]


def test_a_position_no_frame_covers_gives_nothing(store):
    ra, dec = (float(v[0]) for v in _sky(np.array([[-200.0, 50.0]])))
    assert forced_light_curve(store, ra, dec) == []
    assert forced_light_curve(DifferenceStore(store.root / "none"), 10.0, 0.0) == []


def test_faint_points_are_upper_limits_and_negative_fluxes_have_no_magnitude():
    point = {"flux": -50.0, "flux_err": 25.0, "magzp": 27.0, "limiting_flux": 125.0}
    assert with_magnitudes(point) == {**point, "snr": -2.0, "mag": None, "mag_err": None,
                                      "mag_limit": pytest.approx(27.0 - 2.5 * math.log10(125.0))}
    assert with_magnitudes({**point, "flux": 60.0})["mag"] is None  # S/N 2.4 < 3
    assert with_magnitudes({**point, "flux": 60.0}, min_snr=2.0)["mag"] == pytest.approx(27.0 - 2.5 * math.log10(60))
    assert with_magnitudes({**point, "flux_err": 0.0})["snr"] is None


@pytest.mark.parametrize("ra,dec,kw", [
    (float("nan"), 0.0, {}), (360.0, 0.0, {}), (-1.0, 0.0, {}), (10.0, 90.5, {}), (10.0, float("inf"), {}),
    (10.0, 0.0, {"start_mjd": 2.0, "end_mjd": 2.0}), (10.0, 0.0, {"start_mjd": float("nan")}),
    (10.0, 0.0, {"min_snr": 0.0}), (10.0, 0.0, {"min_snr": float("nan")}),
])
def test_hostile_positions_and_ranges_are_refused(store, ra, dec, kw):
    with pytest.raises(InvalidQuery):
        forced_light_curve(store, ra, dec, **kw)


def test_an_unreadable_kept_frame_is_skipped_with_a_warning(store):
    ra, dec = (float(v[0]) for v in _sky(np.array([[60.3, 50.6]])))
    (store.root / "T1" / "F1" / "r" / "b" / "meta.json").write_text("{not json")
    fresh = DifferenceStore(store.root)
    with pytest.warns(UserWarning, match="skipping unreadable"):
        assert [p["frame_id"] for p in forced_light_curve(fresh, ra, dec)] == ["a", "c"]


def test_fields_elsewhere_on_the_sky_are_not_opened(store):
    """Each field's footprint is read once, from one frame's metadata; its frames are opened only when it is near."""
    far = replace(_meta("far", 1.2), telescope="T3", field="F7")
    store.put(far, _header(dx=5000.0), _image(4))  # 5000 px away (83 arcmin), 50 times its radius
    (store.root / "T3" / "F7" / "r" / "far" / "psf.npy").write_bytes(b"broken")  # opening it would warn
    ra, dec = (float(v[0]) for v in _sky(np.array([[60.3, 50.6]])))
    fresh = DifferenceStore(store.root)
    assert [p["frame_id"] for p in forced_light_curve(fresh, ra, dec)] == ["a", "c", "b"]
    assert len(fresh._footprints) == 3
    far_ra, far_dec = (float(v[0]) for v in _sky(np.array([[60.0, 50.0]]), dx=5000.0))
    with pytest.warns(UserWarning, match="skipping unreadable"):
        assert forced_light_curve(fresh, far_ra, far_dec) == []
