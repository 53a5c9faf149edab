"""``/api/v1/watchlists``: lists saved per token, read back, matched as the crossmatch endpoint does, and refused."""

from __future__ import annotations

import csv
import io
from dataclasses import replace

import httpx
import pytest
from fastapi.testclient import TestClient

from broker.watchlist_store import MAX_LISTS, MAX_OWNER_ENTRIES
from streams.web.app import WATCHLIST_BYTES, create_app
from streams.web.watchlists import MAX_ENTRIES
from tests.streams.web.conftest import MJDS
from tests.streams.web.test_live import running_server
from tests.streams.web.test_watchlists import CSV_HEADERS, WATCHLIST

BASE = "/api/v1/watchlists"


def _bearer(client, name: str, scopes=("read",)) -> dict:
    return {"Authorization": f"Bearer {client.app.state.portal.tokens.add(name, list(scopes))}"}


@pytest.fixture
def ana(client):
    return _bearer(client, "ana")


@pytest.fixture
def ben(client):
    return _bearer(client, "ben")


def _put(client, who, name="hosts", body=WATCHLIST, headers=CSV_HEADERS, **params):
    return client.put(f"{BASE}/{name}", content=body, headers=headers | who, params=params)


def test_a_saved_list_is_listed_and_read_back_as_json_and_as_csv_that_saves_again(client, ana):
    created = _put(client, ana)
    assert created.status_code == 201, created.text
    info = created.json()
    assert (info["name"], info["entries"]) == ("hosts", 3) and info["created"] == info["updated"] > 1.7e9
    listed = client.get(BASE, headers=ana).json()
    assert listed["items"] == [info]
    assert listed["limits"] == {"lists": MAX_LISTS, "entries_per_list": MAX_ENTRIES, "entries": MAX_OWNER_ENTRIES}
    back = client.get(f"{BASE}/hosts", headers=ana).json()
    assert [e["name"] for e in back["items"]] == ["host", "neighbour", "empty"]
    assert back["items"][1] == {"name": "neighbour", "ra": pytest.approx(150.01), "dec": 2.0, "radius_arcsec": 2.0}
    text = client.get(f"{BASE}/hosts", headers=ana, params={"format": "csv"})
    assert text.headers["content-type"].startswith("text/csv")
    assert list(csv.reader(io.StringIO(text.text)))[0] == ["ra", "dec", "radius", "name"]
    assert _put(client, ana, "copy", body=text.text).status_code == 201
    assert client.get(f"{BASE}/copy", headers=ana).json()["items"] == back["items"]


def test_a_form_upload_saves_and_the_default_radius_is_applied_when_saving(client, ana):
    response = client.put(f"{BASE}/form", headers=ana, params={"radius_arcsec": 7},
                          files={"watchlist": ("targets.csv", b"ra,dec\n150,2\n", "text/csv")})
    assert response.status_code == 201, response.text
    assert client.get(f"{BASE}/form", headers=ana).json()["items"] == [
        {"name": "row 2", "ra": 150.0, "dec": 2.0, "radius_arcsec": 7.0}]


def test_saving_a_name_again_replaces_the_list(client, ana):
    first = _put(client, ana).json()
    again = _put(client, ana, body="name,ra,dec\nonly,10,10\n")
    assert again.status_code == 200 and again.json()["entries"] == 1
    assert again.json()["created"] == first["created"] and again.json()["updated"] >= first["updated"]
    assert [e["name"] for e in client.get(f"{BASE}/hosts", headers=ana).json()["items"]] == ["only"]
    assert len(client.get(BASE, headers=ana).json()["items"]) == 1


def test_the_matches_are_those_of_the_crossmatch_endpoint_for_the_same_list(client, ana):
    _put(client, ana)
    for params in ({}, {"since_mjd": MJDS[1]}, {"limit": 2}, {"since_mjd": MJDS[2], "limit": 1}):
        posted = client.post("/api/v1/crossmatch", content=WATCHLIST, headers=CSV_HEADERS, params=params)
        saved = client.get(f"{BASE}/hosts/matches", headers=ana, params=params)
        assert saved.status_code == 200 and saved.json() == posted.json(), params
    body = client.get(f"{BASE}/hosts/matches", headers=ana).json()
    assert (body["matched"], body["entries_matched"], body["entries"]) == (4, 2, 3)
    new = client.get(f"{BASE}/hosts/matches", headers=ana, params={"since_mjd": MJDS[2]}).json()
    assert [(i["watch"]["name"], i["mjd"]) for i in new["items"]] == [("host", MJDS[2])]  # what is new since then
    as_csv = client.get(f"{BASE}/hosts/matches", headers=ana, params={"format": "csv"})
    posted_csv = client.post("/api/v1/crossmatch", content=WATCHLIST, headers=CSV_HEADERS, params={"format": "csv"})
    assert as_csv.text == posted_csv.text and as_csv.headers["x-matched"] == "4"


