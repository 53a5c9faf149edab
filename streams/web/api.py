"""The read-only REST API under ``/api/v1/``: alerts, objects, cone search, frames, cutouts, health, metrics.

Every blocking read runs in the portal's thread pool (:meth:`streams.web.app.Portal.run`). Read
endpoints need scope ``read`` unless ``WebConfig.public_read``. Those that read the archive or the
history or draw an image are costly (:data:`CostlyReader`): held to the per-client budget and the
bound on the work in hand of :mod:`streams.web.limits` (429 or 503, with ``Retry-After``). The
JSON shapes (``AlertSummary`` and the others) are described in ``docs/portal.md`` and the OpenAPI
document at ``/openapi.json``.
"""

from __future__ import annotations

import math
import threading
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.convertors import Convertor, register_url_convertor

from broker.errors import NotFound, Unavailable
from streams.alert_expr import AlertFilter
from streams.web import queries, render
from streams.web.app import Portal
from streams.web.limits import costly
from streams.web.records import CUTOUT_FIELDS, clean, lightcurve, public_record, summary_of
from streams.web.tokens import Principal, require

router = APIRouter(prefix="/api/v1", tags=["alerts"])
metrics_router = APIRouter(tags=["service"])
Reader = Annotated[Principal, Depends(require("read"))]
#: The reader of a costly endpoint, held to :mod:`streams.web.limits` until the endpoint returns.
CostlyReader = Annotated[Principal, Depends(costly("read"), scope="function")]
#: The answers of a costly endpoint's limits, for the OpenAPI document.
LIMITED: dict[int | str, dict[str, Any]] = {
    429: {"description": "over the client's work per minute, or its costly requests in hand (see Retry-After)"},
    503: {"description": "busy: the most costly requests this server takes (see Retry-After); or no archive"}}
#: Cache lifetime of images and records (s): an archived alert never changes.
IMMUTABLE = "public, max-age=86400, immutable"
#: Cache lifetime of a frame's image (s): the difference store drops old frames.
FRAME_IMAGE = "public, max-age=60"
#: Cache lifetime of the images of an alert read live and not yet archived (s): the archive's record
#: of its id, once committed, is the one answered (``queries.RecordCache``), and may differ.
PROVISIONAL = "public, max-age=30"
_CLASSIFIERS = threading.Lock()
_FORCED = threading.Lock()


def portal_of(request: Request) -> Portal:
    """The application's shared :class:`Portal`."""
    portal: Portal = request.app.state.portal
    return portal


def record_cache(portal: Portal) -> queries.RecordCache:
    """The portal's cache of archived alert records (made at first use; Unavailable without an archive)."""
    view = portal.require_archive()
    cache = portal.extras.get("records")
    if cache is None or cache.archive is not view:
        cache = portal.extras["records"] = queries.RecordCache(view)
    return cache


async def _record(portal: Portal, alert_id: int) -> dict:
    return (await _looked_up(portal, alert_id))[0]


async def _looked_up(portal: Portal, alert_id: int) -> tuple[dict, str]:
    """The record of ``alert_id`` and the cache policy of what is made of it (final once archived)."""
    record, archived = await portal.run(record_cache(portal).lookup, alert_id)
    return record, cache_control(portal, IMMUTABLE if archived else PROVISIONAL)


def cache_control(portal: Portal, policy: str) -> str:
    """``policy`` (:data:`IMMUTABLE`, :data:`FRAME_IMAGE`) as this portal may send it.

    Where reads need a token (``--private``), ``public`` becomes ``private``: a shared cache (a
    reverse proxy) would otherwise keep a token's answer and serve it to callers without one.
    """
    return policy if portal.config.public_read else policy.replace("public", "private", 1)


def _png(data: bytes, policy: str) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": policy})


