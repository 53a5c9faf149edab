"""An object's light curve for the astronomer's own tools: ``GET /api/v1/objects/{object_id}/lightcurve``.

The points the object page draws (:func:`streams.web.records.lightcurve`: detections, forced
photometry and upper limits, by MJD) as JSON, CSV (pandas, a spreadsheet) or a VOTable with units
and UCDs (TOPCAT, astropy's ``Table.read``). Costly, like the object itself.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from streams.web.api import LIMITED, CostlyReader, object_data, portal_of
from streams.web.app import Portal
from streams.web.queries import csv_text
from streams.web.records import lightcurve
from streams.web.vo import VOTABLE_TYPE, Column, votable

router = APIRouter(prefix="/api/v1", tags=["alerts"])
#: The columns of the CSV and VOTable answers.
COLUMNS = (
    Column("mjd", "double", "d", "time.epoch", "exposure start of the frame (MJD, UTC)"),
    Column("band", "unicodeChar", None, "meta.id;instr.filter", "filter of the frame"),
    Column("telescope", "unicodeChar", None, "instr.tel", "telescope that took the frame"),
    Column("kind", "unicodeChar", None, "meta.code", "detection, forced (photometry at the position on a frame "
                                                     "without a detection) or upper_limit"),
    Column("flux", "double", None, "phot.flux", "difference flux, in counts of the frame (its zero point makes "
                                                "it a magnitude); negative: fainter than the reference"),
    Column("flux_err", "double", None, "stat.error;phot.flux", "its 1-sigma error"),
    Column("mag", "double", "mag", "phot.mag", "magnitude of |flux| on the frame's zero point"),
    Column("mag_err", "double", "mag", "stat.error;phot.mag", "its 1-sigma error"),
    Column("limit_mag", "double", "mag", "phot.mag;stat.max", "5-sigma limiting magnitude of an upper limit"),
)


def _points(portal: Portal, object_id: str) -> list[dict]:
    records, _, detections = object_data(portal, object_id)
    return lightcurve(records[-1] if records else None, detections)


@router.get("/objects/{object_id}/lightcurve", response_model=None,
            responses={**LIMITED, 200: {"content": {"text/csv": {}, VOTABLE_TYPE: {}}}})
async def object_lightcurve(request: Request, who: CostlyReader, object_id: str,
                            format: Annotated[str, Query(pattern="^(json|csv|votable)$")] = "json") -> Response | dict:
    """An object's light curve (detections, forced photometry, upper limits by MJD) as JSON, CSV or a VOTable."""
    portal = portal_of(request)
    points = await portal.run(_points, portal, object_id)
    if format == "json":
        return {"object_id": object_id, "points": points}
    name = re.sub(r"[^A-Za-z0-9._-]", "_", object_id)[:100] + "-lightcurve"
    if format == "csv":
        return Response(points_csv(points), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})
    body = await portal.run(votable, [("QUERY_STATUS", "OK", "")], COLUMNS, points, "lightcurve")
    return Response(body, media_type=VOTABLE_TYPE,
                    headers={"Content-Disposition": f'attachment; filename="{name}.xml"'})


def points_csv(points: list[dict]) -> str:
    """The points as CSV (:data:`COLUMNS`; null cells empty, text escaped)."""
    return csv_text([c.key for c in COLUMNS], points)
