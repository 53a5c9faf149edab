"""The Parquet archive without Kafka: Arrow schemas per alert version, exact records, commits, corruption, queries."""

from __future__ import annotations

import copy
import datetime as dt
import io
import json
import math
import re
import time
import uuid

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from broker.alert import alert_id
from broker.archive import writer as writer_module
from broker.archive.arrow import arrow_type, file_schema
from broker.archive.config import ALERT_COLUMN, ArchiveConfig
from broker.archive.log import COMMITS, OffsetRange
from broker.archive.reader import Archive, cone_where, may_hold_cone
from broker.archive.rows import Archived, mjd_of, night_of, to_batch, to_current, version_of
from broker.archive.writer import ArchiveWriter
from broker.errors import ArchiveCorrupt, ArchiveError, ConfigError, SchemaError

VERSIONS = schemas.versions("alert")


def sample(version: int) -> dict:
    """The published sample alert of ``version`` (``schemas/alert/samples``)."""
    data = (schemas.ROOT / "alert" / "samples" / f"v{version}.avro").read_bytes()
    (record,) = fastavro.reader(io.BytesIO(data))
    return record


def random_value(avro, named: dict, rng: np.random.Generator):
    """A random value of an Avro type: edge values included (NaN, extremes, unicode, empty bytes)."""
    if isinstance(avro, str) and avro in named:
        return random_value(named[avro], named, rng)
    if isinstance(avro, list):
        branch = avro[int(rng.integers(len(avro)))]
        return random_value(branch, named, rng)
    kind = avro if isinstance(avro, str) else avro["type"]
    if kind == "record":
        return {f["name"]: random_value(f["type"], named, rng) for f in avro["fields"]}
    if kind == "array":
        return [random_value(avro["items"], named, rng) for _ in range(int(rng.integers(0, 4)))]
    if kind == "map":
        return {f"k{i}": random_value(avro["values"], named, rng) for i in range(int(rng.integers(0, 3)))}
    scalars = {
        "null": lambda: None,
        "boolean": lambda: bool(rng.integers(2)),
        "int": lambda: int(rng.choice([-(2**31), -1, 0, 7, 2**31 - 1])),
        "long": lambda: int(rng.choice([-(2**63), 0, 42, 2**63 - 1])),
        "float": lambda: float(np.float32(rng.normal())),
        "double": lambda: float(rng.choice([np.nan, -np.inf, 0.0, rng.normal() * 1e300, rng.normal()])),
        "string": lambda: str(rng.choice(["", "r", "Ωmega/β", "x" * 300])),
        "bytes": lambda: rng.bytes(int(rng.choice([0, 5, 4000]))),
    }
    if kind in scalars:
        return scalars[kind]()
    return random_value(kind, named, rng)


def random_alert(version: int, seed: int) -> dict:
    avro = schemas.load("alert", version)
    record = random_value(avro, avro["__named_schemas"], np.random.default_rng(seed))
    record["source"]["mjd"] = 60000.0 + seed * 0.37  # a finite time: the alert has a night
    buf = io.BytesIO()  # as a reader gets it: through Avro
    fastavro.schemaless_writer(buf, avro, record)
    buf.seek(0)
    return fastavro.schemaless_reader(buf, avro, avro)


def same(a, b) -> bool:
    """Deep equality with NaN equal to NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def archived(records: list[dict], topic: str = "alerts", start: int = 0) -> list[Archived]:
    return [Archived(r, version_of(r), topic, 0, start + i) for i, r in enumerate(records)]


def commit(writer: ArchiveWriter, alerts: list[Archived], dead: int = 0):
    batches = [to_batch([a]) for a in alerts]
    files = writer.write(batches)
    first, last = alerts[0].offset, alerts[-1].offset
    return writer.commit(files, [OffsetRange(alerts[0].topic, 0, first, last + 1)], dead)


def objects(n: int, version: int, ra0=150.0, dec0=2.0, seed=0) -> list[dict]:
    """``n`` copies of the sample alert, each its own object at a random position near (ra0, dec0)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rec = copy.deepcopy(sample(version))
        rec["objectId"], rec["candid"] = f"OBJ{i:06d}", f"F{seed}-{i}/0"
        rec["alertId"] = alert_id(rec["candid"])  # as the alert stage makes it: one alert, one id
        if "sourceId" in rec:
            rec["sourceId"] = rec["alertId"]
        rec["source"]["ra"], rec["source"]["dec"] = ra0 + rng.uniform(-1, 1), dec0 + rng.uniform(-1, 1)
        rec["scores"]["rb"] = float(rng.uniform())
        out.append(rec)
    return out


@pytest.fixture
def writer(tmp_path):
    w = ArchiveWriter(Archive(tmp_path / "archive"))
    assert w.recover() == []
    return w


# --- schemas --------------------------------------------------------------------------------------
def _avro_names(avro, named):
    """Record field names of an Avro type, nested, as Arrow would show them."""
    avro = named.get(avro, avro) if isinstance(avro, str) else avro
    if isinstance(avro, list):
        return _avro_names(next(b for b in avro if b != "null"), named)
    if isinstance(avro, dict) and avro["type"] == "record":
        return {f["name"]: _avro_names(f["type"], named) for f in avro["fields"]}
    if isinstance(avro, dict) and avro["type"] == "array":
        return [_avro_names(avro["items"], named)]
    return None


def _arrow_names(t: pa.DataType):
    if pa.types.is_struct(t):
        return {t.field(i).name: _arrow_names(t.field(i).type) for i in range(t.num_fields)}
    if pa.types.is_list(t):
        return [_arrow_names(t.value_type)]
    return None


@pytest.mark.parametrize("version", VERSIONS)
def test_the_arrow_schema_of_each_alert_version_has_its_avro_fields(version):
    avro = schemas.load("alert", version)
    schema = file_schema(version)
    record_type = schema.field(ALERT_COLUMN).type
    assert _arrow_names(record_type) == _avro_names(avro, avro["__named_schemas"])
    assert json.loads(schema.metadata[b"broker.avro_schema"])["name"] == avro["name"].rsplit(".", 1)[-1]
    source = record_type.field("source").type
    assert source.field("ra").type == pa.float64() and not source.field("ra").nullable
    assert source.field("magpsf").nullable  # ["null", "double"]
    assert record_type.field("cutoutScience").type.field("stampData").type == pa.binary()


def test_avro_types_without_a_faithful_column_are_refused():
    with pytest.raises(SchemaError, match="union"):
        arrow_type(["null", "string", "long"], {})
    node = {"type": "record", "name": "Node", "fields": [{"name": "next", "type": ["null", "Node"]}]}
    with pytest.raises(SchemaError, match="recursive"):
        arrow_type(node, {"Node": node})
    with pytest.raises(SchemaError, match="logical type"):
        arrow_type({"type": "long", "logicalType": "timestamp-millis"}, {})
    assert arrow_type({"type": "map", "values": "int"}, {})[0] == pa.map_(pa.string(), pa.field("value", pa.int32(),
                                                                                               nullable=False))
    assert arrow_type({"type": "enum", "name": "E", "symbols": ["A"]}, {}) == (pa.string(), False)


@pytest.mark.parametrize("version", VERSIONS)
def test_version_of_tells_each_version_by_its_fields(version):
    assert version_of(sample(version)) == version
    assert version_of(sample(version), f"alert/{version}") == version
    assert version_of(sample(version), "alert/99") == version  # an unknown tag does not decide
    with pytest.raises(SchemaError, match="fits no alert schema version"):
        version_of({"objectId": "x", "foreign": 1})


def test_an_older_version_resolves_to_the_current_one():
    current = schemas.CURRENT["alert"]
    for version in VERSIONS:
        rec = to_current(sample(version), version)
        assert version_of(rec) == current and rec["objectId"] == sample(version)["objectId"]


# --- nights ---------------------------------------------------------------------------------------
def test_a_night_keeps_its_date_until_local_noon():
    # Cerro Pachon, 70.7 deg W: the night of 2025-03-14 runs from ~23:00 UTC to ~10:00 UTC on the 15th
    lon = -70.74
    evening, morning = mjd_of("2025-03-14T23:30:00"), mjd_of("2025-03-15T09:50:00")
    assert night_of(evening, lon) == night_of(morning, lon) == dt.date(2025, 3, 14)
    assert night_of(mjd_of("2025-03-15T17:00:00"), lon) == dt.date(2025, 3, 15)  # past local noon
    # Greenwich by default: the date changes at 12:00 UTC
    assert night_of(mjd_of("2025-03-15T11:59:00")) == dt.date(2025, 3, 14)
    assert night_of(mjd_of("2025-03-15T12:01:00")) == dt.date(2025, 3, 15)
    assert mjd_of("2025-03-15T00:00:00+02:00") == pytest.approx(mjd_of("2025-03-14T22:00:00"))
    for bad in (float("nan"), float("inf"), None, 1e300):
        with pytest.raises(SchemaError, match="no night"):
            night_of(bad)
    with pytest.raises(ArchiveError, match="ISO 8601"):
        mjd_of("yesterday")


