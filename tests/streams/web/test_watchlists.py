"""``POST /api/v1/crossmatch``: a watchlist against the archive, as JSON or CSV, and what a hostile caller sends."""

from __future__ import annotations

import csv
import io
from dataclasses import replace

import httpx
import pytest
from fastapi.testclient import TestClient

from streams.web.app import WATCHLIST_BYTES, create_app
from streams.web.queries import CSV_COLUMNS
from tests.streams.web.conftest import MJDS, POSITIONS, SEEN
from tests.streams.web.test_hostile_params import HOSTILE
from tests.streams.web.test_live import running_server

#: Object 0 (seen on every frame) 1 arcsec away, object 1 in sexagesimal, and an empty patch of sky.
WATCHLIST = ("name,ra,dec,radius\n"
             f"host,{POSITIONS[0][0] + 1 / 3600 / 0.99939},{POSITIONS[0][1]},3\n"
             "neighbour,10:00:02.4,+02:00:00,\n"
             "empty,10,-40,60\n")
CSV_HEADERS = {"content-type": "text/csv"}


def _post(client, body=WATCHLIST, headers=CSV_HEADERS, **params):
    return client.post("/api/v1/crossmatch", content=body, headers=headers, params=params)


def test_each_entry_gets_its_alerts_newest_first_with_the_distance(client):
    body = _post(client).json()
    assert (body["matched"], body["entries_matched"], body["entries"]) == (4, 2, 3)
    assert [(i["watch"]["name"], i["mjd"]) for i in body["items"]] == [
        ("host", MJDS[2]), ("host", MJDS[1]), ("host", MJDS[0]), ("neighbour", MJDS[0])]
    assert {i["object_id"] for i in body["items"][:3]} == {body["items"][0]["object_id"]}
    assert all(i["distance_arcsec"] == pytest.approx(1.0, abs=0.01) for i in body["items"][:3])
    assert body["items"][3]["watch"] == {"name": "neighbour", "ra": pytest.approx(150.01), "dec": 2.0,
                                         "radius_arcsec": 2.0}
    assert sum(0 in s for s in SEEN) == 3 and sum(1 in s for s in SEEN) == 1  # the fixture's truth


def test_the_default_radius_the_time_window_and_the_limit(client):
    assert _post(client, radius_arcsec=0.5, body="ra,dec\n" + WATCHLIST.splitlines()[1].split(",", 1)[1]
                 .rsplit(",", 1)[0] + "\n").json()["matched"] == 0
    assert _post(client, since_mjd=MJDS[1]).json()["matched"] == 2
    page = _post(client, limit=2).json()
    assert len(page["items"]) == 2 and page["matched"] == 4


def test_a_form_upload_answers_csv(client):
    response = client.post("/api/v1/crossmatch", params={"format": "csv"},
                           files={"watchlist": ("targets.csv", WATCHLIST.encode(), "text/csv")})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert tuple(rows[0]) == CSV_COLUMNS and response.headers["x-matched"] == "4"
    assert [r["watch_name"] for r in rows] == ["host"] * 3 + ["neighbour"]
    assert float(rows[0]["distance_arcsec"]) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("body, headers, status, reason", [
    (WATCHLIST, {"content-type": "application/json"}, 415, "unsupported_media_type"),
    (WATCHLIST, {}, 415, "unsupported_media_type"),
    ("", CSV_HEADERS, 400, "invalid_watchlist"),
    ("ra,dec\n91,91\n", CSV_HEADERS, 400, "invalid_watchlist"),
    (b"\xff\xfe\x00r", CSV_HEADERS, 400, "invalid_watchlist"),
    ("ra,dec\n" + "1,1\n" * 10_001, CSV_HEADERS, 400, "invalid_watchlist"),
    ("ra,dec,name\n1,1,<script>alert(1)</script>\x1b\n", CSV_HEADERS, 400, "invalid_watchlist"),
    ("x" * (WATCHLIST_BYTES + 200_000), CSV_HEADERS, 413, "too_large"),
])
def test_a_hostile_body_is_a_clear_4xx(client, body, headers, status, reason):
    response = _post(client, body=body, headers=headers)
    assert response.status_code == status and response.json()["error"] == reason, response.text[:300]


def test_radii_that_would_pair_too_many_alerts_are_a_clear_400(client, monkeypatch):
    monkeypatch.setattr("broker.watchlist.MAX_PAIRS", 3)
    response = _post(client)
    assert response.status_code == 400 and "pairs, more than 3" in response.json()["detail"]


def test_a_form_without_one_watchlist_file_is_a_clear_400(client):
    two = [("watchlist", ("a.csv", WATCHLIST.encode())), ("watchlist", ("b.csv", WATCHLIST.encode()))]
    text_field = {"data": {"watchlist": WATCHLIST}, "files": {"other": ("a.csv", b"ra,dec\n")}}
    for form in ({"files": two}, text_field, {"files": {"other": ("a.csv", b"ra,dec\n")}}):
        response = client.post("/api/v1/crossmatch", **form)
        detail = response.json()["detail"]
        assert response.status_code == 400 and ("file part named 'watchlist'" in detail or "Too many files" in detail)


