"""Alert packets v2: schema fit, photometry, upper limits, FITS cutouts with WCS, hostile inputs."""

from __future__ import annotations

import gzip
import io
import math

import fastavro
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import schemas
from broker.alert import (
    FrameContext,
    alert_id,
    build_alert,
    card,
    fits_image,
    frame_context,
    object_num_id,
    read_stamp,
    upper_limits,
)
from broker.candidate import ObjectSummary
from broker.cutouts import triplet
from broker.errors import SchemaError
from broker.normalise import decode_stamp
from streams import serde
from tests.helpers import candidate, header

MODELS = {"rb": "rb-1", "anomaly": "an-1"}
TIMING = {"exposure_end": 1.7e9, "stages": [{"stage": "ingest", "start": 1.7e9 + 1, "end": 1.7e9 + 2}]}
FRAME = "TEST-F1-r-0009"


def _ctx(magzp: float | None = 27.0, wcs_header: str = "", limiting_flux: float | None = 100.0) -> FrameContext:
    return FrameContext(FRAME, "TEST", "F1", "r", 60009.5, 30.0, magzp, ("a", "b"), wcs_header, limiting_flux)


def _scored(cand_id: str = f"{FRAME}/0", **kw):
    cand = candidate(cand_id, **kw)
    cand.rb, cand.anomaly = 0.9, 0.2
    cand.obj = ObjectSummary("OBJ00000000000ff", 150.0, 2.0, 1, 60000.5)
    return cand


def _forced(i: int, flux: float = 10.0, magzp: float | None = 27.0, lim: float = 100.0) -> dict:
    return {"frame_id": f"TEST-F1-r-000{i}", "mjd": 60000.5 + i, "exptime": 30.0, "filter": "r", "flux": flux,
            "flux_err": 20.0, "magzp": magzp, "limiting_flux": lim}


def _history(i: int, flux: float = 500.0, magzp: float | None = 27.0, lim: float | None = 100.0) -> dict:
    return {"cand_id": f"TEST-F1-r-000{i}/4", "mjd": 60000.5 + i, "filter": "r", "ra": 150.0, "dec": 2.0,
            "flux": flux, "flux_err": 25.0, "snr": flux / 25.0, "rb": 0.8, "magzp": magzp, "limiting_flux": lim}


def _round_trip(alert: dict) -> dict:
    """Encode with the current alert schema as the alert stage does, decode with plain fastavro."""
    (back,) = list(fastavro.reader(io.BytesIO(serde.encode_ocf("alert", alert))))
    return back


def _open(stamp_data: bytes) -> fits.HDUList:
    hdul = fits.open(io.BytesIO(gzip.decompress(stamp_data)))
    hdul.verify("exception")
    return hdul


def test_v3_record_fits_the_schema_and_round_trips():
    cand = _scored()
    cand.history = [_history(1), _history(3)]
    cand.forced = [_forced(3), _forced(1), _forced(2)]
    alert = build_alert(_ctx(), cand, MODELS, TIMING, 1.7e9 + 5)
    assert schemas.CURRENT["alert"] == 4 and alert["schemavsn"] == "4.0"
    assert fastavro.validate(alert, schemas.load("alert"), raise_errors=True)
    back = _round_trip(alert)
    assert back["sourceId"] == back["alertId"] == alert_id(cand.cand_id)
    assert back["object"]["objectIdNum"] == 0xFF
    assert [p["frame_id"] for p in back["prv_sources"]] == ["TEST-F1-r-0001", "TEST-F1-r-0003"]
    assert [p["sourceId"] for p in back["prv_sources"]] == [alert_id("TEST-F1-r-0001/4"), alert_id("TEST-F1-r-0003/4")]
    assert [f["frame_id"] for f in back["prv_forced_sources"]] == [f"TEST-F1-r-000{i}" for i in (1, 2, 3)]
    assert back["source"]["mjd_mid"] == pytest.approx(60009.5 + 15.0 / 86400, abs=1e-9)
    assert back["source"]["x_err"] is None  # the helper's detection has no position errors (NaN)


