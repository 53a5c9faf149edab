"""``GET /api/v1/objects/{id}/lightcurve``: the object page's points as JSON, CSV and a VOTable."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import warnings

import pytest
from astropy.io.votable import parse

from streams.web.lightcurves import COLUMNS, points_csv
from tests.streams.web.conftest import MJDS


def _object_id(client) -> str:
    return client.get("/api/v1/cone", params={"ra": 150.0, "dec": 2.0, "radius_arcsec": 1}).json()["items"][0][
        "object_id"]


def test_the_three_formats_hold_the_points_of_the_object_page(client):
    object_id = _object_id(client)
    page = client.get(f"/api/v1/objects/{object_id}").json()["lightcurve"]
    points = client.get(f"/api/v1/objects/{object_id}/lightcurve").json()["points"]
    assert points == page and [p["mjd"] for p in points if p["kind"] == "detection"] == list(MJDS)
    as_csv = client.get(f"/api/v1/objects/{object_id}/lightcurve", params={"format": "csv"})
    assert as_csv.headers["content-disposition"] == f'attachment; filename="{object_id}-lightcurve.csv"'
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [float(r["mjd"]) for r in rows] == [p["mjd"] for p in points]
    assert [r["limit_mag"] or None for r in rows] == [None if p["limit_mag"] is None else str(p["limit_mag"])
                                                      for p in points]
    as_xml = client.get(f"/api/v1/objects/{object_id}/lightcurve", params={"format": "votable"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = parse(io.BytesIO(as_xml.content), verify="warn").get_first_table()
    assert not [str(w.message) for w in caught]
    assert [f.name for f in table.fields] == [c.key for c in COLUMNS] and table.fields[0].unit == "d"
    assert list(table.array["kind"]) == [p["kind"] for p in points]
    assert table.array["mag"].mask[0] and float(table.array["limit_mag"][0]) == points[0]["limit_mag"]


def test_an_unknown_object_or_format_is_a_clear_4xx(client):
    assert client.get("/api/v1/objects/NOPE/lightcurve").json()["error"] == "not_found"
    response = client.get(f"/api/v1/objects/{_object_id(client)}/lightcurve", params={"format": "fits"})
    assert response.status_code == 422 and set(response.json()) >= {"error", "detail"}


def test_hostile_text_is_escaped_in_the_csv():
    text = points_csv([{"mjd": 1.0, "band": "r\x1b[2J", "telescope": "=cmd|' /C calc'!A0\n", "kind": "detection"}])
    rows = list(csv.reader(io.StringIO(text)))
    assert len(rows) == 2 and rows[1][1] == "r\\x1b[2J" and rows[1][2].endswith("\\n")


@pytest.mark.skipif(shutil.which("stilts") is None, reason="Debian's stilts is not installed; .ci/run installs it")
def test_stilts_votlint_finds_nothing_wrong(client, tmp_path):
    path = tmp_path / "lc.xml"
    answer = client.get(f"/api/v1/objects/{_object_id(client)}/lightcurve", params={"format": "votable"})
    path.write_bytes(answer.content)
    lint = subprocess.run(["stilts", "votlint", "ucd=true", "unit=true", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert lint.returncode == 0 and lint.stdout.strip() == "" and lint.stderr.strip() == "", lint
