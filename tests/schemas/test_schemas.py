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
                     "flux_err": 1.0, "snr": 3.0, "rb": None, "magzp": 27.5, "limiting_flux": 40.0, "telescope": "T"}]
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


# --- alert versions: samples, resolution between versions ----------------------------------------
ALERT_VERSIONS = schemas.versions("alert")
#: Major (incompatible) alert versions: the previous version's alerts do not resolve to them.
ALERT_MAJOR: set[int] = set()


def _read_sample(version: int, reader_schema: dict | None = None) -> tuple[dict, dict]:
    """The sample alert of ``version`` and its writer schema (read as ``reader_schema`` when given)."""
    import fastavro

    from tests.schemas.alert_samples import SAMPLES

    with (SAMPLES / f"v{version}.avro").open("rb") as fh:
        reader = fastavro.reader(fh, reader_schema=reader_schema)
        records = list(reader)
    assert len(records) == 1
    return records[0], reader.writer_schema


def _restricted(value, like):
    """``value`` cut down to the keys of ``like``, recursively (what an older reader sees)."""
    if isinstance(like, dict):
        return {k: _restricted(value[k], v) for k, v in like.items()}
    if isinstance(like, list):
        return [_restricted(v, w) for v, w in zip(value, like, strict=True)]
    return value


def test_the_current_alert_version_is_the_newest():
    assert schemas.CURRENT["alert"] == ALERT_VERSIONS[-1] == 4


@pytest.mark.parametrize("version", ALERT_VERSIONS)
def test_every_alert_version_has_a_sample_written_with_its_published_schema(version):
    import io

    import fastavro
    from fastavro.schema import to_parsing_canonical_form

    record, writer = _read_sample(version)
    # A published schema is never changed (docs aside): the sample was written with this very file.
    assert to_parsing_canonical_form(writer) == to_parsing_canonical_form(schemas.load("alert", version))
    assert record["schemavsn"] == f"{version}.0"
    for key in ("cutoutScience", "cutoutTemplate", "cutoutDifference"):
        assert read_stamp(record[key]["stampData"]).shape == (63, 63)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schemas.load("alert", version), record)
    buf.seek(0)
    assert fastavro.schemaless_reader(buf, schemas.load("alert", version)) == record


@pytest.mark.parametrize("version", [v for v in ALERT_VERSIONS[1:] if v not in ALERT_MAJOR])
def test_a_minor_alert_version_reads_the_previous_versions_alerts(version):
    old, _ = _read_sample(version - 1)
    resolved, _ = _read_sample(version - 1, reader_schema=schemas.load("alert", version))
    assert _restricted(resolved, old) == old  # every old field keeps its value
    if version == 2:  # the fields v2 added come out as their defaults
        assert resolved["sourceId"] is None and resolved["object"]["objectIdNum"] is None
        assert resolved["prv_nondetections"] == [] and resolved["prv_forced_sources"] == []
        assert resolved["source"]["magzpsci"] is resolved["source"]["diffmaglim"] is None
        assert all(p["magpsf"] is None for p in resolved["prv_sources"])


@pytest.mark.parametrize("version", [v for v in ALERT_VERSIONS[1:] if v not in ALERT_MAJOR])
def test_the_previous_alert_reader_reads_a_minor_versions_alerts(version):
    new, _ = _read_sample(version)
    seen, _ = _read_sample(version, reader_schema=schemas.load("alert", version - 1))
    assert seen == _restricted(new, seen)  # an old client ignores the new fields


def test_the_current_builder_writes_the_current_sample():
    from tests.schemas.alert_samples import sample_alert

    record, _ = _read_sample(schemas.CURRENT["alert"])
    built = sample_alert()
    for key in ("cutoutScience", "cutoutTemplate", "cutoutDifference"):  # gzip bytes depend on the library
        assert np.array_equal(read_stamp(built.pop(key)["stampData"]), read_stamp(record.pop(key)["stampData"]),
                              equal_nan=True)
    built["publisher"] = record["publisher"]
    built["provenance"]["pipeline_version"] = record["provenance"]["pipeline_version"]
    assert built == record


def test_dlq_v2_reads_v1_dead_letters_and_v1_reads_v2():
    """``dlq/v2`` is a minor version: v1 records read with their defaults, and a v1 reader skips the new fields."""
    import io

    import fastavro

    v1 = {"stage": "ingest", "error_class": "CorruptFrame", "reason": "corrupt", "message": "not FITS",
          "topic": "frames", "partition": 0, "offset": 7, "timestamp_ms": 1, "key": b"k", "value": b"abc",
          "headers": {"schema": b"frame/1"}}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schemas.load("dlq", 1), v1)
    assert schemas.CURRENT["dlq"] == 2
    back = serde.decode("dlq", buf.getvalue(), {serde.SCHEMA_HEADER: b"dlq/1"})
    assert back == {**v1, "value_size": None, "value_sha256": None, "truncated": False}
    v2 = {**v1, "value": b"ab", "value_size": 3, "value_sha256": "0" * 64, "truncated": True}
    body = io.BytesIO(serde.encode("dlq", v2))
    old = fastavro.schemaless_reader(body, schemas.load("dlq", 2), schemas.load("dlq", 1))
    assert old == {**v1, "value": b"ab"}
