"""The portal's HTML pages and their static files: live alerts, an object, a frame, vetting, an upload, a watchlist.

The pages are static shells (``templates/``) whose JavaScript (``static/``) reads the REST API; no
data is ever written into the HTML, so nothing a user sends can become markup. Everything is
served from the package: no CDN, no web font, no network at run time. The static files are read
once, at import, from a fixed list (no path from a request ever reaches the file system), and
served with an ETag. Every page carries a Content-Security-Policy that allows scripts, styles,
images and connections from this server only.

Pages
-----
``/``
    Live alerts (:mod:`streams.web.live` streams them) with the filter language of ``broker subscribe``.
``/objects/{object_id}``
    The light curve per band with upper limits, classification, context, features and alerts.
``/frames/{frame_id}``
    The frame with its candidates marked, and their table.
``/watchlist``
    A watchlist of targets against the archive (``POST /api/v1/crossmatch``).
``/vet``
    The vetting page (:mod:`streams.web.vetting`): keyboard labels real/bogus/interesting.
``/docs``
    The REST API, browsable and callable (Swagger UI over ``/openapi.json``, with the stored token).
    Swagger UI's files come from the ``fastapi-swagger`` package (the ``web`` extra; only its
    files are used), served from memory as the other static files; without the package the page
    answers 404 and says so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from string import Template

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from broker.errors import NotFound

router = APIRouter(include_in_schema=False)

#: Content-Security-Policy of the pages: this server only (style attributes are set by the scripts).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY"}
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".svg": "image/svg+xml", ".png": "image/png"}


@dataclass(frozen=True)
class Asset:
    """One static file, held in memory: bytes, media type and ETag."""

    body: bytes
    media_type: str
    etag: str

    @classmethod
    def of(cls, name: str, body: bytes) -> Asset:
        """The asset of file ``name`` (its type from the suffix, one of ``_TYPES``)."""
        return cls(body, _TYPES["." + name.rsplit(".", 1)[-1]], '"' + hashlib.sha256(body).hexdigest()[:16] + '"')


def _load_assets() -> dict[str, Asset]:
    """Every file of ``static/`` with a known type, by name."""
    return {item.name: Asset.of(item.name, item.read_bytes())
            for item in resources.files("streams.web").joinpath("static").iterdir()
            if item.is_file() and "." + item.name.rsplit(".", 1)[-1] in _TYPES}


#: Swagger UI's files, served from the ``fastapi-swagger`` package (Swagger UI 5) when installed.
SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css")


def _swagger_assets() -> dict[str, Asset]:
    """Swagger UI's bundle and style sheet by name (empty without ``fastapi-swagger``)."""
    try:
        folder = resources.files("fastapi_swagger").joinpath("resources")
    except ModuleNotFoundError:
        return {}
    return {name: Asset.of(name, folder.joinpath(name).read_bytes()) for name in SWAGGER_FILES}


def _template(name: str) -> Template:
    return Template(resources.files("streams.web").joinpath("templates", name).read_text("utf-8"))


ASSETS = _load_assets() | _swagger_assets()
_PAGE = _template("page.html")


def render_page(title: str, script: str, body: str, active: str = "") -> str:
    """The HTML of one page: the shared frame (bar, navigation) around ``body`` (a template, no data)."""
    return _PAGE.substitute(title=title, script=script, body=body, on_live="on" if active == "live" else "",
                            on_vet="on" if active == "vet" else "", on_upload="on" if active == "upload" else "",
                            on_watch="on" if active == "watchlist" else "",
                            on_docs="on" if active == "docs" else "")


_PAGES = {
    "live": render_page("Live alerts", "live.js", _template("live.html").template, "live"),
    "object": render_page("Object", "object.js", _template("object.html").template),
    "frame": render_page("Frame", "frame.js", _template("frame.html").template),
    "vet": render_page("Vetting", "vet.js", _template("vet.html").template, "vet"),
    "upload": render_page("Upload", "upload.js", _template("upload.html").template, "upload"),
    "watchlist": render_page("Watchlist", "watchlist.js", _template("watchlist.html").template, "watchlist"),
    "docs": render_page("API", "docs.js", _template("docs.html").template, "docs"),
}


def _page(name: str) -> HTMLResponse:
    return HTMLResponse(_PAGES[name], headers=_HEADERS)


@router.get("/", response_class=HTMLResponse)
async def live_page() -> HTMLResponse:
    """Alerts as they arrive."""
    return _page("live")


@router.get("/objects/{object_id}", response_class=HTMLResponse)
async def object_page(object_id: str) -> HTMLResponse:
    """One object: light curve, classification, context, alerts (the script reads the id from the URL)."""
    return _page("object")


@router.get("/frames/{frame_id:path}", response_class=HTMLResponse)
async def frame_page(frame_id: str) -> HTMLResponse:
    """One frame with its candidates marked."""
    return _page("frame")


@router.get("/vet", response_class=HTMLResponse)
async def vet_page() -> HTMLResponse:
    """Vetting with keyboard shortcuts."""
    return _page("vet")


@router.get("/upload", response_class=HTMLResponse)
async def upload_page() -> HTMLResponse:
    """Upload a FITS frame and see its candidates with their scores (``POST /api/v1/frames?mode=predict``)."""
    return _page("upload")


@router.get("/watchlist", response_class=HTMLResponse)
async def watchlist_page() -> HTMLResponse:
    """Match a watchlist of targets against the archive (``POST /api/v1/crossmatch``)."""
    return _page("watchlist")


@router.get("/docs", response_class=HTMLResponse)
async def docs_page() -> HTMLResponse:
    """The REST API in Swagger UI (404 without the ``fastapi-swagger`` package)."""
    if not set(SWAGGER_FILES) <= ASSETS.keys():
        raise NotFound("the API page needs the fastapi-swagger package (pip install '.[web]'); "
                       "the API description is at /openapi.json")
    return _page("docs")


@router.get("/favicon.ico")
async def favicon(request: Request) -> Response:
    """The portal's icon, for browsers that ask at the root."""
    return await static_file("favicon.svg", request)


@router.get("/static/{name}")
async def static_file(name: str, request: Request) -> Response:
    """A static file of the portal (304 when the browser holds this version)."""
    asset = ASSETS.get(name)
    if asset is None:
        raise NotFound(f"no static file {name[:80]!r}")
    headers = {"ETag": asset.etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if names_etag(request.headers.get("if-none-match"), asset.etag):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


def names_etag(header: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` matches ``etag``: ``*``, or a list naming it, weak (``W/``) or not (RFC 9110)."""
    if header is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag in tags
