"""The REST API over an archive and a history built in the test: shapes, pagination, filters, cone, 4xx."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from tests.streams.web.conftest import FRAMES

SUMMARY_KEYS = {"alert_id", "object_id", "candid", "frame_id", "telescope", "mjd", "ra", "dec", "band", "magpsf",
                "sigmapsf", "snr", "rb", "anomaly", "class", "class_probability", "x", "y"}


def test_health_counts_the_archive_and_the_history(client):
    body = client.get("/api/v1/health").json()
    assert body["status"] == "ok" and body["archive"] == 6 and body["history"] == 4


def test_latest_alerts_come_newest_first_in_pages_that_join_up(client, state):
    first = client.get("/api/v1/alerts", params={"limit": 4}).json()
    assert len(first["items"]) == 4 and first["next"]
    assert set(first["items"][0]) == SUMMARY_KEYS
    rest = client.get("/api/v1/alerts", params={"limit": 4, "cursor": first["next"]}).json()
    assert len(rest["items"]) == 2 and rest["next"] is None
    items = first["items"] + rest["items"]
    assert sorted(i["alert_id"] for i in items) == sorted(r["alertId"] for r in state[1])
    assert [i["mjd"] for i in items] == sorted((i["mjd"] for i in items), reverse=True)
    assert items[0]["class"] == "SN" and 0 < items[0]["class_probability"] <= 1


def test_the_filter_language_of_subscribe_selects_alerts(client):
    body = client.get("/api/v1/alerts", params={"filter": "rb > 0.55", "limit": 50}).json()
    assert body["items"] and all(i["rb"] > 0.55 for i in body["items"]) and body["next"] is None
    everything = client.get("/api/v1/alerts", params={"limit": 50}).json()["items"]
    assert len(body["items"]) == sum(i["rb"] > 0.55 for i in everything)
    paged = client.get("/api/v1/alerts", params={"filter": "rb > 0", "limit": 2}).json()
    assert len(paged["items"]) == 2 and paged["next"]


def test_newest_first_pages_bounded_by_mjd_are_the_pages_of_the_plain_top_n(tmp_path, monkeypatch):
    """A page adds ``mjd >= `` its last row's MJD (found first from ``mjd`` alone) so DuckDB skips older row groups.

    Every page, cursors included, is the plain top-N's: on alerts of five nights in files of row groups
    of 8 rows, with ties of MJD across the page boundaries.
    """
    from broker.archive import writer as writer_module
    from broker.archive.reader import Archive
    from broker.archive.writer import ArchiveWriter
    from streams.web import queries
    from tests.broker.test_archive import archived, commit, objects

    monkeypatch.setattr(writer_module, "ROW_GROUP_ROWS", 8)
    records = objects(90, 3, seed=4)
    for i, rec in enumerate(records):
        rec["source"]["mjd"] = 60000.3 + (i // 18) + (i % 18) // 3 * 0.01  # 5 nights, 3 alerts an MJD
    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    for start in range(0, 90, 30):
        commit(writer, archived(records[start:start + 30], start=start))
    view = queries.ArchiveView(Archive(tmp_path / "archive"))
    assert "mjd >= 60004.35" in queries._newest(view, "true", 3, view.files())[0]
    plain = queries._summary_select(view.files()) + " FROM alerts WHERE {} ORDER BY mjd DESC, alert_id DESC LIMIT {}"
    for limit in (1, 4, 7, 100):
        cursor, seen = None, []
        while True:
            page = queries.latest(view, limit, cursor)
            expected = view.query(plain.format(queries._after(cursor), limit)).to_pylist()
            assert [i["alert_id"] for i in page["items"]] == [r["alert_id"] for r in expected]
            seen += page["items"]
            if page["next"] is None:
                break
            cursor = page["next"]
        assert len(seen) == 90


def test_newest_first_pages_read_the_files_of_their_times_and_answer_what_every_file_does(tmp_path, monkeypatch):
    """A page reads only the files whose MJD bounds reach its lowest MJD (and the cursor's), and is the plain top-N's.

    Six commits of 15 alerts each (a file per night of each), in time order, the newest ending with a
    later copy of the oldest alert (newest in time: the first copy is the alert, so the page must not
    show it) and a later copy of another. Filtered pages too.
    Once an old file is damaged, the newest page still answers: it is not opened.
    """
    from broker.archive.reader import Archive
    from broker.archive.writer import ArchiveWriter
    from broker.errors import ArchiveCorrupt
    from streams.alert_expr import AlertFilter
    from streams.web import queries
    from tests.broker.test_archive import _copy, archived, commit, objects

    records = objects(90, 3, seed=5)
    for i, rec in enumerate(records):
        rec["source"]["mjd"] = 60000.3 + i * 0.05 + (i % 15 == 7) * 0.001  # 15 alerts a file: 0.7 days
    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    for start in range(0, 90, 15):
        batch = records[start:start + 15]
        if start == 75:
            batch = batch + [_copy(records[0], mjd=records[-1]["source"]["mjd"] + 1.0), _copy(records[2])]
        commit(writer, archived(batch, start=start))
    view = queries.ArchiveView(Archive(tmp_path / "archive"))
    files = view.files()
    assert len(files) >= 6 and files[0].mjd_max < files[1].mjd_min  # a file a commit and night
    plain = queries._summary_select(view.files()) + " FROM alerts WHERE {} ORDER BY mjd DESC, alert_id DESC LIMIT {}"
    for limit in (1, 16, 100):
        cursor, seen = None, []
        while True:
            page = queries.latest(view, limit, cursor)
            expected = view.query(plain.format(queries._after(cursor), limit)).to_pylist()
            assert [i["alert_id"] for i in page["items"]] == [r["alert_id"] for r in expected]
            if limit == 16:
                filtered = queries.latest_filtered(view, AlertFilter("rb >= 0"), limit, cursor)
                assert filtered["items"] == page["items"]
            seen += page["items"]
            if page["next"] is None:
                break
            cursor = page["next"]
        assert sorted(i["alert_id"] for i in seen) == sorted(r["alertId"] for r in records)
        assert next(i for i in seen if i["alert_id"] == records[0]["alertId"])["mjd"] == records[0]["source"]["mjd"]
    newest = [r["alert_id"] for r in view.query(plain.format("true", 16)).to_pylist()]
    view.archive.fs.pipe_file(view.archive.path(files[1].path), b"\0" * files[1].size)
    fresh = queries.ArchiveView(Archive(tmp_path / "archive"))
    fresh.archive._later = view.archive._later  # the later copies, found before the damage
    assert [i["alert_id"] for i in queries.latest(fresh, 16, None)["items"]] == newest
    with pytest.raises(ArchiveCorrupt):
        queries.latest(fresh, 100, None)


def test_a_filtered_page_out_of_time_answers_what_it_read_and_its_cursor(client, monkeypatch):
    """Past ``MAX_SCAN_S`` a page stops (after one alert at least); its cursors still join up to every match."""
    from streams.web import queries

    everything = client.get("/api/v1/alerts", params={"filter": "rb > 0.55", "limit": 50}).json()["items"]
    monkeypatch.setattr(queries, "MAX_SCAN_S", 0.0)
    pages, cursor = [], None
    while True:
        page = client.get("/api/v1/alerts", params={"filter": "rb > 0.55", "limit": 50,
                                                    **({"cursor": cursor} if cursor else {})}).json()
        pages.append(page["items"])
        cursor = page["next"]
        if cursor is None:
            break
    assert all(len(items) <= 1 for items in pages) and len(pages) >= 6  # one alert read a page, 6 archived
    assert [i["alert_id"] for items in pages for i in items] == [i["alert_id"] for i in everything]


@pytest.mark.parametrize(("params", "status", "reason"), [
    ({"filter": "__import__('os')"}, 400, "filter"),
    ({"filter": "nosuchfield > 1"}, 400, "filter"),
    ({"filter": "1" + "+1" * 400}, 400, "filter"),  # once a RecursionError: 500
    ({"cursor": "not-a-cursor"}, 400, "invalid_query"),
    ({"limit": 0}, 422, "invalid_query"),
    ({"limit": 100000}, 422, "invalid_query"),
])
def test_bad_listing_parameters_are_a_clear_4xx(client, params, status, reason):
    response = client.get("/api/v1/alerts", params=params)
    assert response.status_code == status
    assert response.json()["error"] == reason and "Traceback" not in response.text


@pytest.mark.parametrize("expr", [
    "(" * 40 + "[0]*9999" + ",[0]*9999)" * 40 + " == 1",  # each tuple walked whole: once 0.4 s an alert, and the probe
    "max(" + ",".join(["len([0]*9999)"] * 8) + ") < 0",  # lists each within the bound on repetition
])
def test_a_filter_whose_values_hold_too_many_items_is_refused_at_once(client, expr):
    start = time.perf_counter()
    response = client.get("/api/v1/alerts", params={"filter": expr})
    assert response.status_code == 400 and response.json()["error"] == "filter", response.text
    assert time.perf_counter() - start < 1.0


def test_an_alert_comes_whole_without_its_cutout_bytes(client, state):
    record = state[1][0]
    body = client.get(f"/api/v1/alerts/{record['alertId']}").json()
    assert body["candid"] == record["candid"] and body["summary"]["alert_id"] == record["alertId"]
    assert "stampData" not in body["cutoutScience"] and body["cutoutScience"]["fileName"]
    assert set(body["cutouts"]) == {"science", "reference", "difference"}
    assert client.get(body["cutouts"]["difference"]).status_code == 200


def test_cutouts_are_served_as_png_and_fits(client, state):
    record = state[1][0]
    png = client.get(f"/api/v1/alerts/{record['alertId']}/cutouts/science.png")
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size[0] > 10
    raw = client.get(f"/api/v1/alerts/{record['alertId']}/cutouts/reference.fits")
    with fits.open(io.BytesIO(raw.content)) as hdul:
        assert hdul[0].data.ndim == 2
    triplet = client.get(f"/api/v1/alerts/{record['alertId']}/triplet.png")
    assert triplet.status_code == 200 and Image.open(io.BytesIO(triplet.content)).size[0] > 500
    assert client.get(f"/api/v1/alerts/{record['alertId']}/cutouts/bogus.png").json()["error"] == "not_found"
    assert client.get(f"/api/v1/alerts/{record['alertId']}/cutouts/science.jpg").status_code == 404


def test_unknown_alerts_objects_and_frames_are_404(client):
    for path in ("/api/v1/alerts/12345", "/api/v1/alerts/99999999999999999999", "/api/v1/objects/OBJnone",
                 "/api/v1/frames/nosuchframe", "/api/v1/frames/nosuchframe/image.png", "/api/v1/nothing"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"] == "not_found"
    assert client.get("/api/v1/alerts/abc").status_code == 422


def test_an_object_has_its_light_curve_history_and_alerts(client, state):
    oid = state[1][0]["objectId"]
    body = client.get(f"/api/v1/objects/{oid}").json()
    assert body["n_alerts"] == 3 and body["ndet"] == 3
    assert [a["frame_id"] for a in body["alerts"]] == list(reversed(FRAMES))
    detections = [p for p in body["lightcurve"] if p["kind"] == "detection"]
    assert [p["flux"] for p in detections] == [1000.0, 2000.0, 3000.0]
    assert detections[0]["mag"] == pytest.approx(27.5 - 2.5 * np.log10(1000.0))
    limits = [p for p in body["lightcurve"] if p["kind"] == "upper_limit"]
    assert limits and limits[0]["limit_mag"] == 21.3
    assert body["classification"]["label"] == "SN" and body["context"] is not None


def test_an_objects_records_come_from_the_files_that_hold_them_as_from_every_file(tmp_path):
    """``object_records`` reads the records from the files its ``object_id`` scan finds: the same as from every file.

    Three objects' alerts spread over four commits (a file each), an alert archived again in a later
    file (a later copy: not shown) and one whose first copy (topic ``a_early``, first in Kafka order)
    is in a later file than its other; then a compaction between the two steps (the files found are
    retired): the records are read again from every file.
    """
    from broker.archive.config import ArchiveConfig
    from broker.archive.reader import Archive
    from broker.archive.rows import Archived
    from broker.archive.writer import ArchiveWriter
    from streams.web import queries
    from tests.broker.test_archive import _commit_at, _copy, archived, commit, objects

    records = objects(48, 3, seed=7)
    for i, rec in enumerate(records):
        rec["objectId"] = f"OBJ{i % 3}" if i % 4 == 0 else rec["objectId"]
        rec["source"]["mjd"] = 60000.1 + i * 0.01  # one night: the files can be merged
    writer = ArchiveWriter(Archive(tmp_path / "archive"), ArchiveConfig(compact_files=2))
    writer.recover()
    for start in range(0, 48, 12):
        commit(writer, archived(records[start:start + 12], start=start))
    again = [Archived(_copy(records[0], mjd=60100.0), 3, "alerts", 0, 48),
             Archived(_copy(records[4], mjd=59000.0), 3, "a_early", 0, 0)]  # OBJ0's first alert, OBJ1's
    _commit_at(writer, again)
    view = queries.ArchiveView(Archive(tmp_path / "archive"))
    files = view.files()

    def every_file(oid: str) -> list[dict]:
        return queries.records_of(view, "SELECT schema_version, alert FROM alerts WHERE object_id = "
                                        f"'{oid}' ORDER BY mjd, kafka_topic, kafka_partition, kafka_offset")

    for oid in ("OBJ0", "OBJ1", "OBJ2", records[1]["objectId"], "OBJnone"):
        assert queries.object_records(view, oid) == every_file(oid)
    mjds = [[r["source"]["mjd"] for r in queries.object_records(view, oid)] for oid in ("OBJ0", "OBJ1")]
    assert mjds[0][0] == 60000.1 and 60100.0 not in mjds[0] and mjds[1][0] == 59000.0
    assert list(map(len, mjds)) == [4, 4] and 60000.14 not in mjds[1]
    expected, compacted = every_file("OBJ1"), []

    class CompactedBetween:
        """The view, compacted once after the first query (the files it found are retired)."""

        def files(self) -> list:
            return view.files()

        def query(self, sql: str, *, keep=None, files=None):
            out = view.query(sql, keep=keep, files=files)
            if not compacted:
                compacted.extend(writer.compact())
            return out

    assert queries.object_records(CompactedBetween(), "OBJ1") == expected and compacted
    assert {f.path for f in files} - {f.path for f in view.files()}  # retired


def test_an_object_id_with_quotes_is_data_not_sql(client):
    response = client.get("/api/v1/objects/x' OR '1'='1")
    assert response.status_code == 404


def test_cone_search_finds_the_nearest_alerts_first(client):
    body = client.get("/api/v1/cone", params={"ra": 150.0, "dec": 2.0, "radius_arcsec": 5}).json()
    assert len(body["items"]) == 3 and all(i["distance_arcsec"] < 5 for i in body["items"])
    wide = client.get("/api/v1/cone", params={"ra": 150.0, "dec": 2.0, "radius_arcsec": 200}).json()["items"]
    assert len(wide) == 6
    assert [i["distance_arcsec"] for i in wide] == sorted(i["distance_arcsec"] for i in wide)
    assert client.get("/api/v1/cone", params={"ra": 10.0, "dec": -40.0}).json()["items"] == []


@pytest.mark.parametrize("params", [
    {"ra": 361, "dec": 0}, {"ra": 10, "dec": 91}, {"ra": 10, "dec": 0, "radius_arcsec": 0},
    {"ra": 10, "dec": 0, "radius_arcsec": 1e9}, {"ra": "nan", "dec": 0}, {"dec": 0}])
def test_a_cone_out_of_range_is_400(client, params):
    response = client.get("/api/v1/cone", params=params)
    assert response.status_code in (400, 422) and response.json()["error"] == "invalid_query"


def test_a_frame_lists_its_candidates_and_serves_its_kept_image(client):
    body = client.get(f"/api/v1/frames/{FRAMES[-1]}").json()
    assert body["shape"] == [300, 400] and body["band"] == "r" and len(body["candidates"]) == 2
    image = client.get(body["image_url"])
    assert Image.open(io.BytesIO(image.content)).size == (400, 300)
    older = client.get(f"/api/v1/frames/{FRAMES[0]}").json()
    assert older["image_url"] is None and len(older["candidates"]) == 2
    gone = client.get(f"/api/v1/frames/{FRAMES[0]}/image.png")
    assert gone.status_code == 404 and "no longer kept" in gone.json()["detail"]


def test_the_attribution_map_is_drawn_by_the_alert_model(client, state):
    pytest.importorskip("torch")
    response = client.get(f"/api/v1/alerts/{state[1][0]['alertId']}/attribution.png")
    assert response.status_code == 200 and response.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_openapi_document_lists_the_versioned_paths(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/v1/alerts", "/api/v1/alerts/{alert_id}", "/api/v1/objects/{object_id}", "/api/v1/cone",
                 "/api/v1/frames", "/api/v1/frames/{frame_id}", "/api/v1/health"):
        assert path in paths, path


def test_metrics_count_requests_by_route(client):
    client.get("/api/v1/health")
    text = client.get("/metrics").text
    assert 'portal_requests_total{route="/api/v1/health",status="200"}' in text
    assert "portal_request_seconds_bucket" in text


def _client_of(tmp_path, records: list[dict]):
    """A TestClient of a portal whose archive holds ``records``."""
    from fastapi.testclient import TestClient

    from broker.archive.reader import Archive
    from broker.archive.writer import ArchiveWriter
    from streams.web.app import create_app
    from streams.web.config import WebConfig
    from tests.broker.test_archive import archived, commit

    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    commit(writer, archived(records))
    return TestClient(create_app(WebConfig.for_state_dir(tmp_path, tokens_path=tmp_path / "tokens.sqlite")))


def test_a_frame_id_with_slashes_and_url_characters_is_served_with_its_image(state, tmp_path):
    """A FRAMEID is the telescope's: '/' in it made the frame unreachable (404), '?' or '#' cut its image URL."""
    import copy

    from streams.web.queries import diff_dir
    from streams.web.records import summary_of

    frame_id = "2025/03/14 #7?a=1&b"  # no "%": the TestClient decodes a path twice (uvicorn once)
    record = copy.deepcopy(state[1][-1])
    record["provenance"]["frame_id"] = frame_id
    folder = diff_dir(tmp_path, summary_of(record), record["provenance"]["field"])
    folder.mkdir(parents=True)
    np.save(folder / "diff.npy", np.random.default_rng(1).normal(0, 10, (30, 40)).astype(np.float32))
    (folder / "meta.json").write_text('{"format": 1, "ny": 30, "nx": 40}')
    with _client_of(tmp_path, [record]) as c:
        from urllib.parse import quote

        response = c.get(f"/api/v1/frames/{quote(frame_id, safe='')}")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["frame_id"] == frame_id and len(body["candidates"]) == 1
        assert body["image_url"] == f"/api/v1/frames/{quote(frame_id, safe='')}/image.png"
        image = c.get(body["image_url"])
        assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (40, 30)


def test_a_frame_id_longer_than_a_file_name_is_served(state, tmp_path):
    """The pipeline takes a FRAMEID of any length (continued over cards); ids over 256 characters were 400 here."""
    import copy

    frame_id = "R" * 300
    record = copy.deepcopy(state[1][-1])
    record["provenance"]["frame_id"], record["candid"] = frame_id, f"{frame_id}/0"
    with _client_of(tmp_path, [record]) as c:
        response = c.get(f"/api/v1/frames/{frame_id}")
        assert response.status_code == 200, response.text
        assert response.json()["frame_id"] == frame_id and len(response.json()["candidates"]) == 1
        assert c.get(f"/api/v1/frames/{'R' * 2000}").status_code == 400  # longer than any id a label takes


def test_the_attribution_map_loads_only_a_model_of_this_server_never_a_path_from_the_alert(state, tmp_path):
    """An alert's scores.rb_model is data: a path there made the portal load that file as its model."""
    pytest.importorskip("torch")
    import copy
    import shutil

    from broker.realbogus import DEFAULT_VERSION, MODELS_DIR

    elsewhere = tmp_path / "models"
    elsewhere.mkdir()
    for ext in ("pt", "json"):
        shutil.copy(MODELS_DIR / f"{DEFAULT_VERSION}.{ext}", elsewhere / f"planted.{ext}")
    names = (str(elsewhere / "planted"), str(elsewhere / "planted.pt"), "../models/planted", "planted.pt")
    records = []
    for i, name in enumerate(names):
        record = copy.deepcopy(state[1][0])
        record["alertId"] = record["sourceId"] = 7000 + i
        record["scores"]["rb_model"] = name
        records.append(record)
    with _client_of(tmp_path, records) as c:
        for record in records:
            response = c.get(f"/api/v1/alerts/{record['alertId']}/attribution.png")
            assert response.status_code == 503 and response.json()["error"] == "model", record["scores"]["rb_model"]
        assert not c.app.state.portal.extras.get("classifiers")


def test_a_private_portal_never_lets_a_shared_cache_keep_its_images(portal_config, state):
    """With --private the images of a token's request were 'public': a proxy cache served them to anyone."""
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from streams.web.app import create_app

    alert_id = state[1][0]["alertId"]
    paths = (f"/api/v1/alerts/{alert_id}/cutouts/science.png", f"/api/v1/alerts/{alert_id}/cutouts/science.fits",
             f"/api/v1/alerts/{alert_id}/triplet.png", f"/api/v1/frames/{FRAMES[-1]}/image.png")
    with TestClient(create_app(replace(portal_config, public_read=False))) as private:
        token = {"Authorization": f"Bearer {private.app.state.portal.tokens.add('reader', ['read'])}"}
        for path in paths:
            response = private.get(path, headers=token)
            assert response.status_code == 200, path
            policy = response.headers["cache-control"]
            assert "private" in policy and "public" not in policy, (path, policy)
    with TestClient(create_app(portal_config)) as public:  # a public portal's images may be cached by anyone
        assert public.get(paths[0]).headers["cache-control"] == "public, max-age=86400, immutable"


def test_forced_photometry_at_any_position_of_the_kept_difference_images(tmp_path):
    """``GET /api/v1/forced``: every kept frame covering the position, oldest first; 400 off the sphere."""
    from fastapi.testclient import TestClient

    from broker.diffstore import DifferenceStore
    from streams.web.app import create_app
    from streams.web.config import WebConfig
    from tests.broker.test_diffstore import _header, _image, _meta, _sky

    store = DifferenceStore(tmp_path / "state" / "diffs")
    store.put(_meta("a", 1.0), _header(), _image(1))
    store.put(_meta("b", 2.0), _header(), _image(2, [(60.3, 50.6, 800.0)]))
    ra, dec = (float(v[0]) for v in _sky(np.array([[60.3, 50.6]])))
    config = WebConfig.for_state_dir(tmp_path / "state", tokens_path=tmp_path / "tokens.sqlite")
    with TestClient(create_app(config)) as client:
        body = client.get("/api/v1/forced", params={"ra": ra, "dec": dec}).json()
        assert [(p["telescope"], p["frame_id"]) for p in body["points"]] == [("T1", "a"), ("T1", "b")]
        a, b = body["points"]
        assert abs(b["flux"] - 800.0) < 3 * b["flux_err"] and b["mag"] is not None and a["mag"] is None
        assert a["mag_limit"] > 20 and (body["ra"], body["dec"]) == (ra, dec)
        later = client.get("/api/v1/forced", params={"ra": ra, "dec": dec, "start_mjd": 1.5}).json()["points"]
        assert [p["frame_id"] for p in later] == ["b"]
        assert client.get("/api/v1/forced", params={"ra": (ra + 90) % 360, "dec": dec}).json()["points"] == []
        for bad in ({"ra": "nan", "dec": 0}, {"ra": 360, "dec": 0}, {"ra": 1, "dec": -91}, {"ra": 1},
                    {"ra": 1, "dec": 0, "start_mjd": 5, "end_mjd": 4}, {"ra": 1, "dec": 0, "min_snr": -1},
                    {"ra": "x", "dec": 0}):
            answer = client.get("/api/v1/forced", params=bad)
            assert answer.status_code in (400, 422) and "Traceback" not in answer.text, bad


def test_each_read_of_the_portal_reads_the_commit_log_once(tmp_path, monkeypatch):
    """A pruned cone read the commit log twice (the summary's columns, then the query's files); a page more.

    Each read now takes the files of one read of the log: a cone, a newest-first page (with a cursor,
    whose bound takes one or two looks), an object page and a cross-match, on an open view and a new one.
    """
    import numpy as np

    from broker.archive.reader import Archive
    from broker.archive.writer import ArchiveWriter
    from broker.watchlist import Watchlist
    from streams.web import queries
    from tests.broker.test_archive import archived, commit, objects

    records = objects(30, 3, seed=5)
    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    for start in range(0, 30, 10):
        commit(writer, archived(records[start:start + 10], start=start))
    archive = Archive(tmp_path / "archive")
    reads = []
    snapshot = Archive.snapshot
    monkeypatch.setattr(Archive, "snapshot", lambda self: reads.append(1) or snapshot(self))
    view = queries.ArchiveView(archive)
    watch = Watchlist(("a",), np.array([150.0]), np.array([2.0]), np.array([3600.0]))
    first = records[0]["source"]
    cursor = queries.latest(view, 3, None)["next"]
    for read in (lambda: queries.cone(view, first["ra"], first["dec"], 60.0, 10),
                 lambda: queries.latest(view, 3, None), lambda: queries.latest(view, 3, cursor),
                 lambda: queries.object_records(view, records[4]["objectId"]),
                 lambda: queries.crossmatch(view, watch, 10), lambda: queries.crossmatch(archive, watch, 10)):
        for _ in range(2):
            reads.clear()
            assert read()
            assert len(reads) == 1