@router.get("/health", tags=["service"])
async def health(request: Request) -> dict:
    """Whether the server answers: alerts in the archive, objects in the history (null without), Kafka or not."""
    portal = portal_of(request)

    def counts() -> tuple[int | None, int | None]:
        with portal.history() as history:
            objects = queries.history_count(history)
        return (portal.archive.count() if portal.archive is not None else None), objects

    alerts, objects = await portal.run(counts)
    return {"status": "ok", "archive": alerts, "history": objects, "public_read": portal.config.public_read,
            "publish": portal.config.bootstrap is not None}


@metrics_router.get("/metrics", response_class=Response)
async def metrics(request: Request, who: Reader) -> Response:
    """The portal's Prometheus metrics (requests and their latency by route)."""
    return Response(generate_latest(portal_of(request).registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/alerts", responses=LIMITED)
async def alerts(request: Request, who: CostlyReader,
                 filter: Annotated[str | None, Query(max_length=1000, description=(
                     "An expression of `broker subscribe --filter`, e.g. `snr > 7 and rb > 0.8`"))] = None,
                 limit: Annotated[int, Query(ge=1, le=500)] = 50,
                 cursor: Annotated[str | None, Query(max_length=200)] = None) -> dict:
    """The newest alerts first, optionally filtered: ``{"items": [AlertSummary], "next": cursor|null}``."""
    portal = portal_of(request)
    archive = portal.require_archive()
    if filter and filter.strip():
        flt = AlertFilter(filter)
        return await portal.run(queries.latest_filtered, archive, flt, limit, cursor)
    return await portal.run(queries.latest, archive, limit, cursor)


@router.get("/alerts/{alert_id}", responses=LIMITED)
async def alert(request: Request, who: CostlyReader, alert_id: int) -> dict:
    """The whole alert record (cutout bytes left out), its ``summary`` and its ``cutouts`` URLs."""
    return public_record(await _record(portal_of(request), alert_id), "")


@router.get("/alerts/{alert_id}/cutouts/{name}", response_class=Response, responses=LIMITED)
async def cutout(request: Request, who: CostlyReader, alert_id: int, name: str) -> Response:
    """One cutout: ``science``, ``reference`` or ``difference``, as ``.png`` (display-scaled) or ``.fits``."""
    kind, _, ext = name.rpartition(".")
    if kind not in CUTOUT_FIELDS or ext not in ("png", "fits"):
        raise NotFound(f"no cutout {name!r}: one of {[f'{k}.png' for k in CUTOUT_FIELDS]} or .fits")
    portal = portal_of(request)
    record, policy = await _looked_up(portal, alert_id)
    if ext == "png":
        return _png(await portal.run(render.cutout_png, record, kind), policy)
    data = await portal.run(render.cutout_fits, record, kind)
    return Response(data, media_type="application/fits", headers={
        "Cache-Control": policy,
        "Content-Disposition": f'attachment; filename="{alert_id}-{kind}.fits"'})


@router.get("/alerts/{alert_id}/triplet.png", response_class=Response, responses=LIMITED)
async def triplet(request: Request, who: CostlyReader, alert_id: int) -> Response:
    """The science / reference / difference triplet as one PNG, with scales and the alert's scores."""
    portal = portal_of(request)
    record, policy = await _looked_up(portal, alert_id)
    return _png(await portal.run(render.triplet_png, record), policy)


def _classifier(portal: Portal, version: str | None) -> Any:
    """The real/bogus classifier of ``version``, loaded once per application."""
    with _CLASSIFIERS:
        loaded = portal.extras.setdefault("classifiers", {})
        if version not in loaded:
            loaded[version] = render.load_classifier(version)
        return loaded[version]


@router.get("/alerts/{alert_id}/attribution.png", response_class=Response, responses=LIMITED)
async def attribution(request: Request, who: CostlyReader, alert_id: int) -> Response:
    """Which pixels made the real/bogus score (integrated gradients of the alert's model; needs torch)."""
    portal = portal_of(request)
    record, policy = await _looked_up(portal, alert_id)
    version = (record.get("scores") or {}).get("rb_model")
    classifier = await portal.run(_classifier, portal, version)
    return _png(await portal.run(render.attribution_png, record, classifier), policy)


def object_data(portal: Portal, object_id: str) -> tuple[list[dict], dict | None, list[dict]]:
    """An object's archived alert records (oldest first), its history row and its detections; NotFound if none."""
    queries.sql_str(object_id)
    records = queries.object_records(portal.require_archive() if portal.archive else None, object_id)
    with portal.history() as history:
        obj, detections = queries.history_of(history, object_id)
    if not records and obj is None:
        raise NotFound(f"no object {object_id!r} in the archive or the history")
    return records, obj, detections


def _object(portal: Portal, object_id: str) -> dict:
    """The object page's data: position, scores, context, light curve and alerts (newest first)."""
    records, obj, detections = object_data(portal, object_id)
    latest = records[-1] if records else None
    where = (latest or {}).get("object") or obj or {}

    def pick(key: str) -> Any:
        return (latest or {}).get(key) or (obj or {}).get(key)

    return clean({"object_id": object_id, "ra": where.get("ra"), "dec": where.get("dec"), "n_alerts": len(records),
                  "ndet": (obj or where).get("ndet"), "first_mjd": (obj or where).get("first_mjd"),
                  "classification": pick("classification"), "features": pick("features"),
                  "context": (latest or {}).get("context"), "lightcurve": lightcurve(latest, detections),
                  "alerts": [summary_of(r) for r in reversed(records)]})


@router.get("/objects/{object_id}", responses=LIMITED)
async def object_(request: Request, who: CostlyReader, object_id: str) -> dict:
    """An object: position, classification, features, context, light curve (per band, with upper limits), alerts."""
    portal = portal_of(request)
    return await portal.run(_object, portal, object_id)


@router.get("/cone", responses=LIMITED)
async def cone(request: Request, who: CostlyReader,
               ra: Annotated[float, Query(description="right ascension (deg, ICRS), [0, 360)")],
               dec: Annotated[float, Query(description="declination (deg), [-90, 90]")],
               radius_arcsec: Annotated[float, Query(description="search radius (arcsec), (0, 3600]")] = 5.0,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
    """Alerts within ``radius_arcsec`` of (``ra``, ``dec``), nearest first, each with ``distance_arcsec``."""
    queries.check_position(ra, dec, radius_arcsec)
    portal = portal_of(request)
    items = await portal.run(queries.cone, portal.require_archive(), ra, dec, radius_arcsec, limit)
    return {"items": items}


@router.get("/objects", responses=LIMITED)
async def objects_near(request: Request, who: CostlyReader,
                       ra: Annotated[float, Query(description="right ascension (deg, ICRS), [0, 360)")],
                       dec: Annotated[float, Query(description="declination (deg), [-90, 90]")],
                       radius_arcsec: Annotated[float, Query(description="search radius (arcsec), (0, 3600]")] = 60.0,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
    """Objects whose mean alert position is within ``radius_arcsec`` of (``ra``, ``dec``), nearest first.

    One row per object over all its archived alerts: mean position, ``distance_arcsec``,
    ``n_alerts``, first and last MJD, the newest magnitude, band and class, the highest rb and anomaly.
    """
    queries.check_position(ra, dec, radius_arcsec)
    portal = portal_of(request)
    return {"items": await portal.run(queries.object_cone, portal.require_archive(), ra, dec, radius_arcsec, limit)}


class FrameIdConvertor(Convertor[str]):
    """A frame id in a path (``{frame_id:frame_id}``): any characters, ``/`` included, and not ending in ``/``.

    So ``/api/v1/frames/`` and a trailing ``/`` still meet the router's redirect to the path without it.
    """

    regex = ".*[^/]"

    def convert(self, value: str) -> str:
        """The frame id as it is."""
        return value

    def to_string(self, value: str) -> str:
        """The frame id as it is."""
        return value


register_url_convertor("frame_id", FrameIdConvertor())


def _forced_points(portal: Portal, ra: float, dec: float, start_mjd: float, end_mjd: float,
                   min_snr: float) -> list[dict]:
    """:func:`broker.forced.forced_light_curve` on the pipeline's kept difference images (one call at a time)."""
    from broker.diffstore import DifferenceStore
    from broker.forced import check_position, forced_light_curve

    check_position(ra, dec, start_mjd, end_mjd)  # before the store: a bad query is 400 on any server
    if portal.config.state_dir is None:
        raise Unavailable("this server has no state folder, so no kept difference images (broker serve --state-dir)")
    with _FORCED:  # the store's cache of open frames is not shared between threads
        store = portal.extras.get("diffs")
        if store is None:
            store = portal.extras["diffs"] = DifferenceStore(portal.config.state_dir / "diffs",
                                                             portal.config.pipeline.differences)
        return forced_light_curve(store, ra, dec, start_mjd, end_mjd, min_snr)


@router.get("/forced", responses=LIMITED)
async def forced(request: Request, who: CostlyReader,
                 ra: Annotated[float, Query(description="right ascension (deg, ICRS), [0, 360)")],
                 dec: Annotated[float, Query(description="declination (deg), [-90, 90]")],
                 start_mjd: Annotated[float | None, Query(description="exposures started at or after (MJD)")] = None,
                 end_mjd: Annotated[float | None, Query(description="exposures that started before (MJD)")] = None,
                 min_snr: Annotated[float, Query(description="least S/N for a magnitude (else a limit)")] = 3.0,
                 ) -> dict:
    """Forced photometry at (``ra``, ``dec``) on every kept difference image that covers it, oldest first.

    ``{"ra", "dec", "points": [...]}``, each point a frame's PSF-fit difference flux there (science
    ADU on the frame's zero point ``magzp``) with its error, S/N, magnitude (S/N >= ``min_snr``) and
    5-sigma limiting magnitude (``broker.forced``). Only the newest ``[differences] max_frames``
    frames of each telescope, field and band are kept.
    """
    portal = portal_of(request)
    lo = -math.inf if start_mjd is None else start_mjd
    hi = math.inf if end_mjd is None else end_mjd
    points = await portal.run(_forced_points, portal, ra, dec, lo, hi, min_snr)
    return clean({"ra": ra, "dec": dec, "points": points})


def frame_url(frame_id: str) -> str:
    """The API path of a frame: its id percent-encoded whole (``/``, ``?``, ``#`` and ``%`` included)."""
    return f"/api/v1/frames/{quote(frame_id, safe='')}"


@router.get("/frames/{frame_id:frame_id}/image.png", response_class=Response, responses=LIMITED)
async def frame_image(request: Request, who: CostlyReader, frame_id: str) -> Response:
    """The frame's difference image as a display-scaled PNG (binned to at most 1024 px a side; row 0 at the bottom)."""
    portal = portal_of(request)

    def draw() -> bytes:
        _, folder = queries.frame_view(portal.require_archive(), portal.config.state_dir, frame_id)
        return render.image_png(render.binned(queries.frame_image(folder, frame_id)), diverging=True)

    return Response(await portal.run(draw), media_type="image/png",
                    headers={"Cache-Control": cache_control(portal, FRAME_IMAGE)})


@router.get("/frames/{frame_id:frame_id}", responses=LIMITED)
async def frame(request: Request, who: CostlyReader, frame_id: str) -> dict:
    """A frame: time, band, shape ``[ny, nx]``, its image's URL (null once not kept) and its candidates.

    A frame id is the telescope's (``FRAMEID``) and may hold any character, ``/`` included: the
    route takes the rest of the path (:class:`FrameIdConvertor`), and the image route is matched first.
    """
    portal = portal_of(request)
    view, folder = await portal.run(queries.frame_view, portal.require_archive(), portal.config.state_dir, frame_id)
    view["image_url"] = f"{frame_url(frame_id)}/image.png" if folder is not None else None
    return clean(view)
