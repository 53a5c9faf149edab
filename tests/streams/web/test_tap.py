"""The TAP service over the archive: ADQL checked and translated, answered as pyvo, STILTS and TOPCAT read it.

Results are compared with the same archive read by DuckDB directly (``Archive.query``, what ``broker
query`` runs); hostile ADQL is answered with an ERROR VOTable and the portal keeps answering.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
import time
import warnings
from dataclasses import replace

import numpy as np
import pytest
from astropy.io.votable import parse
from fastapi.testclient import TestClient

from broker.archive.reader import Archive
from broker.errors import ArchiveError, InvalidQuery
from streams.web import adql, tap_examples, tap_schema
from streams.web.app import create_app
from tests.streams.web.conftest import MJDS, POSITIONS, SEEN
from tests.streams.web.test_live import running_server
from tests.streams.web.test_vo import _token

CONE = "1 = CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', 150.0, 2.0, 0.012))"
#: ADQL that must be refused, with a word of the reason given.
HOSTILE = [
    ("SELECT * FROM read_csv('/etc/passwd')", "table functions"),
    ("SELECT * FROM read_parquet('/tmp/x.parquet')", "table functions"),
    ("SELECT * FROM glob('/*')", "not ADQL"),
    ("SELECT * FROM 'x.parquet'", "not published"),
    ("SELECT * FROM alerts_all", "not published"),
    ("SELECT * FROM main.alerts_files", "not published"),
    ("SELECT * FROM information_schema.tables", "not published"),
    ("SELECT * FROM duckdb_settings()", "table functions"),
    ("SELECT duckdb_settings() FROM alerts", "not an ADQL function"),
    ("SELECT current_setting('memory_limit') FROM alerts", "not an ADQL function"),
    ("SELECT getvariable('x') FROM alerts", "not an ADQL function"),
    ("SELECT * FROM alerts WHERE alert_id IN (SELECT alert_id FROM alerts_all)", "not published"),
    ("SELECT alert_id FROM alerts UNION SELECT alert_id FROM alerts_all", "not published"),
    ("SELECT * FROM alerts -- harmless\n; DROP TABLE alerts", "one SELECT"),
    ("SELECT * FROM alerts; SELECT * FROM duckdb_settings()", "one SELECT"),
    ("PRAGMA database_list", "only SELECT"),
    ("SET memory_limit = '100GB'", "only SELECT"),
    ("COPY (SELECT 1) TO '/tmp/x.csv'", "only SELECT"),
    ("ATTACH '/tmp/x.db' AS x", "not ADQL"),
    ("SELECT * INTO stolen FROM alerts", "into"),
    ("WITH x AS (SELECT * FROM alerts_all) SELECT * FROM x", "with"),
    ("SELECT * FROM alerts WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), REGION('Circle ICRS 150 2 1'))", "REGION"),
    ("SELECT * FROM alerts WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), BOX('ICRS', 150, 2, 1, 1, 1))", "BOX takes"),
    ("SELECT BOX('ICRS', 150, 2, 1, 1) FROM alerts", "BOX is only read"),
    ("SELECT * FROM alerts WHERE 1 = CONTAINS(POINT('GALACTIC', ra, dec), CIRCLE('ICRS', 150, 2, 1))", "ICRS"),
    ("SELECT POINT('ICRS', ra, dec) FROM alerts", "POINT is only read"),
    ("SELECT row_number() OVER () FROM alerts", "not"),
    ("SELECT TOP -1 * FROM alerts", "ADQL"),
    ("SELECT * FROM alerts WHERE object_id = 'a\x00b'", "NUL"),
    ("SELECT " + "(" * 5000 + "1" + ")" * 5000 + " FROM alerts", "nested"),
    ("SELECT * FROM alerts WHERE " + " OR ".join(f"alert_id = {i}" for i in range(12_000)), "characters"),
    ("", "empty"),
    ("DELETE FROM alerts", "only SELECT"),
    ("SELECT CAST(ra AS BLOB) FROM alerts", "CAST"),
]


def _votable(body: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return parse(io.BytesIO(body), verify="exception")


def _status(votable) -> tuple[str, str]:
    (info,) = [i for i in votable.resources[0].infos if i.name == "QUERY_STATUS"]
    return info.value, info.content or ""


def _sync(client, query: str, **params):
    response = client.post("/api/v1/tap/sync", data={"REQUEST": "doQuery", "LANG": "ADQL", "QUERY": query, **params})
    assert response.status_code == 200, response.text[:300]
    return response


@pytest.mark.parametrize(("query", "reason"), HOSTILE)
def test_anything_but_one_select_over_the_published_tables_is_refused_with_its_reason(query, reason):
    with pytest.raises(InvalidQuery, match=f"(?i){reason}"):
        adql.translate(query, tap_schema.published(), 100)


def test_adql_is_translated_to_duckdb():
    sql = adql.translate(f"SELECT TOP 5 alert_id, LOG(snr), DISTANCE(POINT('ICRS', ra, dec), POINT('ICRS', 150, 2)) "
                         f"FROM broker.alerts WHERE {CONE} ORDER BY mjd DESC", tap_schema.published(), 100).sql
    assert "LIMIT 5" in sql and 'IN_CONE("ra", "dec", 150.0, 2.0, 0.012)' in sql and 'LN("snr")' in sql
    assert 'ANG_SEP_DEG("ra", "dec", 150, 2)' in sql and "NULLS" not in sql
    assert "LIMIT 101" in adql.translate("SELECT TOP 1000000000000 * FROM alerts", tap_schema.published(), 100).sql
    comment = adql.translate("SELECT alert_id /* ; DROP TABLE x */ FROM alerts", tap_schema.published(), 100)
    assert "DROP" not in comment.sql  # comments are not carried into the SQL run


#: ADQL the check lets through and DuckDB refuses: a column no published table has (the records' struct).
UNBOUND = [("SELECT alert FROM alerts", "binder error"),
           ("SELECT a.alert.cutoutScience FROM alerts AS a", "binder error"),
           ("SELECT alerts.alert FROM broker.alerts", "binder error"),
           ("SELECT $1 FROM alerts", "binder error")]  # a name, not a prepared statement's parameter


@pytest.mark.parametrize(("query", "reason"), HOSTILE + UNBOUND)
def test_hostile_adql_gets_an_error_votable_and_the_portal_keeps_answering(client, token, query, reason):
    response = _sync(client, query)
    votable = _votable(response.content)
    status, message = _status(votable)
    assert status == "ERROR" and reason.lower() in message.lower() and "Traceback" not in response.text
    assert votable.resources[0].tables == [] and len(response.content) < 4000
    assert _status(_votable(_sync(client, "SELECT COUNT(*) AS n FROM alerts").content))[0] == "OK"


def test_a_query_over_the_body_limit_and_unicode_are_answered(client):
    huge = "SELECT * FROM alerts WHERE object_id = '" + "é" * 100_000 + "'"
    assert _status(_votable(_sync(client, huge).content))[1].startswith("the query is 100041 characters")
    ascii_ = "SELECT * FROM alerts WHERE " + " OR ".join(f"alert_id = {i}" for i in range(6_000))
    assert len(ascii_) > 100_000 and "characters" in _status(_votable(_sync(client, ascii_).content))[1]
    over = client.post("/api/v1/tap/sync", data={"QUERY": "SELECT 1 " + " " * 1_100_000})
    assert over.status_code == 413 and over.json()["error"]  # past the body limit: the portal's JSON, unread
    votable = _votable(_sync(client, "SELECT COUNT(*) AS n FROM alerts WHERE object_id = '\u00e9\u202e\U0001F52D'")
                       .content)
    assert _status(votable)[0] == "OK" and int(votable.get_first_table().array["n"][0]) == 0


def test_a_long_or_chain_is_answered_and_a_longer_one_refused_clearly(client):
    def chain(n: int) -> str:
        return "SELECT alert_id FROM alerts WHERE " + " OR ".join(f"alert_id = {1000 + i}" for i in range(n))

    votable = _votable(_sync(client, chain(550)).content)
    assert _status(votable)[0] == "OK" and len(votable.get_first_table().array) == 6
    assert "nested more than 600 levels" in _status(_votable(_sync(client, chain(1500)).content))[1]


def test_a_cartesian_self_join_is_interrupted_at_the_time_limit(portal_config):
    joined = ", ".join(f"alerts AS a{i}" for i in range(14))  # 6**14 rows
    with TestClient(create_app(replace(portal_config, tap_timeout_s=1.0))) as client:
        start = time.monotonic()
        status, message = _status(_votable(_sync(client, f"SELECT COUNT(*) AS n FROM {joined}").content))
        assert status == "ERROR" and "time limit of 1 s" in message and time.monotonic() - start < 15
        after = _votable(_sync(client, "SELECT COUNT(*) AS n FROM alerts").content)
        assert int(after.get_first_table().array["n"][0]) == 6
        assert client.get("/api/v1/health").json()["archive"] == 6


def test_a_query_over_the_memory_limit_is_refused_and_the_next_one_runs(portal_config, tmp_path, monkeypatch):
    eight = ", ".join(f"alerts AS a{i}" for i in range(8))  # 6**8 = 1.7 million distinct 150-character keys
    key = " || ".join(f"a{i}.candid" for i in range(8))
    monkeypatch.chdir(tmp_path)  # where DuckDB would spill, were it let
    with TestClient(create_app(replace(portal_config, tap_memory_mb=16))) as client:
        status, message = _status(_votable(_sync(client, f"SELECT COUNT(DISTINCT {key}) AS n FROM {eight}").content))
        assert status == "ERROR" and "more than this service's 16 MiB of memory" in message
        assert _status(_votable(_sync(client, "SELECT COUNT(*) AS n FROM alerts").content))[0] == "OK"
    assert not (tmp_path / ".tmp").exists()  # nothing spilled: DuckDB's default bound is 90% of the free disk


def test_maxrec_cuts_with_overflow_and_the_server_bounds_it(client, portal_config):
    votable = _votable(_sync(client, "SELECT alert_id FROM alerts ORDER BY alert_id", MAXREC="4").content)
    assert _status(votable)[0] == "OVERFLOW" and len(votable.get_first_table().array) == 4
    huge = _votable(_sync(client, "SELECT TOP 100000000000000000000000000000 alert_id FROM alerts").content)
    assert _status(huge)[0] == "OK" and len(huge.get_first_table().array) == 6  # TOP past MAXREC: MAXREC bounds
    exact = _votable(_sync(client, "SELECT TOP 4 alert_id FROM alerts", MAXREC="4").content)
    assert _status(exact)[0] == "OK" and len(exact.get_first_table().array) == 4
    empty = _votable(_sync(client, "SELECT alert_id, ra FROM alerts", MAXREC="0").content)
    assert [f.name for f in empty.get_first_table().fields] == ["alert_id", "ra"]
    assert len(empty.get_first_table().array) == 0
    with TestClient(create_app(replace(portal_config, tap_maxrec=2, tap_max_maxrec=3))) as small:
        assert len(_votable(_sync(small, "SELECT * FROM alerts").content).get_first_table().array) == 2
        assert len(_votable(_sync(small, "SELECT * FROM alerts", MAXREC="999999999999999").content)
                   .get_first_table().array) == 3


def test_results_match_duckdb_over_the_same_archive(client, state):
    columns = "alert_id, object_id, telescope, mjd, ra, dec, filter, snr, magpsf, rb, anomaly"
    votable = _votable(_sync(client, f"SELECT {columns} FROM alerts WHERE {CONE} ORDER BY alert_id").content)
    table = votable.get_first_table()
    direct = Archive(state[0] / "archive").query(
        f"SELECT {columns} FROM alerts WHERE in_cone(ra, dec, 150.0, 2.0, 0.012) ORDER BY alert_id").to_pylist()
    assert len(direct) == len(table.array) == sum(1 for seen in SEEN for i in seen if i in (0, 1, 2))
    for row, mine in zip(direct, table.array, strict=True):
        for name, value in row.items():
            got = mine[name]
            assert (bool(getattr(got, "mask", False)) if value is None else got == pytest.approx(value)
                    if isinstance(value, float) else str(got) == str(value)), name
    fields = {f.name: f for f in table.fields}
    assert (str(fields["ra"].unit), fields["ra"].ucd, str(fields["mjd"].unit)) == ("deg", "pos.eq.ra;meta.main", "d")
    objects = _votable(_sync(client, "SELECT object_id, n_alerts, first_mjd, last_mjd FROM broker.objects "
                                     "ORDER BY n_alerts DESC, object_id").content).get_first_table().array
    assert len(objects) == len(POSITIONS) and int(objects["n_alerts"][0]) == 3
    assert (float(objects["first_mjd"][0]), float(objects["last_mjd"][0])) == (MJDS[0], MJDS[-1])



def test_objects_carry_the_class_of_their_newest_alert_as_rest_does(client, state):
    """``broker.objects`` had no class (REST's ``/api/v1/objects`` answers one): ``class_label``, its probability."""
    direct = Archive(state[0] / "archive").query(
        "SELECT object_id, arg_max(alert.classification, mjd) AS c FROM alerts GROUP BY object_id").to_pylist()
    table = _votable(_sync(client, "SELECT object_id, class_label, class_probability FROM broker.objects").content)
    rows = {str(r["object_id"]): r for r in table.get_first_table().array}
    assert len(rows) == len(direct) and any(d["c"] for d in direct)
    for d in direct:
        row = rows[d["object_id"]]
        if d["c"] is None:
            assert row["class_label"] is np.ma.masked and row["class_probability"] is np.ma.masked
            continue
        label = d["c"]["label"]
        assert str(row["class_label"]) == label
        assert float(row["class_probability"]) == pytest.approx(d["c"]["probabilities"][label])
    fields = {f.name: f for f in table.get_first_table().fields}
    assert (fields["class_label"].ucd, fields["class_probability"].ucd) == ("src.class", "stat.probability")


def _classified_archive(state_dir) -> list[dict]:
    """An archive of two files, alert schema versions 2 (no classification) and 4 (classes varied, one without).

    The v4 alerts' objects are those of the v2 alerts and more, observed later; what each record's class and
    probability are is varied so that a filter on them selects some and not others.
    """
    from broker.archive.writer import ArchiveWriter
    from broker.lcclass import CLASS_NAMES
    from tests.broker.test_archive import archived, commit, objects

    old, new = objects(3, 2, seed=1), objects(6, 4, seed=2)
    for i, rec in enumerate(new):
        rec["source"]["mjd"] += 1.0  # after the v2 alerts of the same objects
        label = CLASS_NAMES[i % len(CLASS_NAMES)]
        probabilities = dict.fromkeys(CLASS_NAMES, 0.05)
        probabilities[label] = 0.5 + 0.08 * i
        rec["classification"].update(label=label, probabilities=probabilities)
    new[-1]["classification"] = None
    writer = ArchiveWriter(Archive(state_dir / "archive"))
    writer.recover()
    commit(writer, archived(old))
    commit(writer, archived(new, start=len(old)))
    return old + new


def test_alerts_carry_their_own_class_null_before_schema_v3_and_rest_agrees(tmp_path):
    """``broker.alerts`` had no class (``broker.objects`` had): an ADQL query could not select alerts by class."""
    from streams.web.config import WebConfig
    from tests.streams.web.test_tap_async import _create, _until

    records = _classified_archive(tmp_path)
    assert {f.schema_version for f in Archive(tmp_path / "archive").files()} == {2, 4}
    want = {int(r["alertId"]): (r["classification"]["label"], r["classification"]["probabilities"][
        r["classification"]["label"]]) if r.get("classification") else (None, None) for r in records}
    config = WebConfig.for_state_dir(tmp_path, tokens_path=tmp_path / "tokens.sqlite",
                                     watchlists_path=tmp_path / "watchlists.sqlite", tap_jobs_dir=tmp_path / "jobs")
    with TestClient(create_app(config)) as client:
        table = _votable(_sync(client, "SELECT alert_id, schema_version, class_label, class_probability "
                                       "FROM broker.alerts ORDER BY alert_id").content).get_first_table()
        got = {int(r["alert_id"]): (str(r["class_label"]) or None,  # VOTable text has no null but ""
                                    None if r["class_probability"] is np.ma.masked else float(r["class_probability"]))
               for r in table.array}
        assert got == want and sum(label is None for label, _ in got.values()) == 4  # three of v2, one unclassified
        fields = {f.name: f for f in table.fields}
        assert (fields["class_label"].ucd, fields["class_probability"].ucd) == ("src.class", "stat.probability")
        for alert_id, (label, probability) in want.items():
            summary = client.get(f"/api/v1/alerts/{alert_id}").json()["summary"]
            assert (summary["class"], summary["class_probability"]) == (label, probability)
        query = ("SELECT alert_id, class_probability FROM broker.alerts WHERE class_label IN ('SN', 'mover', "
                 "'AGN') AND class_probability > 0.6 ORDER BY class_probability DESC")
        picked = [a for a, (label, p) in sorted(want.items(), key=lambda kv: -(kv[1][1] or 0))
                  if label in ("SN", "mover", "AGN") and p > 0.6]
        assert len(picked) == 2
        rows = _votable(_sync(client, query).content).get_first_table().array
        assert [int(i) for i in rows["alert_id"]] == picked
        rest = client.get("/api/v1/alerts", params={"filter": "class_label in ('SN', 'mover', 'AGN') and "
                                                              "class_probability > 0.6"}).json()["items"]
        assert sorted(i["alert_id"] for i in rest) == sorted(picked)  # REST's filter, by the same names
        job = _create(client, query, PHASE="RUN")
        assert _until(client, job, {"COMPLETED", "ERROR"}) == "COMPLETED"
        assert [int(i) for i in _votable(client.get(f"{job}/results/result").content)
                .get_first_table().array["alert_id"]] == picked
        csv_rows = list(csv.DictReader(io.StringIO(_sync(client, "SELECT alert_id, class_label, class_probability "
                                                                 "FROM broker.alerts", FORMAT="csv").text)))
        assert {int(r["alert_id"]): (r["class_label"] or None, float(r["class_probability"]) if
                                     r["class_probability"] else None) for r in csv_rows} == want
        objects = _votable(_sync(client, "SELECT object_id, class_label FROM broker.objects").content)
        newest = {r["objectId"]: r for r in sorted(records, key=lambda r: r["source"]["mjd"])}
        assert {str(r["object_id"]): str(r["class_label"]) or None for r in objects.get_first_table().array} == {
            o: (r["classification"] or {}).get("label") for o, r in newest.items()}


def test_an_archive_of_schema_v2_only_answers_null_classes(tmp_path):
    """No file holds ``alert.classification``: the view reads none (DuckDB would refuse it) and answers nulls."""
    from broker.archive.writer import ArchiveWriter
    from streams.web.config import WebConfig
    from streams.web.tap import TapView
    from tests.broker.test_archive import archived, commit, objects

    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    commit(writer, archived(objects(3, 2)))
    view = TapView(Archive(tmp_path / "archive"), WebConfig.for_state_dir(tmp_path))
    for table in ("broker.alerts", "broker.objects"):
        sql = adql.translate(f"SELECT class_label, class_probability FROM {table}", tap_schema.published(), 10).sql
        rows = view.run(sql, (table,)).to_pylist()
        assert rows == [{"class_label": None, "class_probability": None}] * 3, table


def test_tap_schema_describes_the_published_tables(client):
    tables = _votable(_sync(client, "SELECT schema_name, table_name FROM TAP_SCHEMA.tables").content)
    names = {str(n) for n in tables.get_first_table().array["table_name"]}
    assert {"broker.alerts", "broker.objects", "TAP_SCHEMA.columns"} <= names
    columns = _votable(_sync(client, "SELECT column_name, unit, ucd, datatype FROM TAP_SCHEMA.columns "
                                     "WHERE table_name = 'broker.alerts'").content).get_first_table().array
    by_name = {str(r["column_name"]): r for r in columns}
    assert {"night", "telescope", "object_id", "alert_id", "mjd", "ra", "dec", "filter", "snr", "magpsf", "rb",
            "anomaly"} <= set(by_name)
    assert (str(by_name["ra"]["unit"]), str(by_name["ra"]["datatype"])) == ("deg", "double")
    described = _votable(_sync(client, "SELECT table_name, column_name, ucd, description, datatype FROM "
                                       "TAP_SCHEMA.columns WHERE column_name LIKE 'class%'").content)
    classes = {(str(r["table_name"]), str(r["column_name"])): (str(r["ucd"]), str(r["description"]),
                                                               str(r["datatype"]))
               for r in described.get_first_table().array}
    assert set(classes) == {(t, c) for t in ("broker.alerts", "broker.objects")
                            for c in ("class_label", "class_probability")}
    for column, ucd, datatype in (("class_label", "src.class", "unicodeChar"),
                                  ("class_probability", "stat.probability", "double")):
        alert, obj = classes["broker.alerts", column], classes["broker.objects", column]
        assert (alert[0], alert[2]) == (obj[0], obj[2]) == (ucd, datatype)
    assert "null for alerts of schema version 1 or 2" in classes["broker.alerts", "class_label"][1]
    keys = _votable(_sync(client, "SELECT k.from_table, c.from_column FROM TAP_SCHEMA.keys AS k JOIN "
                                  "TAP_SCHEMA.key_columns AS c ON k.key_id = c.key_id").content)
    assert ("broker.alerts", "object_id") in {(str(a), str(b)) for a, b in keys.get_first_table().array}


def test_csv_get_vosi_and_metrics(client):
    answer = client.get("/api/v1/tap/sync", params={"query": "SELECT TOP 2 alert_id, ra FROM alerts ORDER BY alert_id",
                                                    "format": "csv", "lang": "ADQL"})
    assert answer.headers["content-type"].startswith("text/csv")
    assert list(csv.reader(io.StringIO(answer.text))) == [["alert_id", "ra"], ["1000", "150.0"], ["1001", "150.01"]]
    refused = client.get("/api/v1/tap/sync", params={"QUERY": "SELECT 1", "FORMAT": "fits"})
    assert _status(_votable(refused.content)) == ("ERROR", "FORMAT='fits': this service answers votable (default) "
                                                           "or csv")
    for name, value in (("LANG", "SQL"), ("REQUEST", "getCapabilities"), ("MAXREC", "-1"), ("UPLOAD", "t,x")):
        body = client.get("/api/v1/tap/sync", params={"QUERY": "SELECT 1", name: value}).content
        assert _status(_votable(body))[0] == "ERROR", name
    capabilities = client.get("/api/v1/tap/capabilities").text
    assert client.get("/api/v1/tap").text == capabilities
    assert "ivo://ivoa.net/std/TAP" in capabilities and '<hard unit="row">50000</hard>' in capabilities
    assert "<vosi:available>true</vosi:available>" in client.get("/api/v1/tap/availability").text
    assert "<name>broker.alerts</name>" in client.get("/api/v1/tap/tables").text
    metrics = client.get("/metrics").text
    assert 'portal_requests_total{route="/api/v1/tap/sync",status="200"}' in metrics


def test_a_private_portal_asks_a_token(portal_config):
    with TestClient(create_app(replace(portal_config, public_read=False))) as private:
        for path in ("/api/v1/tap/sync?QUERY=SELECT+1", "/api/v1/tap/tables", "/api/v1/tap/capabilities",
                     "/api/v1/tap/examples"):
            response = private.get(path)
            assert response.status_code == 401 and response.json()["error"] == "unauthenticated", path


def test_pyvo_queries_the_archive_as_any_tap_service(portal_config, state):
    """The TAPService of pyvo, as scripts and astroquery call it, against a private portal under uvicorn."""
    import pyvo
    import requests

    with running_server(replace(portal_config, public_read=False)) as base:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {_token(portal_config)}"
        service = pyvo.dal.TAPService(f"{base}/api/v1/tap", session=session)
        results = service.run_sync(f"SELECT alert_id, ra, dec, mjd, magpsf FROM broker.alerts WHERE {CONE} "
                                   "ORDER BY alert_id")
        direct = Archive(state[0] / "archive").query("SELECT alert_id FROM alerts WHERE in_cone(ra, dec, 150.0, "
                                                     "2.0, 0.012) ORDER BY alert_id").column(0).to_pylist()
        assert [int(i) for i in results["alert_id"]] == direct and len(direct) == 5
        assert str(results.to_table()["ra"].unit) == "deg"
        tables = service.tables
        assert {"broker.alerts", "broker.objects", "TAP_SCHEMA.columns"} <= set(tables.keys())
        assert {c.name: c.unit for c in tables["broker.alerts"].columns}["mjd"] == "d"
        assert (service.maxrec, service.hardlimit) == (10_000, 50_000)
        with pytest.raises(pyvo.dal.DALQueryError, match="not published"):
            service.run_sync("SELECT * FROM alerts_all")
        cut = service.run_sync("SELECT alert_id FROM alerts", maxrec=3)  # pyvo warns of it only past its maxrec
        assert len(cut) == 3 and cut.query_status == "OVERFLOW"
        with pytest.raises(pyvo.dal.DALServiceError):  # no token: the HTTP error, as from any protected service
            pyvo.dal.TAPService(f"{base}/api/v1/tap").run_sync("SELECT TOP 1 * FROM alerts")


needs_stilts = pytest.mark.skipif(shutil.which("stilts") is None,
                                  reason="Debian's stilts (TOPCAT's engine) is not installed; .ci/run installs it")


def _stilts(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["stilts", *args], capture_output=True, text=True, timeout=300)


@needs_stilts
def test_stilts_tapquery_reads_the_archive_as_topcat_does(portal_config):
    with running_server(portal_config) as base:
        tap = f"tapurl={base}/api/v1/tap"
        found = _stilts("tapquery", tap, "sync=true", "ofmt=csv",
                        "adql=SELECT object_id, n_alerts FROM broker.objects ORDER BY n_alerts DESC, object_id")
        refused = _stilts("tapquery", tap, "sync=true", "ofmt=csv", "adql=SELECT * FROM read_csv('/etc/passwd')")
        lint = _stilts("taplint", tap, "stages=TMV TME TMS TMC CPV CAP AVV QGE QPO QAS UWS MDQ EXA",
                       "report=EWFS")
    assert found.returncode == 0, found.stderr
    rows = list(csv.DictReader(io.StringIO(found.stdout)))
    assert len(rows) == len(POSITIONS) and rows[0]["n_alerts"] == "3"
    assert refused.returncode != 0 and "table functions are not read" in refused.stdout + refused.stderr
    assert "Section QAS" in lint.stdout and "Section UWS" in lint.stdout  # async queries and UWS jobs checked
    examples = len(tap_examples.EXAMPLES)  # each read, checked as ADQL against the tables, and run (but the upload)
    assert f"Found {examples} examples in 1 document" in lint.stdout, lint.stdout[-3000:]
    assert (f"Syntax validity success/attempt: {examples}/{examples}, Symbol validity success/attempt: "
            f"{examples - 1}/{examples - 1}, Execution success/attempt: {examples - 1}/{examples - 1}") in lint.stdout
    totals = r"Totals: Errors: 0; Warnings: 0; (Summaries: \d+; )?Failures: 0"  # report=S adds the summaries' count
    assert re.search(totals, lint.stdout), lint.stdout[-3000:]


def test_the_tap_connection_reads_no_file_but_the_archive_even_if_the_check_missed_one(client, tmp_path):
    """The second line: SQL that reached DuckDB unchecked still cannot read a file, nor turn the lock off."""
    from streams.web.tap import tap_view

    secret = tmp_path / "secret.csv"
    secret.write_text("token\nhunter2\n")
    view = tap_view(client.app.state.portal)
    assert view.run("SELECT COUNT(*) AS n FROM alerts").column(0).to_pylist() == [6]
    for sql in (f"SELECT * FROM read_csv('{secret}')", "SET enable_external_access = true"):
        with pytest.raises(ArchiveError, match="(?i)permission|disabled|locked"):
            view.run(sql)


def test_objects_are_grouped_once_per_commit_and_see_each_new_commit(tmp_path):
    """``broker.objects`` was grouped from every alert at each query (~100 ms at 100,000 alerts, ~1 s at 10^6).

    REST's ``/api/v1/objects`` reads the same rows: no grouping of its own.
    """
    from broker.archive.writer import ArchiveWriter
    from streams.web.config import WebConfig
    from streams.web.tap import tap_view
    from tests.broker.test_archive import VERSIONS, archived, commit, objects
    from tests.streams.web.conftest import build_state

    records = build_state(tmp_path)
    config = WebConfig.for_state_dir(tmp_path, tokens_path=tmp_path / "tokens.sqlite",
                                     watchlists_path=tmp_path / "watchlists.sqlite")
    count = "SELECT COUNT(*) AS n, SUM(n_alerts) AS alerts FROM broker.objects"
    with TestClient(create_app(config)) as client:
        view = tap_view(client.app.state.portal)

        def counted() -> tuple[int, int]:
            row = _votable(_sync(client, count).content).get_first_table().array[0]
            return int(row["n"]), int(row["alerts"])

        assert [counted() for _ in range(3)] == [(len(POSITIONS), len(records))] * 3
        assert view.objects.groupings == 1  # the rows of one commit, grouped once
        near = {"ra": 150.0, "dec": 2.0, "radius_arcsec": 200}
        assert len(client.get("/api/v1/objects", params=near).json()["items"]) == len(POSITIONS)
        assert view.objects is client.app.state.portal.require_archive().objects and view.objects.groupings == 1
        assert _status(_votable(_sync(client, "SELECT COUNT(*) AS n FROM broker.alerts").content))[0] == "OK"
        writer = ArchiveWriter(Archive(tmp_path / "archive"))
        writer.recover()
        new = objects(4, VERSIONS[-1], seed=3)
        for rec in new:
            rec["source"]["ra"], rec["source"]["dec"] = 150.03, 2.03  # in the cone
        commit(writer, archived(new, start=len(records)))
        assert len(client.get("/api/v1/objects", params=near).json()["items"]) == len(POSITIONS) + 4
        assert counted() == (len(POSITIONS) + 4, len(records) + 4) and view.objects.groupings == 2
        joined = _votable(_sync(client, "SELECT o.object_id, COUNT(*) AS n FROM broker.objects AS o JOIN "
                                        "broker.alerts AS a ON a.object_id = o.object_id GROUP BY o.object_id "
                                        "HAVING COUNT(*) <> MAX(o.n_alerts)").content)
        assert _status(joined)[0] == "OK" and len(joined.get_first_table().array) == 0 and view.objects.groupings == 2


def _wide_result(n: int, seed: int = 0):
    """A result of ``n`` rows with broker.alerts' columns (26), random values, nulls, NaN and hostile text."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    columns = {}
    for column in tap_schema.table_of("broker.alerts").columns:
        if column.datatype == "VARCHAR":
            values = [f"<&>\x1b{i}é" if i % 7 == 0 else f"OBJ{rng.integers(1 << 40):x}" for i in range(n)]
            columns[column.name] = pa.array([None if i % 11 == 0 else v for i, v in enumerate(values)], pa.string())
        elif column.datatype == "DOUBLE":
            values = rng.normal(0, 1e3, n)
            values[::13], values[1::17] = np.nan, np.inf
            columns[column.name] = pa.array(values, mask=np.arange(n) % 5 == 0)
        else:
            columns[column.name] = pa.array(rng.integers(-(1 << 40), 1 << 40, n), mask=np.arange(n) % 3 == 0)
    return pa.table(columns)


def test_a_large_result_votable_is_written_in_well_under_the_time_limit_and_read_back_exactly():
    """50,000 rows of 24 columns took 10.6 s to write through astropy's writer, outside the time limit."""
    import math

    from streams.triplet_png import printable
    from streams.web import tap

    translation = adql.translate("SELECT * FROM broker.alerts", tap_schema.published(), 50_000)
    table = _wide_result(50_000)
    t0 = time.perf_counter()
    body = tap.result_votable(table, translation, 50_000)
    assert time.perf_counter() - t0 < 3.0
    assert len(_votable(body).get_first_table().array) == 50_000
    small = table.slice(0, 300)
    mine = _votable(tap.result_votable(small, translation, 300)).get_first_table().array
    for name in small.column_names:
        for i, want in enumerate(small[name].to_pylist()):
            got = mine[name][i]
            if want is None and small[name].type == "string":
                assert got == "", (name, i)  # an empty cell: VOTable text has no null apart from ""
            elif want is None or (isinstance(want, float) and math.isnan(want)):
                assert mine[name].mask[i], (name, i)  # a null cell, and NaN, read back masked
            else:
                assert not mine[name].mask[i] and got == (printable(want) if isinstance(want, str) else want)


def test_repeated_column_names_are_made_unique_in_linear_time():
    """Each repeat of a name tried every suffix from _2 again: 4,000 ``ra`` took 3.8 s, 8,000 (a 32 KiB query) ~15 s."""
    import pyarrow as pa

    from streams.web import tap

    n = 8000
    translation = adql.translate("SELECT " + ", ".join(["ra"] * n) + " FROM broker.alerts", tap_schema.published(), 1)
    table = pa.table([pa.array([1.0])] * n, names=["ra"] * (n - 2) + ["ra_2", "ra_3"])
    t0 = time.perf_counter()
    keys = [f.key for f in tap._fields(table, translation)]
    assert time.perf_counter() - t0 < 1.0
    assert len(set(keys)) == n and keys[:3] == ["ra", "ra_2", "ra_3"] and keys[-2:] == ["ra_2_2", "ra_3_2"]


def test_a_select_star_of_the_most_rows_is_not_cut_by_the_cell_bound():
    """``MAX_CELLS`` is the hard row limit times broker.alerts' columns: ``SELECT *`` of 50,000 rows answered whole."""
    from streams.web import tap
    from streams.web.config import WebConfig

    assert tap.MAX_CELLS >= WebConfig().tap_max_maxrec * len(tap_schema.table_of("broker.alerts").columns)


def test_a_result_too_wide_is_refused_and_one_too_large_cut_with_overflow(client, monkeypatch):
    """Astropy writes ~1 ms per FIELD outside the time limit (8,000 columns: 8 s); cells and bytes were unbounded."""
    import pyarrow as pa

    from streams.web import tap

    wide = _status(_votable(_sync(client, "SELECT " + ", ".join(["ra"] * 1500) + " FROM alerts").content))
    assert wide[0] == "ERROR" and "1500 columns" in wide[1] and "at most 1000" in wide[1]
    translation = adql.translate("SELECT * FROM broker.alerts", tap_schema.published(), 50_000)
    table = pa.table([pa.array(range(14_000))] * 100, names=[f"c{i}" for i in range(100)])
    votable = _votable(tap.result_votable(table, translation, 50_000))
    assert len(votable.get_first_table().array) == 13_000 and _status(votable)[0] == "OVERFLOW"
    assert "at most 1,300,000 cells" in _status(votable)[1]
    assert tap.answered(table, 5000) == (5000, "more than MAXREC=5000 rows")
    assert tap.answered(table.slice(0, 10), 10) == (10, "")
    monkeypatch.setattr(tap, "MAX_BYTES", 10_000)
    text = pa.table({"t": ["x" * 1000] * 50})
    assert tap.answered(text, 100)[0] < 10 and "MiB" in tap.answered(text, 100)[1]
    assert len(tap.result_csv(text, translation, 100).splitlines()) == 1 + tap.answered(text, 100)[0]


#: ADQL over ``broker.alerts`` with a CONTAINS cone ANDed at the top of its WHERE (``{c}``: the term), read
#: from the files the cone may reach.
PRUNED_ADQL = [
    "SELECT alert_id, ra, dec, mjd, rb, class_label FROM broker.alerts WHERE {c} ORDER BY alert_id",
    "SELECT COUNT(*) AS n, MIN(mjd) AS lo, MAX(rb) AS hi FROM alerts WHERE rb >= 0 AND ({c})",
    "SELECT TOP 5 a.alert_id FROM alerts AS a WHERE a.mjd > 0 AND {a} ORDER BY a.alert_id DESC",
    "SELECT object_id, COUNT(*) AS n FROM alerts WHERE ({c} AND mjd > 0) GROUP BY object_id HAVING COUNT(*) >= 1 "
    "ORDER BY object_id",
    "SELECT DISTINCT telescope FROM alerts WHERE {c} AND 1 = 1",
    "SELECT alert_id FROM alerts WHERE INTERSECTS(CIRCLE(POINT('ICRS', {ra}, {dec}), {r}), POINT(ra, dec)) = 1 "
    "ORDER BY alert_id",
]
#: ADQL that must read every file: the cone ORed, negated, = 0, beside a subquery, a join, a set operation, a
#: derived table, another table, the point's coordinates swapped, a radius that is an expression.
UNPRUNED_ADQL = [
    "SELECT alert_id FROM alerts WHERE {c} OR rb > 0.5 ORDER BY alert_id",
    "SELECT COUNT(*) AS n FROM alerts WHERE NOT ({c})",
    "SELECT COUNT(*) AS n FROM alerts WHERE {z}",
    "SELECT alert_id FROM alerts WHERE {c} AND alert_id IN (SELECT alert_id FROM alerts WHERE rb > 0.5) "
    "ORDER BY alert_id",
    "SELECT a.alert_id FROM alerts AS a JOIN alerts AS b ON a.alert_id = b.alert_id WHERE {a} ORDER BY a.alert_id",
    "SELECT alert_id FROM alerts WHERE {c} UNION SELECT alert_id FROM alerts WHERE rb > 0.9",
    "SELECT COUNT(*) AS n FROM (SELECT * FROM alerts) AS s WHERE {c}",
    "SELECT COUNT(*) AS n FROM broker.objects WHERE {c}",
    "SELECT COUNT(*) AS n FROM alerts WHERE 1 = CONTAINS(POINT('ICRS', dec, ra), CIRCLE('ICRS', {dec}, {ra}, {r}))",
    "SELECT COUNT(*) AS n FROM alerts WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', {ra}, {dec}, "
    "{r} + 0))",
]


def test_a_tap_cone_over_alerts_reads_the_files_it_may_reach_and_answers_what_every_file_does(tmp_path):
    """A cone ANDed at the top of a query of ``broker.alerts`` alone reads the files it may reach: rows as every file.

    The cone is ``CONTAINS(POINT(ra, dec), CIRCLE) = 1``, the files those whose bounds may hold the
    circle (``may_hold_cone``, as REST's cone). Over ``tests/broker/test_archive.py``'s files of one
    region each, with first and later copies across files, a file without bounds and one at RA 360.2;
    cones on each region, across RA 0/360, at the poles, of radius 0 and 180. Queries with the cone ORed,
    negated, beside a subquery or in a join are not pruned. A file outside the cone damaged: the pruned
    query still answers, the one over every file fails.
    """
    from broker.archive.reader import may_hold_cone
    from broker.archive.writer import ArchiveWriter
    from broker.errors import ArchiveCorrupt
    from streams.web.config import WebConfig
    from streams.web.tap import TapView
    from tests.broker.test_archive import PRUNE_CONES, REGIONS, sky_of_files

    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    sky_of_files(writer)
    view = TapView(Archive(tmp_path / "archive"), WebConfig.for_state_dir(tmp_path))
    files, pruned = view.files(), 0
    con = view._connection()[0]
    for ra, dec, r in PRUNE_CONES:
        circle = f"CIRCLE('ICRS', {ra}, {dec}, {r})"
        terms = {"c": f"1 = CONTAINS(POINT('ICRS', ra, dec), {circle})", "ra": ra, "dec": dec, "r": r,
                 "z": f"CONTAINS(POINT(ra, dec), {circle}) = 0",
                 "a": f"CONTAINS(POINT('ICRS', a.ra, a.dec), {circle}) = 1"}
        for query in PRUNED_ADQL + UNPRUNED_ADQL:
            t = adql.translate(query.format(**terms), tap_schema.published(), 1000)
            assert (view._within(con, files, t.tables, t.cone) != "") == (
                query in PRUNED_ADQL and not all(may_hold_cone(f, ra, dec, r) for f in files)), query
            if query in UNPRUNED_ADQL:
                continue
            rows = [view.run(t.sql, t.tables, cone=cone).to_pylist() for cone in (t.cone, None)]
            if "ORDER BY" not in query:
                rows = [sorted(r, key=repr) for r in rows]
            assert rows[0] == rows[1], query
            pruned += query in PRUNED_ADQL and t.cone == (ra, dec, r)
    assert pruned == len(PRUNE_CONES) * len(PRUNED_ADQL)
    t = adql.translate(PRUNED_ADQL[0].format(c=f"1 = CONTAINS(POINT(ra, dec), CIRCLE({REGIONS[5][0]}, "
                                                f"{REGIONS[5][1]}, 0.6))"), tap_schema.published(), 1000)
    expected = view.run(t.sql, t.tables).to_pylist()
    view.archive.fs.pipe_file(view.archive.path(files[3].path), b"\0" * files[3].size)  # region 3's file
    assert view.run(t.sql, t.tables, cone=t.cone).to_pylist() == expected and len(expected) == 24
    with pytest.raises(ArchiveCorrupt, match="unreadable"):
        view.run(t.sql, t.tables)


#: Newest-first ADQL over ``broker.alerts`` (``{n}``: its TOP; ``{ids}``: alerts of the fourth, first and
#: second files of :func:`_timed_files`), read from the newest alerts it may answer.
NEWEST_ADQL = [
    "SELECT TOP {n} * FROM broker.alerts ORDER BY mjd DESC, alert_id",
    "SELECT TOP {n} alert_id, mjd FROM alerts WHERE rb > 0.5 ORDER BY mjd DESC, alert_id DESC",
    "SELECT TOP {n} a.alert_id, a.mjd AS t FROM alerts AS a WHERE a.rb < 0.3 OR a.alert_id < 0 ORDER BY a.mjd DESC, "
    "a.alert_id",
    "SELECT TOP {n} alert_id, mjd FROM alerts WHERE rb >= 0.1 ORDER BY mjd DESC, alert_id OFFSET 7",
    "SELECT TOP {n} alert_id FROM alerts WHERE 1 = CONTAINS(POINT(ra, dec), CIRCLE(150.0, 2.0, 0.6)) "
    "ORDER BY mjd DESC, alert_id",
    "SELECT TOP {n} alert_id, mjd AS MJD, class_label FROM alerts WHERE rb > 0.85 ORDER BY MJD DESC, alert_id",
    "SELECT TOP {n} mjd FROM alerts ORDER BY mjd DESC",
    "SELECT TOP {n} alert_id, mjd FROM alerts WHERE rb > 0.93 ORDER BY mjd DESC, alert_id",
    "SELECT TOP {n} alert_id, mjd FROM alerts WHERE MOD(alert_id, 9) = 0 ORDER BY mjd DESC, alert_id",
    "SELECT TOP {n} alert_id, mjd FROM alerts WHERE alert_id IN ({ids}) ORDER BY mjd DESC, alert_id",
    "SELECT TOP {n} alert_id, CASE WHEN rb > 0.5 THEN 1 ELSE 0 END AS real FROM alerts WHERE mjd < 60002.0 "
    "ORDER BY mjd DESC, rb, alert_id",
]
#: Queries of alerts by MJD, newest first or not, that must read every file: an order that is not mjd DESC
#: first, DISTINCT, GROUP BY, an aggregate, RAND, another column named mjd, a subquery, a join, a set
#: operation, a derived table, another table.
UNNEWEST_ADQL = [
    "SELECT TOP {n} alert_id FROM alerts ORDER BY mjd, alert_id",
    "SELECT TOP {n} alert_id FROM alerts ORDER BY alert_id, mjd DESC",
    "SELECT TOP {n} alert_id FROM alerts ORDER BY mjd + 0 DESC, alert_id",
    "SELECT DISTINCT TOP {n} telescope, mjd FROM alerts ORDER BY mjd DESC, telescope",
    "SELECT TOP {n} object_id, MAX(mjd) AS mjd FROM alerts GROUP BY object_id ORDER BY mjd DESC, object_id",
    "SELECT TOP {n} COUNT(*) AS c FROM alerts ORDER BY mjd DESC",
    "SELECT TOP {n} alert_id FROM alerts WHERE RAND() < 2.0 ORDER BY mjd DESC, alert_id",
    "SELECT TOP {n} alert_id, ra AS mjd FROM alerts ORDER BY mjd DESC, alert_id",
    "SELECT TOP {n} alert_id FROM alerts WHERE alert_id IN (SELECT alert_id FROM alerts WHERE rb > 0.5) "
    "ORDER BY mjd DESC, alert_id",
    "SELECT TOP {n} a.alert_id FROM alerts AS a JOIN alerts AS b ON a.alert_id = b.alert_id "
    "ORDER BY a.mjd DESC, a.alert_id",
    "SELECT TOP {n} alert_id, mjd FROM (SELECT * FROM alerts) AS s ORDER BY mjd DESC, alert_id",
    "SELECT TOP {n} object_id FROM broker.objects ORDER BY last_mjd DESC, object_id",
]


def _timed_files(writer, monkeypatch) -> list[dict]:
    """Six commits of 12 alerts, their MJDs rising file by file with overlaps and ties, in row groups of 4.

    The fifth file ends with a later copy of the first alert at the newest MJD (not the alert's row)
    and holds three alerts without an MJD (as files written before MJDs were required may); last a
    file at the lowest offsets (topic ``a_early``) with copies of two of the sixth file's alerts at
    old MJDs: those copies are the alerts' rows. Returns the records of the six files.
    """
    import pyarrow as pa

    from broker.archive import writer as writer_module
    from broker.archive.log import OffsetRange
    from broker.archive.rows import to_batch
    from tests.broker.test_archive import _copy, archived, objects

    monkeypatch.setattr(writer_module, "ROW_GROUP_ROWS", 4)
    rng = np.random.default_rng(31)
    records = objects(72, 3, seed=31)
    for i, rec in enumerate(records):
        rec["source"]["mjd"] = round(60000.0 + (i // 12) * 0.5 + rng.uniform(0.0, 0.7), 1)  # ties of 0.1 d
    untimed = {records[50]["alertId"], records[53]["alertId"], records[58]["alertId"]}

    def commit(alerts) -> None:
        batches = []
        for a in alerts:
            batch = to_batch([a])
            if a.record["alertId"] in untimed:
                index = batch.schema.get_field_index("mjd")
                batch = batch.set_column(index, "mjd", pa.array([None], pa.float64()))
            batches.append(batch)
        writer.commit(writer.write(batches), [OffsetRange(a.topic, 0, a.offset, a.offset + 1) for a in alerts])

    for start in range(0, 72, 12):
        batch = records[start:start + 12]
        if start == 48:
            batch = batch + [_copy(records[0], mjd=61000.0)]
        commit(archived(batch, start=start))
    commit(archived([_copy(records[61], mjd=59990.0), _copy(records[66], mjd=60000.05)], topic="a_early"))
    return records


def test_a_tap_newest_first_query_reads_the_newest_alerts_and_answers_what_every_file_does(tmp_path, monkeypatch):
    """A query of ``broker.alerts`` alone, newest first, with ``mjd >=`` its least MJD, over the files that reach it.

    As REST's newest-first page: the bound is found from ``mjd`` alone (the probe, in the newest files
    first), and left out when the newest rows include a null MJD. Over :func:`_timed_files` (copies
    across files, first copies in an old file, nulls, ties), every query answers the rows it answers
    over every file, for TOPs from 1 to past the archive, and MAXREC alone; those ordered otherwise,
    grouped, distinct or over more than one table are not bounded. An old file damaged: the newest 5
    still answer, the query over every file fails.
    """
    from broker.archive.writer import ArchiveWriter
    from broker.errors import ArchiveCorrupt
    from streams.web.config import WebConfig
    from streams.web.tap import TapView

    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    records = _timed_files(writer, monkeypatch)
    ids = ", ".join(str(records[i]["alertId"]) for i in (40, 5, 10, 20))  # one in the newest 48 rows' files
    view = TapView(Archive(tmp_path / "archive"), WebConfig.for_state_dir(tmp_path))
    files, bounded = view.files(), 0
    con = view._connection()[0]
    for n in (1, 3, 5, 12, 13, 40, 80):
        for query in NEWEST_ADQL + UNNEWEST_ADQL:
            t = adql.translate(query.format(n=n, ids=ids), tap_schema.published(), 1000)
            assert (t.newest is not None) == (query in NEWEST_ADQL), query
            if query in UNNEWEST_ADQL:
                continue
            bounded += "mjd >=" in view._within(con, files, t.tables, t.cone, t.newest)
            rows = [view.run(t.sql, t.tables, cone=t.cone, newest=newest).to_pylist() for newest in (t.newest, None)]
            assert rows[0] == rows[1], (n, query)
    maxrec = adql.translate("SELECT alert_id, mjd FROM alerts ORDER BY mjd DESC, alert_id", tap_schema.published(), 9)
    assert maxrec.newest is not None and maxrec.newest.rows == 10
    assert view.run(maxrec.sql, maxrec.tables, newest=maxrec.newest) == view.run(maxrec.sql, maxrec.tables)
    assert bounded >= 20
    untimed = adql.translate("SELECT TOP 80 mjd FROM alerts ORDER BY mjd DESC", tap_schema.published(), 1000)
    assert "mjd >=" not in view._within(con, files, untimed.tables, None, untimed.newest)  # 69 timed, 3 not
    t = adql.translate(NEWEST_ADQL[0].format(n=5), tap_schema.published(), 1000)
    expected = view.run(t.sql, t.tables).to_pylist()
    assert 61000.0 not in [r["mjd"] for r in expected]  # the later copy of the first alert
    view.archive.fs.pipe_file(view.archive.path(files[1].path), b"\0" * files[1].size)
    assert view.run(t.sql, t.tables, newest=t.newest).to_pylist() == expected
    with pytest.raises(ArchiveCorrupt, match="unreadable"):
        view.run(t.sql, t.tables)
