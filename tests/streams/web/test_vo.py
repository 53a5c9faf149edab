"""IVOA Simple Cone Search over the archive: the VOTable as astropy reads it strictly, and pyvo as a client."""

from __future__ import annotations

import copy
import csv
import io
import math
import shutil
import subprocess
import warnings
from dataclasses import replace

import numpy as np
import pytest
from astropy.io.votable import parse
from fastapi.testclient import TestClient

from broker.errors import InvalidQuery
from streams.web import vo
from streams.web.app import create_app
from tests.streams.web.conftest import MJDS, POSITIONS, SEEN
from tests.streams.web.test_live import running_server

SCS_UCD1 = ("ID_MAIN", "POS_EQ_RA_MAIN", "POS_EQ_DEC_MAIN")


def _table(body: bytes):
    """The answer's VOTable, parsed with every warning checked.

    The one warning allowed is astropy's W06 on the three UCD1 words SCS 1.03 requires (``ID_MAIN``,
    ``POS_EQ_RA_MAIN``, ``POS_EQ_DEC_MAIN``), which its check of UCD1+ words does not know.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        votable = parse(io.BytesIO(body), verify="warn")
    unexpected = [str(w.message) for w in caught
                  if not ("W06" in str(w.message) and any(f"'{u}'" in str(w.message) for u in SCS_UCD1))]
    assert not unexpected
    return votable


def _status(votable) -> dict[str, str]:
    return {info.name: info.value for info in votable.resources[0].infos}


@pytest.mark.parametrize("query", [{"RA": "150", "DEC": "2", "SR": "0.1"}, {"ra": "150", "dec": "2", "sr": "0.1"},
                                   {"Ra": "150", "dEc": "2", "sR": "0.1"}])
def test_parameter_names_are_read_in_any_case(query):
    assert vo.parse_cone(query) == vo.ConeQuery(150.0, 2.0, 0.1)


def _cone(**extra: str) -> dict[str, str]:
    return {"RA": "1", "DEC": "2", "SR": "0.1", **extra}


@pytest.mark.parametrize(("query", "message"), [
    ({"DEC": "2", "SR": "0.1"}, "RA is required"), (_cone(RA="x"), "not a number"),
    (_cone(RA="nan"), "not a finite number"), (_cone(RA="360"), "ra=360.0"), (_cone(DEC="-91"), "dec=-91.0"),
    (_cone(SR="-0.1"), "SR=-0.1"), (_cone(SR="5"), "SR=5.0 out of range"), (_cone(VERB="4"), "VERB"),
    (_cone(MAXREC="2.5"), "MAXREC"), (_cone(MAXREC="1e9"), "MAXREC")])
def test_a_bad_cone_is_refused_with_its_reason(query, message):
    with pytest.raises(InvalidQuery, match=message):
        vo.parse_cone(query)


def test_the_answer_is_a_valid_votable_with_the_scs_columns_nearest_first(client, token):
    response = client.get("/api/v1/scs", params={"RA": 150.0, "DEC": 2.0, "SR": 200 / 3600}, headers=token)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/xml; content=x-votable")
    votable = _table(response.content)
    assert votable.resources[0].type == "results" and _status(votable)["QUERY_STATUS"] == "OK"
    table = votable.get_first_table()
    ucds = {f.ucd: f.name for f in table.fields}
    assert (ucds["ID_MAIN"], ucds["POS_EQ_RA_MAIN"], ucds["POS_EQ_DEC_MAIN"]) == ("alert_id", "ra", "dec")
    rows = table.array
    assert len(rows) == 6 and list(rows["distance_arcsec"]) == sorted(rows["distance_arcsec"])
    assert rows["telescope"][0] == "SAMPLE" and {round(float(r), 2) for r in rows["ra"]} <= {p[0] for p in POSITIONS}
    same = client.get("/api/v1/cone", params={"ra": 150.0, "dec": 2.0, "radius_arcsec": 200}, headers=token).json()
    assert [int(i) for i in rows["alert_id"]] == [i["alert_id"] for i in same["items"]]


def test_verbosity_metadata_only_and_overflow(client, token):
    cone = {"RA": 150.0, "DEC": 2.0, "SR": 200 / 3600}
    minimal = _table(client.get("/api/v1/scs", params={**cone, "VERB": 1}, headers=token).content).get_first_table()
    assert [f.name for f in minimal.fields] == ["alert_id", "ra", "dec", "distance_arcsec"]
    empty = _table(client.get("/api/v1/scs", params={**cone, "SR": 0}, headers=token).content).get_first_table()
    assert len(empty.array) == 0 and len(empty.fields) == len(vo.FULL)
    cut = _table(client.get("/api/v1/scs", params={**cone, "MAXREC": 2}, headers=token).content)
    assert len(cut.get_first_table().array) == 2 and _status(cut)["QUERY_STATUS"] == "OVERFLOW"


def test_the_objects_search_answers_one_row_per_object_nearest_first(client, token):
    response = client.get("/api/v1/scs/objects", params={"RA": 150.0, "DEC": 2.0, "SR": 200 / 3600}, headers=token)
    table = _table(response.content).get_first_table()
    ucds = {f.ucd: f.name for f in table.fields}
    assert (ucds["ID_MAIN"], ucds["POS_EQ_RA_MAIN"], ucds["POS_EQ_DEC_MAIN"]) == ("object_id", "ra", "dec")
    rows = table.array
    assert len(rows) == len(POSITIONS) and len(set(rows["object_id"])) == len(POSITIONS)
    assert list(rows["distance_arcsec"]) == sorted(rows["distance_arcsec"])
    by_alerts = sorted(int(n) for n in rows["n_alerts"])
    assert by_alerts == sorted(sum(i in seen for seen in SEEN) for i in range(len(POSITIONS)))  # the fixture's truth
    nearest = rows[0]
    assert (float(nearest["ra"]), float(nearest["dec"])) == pytest.approx(POSITIONS[0]) and nearest["n_alerts"] == 3
    assert (float(nearest["first_mjd"]), float(nearest["last_mjd"])) == (MJDS[0], MJDS[-1])
    same = client.get("/api/v1/objects", params={"ra": 150.0, "dec": 2.0, "radius_arcsec": 200}).json()["items"]
    assert [i["object_id"] for i in same] == list(rows["object_id"]) and same[0]["n_alerts"] == 3
    minimal = client.get("/api/v1/scs/objects", params={"RA": 150.0, "DEC": 2.0, "SR": 0.1, "VERB": 1})
    assert [f.name for f in _table(minimal.content).get_first_table().fields] == [
        "object_id", "ra", "dec", "distance_arcsec"]


def test_an_objects_mean_position_across_ra_zero_is_where_its_alerts_are(tmp_path):
    from broker.archive.reader import Archive
    from broker.archive.writer import ArchiveWriter
    from streams.web.queries import ArchiveView, object_cone
    from tests.broker.test_archive import archived, commit, objects

    records = objects(2, 3)
    for rec, ra in zip(records, (359.99995, 0.00015), strict=True):
        rec["objectId"] = rec["object"]["objectId"] = "OBJWRAP"
        rec["source"]["ra"], rec["source"]["dec"] = ra, 0.0
    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    commit(writer, archived(records))
    (found,) = object_cone(ArchiveView(Archive(tmp_path / "archive")), 0.0, 0.0, 2.0, 10)
    assert found["object_id"] == "OBJWRAP" and found["n_alerts"] == 2
    assert found["ra"] == pytest.approx(0.00005, abs=1e-9) and found["distance_arcsec"] == pytest.approx(0.18)


def test_the_objects_cone_answers_what_grouping_the_alerts_at_each_request_did(tmp_path):
    """``/api/v1/objects`` grouped at each request (263 ms at 10^6 alerts); it reads the objects of the commit.

    The same objects, counts, times, magnitudes and classes, on seeded objects of three alerts each,
    across RA 0/360 and near a pole.
    """
    from broker.archive.reader import Archive
    from broker.archive.writer import ArchiveWriter
    from streams.web.queries import ArchiveView, object_cone
    from tests.broker.test_archive import archived, commit, objects

    rng = np.random.default_rng(5)
    centres = [(0.0, 0.0), (359.999, 30.0), (80.0, 89.9), (150.0, 2.0)]
    records = []
    for k, rec in enumerate(objects(120, 3, seed=5)):
        ra0, dec0 = centres[k % 4]
        ra, dec = (ra0 + rng.uniform(-0.2, 0.2)) % 360.0, min(dec0 + rng.uniform(-0.2, 0.2), 90.0)
        for j in range(3):
            alert = copy.deepcopy(rec)
            alert["candid"] = f"{rec['candid']}-{j}"
            alert["alertId"] = 10 * k + j
            alert["source"].update(ra=(ra + rng.normal(0, 1e-4)) % 360.0, dec=dec, mjd=60000.0 + k + j / 10)
            alert["classification"]["label"] = f"class{j}"
            records.append(alert)
    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    commit(writer, archived(records))
    view = ArchiveView(Archive(tmp_path / "archive"))
    for (ra0, dec0), radius in zip(centres, (600.0, 300.0, 400.0, 500.0), strict=True):
        reference = view.query(f"""WITH o AS (SELECT object_id, count(*) AS n_alerts, min(mjd) AS first_mjd,
            max(mjd) AS last_mjd, (degrees(atan2(avg(sin(radians(ra))), avg(cos(radians(ra))))) + 360.0) % 360.0
            AS ra, avg(dec) AS dec, arg_max(magpsf, mjd) AS last_mag, arg_max(alert.classification.label, mjd) AS c
            FROM alerts GROUP BY object_id) SELECT *, ang_sep_deg(ra, dec, {ra0}, {dec0}) * 3600.0 AS d FROM o
            WHERE d <= {radius} ORDER BY d, object_id""").to_pylist()
        got = object_cone(view, ra0, dec0, radius, 1000)
        assert len(reference) > 3 and [g["object_id"] for g in got] == [r["object_id"] for r in reference]
        for g, r in zip(got, reference, strict=True):
            assert (g["n_alerts"], g["first_mjd"], g["last_mjd"], g["last_mag"], g["class"]) == \
                (r["n_alerts"], r["first_mjd"], r["last_mjd"], r["last_mag"], r["c"])
            assert (g["n_alerts"], g["class"]) == (3, "class2")  # the newest alert's class
            assert (g["ra"], g["dec"], g["distance_arcsec"]) == pytest.approx((r["ra"], r["dec"], r["d"]), abs=1e-9)


def test_missing_values_are_masked_not_invented():
    item = {"alert_id": 7, "ra": 1.0, "dec": 2.0, "distance_arcsec": 0.5, "magpsf": None, "class": None,
            "object_id": "O\u00e9<&>\"'\x00\x1b\ud800", "rb": 0.9}
    rows = _table(vo.cone_votable(vo.ConeQuery(1.0, 2.0, 0.1), [item])).get_first_table().array
    assert rows["magpsf"].mask[0] and not rows["rb"].mask[0]
    assert rows["class"][0] == ""  # VOTable's null text
    assert rows["object_id"][0] == "O\u00e9<&>\"'\\x00\\x1b\\ud800" and math.isclose(rows["rb"][0], 0.9)


@pytest.mark.parametrize("query", [
    {}, {"RA": "' OR 1=1 --", "DEC": "0", "SR": "1"}, {"RA": "1e308", "DEC": "0", "SR": "1"},
    {"RA": "<script>", "DEC": "0", "SR": "1"}, {"RA": "1", "DEC": "0", "SR": "1", "VERB": "x" * 5000}])
def test_a_hostile_query_gets_the_scs_error_votable(client, token, query):
    response = client.get("/api/v1/scs", params=query, headers=token)
    assert response.status_code == 200, response.text[:300]
    votable = _table(response.content)
    assert _status(votable)["QUERY_STATUS"] == "ERROR" and _status(votable)["Error"]
    assert votable.resources[0].tables == [] and "Traceback" not in response.text
    assert len(response.content) < 2000  # a huge parameter is not echoed back whole


def test_a_private_portal_answers_401_without_a_token(portal_config):
    with TestClient(create_app(replace(portal_config, public_read=False))) as private:
        response = private.get("/api/v1/scs", params={"RA": 1, "DEC": 2, "SR": 0.1})
    assert response.status_code == 401 and response.json()["error"] == "unauthenticated"


def test_pyvo_searches_the_archive_as_any_cone_search_service(portal_config):
    """pyvo, as astronomers' scripts (and astroquery) call a VO cone search, against a private portal under uvicorn."""
    import pyvo
    import requests

    with running_server(replace(portal_config, public_read=False)) as base:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {_token(portal_config)}"
        service = pyvo.dal.SCSService(f"{base}/api/v1/scs", session=session)
        results = service.search(pos=(150.0, 2.0), radius=200 / 3600)
        assert len(results) == 6
        first = results[0]
        assert first.id == results["alert_id"][0] and first.pos.ra.deg == pytest.approx(150.0)
        assert np.all(np.diff(results["distance_arcsec"]) >= 0)
        assert len(set(results.to_table()["object_id"])) == 4
        with pytest.raises(pyvo.dal.DALQueryError, match="out of range"):
            service.search(pos=(150.0, 2.0), radius=5.0)
        objects = pyvo.dal.SCSService(f"{base}/api/v1/scs/objects", session=session).search(
            pos=(150.0, 2.0), radius=200 / 3600)
        assert len(objects) == 4 and objects[0].id == objects["object_id"][0] == results["object_id"][0]
        with pytest.raises(pyvo.dal.DALServiceError):  # no token: the HTTP error, as from any protected service
            pyvo.dal.SCSService(f"{base}/api/v1/scs").search(pos=(150.0, 2.0), radius=0.01)


