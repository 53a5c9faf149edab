"""Tables uploaded with TAP queries (UPLOAD, TAP_UPLOAD.name): pyvo's and STILTS' uploads, and hostile VOTables.

A cross-match of uploaded positions against the archive is compared with the same pairs found by
DuckDB over the archive directly; each hostile VOTable is answered with an ERROR VOTable naming
what was refused, and the portal answers the next query.
"""

from __future__ import annotations

import base64
import csv
import io
import re
import struct
import time
import warnings
from dataclasses import replace

import numpy as np
import pytest
from astropy.table import Table
from fastapi.testclient import TestClient

from broker.archive.reader import Archive
from broker.errors import InvalidQuery
from streams.web import tap_upload
from streams.web.app import create_app
from tests.streams.web.conftest import POSITIONS
from tests.streams.web.test_live import running_server
from tests.streams.web.test_tap import _status, _stilts, _votable, needs_stilts
from tests.streams.web.test_tap_async import ASYNC, _until
from tests.streams.web.test_vo import _token

MATCH = ("SELECT a.alert_id, m.name, m.ra AS m_ra FROM broker.alerts AS a JOIN TAP_UPLOAD.mine AS m ON "
         "1 = CONTAINS(POINT('ICRS', a.ra, a.dec), CIRCLE('ICRS', m.ra, m.dec, 0.001)) ORDER BY a.alert_id")
COUNT = "SELECT COUNT(*) AS n FROM alerts"


def _targets() -> Table:
    """Three positions: two of the archive's objects (0 and 3) a little off, and one far from all."""
    table = Table({"ra": [POSITIONS[0][0] + 2e-4, POSITIONS[3][0], 10.0], "dec": [POSITIONS[0][1], POSITIONS[3][1]
                                                                                  - 3e-4, -5.0],
                   "name": ["first", "fourth", "nowhere"]})
    table["ra"].unit = table["dec"].unit = "deg"
    table["ra"].meta["ucd"] = "pos.eq.ra"
    return table


def _votable_bytes(table: Table, form: str = "tabledata") -> bytes:
    out = io.BytesIO()
    table.write(out, format="votable", tabledata_format=form)
    return out.getvalue()


def _direct(state) -> list[tuple[int, str]]:
    """The (alert id, target name) pairs within 0.001 deg, found by DuckDB over the archive itself."""
    pairs = []
    for ra, dec, name in _targets().iterrows():
        ids = Archive(state[0] / "archive").query(f"SELECT alert_id FROM alerts WHERE in_cone(ra, dec, {ra}, {dec}, "
                                                  "0.001)").column(0).to_pylist()
        pairs += [(i, name) for i in ids]
    return sorted(pairs)


def _upload(client, query: str, data: bytes, upload: str = "mine,param:mine", **params):
    response = client.post("/api/v1/tap/sync", data={"QUERY": query, "UPLOAD": upload, **params},
                           files={upload.split(":")[-1]: ("mine.xml", data, "application/x-votable+xml")})
    assert response.status_code == 200, response.text[:300]
    return _votable(response.content)


@pytest.mark.parametrize("form", ["tabledata", "binary", "binary2"])
def test_a_cross_match_with_an_uploaded_table_finds_the_archives_pairs(client, state, form):
    votable = _upload(client, MATCH, _votable_bytes(_targets(), form))
    assert _status(votable)[0] == "OK"
    rows = votable.get_first_table().array
    assert sorted((int(r["alert_id"]), str(r["name"])) for r in rows) == _direct(state) and len(rows) == 4
    schema = _upload(client, "SELECT TOP 0 * FROM TAP_UPLOAD.mine", _votable_bytes(_targets(), form))
    named = {f.name: f for f in schema.get_first_table().fields}
    assert (str(named["ra"].unit), named["ra"].ucd, named["name"].datatype) == ("deg", "pos.eq.ra", "unicodeChar")


