"""Every schema version parses, documents every field, and round-trips a sample record."""

import math

import numpy as np
import pytest

import schemas
from broker.alert import FrameContext, alert_id, build_alert, read_stamp
from broker.candidate import ObjectSummary
from broker.errors import DecodeError
from streams import serde
from tests.helpers import candidate


def _fields(schema):
    if isinstance(schema, dict):
        if schema.get("type") == "record":
            for f in schema["fields"]:
                yield f
                yield from _fields(f["type"])
        elif schema.get("type") in ("array", "map"):
            yield from _fields(schema.get("items") or schema.get("values"))
    elif isinstance(schema, list):
        for s in schema:
            yield from _fields(s)


@pytest.mark.parametrize("name", list(schemas.CURRENT))
def test_every_version_parses_and_documents_its_fields(name):
    import json

    for version in schemas.versions(name):
        raw = json.loads((schemas.ROOT / name / f"v{version}.avsc").read_text())
        undocumented = [f["name"] for f in _fields(raw) if not f.get("doc")]
        assert not undocumented, f"{name} v{version}: fields without doc: {undocumented}"
        schemas.load(name, version)


def _alert():
    cand = candidate()
    cand.rb, cand.anomaly = 0.9, 0.2
    cand.obj = ObjectSummary("OBJ1", 150.0, 2.0, 1, 60000.5)
    ctx = FrameContext("TEST-F1-r-0001", "TEST", "F1", "r", 60000.5, 30.0, 27.0, ("a", "b"))
    timing = {"exposure_end": 1.7e9, "stages": [{"stage": "ingest", "start": 1.7e9 + 1, "end": 1.7e9 + 2}]}
    return cand, build_alert(ctx, cand, {"rb": "rb-1", "anomaly": "an-1"}, timing, 1.7e9 + 5)


def test_alert_round_trips_as_ocf_and_with_plain_fastavro():
    import io

    import fastavro

    cand, alert = _alert()
    body = serde.encode_ocf("alert", alert)
    (back,) = list(fastavro.reader(io.BytesIO(body)))  # what a subscriber with plain fastavro does
    assert back["candid"] == cand.cand_id and back["alertId"] == alert_id(cand.cand_id)
    assert back["source"]["magpsf"] == pytest.approx(27.0 - 2.5 * math.log10(1000.0))
    assert np.array_equal(read_stamp(back["cutoutDifference"]["stampData"]), cand.difference)


def test_candidate_batch_round_trip():
    cand = candidate()
    cand.rb = 0.7
    cand.history = [{"cand_id": "x/1", "mjd": 1.0, "filter": "r", "ra": 1.0, "dec": 2.0, "flux": 3.0,
                     "flux_err": 1.0, "snr": 3.0, "rb": None}]
    batch = {"frame_id": "f", "telescope": "T", "field": "F", "filter": "r", "mjd_start": 1.0, "exptime": 2.0,
             "magzp": None, "status": "SUBTRACTED", "reference_frames": ["a"], "diagnostics": {"x": 1.0},
             "model_versions": {}, "candidates": [serde.candidate_to_record(cand)]}
    tag = {serde.SCHEMA_HEADER: serde.schema_tag("candidates").encode()}
    back = serde.decode("candidates", serde.encode("candidates", batch), tag)
    again = serde.record_to_candidate(back["candidates"][0])
    assert again.rb == 0.7 and again.history == cand.history
    assert np.array_equal(again.triplet(), cand.triplet())


@pytest.mark.parametrize("payload,header", [(b"", None), (b"\x00\x01", None), (b"x" * 50, b"frame/1"),
                                            (b"x", b"candidates/99")])
def test_bad_bytes_are_decode_errors(payload, header):
    with pytest.raises(DecodeError):
        serde.decode("candidates", payload, {serde.SCHEMA_HEADER: header} if header else None)