def test_each_token_sees_only_its_own_lists(client, ana, ben):
    _put(client, ana)
    assert client.get(BASE, headers=ben).json()["items"] == []
    for method, path in (("GET", "hosts"), ("GET", "hosts/matches"), ("DELETE", "hosts")):
        response = client.request(method, f"{BASE}/{path}", headers=ben)
        assert response.status_code == 404 and response.json()["error"] == "not_found", (method, path)
    assert _put(client, ben, body="ra,dec\n10,10\n").status_code == 201  # ben's own list of the same name
    assert client.get(f"{BASE}/hosts", headers=ana).json()["entries"] == 3
    assert client.get(f"{BASE}/hosts", headers=ben).json()["entries"] == 1


def test_deleting_a_list_and_a_missing_one(client, ana):
    assert client.delete(f"{BASE}/hosts", headers=ana).status_code == 404  # nothing saved yet, no file made
    _put(client, ana)
    deleted = client.delete(f"{BASE}/hosts", headers=ana)
    assert deleted.status_code == 204 and deleted.content == b""
    for method in ("GET", "DELETE"):
        gone = client.request(method, f"{BASE}/hosts", headers=ana)
        assert gone.status_code == 404 and "no watchlist named 'hosts'" in gone.json()["detail"]
    assert client.get(BASE, headers=ana).json()["items"] == []


def test_without_a_token_nothing_is_saved_even_where_reads_are_public(client):
    assert client.get("/api/v1/health").json()["public_read"] is True
    for method, path in (("GET", ""), ("PUT", "/hosts"), ("GET", "/hosts"), ("GET", "/hosts/matches"),
                         ("DELETE", "/hosts")):
        response = client.request(method, BASE + path, content=WATCHLIST, headers=CSV_HEADERS)
        assert response.status_code == 401 and response.json()["error"] == "unauthenticated", (method, path)
        assert "belong to a token" in response.json()["detail"]


def test_a_revoked_token_is_refused_and_a_token_without_read_is_forbidden(client, ana):
    tokens = client.app.state.portal.tokens
    _put(client, ana)
    tokens.revoke("ana")
    for method, path in (("GET", ""), ("PUT", "/hosts"), ("GET", "/hosts"), ("DELETE", "/hosts")):
        response = client.request(method, BASE + path, content=WATCHLIST, headers=CSV_HEADERS | ana)
        assert response.status_code == 401 and "revoked" in response.json()["detail"], (method, path)
    uploader = _bearer(client, "robot", ["upload"])
    assert client.get(BASE, headers=uploader).status_code == 403
    rotated = _bearer(client, "ana")  # the owner is the token's name: a new token of ana's keeps her lists
    assert [i["name"] for i in client.get(BASE, headers=rotated).json()["items"]] == ["hosts"]


@pytest.mark.parametrize("name, statuses", [
    ("..", (400, 404)), ("%2E%2E", (400, 404)), ("..%2Fx", (404,)), ("%2E%2E%2Fx", (404,)), (".hidden", (400,)),
    ("a" * 10_000, (400,)), ("a%00b", (400,)), ("a%0Ab", (400,)), ("%1B%5B31m", (400,)), ("%C3%A9", (400,)),
    ("%E5%90%8D", (400,)), ("M%2031", (400,)), ("%FF%FE", (400,)), ("a" * 65, (400,)),
])
def test_hostile_names_are_a_clear_4xx_and_save_nothing(client, ana, name, statuses):
    for method in ("PUT", "GET", "DELETE"):
        response = client.request(method, f"{BASE}/{name}", content=WATCHLIST, headers=CSV_HEADERS | ana)
        assert response.status_code in statuses, (method, response.status_code, response.text[:200])
        assert response.json()["error"] in ("invalid_watchlist_name", "not_found", "method_not_allowed")
        assert len(response.text) < 1000
    matches = client.get(f"{BASE}/{name}/matches", headers=ana)
    assert matches.status_code in (400, 404)
    assert client.get(BASE, headers=ana).json()["items"] == []


@pytest.mark.parametrize("body, headers, status, reason", [
    (WATCHLIST, {"content-type": "application/json"}, 415, "unsupported_media_type"),
    (WATCHLIST, {}, 415, "unsupported_media_type"),
    ("", CSV_HEADERS, 400, "invalid_watchlist"),
    ("ra,dec\n91,91\n", CSV_HEADERS, 400, "invalid_watchlist"),
    (b"ra,dec\n1,1\n\xff\xfe\x00", CSV_HEADERS, 400, "invalid_watchlist"),
    (bytes(range(256)) * 64, CSV_HEADERS, 400, "invalid_watchlist"),
    ("ra,dec\n" + "1,1\n" * (MAX_ENTRIES + 1), CSV_HEADERS, 400, "invalid_watchlist"),
    ("ra,dec,name\n1,1,<script>alert(1)</script>\x1b\n", CSV_HEADERS, 400, "invalid_watchlist"),
    ("x" * (WATCHLIST_BYTES + 200_000), CSV_HEADERS, 413, "too_large"),
])
def test_a_hostile_body_is_a_clear_4xx_and_keeps_the_saved_list(client, ana, body, headers, status, reason):
    _put(client, ana)
    response = _put(client, ana, body=body, headers=headers)
    assert response.status_code == status and response.json()["error"] == reason, response.text[:300]
    assert client.get(f"{BASE}/hosts", headers=ana).json()["entries"] == 3