def test_upload_parameters_are_checked_and_urls_refused(client):
    data = _votable_bytes(_targets())
    for upload, reason in (("mine,https://example.org/t.xml", "no network access"),
                           ("mine,http://127.0.0.1:9/x", "no network access"),
                           ("mine,file:///etc/passwd", "no network"),
                           ("mine", "name,param:part"), ("1x,param:mine", "identifier"),
                           ("a,param:mine;A,param:mine", "twice"),
                           (";".join(f"t{i},param:mine" for i in range(5)), "1 to 4")):
        votable = _upload(client, "SELECT * FROM TAP_UPLOAD.mine", data, upload=upload)
        assert _status(votable)[0] == "ERROR" and reason in _status(votable)[1], (upload, _status(votable))
    missing = client.post("/api/v1/tap/sync", data={"QUERY": COUNT, "UPLOAD": "mine,param:absent"},
                          files={"other": ("mine.xml", data)})
    assert "no part 'absent'" in _status(_votable(missing.content))[1]
    unknown = _upload(client, "SELECT * FROM TAP_UPLOAD.other", data)
    assert "not published" in _status(unknown)[1]
    assert "not published" in _status(_upload(client, "SELECT * FROM mine", data))[1]  # the schema is required
    with pytest.raises(InvalidQuery, match="no network"):
        tap_upload.upload_pairs("t,ftp://x/y")
    capabilities = client.get("/api/v1/tap/capabilities").text
    assert "#upload-inline" in capabilities and "no network access" in capabilities


def _field_table(fields: str, rows: str, extra: str = "") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>{extra}<VOTABLE version="1.4" '
            f'xmlns="http://www.ivoa.net/xml/VOTable/v1.3"><RESOURCE><TABLE>{fields}<DATA>{rows}</DATA>'
            "</TABLE></RESOURCE></VOTABLE>").encode()


_RA = '<FIELD name="ra" datatype="double"/>'
_ONE = "<TABLEDATA><TR><TD>1.5</TD></TR></TABLEDATA>"
_LAUGHS = ('<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
           '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>')
#: VOTables that must be refused, with a word of the reason given.
HOSTILE = [
    (b"<VOTABLE><RESOURCE><TABLE>", "not well-formed"),
    (b"\xff\xfe<\x00V\x00", "not UTF-8"),
    (_field_table(_RA, "<TABLEDATA><TR><TD>&lol3;</TD></TR></TABLEDATA>", _LAUGHS), "DTD or entities"),
    (_field_table(_RA, _ONE, '<!DOCTYPE x SYSTEM "file:///etc/passwd">'), "DTD"),
    (_field_table(_RA, _ONE).replace(b"UTF-8", b"UTF-16"), "UTF-8 is read"),
    (_field_table(_RA, "<BINARY2><STREAM encoding=\"base64\">" + base64.b64encode(b"\x00garbage!!").decode()
                  + "</STREAM></BINARY2>"), "garbage after the rows"),
    (_field_table(_RA, "<BINARY2><STREAM encoding=\"base64\">" + base64.b64encode(b"\x00\x01\x02").decode()
                  + "</STREAM></BINARY2>"), "cut, or garbage"),
    (_field_table(_RA, "<BINARY2><STREAM encoding=\"base64\">%%%not base64%%%</STREAM></BINARY2>"), "not base64"),
    (_field_table(_RA, "<BINARY2><STREAM encoding=\"base64\">\u00e9\u00e9</STREAM></BINARY2>"), "not base64"),
    (_field_table(_RA, '<BINARY2><STREAM href="file:///etc/passwd"/></BINARY2>'), "STREAM with a reference"),
    (_field_table(_RA, '<BINARY><STREAM href="http://127.0.0.1:9/x"/></BINARY>'), "STREAM with a reference"),
    (_field_table(_RA, '<FITS><STREAM href="file:///etc/passwd"/></FITS>'), "FITS"),
    (_field_table(_RA, _ONE).replace(b"<TABLE>", b'<TABLE nrows="1000000000000">'), "declares"),
    (_field_table('<FIELD name="s" datatype="char" arraysize="2000000000"/>', _ONE), "arraysize"),
    (_field_table('<FIELD name="v" datatype="double" arraysize="3"/>', _ONE), "an array"),
    (_field_table('<FIELD name="c" datatype="doubleComplex"/>', _ONE), "datatype 'doubleComplex'"),
    (_field_table('<FIELD name="b" datatype="bit"/>', _ONE), "datatype 'bit'"),
    (_field_table('<FIELD name="x"/>', _ONE), "datatype ''"),
    (_field_table('<FIELD name="ra&quot;) FROM alerts; DROP TABLE x; --" datatype="double"/>', _ONE),
     "not an ADQL regular identifier"),
    (_field_table('<FIELD name="x y" datatype="double"/>', _ONE), "not an ADQL regular identifier"),
    (_field_table(_RA + '<FIELD name="RA" datatype="double"/>',
                  "<TABLEDATA><TR><TD>1</TD><TD>2</TD></TR></TABLEDATA>"), "repeated"),
    (_field_table("".join(f'<FIELD name="c{i}" datatype="int"/>' for i in range(101)), _ONE), "over 100 columns"),
    (_field_table(_RA, "<TABLEDATA>" + "<TR><TD>1</TD></TR>" * 100_001 + "</TABLEDATA>"), "100,000 rows"),
    (_field_table("".join(f'<FIELD name="c{i}" datatype="unicodeChar" arraysize="4096"/>' for i in range(100)),
                  "<TABLEDATA>" + ("<TR>" + "<TD>a</TD>" * 100 + "</TR>") * 1000 + "</TABLEDATA>"), "would take over"),
    (_field_table('<FIELD name="s" datatype="char" arraysize="4096"/>', _ONE).replace(
        b"<TABLE>", b'<TABLE nrows="100000">'), "would take over"),
    (_field_table("", _ONE), "no TABLE with a FIELD"),
    (b"<x/>", "no TABLE"),
    (b"", "not well-formed"),
]