def _token(config) -> str:
    """A read token added to the portal's token file (the server reads it on each request)."""
    from streams.web.tokens import TokenStore

    store = TokenStore(config.tokens_path)
    try:
        return store.add("pyvo", ["read"])
    finally:
        store.close()


#: Debian's STILTS: the command-line TOPCAT, the same STIL library reading the table.
needs_stilts = pytest.mark.skipif(shutil.which("stilts") is None,
                                  reason="Debian's stilts (TOPCAT's engine) is not installed; .ci/run installs it")


def _stilts(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["stilts", *args], capture_output=True, text=True, timeout=120)


@needs_stilts
def test_stilts_votlint_finds_nothing_wrong_in_any_answer(tmp_path):
    hostile = {"alert_id": 7, "ra": 1.0, "dec": 2.0, "distance_arcsec": 0.5, "magpsf": None, "class": None,
               "object_id": "O\u00e9<&>\"'\x00\x1b\ud800]]>", "rb": float("nan")}
    answers = {"rows": vo.cone_votable(vo.ConeQuery(1.0, 2.0, 0.1), [hostile]),
               "columns only": vo.cone_votable(vo.ConeQuery(1.0, 2.0, 0.0), []),
               "error": vo.error_votable("SR=5.0 out of range"),
               "objects": vo.cone_votable(vo.ConeQuery(1.0, 2.0, 0.1), [{
                   "object_id": hostile["object_id"], "ra": 1.0, "dec": 2.0, "distance_arcsec": 0.5, "n_alerts": 3,
                   "first_mjd": 60000.5, "last_mjd": None, "last_band": "r'\x1b", "max_rb": float("nan")}],
                   objects=True)}
    broken = tmp_path / "broken.xml"
    broken.write_bytes(answers["rows"].replace(b"<TD>0.5</TD>", b"<TD>half</TD>"))
    assert "Bad double" in _stilts("votlint", "ucd=true", "unit=true", str(broken)).stdout  # it does check
    for name, body in answers.items():
        path = tmp_path / f"{name}.xml"
        path.write_bytes(body)
        lint = _stilts("votlint", "ucd=true", "unit=true", str(path))
        assert lint.returncode == 0 and lint.stdout.strip() == "" and lint.stderr.strip() == "", (name, lint)


@needs_stilts
def test_stilts_cone_reads_the_archive_as_topcat_does(portal_config):
    with running_server(portal_config) as base:
        found = _stilts("cone", f"serviceurl={base}/api/v1/scs", "lon=150", "lat=2", f"radius={200 / 3600}",
                        "ofmt=csv")
        refused = _stilts("cone", f"serviceurl={base}/api/v1/scs", "lon=150", "lat=2", "radius=5", "ofmt=csv")
    assert found.returncode == 0, found.stderr
    rows = list(csv.DictReader(io.StringIO(found.stdout)))
    assert len(rows) == 6 and rows[0]["telescope"] == "SAMPLE"
    assert [float(r["distance_arcsec"]) for r in rows] == sorted(float(r["distance_arcsec"]) for r in rows)
    assert refused.returncode != 0 and "SR=5.0 out of range" in refused.stderr + refused.stdout
