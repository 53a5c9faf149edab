"""The follow-up request record (``schemas/followup/v1.avsc``): documented, and round-trips."""

from __future__ import annotations

import io
import json
import math

import fastavro

import schemas
from broker.followup import FollowupRule, FollowupStatus, request_record
from streams.followup import decode_request, request_message
from streams.serde import SCHEMA_HEADER


def _leaf_fields(node):
    if isinstance(node, dict) and node.get("type") == "record":
        for f in node["fields"]:
            yield f
            yield from _leaf_fields(f["type"])
    elif isinstance(node, list):
        for branch in node:
            yield from _leaf_fields(branch)
    elif isinstance(node, dict):
        yield from _leaf_fields(node.get("type"))


def _record(**view_over):
    view = {"objectId": "OBJ0000000000001", "candid": "SIM1-F001-r-0004/7",
            "source": {"ra": 359.9999999, "dec": -89.5, "filter": "Hα", "mjd": 60004.1},
            "scores": {"rb": 0.95, "anomaly": None}, "classification": None, **view_over}
    status = FollowupStatus("FU0123456789abcdef", "anomalous", 60004.1, "requested", 0)
    return request_record(status, FollowupRule("anomalous", "scores.rb > 0.9"), view, "broker-test", 1.7e9)


def test_every_field_is_documented_with_a_unit_or_meaning():
    raw = json.loads((schemas.ROOT / "followup" / "v1.avsc").read_text())
    fields = list(_leaf_fields(raw))
    assert len(fields) >= 20 and all(f.get("doc") for f in fields)
    units = {f["name"]: f["doc"] for f in fields}
    assert "[deg]" in units["ra"] and "[s]" in units["exposure_s"] and "[d]" in units["cadence_days"]
    assert schemas.versions("followup") == [1] and schemas.load("followup", 1)["name"].endswith("FollowupRequest")


def test_the_record_round_trips_schemaless_and_as_a_container():
    rec = _record()
    msg = request_message(rec)
    assert msg.topic == "followup" and msg.key == b"OBJ0000000000001"
    assert msg.headers == {SCHEMA_HEADER: b"followup/1"}
    assert decode_request(msg.value, msg.headers) == rec
    buf = io.BytesIO()
    fastavro.writer(buf, schemas.load("followup", 1), [rec])
    (back,) = list(fastavro.reader(io.BytesIO(buf.getvalue())))
    assert back == rec and back["filter"] == "Hα" and back["reason"]["anomaly"] is None


def test_nan_coordinates_travel_so_that_the_listener_can_refuse_them():
    rec = _record(source={"ra": float("nan"), "dec": 1.0, "filter": "r"})
    back = decode_request(request_message(rec).value)
    assert math.isnan(back["ra"])
