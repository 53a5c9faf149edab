"""Watchlists against the archive: ``POST /api/v1/crossmatch``.

An astronomer posts a watchlist (:mod:`broker.watchlist`: a CSV of name, ra, dec and radius) and
gets the archived alerts within each entry's radius (:func:`streams.web.queries.crossmatch`), as
JSON or CSV. The body is a CSV (``text/csv``, ``text/plain``, ``text/tab-separated-values``) or a
multipart form with the file in the part ``watchlist``; at most
:data:`streams.web.app.WATCHLIST_BYTES` and :data:`MAX_ENTRIES` entries. Costly, like ``/cone``.
:mod:`streams.web.saved_watchlists` reads a saved list's body with :func:`read_watchlist_body` and
answers its matches with :func:`answer_matches`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from broker import watchlist_store as store
from broker.errors import FrameTooLarge, InvalidQuery, UnsupportedMediaType
from broker.watchlist import DEFAULT_RADIUS_ARCSEC, MAX_RADIUS_ARCSEC, Watchlist, read_watchlist
from streams.web import queries
from streams.web.api import LIMITED, CostlyReader, portal_of
from streams.web.app import WATCHLIST_BYTES, Portal
from streams.web.upload import read_body, read_form

router = APIRouter(prefix="/api/v1", tags=["alerts"])
#: Entries a posted or saved watchlist may hold (count); ``broker crossmatch`` reads up to 100,000.
MAX_ENTRIES = store.MAX_ENTRIES
#: Content types of a watchlist sent as the body itself.
TEXT_TYPES = ("text/csv", "text/plain", "text/tab-separated-values", "application/csv")
#: The OpenAPI description of a watchlist body (CSV, or a form's part ``watchlist``).
WATCHLIST_BODY = {"content": {t: {"schema": {"type": "string"}} for t in ("text/csv", "text/plain")} | {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "watchlist": {"type": "string", "format": "binary"}}, "required": ["watchlist"]}}},
    "required": True, "description": "the watchlist: a header row naming ra and dec (and name, radius), one row "
                                     "per entry (docs/portal.md, 'Watchlists')"}


async def read_watchlist_body(request: Request) -> bytes:
    """The watchlist's bytes, from the body or the form part ``watchlist``; 415 for another content type."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in TEXT_TYPES:
        return await read_body(request, WATCHLIST_BYTES)
    if kind != "multipart/form-data":
        raise UnsupportedMediaType(f"content type {kind or 'none'!r}: send the watchlist as text/csv, or a "
                                   "multipart/form-data form with the file in the part 'watchlist'")
    async with read_form(request, max_files=1, max_fields=4) as form:
        parts = form.getlist("watchlist")
        if len(parts) != 1 or not isinstance(parts[0], UploadFile):
            raise InvalidQuery("the form needs one file part named 'watchlist'")
        data = await parts[0].read(WATCHLIST_BYTES + 1)
    if len(data) > WATCHLIST_BYTES:
        raise FrameTooLarge(f"watchlist over the {WATCHLIST_BYTES}-byte limit")
    return data


@router.post("/crossmatch", response_model=None, responses={**LIMITED, 200: {"content": {"text/csv": {}}}},
             openapi_extra={"requestBody": WATCHLIST_BODY})
async def crossmatch(request: Request, who: CostlyReader,
                     radius_arcsec: Annotated[float, Query(
                         gt=0, le=MAX_RADIUS_ARCSEC, description="radius of the entries without one (arcsec)")]
                     = DEFAULT_RADIUS_ARCSEC,
                     since_mjd: Annotated[float | None, Query(
                         ge=0, le=1e6, description="only alerts observed at or after this MJD")] = None,
                     limit: Annotated[int, Query(ge=1, le=10_000, description="matches answered at most")] = 1000,
                     format: Annotated[str, Query(pattern="^(json|csv)$")] = "json") -> Response | dict:
    """Archived alerts near a watchlist's entries: by entry, newest first, each with its entry and distance."""
    watchlist = read_watchlist(await read_watchlist_body(request), radius_arcsec, MAX_ENTRIES)
    return await answer_matches(portal_of(request), watchlist, limit, since_mjd, format)


async def answer_matches(portal: Portal, watchlist: Watchlist, limit: int, since_mjd: float | None,
                         format: str) -> Response | dict:
    """The archived alerts near ``watchlist`` (:func:`streams.web.queries.crossmatch`) as JSON or CSV.

    Parameters
    ----------
    portal : Portal
    watchlist : Watchlist
    limit : int
        Matches answered at most (count); ``matched`` counts them all.
    since_mjd : float or None
        Only alerts observed at or after this MJD [d]; None: every one.
    format : str
        ``json`` (the dict of :func:`~streams.web.queries.crossmatch` with ``entries``) or ``csv``
        (:func:`~streams.web.queries.matches_csv`, the count in ``X-Matched``).
    """
    found = await portal.run(queries.crossmatch, portal.require_archive(), watchlist, limit, since_mjd)
    found["entries"] = len(watchlist)
    if format == "json":
        return found
    return Response(queries.matches_csv(found["items"]), media_type="text/csv; charset=utf-8",
                    headers={"X-Matched": str(found["matched"])})