def test_upper_limits_exclude_frames_with_a_detection_and_the_alerts_own_frame():
    forced = [_forced(i) for i in (4, 1, 2, 3)] + [{**_forced(9), "frame_id": FRAME}]
    history = [_history(1), _history(3)]
    limits = upper_limits(FRAME, forced, history)
    assert [u["frame_id"] for u in limits] == ["TEST-F1-r-0002", "TEST-F1-r-0004"]  # oldest first
    cand = _scored()
    cand.history, cand.forced = history, forced
    back = _round_trip(build_alert(_ctx(), cand, MODELS, TIMING, 0.0))
    assert [u["frame_id"] for u in back["prv_nondetections"]] == ["TEST-F1-r-0002", "TEST-F1-r-0004"]
    assert len(back["prv_forced_sources"]) == 5  # forced photometry keeps every covering frame


def test_magnitudes_and_limits_for_known_fluxes_and_zero_points():
    cand = _scored(flux=1000.0, snr=10.0)  # flux_err 100
    cand.history = [_history(1, flux=-100.0, magzp=25.0, lim=10.0)]
    cand.forced = [_forced(2, flux=40.0, magzp=26.0, lim=1000.0), _forced(1, magzp=25.0, lim=10.0)]
    cand.detection.x_err, cand.detection.ra_err = 0.05, 0.06
    back = _round_trip(build_alert(_ctx(magzp=27.0, limiting_flux=100.0), cand, MODELS, TIMING, 0.0))
    src = back["source"]
    assert src["magpsf"] == pytest.approx(27.0 - 7.5)  # 1000 ADU
    assert src["sigmapsf"] == pytest.approx(2.5 / math.log(10) * 0.1)
    assert src["diffmaglim"] == pytest.approx(27.0 - 5.0) and src["limiting_flux"] == 100.0
    assert src["magzpsci"] == 27.0 and src["x_err"] == 0.05 and src["ra_err"] == 0.06
    (prv,) = back["prv_sources"]
    assert prv["isdiffpos"] is False and prv["magpsf"] == pytest.approx(25.0 - 5.0)  # |-100| ADU
    assert prv["sigmapsf"] == pytest.approx(2.5 / math.log(10) * 0.25)
    assert prv["magzpsci"] == 25.0 and prv["diffmaglim"] == pytest.approx(25.0 - 2.5)
    (upper,) = back["prv_nondetections"]
    assert upper["frame_id"] == "TEST-F1-r-0002" and upper["diffmaglim"] == pytest.approx(26.0 - 7.5)
    forced = {f["frame_id"]: f for f in back["prv_forced_sources"]}
    assert forced["TEST-F1-r-0002"]["snr"] == pytest.approx(2.0)
    assert forced["TEST-F1-r-0002"]["mjd_mid"] == pytest.approx(60002.5 + 15.0 / 86400, abs=1e-9)
    assert forced["TEST-F1-r-0001"]["diffmaglim"] == pytest.approx(22.5)


@pytest.mark.parametrize("magzp", [None, float("nan")])
def test_no_zero_point_gives_null_magnitudes(magzp):
    cand = _scored()
    cand.history = [_history(1, magzp=None)]
    cand.forced = [_forced(2, magzp=None)]
    back = _round_trip(build_alert(_ctx(magzp=magzp), cand, MODELS, TIMING, 0.0))
    src = back["source"]
    assert src["magpsf"] is src["sigmapsf"] is src["magzpsci"] is src["diffmaglim"] is None
    assert src["limiting_flux"] == 100.0  # the flux limit needs no zero point
    assert back["prv_sources"][0]["magpsf"] is None and back["prv_sources"][0]["diffmaglim"] is None
    assert back["prv_nondetections"][0]["diffmaglim"] is None and back["prv_nondetections"][0]["limiting_flux"] == 100
    assert back["prv_forced_sources"][0]["magzpsci"] is None
    with _open(back["cutoutScience"]["stampData"]) as hdul:
        assert "MAGZP" not in hdul[0].header


