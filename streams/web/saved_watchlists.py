"""Saved watchlists over HTTP: ``/api/v1/watchlists`` (:mod:`broker.watchlist_store`).

A token's holder saves a watchlist under a name (``PUT /api/v1/watchlists/{name}``, the body read
as ``POST /api/v1/crossmatch`` reads it: :func:`streams.web.watchlists.read_watchlist_body`), lists
their lists (``GET /api/v1/watchlists``), reads one back as JSON or CSV (``GET .../{name}``),
deletes one (``DELETE .../{name}``) and asks which archived alerts lie near its targets
(``GET .../{name}/matches?since_mjd=``: the answer of the crossmatch endpoint for the same list,
:func:`streams.web.watchlists.answer_matches`), so "what is new on my targets since I last looked"
is one request. The owner is the token's name: each token sees only its owner's lists (another's
is 404, as a missing one), and a request without a token is 401 even where reads are public, as
there is nobody to keep the list for. Scope ``read``: a list changes nothing anyone else sees.
Every endpoint is costly (:mod:`streams.web.limits`); the SQLite work runs in the portal's thread
pool, one connection per request, in ``WebConfig.watchlists_path``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from broker.errors import ConfigError, NotFound, Unauthenticated, Unavailable
from broker.watchlist import DEFAULT_RADIUS_ARCSEC, MAX_RADIUS_ARCSEC, Watchlist, read_watchlist
from broker.watchlist_store import MAX_LISTS, MAX_OWNER_ENTRIES, SavedList, WatchlistStore, check_list_name
from streams.web import queries
from streams.web.api import LIMITED, portal_of
from streams.web.app import Portal
from streams.web.limits import costly
from streams.web.tokens import Principal, bearer
from streams.web.watchlists import MAX_ENTRIES, WATCHLIST_BODY, answer_matches, read_watchlist_body


def signed_in(request: Request) -> None:
    """Unauthenticated (HTTP 401) for a request without a token: saved lists belong to one."""
    if bearer(request) is None:
        raise Unauthenticated("saved watchlists belong to a token: send one with scope 'read' "
                              "(Authorization: Bearer ...; broker token add NAME --scope read)")


router = APIRouter(prefix="/api/v1/watchlists", tags=["watchlists"], dependencies=[Depends(signed_in)])
#: The token whose lists a request reads or changes, held to the limits of costly work.
Owner = Annotated[Principal, Depends(costly("read"), scope="function")]
#: Columns of a saved list read back as CSV: a watchlist :func:`broker.watchlist.read_watchlist` reads
#: again (the name last, so that a name starting with ``#`` cannot make its row a comment).
ENTRY_COLUMNS = ("ra", "dec", "radius", "name")
_FORMAT = Annotated[str, Query(pattern="^(json|csv)$", description="json, or csv")]


@contextmanager
def _store(portal: Portal) -> Iterator[WatchlistStore]:
    """The portal's watchlist store; :class:`Unavailable` (HTTP 503) when its file is not one."""
    try:
        store = WatchlistStore(portal.config.watchlists_path, max_entries=MAX_ENTRIES)
    except ConfigError as exc:  # a corrupt or foreign file: the server's fault, not the request's
        raise Unavailable(f"the portal's watchlists database cannot be used: {exc}") from exc
    with store:
        yield store


def _saved(portal: Portal, owner: str, name: str, watchlist: Watchlist) -> tuple[SavedList, bool]:
    with _store(portal) as store:
        return store.save(owner, name, watchlist)


def _lists(portal: Portal, owner: str) -> list[SavedList]:
    if not portal.config.watchlists_path.is_file():
        return []
    with _store(portal) as store:
        return store.lists(owner)


def _kept(portal: Portal, name: str) -> None:
    """A clear 400 for a bad name, or 404 while no list was ever saved (the file is not made by a read)."""
    check_list_name(name)
    if not portal.config.watchlists_path.is_file():
        raise NotFound(f"you have no watchlist named {name!r}")