def test_a_longitude_from_0_to_360_gives_the_dates_of_its_own_side_of_the_date_line():
    """Mauna Kea is 204.53 deg east as the MPC writes it: its nights had the dates of the next day."""
    evening = mjd_of("2025-03-14T20:00:00-10:00")  # 06:00 UTC on the 15th
    assert night_of(evening, 204.53) == night_of(evening, -155.47) == dt.date(2025, 3, 14)
    assert night_of(evening, 360.0) == night_of(evening, -360.0) == night_of(evening)


def test_the_config_rejects_nonsense():
    with pytest.raises(ConfigError):
        ArchiveConfig(batch_alerts=0)
    with pytest.raises(ConfigError):
        ArchiveConfig(compression="rar")
    with pytest.raises(ConfigError):
        ArchiveConfig(longitudes={"T": 400.0})


# --- rows -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_records_come_back_exactly_from_every_version(writer, version):
    records = [sample(version)] + [random_alert(version, seed) for seed in range(12)]
    for i, rec in enumerate(records[1:]):  # an id each (the archive shows an id once), the extremes included
        rec["alertId"] = (-(2**63), 2**63 - 1, 0)[i] if i < 3 else 1000 + i
    alerts = archived(records)
    commit(writer, alerts)
    count, rows = Archive(writer.archive.url).select()
    back = list(rows)
    assert count == len(back) == len(records)
    paged_count, paged = Archive(writer.archive.url).select(page_bytes=1, sort_bytes=0)  # a page of one alert
    assert paged_count == count and all(v == w and same(r, q) for (v, r), (w, q) in zip(paged, back, strict=True))
    by_offset = sorted(alerts, key=lambda a: (a.record["source"]["mjd"], a.offset))
    for (v, record), original in zip(back, by_offset, strict=True):
        assert v == version and same(record, original.record)


def test_archive_columns_hold_the_convenience_values_and_kafka_coordinates(writer):
    rec = sample(schemas.CURRENT["alert"])
    commit(writer, [Archived(rec, version_of(rec), "alerts.r", 0, 41)])
    (row,) = Archive(writer.archive.url).query(
        "SELECT * EXCLUDE (alert) FROM alerts").to_pylist()
    s = rec["source"]
    assert row == {"night": night_of(s["mjd"]), "telescope": rec["provenance"]["telescope"],
                   "object_id": rec["objectId"], "alert_id": rec["alertId"], "candid": rec["candid"],
                   "frame_id": rec["provenance"]["frame_id"], "mjd": s["mjd"], "ra": s["ra"], "dec": s["dec"],
                   "filter": s["filter"], "snr": s["snr"], "magpsf": s["magpsf"], "rb": rec["scores"]["rb"],
                   "anomaly": rec["scores"]["anomaly"], "schema_version": schemas.CURRENT["alert"],
                   "kafka_topic": "alerts.r", "kafka_partition": 0, "kafka_offset": 41}


def test_nan_in_a_column_to_filter_on_is_null_and_the_record_keeps_it(writer):
    """DuckDB orders NaN above every number: ``rb > 0.9`` held an alert whose score is NaN, ``max(rb)`` was NaN."""
    recs = objects(3, VERSIONS[-1])
    recs[0]["scores"]["rb"], recs[1]["scores"]["rb"], recs[2]["scores"]["rb"] = float("nan"), 0.95, 0.5
    recs[0]["source"]["snr"] = float("nan")
    commit(writer, archived(recs))
    archive = Archive(writer.archive.url)
    assert archive.query("SELECT object_id FROM alerts WHERE rb > 0.9 OR snr > 1e9").column(0).to_pylist() == [
        "OBJ000001"]
    assert archive.query("SELECT max(rb) AS m FROM alerts").column("m").to_pylist() == [0.95]
    (kept,) = archive.query("SELECT alert.scores.rb AS rb FROM alerts WHERE rb IS NULL").column("rb").to_pylist()
    assert math.isnan(kept)  # the record is the one archived


def test_an_archive_path_with_glob_characters_reads_only_its_own_files(tmp_path):
    """DuckDB globs every path it reads: the archive under ``b?`` also read the files of ``bx``."""
    for name, n in (("bx", 5), ("b?", 2), ("a1", 4), ("a[1]", 3), ("cz", 6), ("c*", 1)):
        w = ArchiveWriter(Archive(tmp_path / name))
        w.recover()
        commit(w, archived(objects(n, VERSIONS[-1])))  # the same file names in every archive
    for name, n in (("b?", 2), ("a[1]", 3), ("c*", 1)):
        archive = Archive(tmp_path / name)
        assert archive.query("SELECT count(*) AS n FROM alerts").column("n").to_pylist() == [n], name
        for count, rows in (archive.select("true"), archive.select("true", page_bytes=1, sort_bytes=0)):
            assert count == len(list(rows)) == n, name


def test_a_telescope_is_read_from_the_column_not_from_its_folder_name(writer):
    """DuckDB took ``telescope=<folder>`` for a Hive partition and read its value instead of the column's.

    A name over 64 characters escaped came back as the folder's cut and hashed slug, and an archive
    whose telescopes all looked like numbers (or dates) had a BIGINT (DATE) ``telescope`` column.
    """
    recs = [sample(VERSIONS[-1]) for _ in range(3)]
    names = ["T" * 100, "123", "2020-01-01"]
    for i, (rec, name) in enumerate(zip(recs, names, strict=True)):
        rec["alertId"], rec["provenance"]["telescope"] = 600 + i, name
    commit(writer, archived(recs))
    archive = Archive(writer.archive.url)
    got = archive.query("SELECT telescope, typeof(telescope) AS t FROM alerts ORDER BY kafka_offset").to_pylist()
    assert got == [{"telescope": name, "t": "VARCHAR"} for name in names]
    numeric = ArchiveWriter(Archive(writer.archive.url + "-numeric"))
    numeric.recover()
    commit(numeric, archived(recs[1:2]))
    assert Archive(numeric.archive.url).query("SELECT telescope FROM alerts").to_pylist() == [{"telescope": "123"}]


def test_files_are_partitioned_by_night_telescope_and_version(writer):
    recs = [sample(v) for v in VERSIONS] + [sample(VERSIONS[-1]), sample(VERSIONS[-1])]
    for i, rec in enumerate(recs):  # the samples share one id: six alerts here, not one alert six times
        rec["alertId"] = 500 + i
    recs[-1]["provenance"]["telescope"] = "ZTF/P48 #1"  # escaped in the folder name, kept in the column
    recs[-2]["source"]["mjd"] += 1.0  # the next night
    c = commit(writer, archived(recs))
    paths = sorted(f.path for f in c.files)
    night = night_of(recs[0]["source"]["mjd"]).isoformat()
    assert len(paths) == len(VERSIONS) + 2 and all(p.startswith("night=") for p in paths)
    assert any(p.startswith(f"night={night}/telescope=ZTF%2FP48%20%231/") for p in paths)
    archive = Archive(writer.archive.url)
    assert archive.count() == len(recs) == archive.query("SELECT count(*) AS n FROM alerts").column("n")[0].as_py()
    got = archive.query("SELECT telescope, schema_version FROM alerts ORDER BY kafka_offset").to_pylist()
    assert got[-1] == {"telescope": "ZTF/P48 #1", "schema_version": VERSIONS[-1]}
    assert [r["schema_version"] for r in got[:len(VERSIONS)]] == VERSIONS
    for f in c.files:  # each file is self-describing: version and Avro schema in its metadata
        meta = pq.read_schema(writer.archive.path(f.path)).metadata
        assert int(meta[b"broker.schema_version"]) == f.schema_version


def test_an_alert_without_a_time_is_refused():
    rec = sample(VERSIONS[-1])
    rec["source"]["mjd"] = float("nan")
    with pytest.raises(SchemaError, match="no night"):
        to_batch(archived([rec]))
    with pytest.raises(SchemaError, match="one schema version"):
        to_batch([])