@pytest.mark.parametrize(("data", "reason"), HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_votables_get_an_error_votable_and_the_portal_keeps_answering(client, data, reason):
    start = time.monotonic()
    votable = _upload(client, "SELECT * FROM TAP_UPLOAD.mine", data)
    status, message = _status(votable)
    assert status == "ERROR" and reason in message and "UPLOAD mine" in message, message
    assert time.monotonic() - start < 10
    assert _status(_votable(client.post("/api/v1/tap/sync", data={"QUERY": COUNT}).content))[0] == "OK"


def test_the_largest_upload_is_read_and_a_larger_body_refused(client):
    rng = np.random.default_rng(1)
    big = Table({"ra": rng.uniform(0, 360, tap_upload.MAX_UPLOAD_ROWS), "dec": rng.uniform(-90, 90, 100_000)})
    start = time.monotonic()
    votable = _upload(client, "SELECT COUNT(*) AS n FROM TAP_UPLOAD.mine", _votable_bytes(big, "binary2"))
    assert _status(votable)[0] == "OK" and int(votable.get_first_table().array["n"][0]) == 100_000
    assert time.monotonic() - start < 20
    over = client.post("/api/v1/tap/sync", data={"QUERY": COUNT, "UPLOAD": "mine,param:mine"},
                       files={"mine": ("m.xml", b"x" * (tap_upload.MAX_UPLOAD_BYTES + 2 * 2**20))})
    assert over.status_code == 413  # past the body limit: the portal's JSON, unread
    assert _status(_votable(client.post("/api/v1/tap/sync", data={"QUERY": COUNT}).content))[0] == "OK"


def test_a_join_over_uploads_stays_within_the_time_limit_and_the_cross_match_is_a_range_join(portal_config):
    rng = np.random.default_rng(2)
    many = Table({"ra": rng.uniform(0, 360, 50_000), "dec": rng.uniform(-90, 90, 50_000)})
    cartesian = ("SELECT COUNT(*) AS n FROM TAP_UPLOAD.mine AS x, TAP_UPLOAD.mine AS y, TAP_UPLOAD.mine AS z")
    with TestClient(create_app(replace(portal_config, tap_timeout_s=1.0))) as client:
        start = time.monotonic()
        status, message = _status(_upload(client, cartesian, _votable_bytes(many, "binary2")))
        assert status == "ERROR" and "time limit of 1 s" in message and time.monotonic() - start < 15
        assert _status(_votable(client.post("/api/v1/tap/sync", data={"QUERY": COUNT}).content))[0] == "OK"
        from streams.web import adql, tap_schema
        from streams.web.tap import tap_view

        uploaded = tap_upload.read_votable("mine", _votable_bytes(many, "binary2"), "tap_upload_0")
        match = "SELECT a.alert_id, m.ra FROM alerts AS a JOIN TAP_UPLOAD.mine AS m ON " + MATCH.split(" ON ")[1]
        sql = adql.translate(match, tap_schema.published() + (uploaded.published(),), 100).sql
        plan = tap_view(client.app.state.portal).run("EXPLAIN " + sql, uploads=(uploaded,)).column(1)[0].as_py()
        joins = set(re.findall(r"─ ([A-Za-z_ ]+(?:Join|Product)) ─", plan))  # a range join on the band of declination
        assert joins and all(j.strip() in ("IE Join", "Piecewise Merge Join") for j in joins), joins


def _empty_cells(columns: int, rows: int) -> bytes:
    """A TABLEDATA VOTable of ``rows`` x ``columns`` empty double cells: the slowest to read (~10 us a cell)."""
    fields = "".join(f'<FIELD name="c{i}" datatype="double"/>' for i in range(columns))
    rows_xml = ("<TR>" + "<TD/>" * columns + "</TR>") * rows
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<VOTABLE version="1.4" '
            f'xmlns="http://www.ivoa.net/xml/VOTable/v1.3"><RESOURCE type="results"><TABLE nrows="{rows}">{fields}'
            f"<DATA><TABLEDATA>{rows_xml}</TABLEDATA></DATA></TABLE></RESOURCE></VOTABLE>").encode()