def test_hostile_query_values_are_a_clear_4xx(client):
    for name in ("radius_arcsec", "since_mjd", "limit", "format"):
        for value in HOSTILE:
            response = _post(client, **{name: value})
            assert response.status_code in (200, 400, 422), (name, value, response.status_code)
            if response.status_code != 200:
                assert set(response.json()) >= {"error", "detail"}
    assert client.get("/api/v1/health").status_code == 200


def test_a_private_portal_needs_a_read_token_and_a_chunked_body_past_the_limit_is_cut_off(portal_config):
    private = replace(portal_config, public_read=False)
    with TestClient(create_app(private)) as c:
        clear = c.app.state.portal.tokens.add("astronomer", ["read"])
    with running_server(private) as base:
        assert httpx.post(f"{base}/api/v1/crossmatch", content=WATCHLIST, headers=CSV_HEADERS).status_code == 401
        ok = httpx.post(f"{base}/api/v1/crossmatch", content=WATCHLIST,
                        headers=CSV_HEADERS | {"Authorization": f"Bearer {clear}"})
        assert ok.status_code == 200 and ok.json()["matched"] == 4

        def chunks():
            yield b"ra,dec\n"
            for _ in range(WATCHLIST_BYTES // 65536 + 2):
                yield b"1,1\n" * 16384

        big = httpx.post(f"{base}/api/v1/crossmatch", content=chunks(),
                         headers=CSV_HEADERS | {"Authorization": f"Bearer {clear}"})
        assert big.status_code == 413 and big.json()["error"] == "too_large"


def test_the_openapi_document_describes_the_body(client):
    op = client.app.openapi()["paths"]["/api/v1/crossmatch"]["post"]
    assert {"text/csv", "multipart/form-data"} <= set(op["requestBody"]["content"])
    assert {p["name"] for p in op["parameters"]} == {"radius_arcsec", "since_mjd", "limit", "format"}


def test_the_crossmatch_reads_the_files_its_entries_and_time_bound_and_matches_what_every_file_does(tmp_path,
                                                                                                     monkeypatch):
    """``queries.crossmatch`` reads positions from the files that may hold an entry's cone after ``since_mjd``.

    Then the summaries from the files whose bounds hold a shown alert. The same answer as over every
    file: entries on each region, across RA 0/360, at the poles, radii 1 arcsec to 1 deg, copies across
    files (a later copy moved, a first copy in a newer file), a file without bounds, RA 360.2; by time
    alone past ``MATCH_FILE_PAIRS``. A damaged file that no entry reaches: the crossmatch answers, over
    every file it fails.
    """
    import numpy as np

    from broker.archive.reader import Archive
    from broker.archive.writer import ArchiveWriter
    from broker.errors import ArchiveCorrupt
    from broker.watchlist import Watchlist
    from streams.web import queries
    from tests.broker.test_archive import REGIONS, sky_and_times_of_files

    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    _, timed = sky_and_times_of_files(writer)
    view = queries.ArchiveView(Archive(tmp_path / "archive"))

    class EveryFile:
        def files(self) -> list:
            return view.files()

        def query(self, sql: str, *, keep=None, files=None):
            return view.query(sql, files=files)

    spots = [*REGIONS, (359.95, 0.0), (0.2, 0.05), (10.0, timed[7]["source"]["dec"]), (0.0, 90.0), (0.0, -90.0)]
    radii = [1.0, 60.0, 900.0, 3600.0]
    wl = Watchlist(tuple(f"e{i}" for i in range(len(spots) * len(radii))),
                   np.array([ra for ra, _ in spots for _ in radii]), np.array([dec for _, dec in spots for _ in radii]),
                   np.array(radii * len(spots)))
    small = Watchlist(("a", "b"), np.array([150.0, 359.95]), np.array([2.0, 0.0]), np.array([900.0, 1800.0]))
    files = view.files()
    for since in (None, 60990.0, 61000.6, 61001.9, 61009.0):
        for watched in (wl, small):
            for limit in (3, 1000):
                expected = queries.crossmatch(EveryFile(), watched, limit, since)
                assert queries.crossmatch(view, watched, limit, since) == expected
        with monkeypatch.context() as m:
            m.setattr(queries, "MATCH_FILE_PAIRS", 10)
            assert queries.crossmatch(view, wl, 1000, since) == queries.crossmatch(EveryFile(), wl, 1000, since)
    assert sum(map(queries._watched_files(files, small, None), files)) <= len(files) - 3
    assert sum(map(queries._watched_files(files, small, 61002.0), files)) <= 5  # 4 of its nights, the boundless
    later = [i for i in queries.crossmatch(view, wl, 1000, 61009.0)["items"] if i["alert_id"] == timed[7]["alertId"]]
    assert later == []  # its first copy is not at 61010, where a later copy is
    expected = queries.crossmatch(view, small, 1000, None)
    far = next(f for f in files[1:] if not queries._watched_files(files, small, None)(f))
    view.archive.fs.pipe_file(view.archive.path(far.path), b"\0" * far.size)
    assert queries.crossmatch(view, small, 1000, None) == expected and expected["matched"]
    with pytest.raises(ArchiveCorrupt):
        queries.crossmatch(EveryFile(), small, 1000, None)