def _load(portal: Portal, owner: str, name: str) -> tuple[SavedList, Watchlist]:
    _kept(portal, name)
    with _store(portal) as store:
        return store.load(owner, name)


def _delete(portal: Portal, owner: str, name: str) -> None:
    _kept(portal, name)
    with _store(portal) as store:
        store.delete(owner, name)


@router.get("", responses=LIMITED)
async def list_watchlists(request: Request, who: Owner) -> dict:
    """The token's saved watchlists by name (``name``, ``entries``, ``created``, ``updated``: Unix s); the bounds."""
    portal = portal_of(request)
    items = await portal.run(_lists, portal, who.name)
    return {"items": [asdict(i) for i in items],
            "limits": {"lists": MAX_LISTS, "entries_per_list": MAX_ENTRIES, "entries": MAX_OWNER_ENTRIES}}


@router.put("/{name}", responses={**LIMITED, 200: {"description": "replaced"}, 201: {"description": "created"},
                                  409: {"description": "over the lists or entries the token may keep"}},
            openapi_extra={"requestBody": WATCHLIST_BODY}, status_code=201)
async def save_watchlist(name: str, request: Request, response: Response, who: Owner,
                         radius_arcsec: Annotated[float, Query(
                             gt=0, le=MAX_RADIUS_ARCSEC, description="radius of the entries without one (arcsec)")]
                         = DEFAULT_RADIUS_ARCSEC) -> dict:
    """Save a watchlist under ``name`` (201), or replace the token's list of that name (200)."""
    check_list_name(name)  # before the body is read
    watchlist = read_watchlist(await read_watchlist_body(request), radius_arcsec, MAX_ENTRIES)
    portal = portal_of(request)
    saved, created = await portal.run(_saved, portal, who.name, name, watchlist)
    response.status_code = 201 if created else 200
    return asdict(saved)


@router.get("/{name}", response_model=None, responses={**LIMITED, 200: {"content": {"text/csv": {}}}})
async def get_watchlist(name: str, request: Request, who: Owner, format: _FORMAT = "json") -> Response | dict:
    """One of the token's lists: its entries in order, as JSON (``items``) or as a CSV that can be saved again."""
    portal = portal_of(request)
    saved, watchlist = await portal.run(_load, portal, who.name, name)
    entries = [watchlist.entry(i) for i in range(len(watchlist))]
    if format == "json":
        return asdict(saved) | {"items": entries}
    rows = [{"ra": e["ra"], "dec": e["dec"], "radius": e["radius_arcsec"], "name": e["name"]} for e in entries]
    return Response(queries.csv_text(ENTRY_COLUMNS, rows), media_type="text/csv; charset=utf-8")


@router.delete("/{name}", status_code=204, response_class=Response, responses=LIMITED)
async def delete_watchlist(name: str, request: Request, who: Owner) -> Response:
    """Delete one of the token's lists (404 when it has none of that name)."""
    portal = portal_of(request)
    await portal.run(_delete, portal, who.name, name)
    return Response(status_code=204)


@router.get("/{name}/matches", response_model=None, responses={**LIMITED, 200: {"content": {"text/csv": {}}}})
async def watchlist_matches(name: str, request: Request, who: Owner,
                            since_mjd: Annotated[float | None, Query(
                                ge=0, le=1e6, description="only alerts observed at or after this MJD")] = None,
                            limit: Annotated[int, Query(ge=1, le=10_000, description="matches answered at most")]
                            = 1000, format: _FORMAT = "json") -> Response | dict:
    """Archived alerts near a saved list's entries: the answer of ``POST /api/v1/crossmatch`` for that list."""
    portal = portal_of(request)
    _, watchlist = await portal.run(_load, portal, who.name, name)
    return await answer_matches(portal, watchlist, limit, since_mjd, format)