def test_reading_an_upload_is_held_to_the_query_time_limit(portal_config):
    """Uploads were read outside the query's time limit: up to 32 s, then the query had its 30 s.

    15.5 MiB of empty TABLEDATA cells (3.2 million, 100 columns) took 32 s to read on the 2-core
    machine, 10^7 BINARY booleans (12.7 MiB) 10.5 s.
    """
    data = _empty_cells(100, 10_000)  # 4.9 MiB: 3 to 9 s to read
    start = time.monotonic()
    with pytest.raises(InvalidQuery, match="time limit of 0.5 s"):
        tap_upload.read_uploads("mine,param:mine", {"mine": data}, limit_s=0.5)
    assert time.monotonic() - start < 1.5
    assert tap_upload.read_uploads("mine,param:mine", {"mine": _empty_cells(3, 10)}, limit_s=0.5)[0].rows.num_rows == 10
    with TestClient(create_app(replace(portal_config, tap_timeout_s=1.0))) as client:
        status, message = _status(_upload(client, "SELECT COUNT(*) AS n FROM TAP_UPLOAD.mine", data))
        assert status == "ERROR" and "reading the uploaded tables ran past this service's time limit of 1 s" in message
        assert _status(_upload(client, "SELECT COUNT(*) AS n FROM TAP_UPLOAD.mine", _empty_cells(3, 10)))[0] == "OK"

def test_an_async_job_keeps_its_upload_and_runs_it(client, state):
    data = _votable_bytes(_targets(), "binary2")
    made = client.post(ASYNC, data={"QUERY": MATCH, "UPLOAD": "mine,param:mine", "PHASE": "RUN"},
                       files={"mine": ("mine.xml", data)}, follow_redirects=False)
    job = made.headers["location"].removeprefix("http://testserver")
    assert _until(client, job, {"COMPLETED", "ERROR"}) == "COMPLETED"
    rows = _votable(client.get(f"{job}/results/result").content).get_first_table().array
    assert sorted((int(r["alert_id"]), str(r["name"])) for r in rows) == _direct(state)
    assert 'id="upload">mine,param:mine' in client.get(f"{job}/parameters").text


def test_pyvo_uploads_a_table_sync_and_async(portal_config, state):
    """The run_sync, run_async, submit_job (``uploads=``) and job.upload of pyvo, against a private portal."""
    import gc

    import pyvo
    import requests

    with running_server(replace(portal_config, public_read=False)) as base:
        with requests.Session() as session, warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)  # pyvo's submit_job leaves its answer open
            session.headers["Authorization"] = f"Bearer {_token(portal_config)}"
            service = pyvo.dal.TAPService(f"{base}/api/v1/tap", session=session)
            assert "upload-inline" in str(service.upload_methods[0].ivo_id).lower() or service.upload_methods
            found = service.run_sync(MATCH, uploads={"mine": _targets()})
            assert sorted((int(r["alert_id"]), str(r["name"])) for r in found) == _direct(state)
            later = service.run_async(MATCH, uploads={"mine": _targets()})
            assert sorted((int(r["alert_id"]), str(r["name"])) for r in later) == _direct(state)
            job = service.submit_job("SELECT COUNT(*) AS n FROM TAP_UPLOAD.extra")
            job.upload(extra=_targets())
            job.run().wait(timeout=30)
            assert job.phase == "COMPLETED" and int(job.fetch_result()["n"][0]) == 3
            job.delete()
            with pytest.raises(pyvo.dal.DALQueryError, match="no network access"):
                service.run_sync("SELECT * FROM TAP_UPLOAD.far", uploads={"far": "https://example.org/t.xml"})
            gc.collect()