# --- commits --------------------------------------------------------------------------------------
def test_only_committed_files_are_visible_and_the_rest_is_deleted_on_recovery(writer):
    first = archived(objects(3, VERSIONS[-1]))
    commit(writer, first)
    pending = archived(objects(2, VERSIONS[-1], seed=1), start=3)
    files = writer.write([to_batch(pending)])  # a writer killed before its commit record
    archive = Archive(writer.archive.url)
    assert all(writer.archive.fs.exists(writer.archive.path(f.path)) for f in files)
    assert archive.count() == 3 and archive.query("SELECT count(*) AS n FROM alerts").column("n")[0].as_py() == 3
    stray = writer.archive.path(f"{COMMITS}/00000000000000000002.json.tmp-dead")
    writer.archive.fs.pipe_file(stray, b"{")  # a commit record that never got its name
    assert archive.log()[-1].seq == 1  # readers ignore it
    restarted = ArchiveWriter(Archive(writer.archive.url))
    removed = restarted.recover()
    assert sorted(removed) == sorted([f.path for f in files] + [f"{COMMITS}/00000000000000000002.json.tmp-dead"])
    assert restarted.positions() == {("alerts", 0): 3}
    commit(restarted, pending)  # redone after the restart: once
    assert archive.count() == 5 and restarted.positions() == {("alerts", 0): 5}
    assert sorted(archive.query("SELECT object_id FROM alerts").column(0).to_pylist()) == \
        sorted(a.record["objectId"] for a in first + pending)


def test_a_second_writer_cannot_take_a_commit(writer):
    other = ArchiveWriter(Archive(writer.archive.url))
    other.recover()
    commit(writer, archived(objects(1, VERSIONS[-1])))
    with pytest.raises(ArchiveError, match="another writer"):
        commit(other, archived(objects(1, VERSIONS[-1]), start=1))
    assert Archive(writer.archive.url).count() == 1


def test_an_empty_batch_of_dead_letters_still_moves_the_offsets(writer):
    c = writer.commit([], [OffsetRange("alerts", 0, 0, 4)], dead_letters=4)
    assert c.files == () and writer.positions() == {("alerts", 0): 4}
    assert Archive(writer.archive.url).query("SELECT count(*) AS n FROM alerts").column("n")[0].as_py() == 0


# --- corruption -----------------------------------------------------------------------------------
@pytest.fixture
def committed(writer):
    commit(writer, archived(objects(20, VERSIONS[-1])))
    return writer.archive, writer.archive.log()[0].files[0]


