"""The HTML pages and their static files: served from the package, no network, no data in the markup."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from streams.web import pages
from streams.web.pages import ASSETS, CSP, SWAGGER_FILES

PAGES = {"/": "live.js", "/objects/OBJ0000000000001": "object.js", "/frames/SAMPLE-F1-r-0003": "frame.js",
         "/vet": "vet.js", "/upload": "upload.js", "/watchlist": "watchlist.js", "/docs": "docs.js"}
#: The portal's own static files (Swagger UI's come from the fastapi-swagger package).
OWN = sorted(set(ASSETS) - set(SWAGGER_FILES))


@pytest.mark.parametrize("path", list(PAGES))
def test_each_page_is_a_shell_with_its_script_and_a_closed_content_security_policy(client, path):
    res = client.get(path)
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    assert res.headers["content-security-policy"] == CSP and "script-src 'self'" in CSP
    assert res.headers["x-content-type-options"] == "nosniff"
    assert f'<script type="module" src="/static/{PAGES[path]}"></script>' in res.text
    assert "<script>" not in res.text  # no inline script: the CSP would refuse it anyway


def test_nothing_of_the_url_is_written_into_a_page(client):
    res = client.get("/objects/%3Cimg%20src=x%20onerror=alert(1)%3E")
    assert res.status_code == 200 and "alert(1)" not in res.text
    res = client.get("/objects/%3Cscript%3Ealert(1)%3C%2Fscript%3E")  # a "/" in it: no such page
    assert res.status_code == 404 and "alert(1)" not in res.text
    assert client.get("/frames/a/b/%22%3E%3Cimg%20src=x%3E").text == client.get("/frames/x").text


def test_every_referenced_static_file_is_served_with_its_type_and_an_etag(client):
    referenced = set()
    for path in PAGES:
        referenced |= set(re.findall(r'/static/([\w.-]+)', client.get(path).text))
    for name, asset in ASSETS.items():
        if name.endswith(".js"):
            referenced |= set(re.findall(r'from "\./([\w.-]+)"', asset.body.decode()))
    assert {"portal.css", "common.js", "lightcurve.js", "favicon.svg", *PAGES.values()} <= referenced
    for name in referenced:
        res = client.get(f"/static/{name}")
        assert res.status_code == 200, name
        assert res.headers["etag"] == ASSETS[name].etag
        kind = {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}[name.rsplit(".", 1)[1]]
        assert res.headers["content-type"].startswith(kind)
        again = client.get(f"/static/{name}", headers={"If-None-Match": res.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
    assert client.get("/favicon.ico").headers["content-type"].startswith("image/svg+xml")


def test_a_static_file_is_304_for_any_if_none_match_that_names_its_etag(client):
    """A list of tags, a weak tag (``W/``, as a compressing proxy sends it) and ``*`` were 200 with the body."""
    etag = ASSETS["common.js"].etag
    for header in (etag, f'"other", {etag}', f"W/{etag}", "*"):
        assert client.get("/static/common.js", headers={"If-None-Match": header}).status_code == 304, header
    assert client.get("/static/common.js", headers={"If-None-Match": '"other", W/"x"'}).status_code == 200


@pytest.mark.parametrize("name", ["nope.js", "..%2Fpages.py", "%2E%2E%2F%2E%2E%2Fapp.py", "page.html", "portal.css%00"])
def test_unknown_or_escaping_static_names_are_404(client, name):
    res = client.get(f"/static/{name}")
    assert res.status_code == 404 and res.json()["error"] == "not_found"


def test_the_static_files_reach_for_nothing_outside_this_server():
    """No CDN, web font or other URL: the portal works on a network with no way out.

    Swagger UI's bundle holds URLs in strings (error links, its default validator); the API page
    turns the validator off, and the browser test checks that the page loads nothing from outside.
    """
    assert "validatorUrl: null" in ASSETS["docs.js"].body.decode()
    for name in OWN:
        text = ASSETS[name].body.decode()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, f"{name} refers to {urls}"
        assert "@import" not in text and "fonts.googleapis" not in text


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the JavaScript syntax check needs it")
@pytest.mark.parametrize("name", sorted(n for n in ASSETS if n.endswith(".js")))
def test_the_javascript_parses(tmp_path, name):
    path = tmp_path / (name if name in SWAGGER_FILES else name.replace(".js", ".mjs"))  # ours: ES modules
    path.write_bytes(ASSETS[name].body)
    res = subprocess.run(["node", "--check", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_the_api_page_says_what_is_missing_without_swagger_ui(client, monkeypatch):
    monkeypatch.setattr(pages, "ASSETS", {k: v for k, v in ASSETS.items() if k not in SWAGGER_FILES})
    res = client.get("/docs")
    assert res.status_code == 404 and "fastapi-swagger" in res.json()["detail"]
    assert client.get("/static/swagger-ui-bundle.js").status_code == 404
    assert client.get("/openapi.json").status_code == 200