@needs_stilts
def test_stilts_uploads_a_table_and_taplint_checks_uploads(portal_config, state, tmp_path):
    targets = tmp_path / "targets.vot"
    _targets().write(targets, format="votable")
    with running_server(portal_config) as base:
        tap = f"tapurl={base}/api/v1/tap"
        adql = MATCH.replace("TAP_UPLOAD.mine", "TAP_UPLOAD.t1")
        found = _stilts("tapquery", tap, "sync=true", "ofmt=csv", "nupload=1", f"upload1={targets}",
                        "upname1=t1", f"adql={adql}")
        later = _stilts("tapquery", tap, "ofmt=csv", "delete=always", "nupload=1", f"upload1={targets}",
                        "upname1=t1", f"adql={adql}")
        lint = _stilts("taplint", tap, "stages=TMV TME TMS TMC CPV CAP AVV QGE QPO QAS UWS MDQ UPL", "report=EWF")
    for answer in (found, later):
        assert answer.returncode == 0, answer.stderr
        rows = list(csv.DictReader(io.StringIO(answer.stdout)))
        assert sorted((int(r["alert_id"]), r["name"]) for r in rows) == _direct(state)
    assert "Section UPL" in lint.stdout and "Totals: Errors: 0; Warnings: 0; Failures: 0" in lint.stdout, \
        lint.stdout[-3000:]


def _text_stream(*cells: bytes) -> bytes:
    """A VOTable of one text column of variable length and a double, whose BINARY2 stream is ``cells`` joined."""
    return _field_table('<FIELD name="s" datatype="char" arraysize="*"/>' + _RA,
                        f'<BINARY2><STREAM encoding="base64">{base64.b64encode(b"".join(cells)).decode()}'
                        "</STREAM></BINARY2>")


def test_binary2_text_of_variable_length_is_read_whole_or_refused(client):
    """Astropy dropped a row whose text length ran past the stream (here 2 GiB), and garbage after the rows."""
    row = b"\x00" + struct.pack(">i", 3) + b"abc" + struct.pack(">d", 1.5)
    whole = _upload(client, "SELECT s, ra FROM TAP_UPLOAD.mine", _text_stream(row, row))
    assert _status(whole)[0] == "OK" and [str(s) for s in whole.get_first_table().array["s"]] == ["abc", "abc"]
    for cells in ((row, b"\x00" + struct.pack(">i", 2**31 - 1) + b"abc"), (row, b"\x00\x00"), (row, row[:-1])):
        status, message = _status(_upload(client, "SELECT * FROM TAP_UPLOAD.mine", _text_stream(*cells)))
        assert status == "ERROR" and "cut, or garbage" in message, message
    assert _status(_votable(client.post("/api/v1/tap/sync", data={"QUERY": COUNT}).content))[0] == "OK"


def test_a_jobs_uploads_count_in_the_bytes_kept_for_jobs(portal_config):
    rng = np.random.default_rng(3)
    data = _votable_bytes(Table({"ra": rng.uniform(0, 360, 60_000), "dec": rng.uniform(-90, 90, 60_000)}), "binary2")
    assert len(data) > 2**20
    with TestClient(create_app(replace(portal_config, tap_job_results_mb=1))) as client:
        refused = client.post(ASYNC, data={"QUERY": COUNT, "UPLOAD": "mine,param:mine"}, files={"mine": ("m", data)})
        assert refused.status_code == 409 and "tap_job_results_mb" in refused.json()["detail"]
        assert client.get(ASYNC).text.count("jobref") == 0
        small = client.post(ASYNC, data={"QUERY": "SELECT COUNT(*) AS n FROM TAP_UPLOAD.mine",
                                         "UPLOAD": "mine,param:mine", "PHASE": "RUN"},
                            files={"mine": ("m", _votable_bytes(_targets()))}, follow_redirects=False)
        job = small.headers["location"].removeprefix("http://testserver")
        assert _until(client, job, {"COMPLETED", "ERROR"}) == "COMPLETED"