def test_a_truncated_file_is_reported_by_query_and_replay_selection(committed):
    archive, f = committed
    path = archive.path(f.path)
    data = archive.fs.cat_file(path)
    archive.fs.pipe_file(path, data[: len(data) // 2])
    for call in (lambda: archive.query("SELECT count(*) FROM alerts"), lambda: archive.select("true"),
                 lambda: archive.export("SELECT * FROM alerts", "/dev/null.csv")):
        with pytest.raises(ArchiveCorrupt, match=f"{f.path} holds {len(data) // 2} bytes.*truncated"):
            call()


def test_an_altered_file_is_reported_by_replay_selection_and_verified_queries(committed):
    archive, f = committed
    path = archive.path(f.path)
    data = bytearray(archive.fs.cat_file(path))
    data[len(data) // 3] ^= 0xFF  # same size, one byte changed
    archive.fs.pipe_file(path, bytes(data))
    with pytest.raises(ArchiveCorrupt, match="SHA-256"):
        archive.select("true")
    with pytest.raises(ArchiveCorrupt, match="SHA-256"):
        archive.query("SELECT object_id FROM alerts", verify=True)


def test_a_missing_file_or_commit_record_is_reported(committed, writer):
    archive, f = committed
    commit(writer, archived(objects(2, VERSIONS[-1], seed=3), start=20))
    archive.fs.rm_file(archive.path(f"{COMMITS}/00000000000000000001.json"))
    with pytest.raises(ArchiveCorrupt, match="a record is missing"):
        archive.query("SELECT 1")
    archive.fs.pipe_file(archive.path(f"{COMMITS}/00000000000000000001.json"), b'{"format": 1, "seq": 1')
    with pytest.raises(ArchiveCorrupt, match="not readable"):
        archive.count()


@pytest.mark.parametrize("damage", [
    lambda r: r["files"][0].update(rows=None),  # count() raised TypeError
    lambda r: r["files"][0].update(path=5),  # every query raised AttributeError
    lambda r: r["offsets"][0].update(next="7"),  # the writer's positions raised TypeError
    lambda r: r.update(files={}),  # read as no files: the archive looked empty
    lambda r: r["files"].append("x"),
], ids=["null rows", "numeric path", "text offset", "files as an object", "a file that is no object"])
def test_a_commit_record_with_values_of_the_wrong_type_is_reported(committed, damage):
    archive, _ = committed
    name = archive.path(f"{COMMITS}/00000000000000000001.json")
    record = json.loads(archive.fs.cat_file(name))
    damage(record)
    archive.fs.pipe_file(name, json.dumps(record).encode())
    for call in (archive.count, lambda: archive.query("SELECT count(*) FROM alerts"), archive.snapshot):
        with pytest.raises(ArchiveCorrupt, match="00000000000000000001.json is not readable"):
            call()


def test_a_folder_where_a_commit_record_should_be_is_reported(committed):
    """A folder named like the next commit record was ``IsADirectoryError`` out of every reader."""
    archive, _ = committed
    archive.fs.makedirs(archive.path(f"{COMMITS}/00000000000000000002.json"))
    for call in (archive.count, archive.snapshot, archive.log):
        with pytest.raises(ArchiveCorrupt, match="00000000000000000002.json cannot be read"):
            call()


def test_an_unreadable_file_of_the_right_size_is_reported(committed):
    archive, f = committed
    archive.fs.pipe_file(archive.path(f.path), b"\0" * f.size)  # zeroed: footer and magic gone
    with pytest.raises(ArchiveCorrupt, match=f"{f.path} (is unreadable|do not match the SHA-256)"):
        archive.query("SELECT count(*) FROM alerts")


def test_sql_errors_are_not_called_corruption(committed):
    archive, _ = committed
    for sql in ("SELEC 1", "SELECT nope FROM alerts", "SELECT * FROM nowhere"):
        with pytest.raises(ArchiveError, match="query failed") as info:
            archive.query(sql)
        assert not isinstance(info.value, ArchiveCorrupt)


# --- queries --------------------------------------------------------------------------------------
def _sep_deg(ra1, dec1, ra2, dec2):
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    return np.degrees(np.arccos(np.clip(np.sin(d1) * np.sin(d2) + np.cos(d1) * np.cos(d2) * np.cos(r1 - r2), -1, 1)))


def test_cone_object_and_time_queries(writer, tmp_path):
    recs = objects(400, VERSIONS[-1], ra0=359.6, dec0=-30.0)  # across RA = 0/360
    for i, r in enumerate(recs):
        r["source"]["ra"] %= 360.0
        r["source"]["mjd"] = 60000.0 + i / 100
    commit(writer, archived(recs))
    archive = Archive(writer.archive.url)
    ra0, dec0, radius = 359.9, -30.1, 0.3
    got = set(archive.query(f"SELECT object_id FROM alerts WHERE in_cone(ra, dec, {ra0}, {dec0}, {radius})")
              .column(0).to_pylist())
    truth = {r["objectId"] for r in recs if _sep_deg(r["source"]["ra"], r["source"]["dec"], ra0, dec0) <= radius}
    assert truth and got == truth  # the separation wraps in RA: no box on RA
    (one,) = archive.query("SELECT alert.object.objectId AS oid, alert.cutoutScience.stampData AS stamp "
                           "FROM alerts WHERE object_id = 'OBJ000007'").to_pylist()
    assert one["oid"] == recs[7]["object"]["objectId"] and one["stamp"] == recs[7]["cutoutScience"]["stampData"]
    cond = f"mjd >= {mjd_of('2023-02-26T00:00:00')} AND mjd < {mjd_of('2023-02-27T00:00:00')} AND rb > 0.8"
    n = archive.export(f"SELECT object_id, mjd, rb FROM alerts WHERE {cond}", tmp_path / "out.csv")
    expected = [r for r in recs if 60001.0 <= r["source"]["mjd"] < 60002.0 and r["scores"]["rb"] > 0.8]
    assert n == len(expected) > 0
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == "object_id,mjd,rb"
    assert archive.export(f"SELECT * FROM alerts WHERE {cond}", tmp_path / "out.parquet") == n
    assert pq.read_table(tmp_path / "out.parquet").num_rows == n
    with pytest.raises(ArchiveError, match=".parquet or .csv"):
        archive.export("SELECT 1", tmp_path / "out.json")


#: Cones (ra, dec, radius deg) of :func:`test_a_cone_with_its_ra_range_holds_the_rows_of_in_cone`: across RA 0/360
#: both ways, at and near the poles, of radius 0, of 60 and 100 deg.
_CONES = [(0.0, 0.0, 1.0), (359.99, 45.0, 0.5), (0.01, -30.0, 2.0), (180.0, 89.5, 1.0), (10.0, -88.0, 1.5),
          (123.4, 60.0, 0.0), (200.0, 10.0, 60.0), (50.0, 0.0, 100.0), (300.0, 70.0, 15.0), (90.0, -89.99, 0.005)]


def _around(rng: np.random.Generator, ra0: float, dec0: float, radius: float, n: int) -> list[tuple[float, float]]:
    """``n`` positions at ``radius`` (deg) from (ra0, dec0), a hair inside or outside, in every direction."""
    out = []
    for bearing in rng.uniform(0, 2 * np.pi, n):
        r = np.radians(radius * (1 + rng.choice([-1e-12, 1e-12, 0.0]))) if radius else 0.0
        d0, a0 = np.radians(dec0), np.radians(ra0)
        d = np.arcsin(np.sin(d0) * np.cos(r) + np.cos(d0) * np.sin(r) * np.cos(bearing))
        a = a0 + np.arctan2(np.sin(bearing) * np.sin(r) * np.cos(d0), np.cos(r) - np.sin(d0) * np.sin(d))
        out.append((float(np.degrees(a)) % 360.0, float(np.degrees(d))))
    return out


def test_a_cone_with_its_ra_range_holds_the_rows_of_in_cone(writer, monkeypatch):
    """``cone_where`` adds a range of RA to ``in_cone`` for DuckDB to skip row groups: never a row less or more.

    Positions all over the sky, on the edge of each cone (1e-12 of the radius inside or outside), at
    its centre, and at RA outside [0, 360) (360.3, -0.2, 720.1: the haversine wraps them), in files
    of row groups of 16 rows sorted by declination.
    """
    monkeypatch.setattr(writer_module, "ROW_GROUP_ROWS", 16)
    rng = np.random.default_rng(11)
    pos = list(zip(rng.uniform(0, 360, 300), np.degrees(np.arcsin(rng.uniform(-1, 1, 300))), strict=True))
    for ra0, dec0, radius in _CONES:
        pos += _around(rng, ra0, dec0, radius, 40) + [(ra0, dec0), (ra0 + 360.0, dec0), (ra0 - 360.0, dec0)]
    pos += [(360.3, 0.0), (-0.2, -30.5), (720.1, 45.0), (0.0, 90.0), (10.0, -90.0)]
    recs = objects(len(pos), VERSIONS[-1])
    for rec, (ra, dec) in zip(recs, pos, strict=True):
        rec["source"]["ra"], rec["source"]["dec"] = float(ra), float(dec)
    for start in range(0, len(recs), 250):
        commit(writer, archived(recs[start:start + 250], start=start))
    archive = Archive(writer.archive.url)
    for ra0, dec0, radius in _CONES:
        plain = archive.query(f"SELECT alert_id FROM alerts WHERE in_cone(ra, dec, {ra0}, {dec0}, {radius})")
        ranged = archive.query(f"SELECT alert_id FROM alerts WHERE {cone_where(ra0, dec0, radius)}")
        assert plain.num_rows > 0 and sorted(plain.column(0).to_pylist()) == sorted(ranged.column(0).to_pylist())
    assert "ra" not in cone_where(180.0, 89.5, 1.0).split(")", 1)[1]  # reaches the pole: no RA range
    assert "OR ra <=" in cone_where(0.01, -30.0, 2.0) and "OR ra <=" in cone_where(359.99, 45.0, 0.5)
    assert all(cone_where(*bad).startswith("in_cone") and "AND" not in cone_where(*bad)  # no range of nan
               for bad in ((math.nan, 0.0, 1.0), (0.0, math.nan, 1.0), (0.0, 0.0, math.nan)))
    plan = archive.connect().sql(f"EXPLAIN ANALYZE SELECT snr FROM alerts WHERE {cone_where(150.0, 2.0, 0.01)}")
    scanned, groups = map(int, re.search(r"Row Groups Scanned: (\d+) / (\d+)", plan.fetchall()[0][1]).groups())
    assert groups >= 40 and scanned <= 4, (scanned, groups)  # the declination band skips the other row groups


def test_an_empty_archive_answers_with_no_rows(tmp_path):
    archive = Archive(tmp_path / "nothing")
    table = archive.query("SELECT object_id, alert.source.ra FROM alerts")
    assert table.num_rows == 0 and table.column_names == ["object_id", "ra"]
    assert archive.select("true")[0] == 0


def test_an_fsspec_archive_commits_without_rename():
    url = f"memory://archive-{uuid.uuid4().hex[:8]}"
    writer = ArchiveWriter(Archive(url))
    writer.recover()
    alerts = archived(objects(5, VERSIONS[-1]))
    commit(writer, alerts[:3])
    writer.write([to_batch(alerts[3:])])  # never committed
    archive = Archive(url)
    assert not archive.local and archive.count() == 3
    assert sorted(archive.query("SELECT object_id FROM alerts").column(0).to_pylist()) == \
        sorted(a.record["objectId"] for a in alerts[:3])
    assert len(ArchiveWriter(archive).recover()) == 1
    count, rows = archive.select("rb >= 0")
    assert count == 3 and all(same(rec, a.record) for (_, rec), a in zip(
        rows, sorted(alerts[:3], key=lambda a: a.offset), strict=True))
    archive.fs.rm(archive.root, recursive=True)


# --- compaction -----------------------------------------------------------------------------------
def _compacting(tmp_path, k: int = 4, keep: float = 60.0) -> ArchiveWriter:
    w = ArchiveWriter(Archive(tmp_path / "archive"), ArchiveConfig(compact_files=k, retain_removed_seconds=keep))
    w.recover()
    return w


def test_compaction_merges_small_files_tier_by_tier_and_keeps_every_row_once(tmp_path):
    w = _compacting(tmp_path)
    recs = objects(17, VERSIONS[-1])  # one night
    for i, rec in enumerate(recs):
        commit(w, archived([rec], start=i))
        w.compact()
    archive = Archive(w.archive.url)
    assert sorted(f.rows for f in archive.files()) == [1, 16]  # 4 x 1 -> 4, 4 x 4 -> 16, and the last one
    merges = [c for c in archive.log() if c.removed]
    assert [len(c.removed) for c in merges] == [4] * 5 and not any(c.offsets for c in merges)
    assert archive.count() == 17 and w.positions() == positions_of(archive) == {("alerts", 0): 17}
    count, rows = archive.select("true")
    assert count == 17 and sorted(r["objectId"] for _, r in rows) == sorted(r["objectId"] for r in recs)
    retired = sorted(p for c in merges for p in c.removed)
    assert all(w.archive.fs.exists(w.archive.path(p)) for p in retired)  # kept for queries in flight
    assert ArchiveWriter(archive, ArchiveConfig(retain_removed_seconds=60)).recover() == []
    assert w.vacuum() == [] and w.vacuum(now=time.time() + 61) == retired
    assert not any(w.archive.fs.exists(w.archive.path(p)) for p in retired) and archive.count() == 17


def _dec_ranges(archive: Archive, rel: str) -> list[tuple[float, float]]:
    """(min, max) of ``dec`` in each row group of file ``rel``."""
    meta = pq.ParquetFile(archive.path(rel)).metadata
    col = meta.schema.names.index("dec")
    return [(meta.row_group(i).column(col).statistics.min, meta.row_group(i).column(col).statistics.max)
            for i in range(meta.num_row_groups)]


def test_files_hold_their_rows_by_declination_in_small_row_groups(tmp_path, monkeypatch):
    """A batch or a merge was one row group, its rows in arrival order, spanning the file's whole sky.

    DuckDB read all of it for a 5 arcsec cone. Rows are now by declination, in row
    groups of at most ``ROW_GROUP_ROWS`` (8 here), so the row groups' ``dec`` ranges follow each other
    (within one, the rows keep their order).
    """
    monkeypatch.setattr(writer_module, "ROW_GROUP_ROWS", 8)
    w = _compacting(tmp_path, k=2)
    recs = objects(40, VERSIONS[-1], dec0=-89.0)  # some beyond the pole: dec < -90 is kept as it is
    recs[5]["source"]["dec"] = float("nan")  # null in the column: last
    commit(w, archived(recs[:20]))
    commit(w, archived(recs[20:], start=20))
    (merge,) = w.compact()
    archive = Archive(w.archive.url)
    (f,) = merge.files
    ranges = _dec_ranges(archive, f.path)
    assert len(ranges) == 5 and all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False)), ranges
    decs = pq.read_table(archive.path(f.path), columns=["dec"]).column(0).to_pylist()
    assert None in decs[-8:] and sorted(d for d in decs if d is not None) == \
        sorted(r["source"]["dec"] for i, r in enumerate(recs) if i != 5)
    count, rows = archive.select("true")
    assert count == 40 and all(same(r, rec) for (_, r), rec in zip(rows, recs, strict=True))


def test_a_row_group_of_mixed_alert_sizes_stays_under_the_byte_bound(writer, monkeypatch):
    """A row group's bytes are estimated per record batch (its mean bytes a row), which alerts of mixed sizes defeat.

    Three alerts of 300 kB among 27 small ones in one batch would put the three, ~900 kB, in a row
    group bounded at 400 kB. Such a group is halved until its real bytes fit (or it is one row).
    """
    monkeypatch.setattr(writer_module, "ROW_GROUP_BYTES", 400_000)
    recs = objects(30, VERSIONS[-1])
    for i in (3, 4, 5):
        recs[i]["cutoutScience"]["stampData"] = bytes(300_000)
        recs[i]["source"]["dec"] = 2.0 + i * 1e-6  # side by side in declination
    table = pa.Table.from_batches([to_batch(archived(recs))])
    batches, starts = table.to_batches(), np.array([0, 30])
    groups = [g for rows in writer_module._row_groups(batches, writer_module._sky_order(table))
              for g in writer_module._pieces(batches, starts, rows)]
    assert all(sum(p.nbytes for p in g) <= 400_000 or sum(p.num_rows for p in g) == 1 for g in groups)
    assert sorted(a for g in groups for p in g for a in p.column("alert_id").to_pylist()) == \
        sorted(r["alertId"] for r in recs) and len(groups) >= 3
    writer.commit(writer.write([to_batch(archived(recs))]), [OffsetRange("alerts", 0, 0, 30)])
    (f,) = Archive(writer.archive.url).files()
    assert pq.ParquetFile(writer.archive.path(f.path)).num_row_groups == len(groups)
    assert Archive(writer.archive.url).query("SELECT count(*) FROM alerts").column(0)[0].as_py() == 30


def test_rows_of_one_kafka_message_keep_their_order_in_a_file(writer, monkeypatch):
    """Copies of an alert at one Kafka offset go by file row (``COPY_ORDER``): their order is kept.

    Sorting them by declination would make the copy with the lower declination the alert.
    """
    monkeypatch.setattr(writer_module, "ROW_GROUP_ROWS", 2)
    rec, other = objects(2, VERSIONS[-1])
    copies = [Archived(_copy(rec, snr=10.0 + i, dec=5.0 - i), version_of(rec), "alerts", 0, 0) for i in range(3)]
    rest = [Archived(_copy(other, dec=d), version_of(other), "alerts", 0, 1 + i) for i, d in enumerate((4.5, 9.0))]
    writer.commit(writer.write([to_batch(copies + rest)]), [OffsetRange("alerts", 0, 0, 3)])
    archive = Archive(writer.archive.url)
    (f,) = archive.files()
    snr = pq.read_table(archive.path(f.path), columns=["snr"]).column(0).to_pylist()
    assert [x for x in snr if x in (10.0, 11.0, 12.0)] == [10.0, 11.0, 12.0]  # dec 5, 4, 3: as committed
    assert archive.query(f"SELECT snr FROM alerts WHERE alert_id = {rec['alertId']}").column(0).to_pylist() == [10.0]


def positions_of(archive: Archive) -> dict:
    from broker.archive.log import positions

    return positions(archive.log())


def test_retired_files_past_their_time_are_deleted_on_recovery(tmp_path):
    w = _compacting(tmp_path, k=2, keep=0.0)
    for i, rec in enumerate(objects(2, VERSIONS[-1])):
        commit(w, archived([rec], start=i))
    (merge,) = w.compact()
    assert sorted(ArchiveWriter(Archive(w.archive.url), w.config).recover()) == sorted(merge.removed)
    assert Archive(w.archive.url).count() == 2


def test_a_compaction_killed_before_its_commit_changes_nothing(tmp_path, monkeypatch):
    w = _compacting(tmp_path, k=2)
    for i, rec in enumerate(objects(2, VERSIONS[-1])):
        commit(w, archived([rec], start=i))
    before = Archive(w.archive.url).files()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(w, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        w.compact()
    archive = Archive(w.archive.url)
    assert archive.files() == before and archive.count() == 2
    (orphan,) = ArchiveWriter(archive).recover()  # the merged file nobody committed
    assert orphan.endswith("-merged.parquet") and archive.count() == 2


def test_compaction_refuses_a_corrupt_file(tmp_path):
    w = _compacting(tmp_path, k=2)
    for i, rec in enumerate(objects(2, VERSIONS[-1])):
        commit(w, archived([rec], start=i))
    f = Archive(w.archive.url).files()[0]
    data = bytearray(w.archive.fs.cat_file(w.archive.path(f.path)))
    data[100] ^= 1
    w.archive.fs.pipe_file(w.archive.path(f.path), bytes(data))
    with pytest.raises(ArchiveCorrupt, match="not compacted"):
        w.compact()
    assert len(Archive(w.archive.url).log()) == 2


def test_readers_start_from_the_newest_checkpoint(tmp_path, caplog):
    w = ArchiveWriter(Archive(tmp_path / "archive"), ArchiveConfig(checkpoint_every=100))
    w.recover()
    commit(w, archived(objects(3, VERSIONS[-1])))
    for i in range(3, 250):
        w.commit([], [OffsetRange("alerts", 1, i, i + 1)])
    archive = Archive(w.archive.url)
    names = sorted(str(p).rsplit("/", 1)[-1] for p in archive.fs.ls(archive.path("_checkpoints")))
    assert names == [f"{100:020d}.json", f"{200:020d}.json"]
    expected = archive.snapshot()
    assert expected.seq == 248 and expected.positions == {("alerts", 0): 3, ("alerts", 1): 250}
    checkpoint = archive.path(f"_checkpoints/{200:020d}.json")
    good = archive.fs.cat_file(checkpoint)
    archive.fs.pipe_file(checkpoint, b"{garbage")
    assert archive.snapshot() == expected  # from checkpoint 100 and the records after it
    assert "checkpoint 00000000000000000200.json is not readable" in caplog.text
    archive.fs.pipe_file(checkpoint, good)
    for seq in range(2, 150):  # old records are history: a checkpoint holds their state
        archive.fs.rm_file(archive.path(f"{COMMITS}/{seq:020d}.json"))
    assert archive.snapshot() == expected and archive.count() == 3
    archive.fs.pipe_file(checkpoint, b"{garbage")
    with pytest.raises(ArchiveCorrupt, match="commit 101 is missing"):  # falls back to 100: gone records
        archive.snapshot()
    restarted = ArchiveWriter(Archive(w.archive.url))
    with pytest.raises(ArchiveCorrupt):
        restarted.recover()


# --- an alert archived more than once -------------------------------------------------------------
def _copy(rec: dict, **source) -> dict:
    """A copy of ``rec`` (same alert id) with other ``source`` values: what a replay or a faulty producer sends."""
    out = copy.deepcopy(rec)
    out["source"].update(source)
    return out


def _commit_at(writer: ArchiveWriter, alerts: list[Archived]) -> None:
    """One commit of ``alerts``, whatever their topics and partitions."""
    ranges = [OffsetRange(a.topic, a.partition, a.offset, a.offset + 1) for a in alerts]
    writer.commit(writer.write([to_batch([a]) for a in alerts]), ranges)


def test_an_alert_archived_twice_is_one_row_of_alerts_and_its_first_copy(writer):
    """Two commits holding one alert id (a replay into the archived topic, a repeated id): ``alerts`` held both.

    And a replay sent both. Now the first copy in Kafka order is the alert; ``alerts_all`` keeps every copy.
    """
    recs = objects(4, VERSIONS[-1])
    commit(writer, archived(recs))
    later = _copy(recs[1], mjd=recs[1]["source"]["mjd"] - 5.0, snr=99.0)  # an earlier time: first in mjd order
    commit(writer, archived([later, recs[2]], start=4))
    archive = Archive(writer.archive.url)
    assert archive.count() == 6  # rows archived
    assert archive.query("SELECT count(*), count(DISTINCT alert_id) FROM alerts").to_pylist() == \
        [{"count_star()": 4, "count(DISTINCT alert_id)": 4}]
    assert archive.query("SELECT count(*) AS n FROM alerts_all").column("n")[0].as_py() == 6
    rows = archive.query("SELECT alert_id, kafka_offset, snr FROM alerts ORDER BY kafka_offset").to_pylist()
    assert [r["kafka_offset"] for r in rows] == [0, 1, 2, 3] and 99.0 not in [r["snr"] for r in rows]
    for paged in ({}, {"page_bytes": 1, "sort_bytes": 0}):  # sorted by DuckDB, and read a page at a time
        count, records = archive.select("true", **paged)
        got = list(records)
        assert count == len(got) == 4 and sorted(r["alertId"] for _, r in got) == sorted(r["alertId"] for r in recs)
        assert all(same(r, original) for (_, r), original in zip(got, recs, strict=True))
        count, records = archive.select("snr = 99.0", **paged)  # the later copy alone matches: it is not the alert
        assert count == 0 and list(records) == []


def test_the_first_copy_wins_by_topic_partition_offset_then_file_and_row(writer):
    rec = objects(1, VERSIONS[-1])[0]
    copies = [Archived(_copy(rec, snr=float(i)), version_of(rec), topic, part, off)
              for i, (topic, part, off) in enumerate([("alerts", 3, 5), ("alerts", 1, 900), ("alerts", 1, 7),
                                                      ("alerts.old", 0, 0)])]
    for c in copies:  # one commit each, in this order
        _commit_at(writer, [c])
    archive = Archive(writer.archive.url)
    (row,) = archive.query("SELECT kafka_topic, kafka_partition, kafka_offset, snr FROM alerts").to_pylist()
    assert row == {"kafka_topic": "alerts", "kafka_partition": 1, "kafka_offset": 7, "snr": 2.0}
    # the same coordinates twice (a topic created again, offsets from 0): the earlier file, then the row
    again = [Archived(_copy(rec, snr=10.0 + i), version_of(rec), "alerts", 0, 0) for i in range(3)]
    _commit_at(writer, again[:1])
    writer.commit(writer.write([to_batch(again[1:])]), [OffsetRange("alerts", 0, 0, 1)])
    assert archive.query("SELECT snr FROM alerts").column(0).to_pylist() == [10.0]
    assert archive.query("SELECT count(*) FROM alerts_all").column(0)[0].as_py() == 7


def test_the_copy_that_wins_does_not_change_with_compaction_or_reading_again(tmp_path):
    w = _compacting(tmp_path, k=2)
    recs = objects(6, VERSIONS[-1])
    offset = 0
    for step in range(8):  # copies of alert 0 and 1 spread over files that compaction merges
        batch = [recs[step % 6], _copy(recs[step % 2], snr=100.0 + step)]
        commit(w, archived(batch, start=offset))
        offset += len(batch)
        before = Archive(w.archive.url).query("SELECT alert_id, snr FROM alerts ORDER BY alert_id").to_pylist()
        w.compact()
        after = Archive(w.archive.url).query("SELECT alert_id, snr FROM alerts ORDER BY alert_id").to_pylist()
        assert before == after
    assert any(c.removed for c in Archive(w.archive.url).log())
    rows = Archive(w.archive.url).query("SELECT alert_id, kafka_offset FROM alerts").to_pylist()
    first = {}
    for i, a in enumerate(a for s in range(8) for a in (recs[s % 6], recs[s % 2])):
        first.setdefault(a["alertId"], i)
    assert sorted((r["alert_id"], r["kafka_offset"]) for r in rows) == sorted(first.items())


def test_duplicates_are_found_once_per_set_of_files(writer, monkeypatch):
    recs = objects(3, VERSIONS[-1])
    commit(writer, archived(recs + [recs[0]]))
    archive = Archive(writer.archive.url)
    calls = []
    real = archive._later_copies.__func__

    def counted(self, con, files):
        calls.append(self._later is not None and self._later[0] == tuple(f.path for f in files))
        return real(self, con, files)

    monkeypatch.setattr(Archive, "_later_copies", counted)
    for _ in range(3):
        assert archive.query("SELECT count(*) FROM alerts").column(0)[0].as_py() == 3
    commit(writer, archived([recs[1]], start=4))  # a commit: other files, found again
    assert archive.query("SELECT count(*) FROM alerts").column(0)[0].as_py() == 3
    assert calls == [False, True, True, False]


@pytest.mark.slow
def test_a_batch_and_a_merge_of_over_2_gib_of_cutouts_are_written_and_read_back(writer):
    """Arrow concatenates the struct column ``alert`` in one chunk only below 2 GiB.

    33 alerts with 64 MiB cutouts (2.2 GB, from one batch of the archive stage or a compaction of
    two files) raised ``ArrowInvalid: offset overflow while concatenating arrays``: a batch made the
    stage stop as "cannot be written" at every restart, a compaction escaped it. The rows are now
    written in row groups under 2 GiB, which the Parquet reader (compaction) reads back.
    """
    big = b"\x00" * (64 << 20)
    recs = [sample(VERSIONS[-1]) for _ in range(33)]
    for i, rec in enumerate(recs):
        rec["alertId"], rec["cutoutScience"]["stampData"] = 700 + i, big
    writer.config = ArchiveConfig(compact_files=2)
    commit(writer, archived(recs[:16]))
    (f,) = commit(writer, archived(recs[16:], start=16)).files  # 17 rows: over 2 GiB once merged with 16
    (merged,) = writer.compact()
    (g,) = merged.files
    assert g.rows == 33 and pq.read_table(writer.archive.path(g.path), columns=["alert_id"]).num_rows == 33
    assert pq.ParquetFile(writer.archive.path(f.path)).num_row_groups > 1  # 1.1 GB: row groups of 512 MiB
    del recs, big
    assert Archive(writer.archive.url).query("SELECT count(*) AS n FROM alerts").to_pylist() == [{"n": 33}]


_SELECT_PEAK = """
import resource, sys
from broker.archive.reader import Archive, cone_where, may_hold_cone
archive = Archive(sys.argv[1])
archive.connect().close()  # DuckDB started and the files listed before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
count, records = archive.select(verify=True, page_bytes=int(sys.argv[2]), sort_bytes=int(sys.argv[3]))
times = [record["source"]["mjd"] for _, record in records]
assert count == len(times) and times == sorted(times), times
print(count, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_select_of_large_alerts_holds_a_page_not_every_alert(writer):
    """``select`` sorted the records themselves (DuckDB's ORDER BY over the ``alert`` column): it held them all.

    200 alerts with 8 MiB of cutouts (1.6 GB in 13 files) peaked at 4.9 GB of resident memory; 40
    of 6 MiB (240 MiB in files of 4) at 794 MiB above where the process stood before ``select``.
    Past ``sort_bytes`` the order is now found from the narrow columns and the records read a page
    (``page_bytes``) at a time: 0.9 GB, and 183 MiB for the 40 (16 MiB pages), measured here on the
    40 in a process of their own, ``sort_bytes`` lowered to 64 MiB to keep the test small.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    version, cutout = VERSIONS[-1], 2 << 20  # three cutouts: 6 MiB an alert
    for start in range(0, 40, 4):  # files of 4 (24 MiB), as the stage's batch_bytes makes of such alerts
        recs = []
        for i in range(start, start + 4):
            rec = sample(version)
            rec["alertId"], rec["source"]["mjd"] = i, 60000.0 + (i * 7 % 40) * 1e-3  # an order across the files
            for name in ("cutoutScience", "cutoutTemplate", "cutoutDifference"):
                rec[name]["stampData"] = os.urandom(cutout)
            recs.append(rec)
        alerts = archived(recs, start=start)
        files = writer.write([to_batch(alerts)])
        writer.commit(files, [OffsetRange("alerts", 0, start, start + 4)])
        del recs, alerts
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", _SELECT_PEAK, writer.archive.url, str(16 << 20), str(64 << 20)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    count, peak = map(int, out.stdout.split())
    assert count == 40 and peak < 2 * 40 * 3 * cutout, peak / 2**20  # twice the 40 alerts (240 MiB)


# --- file bounds and pruned reads -------------------------------------------------------------------
def test_files_record_the_bounds_of_their_positions_and_times_through_merges_and_checkpoints(tmp_path):
    w = ArchiveWriter(Archive(tmp_path / "archive"), ArchiveConfig(compact_files=2, checkpoint_every=1))
    w.recover()
    recs = objects(6, VERSIONS[-1])
    recs[5]["source"]["dec"] = math.nan  # null in the column: left out of the bounds
    for i, rec in enumerate(recs):
        rec["source"]["mjd"] += i / 10
    commit(w, archived(recs[:3]))
    commit(w, archived(recs[3:], start=3))
    (merge,) = w.compact()
    (merged,) = merge.files
    archive = Archive(w.archive.url)
    assert archive.files() == [merged] and archive.snapshot().live[merged.path] == merged  # through a checkpoint
    columns = {"ra": [r["source"]["ra"] for r in recs], "dec": [r["source"]["dec"] for r in recs[:5]],
               "mjd": [r["source"]["mjd"] for r in recs]}
    for name, values in columns.items():
        assert (getattr(merged, f"{name}_min"), getattr(merged, f"{name}_max")) == (min(values), max(values))
    nowhere = objects(2, VERSIONS[-1], seed=1)
    for rec in nowhere:
        rec["source"]["dec"] = math.nan
    commit(w, archived(nowhere, start=6))
    archive = Archive(w.archive.url)
    unplaced = archive.files()[-1]
    assert unplaced.dec_min is unplaced.dec_max is None and unplaced.ra_min is not None
    assert [may_hold_cone(f, 150.0, -60.0, 1.0) for f in archive.files()] == [False, True]  # no dec: read
    assert archive.query("SELECT count(*) AS n FROM alerts", keep=lambda f: False).to_pylist() == [{"n": 0}]


def test_a_commit_record_written_before_the_bounds_reads_as_a_file_to_read_always(committed):
    archive, _ = committed
    name = archive.path(f"{COMMITS}/00000000000000000001.json")
    record = json.loads(archive.fs.cat_file(name))
    assert record["files"][0]["dec_min"] is not None
    for f in record["files"]:
        for key in ("ra_min", "ra_max", "dec_min", "dec_max", "mjd_min", "mjd_max"):
            del f[key]
    archive.fs.pipe_file(name, json.dumps(record).encode())
    (old,) = Archive(archive.url).files()
    assert old.dec_min is old.ra_max is old.mjd_min is None
    assert may_hold_cone(old, 0.0, -80.0, 0.001) and may_hold_cone(old, 10.0, 0.0, 0.0)
    record["files"][0]["dec_min"] = "12"
    archive.fs.pipe_file(name, json.dumps(record).encode())
    with pytest.raises(ArchiveCorrupt, match="dec_min is str"):
        Archive(archive.url).files()


#: Centres (ra, dec) of the regions of :func:`sky_of_files`, one file each: either side of RA 0/360, by the poles.
REGIONS = [(0.6, 0.0), (359.4, 0.1), (180.0, 89.7), (10.0, 89.9), (90.0, -89.8), (150.0, 2.0), (200.0, 10.0),
           (50.0, -40.0), (300.0, 70.0)]


def sky_of_files(writer: ArchiveWriter) -> list[list[dict]]:
    """An archive of one file per region of :data:`REGIONS` (25 alerts within 0.3 deg of it), with copies across files.

    Region 7's file ends with a later copy of an alert of region 1, moved into region 7; region 8's
    record loses its bounds (as if written before them). Then a file of two alerts at RA 360.2 and
    360.25 (outside [0, 360), which the haversine matches at RA 0.2), and last a file at the lowest
    offsets: copies of alerts of regions 0, 2 and 5 moved to region 6, so that those copies are the
    first ones (the region files' are later copies). Returns the records of each region's file.
    """
    rng = np.random.default_rng(21)
    regions: list[list[dict]] = []
    for k, (ra0, dec0) in enumerate(REGIONS):
        pos = [(ra0, dec0)] + [p for r in (0.01, 0.1, 0.3) for p in _around(rng, ra0, dec0, r, 8)]
        recs = objects(len(pos), VERSIONS[-1], seed=100 + k)
        for rec, (ra, dec) in zip(recs, pos, strict=True):
            rec["source"]["ra"], rec["source"]["dec"] = float(ra), float(dec)
        if k == 7:
            recs.append(_copy(regions[1][1], ra=50.01, dec=-40.01))
        commit(writer, archived(recs, start=1000 * (k + 1)))
        regions.append(recs)
    outside = objects(2, VERSIONS[-1], seed=99)
    for rec, ra in zip(outside, (360.2, 360.25), strict=True):
        rec["source"]["ra"], rec["source"]["dec"] = ra, 0.05
    commit(writer, archived(outside, start=20000))
    firsts = [_copy(regions[k][3], ra=200.0 + 0.01 * j, dec=10.0) for j, k in enumerate((0, 2, 5))]
    _commit_at(writer, archived(firsts))
    name = writer.archive.path(f"{COMMITS}/{9:020d}.json")
    record = json.loads(writer.archive.fs.cat_file(name))
    record["files"][0] = {k: v for k, v in record["files"][0].items() if not k.endswith(("_min", "_max"))}
    writer.archive.fs.pipe_file(name, json.dumps(record).encode())
    return regions


#: Cones (ra, dec, radius deg) over :func:`sky_of_files`: on each region, across RA 0/360, at the poles, of
#: radius 0 (on an alert) and 180 (the whole sky), and those of the RA-range test.
PRUNE_CONES = [(ra, dec, r) for ra, dec in REGIONS for r in (0.05, 0.6)] + _CONES + [
    (0.0, 0.0, 0.7), (359.9, 0.05, 0.8), (0.22, 0.03, 0.05), (0.2, 0.05, 0.0), (45.0, 90.0, 1.0), (0.0, -90.0, 0.5),
    (0.0, 0.0, 180.0), (123.0, -45.0, 180.0), (200.0, 10.0, 0.0), (150.0, 2.0, 0.0), (0.0, 0.0, 0.0)]


def _ids(archive: Archive, cone: tuple[float, float, float], **keep) -> list[int]:
    sql = f"SELECT alert_id FROM alerts WHERE {cone_where(*cone)} ORDER BY alert_id"
    return archive.query(sql, **keep).column(0).to_pylist()


def test_cones_over_the_files_their_bounds_admit_answer_the_rows_of_every_file(writer):
    """A cone read from the files whose bounds may hold it (``may_hold_cone``) answers what all of them do.

    Copies across files included: a file left out never brings back a copy that a first copy elsewhere
    hides, nor hides one. Cones across RA 0/360, at the poles, of radius 0 and 180; files without bounds
    and with RA outside [0, 360). The files left out are not opened: one of them damaged, the pruned
    cone still answers.
    """
    regions = sky_of_files(writer)
    archive = Archive(writer.archive.url)
    files = archive.files()
    assert len(files) == len(REGIONS) + 2 and files[8].dec_min is None and files[9].ra_min == 360.2
    kept = []
    for ra0, dec0, radius in PRUNE_CONES:
        sql = (f"SELECT alert_id, kafka_offset, ra, dec FROM alerts WHERE {cone_where(ra0, dec0, radius)} "
               "ORDER BY alert_id")
        every = archive.query(sql).to_pylist()
        assert archive.query(sql, keep=lambda f, c=(ra0, dec0, radius): may_hold_cone(f, *c)).to_pylist() == every
        kept.append(sum(may_hold_cone(f, ra0, dec0, radius) for f in files))
        if radius == 180.0:
            assert kept[-1] == len(files) and len(every) == len({r["alertId"] for rs in regions for r in rs}) + 2
    assert sum(k <= 2 for k in kept) >= len(REGIONS) * 2  # the region's file and the boundless one
    hidden, shown = _ids(archive, (*REGIONS[2], 0.05)), _ids(archive, (*REGIONS[1], 0.05))
    assert regions[2][3]["alertId"] not in hidden and regions[2][4]["alertId"] in hidden  # first copy: region 6
    assert regions[1][1]["alertId"] in shown and regions[1][1]["alertId"] not in _ids(archive, (*REGIONS[7], 0.05))
    assert {regions[k][3]["alertId"] for k in (0, 2, 5)} <= set(_ids(archive, (*REGIONS[6], 0.05)))
    cone = (*REGIONS[5], 0.6)
    expected = _ids(archive, cone)
    archive.fs.pipe_file(archive.path(files[3].path), b"\0" * files[3].size)  # region 3's file, of its size
    assert _ids(archive, cone, keep=lambda f: may_hold_cone(f, *cone)) == expected and len(expected) == 24
    with pytest.raises(ArchiveCorrupt, match="unreadable"):
        _ids(archive, cone)


# --- queries and selections bounded by their WHERE --------------------------------------------------
def sky_and_times_of_files(writer: ArchiveWriter) -> tuple[list[list[dict]], list[dict]]:
    """:func:`sky_of_files` (its files at one MJD), then six files of overlapping MJDs, with copies and null MJDs.

    File t (t = 0..5) holds 6 alerts at MJDs 61000 + t / 2 + [0, 0.7), around REGIONS[5] and across RA 0/360;
    file 4 a later copy of an alert of file 1 moved to MJD 61010 and
    RA 10; file 5 (lowest offsets: the first copy) a copy of an alert of file 3 moved to MJD 60990, so that
    file 3's row is a later copy. Returns the regions and the records of the timed files.
    """
    regions = sky_of_files(writer)
    rng = np.random.default_rng(5)
    timed: list[dict] = []
    for t in range(6):
        recs = objects(6, VERSIONS[-1], seed=300 + t)
        for i, rec in enumerate(recs):
            rec["source"]["mjd"] = 61000.0 + t / 2 + float(rng.uniform(0.0, 0.7))
            ra0, dec0 = (REGIONS[5], (359.9, 0.0))[i % 2]
            rec["source"]["ra"], rec["source"]["dec"] = (ra0 + float(rng.uniform(-0.2, 0.2))) % 360.0, dec0
        if t == 4:
            recs.append(_copy(timed[7], mjd=61010.0, ra=10.0))
        if t == 5:
            first = _copy(timed[19], mjd=60990.0)
            _commit_at(writer, [Archived(first, version_of(first), "alerts", 0, 5)])
        commit(writer, archived(recs, start=30000 + 100 * t))
        timed.extend(recs)
    return regions, timed


#: Queries whose WHERE bounds the files they read (``Archive.query(..., bounded=True)``), with {e} an exact MJD.
BOUNDED = [
    "SELECT alert_id, mjd FROM alerts WHERE mjd >= 61001.0 AND mjd < 61001.5 ORDER BY alert_id",
    "SELECT alert_id FROM alerts WHERE mjd BETWEEN 61000.2 AND 61000.9 ORDER BY alert_id",
    "SELECT alert_id FROM alerts WHERE 61002.1 < mjd ORDER BY alert_id",
    "SELECT alert_id FROM alerts WHERE mjd <= 60999.5 ORDER BY alert_id",
    "SELECT alert_id FROM alerts WHERE mjd = {e} ORDER BY alert_id",
    "SELECT alert_id FROM alerts WHERE mjd >= {e} ORDER BY alert_id",
    "SELECT alert_id FROM alerts WHERE mjd <= {e} ORDER BY alert_id",
    "SELECT alert_id FROM alerts WHERE mjd > {e} ORDER BY alert_id",
    "SELECT alert_id FROM alerts WHERE mjd >= 61009.5 ORDER BY alert_id",
    "SELECT alert_id FROM alerts WHERE mjd < 60995 ORDER BY alert_id",
    "SELECT count(*) AS n, max(rb) AS rb FROM alerts a WHERE a.mjd > 61001.25 AND (rb > 0.3 OR snr < 0)",
    "SELECT night, count(*) AS n FROM alerts WHERE (mjd > 61000.3 AND mjd < 61001.6) GROUP BY night ORDER BY night",
    "SELECT alert_id, row_number() OVER (ORDER BY mjd) AS k FROM alerts WHERE mjd > 61001 ORDER BY alert_id",
    "SELECT alert_id FROM alerts WHERE in_cone(ra, dec, 359.95, 0.0, 0.3) AND mjd < 61001.2 ORDER BY alert_id",
    "SELECT alert_id FROM alerts WHERE mjd IS NOT NULL AND in_cone(ra, dec, 150, 2, 0.25) ORDER BY alert_id",
    "SELECT DISTINCT object_id FROM alerts WHERE mjd >= 61000.0 ORDER BY object_id LIMIT 1000",
]
#: Queries whose WHERE bounds no file: they read every one.
UNBOUNDED = [
    "SELECT alert_id FROM alerts WHERE mjd > 61001 OR rb > 0.5",
    "SELECT alert_id FROM alerts WHERE NOT mjd < 61001",
    "SELECT alert_id FROM alerts WHERE mjd + 0 > 61001",
    "SELECT alert_id FROM alerts WHERE mjd > '61001'",
    "SELECT ra AS mjd FROM alerts WHERE mjd > 61001",
    "SELECT alert_id FROM alerts WHERE mjd > 61001 AND alert_id IN (SELECT alert_id FROM alerts)",
    "SELECT (SELECT count(*) FROM alerts) AS n FROM alerts WHERE mjd > 61001",
    "SELECT a.alert_id FROM alerts a JOIN alerts b USING (object_id) WHERE a.mjd > 61001",
    "WITH x AS (SELECT 1) SELECT alert_id FROM alerts WHERE mjd > 61001",
    "SELECT alert_id FROM alerts_all WHERE mjd > 61001",
    "SELECT alert_id FROM alerts USING SAMPLE 3 ROWS (reservoir, 1) WHERE mjd > 61001",
    "SELECT alert_id FROM alerts WHERE in_cone(dec, ra, 150, 2, 0.25)",
    "SELECT alert_id FROM alerts WHERE in_cone(ra, dec, 150, 2, 0.25 + 0)",
    "SELECT alert_id FROM alerts WHERE mjd > 61001 UNION SELECT alert_id FROM alerts",
    "SELECT alert_id FROM alerts WHERE mjd > 61001; SELECT 1",
    "DESCRIBE alerts",
]


def test_queries_read_the_files_their_where_bounds_and_answer_the_rows_of_every_file(writer):
    """``broker query``'s SQL (``bounded``) reads the files its ``mjd`` comparisons and ``in_cone`` admit.

    The same rows as over every file: files of overlapping MJDs, edges exactly at an alert's MJD,
    copies across files (a later copy in the range, a first copy out of it), a file
    without bounds, RA 0/360 and the cones of :data:`PRUNE_CONES`. A damaged file outside the
    bounds: the bounded query answers, over every file it fails. A WHERE that bounds nothing
    (an OR, a subquery, a second table, a WITH, an output column named mjd) reads every file.
    """
    import duckdb

    from broker.archive.bounds import query_files

    _, timed = sky_and_times_of_files(writer)
    archive = Archive(writer.archive.url)
    files = archive.files()
    exact = [repr(r["source"]["mjd"]) for r in timed][::9] + ["61010.0"]
    sqls = [q.format(e=e) for q in BOUNDED for e in (exact if "{e}" in q else [None])]
    sqls += [f"SELECT alert_id FROM alerts WHERE in_cone(ra, dec, {c[0]!r}, {c[1]!r}, {c[2]!r}) ORDER BY alert_id"
             for c in PRUNE_CONES[::3]]
    con = duckdb.connect()
    kept = []
    for sql in sqls:
        every = archive.query(sql, keep=lambda f: True).to_pylist()
        assert archive.query(sql, bounded=True).to_pylist() == every, sql
        keep = query_files(con, sql)
        assert keep is not None, sql
        kept.append(sum(map(keep, files)))
    assert sum(k < len(files) // 2 for k in kept) > len(kept) // 2  # most read fewer than half the files
    for sql in UNBOUNDED:
        assert query_files(con, sql) is None, sql
    late = timed[7]["alertId"]  # first copy in file 1, later copy at 61010 in file 4: not in the answer
    assert archive.query("SELECT alert_id FROM alerts WHERE mjd >= 61009.5", bounded=True).num_rows == 0
    assert late in archive.query("SELECT alert_id FROM alerts_all WHERE mjd >= 61009.5").column(0).to_pylist()
    first = timed[19]["alertId"]  # file 5's copy at 60990 is the first: file 3's at 61001.x is not in its range
    assert first not in archive.query("SELECT alert_id FROM alerts WHERE mjd > 61001.4 AND mjd < 61002.2",
                                      bounded=True).column(0).to_pylist()
    sql = "SELECT alert_id FROM alerts WHERE mjd > 61002.6 ORDER BY alert_id"
    expected = archive.query(sql).column(0).to_pylist()
    damaged = next(f for f in files[1:] if f.mjd_max is not None and f.mjd_max < 61001.0)  # the first: the schema
    archive.fs.pipe_file(archive.path(damaged.path), b"\0" * damaged.size)
    assert archive.query(sql, bounded=True).column(0).to_pylist() == expected and expected
    out = f"{archive.root}/../bounded.parquet"  # broker query --out
    assert archive.export(sql, out, bounded=True) == len(expected) and pq.read_table(out).column(0).to_pylist() == \
        expected
    with pytest.raises(ArchiveCorrupt, match="unreadable"):
        archive.query(sql)
    with pytest.raises(ArchiveCorrupt, match="unreadable"):
        archive.export(sql, out)


@pytest.mark.parametrize("paged", [{}, {"page_bytes": 1, "sort_bytes": 0}])
def test_a_selection_reads_the_files_its_time_range_bounds_and_selects_what_every_file_does(writer, monkeypatch,
                                                                                              paged):
    """A replay's selection (``mjd >= a AND mjd < b AND (where)``) reads only the files whose MJDs reach it.

    The same alerts in the same order as over every file (``where_files`` dropped), sorted and paged,
    with a later copy moved into the range and a first copy moved out of it; a damaged file outside
    the range is not read (the selection over every file fails on it).
    """
    from broker.archive import reader

    _, timed = sky_and_times_of_files(writer)
    archive = Archive(writer.archive.url)
    wheres = ["mjd >= 61000.5 AND mjd < 61001.5", "mjd >= 61001.9 AND (rb > 0.2)", "mjd < 61000.4",
              "mjd >= 61009 AND mjd < 61011", "mjd >= 60989 AND mjd < 60991",
              f"mjd >= {timed[3]['source']['mjd']!r} AND mjd < {timed[20]['source']['mjd']!r}",
              "in_cone(ra, dec, 359.9, 0.0, 0.5) AND mjd >= 61001", "mjd > 61001 OR rb > 2", "true"]

    def selected(where: str) -> list[tuple[int, int]]:
        count, rows = archive.select(where, **paged)
        out = [(version, rec["alertId"]) for version, rec in rows]
        assert len(out) == count
        return out

    if paged:  # a page a query: the time ranges alone
        wheres = wheres[:7]
    pruned = [selected(w) for w in wheres]
    with monkeypatch.context() as m:
        m.setattr(reader, "where_files", lambda con, where: None)
        assert [selected(w) for w in wheres] == pruned
    assert timed[7]["alertId"] not in {a for _, a in pruned[3]} and timed[19]["alertId"] in {a for _, a in pruned[4]}
    damaged = next(f for f in archive.files()[1:] if f.mjd_max is not None and f.mjd_max < 61000.5)
    archive.fs.pipe_file(archive.path(damaged.path), b"\0" * damaged.size)
    assert selected(wheres[1]) == pruned[1] and pruned[1]
    with pytest.raises(ArchiveCorrupt):
        selected("mjd >= 61001.9 OR false")