def test_a_full_list_is_saved_past_the_small_body_limit_and_the_owner_bounds_hold(client, ana, ben):
    full = "ra,dec\n" + "".join(f"{i * 0.03:.2f},{i * 0.001 - 5:.3f}\n" for i in range(MAX_ENTRIES))
    assert len(full) > 64 * 1024
    for i in range(MAX_OWNER_ENTRIES // MAX_ENTRIES):
        assert _put(client, ana, f"full{i}", body=full).status_code == 201
    over = _put(client, ana, "one-more", body="ra,dec\n1,1\n")
    assert over.status_code == 409 and over.json()["error"] == "watchlist_quota"
    assert "more than the 100,000 allowed" in over.json()["detail"]
    assert _put(client, ana, "full0", body=full).status_code == 200  # a replacement fits
    assert _put(client, ben, "mine", body="ra,dec\n1,1\n").status_code == 201  # ben's room is his own
    assert client.delete(f"{BASE}/full0", headers=ana).status_code == 204
    for i in range(MAX_LISTS - len(client.get(BASE, headers=ana).json()["items"])):
        assert _put(client, ana, f"small{i}", body="ra,dec\n1,1\n").status_code == 201
    over = _put(client, ana, "one-more", body="ra,dec\n1,1\n")
    assert over.status_code == 409 and f"the most allowed ({MAX_LISTS})" in over.json()["detail"]
    assert len(client.get(BASE, headers=ana).json()["items"]) == MAX_LISTS


def test_a_private_portal_under_uvicorn(portal_config):
    private = replace(portal_config, public_read=False)
    with TestClient(create_app(private)) as c:
        clear = c.app.state.portal.tokens.add("astronomer", ["read"])
    auth = {"Authorization": f"Bearer {clear}"}
    with running_server(private) as base:
        assert httpx.get(f"{base}{BASE}").status_code == 401
        assert httpx.put(f"{base}{BASE}/hosts", content=WATCHLIST, headers=CSV_HEADERS).status_code == 401
        saved = httpx.put(f"{base}{BASE}/hosts", content=WATCHLIST, headers=CSV_HEADERS | auth)
        assert saved.status_code == 201
        found = httpx.get(f"{base}{BASE}/hosts/matches", headers=auth)
        assert found.status_code == 200 and found.json()["matched"] == 4

        def chunks():
            yield b"ra,dec\n"
            for _ in range(WATCHLIST_BYTES // 65536 + 2):
                yield b"1,1\n" * 16384

        big = httpx.put(f"{base}{BASE}/hosts", content=chunks(), headers=CSV_HEADERS | auth)
        assert big.status_code == 413 and big.json()["error"] == "too_large"
        assert httpx.get(f"{base}{BASE}/hosts", headers=auth).json()["entries"] == 3


def test_a_named_origin_may_save_and_delete_from_its_page(portal_config):
    friendly = replace(portal_config, cors_origins=("https://ok.example",))
    with TestClient(create_app(friendly)) as c:
        for method in ("PUT", "DELETE"):
            asked = {"Origin": "https://ok.example", "Access-Control-Request-Method": method,
                     "Access-Control-Request-Headers": "authorization, content-type"}
            preflight = c.options(f"{BASE}/hosts", headers=asked)
            assert preflight.status_code == 200 and method in preflight.headers["access-control-allow-methods"]
            evil = c.options(f"{BASE}/hosts", headers=asked | {"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in evil.headers


def test_a_watchlists_file_that_is_not_a_database_is_503(client, ana, portal_config):
    portal_config.watchlists_path.write_bytes(b"not a database" * 100)
    for method, path in (("GET", ""), ("PUT", "/hosts"), ("GET", "/hosts")):
        response = client.request(method, BASE + path, content=WATCHLIST, headers=CSV_HEADERS | ana)
        assert response.status_code == 503 and response.json()["error"] == "unavailable", (method, path)


def test_the_openapi_document_describes_the_endpoints(client):
    paths = client.app.openapi()["paths"]
    assert set(paths[BASE]) == {"get"} and set(paths[f"{BASE}/{{name}}"]) == {"get", "put", "delete"}
    assert {"text/csv", "multipart/form-data"} <= set(paths[f"{BASE}/{{name}}"]["put"]["requestBody"]["content"])
    assert {p["name"] for p in paths[f"{BASE}/{{name}}/matches"]["get"]["parameters"]} == {
        "name", "since_mjd", "limit", "format"}