def _frame_wcs(sip: bool) -> WCS:
    w = WCS(header((400, 300)))
    if sip:  # a SIP distortion of a few px at the corners: exact under a shift of CRPIX
        h = w.to_header(relax=True)
        h["CTYPE1"], h["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
        h.update({"A_ORDER": 2, "B_ORDER": 2, "A_2_0": 2e-5, "A_1_1": -1e-5, "B_0_2": 3e-5, "B_1_1": 1e-5})
        w = WCS(h)
    return w


@pytest.mark.parametrize("sip", [False, True])
@pytest.mark.parametrize("xy", [(150.3, 200.7), (10.5, 390.2), (299.9, 0.4)])  # centre, near edges (NaN padding)
def test_stamps_carry_the_frame_wcs_shifted_to_the_stamp(sip, xy):
    frame_wcs = _frame_wcs(sip)
    rng = np.random.default_rng(3)
    images = [rng.normal(size=(400, 300)).astype(np.float32) for _ in range(3)]
    x, y = xy
    cand = _scored()
    cand.detection.x, cand.detection.y = x, y
    cand.science, cand.reference, cand.difference = triplet(*images, x, y)
    ctx = _ctx(wcs_header=frame_wcs.to_header(relax=True).tostring())
    alert = _round_trip(build_alert(ctx, cand, MODELS, TIMING, 0.0))
    x0, y0 = int(np.round(x)) - 31, int(np.round(y)) - 31
    for key, kind, cut in (("cutoutScience", "science", cand.science), ("cutoutTemplate", "template", cand.reference),
                           ("cutoutDifference", "difference", cand.difference)):
        data = alert[key]["stampData"]
        with _open(data) as hdul:
            h = hdul[0].header
            assert (h["BUNIT"], h["TYPE"], h["CANDID"], h["OBJECT"]) == ("adu", kind, cand.cand_id, "OBJ00000000000ff")
            assert h["MAGZP"] == 27.0 and (h["LTV1"], h["LTV2"]) == (-x0, -y0)
            stamp_wcs = WCS(h)
            np.testing.assert_array_equal(hdul[0].data, cut)  # NaN outside the frame stays NaN
        jj, ii = np.mgrid[0:63:7, 0:63:7]
        sky_stamp = stamp_wcs.pixel_to_world_values(ii, jj)
        sky_frame = frame_wcs.pixel_to_world_values(ii + x0, jj + y0)
        np.testing.assert_allclose(sky_stamp, sky_frame, rtol=0, atol=1e-10)  # deg
        np.testing.assert_array_equal(read_stamp(data), cut)
        np.testing.assert_array_equal(decode_stamp(data), cut)
    centre = stamp_wcs.world_to_pixel_values(cand.detection.ra, cand.detection.dec)
    assert all(np.isfinite(centre))


def test_fits_cards_are_standard():
    cases = {"F1": 1e-5, "F2": -7.716049382716049e-05, "F3": 123456789.0, "F4": 0.1, "F5": -1.2345678901234567e-300,
             "I1": -12, "B1": False,
             "S1": "it's", "S2": "x" * 100, "S3": "caf\u00e9\x00"}
    raw = fits_image(np.zeros((2, 3), np.float32), [card(k, v, "a comment") for k, v in cases.items()])
    assert len(raw) % 2880 == 0
    with fits.open(io.BytesIO(raw)) as hdul:
        hdul.verify("exception")
        h = hdul[0].header
        assert hdul[0].data.shape == (2, 3)
    for key in ("F1", "F2", "F3", "F4", "F5", "I1", "B1", "S1"):
        assert h[key] == cases[key] and type(h[key]) is type(cases[key])
    assert h["S2"] == "x" * 66 and h["S3"] == "caf??"


LINEAR = "".join(c.ljust(80) for c in ("CTYPE1  = 'LINEAR  '", "CTYPE2  = 'LINEAR  '", "CRPIX1  = 1.0"))


@pytest.mark.parametrize("x", [float("nan"), 1e300, -float("inf")])
def test_no_stamp_origin_without_a_sane_position(x):
    cand = _scored()
    cand.detection.x = x
    ctx = _ctx(wcs_header=WCS(header()).to_header(relax=True).tostring())
    with _open(_round_trip(build_alert(ctx, cand, MODELS, TIMING, 0.0))["cutoutScience"]["stampData"]) as hdul:
        assert "LTV1" not in hdul[0].header and "CRPIX1" not in hdul[0].header


@pytest.mark.parametrize("wcs_header", ["", "garbage", "x" * 2880, "CTYPE1  = 'RA---TAN'" + " " * 60,
                                        "\x00\xff" * 100, "caf\u00e9" * 40, LINEAR])
def test_hostile_inputs_do_not_crash(wcs_header):
    cand = _scored()
    cand.detection.x = float("nan")  # no stamp origin: no WCS either
    cand.science[:] = np.nan
    cand.reference[:] = np.inf
    cand.history = []
    cand.forced = [_forced(1, lim=0.0), {**_forced(2), "flux_err": 0.0, "limiting_flux": float("nan")}]
    back = _round_trip(build_alert(_ctx(wcs_header=wcs_header, limiting_flux=-1.0), cand, MODELS, TIMING, 0.0))
    assert back["prv_sources"] == [] and back["source"]["diffmaglim"] is None
    assert [u["diffmaglim"] for u in back["prv_nondetections"]] == [None, None]
    assert back["prv_forced_sources"][1]["snr"] is None
    assert np.isnan(read_stamp(back["cutoutScience"]["stampData"])).all()
    assert np.isposinf(read_stamp(back["cutoutTemplate"]["stampData"])).all()
    with _open(back["cutoutDifference"]["stampData"]) as hdul:
        assert "CTYPE1" not in hdul[0].header and "LTV1" not in hdul[0].header


def test_stamps_without_a_wcs_have_the_frame_origin_only():
    cand = _scored()
    back = _round_trip(build_alert(_ctx(wcs_header=""), cand, MODELS, TIMING, 0.0))
    with _open(back["cutoutDifference"]["stampData"]) as hdul:
        h = hdul[0].header
        assert "CTYPE1" not in h and (h["LTV1"], h["LTV2"]) == (-(10 - 31), -(20 - 31))


def test_unscored_candidates_and_bad_stamps_are_schema_errors():
    cand = candidate()
    with pytest.raises(SchemaError):
        build_alert(_ctx(), cand, MODELS, TIMING, 0.0)
    cand = _scored()
    cand.difference = np.zeros((2, 63, 63), np.float32)
    with pytest.raises(SchemaError):
        build_alert(_ctx(), cand, MODELS, TIMING, 0.0)


def test_frame_context_reads_v1_and_v2_batches():
    v1 = {"frame_id": "f", "telescope": "T", "field": "F", "filter": "g", "mjd_start": 1.0, "exptime": 2.0,
          "magzp": None, "reference_frames": ["a"]}
    ctx = frame_context(v1)
    assert ctx.wcs_header == "" and ctx.limiting_flux is None and ctx.diffmaglim is None and ctx.stamp_wcs is None
    v2 = {**v1, "magzp": 25.0, "nx": 300, "ny": 400, "limiting_flux": 10.0,
          "wcs_header": WCS(header((400, 300))).to_header(relax=True).tostring()}
    ctx = frame_context(v2)
    assert ctx.diffmaglim == pytest.approx(22.5) and ctx.stamp_wcs is not None
    assert ctx.mjd_mid == pytest.approx(1.0 + 1.0 / 86400)


def test_numeric_object_ids():
    assert object_num_id("OBJ0123456789abc") == 0x0123456789ABC
    assert "OBJ%013x" % object_num_id("OBJ0123456789abc") == "OBJ0123456789abc"
    for foreign in ("ZTF21aaaaaaa", "OBJxyz0000000000", "OBJ0x0000000001f", "OBJ0000000001F_1", ""):
        assert 0 <= object_num_id(foreign) < 2**63


def test_commentary_and_junk_cards_of_the_frame_header_stay_out_of_the_stamps():
    good = WCS(header((400, 300))).to_header(relax=True)
    good["COMMENT"] = "a comment"
    good["LONGSTR"] = "a long string value " * 6  # written with CONTINUE cards
    junk = ("this is no card", "NAXIS1  =                 4096", "AB = 5", "lower   =                    1")
    text = good.tostring() + "".join(c.ljust(80) for c in junk)
    cand = _scored()
    back = _round_trip(build_alert(_ctx(wcs_header=text), cand, MODELS, TIMING, 0.0))
    with _open(back["cutoutScience"]["stampData"]) as hdul:
        h = hdul[0].header
        assert h["NAXIS1"] == 63 and "COMMENT" not in h and h["LONGSTR"] == good["LONGSTR"]
        assert "AB" not in h and "LOWER" not in h
        assert WCS(h).has_celestial
