"""Candidate batches: every field of ``candidates/v3`` round-trips, and v1 and v2 batches still decode."""

from __future__ import annotations

import math

import numpy as np
import pytest

import schemas
from broker.candidate import ObjectSummary
from broker.errors import DecodeError
from streams import serde
from tests.helpers import candidate, header

FORCED = [{"frame_id": "f0", "mjd": 59999.5, "exptime": 30.0, "filter": "r", "flux": -12.5, "flux_err": 40.0,
           "magzp": 27.0, "limiting_flux": 210.0},
          {"frame_id": "f1", "mjd": 60000.0, "exptime": 45.0, "filter": "r", "flux": 310.0, "flux_err": 42.0,
           "magzp": None, "limiting_flux": 190.5}]
HISTORY = [{"cand_id": "f1/3", "mjd": 60000.0, "filter": "r", "ra": 150.0, "dec": 2.0, "flux": 400.0,
            "flux_err": 40.0, "snr": 10.0, "rb": 0.9, "magzp": 27.0, "limiting_flux": 190.5, "telescope": "T"}]
CONTEXT = {"matches": [], "host": {"catalog": "reference", "name": "h", "ra": 150.0, "dec": 2.0, "offset_arcsec": 1.2,
                                   "offset_norm": 0.4, "nuclear": False, "flux": 800.0},
           "on_star": False, "moving": False, "moving_speed": None, "moving_links": []}
FOLLOWUP = {"request_id": "r1", "rule": "anomalous", "requested_mjd": 60000.0, "state": "requested", "n_since": 0}


def _batch(cands: list, **fields) -> dict:
    return {"frame_id": "f2", "telescope": "T", "field": "F", "filter": "r", "mjd_start": 60001.0, "exptime": 30.0,
            "magzp": 27.0, "status": "SUBTRACTED", "reference_frames": ["a"], "diagnostics": {"limiting_flux": 205.0},
            "model_versions": {}, "candidates": [serde.candidate_to_record(c) for c in cands], **fields}


def _tag(version: int | None = None) -> dict[str, bytes]:
    return {serde.SCHEMA_HEADER: serde.schema_tag("candidates", version).encode()}


def test_every_new_field_round_trips():
    cand = candidate()
    d = cand.detection
    d.x_err, d.y_err, d.ra_err, d.dec_err = 0.05, 0.07, 0.06, 0.08
    d.ref_extended, d.host_ra, d.host_dec, d.host_dist, d.host_size, d.host_flux = 1.0, 150.0, 2.0, 1.2, 3.0, 800.0
    cand.context, cand.followup = CONTEXT, FOLLOWUP
    cand.forced, cand.history = [dict(f) for f in FORCED], [dict(h) for h in HISTORY]
    cand.obj = ObjectSummary("OBJ1", 150.0, 2.0, 2, 60000.0)
    wcs_text = header().tostring()
    batch = _batch([cand], nx=2048, ny=4096, wcs_header=wcs_text, limiting_flux=205.0)
    back = serde.decode("candidates", serde.encode("candidates", batch), _tag())
    assert schemas.CURRENT["candidates"] == 3
    assert (back["nx"], back["ny"], back["wcs_header"], back["limiting_flux"]) == (2048, 4096, wcs_text, 205.0)
    again = serde.record_to_candidate(back["candidates"][0])
    assert (again.detection.x_err, again.detection.y_err, again.detection.ra_err, again.detection.dec_err) == (
        0.05, 0.07, 0.06, 0.08)
    assert again.forced == FORCED and again.history == HISTORY
    assert again.detection == cand.detection and again.obj == cand.obj
    assert (again.context, again.followup, again.features) == (CONTEXT, FOLLOWUP, None)
    assert np.array_equal(again.triplet(), cand.triplet())


def test_unknown_position_errors_travel_as_null():
    cand = candidate()  # errors NaN: not measured
    rec = serde.candidate_to_record(cand)
    assert rec["x_err"] is None and rec["dec_err"] is None and rec["forced"] == []
    back = serde.decode("candidates", serde.encode("candidates", _batch([cand], limiting_flux=None)), _tag())
    again = serde.record_to_candidate(back["candidates"][0])
    assert math.isnan(again.detection.x_err) and math.isnan(again.detection.ra_err) and again.forced == []
    assert back["limiting_flux"] is None


def test_a_v1_batch_still_decodes_with_the_new_fields_at_their_defaults():
    import io

    import fastavro

    rec = serde.candidate_to_record(candidate())
    for name in ("x_err", "y_err", "ra_err", "dec_err", "forced", "ref_extended", "host_ra", "host_dec", "host_dist",
                 "host_size", "host_flux", "context", "features", "classification", "followup"):
        del rec[name]
    rec["history"] = [{k: v for k, v in h.items() if k not in ("magzp", "limiting_flux", "telescope")} for h in HISTORY]
    v1 = _batch([]) | {"candidates": [rec]}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schemas.load("candidates", 1), v1)  # as the first release wrote it
    back = serde.decode("candidates", buf.getvalue(), _tag(1))
    assert (back["nx"], back["ny"], back["wcs_header"], back["limiting_flux"]) == (0, 0, "", None)
    (c,) = back["candidates"]
    assert c["forced"] == [] and c["x_err"] is None
    assert c["history"] == [h | {"magzp": None, "limiting_flux": None, "telescope": None} for h in rec["history"]]
    cand = serde.record_to_candidate(c)
    assert math.isnan(cand.detection.y_err) and cand.forced == [] and cand.detection.flux == 1000.0
    assert math.isnan(cand.detection.host_dist) and cand.context is None and cand.classification is None
    # and it re-encodes as v3 (what the classify and score stages do with it)
    serde.decode("candidates", serde.encode("candidates", back), _tag())


def test_a_hostile_schema_header_is_a_short_decode_error():
    """A ``schema`` header of megabytes (or not UTF-8) is refused, and the error does not copy it."""
    for tag in (b"frame/1" + b"9" * 5_000_000, b"\xff\xfe/1", "frame/\u00b2".encode(), b"candidates/1"):
        with pytest.raises(DecodeError) as err:
            serde.decode("frame", b"\x00\x01", {serde.SCHEMA_HEADER: tag})
        assert len(str(err.value)) < 200
